"""WaNet's warping field and PyTorch's ``grid_sample`` (bilinear, ``align_corners=True``).

The warp is a smooth random displacement field: noise U[-1, 1] of shape (2, k, k),
divided by its mean absolute value, upsampled bicubically to H x W (PyTorch's
``upsample(mode="bicubic", align_corners=True)``: cubic convolution with A = -0.75,
border indices clamped), then ``grid = clamp((identity + s * noise / H) * rescale, -1, 1)``
where ``identity`` holds each pixel's own (x, y) in [-1, 1]. Sampling the image at the
grid moves every pixel by a fraction of a pixel: the trigger is invisible but learnable.

The noise comes from ``grid_seed`` through ``numpy.random.default_rng``, so the same seed
gives the same field on every machine (the reference draws it from torch's global RNG).

References: Nguyen & Tran, "WaNet -- Imperceptible Warping-based Backdoor Attack",
ICLR 2021; METHODS.md "WaNet".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fraction t."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of PyTorch's 1-D bicubic upsampling with align_corners=True."""
    m = np.zeros((n_out, n_in))
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for i in range(n_out):
        src = i * scale
        base = int(np.floor(src))
        w = _cubic_weights(np.asarray(src - base))
        for tap, wt in zip(range(base - 1, base + 3), w):
            m[i, min(max(tap, 0), n_in - 1)] += wt
    return m


def identity_grid(h: int, w: int) -> np.ndarray:
    """[h, w, 2] grid of each pixel's (x, y) in [-1, 1] (``grid_sample``'s convention)."""
    ys, xs = np.linspace(-1, 1, h), np.linspace(-1, 1, w)
    return np.stack(np.meshgrid(xs, ys, indexing="xy"), -1)


@functools.lru_cache(maxsize=16)
def noise_field(grid_seed: int, k: int, h: int, w: int) -> np.ndarray:
    """WaNet's upsampled noise, float64 [h, w, 2] (x and y displacement, before ``s / H``)."""
    ins = np.random.default_rng(grid_seed).uniform(-1, 1, (2, k, k))
    ins = ins / np.mean(np.abs(ins))
    up = np.einsum("hi,cij,wj->hwc", bicubic_matrix(k, h), ins, bicubic_matrix(k, w))
    return up


@functools.lru_cache(maxsize=16)
def warp_grid(grid_seed: int, k: int, s: float, grid_rescale: float, h: int,
              w: int) -> np.ndarray:
    """The backdoor's sampling grid, float32 [h, w, 2] in [-1, 1]."""
    grid = (identity_grid(h, w) + s * noise_field(grid_seed, k, h, w) / h) * grid_rescale
    return np.clip(grid, -1, 1).astype(np.float32)


def grid_sample(images, grid):
    """Bilinear sampling of float images [N, H, W, C] at ``grid`` ([H, W, 2] shared or
    [N, H, W, 2] per image, (x, y) in [-1, 1]) with align_corners=True and zeros outside,
    as ``torch.nn.functional.grid_sample`` (for grids inside [-1, 1] no zero is read)."""
    n, h, w, _ = images.shape
    grid = jnp.broadcast_to(grid, (n, *grid.shape[-3:]))
    x = (grid[..., 0] + 1) * (w - 1) / 2
    y = (grid[..., 1] + 1) * (h - 1) / 2
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]

    def tap(img, yy, xx):
        inside = (xx >= 0) & (xx <= w - 1) & (yy >= 0) & (yy <= h - 1)
        yi = jnp.clip(yy, 0, h - 1).astype(jnp.int32)
        xi = jnp.clip(xx, 0, w - 1).astype(jnp.int32)
        return img[yi, xi] * inside[..., None]

    def one(img, x0, y0, fx, fy):
        return ((1 - fy) * ((1 - fx) * tap(img, y0, x0) + fx * tap(img, y0, x0 + 1))
                + fy * ((1 - fx) * tap(img, y0 + 1, x0) + fx * tap(img, y0 + 1, x0 + 1)))

    return jax.vmap(one)(images, x0, y0, fx, fy)


def noisy_grids(key, grid, n: int):
    """WaNet's noise mode: ``n`` grids ``clamp(grid + U[-1, 1] / H, -1, 1)`` per pixel."""
    h = grid.shape[0]
    noise = jax.random.uniform(key, (n, *grid.shape), minval=-1.0, maxval=1.0)
    return jnp.clip(grid[None] + noise / h, -1, 1)


__all__ = ["bicubic_matrix", "grid_sample", "identity_grid", "noise_field", "noisy_grids",
           "warp_grid"]
