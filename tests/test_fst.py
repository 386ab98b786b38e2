import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import defenses, experiment, models
from bdjax.defenses import fst
from tests.defense_checks import assert_halves_asr, assert_vmap_matches_sequential, shipped

# Two short epochs: enough to move every trainable part (the effect test runs longer).
CHEAP = dict(epochs=2, batch_size=64, augment=False, flip=False)


def test_reinit_head_draws_from_the_torch_linear_range():
    model = models.get("vgg19_bn")
    params = jax.eval_shape(model.init, jax.random.key(0))["params"]
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    new = fst.reinit_head(model, params, jax.random.key(1))
    for name in model.spec.head:  # every linear of the multi-layer head
        bound = 1 / np.sqrt(params[name]["kernel"].shape[0])
        w = np.asarray(new[name]["kernel"])
        assert 0.9 * bound < np.abs(w).max() <= bound * (1 + 1e-6)
    np.testing.assert_array_equal(new["conv0"]["kernel"], params["conv0"]["kernel"])


def test_penalty_and_projection():
    model = models.get("small_cnn")
    state = model.init(jax.random.key(0))
    orig = state["params"]
    other = fst.reinit_head(model, orig, jax.random.key(3))
    pen = fst.inner_product_penalty(model, orig, 0.2)(other)
    expected = 0.2 * np.sum(np.asarray(other["head"]["kernel"]) * np.asarray(orig["head"]["kernel"]))
    np.testing.assert_allclose(pen, expected, rtol=1e-5)
    projected = fst.norm_projection(model, orig)(other)
    np.testing.assert_allclose(np.linalg.norm(projected["head"]["kernel"]),
                               np.linalg.norm(orig["head"]["kernel"]), rtol=1e-5)
    # The projection rescales only; the direction stays.
    a, b = np.asarray(projected["head"]["kernel"]).ravel(), np.asarray(other["head"]["kernel"]).ravel()
    np.testing.assert_allclose(a @ b / np.linalg.norm(a) / np.linalg.norm(b), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["lp", "fe_tuning"])
def test_frozen_parts_stay_frozen_and_the_head_keeps_its_norm(backdoored, small_data, name):
    """As the authors' code: every variant projects the head onto its original norm and
    runs BN in training mode."""
    model, state, _, _ = backdoored
    split = experiment.split_for_trials(small_data, (0,), 0, spc=10, validation=False)
    run = experiment.run_defense(model, state, defenses.get(name, **CHEAP), split,
                                 jax.random.key(0)[None])
    out = jax.tree_util.tree_map(lambda a: a[0], run.states)
    head = np.asarray(out["params"]["head"]["kernel"])
    conv = np.asarray(out["params"]["conv1"]["kernel"])
    orig = np.asarray(state["params"]["head"]["kernel"])
    np.testing.assert_allclose(np.linalg.norm(head), np.linalg.norm(orig), rtol=1e-5)
    if name == "lp":  # backbone and BN scale/shift untouched; BN statistics move
        np.testing.assert_array_equal(conv, state["params"]["conv1"]["kernel"])
        np.testing.assert_array_equal(out["params"]["bn1"]["scale"],
                                      state["params"]["bn1"]["scale"])
        assert not np.allclose(out["batch_stats"]["bn1"]["mean"],
                               state["batch_stats"]["bn1"]["mean"])
        assert not np.array_equal(head, orig)
    else:  # head re-initialised, frozen, rescaled to the original norm; backbone trained
        again = fst.reinit_head(model, state["params"], jax.random.fold_in(jax.random.key(0), 0))
        fresh = np.asarray(again["head"]["kernel"])
        assert np.linalg.norm(fresh) < 0.5 * np.linalg.norm(orig)  # the rescale matters
        np.testing.assert_allclose(head, fresh * np.linalg.norm(orig) / np.linalg.norm(fresh),
                                   rtol=1e-5, atol=1e-7)
        assert not np.array_equal(conv, state["params"]["conv1"]["kernel"])


def test_fst_halves_asr_and_keeps_accuracy(backdoored, small_data):
    """FST with the shipped synthetic settings (configs/synthetic.py: alpha 0.02, 30 epochs)
    at SPC 100, one trial (the vmap test below covers several). Measured: ACC 90.7% ->
    88.8%, ASR 93.1% -> 3.7% (trial 1: 86.2%, 3.7%)."""
    model, state, _, test = backdoored
    run, _ = assert_halves_asr(model, state, shipped("fst"), small_data, test, trials=(0,))
    # The projection held: the head keeps its original norm.
    norms = np.linalg.norm(np.asarray(run.states["params"]["head"]["kernel"]).reshape(1, -1), axis=1)
    np.testing.assert_allclose(norms, np.linalg.norm(state["params"]["head"]["kernel"]), rtol=1e-4)


# fst and fe_tuning span the family's two code paths (the original head trained, a
# re-drawn head frozen); lp and ft_init differ from them only in which parameters move.
@pytest.mark.parametrize("name", ["fst", "fe_tuning"])
def test_vmapped_trials_equal_separate_runs_and_compile_once(backdoored, small_data, name):
    model, state, attack, test = backdoored
    assert_vmap_matches_sequential(model, state, defenses.get(name, **CHEAP), small_data, test,
                                   attack=attack)
