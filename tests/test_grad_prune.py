"""Grad-Prune: per-filter gradient scores, filter masks, and the defense."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import experiment, models
from bdjax.defenses import Defense, grad_prune
from bdjax.errors import BdjaxError
from bdjax.kernels import SGDConfig, StepOptions, sgd, train_step
from bdjax.kernels import masks as M
from bdjax.kernels import scores as S
from tests.defense_checks import assert_halves_asr, assert_vmap_matches_sequential, shipped


# ------------------------------------------------------------------------------- scores
def _tiny_params(key):
    ks = jax.random.split(key, 4)
    return {"block": {"conv": {"kernel": jax.random.normal(ks[0], (3, 3, 2, 4))},
                      "shortcut": {"kernel": jax.random.normal(ks[1], (1, 1, 2, 4))}},
            "head": {"kernel": jax.random.normal(ks[2], (4, 3)),
                     "bias": jax.random.normal(ks[3], (3,))}}


def _conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _tiny_loss(params, batch):
    x, y = batch
    h = jnp.tanh(_conv(x, params["block"]["conv"]["kernel"])
                 + _conv(x, params["block"]["shortcut"]["kernel"]))
    logits = jnp.mean(h, (1, 2)) @ params["head"]["kernel"] + params["head"]["bias"]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, y[:, None], -1)[:, 0])


def test_filter_scores_match_a_python_loop():
    params = _tiny_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 5, 6, 6, 2))  # 3 batches of 5
    y = jax.random.randint(jax.random.key(2), (3, 5), 0, 3)
    got = jax.jit(lambda p: S.filter_scores(_tiny_loss, p, (x, y)))(params)

    total = None
    for b in range(3):
        g = jax.grad(_tiny_loss)(params, (x[b], y[b]))
        total = g if total is None else jax.tree_util.tree_map(np.add, total, g)
    want = {}
    for name, path in (("block/conv/kernel", ("conv",)), ("block/shortcut/kernel", ("shortcut",))):
        k = np.asarray(total["block"][path[0]]["kernel"])
        want[name] = np.array([np.abs(k[..., f]).mean() for f in range(k.shape[-1])])
    assert sorted(got) == sorted(want)  # every 4-D leaf, the 1x1 shortcut included
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)

    # One vector over the whole network; argmax = the top filter found by a loop.
    flat, index = S.flatten(got)
    best = max(((v, n, f) for n in want for f, v in enumerate(want[n])))
    assert S.locate(int(S.top_filter(got)), index) == (best[1], best[2])
    assert flat.shape == (8,)
    # An ineligible (already pruned) filter is never chosen.
    eligible = M.ones_masks(params)
    eligible[best[1]] = eligible[best[1]].at[best[2]].set(0.0)
    second = sorted(((v, n, f) for n in want for f, v in enumerate(want[n])))[-2]
    assert S.locate(int(S.top_filter(got, eligible)), index) == (second[1], second[2])
    np.testing.assert_array_equal(S.flatten(S.unflatten(flat, index))[0], flat)


# -------------------------------------------------------------------------------- masks
def test_apply_masks_zeroes_kernel_and_bias_of_a_filter():
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones((4,))},
              "bn": {"scale": jnp.ones((4,))}, "head": {"kernel": jnp.ones((4, 3))}}
    masks = M.ones_masks(params)
    assert list(masks) == ["conv/kernel"]
    masks["conv/kernel"] = jnp.array([1.0, 0.0, 1.0, 0.0])
    out = M.apply_masks(params, masks)
    np.testing.assert_array_equal(out["conv"]["kernel"][..., 1], 0)
    np.testing.assert_array_equal(out["conv"]["kernel"][..., 0], 1)
    np.testing.assert_array_equal(out["conv"]["bias"], [1, 0, 1, 0])
    np.testing.assert_array_equal(out["bn"]["scale"], 1)  # only the conv's own parameters
    assert int(M.count_pruned(masks)) == 2


def test_masked_filters_stay_exactly_zero_under_sgd():
    """SGD with momentum and weight decay never regrows a masked filter."""
    model = models.get("small_cnn")
    state = model.init(jax.random.key(0))
    masks = M.ones_masks(state["params"])
    masks["conv2/kernel"] = masks["conv2/kernel"].at[jnp.array([0, 5, 31])].set(0.0)
    masks["conv4/kernel"] = masks["conv4/kernel"].at[7].set(0.0)
    state = {**state, "params": M.apply_masks(state["params"], masks)}
    tx = sgd(SGDConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="constant"), 10, 1)
    opts = StepOptions(augment=False)
    grad_mask = M.param_mask(state["params"], masks)
    x = jax.random.randint(jax.random.key(1), (16, 32, 32, 3), 0, 256).astype(jnp.uint8)
    y = jax.random.randint(jax.random.key(2), (16,), 0, 10)
    step = jax.jit(lambda s, o, k: train_step(model, tx, opts, s, o, x, y, k, grad_mask))
    st, os_ = state, tx.init(state["params"])
    for i in range(5):
        st, os_, _, _ = step(st, os_, jax.random.key(i))
    k2, k4 = st["params"]["conv2"]["kernel"], st["params"]["conv4"]["kernel"]
    assert np.all(np.asarray(k2[..., jnp.array([0, 5, 31])]) == 0)
    assert np.all(np.asarray(k4[..., 7]) == 0)
    assert not np.allclose(k2[..., 1], state["params"]["conv2"]["kernel"][..., 1])


# ------------------------------------------------------------------------------ defense
def test_config_and_threat_model_are_validated(backdoored, small_data):
    with pytest.raises(BdjaxError, match="alpha"):
        grad_prune.GradPruneConfig(alpha=0.0)
    with pytest.raises(BdjaxError, match="defender_synthesises_triggers"):
        grad_prune.GradPruneConfig(defender_synthesises_triggers=False)
    model, state, _, _ = backdoored
    split = experiment.split_for_trials(small_data, (0,), 0, spc=10)
    one = jax.tree_util.tree_map(lambda a: a[0], split)
    with pytest.raises(BdjaxError, match="needs the trigger"):
        grad_prune.defend(model, state, one, grad_prune.GradPruneConfig(), jax.random.key(0))


FAST = dict(epochs=2, max_rounds=3, prune_patience=2, ft_patience=1)


def _defense(**kw):
    return Defense(name="grad_prune", defend=grad_prune.defend,
                   config=grad_prune.GradPruneConfig(**kw), needs_trigger=True)


def test_vmap_matches_sequential_and_compiles_once(backdoored, small_data):
    model, state, attack, test = backdoored
    run, _ = assert_vmap_matches_sequential(model, state, _defense(**FAST), small_data, test,
                                            spc=2, trials=(0, 1), trigger=attack,
                                            attack=attack)
    r = jax.tree_util.tree_map(np.asarray, run.reports)
    assert r["val_acc"].shape == (2, FAST["max_rounds"])
    for t in range(2):
        rounds = int(r["rounds"][t])
        assert 1 <= rounds <= FAST["max_rounds"] and 0 <= r["best_round"][t] <= rounds
        assert np.isfinite(r["val_acc"][t, :rounds]).all()
        assert np.isnan(r["val_acc"][t, rounds:]).all()
        pruned = r["pruned_filter"][t, :rounds]
        assert len(set(pruned.tolist())) == rounds  # never the same filter twice
        # The report says which rule ended each phase; with these small caps, a cap did
        # whenever neither the accuracy drop nor patience had stopped it first.
        stale_out = rounds - int(r["best_round"][t]) >= FAST["prune_patience"]
        assert bool(r["prune_capped"][t]) == (
            rounds == FAST["max_rounds"] and not r["prune_alpha_stop"][t] and not stale_out)
        ft_stale = int(r["ft_epochs"][t]) - int(r["ft_best_epoch"][t]) >= FAST["ft_patience"]
        assert bool(r["ft_capped"][t]) == (int(r["ft_epochs"][t]) == FAST["epochs"]
                                            and not ft_stale)
    # The returned state is a plain model state with the best round's filters zeroed.
    index = S.filter_index(M.ones_masks(state["params"]))
    params = jax.tree_util.tree_map(lambda a: a[0], run.states["params"])
    kernels = S.conv_kernels(params)
    for f in r["pruned_filter"][0, :int(r["best_round"][0])]:
        name, i = S.locate(int(f), index)
        assert np.all(np.asarray(kernels[name][..., i]) == 0)


def test_effect_halves_asr_and_keeps_accuracy(backdoored, small_data):
    """Grad-Prune with the shipped synthetic settings (configs/synthetic.py) at SPC 100, one
    trial (the vmap test above covers several), on the fixture trained with augmentation (see conftest: on the memorised model
    trained without it, pruning any top filter costs >= alpha, so pruning stops at round
    0). Measured: ACC 90.7% -> 95.5%, ASR 93.1% -> 1.0%."""
    model, state, attack, test = backdoored
    run, _ = assert_halves_asr(model, state, shipped("grad_prune"), small_data, test,
                               trials=(0,), trigger=attack)
    r = jax.tree_util.tree_map(np.asarray, run.reports)
    assert (r["best_round"] >= 1).all()  # the pruning itself took part
    # Every kept round respects the accuracy rule on the defender's validation split.
    for t in range(len(r["best_round"])):
        kept = int(r["best_round"][t])
        assert r["val_acc_before"][t] - r["val_acc"][t, kept - 1] < 0.1
