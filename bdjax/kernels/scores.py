"""Per-filter gradient scores of every convolution in a model.

A *filter* is one output channel of a conv kernel (HWIO layout: ``kernel[..., f]``).
Scores live in a flat dict ``{kernel path: [F] vector}`` keyed by the kernel's path in
the params tree (e.g. ``"layer4_1/conv2/kernel"``), so they line up with the masks of
:mod:`bdjax.kernels.masks`. Every 4-D leaf counts as a conv kernel, shortcut 1x1 convs
included. :func:`flatten` joins all filters of the network into one vector with a
static index, so "the top filter of the whole network" is one ``argmax``.

Everything is traceable: use it inside ``jit``/``vmap``/``while_loop``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Filters = dict[str, jax.Array]
# Static layout of a flattened filter vector: ((kernel path, offset, filters), ...).
FilterIndex = tuple[tuple[str, int, int], ...]


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_name(path) -> str:
    """``"a/b/kernel"`` for a ``tree_flatten_with_path`` key path."""
    return "/".join(_key_name(k) for k in path)


def conv_kernels(params) -> dict[str, jax.Array]:
    """Every 4-D leaf of ``params`` (a conv kernel, HWIO) by its path name."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {path_name(p): leaf for p, leaf in leaves if jnp.ndim(leaf) == 4}


def per_filter_mean_abs(kernels: dict[str, jax.Array]) -> Filters:
    """Mean of ``|kernel[..., f]|`` for every filter f of every kernel."""
    return {name: jnp.mean(jnp.abs(k), axis=(0, 1, 2)) for name, k in kernels.items()}


def filter_scores(loss_fn: Callable[[Any, Any], jax.Array], params, batches) -> Filters:
    """Mean absolute gradient per conv filter, gradients summed over ``batches``.

    The paper's score (eq. 3): xi_{l,c} = ||grad_{theta_{l,c}} L||_1 / #(theta_{l,c}),
    where the gradient of the loss is accumulated over all of the defender's batches
    first (as PyTorch's ``.grad`` does across ``backward`` calls) and only then made
    absolute.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the parameters to differentiate (already masked, if pruning).
      batches: a pytree whose leaves have a leading "batch number" axis; ``lax.scan``
        walks it, so every batch has the same shape.

    Returns:
      ``{kernel path: [F] scores}`` for every 4-D leaf of ``params``.

    References:
      Dunnett et al., "Unlearning Backdoor Attacks through Gradient-Based Model
      Pruning" (Grad-Prune, papers/000), section IV-B, eq. 3.
    """
    # Differentiate with respect to the conv kernels only: the other gradients (a VGG
    # head's 25088x4096 matrix above all) would be computed and carried for nothing.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [path_name(p) if jnp.ndim(leaf) == 4 else None for p, leaf in leaves]

    def with_kernels(kernels):
        return jax.tree_util.tree_unflatten(
            treedef, [leaf if n is None else kernels[n] for n, (_, leaf) in zip(names, leaves)])

    grad_fn = jax.grad(lambda kernels, batch: loss_fn(with_kernels(kernels), batch))

    def body(total, batch):
        g = grad_fn(kernels0, batch)
        return jax.tree_util.tree_map(jnp.add, total, g), None

    kernels0 = conv_kernels(params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, kernels0)
    total, _ = jax.lax.scan(body, zeros, batches)
    return per_filter_mean_abs(total)


def filter_index(filters: Filters) -> FilterIndex:
    """Static layout of :func:`flatten` for these filters (sorted by path)."""
    out, offset = [], 0
    for name in sorted(filters):
        size = int(filters[name].shape[-1])
        out.append((name, offset, size))
        offset += size
    return tuple(out)


def flatten(filters: Filters) -> tuple[jax.Array, FilterIndex]:
    """All filters of the network as one vector, with its static index."""
    index = filter_index(filters)
    return jnp.concatenate([filters[name] for name, _, _ in index]), index


def unflatten(vector: jax.Array, index: FilterIndex) -> Filters:
    """Inverse of :func:`flatten`."""
    return {name: vector[off:off + size] for name, off, size in index}


def locate(flat: int, index: FilterIndex) -> tuple[str, int]:
    """(kernel path, filter) of a flat filter number (Python ints; for reports/tests)."""
    for name, off, size in index:
        if off <= flat < off + size:
            return name, flat - off
    raise IndexError(f"filter {flat} is outside the {index[-1][1] + index[-1][2]} filters.")


def top_filter(filters: Filters, eligible: Filters | None = None) -> jax.Array:
    """Flat number of the highest-scoring filter among ``eligible`` (1 = may be chosen)."""
    scores, index = flatten(filters)
    if eligible is not None:
        ok, _ = flatten({name: eligible[name] for name, _, _ in index})
        scores = jnp.where(ok > 0, scores, -jnp.inf)
    return jnp.argmax(scores)
