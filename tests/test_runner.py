"""The trial runner: layouts (vmap, map, sequential; conv rules), its compile cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bdjax import experiment, models, runner
from bdjax.defenses import Defense
from bdjax.errors import BdjaxError
from bdjax.models import layers


@dataclasses.dataclass(frozen=True)
class Scale:
    factor: float


def _defend(model, state, data, config, key):
    """Trivially cheap to compile, yet a function of the trial's data and key."""
    m = jnp.mean(data.x_train.astype(jnp.float32))
    noise = jax.random.normal(key, ())
    out = jax.tree_util.tree_map(lambda a: a * config.factor * m + noise, state)
    return out, {"mean": m, "noise": noise}


@pytest.fixture
def toy(small_data):
    model = models.get("small_cnn")
    state = model.init(jax.random.key(0))
    split = experiment.split_for_trials(small_data, (0, 1, 2), 0, spc=2)
    keys = jnp.stack([jax.random.key(t) for t in range(3)])
    return model, state, split, keys


def test_every_layout_computes_the_same_trials(toy):
    model, state, split, keys = toy
    runs = {s: runner.run_defense(model, state, Defense("scale", _defend, Scale(2.0)), split,
                                  keys, strategy=s) for s in runner.STRATEGIES}
    ref = runs["sequential"]
    assert len(set(np.asarray(ref.reports["noise"]).tolist())) == 3  # trials differ
    for s, run in runs.items():
        assert run.strategy == s and run.devices == 1
        np.testing.assert_allclose(run.reports["mean"], ref.reports["mean"], rtol=1e-6)
        np.testing.assert_allclose(run.states["params"]["head"]["kernel"],
                                   ref.states["params"]["head"]["kernel"], rtol=1e-5)
    with pytest.raises(BdjaxError, match="strategy 'pmap'"):
        runner.run_defense(model, state, Defense("scale", _defend, Scale(2.0)), split, keys,
                           strategy="pmap")
    with pytest.raises(BdjaxError, match="devices 2 is invalid"):
        runner.run_defense(model, state, Defense("scale", _defend, Scale(2.0)), split, keys,
                           devices=2)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_rules_agree_under_vmap_with_per_trial_weights(stride):
    """The trial-folding rule (any backend) and the native grouped convolution give
    the same outputs and gradients for per-trial weights and inputs."""
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (3, 2, 8, 8, 4))  # trials, batch, H, W, C
    w = jax.random.normal(kw, (3, 3, 3, 4, 5))  # trials, kh, kw, cin, cout

    def loss(w, x):
        y = layers.conv_general_dilated(x, w, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y))

    def run(rule):
        with layers.conv_rule(rule):
            return jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1))))(w, x)

    native, fold = run("native"), run("fold")
    for a, b in zip(jax.tree_util.tree_leaves(native), jax.tree_util.tree_leaves(fold)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    plain = lax.conv_general_dilated(x[1], w[1], (stride, stride), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(native[0][1], jnp.sum(jnp.tanh(plain)), rtol=1e-5)
    with pytest.raises(BdjaxError, match="conv_rule 'dense'"):
        with layers.conv_rule("dense"):
            pass


def test_compiled_defense_cache_is_bounded(monkeypatch, toy):
    """The runner keeps at most _MAX_COMPILED executables, dropping the least recent."""
    model, state, split, keys = toy
    monkeypatch.setattr(runner, "_COMPILED", type(runner._COMPILED)())
    monkeypatch.setattr(runner, "_MAX_COMPILED", 2)
    run = lambda f: runner.run_defense(model, state, Defense("scale", _defend, Scale(f)),
                                       split, keys)
    runs = [run(f) for f in (1.0, 2.0, 1.0, 3.0)]
    assert [r.seconds_compile > 0 for r in runs] == [True, True, False, True]
    assert len(runner._COMPILED) == 2
    assert run(2.0).seconds_compile > 0  # 2.0 was the least recently used: dropped
