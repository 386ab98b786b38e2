"""AWM and MM-BD: soft masks and activation bounds that stay in the defended state; the
runner contract, a checkpoint round trip and the effect on the test fixture."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import checkpoint, experiment
from bdjax.defenses import awm
from bdjax.errors import BdjaxError
from bdjax.kernels import bn
from bdjax.models.bounds import bound
from tests.defense_checks import (assert_vmap_matches_sequential, run_trials,
                                   small_cnn_defense)

# The AWM paper's settings (the fork's defaults are BN masks with SGD).
PAPER = dict(masks="kernel", optimizer="adam", inner=15, batch_size=128, gamma_l1=1e-8,
             lr_decay=1.0)


def test_l1_projection_and_masks(backdoored):
    d = jnp.asarray([[3.0, -1.0], [0.0, 4.0]])
    np.testing.assert_allclose(awm.project_l1(d, 4.0), d * 0.5)
    np.testing.assert_allclose(awm.project_l1(d, 100.0), d)
    model, state, _, _ = backdoored
    m = awm.ones(model, state["params"], "kernel")
    assert set(m) == {f"conv{i}/kernel" for i in range(1, 5)}
    half = {k: v * 0.5 for k, v in m.items()}
    out = awm.apply_masks(state["params"], half, "kernel")
    np.testing.assert_allclose(out["conv2"]["kernel"], state["params"]["conv2"]["kernel"] * 0.5)
    np.testing.assert_array_equal(out["head"]["kernel"], state["params"]["head"]["kernel"])
    with pytest.raises(BdjaxError, match="masks 'filter'"):
        small_cnn_defense("awm", masks="filter")


@pytest.mark.parametrize("name,over", [
    ("awm", dict(PAPER, epochs=2, inner=2, batch_size=32)),
    ("mmbd", dict(epochs=2, batch_size=64)),
])
def test_vmapped_trials_equal_separate_runs_and_compile_once(backdoored, small_data, name,
                                                             over):
    model, state, attack, test = backdoored
    assert_vmap_matches_sequential(model, state, small_cnn_defense(name, **over), small_data, test,
                                   attack=attack)


def test_mmbd_state_evaluates_bounded_and_round_trips(backdoored, small_data, tmp_path):
    """The defended state is the model plus its bounds: it evaluates as the bounded
    forward pass, and a checkpoint restores it with the bounds."""
    model, state, _, _ = backdoored
    x = small_data.x_test[:64]
    z = {l.path: jnp.full((l.channels,), 1.5) for l in bn.bn_layers(model)}
    bounded = {**state, "bounds": z}
    sink = {}

    def spy(next_fun, args, kwargs, context):  # the bounds' rule, written out here
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and bn._is_bn(context.module):
            sink["hit"] = sink.get("hit", 0) + 1
            return bound(out, z[bn.module_name(context.module)])
        return out


    with nn.intercept_methods(spy):
        want = model.apply(state, x)
    got = model.apply(bounded, x)
    assert sink["hit"] == len(z)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(model.apply(state, x))).max() > 1e-2
    checkpoint.save(tmp_path / "mmbd", model, bounded, {"defense": "mmbd"})
    _, restored, _ = checkpoint.restore(tmp_path / "mmbd")
    np.testing.assert_allclose(model.apply(restored, x), got, atol=1e-6)


def test_effect_on_the_fixture(backdoored, small_data):
    """One trial each, measured on the fixture (ACC ~84%, ASR ~96%). The survey reports
    both failing (high median ASR); here is why:

    - AWM with the fork's settings (BN masks, SGD lr 0.01 without momentum, 20 rounds of
      one pass, SPC 100: 80 mask steps of 0.01 x the gradient) leaves the masks near 1
      (mean ~0.996) and the ASR where it was. The paper's settings (a mask per conv
      weight, Adam, 15 + 15 batches a round), here 10 rounds instead of 20, move it
      (ASR ~77%) and keep the accuracy.
    - MM-BD with the reference's Adam lr 1e-3 moves bounds that start at each layer's
      largest activation (~9-11) by < 0.5 in its 50 epochs (SPC 10: one batch an epoch):
      nothing is clipped and the ASR stays. (lr 0.03 at SPC 100 halves the bounds and cuts
      the ASR to ~32%, at ~25 points of accuracy.)
    """
    model, state, _, test = backdoored
    before = experiment.evaluate(model, state, test)

    def scores(run):
        return {k: float(np.mean(v)) for k, v in
                experiment.evaluate_trials(model, run.states, test).items()}

    fork = run_trials(model, state, small_cnn_defense("awm"), small_data, trials=(0,))
    after = scores(fork)
    assert float(np.min(fork.reports["mask_mean"])) > 0.99
    assert after["asr"] > 0.9 * before["asr"] and after["acc"] > before["acc"] - 0.02
    paper = scores(run_trials(model, state, small_cnn_defense("awm", **dict(PAPER, epochs=10)), small_data,
                        trials=(0,)))
    assert paper["asr"] < 0.9 * before["asr"] and before["acc"] - paper["acc"] < 0.10, paper
    ref = run_trials(model, state, small_cnn_defense("mmbd"), small_data, trials=(0,), spc=10)
    after = scores(ref)
    means = np.asarray(ref.reports["bound_mean"])  # [T, (before, after)]
    assert np.all(means[:, 0] - means[:, 1] < 0.5) and np.all(means[:, 1] < means[:, 0])
    assert after["asr"] > 0.9 * before["asr"] and abs(after["acc"] - before["acc"]) < 0.02
