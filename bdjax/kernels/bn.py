"""BatchNorm channels as the unit of pruning, masking and statistics.

Five of the survey's pruning defenses (ANP, RNP, BNP, CLP, MM-BD, and AWM as the survey
runs it) act on the channels of every BatchNorm layer. Here a BN layer is named by its
module path (``"layer1_0/bn1"``, ``"bn3"``) and a per-channel quantity is a dict
``{bn path: [C] array}`` (``Channels``), the layout that
:func:`bdjax.kernels.scores.flatten` joins into one vector for network-wide sorting.

- :func:`bn_layers` lists a model's BN layers in the order the forward pass runs them,
  with the convolution whose output each one normalises (CLP pairs them).
- :func:`scale_bn` multiplies BN scales (gamma) and shifts (beta) by per-channel
  coefficients: masks, noise, pruning (coefficient 0). The result is an ordinary state.
- :func:`bn_input_stats` and :func:`bn_output_max` measure what flows through each BN on
  a set of images, in eval mode, batch by batch inside one compiled scan.

Everything except :func:`bn_layers` (shape inference, Python) is traceable.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdjax.models import Model, State

Channels = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class BNLayer:
    """One BatchNorm layer: its path, channels, and the conv whose output it normalises
    (``""`` when no conv runs before it)."""

    path: str
    channels: int
    conv: str


def _is_bn(module) -> bool:
    return isinstance(module, nn.BatchNorm)


def _is_conv(module) -> bool:
    return isinstance(module, nn.Conv)


def module_name(module) -> str:
    return "/".join(module.path)


@functools.lru_cache(maxsize=None)
def bn_layers(model: Model) -> tuple[BNLayer, ...]:
    """The model's BN layers in forward order, each with the conv it normalises.

    The pairing is by execution order: a BN normalises the output of the last conv that
    ran before it. In a pre-activation ResNet block ``bn1`` runs first, on the block's
    input (the previous block's ``conv2`` output plus its shortcut), and the shortcut
    1x1 conv runs before ``conv1``, so ``layer2_1/bn1`` pairs with ``layer2_0/conv2``,
    not with the module listed last before it (CLP's reference pairs by module
    registration order, which gives ``layer2_0/shortcut`` there).
    """
    seen: list[tuple[str, str, int]] = []

    def spy(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            if _is_conv(context.module):
                seen.append(("conv", module_name(context.module), 0))
            elif _is_bn(context.module):
                seen.append(("bn", module_name(context.module), int(args[0].shape[-1])))
        return next_fun(*args, **kwargs)

    def run(state, x):
        with nn.intercept_methods(spy):
            return model.apply(state, x)

    state = jax.eval_shape(model.init, jax.random.key(0))
    jax.eval_shape(run, state, jax.ShapeDtypeStruct((1, *model.image_shape), jnp.float32))
    out, last_conv = [], ""
    for kind, name, channels in seen:
        if kind == "conv":
            last_conv = name
        else:
            out.append(BNLayer(name, channels, last_conv))
    return tuple(out)


def _node(tree, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def bn_params(params, model: Model) -> dict[str, dict]:
    """``{bn path: {"scale", "bias"}}`` of ``params``."""
    return {layer.path: _node(params, layer.path) for layer in bn_layers(model)}


def bn_stats(batch_stats, model: Model) -> dict[str, dict]:
    """``{bn path: {"mean", "var"}}`` (the running statistics) of ``batch_stats``."""
    return {layer.path: _node(batch_stats, layer.path) for layer in bn_layers(model)}


def conv_kernel(params, path: str) -> jax.Array:
    """The HWIO kernel of the conv at module ``path``."""
    return _node(params, path)["kernel"]


def channel_ones(model: Model) -> Channels:
    """A float32 vector of ones per BN layer."""
    return {layer.path: jnp.ones((layer.channels,), jnp.float32) for layer in bn_layers(model)}


def _replace(tree, path: str, fn):
    head, _, rest = path.partition("/")
    if not rest:
        return {**tree, head: fn(tree[head])}
    return {**tree, head: _replace(tree[head], rest, fn)}


def scale_bn(params, scale: Channels | None = None, bias: Channels | None = None):
    """``params`` with each named BN's gamma multiplied by ``scale[path]`` and beta by
    ``bias[path]`` (either may be None: unchanged). Pruning a channel is coefficient 0."""
    for path in sorted(set(scale or {}) | set(bias or {})):
        def fn(bn, path=path):
            out = dict(bn)
            if scale is not None and path in scale:
                out["scale"] = bn["scale"] * scale[path].astype(bn["scale"].dtype)
            if bias is not None and path in bias:
                out["bias"] = bn["bias"] * bias[path].astype(bn["bias"].dtype)
            return out
        params = _replace(params, path, fn)
    return params


def _capture(model: Model, state: State, x, what):
    """Runs the eval-mode model on ``x`` and returns ``{bn path: what(input, output)}``."""
    sink: dict = {}

    def spy(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and _is_bn(context.module):
            sink[module_name(context.module)] = what(args[0], out)
        return out

    with nn.intercept_methods(spy):
        model.apply(state, x)
    return sink


def batched(x, batch_size: int):
    """``x`` as ``[steps, batch, ...]`` plus a 0/1 weight per slot (the last batch is
    filled with repeats of the first images, weighted 0)."""
    n = x.shape[0]
    bs = min(batch_size, n)
    steps = -(-n // bs)
    idx = jnp.arange(steps * bs) % n
    weight = (jnp.arange(steps * bs) < n).astype(jnp.float32)
    return x[idx].reshape(steps, bs, *x.shape[1:]), weight.reshape(steps, bs)


def bn_input_stats(model: Model, state: State, x, batch_size: int = 500):
    """Mean and (biased) variance of each BN layer's input per channel over all of ``x``.

    Returns:
      ``({bn path: [C] mean}, {bn path: [C] var})`` of the eval-mode model.
    """
    xb, wb = batched(x, batch_size)

    def moments(inp, _):
        v = inp.astype(jnp.float32)
        return jnp.sum(v, axis=(1, 2)), jnp.sum(v * v, axis=(1, 2)), v.shape[1] * v.shape[2]

    def body(total, batch):
        xs, w = batch
        got = _capture(model, state, xs, moments)
        new = {k: (total[k][0] + w @ s1, total[k][1] + w @ s2, total[k][2] + jnp.sum(w) * hw)
               for k, (s1, s2, hw) in got.items()}
        return new, None

    zeros = {layer.path: (jnp.zeros((layer.channels,)), jnp.zeros((layer.channels,)),
                          jnp.float32(0)) for layer in bn_layers(model)}
    total, _ = jax.lax.scan(body, zeros, (xb, wb))
    mean = {k: s1 / n for k, (s1, _, n) in total.items()}
    var = {k: jnp.maximum(s2 / n - mean[k] ** 2, 0.0) for k, (_, s2, n) in total.items()}
    return mean, var


def bn_output_max(model: Model, state: State, x, batch_size: int = 500) -> dict[str, jax.Array]:
    """The largest value each BN layer outputs over all of ``x`` (one scalar per layer),
    eval mode."""
    xb, wb = batched(x, batch_size)

    def body(best, batch):
        xs, w = batch
        got = _capture(model, state, xs, lambda _, out: jnp.max(
            out.astype(jnp.float32), axis=(1, 2, 3)))
        masked = {k: jnp.max(jnp.where(w > 0, m, -jnp.inf)) for k, m in got.items()}
        return {k: jnp.maximum(best[k], masked[k]) for k in best}, None

    init = {layer.path: jnp.float32(-jnp.inf) for layer in bn_layers(model)}
    best, _ = jax.lax.scan(body, init, (xb, wb))
    return best
