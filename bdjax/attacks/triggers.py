"""Trigger functions: ``stamp(images_uint8[N, H, W, C], key) -> images_uint8``.

Each is pure, jittable and vmappable; ``key`` is unused by the fixed triggers here but
kept in the signature so sample-specific triggers fit the same contract. Values follow
REFERENCE.md ("Attack training"). Mixing triggers compute in float32 and round to the
nearest integer before clipping to [0, 255] (the reference truncates, which turns a
float error of -1e-14 into a whole grey level).
"""

from __future__ import annotations

import functools

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
