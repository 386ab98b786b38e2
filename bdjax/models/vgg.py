"""VGG19-BN in torchvision's layout (REFERENCE.md, "Models").

Convs with bias, BN, ReLU, max-pools; at 32x32 the features are 512x1x1 and torchvision's
adaptive 7x7 average pool replicates them to 7x7, so the classifier is
25088-4096-4096-C with ReLU and dropout 0.5. 139,622,218 trainable parameters for C = 10.
Weights start as torchvision's VGG (``bdjax.models.inits``): conv kernels kaiming-normal
(fan_out, relu), linear kernels N(0, 0.01), zero biases, BN gamma 1, beta 0.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bdjax.models.inits import kaiming_fan_out, linear_normal
from bdjax.models.layers import Conv

VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def adaptive_avg_pool(x, out: int):
    """torchvision's AdaptiveAvgPool2d for NHWC inputs (exact bin edges)."""
    n, h, w, c = x.shape
    if h == out and w == out:
        return x
    rows = []
    for i in range(out):
        h0, h1 = (i * h) // out, -(-((i + 1) * h) // out)
        cols = []
        for j in range(out):
            w0, w1 = (j * w) // out, -(-((j + 1) * w) // out)
            cols.append(jnp.mean(x[:, h0:h1, w0:w1, :], axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


class VGG(nn.Module):
    num_classes: int = 10
    layout: tuple = VGG19
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        i = 0
        for v in self.layout:
            if v == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = Conv(v, (3, 3), padding=1, dtype=self.dtype, kernel_init=kaiming_fan_out,
                     name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                             name=f"bn{i}")(x)
            x = nn.relu(x)
            i += 1
        x = adaptive_avg_pool(x, 7)
        # torchvision flattens NCHW; transpose so weights map one-to-one with PyTorch's.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        for k, width in enumerate((4096, 4096)):
            x = nn.Dense(width, dtype=self.dtype, kernel_init=linear_normal, name=f"fc{k}")(x)
            x = nn.relu(x)
            x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=linear_normal,
                        name="fc2")(x)
