"""SAU: the shared-adversarial PGD, the losses against numpy, the
runner contract and the effect on the test fixture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.defenses import sau
from bdjax.errors import BdjaxError
from tests.defense_checks import (assert_halves_asr, assert_vmap_matches_sequential,
                                   small_cnn_defense)


def test_config_defaults_and_validation():
    """config/defense/sau/cifar10.yaml and the Adam of argparser_opt_scheduler."""
    c = sau.SAUConfig()
    assert (c.epochs, c.batch_size, c.lr, c.b1, c.b2, c.weight_decay) == (100, 256, 1e-4, 0.9,
                                                                         0.999, 0.0)
    assert (c.norm, c.eps, c.pgd_step, c.pgd_steps, c.init, c.clip) == ("linf", 0.2, 0.2, 5,
                                                                        "max", False)
    assert (c.beta1, c.beta2, c.lambda1, c.lambda2, c.lambda3) == (0.01, 1.0, 1.0, 0.0, 1.0)
    assert not c.uses_validation and not c.train_mode
    assert small_cnn_defense("sau").config == c
    from bdjax import defenses

    assert defenses.for_run("sau", {}, dataset="tiny", model="preact_resnet18").config.epochs == 20
    with pytest.raises(BdjaxError, match="init 'ones'"):
        sau.SAUConfig(init="ones")
    with pytest.raises(BdjaxError, match="eps 0"):
        sau.SAUConfig(eps=0)
    with pytest.raises(BdjaxError, match="b2 1.0"):
        sau.SAUConfig(b2=1.0)
    with pytest.raises(BdjaxError, match="lambda3 -1"):
        sau.SAUConfig(lambda3=-1)


# ------------------------------------------------------------------------------ losses
def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


LOGITS_H = np.array([[3.0, 0.0, -1.0], [0.0, 2.0, 0.0], [1.0, 1.5, 0.0], [0.0, 0.0, 9.0],
                     [-30.0, 0.0, 30.0]], np.float32)
LOGITS_H0 = np.array([[2.0, 0.5, 0.0], [0.0, 2.0, 0.5], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0],
                      [0.0, 0.0, 1.0]], np.float32)
Y = np.array([0, 0, 1, 2, 1])
CLEAN_H = np.array([0, 0, 0, 0, 1])
CLEAN_H0 = np.array([0, 0, 0, 2, 1])


def test_shared_status():
    # predictions: h = [0, 1, 1, 2, 2], h0 = [0, 1, 0, 2, 2]
    fh, fh0, shared = sau.shared_status(LOGITS_H.argmax(1), LOGITS_H0.argmax(1), CLEAN_H,
                                        CLEAN_H0)
    np.testing.assert_array_equal(fh, [False, True, True, True, True])
    np.testing.assert_array_equal(fh0, [False, True, False, False, True])
    np.testing.assert_array_equal(shared, [False, True, False, False, True])


def test_pgd_loss_matches_numpy():
    """beta1 * -(CE_h over h not fooled + CE_h0 over h0 not fooled) / 2N + beta2 * JS over
    samples not shared / N, probabilities clamped at 1e-8 (row 5 hits the clamp)."""
    p, q = _softmax(LOGITS_H.astype(np.float64)), _softmax(LOGITS_H0.astype(np.float64))
    ce_h, ce_h0 = -np.log(p[np.arange(5), Y]), -np.log(q[np.arange(5), Y])
    pc, qc = np.maximum(p, 1e-8), np.maximum(q, 1e-8)
    m = (pc + qc) / 2
    js = (0.5 * (pc * np.log(pc / m) + qc * np.log(qc / m))).sum(1)
    not_fh = np.array([1, 0, 0, 0, 0])
    not_fh0 = np.array([1, 0, 1, 1, 0])
    not_shared = np.array([1, 0, 1, 1, 0])
    want = (0.01 * -((ce_h * not_fh).sum() + (ce_h0 * not_fh0).sum()) / 10
            + 1.0 * (js * not_shared).sum() / 5)
    got, shared = sau.pgd_loss(jnp.asarray(LOGITS_H), jnp.asarray(LOGITS_H0), jnp.asarray(Y),
                               jnp.asarray(CLEAN_H), jnp.asarray(CLEAN_H0), 0.01, 1.0)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_array_equal(shared, not_shared == 0)
    np.testing.assert_allclose(sau.js_divergence(LOGITS_H, LOGITS_H0), js, rtol=1e-4, atol=1e-7)


def test_shared_loss_matches_numpy():
    """The pair -log(1e-6 + min(1 - p, 0.999)) - log(1 + 1e-6 - max(p, 0.001)), p the
    probability of h0(x')'s class, over h0(x') != y and h0(x') != h0(x), / 2N."""
    pred_h0_adv = LOGITS_H0.argmax(1)  # [0, 1, 0, 2, 2]
    p = _softmax(LOGITS_H.astype(np.float64))
    hot = np.eye(3)[pred_h0_adv]
    # float32 like the reference: 1 + 1e-6 - p rounds where p -> 1 (row 5).
    pos = (p * hot).sum(1).astype(np.float32)
    neg = (p * (1 - hot)).sum(1).astype(np.float32)
    one, tiny = np.float32(1), np.float32(1e-6)
    per = (-np.log(tiny + np.minimum(neg, np.float32(0.999)))
           - np.log(one + tiny - np.maximum(pos, np.float32(0.001))))
    # y = [0, 0, 1, 2, 1], clean h0 = [0, 0, 0, 2, 1]: rows 1 and 4 have h0(x') == y,
    # row 3 h0(x') == h0(x); rows 2 and 5 qualify.
    mask = np.array([0, 1, 0, 0, 1])
    got, unlearn = sau.shared_loss(jnp.asarray(LOGITS_H), jnp.asarray(pred_h0_adv),
                                   jnp.asarray(CLEAN_H0), jnp.asarray(Y))
    np.testing.assert_array_equal(unlearn, mask == 1)
    np.testing.assert_allclose(float(got), (per * mask).sum() / 10, rtol=1e-5)
    # Row 5 is saturated (1 - p ~ 1e-13): each form is capped near -log(1e-6), not inf.
    assert 20 < per[4] < 2 * 14
    grad = jax.grad(lambda z: sau.shared_loss(z, jnp.asarray(pred_h0_adv),
                                              jnp.asarray(CLEAN_H0), jnp.asarray(Y))[0])
    g = np.asarray(grad(jnp.asarray(LOGITS_H)))
    assert np.isfinite(g).all() and (g[[0, 2, 3]] == 0).all() and (g[1] != 0).any()


def _brightness(threshold=0.5):
    """Two classes by mean pixel: class 0 when the mean exceeds ``threshold``."""
    return lambda z: jnp.stack([z.reshape(z.shape[0], -1).mean(1) - threshold,
                                jnp.zeros(z.shape[0])], -1) * 20


def _flat(value, n=1):
    return jnp.full((n, 4, 4, 3), value, jnp.float32)


def _pgd(f, f0, x, y, **kw):
    """:func:`sau.shared_pgd` compiled as one program (faster than op by op)."""
    return jax.jit(lambda x, y: sau.shared_pgd(f, f0, x, y, **kw))(x, y)


def test_shared_pgd_stops_when_every_sample_is_shared():
    """Identical models: a fooled sample is shared. From zero with steps of 0.1 toward
    class 0, a 0.35-grey image is shared after 2 steps and then stops moving; a
    0.02-grey image needs 5 (0.52 > 0.5), and the loop stops at the test after it."""
    f = _brightness()
    kw = dict(eps=0.5, step=0.1, init="zero")
    x = jnp.concatenate([_flat(0.35), _flat(0.02)])
    y = jnp.array([1, 1])
    x_adv, info = _pgd(f, f, x, y, steps=5, **kw)
    assert int(info["iterations"]) == 5 and not bool(info["stopped"])
    np.testing.assert_allclose(x_adv[0], 0.55, atol=1e-6)  # frozen once shared
    np.testing.assert_allclose(x_adv[1], 0.52, atol=1e-6)
    _, info = _pgd(f, f, x, y, steps=20, **kw)
    assert int(info["iterations"]) == 5 and bool(info["stopped"])
    # The reference's start (+eps) already fools both models: no step at all.
    x_adv, info = _pgd(f, f, jnp.concatenate([_flat(0.4), _flat(0.32)]), y)
    assert int(info["iterations"]) == 0 and bool(info["stopped"])
    np.testing.assert_allclose(x_adv[0], 0.6, atol=1e-6)
    np.testing.assert_allclose(x_adv[1], 0.52, atol=1e-6)


def test_shared_pgd_runs_on_while_the_models_disagree():
    """h flips to class 0, h0 never does (its threshold is out of reach): nothing is
    shared, so every step is taken."""
    f, g = _brightness(0.5), _brightness(5.0)
    _, info = _pgd(f, g, _flat(0.4), jnp.array([1]), eps=0.3, step=0.1, steps=4,
                   init="zero")
    assert int(info["iterations"]) == 4 and not bool(info["stopped"])


def test_shared_pgd_stays_in_the_ball_and_clips_only_when_asked():
    k = jax.random.split(jax.random.key(0), 3)
    w, w0 = jax.random.normal(k[0], (48, 5)), jax.random.normal(k[1], (48, 5))
    f = lambda z: z.reshape(z.shape[0], -1) @ w
    f0 = lambda z: z.reshape(z.shape[0], -1) @ w0
    x = jax.random.uniform(k[2], (16, 4, 4, 3))
    y = jnp.argmax(f0(x), -1)
    for norm, eps, clip in (("linf", 0.2, False), ("linf", 0.2, True), ("l2", 1.0, True)):
        x_adv, info = _pgd(f, f0, x, y, norm=norm, eps=eps, step=0.1, steps=5, clip=clip)
        d = np.asarray(x_adv - x).reshape(16, -1)
        size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
        assert (size <= eps * (1 + 1e-5)).all() and int(info["iterations"]) > 0
        assert (size >= eps * 0.5).any()
        inside = float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        assert inside == clip, (norm, clip)  # the reference adds the perturbation unclipped


def test_shared_pgd_vmap_equals_separate_calls():
    f = _brightness()
    xs = jnp.stack([jnp.concatenate([_flat(0.35), _flat(v)]) for v in (0.02, 0.3, 0.1)])
    ys = jnp.ones((3, 2), jnp.int32)
    run = lambda x, y: sau.shared_pgd(f, f, x, y, eps=0.5, step=0.1, steps=8, init="zero")
    together, info = jax.jit(jax.vmap(run))(xs, ys)
    np.testing.assert_array_equal(info["iterations"], [5, 2, 4])
    for i in range(3):
        alone, one = jax.jit(run)(xs[i], ys[i])
        np.testing.assert_allclose(together[i], alone, atol=1e-6)
        assert int(one["iterations"]) == int(info["iterations"][i])


# ---------------------------------------------------------------------------- defense
def test_vmapped_trials_equal_separate_runs_and_compile_once(backdoored, small_data):
    model, state, attack, test = backdoored
    d = small_cnn_defense("sau", epochs=1, batch_size=64)
    together, _ = assert_vmap_matches_sequential(model, state, d, small_data, test,
                                                 attack=attack)
    r = {k: np.asarray(v) for k, v in together.reports.items()}
    assert r["pgd_iterations"].shape == (2, 1) and (r["pgd_iterations"] <= 5).all()
    assert ((r["shared_fraction"] >= 0) & (r["shared_fraction"] <= 1)).all()
    # Every trial moved its parameters: the outer step ran.
    k = np.asarray(together.states["params"]["head"]["kernel"])
    assert (np.abs(k - np.asarray(state["params"]["head"]["kernel"])[None]).max((1, 2))
            > 0).all()


def test_effect_halves_asr(backdoored, small_data):
    """A short, fast setting (the reference's 100 epochs at lr 1e-4 take minutes): SPC 10,
    batch 25, 5 epochs (20 steps) at lr 3e-3, one trial. Measured on trials 0/1/2 (2-core
    CPU): ACC 84.3% -> 82.7/85.4/87.4%, ASR 96.0% -> 30.8/30.3/14.4%."""
    model, state, _, test = backdoored
    d = small_cnn_defense("sau", epochs=5, batch_size=25, lr=3e-3)
    run, _ = assert_halves_asr(model, state, d, small_data, test, spc=10, trials=(0,))
    r = {k: np.asarray(v)[0] for k, v in run.reports.items()}
    # The shared examples are being unlearnt: fewer of them at the end than at the start.
    assert r["shared_fraction"][-1] < r["shared_fraction"][0], r
