"""Backdoor metrics: ACC, ASR, RA and the defense scores DER, ARR, RDR.

Every array function here is pure ``jax.numpy`` with no Python branching on traced
values, so the experiment runner can ``jit(vmap(...))`` them over stacked trials.
Validation (attack modes, targets, class counts) only ever looks at Python values.

Definitions (``shared/REFERENCE.md``, "Metrics"):

* ACC: accuracy on the clean test set.
* ASR: accuracy against the attack's label on poisoned test images. All-to-one counts
  only images whose TRUE label is not the target (those would be "successful" without
  any backdoor); all-to-all counts every image with its shifted label ``(y + 1) mod C``.
  Clean-label attacks (SIG) follow the all-to-one rule.
* RA: accuracy of the same poisoned images against their TRUE labels. Because the
  attack's label differs from the true label on every counted image, ASR + RA <= 1.
* DER, ARR, RDR: before/after comparisons of a defense, see the functions.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np

from bdjax.errors import BdjaxError, check_choice

MODES = ("all_to_one", "all_to_all")


def _f32(x):
    return jnp.asarray(x, dtype=jnp.float32)


def accuracy(pred, labels, mask=None):
    """Fraction of predictions equal to the labels over the masked entries.

    Args:
      pred: predicted class indices, integer array ``[N]`` (or any shape matching
        ``labels``).
      labels: reference class indices, same shape as ``pred``.
      mask: optional boolean array, same shape; only True entries count. ``None`` counts
        every entry.

    Returns:
      A float32 scalar in [0, 1]. An all-False mask gives NaN (0 / 0): "no image counted"
      stays distinguishable from "every counted image wrong", and no traced branch is
      needed to detect it.
    """
    correct = jnp.asarray(pred) == jnp.asarray(labels)
    if mask is None:  # static: decided by the caller's Python value, never traced
        mask = jnp.ones(correct.shape, dtype=bool)
    mask = jnp.asarray(mask, dtype=bool)
    hits = jnp.sum(correct & mask, dtype=jnp.float32)
    return hits / jnp.sum(mask, dtype=jnp.float32)


def _check_mode(mode) -> None:
    check_choice("mode", mode, MODES)


def asr_mask(true_labels, target, mode):
    """Which poisoned test images count towards ASR and RA.

    Args:
      true_labels: integer array ``[N]`` of the images' true classes.
      target: the attack's target class (ignored for all-to-all); an int or a traced
        scalar.
      mode: ``"all_to_one"`` (also for clean-label attacks such as SIG) or
        ``"all_to_all"``. A Python string, checked eagerly.

    Returns:
      Boolean array ``[N]``: all-to-one excludes images whose true label is the target;
      all-to-all keeps every image.

    Raises:
      BdjaxError: ``mode`` is not one of :data:`MODES`.
    """
    _check_mode(mode)
    true_labels = jnp.asarray(true_labels)
    if mode == "all_to_all":
        return jnp.ones(true_labels.shape, dtype=bool)
    return true_labels != target


def poison_labels(true_labels, target, mode, num_classes):
    """The label the attack wants each poisoned test image classified as.

    Args:
      true_labels: integer array ``[N]`` of the images' true classes.
      target: the target class for all-to-one (ignored for all-to-all).
      mode: ``"all_to_one"`` or ``"all_to_all"`` (Python string).
      num_classes: number of classes C (Python int, at least 2).

    Returns:
      Integer array ``[N]``, dtype of ``true_labels``: the constant ``target`` for
      all-to-one, ``(y + 1) mod C`` for all-to-all.

    Raises:
      BdjaxError: unknown ``mode``, ``num_classes`` below 2, or a Python-int ``target``
        outside ``[0, num_classes)``.
    """
    _check_mode(mode)
    # With one class the shifted label equals the true one and ASR + RA <= 1 breaks.
    if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise BdjaxError(f"num_classes {num_classes!r} is invalid; accepted: an integer >= 2.")
    if isinstance(target, numbers.Integral) and not 0 <= target < num_classes:
        raise BdjaxError(
            f"target {target!r} is out of range; accepted: [0, {num_classes - 1}]."
        )
    true_labels = jnp.asarray(true_labels)
    if mode == "all_to_all":
        return (true_labels + 1) % num_classes
    return jnp.full(true_labels.shape, target, dtype=true_labels.dtype)


def attack_metrics(pred_poisoned, true_labels, poisoned_labels, valid):
    """ASR and RA from predictions on poisoned test images.

    Args:
      pred_poisoned: predicted classes on the poisoned images, integer array ``[N]``.
      true_labels: the images' true classes ``[N]``.
      poisoned_labels: the attack's label per image ``[N]`` (see :func:`poison_labels`).
      valid: boolean ``[N]``, which images count (see :func:`asr_mask`).

    Returns:
      ``{"asr": float32 scalar, "ra": float32 scalar}``; both NaN if no image is valid.
      ASR + RA <= 1 whenever ``poisoned_labels != true_labels`` on every valid image,
      which :func:`poison_labels` with :func:`asr_mask` guarantees.
    """
    return {
        "asr": accuracy(pred_poisoned, poisoned_labels, valid),
        "ra": accuracy(pred_poisoned, true_labels, valid),
    }


def der(acc_before, acc_after, asr_before, asr_after):
    """Defense Effectiveness Rating: reward for ASR removed, penalty for ACC lost.

    ``DER = [max(0, dASR) - max(0, dACC) + 1] / 2`` with ``dASR = ASR_before - ASR_after``
    and ``dACC = ACC_before - ACC_after``. It lies in [0, 1]; 0.5 means no change, higher
    is better. An ASR increase or an ACC gain is clipped to 0 rather than counted.

    Args:
      acc_before, acc_after, asr_before, asr_after: fractions in [0, 1]; Python floats or
        arrays of one shape (e.g. one entry per trial).

    Returns:
      float32 array of the inputs' broadcast shape.

    References:
      BackdoorBench's DER, in the form with the correct sign (``shared/REFERENCE.md``).
    """
    d_asr = _f32(asr_before) - _f32(asr_after)
    d_acc = _f32(acc_before) - _f32(acc_after)
    return (jnp.maximum(0.0, d_asr) - jnp.maximum(0.0, d_acc) + 1.0) / 2.0


def arr(acc_pre, acc_post):
    """Accuracy Reduction Ratio: the clean-accuracy drop, normalised by ACC_pre.

    ``ARR = (ACC_pre - ACC_post) / ACC_pre``. Lower is better; 0 means the defense cost no
    clean accuracy, negative means it improved it. Normalising makes datasets with
    different base accuracy (CIFAR-10 vs Tiny-ImageNet) comparable. ``acc_pre == 0`` gives
    inf or NaN.

    Args:
      acc_pre: clean accuracy before the defense (Python float or array).
      acc_post: clean accuracy after the defense.

    Returns:
      float32 array of the inputs' broadcast shape.

    References:
      Survey of backdoor mitigations, ``papers/001``, eq. 35.
    """
    acc_pre = _f32(acc_pre)
    return (acc_pre - _f32(acc_post)) / acc_pre


def rdr(acc_pre, ra_post):
    """Recovery Difference Ratio: how far robust accuracy falls short of ACC_pre.

    ``RDR = (ACC_pre - RA_post) / ACC_pre``: the normalised gap between the clean accuracy
    before the defense and the accuracy on poisoned images (true labels) after it. Lower is
    better; 0 means triggered images are classified as well as clean ones were.
    ``acc_pre == 0`` gives inf or NaN.

    Args:
      acc_pre: clean accuracy before the defense (Python float or array).
      ra_post: robust accuracy after the defense.

    Returns:
      float32 array of the inputs' broadcast shape.

    References:
      Survey of backdoor mitigations, ``papers/001``, eq. 36.
    """
    acc_pre = _f32(acc_pre)
    return (acc_pre - _f32(ra_post)) / acc_pre


def _to_host(x):
    # Rows want plain floats; batched (vmapped-trial) inputs stay numpy arrays.
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else x


def summary(before: dict, after: dict) -> dict:
    """The post-defense metrics and defense scores for one result row.

    Args:
      before: ``{"acc", "asr", ...}`` of the backdoored model (its ``ra`` is not used).
      after: ``{"acc", "asr", "ra"}`` of the defended model.

    Returns:
      ``{"acc", "asr", "ra"}`` copied from ``after`` plus ``"der"``, ``"arr"``, ``"rdr"``;
      Python floats for scalar inputs, numpy arrays for per-trial arrays.

    Raises:
      BdjaxError: a required key is missing.
    """
    required = (("before", before, ("acc", "asr")), ("after", after, ("acc", "asr", "ra")))
    for name, d, keys in required:
        missing = [k for k in keys if k not in d]
        if missing:
            raise BdjaxError(
                f"summary's {name} dict lacks {', '.join(missing)}; "
                f"accepted: a dict with {', '.join(keys)}."
            )
    out = {k: _f32(after[k]) for k in ("acc", "asr", "ra")}
    out["der"] = der(before["acc"], after["acc"], before["asr"], after["asr"])
    out["arr"] = arr(before["acc"], after["acc"])
    out["rdr"] = rdr(before["acc"], after["ra"])
    return {k: _to_host(v) for k, v in out.items()}


def mean_std(values):
    """Mean and population standard deviation over trials, for tables.

    Args:
      values: a sequence of Python floats or an array; reduced over axis 0 (trials), so
        a ``[trials, k]`` array gives ``k`` means and stds.

    Returns:
      ``(mean, std)`` as float32 arrays. ``std`` uses ddof=0 (the spread of these trials,
      not an estimate of a wider population), so a single value gives std 0 instead of
      NaN. NaN entries propagate.
    """
    v = _f32(values)
    return jnp.mean(v, axis=0), jnp.std(v, axis=0, ddof=0)
