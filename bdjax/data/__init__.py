"""Datasets and defense-data splits.

``load(name)`` returns a :class:`Dataset` of uint8 images; ``defense_split`` draws the
defender's per-trial subsets. The embedded ``synthetic`` dataset is the default and
needs no download; ``cifar10`` reads the binary archive through a TFDS builder of our
own (tensorflow-datasets is imported only there).
"""

from __future__ import annotations

import functools

from bdjax.data.dataset import Dataset, validate_images, validate_labels
from bdjax.data.splits import DefenseData, defense_split, split_sizes, trial_slice
from bdjax.errors import check_choice

_NAMES = ("synthetic", "cifar10")
# What a plan needs to know of a dataset without loading it (a test checks it against
# the loaded datasets): training-set size, classes, horizontal flips in augmentation.
_INFO = {"synthetic": {"n_train": 10_000, "num_classes": 10, "flip": False},
         "cifar10": {"n_train": 50_000, "num_classes": 10, "flip": True}}


def names() -> list[str]:
    return list(_NAMES)


def info(name: str, *, n_train: int | None = None, **_) -> dict:
    """``n_train``, ``num_classes`` and ``flip`` of dataset ``name`` loaded with the same
    arguments as :func:`load`, without loading it."""
    check_choice("dataset", name, _NAMES)
    out = dict(_INFO[name])
    if name == "synthetic" and n_train is not None:
        out["n_train"] = n_train
    return out


@functools.lru_cache(maxsize=4)
def load(name: str = "synthetic", *, seed: int = 0, data_dir: str | None = None,
         archive: str | None = None, n_train: int | None = None,
         n_test: int | None = None) -> Dataset:
    """The dataset ``name``.

    Args:
      name: one of :func:`names`.
      seed: generator seed (synthetic only).
      data_dir: where prepared TFDS data lives (cifar10).
      archive: a local ``cifar-10-binary.tar.gz`` (cifar10).
      n_train, n_test: split sizes (synthetic only; defaults 10,000 and 2,000).
    """
    check_choice("dataset", name, _NAMES)
    if name == "synthetic":
        from bdjax.data.synthetic import load_synthetic

        sizes = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
        return load_synthetic(seed=seed, **sizes)
    from bdjax.data.cifar10 import load_cifar10

    return load_cifar10(data_dir=data_dir, archive=archive)


__all__ = ["Dataset", "DefenseData", "info", "load", "names", "defense_split", "split_sizes",
           "trial_slice", "validate_images", "validate_labels"]
