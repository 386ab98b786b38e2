"""Which of the reference's per-dataset settings a bdjax dataset takes.

The reference code keys its settings on the names ``cifar10``, ``gtsrb`` and ``tiny``
(Tiny-ImageNet). bdjax's own names map onto them here, once for every defense: the
embedded synthetic set is 32x32x3 with 10 classes like CIFAR-10, so it takes CIFAR-10's
values, and CIFAR-100 does too (the reference has no settings of its own for it in the
defenses bdjax implements).
"""

from __future__ import annotations

_ALIASES = {
    "cifar10": "cifar10", "synthetic": "cifar10", "cifar100": "cifar10",
    "gtsrb": "gtsrb",
    "tiny": "tiny", "tiny_imagenet": "tiny", "tiny-imagenet": "tiny", "tinyimagenet": "tiny",
}
REFERENCE_DATASETS = ("cifar10", "gtsrb", "tiny")


def reference_dataset(name: str) -> str:
    """``cifar10``, ``gtsrb`` or ``tiny`` for a bdjax dataset name; names the reference
    does not know map to ``cifar10``, whose values are every defense's class defaults."""
    return _ALIASES.get(str(name).lower(), "cifar10")


def known_dataset(name: str) -> bool:
    """Whether ``name`` is one of the names :func:`reference_dataset` maps explicitly."""
    return str(name).lower() in _ALIASES


__all__ = ["REFERENCE_DATASETS", "reference_dataset", "known_dataset"]
