"""Choosing how much to prune on the defender's validation split.

FP, ANP and RNP prune progressively (more channels, or a higher mask threshold) and keep
the last level whose clean accuracy has not fallen too far. The reference code measures
that fall on the test set in places (BackdoorBench's ANP compares with the test
accuracy); bdjax measures it on the defender's own images only. One rule serves all
three: :func:`last_within` over the accuracies of the candidate levels.
"""

from __future__ import annotations

import jax.numpy as jnp


def within(acc, acc0, limit: float, relative: bool):
    """Whether accuracy ``acc`` stays within ``limit`` of ``acc0``: a relative drop
    ``(acc0 - acc) / acc0 < limit``, or an absolute one ``acc0 - acc <= limit``."""
    if relative:
        return (acc0 - acc) < limit * acc0 - 1e-6  # tolerance: a drop of exactly limit fails
    return (acc0 - acc) <= limit + 1e-6


def last_within(accs, acc0, limit: float, *, relative: bool = True,
                contiguous: bool = True):
    """Index of the last candidate level whose accuracy is within ``limit`` of ``acc0``.

    Args:
      accs: ``[K]`` validation accuracies of levels 0..K-1 (increasing pruning).
      acc0: the unpruned model's validation accuracy.
      limit: the accuracy-drop limit (see :func:`within`).
      relative: relative (FP, ANP) or absolute (RNP) drop.
      contiguous: stop at the first level that fails (FP, RNP: the reference breaks
        out of its loop), or take the last passing level anywhere (ANP: the reference
        keeps every passing level it meets).

    Returns:
      int32 index in ``-1..K-1``; -1 when no level passes (keep the unpruned model).
    """
    ok = within(jnp.asarray(accs), acc0, limit, relative)
    if contiguous:
        ok = jnp.cumprod(ok.astype(jnp.int32)).astype(bool)
    k = jnp.arange(ok.shape[0], dtype=jnp.int32)
    return jnp.max(jnp.where(ok, k, -1))
