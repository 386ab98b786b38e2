"""The in-memory dataset every part of bdjax works on."""

from __future__ import annotations

import dataclasses

import numpy as np

from bdjax.errors import BdjaxError


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset held as uint8 arrays (NHWC, values 0..255).

    Attributes:
      name: registry name (``synthetic``, ``cifar10``, ...).
      x_train, y_train, x_test, y_test: images ``uint8[N, H, W, C]`` and labels ``int32[N]``.
      num_classes: number of classes C; labels lie in ``[0, C)``.
      mean, std: per-channel normalisation in [0, 1] pixel units, applied inside the model.
      flip: whether training augmentation includes horizontal flips (CIFAR yes, GTSRB no).
      class_names: a name per class.
      info: free-form provenance (seed, source file) recorded in checkpoints.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = True
    class_names: tuple[str, ...] = ()
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            validate_images(x, f"{self.name} x_{split}")
            validate_labels(y, self.num_classes, f"{self.name} y_{split}")
            if len(x) != len(y):
                raise BdjaxError(
                    f"{self.name} {split} split has {len(x)} images but {len(y)} labels; "
                    "accepted: one label per image."
                )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def validate_images(x, what: str = "images") -> None:
    """Raises BdjaxError unless ``x`` is a uint8 array of shape [N, H, W, 1 or 3]."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        dtype = getattr(x, "dtype", type(x).__name__)
        raise BdjaxError(f"{what} have dtype {dtype}; accepted: uint8 arrays with values 0..255.")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise BdjaxError(f"{what} have shape {x.shape}; accepted: [N, H, W, C] with C in (1, 3).")


def validate_labels(y, num_classes: int, what: str = "labels") -> None:
    """Raises BdjaxError unless ``y`` is a 1-D integer array with values in [0, C)."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise BdjaxError(f"{what} have shape {y.shape} and dtype {y.dtype}; accepted: int[N].")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise BdjaxError(f"{what} contain label {bad}; accepted: 0..{num_classes - 1}.")
