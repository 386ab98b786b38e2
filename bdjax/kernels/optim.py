"""SGD as the reference code runs it: coupled weight decay, momentum, and PyTorch's
``CosineAnnealingLR`` stepped per epoch or per batch.

The reference implementations differ in how they step the cosine schedule, and the
difference changes numbers:

- BackdoorBench's attack training and FT step it once per EPOCH with ``T_max = 100``
  (so a 50-epoch GTSRB run ends near half the learning rate);
- the FST authors' code steps it per epoch with ``T_max`` = the number of epochs;
- BackdoorBench's FT-SAM steps it once per BATCH with ``T_max = 100``, so with more than
  one batch per epoch the rate reaches 0 after 100 batches and rises again (PyTorch's
  closed form ``lr (1 + cos(pi t / T_max)) / 2`` is periodic).

:class:`SGDConfig` names both choices (``unit``, ``t_max``) and :func:`sgd` builds the
optax transformation; ``t_max = 0`` means the length of the run in that unit (a cosine
from ``lr`` down to 0 over the whole run).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bdjax.errors import BdjaxError, check_choice

SCHEDULES = ("cosine", "constant")
UNITS = ("epoch", "batch")


@dataclasses.dataclass(frozen=True)
class SGDConfig:
    """SGD with momentum and coupled (PyTorch-style) weight decay.

    Attributes:
      lr: peak learning rate.
      momentum: heavy-ball momentum.
      weight_decay: added to the gradient before momentum, as ``torch.optim.SGD``.
      schedule: ``cosine`` (PyTorch's ``CosineAnnealingLR`` with ``eta_min = 0``) or
        ``constant``.
      unit: the cosine advances once per ``epoch`` (a staircase within the run) or per
        ``batch``.
      t_max: the cosine's half period in ``unit``s; 0 = the whole run.
      nesterov: Nesterov momentum.
    """

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    unit: str = "epoch"
    t_max: int = 0
    nesterov: bool = False

    def __post_init__(self):
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("schedule unit", self.unit, UNITS)
        if self.t_max < 0:
            raise BdjaxError(f"t_max {self.t_max!r} is invalid; accepted: >= 0 (0 = the run).")


def cosine_schedule(lr: float, steps_per_epoch: int, epochs: int, unit: str, t_max: int):
    """``count -> lr (1 + cos(pi u / T)) / 2`` with ``u`` the epoch (``count //
    steps_per_epoch``) or batch count and ``T = t_max`` (0: the run's length in that
    unit); periodic past ``T`` as PyTorch's ``CosineAnnealingLR``."""
    per_epoch = unit == "epoch"
    period = t_max or (epochs if per_epoch else epochs * steps_per_epoch)
    period = max(1, period)
    spe = max(1, steps_per_epoch)

    def schedule(count):
        u = count // spe if per_epoch else count
        return lr * (0.5 * (1 + jnp.cos(jnp.pi * u / period)))

    return schedule


def lr_schedule(cfg: SGDConfig, steps_per_epoch: int, epochs: int):
    """``cfg``'s learning rate: a ``count -> lr`` function for the cosine, the float
    ``cfg.lr`` for a constant one (optax accepts either)."""
    if cfg.schedule == "cosine":
        return cosine_schedule(cfg.lr, steps_per_epoch, epochs, cfg.unit, cfg.t_max)
    return cfg.lr


def sgd(cfg: SGDConfig, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
    """The optax transformation for ``cfg`` over ``epochs`` of ``steps_per_epoch``
    updates (the optimizer's step count drives the schedule)."""
    lr = lr_schedule(cfg, steps_per_epoch, epochs)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))


__all__ = ["SGDConfig", "sgd", "cosine_schedule", "lr_schedule", "SCHEDULES", "UNITS"]


class TorchAdamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


def torch_adam(lr: float, *, amsgrad: bool = False, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """``torch.optim.Adam`` (i-BAU's and SAU's optimiser): coupled weight decay
    (``g + weight_decay * p``), and with ``amsgrad`` the denominator
    ``sqrt(max_t nu_t) / sqrt(1 - b2^t) + eps``: the running maximum of the RAW second
    moments, bias-corrected with the current step (optax's ``amsgrad`` takes the maximum
    of the bias-corrected moments, which differs once gradients shrink)."""

    def init(params):
        z = jax.tree_util.tree_map(jnp.zeros_like, params)
        return TorchAdamState(jnp.zeros([], jnp.int32), z, z, z)

    def update(g, s, params=None):
        tm = jax.tree_util.tree_map
        if weight_decay:
            g = tm(lambda x, p: x + weight_decay * p, g, params)
        t = s.count + 1
        mu = tm(lambda m, x: b1 * m + (1 - b1) * x, s.mu, g)
        nu = tm(lambda v, x: b2 * v + (1 - b2) * x * x, s.nu, g)
        nu_max = tm(jnp.maximum, s.nu_max, nu) if amsgrad else s.nu_max
        tf = t.astype(jnp.float32)
        bc1, bc2 = 1 - b1 ** tf, 1 - b2 ** tf
        out = tm(lambda m, v: -lr * (m / bc1) / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps),
                 mu, nu_max if amsgrad else nu)
        return out, TorchAdamState(t, mu, nu, nu_max)

    return optax.GradientTransformation(init, update)
