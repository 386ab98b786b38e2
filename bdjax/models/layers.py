"""Convolution whose gradients stay fast inside XLA:CPU loops.

XLA:CPU runs the two convolutions of a conv's backward pass (input gradient and
weight gradient) on a slow generic path when they sit inside a ``while`` loop: on 2
cores a small CNN's training step took 1.5 s inside ``lax.scan`` against 0.1 s outside
(jax issue #12868 is the same effect for non-NHWC forward convs). Every bdjax defense
trains inside compiled loops, so on CPU our conv layers use a custom VJP that writes
both gradients as loop-friendly operations:

- input gradient: a forward NHWC/HWIO convolution of the output gradient with the
  flipped, transposed kernel (``lhs_dilation`` = stride), the path XLA:CPU keeps fast;
- weight gradient: one matrix product per kernel offset between the strided input
  window and the output gradient.

On GPU/TPU the native gradient is used (cuDNN et al. are fast in loops).

Which path a convolution takes is chosen when it is traced, by :func:`conv_rule`:
``auto`` (the default: this path on CPU, the native op elsewhere), ``fold`` (this path
on every backend: its vmap rule folds the trial axis into the batch or the output
channels instead of emitting a grouped convolution) or ``native`` (the native op
everywhere). The trial runner traces each program under the rule it is asked for.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bdjax.errors import check_choice

CONV_RULES = ("auto", "native", "fold")
_RULE = contextvars.ContextVar("bdjax_conv_rule", default="auto")


@contextlib.contextmanager
def conv_rule(rule: str):
    """Convolutions traced inside this context use ``rule`` (module docstring)."""
    check_choice("conv_rule", rule, CONV_RULES)
    token = _RULE.set(rule)
    try:
        yield
    finally:
        _RULE.reset(token)


def _fold() -> bool:
    rule = _RULE.get()
    return rule == "fold" or (rule == "auto" and jax.default_backend() == "cpu")


_DN = ("NHWC", "HWIO", "NHWC")
_DN_NUMBERS = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _pads(padding, in_hw, k_hw, strides):
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(in_hw, k_hw, strides, padding))
    return tuple(tuple(p) for p in padding)


def _plain_conv(x, w, strides, pads, lhs_dilation=(1, 1)):
    """A native NHWC/HWIO conv whose vmap over trials avoids grouped convolutions.

    ``vmap`` of a conv with per-trial weights becomes one conv with
    ``feature_group_count = T``, which XLA:CPU runs about 2x slower than T plain convs.
    The batching rule below folds the trial axis into the batch (shared weights) or the
    output channels (shared input), and otherwise emits one plain conv per trial.
    """

    @jax.custom_batching.custom_vmap
    def conv(x, w):
        return lax.conv_general_dilated(x, w, strides, pads, lhs_dilation=lhs_dilation,
                                        dimension_numbers=_DN)

    @conv.def_vmap
    def _rule(axis_size, in_batched, x, w):
        xb, wb = in_batched
        if xb and not wb:
            return _fold_batch(conv, x, w), True
        if wb and not xb:
            t, kh, kw, cin, cout = w.shape
            y = conv(x, w.transpose(1, 2, 3, 0, 4).reshape(kh, kw, cin, t * cout))
            return jnp.moveaxis(y.reshape(*y.shape[:3], t, cout), 3, 0), True
        return jnp.stack([conv(x[i], w[i]) for i in range(axis_size)]), True

    return conv(x, w)


def _fold_batch(conv, x, w):
    t, n = x.shape[:2]
    y = conv(x.reshape(t * n, *x.shape[2:]), w)
    return y.reshape(t, n, *y.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, pads):
    return _plain_conv(x, w, strides, pads)


def _conv_fwd(x, w, strides, pads):
    return _conv(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, res, g):
    x, w = res
    kh, kw, cin, _ = w.shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
    h, wd = x.shape[1], x.shape[2]
    ho, wo = g.shape[1], g.shape[2]
    # Rows/cols of the padded input that the last window does not reach.
    rh = h + pt + pb - kh - sh * (ho - 1)
    rw = wd + pl + pr - kw - sw * (wo - 1)
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = _plain_conv(g, w_t.astype(g.dtype), (1, 1),
                     ((kh - 1 - pt, kh - 1 - pb + rh), (kw - 1 - pl, kw - 1 - pr + rw)),
                     lhs_dilation=(sh, sw))
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    g2 = g.reshape(-1, g.shape[-1]).T  # (cout, N*Ho*Wo)
    taps = [g2 @ xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
            .reshape(-1, cin) for i in range(kh) for j in range(kw)]
    dw = jnp.stack(taps).reshape(kh, kw, -1, cin).transpose(0, 1, 3, 2)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
    """Drop-in for ``lax.conv_general_dilated`` (flax ``nn.Conv(conv_general_dilated=)``).

    Uses the loop-friendly VJP and the trial-folding vmap rule for plain NHWC/HWIO
    convolutions where :func:`conv_rule` says so (by default on CPU); anything else
    (dilations, groups, other layouts) goes to the native op.
    """
    plain = (_fold() and feature_group_count == 1 and not kwargs
             and lhs.ndim == 4 and dimension_numbers in (None, _DN, _DN_NUMBERS)
             and all(d == 1 for d in (lhs_dilation or (1,)))
             and all(d == 1 for d in (rhs_dilation or (1,))))
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    pads = _pads(padding, lhs.shape[1:3], rhs.shape[:2], strides)
    return _conv(lhs, rhs, strides, pads)


# flax's Conv with the loop-friendly gradient; every bdjax model builds its convs from it.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
