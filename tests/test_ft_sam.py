"""FT-SAM: the (A)SAM kernel and the defense."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bdjax.defenses import Defense, ft_sam
from bdjax.errors import BdjaxError
from bdjax.kernels import SGDConfig, StepOptions, cross_entropy, sgd
from bdjax.kernels.sam import run_sam_epoch, sam_perturbation, sam_train_step
from tests.defense_checks import assert_halves_asr, assert_vmap_matches_sequential, shipped


def _random_tree(seed):
    rng = np.random.default_rng(seed)
    return {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                     "bias": rng.normal(size=(4,)).astype(np.float32)},
            "bn": {"scale": rng.normal(size=(4,)).astype(np.float32)}}


def _numpy_perturbation(w, g, rho, adaptive):
    wl, gl = jax.tree_util.tree_leaves(w), jax.tree_util.tree_leaves(g)
    t = [np.abs(a) if adaptive else np.ones_like(a) for a in wl]
    norm = np.sqrt(sum(np.sum((ti * gi).astype(np.float64) ** 2) for ti, gi in zip(t, gl)))
    return [rho * ti ** 2 * gi / (norm + 1e-12) for ti, gi in zip(t, gl)]


@pytest.mark.parametrize("adaptive", [True, False])
def test_perturbation_matches_formula(adaptive):
    w, g = _random_tree(0), _random_tree(1)
    e = sam_perturbation(w, g, 2.0, adaptive)
    for got, want in zip(jax.tree_util.tree_leaves(e), _numpy_perturbation(w, g, 2.0, adaptive)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    # The scaled perturbation sits on the rho ball: ||T^-1 e|| = rho.
    t_inv_e = [np.asarray(a) / (np.abs(b) if adaptive else 1.0)
               for a, b in zip(jax.tree_util.tree_leaves(e), jax.tree_util.tree_leaves(w))]
    np.testing.assert_allclose(np.sqrt(sum(np.sum(a ** 2) for a in t_inv_e)), 2.0, rtol=1e-5)


def test_zero_gradient_gives_zero_perturbation():
    w = _random_tree(0)
    zero = jax.tree_util.tree_map(np.zeros_like, w)
    for adaptive in (True, False):
        e = sam_perturbation(w, zero, 2.0, adaptive)
        for a in jax.tree_util.tree_leaves(e):
            assert np.isfinite(np.asarray(a)).all() and not np.asarray(a).any()


def _tiny_setup(backdoored, small_data):
    model, state, _, _ = backdoored
    x, y = small_data.x_train[:16], small_data.y_train[:16]
    tx = sgd(SGDConfig(), 10, 1)
    return model, state, tx, jnp.asarray(x), jnp.asarray(y)


def test_sam_step_keeps_unperturbed_batch_stats_and_moves_params(backdoored, small_data):
    """BN statistics after a SAM step are those of the unperturbed forward pass."""
    model, state, tx, x, y = _tiny_setup(backdoored, small_data)
    opts = StepOptions(augment=False, label_smoothing=0.1)
    key = jax.random.key(0)
    new, _, loss, _ = jax.jit(sam_train_step, static_argnums=(0, 1, 2, 3, 4))(
        model, tx, opts, 2.0, True, state, tx.init(state["params"]), x, y, key)
    _, k_drop = jax.random.split(key)
    _, want_bs = model.apply(state, x, train=True, key=k_drop)
    for a, b in zip(jax.tree_util.tree_leaves(new["batch_stats"]),
                    jax.tree_util.tree_leaves(want_bs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert np.isfinite(float(loss))
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(new["params"]),
                                                   jax.tree_util.tree_leaves(state["params"]))]
    assert all(moved)


def test_sam_step_uses_gradient_at_perturbed_weights(backdoored, small_data):
    """With momentum and weight decay off, the update is -lr * grad(w + e)."""
    model, state, _, x, y = _tiny_setup(backdoored, small_data)
    tx = sgd(SGDConfig(lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant"), 1, 1)
    opts = StepOptions(augment=False)
    key = jax.random.key(3)
    _, k_drop = jax.random.split(key)

    def loss(p):
        logits, _ = model.apply({**state, "params": p}, x, train=True, key=k_drop)
        return cross_entropy(logits, y)

    @functools.partial(jax.jit, static_argnums=0)
    def step_and_reference(adaptive):
        e = sam_perturbation(state["params"], jax.grad(loss)(state["params"]), 0.5, adaptive)
        g_sam = jax.grad(loss)(jax.tree_util.tree_map(jnp.add, state["params"], e))
        want = jax.tree_util.tree_map(lambda w, gs: w - 0.1 * gs, state["params"], g_sam)
        new, *_ = sam_train_step(model, tx, opts, 0.5, adaptive, state,
                                 tx.init(state["params"]), x, y, key)
        return new["params"], want

    for adaptive in (True, False):
        got, want = step_and_reference(adaptive)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_sam_epoch_runs_and_is_finite(backdoored, small_data):
    model, state, tx, x, y = _tiny_setup(backdoored, small_data)
    st, _, loss, acc = jax.jit(run_sam_epoch, static_argnums=(0, 1, 2, 3, 4, 5))(
        model, tx, StepOptions(), 2.0, True, 16, state, tx.init(state["params"]), x, y,
        jax.random.key(0))
    assert np.isfinite(float(loss)) and 0 <= float(acc) <= 1
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(st))


def test_config_defaults_follow_the_code():
    """BackdoorBench's FT-SAM as run for the published tables: rho 2 and smoothing 0.1 on
    every dataset and model, cosine with T_max 100 stepped per batch, wd 5e-4."""
    c = ft_sam.FTSAMConfig()
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, c.schedule) == (
        100, 256, 0.01, 0.9, 5e-4, "cosine")
    assert (c.schedule_unit, c.t_max) == ("batch", 100)
    assert (c.rho, c.adaptive, c.label_smoothing, c.augment, c.flip) == (2.0, True, 0.1, True, True)
    assert not c.uses_validation
    with pytest.raises(BdjaxError, match="rho"):
        ft_sam.FTSAMConfig(rho=0.0)
    for dataset, model in [("cifar10", "preact_resnet18"), ("gtsrb", "preact_resnet18"),
                           ("tiny", "vgg19_bn"), ("synthetic", "small_cnn")]:
        assert ft_sam.default_rho(dataset, model) == 2.0


def test_paper_rho_is_a_setting():
    rho = lambda *a, **k: ft_sam.default_rho(*a, source="paper", **k)
    assert rho("cifar10", "preact_resnet18") == 2.0
    assert rho("gtsrb", "preact_resnet18") == 8.0
    assert rho("tiny_imagenet", "preact_resnet18") == 8.0
    assert rho("cifar10", "vgg19_bn") == 6.0
    assert rho("cifar10", "preact_resnet18", adaptive=False) == 0.5
    with pytest.raises(BdjaxError, match="rho source"):
        ft_sam.default_rho("cifar10", "vgg19_bn", source="blog")


def test_runs_get_rho_through_the_config_path():
    """What runs is default_rho's value (the code's 2, also for VGG on GTSRB), below a
    config file's or --set's override."""
    from bdjax import defenses

    d = defenses.for_run("ft_sam", {}, dataset="gtsrb", model="vgg19_bn")
    assert d.config.rho == ft_sam.default_rho("gtsrb", "vgg19_bn") == 2.0
    assert defenses.dataset_settings("ft_sam", "gtsrb", "vgg19_bn") == {"rho": 2.0}
    d = defenses.for_run("ft_sam", {"rho": "6"}, dataset="gtsrb", model="vgg19_bn")
    assert d.config.rho == 6.0


def test_label_smoothing_puts_eps_over_c_minus_1_on_the_other_classes():
    """The reference's smooth_crossentropy: 1 - eps on the true class, eps / (C - 1) on
    each other one (optax/PyTorch put eps / C everywhere)."""
    logits = jax.random.normal(jax.random.key(0), (4, 5))
    y = jnp.array([0, 3, 4, 1])
    t = np.full((4, 5), 0.1 / 4)
    t[np.arange(4), np.asarray(y)] = 0.9
    want = -(t * np.asarray(jax.nn.log_softmax(logits))).sum(-1).mean()
    np.testing.assert_allclose(cross_entropy(logits, y, 0.1), want, rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(logits, y, 0.0),
                               optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
                               rtol=1e-6)


FAST = dict(epochs=2, batch_size=32, flip=False)


def _defense(**kw):
    return Defense(name="ft_sam", defend=ft_sam.defend, config=ft_sam.FTSAMConfig(**kw))


def test_ft_sam_removes_backdoor(backdoored, small_data):
    """FT-SAM with the shipped synthetic settings (configs/synthetic.py: 20 epochs, batch
    128, lr 0.02, rho 3) at SPC 100, one trial (the vmap test below covers several).
    Measured: ACC 90.7% -> 95.5%, ASR 93.1% -> 17.2% (trial 1: 94.6%, 14.1%)."""
    model, state, _, test = backdoored
    defense = shipped("ft_sam")
    run, _ = assert_halves_asr(model, state, defense, small_data, test, trials=(0,))
    assert run.reports["train_loss"].shape == (1, defense.config.epochs)
    assert np.isfinite(run.reports["train_acc"]).all()


def test_vmap_matches_sequential_and_compiles_once(backdoored, small_data):
    model, state, attack, test = backdoored
    assert_vmap_matches_sequential(model, state, _defense(**FAST), small_data, test, spc=10,
                                   attack=attack)
