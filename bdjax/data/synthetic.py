"""The embedded synthetic dataset: bdjax's default, generated from a seed in seconds.

Each image is 32x32x3 uint8 and shows one foreground shape whose *form* is the class:

  0 disc, 1 square, 2 triangle, 3 ring, 4 plus, 5 diamond, 6 two bars, 7 frame,
  8 crescent, 9 hourglass.

Everything else is nuisance that a classifier must learn to ignore, so it has to learn
spatial features rather than colour statistics:

- position (centre anywhere with the shape mostly inside the frame), size (radius 7-11
  px), a small rotation (+-20 degrees, small enough that a plus never becomes an x),
  aspect ratio (0.8-1.25);
- foreground colour, drawn independently of the class and at a guaranteed distance from
  the background colour, modulated by a random stripe texture (frequency, angle, phase);
- background: a random colour gradient plus low-frequency blobs and fine grain noise;
- clutter: 2-4 small distractor blobs and a thin line of random colours that may touch
  or overlap the shape;
- per-pixel Gaussian noise.

Generation is pure numpy, vectorised over images, and deterministic in the seed (the
same seed gives the same bytes on every machine). The test split uses an independent
stream of the same generator.
"""

from __future__ import annotations

import numpy as np

from bdjax.data.dataset import Dataset

CLASS_NAMES = ("disc", "square", "triangle", "ring", "plus", "diamond", "bars", "frame",
               "crescent", "hourglass")
SIZE = 32


_FORMS = {  # signed distance-like fields in unit coordinates: negative inside the shape
    0: lambda u, v, r, au, av: r - 0.95,
    1: lambda u, v, r, au, av: np.maximum(au, av) - 0.8,
    2: lambda u, v, r, au, av: np.maximum(-v - 0.7, au * 1.6 + v * 0.9 - 0.75),
    3: lambda u, v, r, au, av: np.abs(r - 0.75) - 0.22,
    4: lambda u, v, r, au, av: np.minimum(np.maximum(au - 0.28, av - 0.95),
                                          np.maximum(av - 0.28, au - 0.95)),
    5: lambda u, v, r, au, av: (au + av) - 1.05,
    6: lambda u, v, r, au, av: np.maximum(np.abs(av - 0.55) - 0.22, au - 0.95),
    7: lambda u, v, r, au, av: np.maximum(np.maximum(au, av) - 0.9, 0.55 - np.maximum(au, av)),
    8: lambda u, v, r, au, av: np.maximum(r - 0.95, 0.7 - np.sqrt((u - 0.45) ** 2 + v * v)),
    9: lambda u, v, r, au, av: np.maximum(au - av * 0.9 - 0.08, av - 0.9),
}


def _shape_masks(u: np.ndarray, v: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Soft masks of each image's class shape in its own unit coordinates (u, v)."""
    sdf = np.empty_like(u)
    for c, form in _FORMS.items():
        sel = labels == c
        if sel.any():
            us, vs = u[sel], v[sel]
            sdf[sel] = form(us, vs, np.sqrt(us * us + vs * vs), np.abs(us), np.abs(vs))
    # A soft edge (about one pixel wide) keeps the images free of hard aliasing.
    return np.clip(0.5 - sdf * 6.0, 0.0, 1.0)


def _pick_foreground(rng, n: int, background: np.ndarray) -> np.ndarray:
    """Foreground colours at least 0.35 (L2, [0,1] units) from the background colour."""
    fg = rng.uniform(0, 1, (n, 3))
    for _ in range(20):
        close = np.linalg.norm(fg - background, axis=1) < 0.35
        if not close.any():
            break
        fg[close] = rng.uniform(0, 1, (int(close.sum()), 3))
    close = np.linalg.norm(fg - background, axis=1) < 0.35
    fg[close] = 1.0 - background[close]  # the complement is always far enough
    return fg


def _blobs(rng, n: int, count: int, yy, xx, radius: tuple[float, float]) -> np.ndarray:
    """Masks [n, count, H, W] of small soft discs at random places."""
    cy = rng.uniform(0, SIZE, (n, count, 1, 1))
    cx = rng.uniform(0, SIZE, (n, count, 1, 1))
    rad = rng.uniform(*radius, (n, count, 1, 1))
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return np.clip(rad - d + 0.5, 0.0, 1.0)


def _render(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    n = len(labels)
    yy, xx = np.meshgrid(np.arange(SIZE, dtype=np.float32) + 0.5,
                         np.arange(SIZE, dtype=np.float32) + 0.5, indexing="ij")

    # Background: gradient between two colours, low-frequency blobs, fine grain.
    c0 = rng.uniform(0, 1, (n, 1, 1, 3))
    c1 = np.clip(c0 + rng.normal(0, 0.25, (n, 1, 1, 3)), 0, 1)
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    t = ((xx - 16) * np.cos(angle) + (yy - 16) * np.sin(angle)) / 45 + 0.5
    img = c0 + (c1 - c0) * t[..., None]
    soft = _blobs(rng, n, 3, yy, xx, (5, 10)).max(axis=1) * rng.uniform(-0.15, 0.15, (n, 1, 1))
    img = img + soft[..., None]
    background = img.mean(axis=(1, 2))

    # Foreground: the class shape, placed, scaled, rotated, stretched, textured.
    radius = rng.uniform(7, 11, (n, 1, 1))
    cy = rng.uniform(radius[:, 0, 0] + 1, SIZE - radius[:, 0, 0] - 1)[:, None, None]
    cx = rng.uniform(radius[:, 0, 0] + 1, SIZE - radius[:, 0, 0] - 1)[:, None, None]
    theta = rng.uniform(-np.pi / 9, np.pi / 9, (n, 1, 1))
    aspect = np.exp(rng.uniform(np.log(0.8), np.log(1.25), (n, 1, 1)))
    dy, dx = (yy - cy) / radius, (xx - cx) / radius
    u = (dx * np.cos(theta) + dy * np.sin(theta)) * aspect
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / aspect
    mask = _shape_masks(u, v, labels)[..., None]
    fg = _pick_foreground(rng, n, background)[:, None, None, :]
    freq = rng.uniform(0.3, 1.2, (n, 1, 1))
    phi = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    tex_angle = rng.uniform(0, np.pi, (n, 1, 1))
    stripes = np.sin(freq * (xx * np.cos(tex_angle) + yy * np.sin(tex_angle)) + phi)
    fg = np.clip(fg * (1 + rng.uniform(0, 0.25, (n, 1, 1, 1)) * stripes[..., None]), 0, 1)
    img = img * (1 - mask) + fg * mask

    # Clutter: small distractor blobs and one thin line, random colours.
    count = 4
    blobs = _blobs(rng, n, count, yy, xx, (1.0, 2.2))
    keep = rng.uniform(0, 1, (n, count, 1, 1)) < 0.75
    blob_colour = rng.uniform(0, 1, (n, count, 1, 1, 3))
    for k in range(count):
        m = (blobs[:, k] * keep[:, k])[..., None]
        img = img * (1 - m) + blob_colour[:, k] * m
    ly0, lx0 = rng.uniform(0, SIZE, (2, n, 1, 1))
    la = rng.uniform(0, np.pi, (n, 1, 1))
    dist = np.abs((xx - lx0) * np.sin(la) - (yy - ly0) * np.cos(la))
    along = np.abs((xx - lx0) * np.cos(la) + (yy - ly0) * np.sin(la))
    line = (np.clip(1.0 - dist, 0, 1) * (along < rng.uniform(4, 10, (n, 1, 1))))[..., None]
    img = img * (1 - line) + rng.uniform(0, 1, (n, 1, 1, 3)) * line

    img = img + rng.normal(0, 0.03, img.shape)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def generate(n: int, seed: int, num_classes: int = 10, chunk: int = 2048):
    """``n`` images and balanced, shuffled labels from ``seed``.

    Returns:
      (images uint8[n, 32, 32, 3], labels int32[n]).
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for start in range(0, n, chunk):
        # One child stream per chunk keeps memory flat and output independent of chunk.
        child = np.random.default_rng([seed, start // chunk])
        images[start:start + chunk] = _render(child, labels[start:start + chunk])
    return images, labels


def load_synthetic(seed: int = 0, n_train: int = 10_000, n_test: int = 2_000) -> Dataset:
    """The embedded synthetic dataset (10 classes of shapes; see the module docstring).

    Args:
      seed: generator seed; the dataset is a pure function of (seed, n_train, n_test).
      n_train, n_test: split sizes (defaults: 10,000 and 2,000).
    """
    x_train, y_train = generate(n_train, seed * 2)
    x_test, y_test = generate(n_test, seed * 2 + 1)
    # Normalisation statistics of the generator (measured on 50k images, seed 0).
    return Dataset(
        name="synthetic", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.29, 0.29, 0.29),
        flip=False,  # REFERENCE.md: horizontal flips are a CIFAR convention only
        class_names=CLASS_NAMES,
        info={"generator": "bdjax.data.synthetic", "seed": seed, "n_train": n_train,
              "n_test": n_test})
