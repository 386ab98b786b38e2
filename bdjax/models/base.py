"""A classifier = a static flax module + the normalisation it expects.

The model state is an explicit pytree ``{"params", "batch_stats"}``; nothing here holds
mutable state. Inputs to :meth:`Model.apply` are images in [0, 1] pixel space (float) or
uint8; normalisation happens inside, so attacks and PGD can work in pixel space.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Model:
    """Hashable description of a classifier (usable as a static jit argument).

    Attributes:
      name: registry name.
      num_classes: output width.
      mean, std: per-channel normalisation in [0, 1] units.
      image_shape: (H, W, C) of inputs.
      dtype: compute dtype name ("float32" or "bfloat16"); parameters stay float32.
    """

    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_shape: tuple[int, int, int] = (32, 32, 3)
    dtype: str = "float32"

    @property
    def spec(self) -> "ModelSpec":
        from bdjax.models import _REGISTRY

        return _REGISTRY[self.name]

    @property
    def module(self) -> nn.Module:
        return self.spec.build(self.num_classes, jnp.dtype(self.dtype))

    def init(self, key: jax.Array) -> State:
        """Fresh float32 state ``{"params", "batch_stats"}`` (compiled: eager init of a
        conv net dispatches hundreds of small ops and takes seconds on a CPU)."""
        return _init(self, key)

    def normalize(self, x: jax.Array) -> jax.Array:
        if x.dtype == jnp.uint8:
            x = x.astype(jnp.float32) / 255.0
        mean = jnp.asarray(self.mean, jnp.float32)
        std = jnp.asarray(self.std, jnp.float32)
        return ((x - mean) / std).astype(jnp.dtype(self.dtype))

    def apply(self, state: State, x: jax.Array, *, train: bool = False,
              key: jax.Array | None = None, **kwargs):
        """Logits (float32) for images ``x`` in [0, 1] (float) or uint8.

        With ``train=True`` BN uses batch statistics and the call returns
        ``(logits, new_batch_stats)``; dropout then needs ``key``.
        Extra keyword arguments go to ``module.apply`` (e.g. ``capture_intermediates``).
        A defended state's extras are honoured: ``state["polariser"]`` (NPD) at
        ``spec.polariser_at``, ``state["bounds"]`` (MM-BD) on the BatchNorm outputs.
        """
        extra = [k for k in state if k not in ("params", "batch_stats")]
        if extra:  # a defended state: apply its extras through interceptors
            with contextlib.ExitStack() as stack:
                for name in extra:
                    stack.enter_context(nn.intercept_methods(self._extra(name, state[name])))
                return self.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                                  x, train=train, key=key, **kwargs)
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        rngs = {"dropout": key} if key is not None else {}
        xn = self.normalize(x)
        if train:
            logits, updates = self.module.apply(
                variables, xn, train=True, rngs=rngs, mutable=["batch_stats"], **kwargs)
            return logits.astype(jnp.float32), updates["batch_stats"]
        out = self.module.apply(variables, xn, train=False, rngs=rngs, **kwargs)
        if isinstance(out, tuple):
            return (out[0].astype(jnp.float32),) + tuple(out[1:])
        return out.astype(jnp.float32)

    def _extra(self, name: str, value):
        """The interceptor that applies the state extra ``name``."""
        if name == "polariser":
            from bdjax.models.polariser import polariser_interceptor

            return polariser_interceptor(self.spec.polariser_at, value)
        if name == "bounds":
            from bdjax.models.bounds import bounds_interceptor

            return bounds_interceptor(value)
        from bdjax.errors import BdjaxError

        raise BdjaxError(f"state entry {name!r} is not a known extra; accepted: params, "
                         "batch_stats, polariser (NPD), bounds (MM-BD).")


@functools.partial(jax.jit, static_argnums=0)
def _init(model: Model, key: jax.Array) -> State:
    x = jnp.zeros((1, *model.image_shape), jnp.float32)
    variables = model.module.init({"params": key, "dropout": key}, x, train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Registry entry: how to build a module and which layers defenses may address.

    Attributes:
      build: ``(num_classes, dtype) -> nn.Module``.
      head: names of the classifier's linear layers, input to output (FST, LP).
      last_conv: name of the last convolution (FP).
      polariser_at: the conv whose INPUT NPD's polariser transforms (REFERENCE.md, NPD
        row: PreAct-ResNet18 layer4.1.conv1, residual branch only; VGG19-BN the last
        512->512 conv).
      stages: the modules whose outputs end the network's last stages, in forward order
        (NAD's attention maps: PreAct-ResNet18 ``layer3``/``layer4``, VGG19-BN its 4th
        and 5th conv blocks, the small CNN its 3rd and 4th conv-BN-ReLU).
      stage_relu: a ReLU follows each ``stages`` module's output inside the network
        (a conv-BN-ReLU stage captured at its BN), so the stage output is its ReLU.
      description: one line for ``bdjax info``/docs.
    """

    build: Callable[[int, Any], nn.Module]
    head: tuple[str, ...]
    last_conv: str
    polariser_at: str = ""
    stages: tuple[str, ...] = ()
    stage_relu: bool = False
    description: str = ""
