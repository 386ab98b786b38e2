"""LF (low-frequency) attack: the universal low-frequency trigger and its poisoning.

The LF trigger is a universal perturbation toward the target class, computed once
against a clean model and kept smooth by a Gaussian low-pass filter after every update:

- :func:`gaussian_lowpass`: the reference's separable Gaussian filter (``gauss_smooth``);
- :func:`deepfool_targeted`: targeted DeepFool for a batch, one compiled
  ``lax.while_loop`` with a per-image stop;
- :func:`lf_pattern`: the generator (``universal_perturbation``): passes over a few
  training images, each pass one compiled ``lax.scan``; returns the pattern in pixel
  units as it is added to uint8 images;
- :func:`apply_lf`: the poisoning, ``clip(x + pattern, 0, 255)`` truncated to uint8.

Everything runs in [0, 1] pixel space: bdjax models normalise inside ``apply``.

References:
  Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective",
  ICCV 2021; Moosavi-Dezfooli et al., "Universal adversarial perturbations", CVPR 2017
  (Algorithm 1); Moosavi-Dezfooli et al., "DeepFool", CVPR 2016 (Algorithm 2);
  METHODS.md "LF"; BackdoorBench ``resource/lowFrequency/`` and ``attack/lf.py``.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.errors import BdjaxError, check_range

_SIZE_DENOM = 5  # the reference's kernel spans 5 sigma (size_denom)


def _kernel_size(sigma: float) -> int:
    """Taps of the reference's kernel: ``5 * sigma``, which must be a whole number."""
    size = 5.0 * float(sigma)
    if not (math.isfinite(size) and size >= 1 and abs(size - round(size)) < 1e-6):
        raise BdjaxError(
            f"sigma {sigma!r} gives a kernel of {size:g} taps; accepted: sigma > 0 with "
            "5 * sigma a whole number (e.g. 6.0 -> 30 taps).")
    return int(round(size))


@functools.lru_cache(maxsize=16)
def gaussian_kernel(sigma: float) -> np.ndarray:
    """The reference's 1-D Gaussian taps (float32, sum 1).

    ``5 * sigma`` taps at pixel offsets ``j - (5 sigma - 1) / 2``, weight
    ``exp(-offset^2 / (2 sigma^2))``, normalised to sum 1. An even tap count (sigma 6:
    30 taps) has no centre tap, so the filter shifts the image by half a pixel.

    Args:
      sigma: standard deviation in pixels; ``5 * sigma`` must be a whole number.

    Returns:
      float32 array ``[5 * sigma]``.
    """
    size = _kernel_size(sigma)
    spread = np.float32(_SIZE_DENOM * sigma)  # the reference's sigma, in grid units
    grid = (np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2)) * _SIZE_DENOM
    taps = np.exp(-0.5 * (grid / spread) ** 2).astype(np.float32)
    return (taps / taps.sum()).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _filter_matrix(n: int, sigma: float) -> np.ndarray:
    """The 1-D filter as an ``[n, n]`` matrix: out[i] = sum_p m[i, p] x[p].

    The reference zero-pads ``size - 1 - size // 2`` before and ``size // 2`` after,
    then cross-correlates, so out[i] = sum_j k[j] x[i + j - before] with zeros outside.
    """
    k = gaussian_kernel(sigma)
    size = k.shape[0]
    before = size - 1 - size // 2
    m = np.zeros((n, n), np.float32)
    for i in range(n):
        for j in range(size):
            p = i + j - before
            if 0 <= p < n:
                m[i, p] = k[j]
    return m


def gaussian_lowpass(v, sigma: float = 6.0):
    """The reference's separable Gaussian low-pass filter (``gauss_smooth``).

    Rows first, then columns (the order of the reference's two depthwise convolutions),
    each channel apart, zero padding at the border (so the border darkens), output the
    same size as the input. Jittable; ``sigma`` is static.

    Args:
      v: float array ``[..., H, W, C]``.
      sigma: Gaussian standard deviation in pixels (default 6); ``5 * sigma`` taps.

    Returns:
      float32 array of ``v``'s shape.
    """
    v = jnp.asarray(v, jnp.float32)
    if v.ndim < 3:
        raise BdjaxError(f"v has shape {v.shape}; accepted: [..., H, W, C].")
    mh = jnp.asarray(_filter_matrix(v.shape[-3], float(sigma)))
    mw = jnp.asarray(_filter_matrix(v.shape[-2], float(sigma)))
    hi = jax.lax.Precision.HIGHEST  # no TF32 on GPUs: the pattern is a one-off
    out = jnp.einsum("ip,...pwc->...iwc", mh, v, precision=hi)
    return jnp.einsum("jw,...iwc->...ijc", mw, out, precision=hi)


def minmax_scale(v, scale: float = 0.2):
    """The reference's ``normalization``: ``(v - min) / (max - min) * scale`` over the
    whole array (all channels together). A constant ``v`` gives zeros (the reference
    divides by zero and returns NaN).

    Args:
      v: float array.
      scale: the maximum of the result.

    Returns:
      float32 array in [0, scale] with min 0 and max ``scale`` unless ``v`` is constant.
    """
    v = jnp.asarray(v, jnp.float32)
    lo, span = jnp.min(v), jnp.max(v) - jnp.min(v)
    safe = jnp.where(span > 0, span, 1.0)
    return jnp.where(span > 0, (v - lo) / safe * scale, jnp.zeros_like(v))


def deepfool_targeted(logits_fn: Callable[[jax.Array], jax.Array], x, target, *,
                      overshoot: float = 0.02, max_iter: int = 200):
    """Targeted DeepFool for a batch: a small ``r`` that sends each ``x + r`` to ``target``.

    Per image, with ``l`` its class at ``x`` and ``t`` the target, each step linearises
    ``f_t - f_l`` at the current point ``x + (1 + overshoot) r_tot`` and adds the step
    onto that boundary, ``|f_t - f_l| w / ||w||^2`` with ``w = grad(f_t - f_l)`` (a
    non-finite step adds zero); it stops once the current prediction is ``t`` or after
    ``max_iter`` steps. One gradient pass per step gives both the stop test and the
    step, so the loop runs at most ``max_iter + 1`` passes; finished images stay frozen.
    The model must be in eval mode so that images are independent.

    Args:
      logits_fn: maps a float batch ``[B, H, W, C]`` to logits ``[B, K]``.
      x: float images ``[B, H, W, C]`` (the space of ``logits_fn``; no clipping).
      target: the target class, scalar or ``[B]``.
      overshoot: ``r = (1 + overshoot) r_tot``.
      max_iter: the most steps per image.

    Returns:
      ``(r, info)``: ``r`` float32 ``[B, H, W, C]`` (``x + r`` is the adversarial image)
      and ``info`` = ``iterations`` (int32 ``[B]``, steps taken), ``label`` (class at
      ``x``), ``pred`` (class at ``x + r``), ``success`` (``pred == target``).
    """
    x = jnp.asarray(x, jnp.float32)
    b = x.shape[0]
    target = jnp.broadcast_to(jnp.asarray(target, jnp.int32), (b,))
    bcast = (b,) + (1,) * (x.ndim - 1)
    rows = jnp.arange(b)

    def margin(xx, label):
        logits = logits_fn(xx)
        f = logits[rows, target] - logits[rows, label]
        return jnp.sum(f), (f, logits)  # a sum: each image's gradient is its own

    grad = jax.value_and_grad(margin, has_aux=True)
    label0 = jnp.argmax(logits_fn(x), -1).astype(jnp.int32)

    def body(c):
        (_, (f, logits)), w = grad(x + (1.0 + overshoot) * c["r_tot"], label0)
        pred = jnp.argmax(logits, -1).astype(jnp.int32)
        stopped = c["stopped"] | (pred == target) | (c["iterations"] >= max_iter)
        wsq = jnp.sum(jnp.square(w.reshape(b, -1)), axis=1)
        step = (jnp.abs(f) / wsq).reshape(bcast) * w
        finite = jnp.all(jnp.isfinite(step.reshape(b, -1)), axis=1)
        move = ~stopped & finite
        r_tot = c["r_tot"] + jnp.where(move.reshape(bcast), step, 0.0)
        return dict(r_tot=r_tot, iterations=c["iterations"] + (~stopped).astype(jnp.int32),
                    stopped=stopped, pred=pred)

    c0 = dict(r_tot=jnp.zeros_like(x), iterations=jnp.zeros((b,), jnp.int32),
              stopped=jnp.zeros((b,), bool), pred=label0)
    # A pass where every image is stopped changes nothing; the loop then ends.
    c = jax.lax.while_loop(lambda c: ~jnp.all(c["stopped"]), body, c0)
    r = (1.0 + overshoot) * c["r_tot"]
    info = dict(iterations=c["iterations"], label=label0, pred=c["pred"],
                success=c["pred"] == target)
    return r, info


@functools.partial(jax.jit, static_argnames=("model", "max_iter", "sigma", "scale"))
def _lf_pass(model, state, v, xs, target, overshoot, *, max_iter: int, sigma: float,
             scale: float):
    """One pass of the generator over the images ``xs`` in order (one compiled scan)."""
    logits_fn = lambda z: model.apply(state, z)

    def one(v, x):
        x = x[None]
        same = jnp.argmax(logits_fn(x)[0]) == jnp.argmax(logits_fn(x + v)[0])

        def update(v):
            r, info = deepfool_targeted(logits_fn, x + v, target, overshoot=overshoot,
                                        max_iter=max_iter)
            ok = info["iterations"][0] < max_iter - 1  # the reference's convergence test
            new = minmax_scale(gaussian_lowpass(v + gaussian_lowpass(r[0], sigma), sigma),
                               scale)
            return jnp.where(ok, new, v), ok

        v, ok = jax.lax.cond(same, update, lambda v: (v, jnp.bool_(False)), v)
        return v, (same, ok)

    v, (same, ok) = jax.lax.scan(one, v, xs)
    return v, jnp.sum(same), jnp.sum(ok)


@functools.partial(jax.jit, static_argnames=("model",))
def _predict(model, state, x01, v):
    return jnp.argmax(model.apply(state, x01 + v), -1)


def _predictions(model, state, x01, v, chunk: int = 512) -> np.ndarray:
    return np.concatenate([np.asarray(_predict(model, state, x01[i:i + chunk], v))
                           for i in range(0, x01.shape[0], chunk)])


def _eval_indices(key, y: np.ndarray, per_class: int) -> np.ndarray:
    """Up to ``per_class`` random indices of every class present in ``y``."""
    perm = np.asarray(jax.random.permutation(key, y.shape[0]))
    picked = [perm[y[perm] == c][:per_class] for c in np.unique(y)]
    return np.sort(np.concatenate(picked))


def _validate(x_uint8, y, target_in, n_images, max_passes, fooling_rate, overshoot, max_iter,
              sigma, scale, patience, eval_per_class, x_eval, num_classes):
    if not isinstance(x_uint8, np.ndarray) or x_uint8.dtype != np.uint8 or x_uint8.ndim != 4:
        raise BdjaxError(f"x_uint8 has dtype {getattr(x_uint8, 'dtype', type(x_uint8))} and "
                         f"shape {getattr(x_uint8, 'shape', None)}; accepted: uint8 "
                         "[N, H, W, C].")
    if y.shape != (x_uint8.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise BdjaxError(f"y has shape {y.shape} and dtype {y.dtype}; accepted: int "
                         f"[{x_uint8.shape[0]}] (one label per image).")
    try:
        target = operator.index(target_in)
    except TypeError:
        target = None
    if target is None or not 0 <= target < num_classes:
        raise BdjaxError(f"target {target_in!r} is invalid; accepted: 0..{num_classes - 1}.")
    if not 1 <= n_images <= x_uint8.shape[0]:
        raise BdjaxError(f"n_images {n_images!r} is out of range; accepted: 1.."
                         f"{x_uint8.shape[0]} (the number of images given).")
    check_range("max_passes", max_passes, 1, 10_000)
    check_range("fooling_rate", fooling_rate, 0.0, 1.0)
    check_range("overshoot", overshoot, 0.0, 10.0)
    check_range("max_iter", max_iter, 1, 100_000)
    check_range("scale", scale, 0.0, 1.0, low_open=True)
    check_range("patience", patience, 0, 10_000)
    check_range("eval_per_class", eval_per_class, 1, 1_000_000)
    _kernel_size(sigma)
    if x_eval is not None and (not isinstance(x_eval, np.ndarray) or x_eval.dtype != np.uint8
                               or x_eval.shape[1:] != x_uint8.shape[1:]):
        raise BdjaxError(f"x_eval has dtype {getattr(x_eval, 'dtype', type(x_eval))} and "
                         f"shape {getattr(x_eval, 'shape', None)}; accepted: uint8 "
                         f"[M, {', '.join(map(str, x_uint8.shape[1:]))}].")


def lf_pattern(model, state, x_uint8, y, target, key, *, n_images: int = 100,
               max_passes: int = 50, fooling_rate: float = 0.2, overshoot: float = 0.02,
               max_iter: int = 200, sigma: float = 6.0, scale: float = 0.2,
               patience: int = 5, plateau: float = 0.01, eval_per_class: int = 10,
               x_eval: np.ndarray | None = None, quantize: bool = True,
               return_info: bool = False):
    """The LF trigger: a universal low-frequency perturbation toward ``target``.

    Draws ``n_images`` images (any class) with ``key``. Starting from ``v = 0``, each
    pass shuffles them (``fold_in(key, pass)``) and visits them in order; for each
    image ``x`` predicted at ``x + v`` as at ``x`` (not yet fooled), targeted
    DeepFool from ``x + v`` gives ``r``, and if it took fewer than ``max_iter - 1``
    steps, ``v <- minmax(G(v + G(r)))`` scaled to [0, ``scale``], with ``G`` the
    Gaussian low-pass filter. After each pass the fooling rate is the share of the
    evaluation images whose prediction changes when ``v`` is added (in [0, 1] space,
    unclipped). The passes stop when it reaches ``fooling_rate``, after ``max_passes``
    passes, or when the last ``patience`` rates lie within ``plateau`` of each other.
    Each pass is one compiled call. Deterministic for a key.

    Args:
      model, state: the CLEAN classifier (a hashable bdjax ``Model`` and its state).
      x_uint8: training images uint8 ``[N, H, W, C]``.
      y: their labels ``[N]`` (the default evaluation set takes ``eval_per_class`` of
        each class).
      target: the target class.
      key: a ``jax.random`` key.
      n_images: images the perturbation is built on (default 100).
      max_passes: the most passes (default 50).
      fooling_rate: stop once the fooling rate reaches this (default 0.2, the
        reference's ``1 - delta``).
      overshoot, max_iter: DeepFool's overshoot (0.02) and step limit (200).
      sigma: the low-pass filter's standard deviation in pixels (6; ``5 sigma`` taps).
      scale: the pattern's maximum in [0, 1] units (0.2, i.e. 51 grey levels).
      patience, plateau: stop when the last ``patience`` fooling rates span less than
        ``plateau`` (the reference: 5 and 0.01); ``patience=0`` turns this off.
      eval_per_class: evaluation images per class drawn from ``x_uint8`` when
        ``x_eval`` is None (the reference intends 10 test images per class).
      x_eval: optional uint8 images for the fooling rate instead.
      quantize: truncate ``255 v`` to whole grey levels as the reference's stored
        uint8 patterns are (``astype(uint8)``); False returns ``255 v`` unrounded.
      return_info: also return a dict of per-pass records.

    Returns:
      float32 ``[H, W, C]`` pattern in pixel units in [0, 255 * scale] (min 0, max
      ``floor(255 * scale)`` when quantised), the amount :func:`apply_lf` adds to uint8
      images; with ``return_info``, ``(pattern, info)`` where ``info`` has
      ``fooling_rates``, ``unfooled`` and ``updates`` per pass, ``passes``,
      ``v`` (the float pattern in [0, scale]) and ``images`` (indices drawn).

    References:
      Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective",
      ICCV 2021 (Sec. 5, the smooth trigger); Moosavi-Dezfooli et al., "Universal
      adversarial perturbations", CVPR 2017 (Algorithm 1).

    Differences from the reference:
      - The reference runs DeepFool on [0, 1] images fed straight to a model trained
        on normalised ones, and measures the fooling rate by adding ``v`` to normalised
        images; bdjax models normalise inside, so both run on [0, 1] images as meant.
      - The reference's evaluation set is meant to be 10 test images per class, but
        ``np.array(generator)`` makes a 0-d label array and the subset is ONE image, so
        its fooling rate is 0 or 1; bdjax takes ``eval_per_class`` per class (of
        ``x_uint8``, or ``x_eval`` when given: the caller may pass test images).
      - A constant ``v`` (e.g. the first visited image already predicted as the
        target: DeepFool returns 0) is min-max scaled to zeros; the reference divides
        by zero and ``v`` becomes NaN for the rest of the run.
      - Shuffling and the image draw use ``key`` instead of numpy's global RNG.
      - The reference's ``generate_pattern.py`` saves ``clip(255 v + 127.5)`` (a
        mid-grey picture for viewing), which is not what its attack adds; the shipped
        ``*_0_255.npy`` patterns are either ``255 v`` truncated to uint8 (what bdjax
        returns) or the raw float ``v`` in [0, 0.2], which, added to uint8 images and
        truncated, changes no pixel (no trigger at all).
      - Followed from the code although METHODS.md is silent: the plateau stop, the
        "fooled" test (prediction changed, not reached the target), the convergence
        test ``iterations < max_iter - 1``, the update (smooth + min-max) also when
        DeepFool returns zero, images of every class (the target's too), min-max over
        all channels together, the 5-sigma even-sized kernel with its half-pixel shift
        and zero border.
    """
    y = np.asarray(y)
    _validate(x_uint8, y, target, n_images, max_passes, fooling_rate, overshoot, max_iter,
              sigma, scale, patience, eval_per_class, x_eval, model.num_classes)
    k_draw, k_eval, k_shuffle = jax.random.split(key, 3)
    images = np.sort(np.asarray(jax.random.choice(k_draw, x_uint8.shape[0], (n_images,),
                                                  replace=False)))
    xs = jnp.asarray(x_uint8[images], jnp.float32) / 255.0
    if x_eval is None:
        x_eval = x_uint8[_eval_indices(k_eval, y, int(eval_per_class))]
    x_eval = jnp.asarray(x_eval, jnp.float32) / 255.0
    v = jnp.zeros(x_uint8.shape[1:], jnp.float32)
    clean = _predictions(model, state, x_eval, jnp.zeros_like(v))
    rates, unfooled, updates = [], [], []
    for p in range(int(max_passes)):
        order = jax.random.permutation(jax.random.fold_in(k_shuffle, p), n_images)
        v, n_same, n_ok = _lf_pass(model, state, v, xs[order], jnp.int32(target),
                                   jnp.float32(overshoot), max_iter=int(max_iter),
                                   sigma=float(sigma), scale=float(scale))
        rate = float(np.mean(_predictions(model, state, x_eval, v) != clean))
        rates.append(rate)
        unfooled.append(int(n_same))
        updates.append(int(n_ok))
        if rate >= fooling_rate:
            break
        last = rates[-patience:] if patience else []
        if patience and len(last) == patience and max(last) - min(last) < plateau:
            break
    v = np.asarray(v, np.float32)
    pattern = v * np.float32(255.0)
    if quantize:
        pattern = np.floor(pattern)  # astype(uint8) of values >= 0
    pattern = pattern.astype(np.float32)
    if not return_info:
        return pattern
    info = dict(fooling_rates=rates, unfooled=unfooled, updates=updates, passes=len(rates),
                v=v, images=images)
    return pattern, info


def apply_lf(images_uint8, pattern):
    """The LF poisoning: ``clip(x + pattern, 0, 255)`` truncated to uint8.

    Matches the reference's float64 ``np.clip(img + trigger, 0, 255).astype(uint8)``
    exactly for any float32 pattern, computed in integers as
    ``clip(x + floor(pattern), 0, 255)`` (equal, since ``x`` is whole). Jittable.

    Args:
      images_uint8: uint8 ``[..., H, W, C]``.
      pattern: float ``[H, W, C]`` (or anything that broadcasts), pixel units, e.g. from
        :func:`lf_pattern`.

    Returns:
      uint8 array of the images' shape.
    """
    dtype = getattr(images_uint8, "dtype", None)
    if dtype != jnp.uint8:
        raise BdjaxError(f"images have dtype {dtype}; accepted: uint8.")
    pattern = jnp.asarray(pattern, jnp.float32)
    try:
        np.broadcast_shapes(pattern.shape, images_uint8.shape)
    except ValueError:
        raise BdjaxError(f"pattern has shape {pattern.shape}; accepted: one that broadcasts "
                         f"to the images' {tuple(images_uint8.shape)}, e.g. [H, W, C].") from None
    # Beyond +-256 every pixel clips the same way; the bound keeps int32 from overflowing.
    add = jnp.floor(jnp.clip(pattern, -256.0, 256.0)).astype(jnp.int32)
    return jnp.clip(images_uint8.astype(jnp.int32) + add, 0, 255).astype(jnp.uint8)
