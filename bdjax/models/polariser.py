"""NPD's polariser as a model-state extra: conv1x1 + BatchNorm on one layer's input.

``Model.apply`` honours ``state["polariser"]`` through :func:`polariser_interceptor`, so a
state defended by NPD is checkpointed, restored and evaluated like any other; the model
definitions are never edited (``flax.linen.intercept_methods`` matches the module path
named by ``ModelSpec.polariser_at``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdjax.errors import BdjaxError
from bdjax.models.base import Model, State

BN_EPS = 1e-5  # PyTorch's BatchNorm2d default, as the reference polariser
BN_MOMENTUM = 0.9  # flax convention: PyTorch momentum 0.1


def _path(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))


def polarise(polariser: dict, h, train: bool = False):
    """Applies conv1x1 + BN to features ``h`` ``[N, H, W, C]``.

    Returns ``(out, batch_stats)``: with ``train`` BN normalises with the batch's
    statistics and the running ones move toward them (PyTorch's unbiased running
    variance); otherwise the running statistics are used and returned unchanged.
    """
    p, s = polariser["params"], polariser["batch_stats"]["bn"]
    z = jnp.einsum("nhwc,cd->nhwd", h.astype(jnp.float32), p["conv"]["kernel"][0, 0])
    if train:
        mean = jnp.mean(z, axis=(0, 1, 2))
        var = jnp.var(z, axis=(0, 1, 2))
        n = z.size // z.shape[-1]
        stats = {"bn": {"mean": BN_MOMENTUM * s["mean"] + (1 - BN_MOMENTUM) * mean,
                        "var": BN_MOMENTUM * s["var"]
                        + (1 - BN_MOMENTUM) * var * n / max(n - 1, 1)}}
    else:
        mean, var, stats = s["mean"], s["var"], polariser["batch_stats"]
    out = (z - mean) * jax.lax.rsqrt(var + BN_EPS) * p["bn"]["scale"] + p["bn"]["bias"]
    return out.astype(h.dtype), stats


def polariser_interceptor(where: str, polariser: dict, *, train: bool = False,
                          sink: dict | None = None):
    """A ``flax.linen.intercept_methods`` interceptor that polarises the input of the
    module at path ``where`` (e.g. ``"layer4_1/conv1"``).

    With ``train`` the polariser's new batch statistics are written to ``sink["stats"]``
    (a trace-time side channel: read it after ``apply`` inside the same function).
    Usable to make ``Model.apply`` honour ``state["polariser"]``.
    """
    target = _path(where)

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and tuple(context.module.path) == target:
            h, stats = polarise(polariser, args[0], train)
            if sink is not None:
                sink["stats"] = stats
            args = (h,) + tuple(args[1:])
        return next_fun(*args, **kwargs)

    return interceptor


def polariser_channels(model: Model) -> int:
    """Channels of the input of ``model.spec.polariser_at`` (shape inference only)."""
    where, seen = _path(model.spec.polariser_at), []

    def spy(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and tuple(context.module.path) == where:
            seen.append(args[0].shape[-1])
        return next_fun(*args, **kwargs)

    def run(state, x):
        with nn.intercept_methods(spy):
            return model.apply(state, x)

    state = jax.eval_shape(model.init, jax.random.key(0))
    jax.eval_shape(run, state, jax.ShapeDtypeStruct((1, *model.image_shape), jnp.float32))
    if not seen:
        raise BdjaxError(f"model {model.name!r} has no layer {model.spec.polariser_at!r} for "
                         "the polariser; accepted: a model whose spec names a conv layer.")
    return int(seen[0])


def init_polariser(model: Model) -> dict:
    """Identity polariser: 1x1 kernel = I, BN scale 1, bias 0, running mean 0, var 1."""
    c = polariser_channels(model)
    return {"params": {"conv": {"kernel": jnp.eye(c, dtype=jnp.float32)[None, None]},
                       "bn": {"scale": jnp.ones((c,), jnp.float32),
                              "bias": jnp.zeros((c,), jnp.float32)}},
            "batch_stats": {"bn": {"mean": jnp.zeros((c,), jnp.float32),
                                   "var": jnp.ones((c,), jnp.float32)}}}


def apply_with_polariser(model: Model, state: State, x, train: bool = False):
    """Logits of the backbone (eval mode) with ``state["polariser"]`` inserted.

    Args:
      model: the classifier.
      state: ``{"params", "batch_stats", "polariser"}``.
      x: images in [0, 1] (float) or uint8.
      train: polariser BN in training mode (the backbone stays in eval mode).

    Returns:
      logits, or with ``train`` ``(logits, polariser_batch_stats)``.
    """
    sink: dict = {}
    backbone = {"params": state["params"], "batch_stats": state["batch_stats"]}
    icpt = polariser_interceptor(model.spec.polariser_at, state["polariser"], train=train,
                                 sink=sink)
    with nn.intercept_methods(icpt):
        logits = model.apply(backbone, x)
    if train:
        return logits, sink["stats"]
    return logits
