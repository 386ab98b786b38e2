"""Metrics on hand-built predictions whose answers are worked out in the comments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import metrics
from bdjax.errors import BdjaxError

LABELS = jnp.arange(10, dtype=jnp.int32)  # ten test images, one per class 0..9


def test_accuracy_all_and_masked():
    pred = jnp.array([0, 1, 2, 0, 0, 5, 0, 0, 0, 0])
    # Correct at 0, 1, 2, 5 -> 4 / 10.
    assert float(metrics.accuracy(pred, LABELS)) == pytest.approx(0.4)
    # Mask keeps images 0..4: correct at 0, 1, 2 -> 3 / 5.
    mask = LABELS < 5
    assert float(metrics.accuracy(pred, LABELS, mask)) == pytest.approx(0.6)
    assert metrics.accuracy(pred, LABELS).dtype == jnp.float32


def test_accuracy_empty_mask_is_nan_also_under_jit():
    pred = jnp.zeros(10, dtype=jnp.int32)
    empty = jnp.zeros(10, dtype=bool)
    assert math.isnan(float(metrics.accuracy(pred, LABELS, empty)))
    assert math.isnan(float(jax.jit(metrics.accuracy)(pred, LABELS, empty)))


def test_all_to_one_by_hand():
    target = 0
    valid = metrics.asr_mask(LABELS, target, "all_to_one")
    # Only the class-0 image is excluded: its "success" would need no backdoor.
    np.testing.assert_array_equal(np.asarray(valid), [False] + [True] * 9)
    plabels = metrics.poison_labels(LABELS, target, "all_to_one", 10)
    np.testing.assert_array_equal(np.asarray(plabels), np.zeros(10))
    pred = jnp.array([0, 0, 0, 0, 0, 5, 6, 7, 1, 1])
    # Image 0 is excluded. Images 1-4 predict 0 = target -> 4 ASR hits; images 5-7
    # predict their true class -> 3 RA hits; images 8, 9 predict 1 -> neither.
    # ASR = 4/9, RA = 3/9 over the 9 valid images.
    out = metrics.attack_metrics(pred, LABELS, plabels, valid)
    assert float(out["asr"]) == pytest.approx(4 / 9)
    assert float(out["ra"]) == pytest.approx(3 / 9)


def test_all_to_all_by_hand():
    valid = metrics.asr_mask(LABELS, 0, "all_to_all")
    assert bool(jnp.all(valid))
    plabels = metrics.poison_labels(LABELS, 0, "all_to_all", 10)
    np.testing.assert_array_equal(np.asarray(plabels), [1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
    pred = jnp.array([1, 2, 3, 3, 4, 5, 0, 0, 0, 0])
    # Shifted-label hits at images 0, 1, 2 and 9 (9 -> 0) -> ASR = 4/10.
    # True-label hits at images 3, 4, 5 -> RA = 3/10. Images 6-8 predict 0: neither.
    out = metrics.attack_metrics(pred, LABELS, plabels, valid)
    assert float(out["asr"]) == pytest.approx(0.4)
    assert float(out["ra"]) == pytest.approx(0.3)


@pytest.mark.parametrize("mode", metrics.MODES)
def test_asr_plus_ra_at_most_one_on_random_predictions(mode):
    rng = np.random.default_rng(0)
    num_classes, n, target = 5, 300, 2
    labels = jnp.asarray(rng.integers(0, num_classes, n))
    plabels = metrics.poison_labels(labels, target, mode, num_classes)
    valid = metrics.asr_mask(labels, target, mode)
    for _ in range(20):
        pred = jnp.asarray(rng.integers(0, num_classes, n))
        out = metrics.attack_metrics(pred, labels, plabels, valid)
        asr, ra = float(out["asr"]), float(out["ra"])
        # Both must be non-trivial, else the bound would hold vacuously.
        assert asr > 0 and ra > 0
        assert asr + ra <= 1 + 1e-6


def test_der_examples():
    # dASR = 0.9, dACC = 0.05 -> (0.9 - 0.05 + 1) / 2 = 0.925.
    assert float(metrics.der(0.9, 0.85, 1.0, 0.1)) == pytest.approx(0.925)
    # ASR rises 0.2 -> 0.5 (dASR < 0 counts 0); dACC = 0.1 -> (0 - 0.1 + 1) / 2 = 0.45.
    assert float(metrics.der(0.9, 0.8, 0.2, 0.5)) == pytest.approx(0.45)
    # ACC rises 0.8 -> 0.9 (dACC < 0 counts 0); dASR = 1 -> (1 - 0 + 1) / 2 = 1.
    assert float(metrics.der(0.8, 0.9, 1.0, 0.0)) == pytest.approx(1.0)
    # Both move the "wrong" way for the formula: clipped to no change -> 0.5.
    assert float(metrics.der(0.8, 0.9, 0.2, 0.5)) == pytest.approx(0.5)


def test_arr_and_rdr_values():
    # (0.8 - 0.6) / 0.8 = 0.25.
    assert float(metrics.arr(0.8, 0.6)) == pytest.approx(0.25)
    # A defense that raises clean accuracy: (0.8 - 0.9) / 0.8 = -0.125.
    assert float(metrics.arr(0.8, 0.9)) == pytest.approx(-0.125)
    # (0.8 - 0.2) / 0.8 = 0.75; RA back at ACC_pre -> 0.
    assert float(metrics.rdr(0.8, 0.2)) == pytest.approx(0.75)
    assert float(metrics.rdr(0.8, 0.8)) == pytest.approx(0.0)
    # Arrays (one entry per trial) work elementwise.
    np.testing.assert_allclose(
        np.asarray(metrics.arr(jnp.array([0.5, 1.0]), jnp.array([0.25, 0.5]))), [0.5, 0.5]
    )


def test_vmap_accuracy_matches_per_row():
    preds = jnp.array(
        [
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # all right: 1.0
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # only image 0: 0.1
            [9, 1, 9, 3, 9, 5, 9, 7, 9, 9],  # odd images 1,3,5,7 + 9: 0.5
        ]
    )
    batched = jax.jit(jax.vmap(metrics.accuracy, in_axes=(0, None)))(preds, LABELS)
    rows = [float(metrics.accuracy(p, LABELS)) for p in preds]
    np.testing.assert_allclose(np.asarray(batched), rows)
    np.testing.assert_allclose(np.asarray(batched), [1.0, 0.1, 0.5], rtol=1e-6)


def test_vmap_attack_metrics_with_traced_target():
    # Per-trial targets are traced under vmap; the mask must not branch on them.
    preds = jnp.array([[0] * 10, [1] * 10])
    targets = jnp.array([0, 1])

    def one(pred, target):
        valid = metrics.asr_mask(LABELS, target, "all_to_one")
        plabels = metrics.poison_labels(LABELS, target, "all_to_one", 10)
        return metrics.attack_metrics(pred, LABELS, plabels, valid)

    out = jax.jit(jax.vmap(one))(preds, targets)
    # Each trial predicts its own target everywhere: ASR 9/9, RA 0/9.
    np.testing.assert_allclose(np.asarray(out["asr"]), [1.0, 1.0])
    np.testing.assert_allclose(np.asarray(out["ra"]), [0.0, 0.0])
    der = jax.vmap(metrics.der)(jnp.array([0.9, 0.9]), jnp.array([0.8, 0.9]),
                                out["asr"], jnp.array([0.0, 0.5]))
    # (1 - 0.1 + 1) / 2 = 0.95 and (0.5 - 0 + 1) / 2 = 0.75.
    np.testing.assert_allclose(np.asarray(der), [0.95, 0.75], rtol=1e-6)


@pytest.mark.parametrize("fn", ["asr_mask", "poison_labels"])
def test_invalid_mode_names_value_and_accepted(fn):
    args = (LABELS, 0, "all2one") + ((10,) if fn == "poison_labels" else ())
    with pytest.raises(BdjaxError, match="all2one") as err:
        getattr(metrics, fn)(*args)
    assert "all_to_one" in str(err.value) and "all_to_all" in str(err.value)


def test_poison_labels_rejects_bad_target_and_class_count():
    with pytest.raises(BdjaxError, match="target 10"):
        metrics.poison_labels(LABELS, 10, "all_to_one", 10)
    with pytest.raises(BdjaxError, match="num_classes 1"):
        metrics.poison_labels(LABELS, 0, "all_to_all", 1)


def test_summary_row():
    before = {"acc": 0.9, "asr": 1.0, "ra": 0.0}
    after = {"acc": 0.8, "asr": 0.1, "ra": 0.7}
    row = metrics.summary(before, after)
    assert set(row) == {"acc", "asr", "ra", "der", "arr", "rdr"}
    assert all(isinstance(v, float) for v in row.values())
    assert row["acc"] == pytest.approx(0.8) and row["ra"] == pytest.approx(0.7)
    # DER = (0.9 - 0.1 + 1) / 2 = 0.9; ARR = 0.1 / 0.9; RDR = 0.2 / 0.9.
    assert row["der"] == pytest.approx(0.9)
    assert row["arr"] == pytest.approx(1 / 9)
    assert row["rdr"] == pytest.approx(2 / 9)
    with pytest.raises(BdjaxError, match="ra"):
        metrics.summary(before, {"acc": 0.8, "asr": 0.1})


def test_mean_std_population():
    mean, std = metrics.mean_std([1.0, 2.0, 3.0, 4.0])
    # ddof=0: sqrt(((1.5^2 + 0.5^2) * 2) / 4) = sqrt(1.25); ddof=1 would give 1.29.
    assert float(mean) == pytest.approx(2.5)
    assert float(std) == pytest.approx(math.sqrt(1.25))
    mean, std = metrics.mean_std([0.7])
    assert float(mean) == pytest.approx(0.7) and float(std) == 0.0
