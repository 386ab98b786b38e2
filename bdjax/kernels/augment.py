"""On-device training augmentation for uint8 batches (REFERENCE.md, data conventions).

Random crop after zero-padding by ``pad`` pixels (torchvision ``RandomCrop(padding=4)``)
and, where the dataset allows it, a horizontal flip; both per sample from ``key``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def crop_flip(images: jax.Array, key: jax.Array, *, pad: int = 4, flip: bool = True):
    """Augmented copies of ``images`` [N, H, W, C] (any dtype; returned in that dtype)."""
    n, h, w, _ = images.shape
    k_off, k_flip = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(k_off, (n, 2), 0, 2 * pad + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    out = jax.vmap(crop)(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
        out = jnp.where(do_flip, out[:, :, ::-1, :], out)
    return out
