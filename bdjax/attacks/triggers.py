"""Trigger functions: ``stamp(images_uint8[N, H, W, C], key) -> images_uint8``.

Each is pure, jittable and vmappable; ``key`` is unused by the fixed triggers here but
kept in the signature so sample-specific triggers fit the same contract. Values follow
REFERENCE.md ("Attack training"). Mixing triggers compute in float32 and round to the
nearest integer before clipping to [0, 255] (the reference truncates, which turns a
float error of -1e-14 into a whole grey level).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def badnets(images, key=None, *, size: int | None = None, value: int = 255):
    """BadNets: a ``size`` x ``size`` square of ``value`` in the bottom-right corner.

    At 32x32 the square covers rows/cols 29-31; it scales with the image (6x6 at 64x64).

    References: Gu et al., "BadNets", 2017; REFERENCE.md BadNets row.
    """
    images = jnp.asarray(images)
    h, w = images.shape[-3], images.shape[-2]
    size = size or max(1, 3 * h // 32)
    return images.at[..., h - size:, w - size:, :].set(jnp.uint8(value))


@functools.lru_cache(maxsize=8)
def blend_image(h: int, w: int, c: int = 3) -> np.ndarray:
    """The fixed Blended trigger image that bdjax makes itself (uint8 [h, w, c]).

    A smooth, colourful "natural-looking" picture: a sum of a few random plane waves and
    radial blobs per channel, from a fixed seed, so every user gets the same trigger
    without downloading anything.
    """
    rng = np.random.default_rng(20240229)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.zeros((h, w, c))
    for ch in range(c):
        for _ in range(4):
            fy, fx = rng.uniform(-3, 3, 2)
            img[..., ch] += rng.uniform(0.5, 1) * np.sin(2 * np.pi * (fy * yy + fx * xx)
                                                         + rng.uniform(0, 2 * np.pi))
        for _ in range(3):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
            img[..., ch] += 1.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img -= img.min(axis=(0, 1))
    img /= img.max(axis=(0, 1))
    return np.round(img * 255).astype(np.uint8)


def blended(images, key=None, *, alpha: float = 0.2, image: str | None = None,
            image_sha256: str | None = None):
    """Blended: x' = (1 - alpha) x + alpha t with a fixed image t.

    ``t`` is bdjax's own image (:func:`blend_image`) unless ``image`` names an image file,
    which is read and resized to the input size with bilinear filtering as the
    reference does (:func:`bdjax.attacks.images.load_trigger_image`); ``image_sha256`` is
    the file's checksum, checked when the attack is built (``bdjax.attacks.get``).

    The reference (BackdoorBench) blends a bright cartoon picture with sharp outlines,
    ``resource/blended/hello_kitty.jpeg``; bdjax's own image is smooth and low-frequency,
    so Blended numbers are comparable only with the same image (``--param image=PATH``).
    Both images are asymmetric: with horizontal-flip augmentation (CIFAR-10) the model
    learns the trigger and its mirror image, two triggers.

    References: Chen et al., "Targeted backdoor attacks ... data poisoning", 2017.
    """
    h, w, c = images.shape[-3:]
    if image is None:
        picture = blend_image(h, w, c)
    else:
        from bdjax.attacks.images import load_trigger_image

        picture = load_trigger_image(image, h, w, c)
    t = jnp.asarray(picture, jnp.float32)
    mixed = (1.0 - alpha) * images.astype(jnp.float32) + alpha * t
    return jnp.clip(jnp.round(mixed), 0, 255).astype(jnp.uint8)


@functools.lru_cache(maxsize=8)
def sig_pattern(w: int, delta: float, freq: float) -> np.ndarray:
    """SIG's integer signal per column: rint(delta * sin(2 pi j freq / W)), int32 [W]."""
    j = np.arange(w)
    return np.rint(delta * np.sin(2 * np.pi * j * freq / w)).astype(np.int32)


def sig(images, key=None, *, delta: float = 40.0, freq: float = 6.0):
    """SIG: a horizontal sinusoid added to every row, clipped to [0, 255] (clean-label).

    References: Barni et al., "A new backdoor attack in CNNs by training set corruption
    without label poisoning", 2019.
    """
    w = images.shape[-2]
    v = jnp.asarray(sig_pattern(w, float(delta), float(freq)))[:, None]
    return jnp.clip(images.astype(jnp.int32) + v, 0, 255).astype(jnp.uint8)


def quantise(x, squeeze: int):
    """BPP's colour-depth squeeze of float pixel values in [0, 255]:
    ``round(x / 255 * (n - 1)) / (n - 1) * 255`` (no rounding to integers)."""
    return jnp.round(x / 255.0 * (squeeze - 1)) / (squeeze - 1) * 255.0


def _dither_one(img, squeeze: int):
    """Floyd-Steinberg error diffusion of one float image [H, W, C] (7/16 right, 3/16
    down-left, 5/16 down, 1/16 down-right), in raster order as the reference does."""
    h, w, c = img.shape
    buf = jnp.pad(img, ((0, 1), (1, 1), (0, 0)))  # one spare row below, one column each side

    def step(i, buf):
        y, x = i // w, i % w + 1
        old = buf[y, x]
        new = quantise(old, squeeze)
        err = old - new
        buf = buf.at[y, x].set(new)
        # the reference drops the error that would fall outside the image
        right = jnp.where(x < w, 7 / 16, 0.0)
        down = jnp.where(y + 1 < h, 1.0, 0.0)
        buf = buf.at[y, x + 1].add(err * right)
        buf = buf.at[y + 1, x + 1].add(err * (1 / 16) * down * (x < w))
        buf = buf.at[y + 1, x].add(err * (5 / 16) * down)
        buf = buf.at[y + 1, x - 1].add(err * (3 / 16) * down * (x > 1))
        return buf

    return jax.lax.fori_loop(0, h * w, step, buf)[:h, 1:w + 1]


def bpp(images, key=None, *, squeeze: int = 8, dithering: bool = False,
        neg_ratio: float = 0.1):
    """BPP: every channel squeezed to ``squeeze`` levels (8: 0, 36, 73, 109, 146, 182,
    219, 255 after rounding), optionally with Floyd-Steinberg dithering.

    References: Wang et al., "BppAttack: Stealthy and Efficient Trojan Attacks against
    Deep Neural Networks via Image Quantization and Contrastive Adversarial Learning",
    CVPR 2022; METHODS.md "BPP". As a static trigger this is the test-time stamp; the
    training is the per-batch poisoning of :mod:`bdjax.attacks.control`, where
    ``neg_ratio`` (the share of negative samples a batch) belongs.
    """
    x = images.astype(jnp.float32)
    out = jax.vmap(lambda im: _dither_one(im, squeeze))(x) if dithering else quantise(x, squeeze)
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


def wanet(images, key=None, *, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0,
          cross_ratio: float = 2.0, grid_seed: int = 0):
    """WaNet: the image sampled at the fixed warping grid (:mod:`bdjax.attacks.warp`),
    rounded to integers. ``cross_ratio`` belongs to the training (noise-mode samples)
    and does not change the stamp.

    References: Nguyen & Tran, "WaNet", ICLR 2021; METHODS.md "WaNet".
    """
    from bdjax.attacks import warp

    h, w = images.shape[-3], images.shape[-2]
    grid = jnp.asarray(warp.warp_grid(int(grid_seed), int(k), float(s), float(grid_rescale),
                                      h, w))
    out = warp.grid_sample(images.astype(jnp.float32), grid)
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
