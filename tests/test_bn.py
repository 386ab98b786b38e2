"""The shared pieces of the pruning defenses: BN layers, coefficients, statistics,
bounds and the validation-drop selection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import models
from bdjax.errors import BdjaxError
from bdjax.kernels import bn
from bdjax.kernels.select import last_within


def test_bn_layers_pair_each_bn_with_the_conv_whose_output_it_normalises():
    layers = {l.path: l for l in bn.bn_layers(models.get("preact_resnet18"))}
    assert len(layers) == 16  # two per block, no final BN
    assert layers["layer1_0/bn1"].conv == "conv1"  # the stem
    assert layers["layer1_0/bn2"].conv == "layer1_0/conv1"
    # A block's bn1 normalises the previous block's output: its conv2 (+ shortcut), not
    # the shortcut 1x1 conv registered last before it.
    assert layers["layer2_1/bn1"].conv == "layer2_0/conv2"
    assert layers["layer3_0/bn1"].conv == "layer2_1/conv2"
    assert layers["layer4_1/bn2"].channels == 512
    small = bn.bn_layers(models.get("small_cnn"))
    assert [(l.path, l.conv, l.channels) for l in small] == [
        ("bn1", "conv1", 16), ("bn2", "conv2", 32), ("bn3", "conv3", 64), ("bn4", "conv4", 128)]


def _small():
    model = models.get("small_cnn")
    state = model.init(jax.random.key(0))
    # Non-trivial running statistics and affine parameters.
    ks = iter(jax.random.split(jax.random.key(1), 64))
    perturb = lambda a: a + 0.3 * jax.random.normal(next(ks), a.shape)
    state = {"params": jax.tree_util.tree_map(perturb, state["params"]),
             "batch_stats": jax.tree_util.tree_map(
                 lambda a: jnp.abs(perturb(a)) + 0.1, state["batch_stats"])}
    x = jax.random.randint(jax.random.key(2), (37, 32, 32, 3), 0, 256).astype(jnp.uint8)
    return model, state, x


def _intermediates(model, state, x):
    _, inter = model.apply(state, x, capture_intermediates=True, mutable=["intermediates"])
    return {k: np.asarray(v["__call__"][0]) for k, v in inter["intermediates"].items()
            if k != "__call__"}


def test_statistics_match_the_captured_activations():
    model, state, x = _small()
    acts = _intermediates(model, state, x)
    mean, var = jax.jit(lambda s, x: bn.bn_input_stats(model, s, x, batch_size=16))(state, x)
    for i in (1, 4):  # bn_i's input is conv_i's output
        a = acts[f"conv{i}"].reshape(-1, acts[f"conv{i}"].shape[-1])
        np.testing.assert_allclose(mean[f"bn{i}"], a.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var[f"bn{i}"], a.var(0), rtol=1e-3, atol=1e-5)
    top = jax.jit(lambda s, x: bn.bn_output_max(model, s, x, batch_size=16))(state, x)
    for i in (1, 3):
        np.testing.assert_allclose(top[f"bn{i}"], acts[f"bn{i}"].max(), rtol=1e-5)


def test_scale_bn_and_bounds_change_exactly_the_named_channels():
    model, state, x = _small()
    coef = bn.channel_ones(model)
    coef["bn4"] = jnp.zeros(128)  # prune every channel of the last BN (gamma and beta)
    pruned = {**state, "params": bn.scale_bn(state["params"], coef, coef)}
    assert np.all(np.asarray(pruned["params"]["bn4"]["scale"]) == 0)
    np.testing.assert_array_equal(pruned["params"]["bn3"]["scale"], state["params"]["bn3"]["scale"])
    # relu(0 * xhat + 0) = 0 everywhere: the logits are the head's bias.
    logits = np.asarray(model.apply(pruned, x))
    np.testing.assert_allclose(logits, np.broadcast_to(state["params"]["head"]["bias"],
                                                       logits.shape), atol=1e-6)
    # Bounds: huge ones change nothing; zero bounds on bn4 give the same logits as above.
    plain = np.asarray(model.apply(state, x))
    huge = {p: jnp.full((c,), 1e9) for p, c in (("bn1", 16), ("bn4", 128))}
    np.testing.assert_allclose(model.apply({**state, "bounds": huge}, x), plain, rtol=1e-6)
    zero = {"bn4": jnp.zeros(128)}
    np.testing.assert_allclose(model.apply({**state, "bounds": zero}, x), logits, atol=1e-6)
    # A bound between: activations above it are cut, so the logits move.
    some = {"bn2": jnp.full((32,), 0.05)}
    assert not np.allclose(model.apply({**state, "bounds": some}, x), plain, atol=1e-3)
    with pytest.raises(BdjaxError, match="'masks' is not a known extra"):
        model.apply({**state, "masks": {}}, x)


@pytest.mark.parametrize("accs,relative,contiguous,want", [
    ([0.9, 0.85, 0.70, 0.88], True, True, 1),    # stops at the first failure
    ([0.9, 0.85, 0.70, 0.88], True, False, 3),   # the last passing level anywhere
    ([0.79, 0.9], True, True, -1),               # nothing passes: keep the original
    ([0.82, 0.81], True, True, 0),               # a drop of exactly 10% relative fails
    ([0.89, 0.88, 0.87], False, True, 1),        # absolute 0.02: 0.88 passes, 0.87 fails
])
def test_last_within(accs, relative, contiguous, want):
    limit = 0.1 if relative else 0.02
    got = last_within(jnp.asarray(accs), 0.9, limit, relative=relative,
                      contiguous=contiguous)
    assert int(got) == want
