"""Defense-data splits: the defender's small clean set, one subset per trial.

Two conventions (REFERENCE.md, "Defense data"):

- ``spc`` (samples per class, 2/10/100): per class ``n_val = max(1, int(spc * 0.1))``
  validation images; when the rounding forced ``n_val`` up to 1, one extra image is
  drawn so the defender still trains on ``spc`` (SPC 2 -> 1 + 2, 10 -> 1 + 9,
  100 -> 10 + 90).
- ``ratio`` (fraction of the clean training set, BackdoorBench's 5%): class-balanced,
  ``round(ratio * N / C)`` per class, then the same validation rule.

Only defenses that select or stop on validation hold a split out (``validation=True``);
the others train on all of the subset (SPC 2 -> 2 train images per class, no
validation), as the reference code does: the survey's fork draws their SPC images with
``val_ratio=0`` and BackdoorBench trains them on all of its 5%.

Trial ``t`` draws its subset with ``fold_in(key, t)``; all trials have equal shapes so
they stack along a leading trial axis for ``vmap``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from bdjax.errors import BdjaxError

VAL_RATIO = 0.1


@dataclasses.dataclass(frozen=True)
class DefenseData:
    """The defender's data for one trial (or T trials stacked on a leading axis).

    Attributes:
      x_train, y_train: uint8 images and int32 labels the defense trains on.
      x_val, y_val: the defender's own validation split (selection, early stopping).
      trigger: only for defenses whose threat model gives the defender the trigger
        (Grad-Prune): a hashable object with ``stamp(images_uint8, key)``, e.g. an
        :class:`~bdjax.attacks.Attack`. Static metadata: shared by all trials, never
        vmapped; ``None`` for every other defense.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    trigger: Any = None


jax.tree_util.register_dataclass(
    DefenseData, data_fields=["x_train", "y_train", "x_val", "y_val"], meta_fields=["trigger"])


def split_sizes(per_class: int, validation: bool = True) -> tuple[int, int]:
    """(train, val) images per class for ``per_class`` samples per class; without
    ``validation`` all of them train."""
    if per_class < 1:
        raise BdjaxError(f"samples per class {per_class!r} is too small; accepted: >= 1.")
    if not validation:
        return per_class, 0
    raw = int(per_class * VAL_RATIO + 1e-9)  # +eps: 10 * 0.1 must give 1, not 0.
    n_val = max(1, raw)
    n_train = per_class if raw < 1 else per_class - n_val
    return n_train, n_val


def per_class_count(labels: np.ndarray, num_classes: int, *, spc: int | None,
                    ratio: float | None, validation: bool = True) -> int:
    """Samples per class for the given convention; validates against what exists."""
    if (spc is None) == (ratio is None):
        raise BdjaxError("give exactly one of spc or ratio; accepted: spc=2/10/100 or ratio in (0, 1].")
    counts = np.bincount(labels, minlength=num_classes)
    if spc is not None:
        if int(spc) != spc or spc < 1:
            raise BdjaxError(f"spc {spc!r} is invalid; accepted: a positive integer (2, 10, 100).")
        k = int(spc)
    else:
        if not 0 < ratio <= 1:
            raise BdjaxError(f"ratio {ratio!r} is out of range; accepted: (0, 1].")
        k = max(1, int(round(ratio * len(labels) / num_classes)))
    n_train, n_val = split_sizes(k, validation)
    if n_train + n_val > counts.min():
        raise BdjaxError(
            f"{'spc ' + str(spc) if spc is not None else 'ratio ' + str(ratio)} needs "
            f"{n_train + n_val} images per class but the smallest class has {counts.min()}; "
            "accepted: a smaller spc or ratio.")
    return k


def draw_indices(labels: np.ndarray, num_classes: int, per_class: int, key: jax.Array,
                 validation: bool = True):
    """Train and validation indices for one trial, class-balanced, from ``key``."""
    n_train, n_val = split_sizes(per_class, validation)
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint32)
    rng = np.random.default_rng(seed.tolist())
    train, val = [], []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        pick = rng.choice(pool, n_train + n_val, replace=False)
        val.append(pick[:n_val])
        train.append(pick[n_val:])
    # Shuffle so classes are interleaved (a batch is then never a single class).
    train = rng.permutation(np.concatenate(train))
    val = np.concatenate(val)
    return train, val


def defense_split(x: np.ndarray, y: np.ndarray, num_classes: int, *, key: jax.Array,
                  trials=(0,), spc: int | None = None, ratio: float | None = None,
                  validation: bool = True) -> DefenseData:
    """Stacked defender data for ``trials`` (leading axis T), trial t from fold_in(key, t).

    Args:
      x, y: the clean training set (uint8 images, int labels) to draw from.
      num_classes: number of classes.
      key: the split's root key.
      trials: trial ids; each gives an independent subset.
      spc / ratio: exactly one of the two conventions (module docstring).
      validation: hold a validation split out; False gives every image to training and
        empty validation arrays (``[T, 0, H, W, C]``).
    """
    k = per_class_count(np.asarray(y), num_classes, spc=spc, ratio=ratio,
                        validation=validation)
    parts = [draw_indices(np.asarray(y), num_classes, k, jax.random.fold_in(key, int(t)),
                          validation) for t in trials]
    tr = np.stack([p[0] for p in parts])
    va = np.stack([p[1] for p in parts])
    return DefenseData(x_train=x[tr], y_train=y[tr].astype(np.int32),
                       x_val=x[va], y_val=y[va].astype(np.int32))


def trial_slice(data: DefenseData, i: int) -> DefenseData:
    """Trial ``i`` of stacked data (drops the trial axis)."""
    return jax.tree_util.tree_map(lambda a: a[i], data)
