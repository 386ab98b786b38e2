"""A small VGG-style CNN for CPU work: four conv-BN-ReLU stages, ~0.1M parameters."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bdjax.models.layers import Conv


def max_pool2(x):
    """2x2/2 max-pool by reshape; same values as ``nn.max_pool`` but its gradient avoids
    XLA's select-and-scatter, which is the slowest op of this model on CPU (147 -> 93 ms
    per 128-image step on 2 cores)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SmallCNN(nn.Module):
    """conv(16)-pool-conv(32)-pool-conv(64)-pool-conv(128)-GAP-linear.

    Layer names are stable (``conv1``..``conv4``, ``bn1``..``bn4``, ``head``) so that
    defenses can address them.
    """

    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64, 128)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate(self.widths, start=1):
            x = Conv(width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                        name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                             name=f"bn{i}")(x)
            x = nn.relu(x)
            if i < len(self.widths):
                x = max_pool2(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
