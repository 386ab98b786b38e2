"""MM-BD's activation bounds as a model-state extra: ``min(relu(BN output), Z)``.

``state["bounds"]`` is ``{bn path: [C] upper bounds}``; ``Model.apply`` honours it
through :func:`bounds_interceptor`, so a state defended by MM-BD is checkpointed,
restored and evaluated like any other (the reference keeps the bounds in forward hooks
and saves the model without them). Every bdjax model follows each BatchNorm with a ReLU,
so bounding ``relu(BN output)`` channel-wise is the same as bounding the ReLU's output,
which is what the reference does for VGG19-BN (ReLU layers) and PreAct-ResNet18 (BN
outputs, ReLU first).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def bound(out, z):
    """``min(relu(out), z)`` per channel (last axis)."""
    return jnp.minimum(nn.relu(out), z.astype(out.dtype))


def bounds_interceptor(bounds: dict):
    """A ``flax.linen.intercept_methods`` interceptor applying ``bounds`` (``{bn path:
    [C]}``) to the outputs of those BatchNorm layers."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, nn.BatchNorm):
            z = bounds.get("/".join(context.module.path))
            if z is not None:
                return bound(out, z)
        return out

    return interceptor
