"""Filter masks: pruning without changing parameter shapes.

A masks dict ``{kernel path: [F] 0/1 vector}`` (the layout of
:mod:`bdjax.kernels.scores`) says which output filters of each conv survive. Pruning
multiplies a kernel by its mask on the last (output) axis, and the conv's bias, where
it has one, by the same mask, so shapes stay static under ``jit``/``vmap`` and a pruned
model is an ordinary model state.

Fine-tuning a pruned model keeps pruned filters at exactly zero by passing
:func:`param_mask` as ``grad_mask`` to :func:`bdjax.kernels.steps.train_step` (their
gradients and updates are zeroed, weight decay and momentum included), after the masks
have been applied once with :func:`apply_masks`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bdjax.kernels.scores import Filters, conv_kernels, path_name


def ones_masks(params) -> Filters:
    """All filters kept: a float32 [F] vector of ones per conv kernel."""
    return {name: jnp.ones((k.shape[-1],), jnp.float32)
            for name, k in conv_kernels(params).items()}


def _bias_of(name: str) -> str:
    head, _, _ = name.rpartition("/")
    return f"{head}/bias" if head else "bias"


def _leaf_masks(params, masks: Filters) -> dict[str, jax.Array]:
    """The mask each masked leaf gets: kernels and their sibling biases."""
    out = dict(masks)
    for name, m in masks.items():
        out.setdefault(_bias_of(name), m)
    return out


def _map_masked(fn, params, masks: Filters):
    """``fn(leaf, mask_or_None)`` over every leaf of ``params``."""
    by_path = _leaf_masks(params, masks)

    def leaf_fn(path, leaf):
        name = path_name(path)
        m = by_path.get(name)
        # A bias-named leaf is only masked when it has the filter count of its kernel.
        if m is not None and jnp.ndim(leaf) >= 1 and leaf.shape[-1] == m.shape[-1]:
            return fn(leaf, m)
        return fn(leaf, None)

    return jax.tree_util.tree_map_with_path(leaf_fn, params)


def apply_masks(params, masks: Filters):
    """``params`` with every masked filter (kernel[..., f] and bias[f]) set to zero."""
    return _map_masked(lambda x, m: x if m is None else x * m.astype(x.dtype), params, masks)


def param_mask(params, masks: Filters):
    """A ``grad_mask`` tree for ``train_step``: the filter mask broadcast on the last
    axis of each masked kernel/bias, 1 elsewhere (scalars, so it costs nothing)."""
    return _map_masked(lambda x, m: jnp.ones((), x.dtype) if m is None else m.astype(x.dtype),
                       params, masks)


def count_pruned(masks: Filters) -> jax.Array:
    """Number of pruned (mask 0) filters over the whole network."""
    return jnp.asarray(sum(jnp.sum(m == 0) for m in masks.values()), jnp.int32)
