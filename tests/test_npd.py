"""NPD (neural polariser) and the batched PGD kernel it uses."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bdjax import checkpoint, models
from bdjax.defenses import Defense, npd
from bdjax.errors import BdjaxError
from bdjax.kernels.pgd import pgd
from bdjax.models.polariser import polariser_channels
from tests.defense_checks import assert_halves_asr, assert_vmap_matches_sequential, shipped


# ------------------------------------------------------------------------------ PGD
def _linear(key, shape=(8, 8, 3), classes=5):
    w = jax.random.normal(key, (int(np.prod(shape)), classes))
    return lambda z: z.reshape(z.shape[0], -1) @ w


def _batch(key, n=16, shape=(8, 8, 3)):
    return jax.random.uniform(key, (n, *shape))


def _l2(d):
    return np.linalg.norm(np.asarray(d).reshape(d.shape[0], -1), axis=1)


@pytest.mark.parametrize("norm,eps,step,kind", [("l2", 0.5, 0.2, "auto"),
                                                ("l2", 0.5, 0.1, "sign"),
                                                ("linf", 0.05, 0.02, "auto")])
def test_pgd_stays_in_ball_and_box(norm, eps, step, kind):
    f = _linear(jax.random.key(0))
    x = _batch(jax.random.key(1))
    y = jnp.arange(16) % 5
    x_adv, info = pgd(f, x, y, norm=norm, eps=eps, step=step, steps=10, targeted=False,
                      key=jax.random.key(2), step_kind=kind)
    d = np.asarray(x_adv - x)
    size = _l2(d) if norm == "l2" else np.abs(d.reshape(16, -1)).max(1)
    assert (size <= eps * (1 + 1e-5)).all() and (size > 0.5 * eps).any()
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    np.testing.assert_allclose(info["delta_norm"], size, rtol=1e-5)


def test_pgd_per_sample_radius():
    f = _linear(jax.random.key(0))
    x = _batch(jax.random.key(1), n=4)
    eps = jnp.array([0.1, 0.2, 0.4, 0.8])
    x_adv, _ = pgd(f, x, jnp.zeros(4, jnp.int32), norm="l2", eps=eps, step=0.3, steps=8,
                   targeted=False)
    assert (_l2(x_adv - x) <= np.asarray(eps) * (1 + 1e-5)).all()


def test_pgd_targeted_raises_target_probability():
    f = _linear(jax.random.key(3))
    x = _batch(jax.random.key(4))
    t = jnp.full((16,), 2)
    x_adv, info = pgd(f, x, jnp.zeros(16, jnp.int32), norm="linf", eps=0.1, step=0.02,
                      steps=10, targeted=True, target=t)
    p0 = jax.nn.softmax(f(x))[:, 2]
    p1 = jax.nn.softmax(f(x_adv))[:, 2]
    assert float(jnp.mean(p1)) > float(jnp.mean(p0)) + 0.2
    np.testing.assert_array_equal(info["success"], jnp.argmax(f(x_adv), -1) == 2)


def test_pgd_untargeted_raises_loss():
    f = _linear(jax.random.key(5))
    x = _batch(jax.random.key(6))
    y = jnp.argmax(f(x), -1)
    x_adv, _ = pgd(f, x, y, norm="l2", eps=0.5, step=0.1, steps=5, targeted=False)
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(f(z), y)
    assert (np.asarray(ce(x_adv)) >= np.asarray(ce(x)) - 1e-6).all()
    assert float(jnp.mean(ce(x_adv))) > float(jnp.mean(ce(x))) + 0.5


def test_pgd_early_exit_and_frozen_successes():
    f = _linear(jax.random.key(7))
    x = _batch(jax.random.key(8))
    y = jnp.argmax(f(x), -1)
    kw = dict(norm="linf", eps=0.3, step=0.1, steps=20, targeted=False)
    _, full = pgd(f, x, y, **kw)
    x_adv, early = pgd(f, x, y, stop_fraction=0.5, **kw)
    assert int(full["iterations"]) == 20
    assert 0 < int(early["iterations"]) < 20
    assert float(early["success_rate"]) >= 0.5
    # Already-successful samples do not move: zero steps when the goal holds at start.
    _, none = pgd(f, x, (y + 1) % 5, stop_fraction=1.0, **kw)
    assert int(none["iterations"]) == 0


def test_pgd_exit_after_the_step_takes_at_least_one_and_moves_every_sample():
    """BackdoorBench's NPD loop: step, project, then test `rate > stop`; all samples move."""
    f = _linear(jax.random.key(7))
    x = _batch(jax.random.key(8))
    y = jnp.argmax(f(x), -1)
    kw = dict(norm="l2", eps=0.5, step=0.05, steps=5, targeted=True, target=y,
              step_kind="sign")
    _, before = pgd(f, x, y, stop_fraction=1.0, **kw)  # already at the target: no step
    x_adv, after = pgd(f, x, y, stop_fraction=0.5, exit_check="after",
                       freeze_successes=False, **kw)
    assert int(before["iterations"]) == 0
    assert int(after["iterations"]) == 1  # one step, then 100% > 50% stops it
    moved = np.abs(np.asarray(x_adv - x)).reshape(16, -1).max(1)
    assert (moved > 0).all()  # successful samples moved too


def test_pgd_image_clip_keeps_the_perturbation_unclipped():
    """clip="image" (BackdoorBench's get_perturbed_image): the perturbation lives in its
    ball unclipped and only the image is clamped; clip="delta" clips the perturbation,
    which changes what the next L2 projection keeps. Two pixels at 0.95 and 0.5, both
    pushed up by sign steps of 0.1 inside an L2 ball of 0.2:

    - delta: [0.1, 0.1] -> clip [0.05, 0.1] -> [0.15, 0.2] -> project [0.12, 0.16] ->
      clip [0.05, 0.16]: image [1.0, 0.66];
    - image: [0.1, 0.1] (image [1.0, 0.6], the clamped pixel gets no gradient, as under
      torch.clamp) -> [0.1, 0.2] -> project x 0.2 / sqrt(0.05): image [1.0, 0.6789].
    """
    w = jnp.array([[0.1, -0.1], [0.1, -0.1]])
    f = lambda z: z.reshape(z.shape[0], -1) @ w
    x = jnp.array([0.95, 0.5]).reshape(1, 1, 2, 1)
    kw = dict(norm="l2", eps=0.2, step=0.1, steps=2, targeted=True, target=jnp.array([0]),
              step_kind="sign", freeze_successes=False)
    a, _ = pgd(f, x, jnp.array([1]), clip="delta", **kw)
    b, _ = pgd(f, x, jnp.array([1]), clip="image", **kw)
    np.testing.assert_allclose(np.asarray(a).ravel(), [1.0, 0.66], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(b).ravel(), [1.0, 0.5 + 0.04 / np.sqrt(0.05)],
                               rtol=1e-5)


def test_pgd_loss_bound_zeroes_the_gradient_beyond_it():
    f = _linear(jax.random.key(3))
    x = _batch(jax.random.key(4))
    far = jnp.full((16,), 2)
    kw = dict(norm="linf", eps=0.1, step=0.02, steps=3, targeted=True, target=far,
              step_kind="sign")
    free, _ = pgd(f, x, jnp.zeros(16, jnp.int32), **kw)
    bounded, _ = pgd(f, x, jnp.zeros(16, jnp.int32), loss_bound=1e-3, **kw)
    ce = optax.softmax_cross_entropy_with_integer_labels(f(x), far)
    stuck = np.asarray(ce) > 1e-3
    assert stuck.any()
    np.testing.assert_array_equal(np.asarray(bounded)[stuck], np.asarray(x)[stuck])
    assert not np.allclose(np.asarray(free)[stuck], np.asarray(x)[stuck])


def test_pgd_vmap_equals_separate_calls():
    f = _linear(jax.random.key(9))
    xs = jnp.stack([_batch(jax.random.key(k)) for k in (10, 11, 12)])
    ys = jnp.stack([jnp.argmax(f(x), -1) for x in xs])
    run = functools.partial(pgd, f, norm="l2", eps=0.6, step=0.15, steps=12,
                            targeted=False, stop_fraction=0.7)
    together, info = jax.jit(jax.vmap(lambda x, y: run(x, y)))(xs, ys)
    for i in range(3):
        alone, one = jax.jit(run)(xs[i], ys[i])
        np.testing.assert_allclose(together[i], alone, atol=1e-6)
        assert int(info["iterations"][i]) == int(one["iterations"])
    assert len(set(np.asarray(info["iterations"]).tolist())) > 1  # loops really differ


def test_pgd_rejects_bad_arguments():
    f = _linear(jax.random.key(0))
    x = _batch(jax.random.key(1), n=2)
    with pytest.raises(BdjaxError, match="norm"):
        pgd(f, x, jnp.zeros(2, jnp.int32), norm="l1", eps=1, step=1, steps=1, targeted=False)
    with pytest.raises(BdjaxError, match="target"):
        pgd(f, x, jnp.zeros(2, jnp.int32), norm="l2", eps=1, step=1, steps=1, targeted=True)


# ------------------------------------------------------------------------- polariser
def test_config_defaults_and_validation():
    """BackdoorBench's config/defense/npd/*.yaml: (lmd1, lmd4, lmd3, lmd2) are bdjax's
    (lambda1, lambda2, lambda3, lambda3_ce)."""
    c = npd.NPDConfig()
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay) == (50, 128, 0.01, 0.9,
                                                                          5e-4)
    assert (c.warmup_epochs, c.warmup_lr, c.radius, c.pgd_step, c.pgd_steps) == (5, 1e-4, 3.0,
                                                                                 0.1, 2)
    assert (c.stop_fraction, c.lambda1, c.lambda2, c.lambda3, c.lambda3_ce) == (
        0.6, 1.0, 0.4, 0.4, 0.4)
    assert (c.bce_label, c.floor, c.augment, c.uses_validation) == (
        "prediction", 1e-4, False, False)
    g = npd.config_for("gtsrb")
    assert (g.radius, g.lambda2, g.lambda3_ce, g.warmup_epochs) == (5.0, 0.5, 0.5, 5)
    t = npd.config_for("tiny_imagenet", epochs=3)
    assert (t.radius, t.lambda1, t.lambda2, t.lambda3, t.lambda3_ce, t.warmup_epochs,
            t.epochs) == (6.0, 1.0, 0.1, 0.1, 1.0, 0, 3)
    from bdjax import defenses

    run = defenses.for_run("npd", {"epochs": 2}, dataset="tiny", model="preact_resnet18")
    assert (run.config.radius, run.config.warmup_epochs, run.config.epochs) == (6.0, 0, 2)
    with pytest.raises(BdjaxError, match="stop_fraction"):
        npd.NPDConfig(stop_fraction=0.0)
    with pytest.raises(BdjaxError, match="norm"):
        npd.NPDConfig(norm="l1")
    with pytest.raises(BdjaxError, match="dataset"):
        npd.config_for("mnist")


@pytest.mark.parametrize("name,where,channels", [("small_cnn", "conv4", 64),
                                                 ("preact_resnet18", "layer4_1/conv1", 512),
                                                 ("vgg19_bn", "conv15", 512)])
def test_polariser_sits_at_the_named_conv(name, where, channels):
    model = models.get(name)
    assert model.spec.polariser_at == where
    assert polariser_channels(model) == channels


def test_identity_polariser_keeps_the_model(backdoored):
    model, state, _, test = backdoored
    st = {**state, "polariser": npd.init_polariser(model)}
    x = test.x_clean[:64]
    np.testing.assert_allclose(npd.apply_with_polariser(model, st, x), model.apply(state, x),
                               rtol=1e-3, atol=1e-4)
    # A polariser that zeroes its input must change the output: it really is applied.
    zero = jax.tree_util.tree_map(jnp.zeros_like, st["polariser"]["params"])
    z = {**st, "polariser": {**st["polariser"], "params": zero}}
    assert not np.allclose(npd.apply_with_polariser(model, z, x), model.apply(state, x))


def test_polariser_batchnorm_train_mode():
    pol = {"params": {"conv": {"kernel": jnp.eye(3)[None, None]},
                      "bn": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}},
           "batch_stats": {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}}
    h = jax.random.normal(jax.random.key(0), (4, 2, 2, 3)) * 3 + 1
    out, stats = npd.polarise(pol, h, train=True)
    np.testing.assert_allclose(out.mean((0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std((0, 1, 2)), 1, atol=1e-3)
    var = np.var(np.asarray(h).reshape(-1, 3), 0, ddof=1)  # PyTorch's unbiased running var
    np.testing.assert_allclose(stats["bn"]["var"], 0.9 + 0.1 * var, rtol=1e-5)


@pytest.mark.parametrize("floor", [0.0, 1e-4])
def test_losses_match_their_equations(floor):
    """floor 0: the paper's Eqs. (2)-(3); 1e-4: the code's -log(1.0001 - p + 1e-12)."""
    logits = jax.random.normal(jax.random.key(0), (6, 5)) * 4
    y = jnp.array([0, 1, 2, 3, 4, 0])
    yt = jnp.array([1, 2, 3, 4, 0, 2])
    yb = jnp.array([0, 1, 2, 0, 4, 1])
    p = np.asarray(jax.nn.softmax(logits)).astype(np.float64)
    l_bn, l_asr, l_margin, l_ce = npd.npd_losses(logits, logits, y, yt, yb, floor)
    rows = np.arange(6)
    others = p.copy()
    others[rows, np.asarray(y)] = -1
    c = floor + 1e-12 if floor else 0.0
    np.testing.assert_allclose(l_bn, -np.log(p[rows, y]).mean(), rtol=1e-5)
    np.testing.assert_allclose(l_asr, -np.log(1 - p[rows, yt] + c).mean(), rtol=1e-5)
    np.testing.assert_allclose(l_margin, -np.log(1 - others.max(1) + c).mean(), rtol=1e-5)
    np.testing.assert_allclose(l_ce, -np.log(p[rows, yb]).mean(), rtol=1e-5)


def test_floored_loss_stays_bounded_where_the_target_is_certain():
    """A saturated sample (p_y' -> 1): the unfloored L_asr grows without bound, the
    floored one stops at -log(1e-4) ~ 9.2 nats and its gradient stays finite."""
    logits = jnp.array([[60.0, 0.0, 0.0]])
    t = jnp.array([0])
    raw = -npd.log_one_minus_softmax(logits, t)
    floored = -npd.log_one_minus_softmax(logits, t, 1e-4)
    assert float(raw[0]) > 50 and abs(float(floored[0]) + np.log(1e-4 + 1e-12)) < 1e-3
    g = jax.grad(lambda z: -npd.log_one_minus_softmax(z, t, 1e-4)[0])(logits)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) < 1e-3


def test_state_with_polariser_round_trips_through_checkpoint(backdoored, tmp_path):
    model, state, _, test = backdoored
    pol = npd.init_polariser(model)
    pol = jax.tree_util.tree_map(lambda a: a + 0.01, pol)
    st = {**state, "polariser": pol}
    checkpoint.save(tmp_path / "ck", model, st, {"defense": "npd"})
    model2, st2, _ = checkpoint.restore(tmp_path / "ck")
    assert model2 == model
    jax.tree_util.tree_map(np.testing.assert_array_equal, st2["polariser"], pol)
    x = test.x_clean[:16]
    np.testing.assert_allclose(npd.apply_with_polariser(model2, st2, x),
                               npd.apply_with_polariser(model, st, x), rtol=1e-6)


# ---------------------------------------------------------------------------- defense
QUICK = npd.NPDConfig(epochs=1, warmup_epochs=1, batch_size=64, lr=1e-3)


def test_vmap_matches_sequential_and_compiles_once(backdoored, small_data):
    """The shared check scores through model.apply, which honours state["polariser"]."""
    model, state, attack, test = backdoored
    d = Defense(name="npd", defend=npd.defend, config=QUICK)
    together, _ = assert_vmap_matches_sequential(model, state, d, small_data, test,
                                                 trials=(0, 1), attack=attack)
    # The polariser moved away from the identity in every trial.
    k = np.asarray(together.states["polariser"]["params"]["conv"]["kernel"])[:, 0, 0]
    assert (np.abs(k - np.eye(k.shape[-1])).max(axis=(1, 2)) > 1e-4).all()


def test_effect_halves_asr(backdoored, small_data):
    """NPD with the shipped synthetic settings (configs/synthetic.py: lambdas 0.4) but 20
    epochs instead of the reference's 50 (the test's time: 50 took ~75 s of the suite) at
    SPC 100, one trial (the vmap test above covers several). Measured over trials 0/1 on
    the fixture (ACC 84.3%, ASR 96.0%): 15 epochs ACC 80.5/81.1%, ASR 32.9/28.7%; 25
    epochs 85.0/83.9%, 17.3/15.8%. On a fixture trained from other keys (poison 11, train
    12; ACC 88.4%, ASR 95.9%): 15 epochs 84.1/83.8%, 29.8/8.9%; 25 epochs 86.7/85.6%,
    17.7/8.3%."""
    model, state, _, test = backdoored
    run, _ = assert_halves_asr(model, state, shipped("npd", epochs=20), small_data, test,
                               trials=(0,))
    # The outer problem is being solved: the Eq. (5) loss falls over the main epochs.
    loss = np.asarray(run.reports["train_loss"])
    assert (loss[:, -1] < loss[:, 0]).all(), loss
