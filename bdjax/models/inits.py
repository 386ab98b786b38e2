"""PyTorch's weight initialisations, for the models whose reference is PyTorch code.

The published numbers come from PyTorch models, and with BatchNorm after every conv the
initial weight scale sets the effective learning rate for the whole run: flax's default
(LeCun normal, variance 1/fan_in) has 3x the variance of PyTorch's default
(U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1/(3 fan_in)), so a flax-initialised
PreAct-ResNet18 trains as if at a third of the reference learning rate (REFERENCE.md,
"Initialisation").

- :data:`torch_default`: ``nn.Conv2d``/``nn.Linear`` weights, kaiming_uniform with
  a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = ``variance_scaling(1/3,
  fan_in, uniform)``; :func:`torch_bias` the same range for biases (it needs fan_in,
  which a flax bias initialiser does not see).
- :data:`kaiming_fan_out`, :data:`linear_normal`: torchvision's VGG
  (``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` for convs, N(0, 0.01) for
  linears, zero biases).

BatchNorm is gamma 1, beta 0 in both frameworks (flax's default). Flax kernels are HWIO
(conv) and (in, out) (dense); ``variance_scaling`` reads fan_in from axis -2 and fan_out
from axis -1 with the spatial axes as the receptive field, as PyTorch does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.nn import initializers

torch_default = initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
kaiming_fan_out = initializers.variance_scaling(2.0, "fan_out", "normal")
linear_normal = initializers.normal(0.01)


def torch_bias(fan_in: int):
    """PyTorch's bias initialiser for a layer with ``fan_in`` inputs:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


__all__ = ["torch_default", "torch_bias", "kaiming_fan_out", "linear_normal"]
