"""NAD and PBE: the attention maps and the stages they are taken at, PBE's PGD radius,
the runner contract and the effect on the test fixture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import experiment, models
from bdjax.defenses import nad
from bdjax.errors import BdjaxError
from bdjax.kernels.capture import stage_outputs
from bdjax.kernels.pgd import pgd
from tests.defense_checks import (assert_halves_asr, assert_vmap_matches_sequential,
                                  run_trials, shipped, small_cnn_defense)


def test_attention_map_and_loss_against_numpy():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # NHWC
    g = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)

    def want_map(v, p):
        a = np.sum(np.abs(v) ** p, axis=-1)
        return a / (np.sqrt(np.sum(a ** 2, axis=(1, 2), keepdims=True)) + 1e-6)

    for p in (2.0, 1.0):
        np.testing.assert_allclose(nad.attention_map(jnp.asarray(f), p), want_map(f, p),
                                   rtol=1e-5)
        np.testing.assert_allclose(nad.at_loss(jnp.asarray(f), jnp.asarray(g), p),
                                   np.mean((want_map(f, p) - want_map(g, p)) ** 2), rtol=1e-5)
    # A 1 x 1 map normalises to ~1 whatever the features: the pooled term is ~0.
    pooled = nad.at_loss(jnp.asarray(f[:, :1, :1]), jnp.asarray(3 * g[:, :1, :1]), 2.0)
    assert float(pooled) < 1e-10
    # The gradient reaches the student only.
    grad_t = jax.grad(lambda t: nad.at_loss(jnp.asarray(f), t, 2.0))(jnp.asarray(g))
    assert float(jnp.abs(grad_t).max()) == 0.0


@pytest.mark.parametrize("name,shapes", [
    ("small_cnn", [(2, 8, 8, 64), (2, 4, 4, 128)]),
    ("preact_resnet18", [(2, 8, 8, 256), (2, 4, 4, 512)]),
    ("vgg19_bn", [(2, 4, 4, 512), (2, 2, 2, 512)]),
])
def test_each_model_names_its_last_two_stages(name, shapes):
    """The stage outputs NAD distils: PreAct-ResNet18's layer3 and layer4, VGG19-BN's
    4th and 5th conv blocks, the small CNN's 3rd and 4th stages (abstract shapes)."""
    model = models.get(name)
    state = jax.eval_shape(model.init, jax.random.key(0))
    _, feats = jax.eval_shape(lambda s, x: stage_outputs(model, s, x), state,
                              jnp.zeros((2, 32, 32, 3), jnp.float32))
    assert [f.shape for f in feats] == shapes


def test_the_small_cnn_last_stage_is_what_the_head_pools(backdoored, small_data):
    """The captured last stage is the tensor the network pools into its head (so the
    ReLU is applied and nothing is missed), in eval and in train mode."""
    model, state, _, _ = backdoored
    x = jnp.asarray(small_data.x_train[:8]).astype(jnp.float32) / 255
    head = state["params"]["head"]
    for train in (False, True):
        out, feats = stage_outputs(model, state, x, train=train)
        logits = out[0] if train else out
        pooled = jnp.mean(feats[-1], axis=(1, 2))
        np.testing.assert_allclose(pooled @ head["kernel"] + head["bias"], logits, atol=1e-4)
        assert float(jnp.min(feats[0])) >= 0.0


def test_settings():
    d = small_cnn_defense("nad")
    assert (d.config.epochs, d.config.student_epochs, d.config.batch_size) == (10, 10, 256)
    assert (d.config.beta1, d.config.beta2, d.config.beta3) == (500, 1000, 1000)
    assert d.config.teacher.t_max == 100 and not d.uses_validation
    assert not small_cnn_defense("pbe").uses_validation
    with pytest.raises(BdjaxError, match="beta2 -1"):
        small_cnn_defense("nad", beta2=-1.0)
    with pytest.raises(BdjaxError, match="passes 'both'"):
        small_cnn_defense("pbe", passes="both")
    with pytest.raises(BdjaxError, match="adv_epochs 30"):
        small_cnn_defense("pbe", passes="first", adv_epochs=30)
    pbe_cfg = small_cnn_defense("pbe").config
    model = models.get("small_cnn", std=(0.2, 0.25, 0.3))
    np.testing.assert_allclose(np.ravel(pbe_cfg.radius(model)), [0.004, 0.005, 0.006],
                               rtol=1e-6)


@pytest.mark.parametrize("name,over", [
    ("nad", dict(epochs=1, student_epochs=2)),
    ("pbe", dict(epochs=2, adv_steps=2, passes="first", adv_epochs=1)),
])
def test_vmapped_trials_equal_separate_runs_and_compile_once(backdoored, small_data, name,
                                                             over):
    model, state, attack, test = backdoored
    dfn = small_cnn_defense(name, **over)
    run, _ = assert_vmap_matches_sequential(model, state, dfn, small_data, test,
                                            attack=attack)
    if name == "pbe":  # epoch 0 adversarial only, epoch 1 clean only (alternate: below)
        adv, clean = (np.asarray(run.reports[k]) for k in ("adv_loss", "clean_loss"))
        assert np.isfinite(adv[:, 0]).all() and np.isnan(adv[:, 1]).all()
        assert np.isnan(clean[:, 0]).all() and np.isfinite(clean[:, 1]).all()


def test_nad_halves_the_asr_on_the_fixture(backdoored, small_data):
    """With the synthetic config (teacher and student at lr 0.05: the CPU scaling of
    the attack training), NAD at SPC 100 takes the fixture's ASR from 96% to ~5% while
    the accuracy rises (84% -> 95%: the fixture is under-trained; trials 0/1: ASR
    3.2/5.6%). One trial here; the seed checks in configs/synthetic.py cover more. At the
    reference's lr 0.01 the 40 fine-tuning steps of SPC 100 leave the teacher backdoored
    (ASR 92%), and the student with it."""
    model, state, _, test = backdoored
    assert_halves_asr(model, state, shipped("nad"), small_data, test, trials=(0,))


def test_pbe_on_the_fixture_fails_where_its_adversarial_examples_miss_the_target(
        backdoored, small_data):
    """PBE rests on untargeted adversarial examples of a backdoored model landing in the
    target class (the survey: its performance depends on the share that does not,
    worst with little data). On the small CNN only ~30% of them do (the fork's radius
    and the paper's 6/255 alike, against 10% by chance), and PBE at the reference
    settings leaves the ASR at ~90% (SPC 10; 72% at SPC 100 with the paper's radius)
    while the accuracy holds: measured here, the grid's rows show the same."""
    model, state, _, test = backdoored
    dfn = small_cnn_defense("pbe")
    x = jnp.asarray(small_data.x_train[:500]).astype(jnp.float32) / 255
    y = jnp.asarray(small_data.y_train[:500])
    eps = dfn.config.radius(model)
    x_adv, info = pgd(lambda z: model.apply(state, z), x, y, norm="linf", eps=eps,
                      step=eps / 5, steps=7, targeted=False, key=jax.random.key(0))
    flipped = np.asarray(info["success"]) & (np.asarray(y) != 0)
    to_target = np.asarray(jnp.argmax(model.apply(state, x_adv), -1))[flipped] == 0
    assert flipped.sum() > 50 and to_target.mean() < 0.5, (flipped.sum(), to_target.mean())
    run = run_trials(model, state, dfn, small_data, trials=(0,), spc=10)
    before = experiment.evaluate(model, state, test)
    after = experiment.evaluate_trials(model, run.states, test)
    assert after["asr"][0] > before["asr"] / 2 and after["acc"][0] > before["acc"] - 0.05, (
        before, after)
    success = np.asarray(run.reports["pgd_success"])[0]
    assert np.isfinite(success).all() and success[-1] < success[0]  # it learns robustness
