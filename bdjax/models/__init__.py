"""Model registry: ``get(name, num_classes=..., ...)`` and ``names()``.

Every model is a :class:`Model` (hashable, static under jit) whose state is the explicit
pytree ``{"params", "batch_stats"}``.
"""

from __future__ import annotations

import jax
import numpy as np

from bdjax.errors import BdjaxError, check_choice
from bdjax.models.base import Model, ModelSpec, State
from bdjax.models.preact_resnet import PreActResNet
from bdjax.models.small_cnn import SmallCNN
from bdjax.models.vgg import VGG

_REGISTRY: dict[str, ModelSpec] = {
    "small_cnn": ModelSpec(
        build=lambda c, dtype: SmallCNN(num_classes=c, dtype=dtype),
        head=("head",), last_conv="conv4", polariser_at="conv4",
        stages=("bn3", "bn4"), stage_relu=True,
        description="4-stage conv-BN-ReLU CNN (~0.1M parameters) for CPU work"),
    "preact_resnet18": ModelSpec(
        build=lambda c, dtype: PreActResNet(num_classes=c, dtype=dtype),
        head=("linear",), last_conv="layer4_1/conv2", polariser_at="layer4_1/conv1",
        stages=("layer3_1", "layer4_1"),
        description="PreAct-ResNet18 as in BackdoorBench (11.2M parameters)"),
    "vgg19_bn": ModelSpec(
        build=lambda c, dtype: VGG(num_classes=c, dtype=dtype),
        head=("fc0", "fc1", "fc2"), last_conv="conv15", polariser_at="conv15",
        stages=("bn11", "bn15"), stage_relu=True,
        description="VGG19-BN, torchvision layout (139.6M parameters at 32x32)"),
}

DTYPES = ("float32", "bfloat16")


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str, *, num_classes: int = 10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        image_shape=(32, 32, 3), dtype: str = "float32") -> Model:
    """The model ``name`` for ``num_classes`` outputs; raises BdjaxError for bad values."""
    check_choice("model", name, names())
    check_choice("dtype", dtype, DTYPES)
    if int(num_classes) < 2:
        raise BdjaxError(f"num_classes {num_classes!r} is too small; accepted: an integer >= 2.")
    return Model(name=name, num_classes=int(num_classes),
                 mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                 image_shape=tuple(int(s) for s in image_shape), dtype=dtype)


def for_dataset(name: str, dataset, dtype: str = "float32") -> Model:
    """The model ``name`` sized and normalised for ``dataset``."""
    return get(name, num_classes=dataset.num_classes, mean=dataset.mean, std=dataset.std,
               image_shape=dataset.image_shape, dtype=dtype)


def count_params(state: State) -> int:
    """Trainable parameters (``state["params"]`` only, as PyTorch's requires_grad count)."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(state["params"])))


__all__ = ["Model", "ModelSpec", "State", "get", "names", "for_dataset", "count_params"]
