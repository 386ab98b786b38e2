"""PreAct-ResNet18 as in BackdoorBench (REFERENCE.md, "Models").

Stem 3x3 conv (stride 1, 64 channels, no BN/ReLU/maxpool); blocks [2, 2, 2, 2] with
widths 64/128/256/512 and strides 1/2/2/2; pre-activation blocks whose shortcut is a
bias-free 1x1 conv on the pre-activated input when the shape changes; no final BN+ReLU;
global average pool; linear(512, C). All convs are bias-free. 11,171,146 trainable
parameters for C = 10. Weights start as PyTorch's defaults (``bdjax.models.inits``): conv
and linear kernels U(+-1/sqrt(fan_in)), linear bias the same range, BN gamma 1, beta 0.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from bdjax.models.inits import torch_bias, torch_default
from bdjax.models.layers import Conv as _Conv

Conv = functools.partial(_Conv, kernel_init=torch_default)


class PreActBlock(nn.Module):
    width: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                         dtype=self.dtype, name=name)
        out = nn.relu(norm("bn1")(x))
        if self.stride != 1 or x.shape[-1] != self.width:
            shortcut = Conv(self.width, (1, 1), strides=self.stride, use_bias=False,
                               dtype=self.dtype, name="shortcut")(out)
        else:
            shortcut = x
        out = Conv(self.width, (3, 3), strides=self.stride, padding=1, use_bias=False,
                      dtype=self.dtype, name="conv1")(out)
        out = nn.relu(norm("bn2")(out))
        out = Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                      name="conv2")(out)
        return out + shortcut


class PreActResNet(nn.Module):
    num_classes: int = 10
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv(64, (3, 3), padding=1, use_bias=False, dtype=self.dtype, name="conv1")(x)
        for stage, (n, width) in enumerate(zip(self.blocks, self.widths), start=1):
            for b in range(n):
                stride = 1 if stage == 1 or b > 0 else 2
                x = PreActBlock(width, stride, self.dtype, name=f"layer{stage}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_default,
                        bias_init=torch_bias(x.shape[-1]), name="linear")(x)
