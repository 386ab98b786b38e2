"""On-device training augmentation for image batches (REFERENCE.md, data conventions).

:func:`crop_flip` is the standard one: random crop after zero-padding by ``pad`` pixels
(torchvision ``RandomCrop(padding=4)``) and, where the dataset allows it, a horizontal
flip. :func:`post_augment` is the extra augmentation the training-control attacks (WaNet,
BPP, Input-aware) apply after poisoning a batch: crop with padding 5 with probability
0.8, rotation within +-10 degrees with probability 0.5, flip. All per sample from ``key``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _crop(images, offsets, pad: int):
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def _flip(images, key, p: float = 0.5):
    do_flip = jax.random.bernoulli(key, p, (images.shape[0], 1, 1, 1))
    return jnp.where(do_flip, images[:, :, ::-1, :], images)


def crop_flip(images: jax.Array, key: jax.Array, *, pad: int = 4, flip: bool = True):
    """Augmented copies of ``images`` [N, H, W, C] (any dtype; returned in that dtype)."""
    k_off, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_off, (images.shape[0], 2), 0, 2 * pad + 1)
    out = _crop(images, offsets, pad)
    return _flip(out, k_flip) if flip else out


def rotate(images, angles):
    """Each image rotated by its angle (degrees, counter-clockwise) about the image
    centre, nearest-neighbour, zeros where the source falls outside (torchvision's
    ``RandomRotation`` defaults)."""
    n, h, w, _ = images.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy, xx = jnp.meshgrid(jnp.arange(h) - cy, jnp.arange(w) - cx, indexing="ij")

    def one(img, deg):
        t = jnp.deg2rad(deg)
        # output (x, y) comes from the source rotated back by -t (y grows downwards)
        sx = jnp.cos(t) * xx - jnp.sin(t) * yy + cx
        sy = jnp.sin(t) * xx + jnp.cos(t) * yy + cy
        ix, iy = jnp.round(sx).astype(jnp.int32), jnp.round(sy).astype(jnp.int32)
        inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        out = img[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
        return jnp.where(inside[..., None], out, jnp.zeros((), img.dtype))

    return jax.vmap(one)(images, angles)


def post_augment(images: jax.Array, key: jax.Array, *, pad: int = 5, p_crop: float = 0.8,
                 degrees: float = 10.0, p_rotate: float = 0.5, flip: bool = True):
    """WaNet's ``PostTensorTransform``: crop (padding ``pad``) with probability
    ``p_crop``, rotation uniform in +-``degrees`` with probability ``p_rotate``, then a
    horizontal flip with probability 0.5 where ``flip``; each drawn per image."""
    n = images.shape[0]
    k_do_crop, k_off, k_do_rot, k_deg, k_flip = jax.random.split(key, 5)
    offsets = jax.random.randint(k_off, (n, 2), 0, 2 * pad + 1)
    offsets = jnp.where(jax.random.bernoulli(k_do_crop, p_crop, (n, 1)), offsets, pad)
    out = _crop(images, offsets, pad)
    angles = jax.random.uniform(k_deg, (n,), minval=-degrees, maxval=degrees)
    angles = jnp.where(jax.random.bernoulli(k_do_rot, p_rotate, (n,)), angles, 0.0)
    out = rotate(out, angles)
    return _flip(out, k_flip) if flip else out
