"""CLP: data-free pruning of the BatchNorm channels with a large channel Lipschitz bound.

For every BatchNorm layer and the convolution whose output it normalises, channel k's
upper bound of the channel Lipschitz constant (UCLC) is

    UCLC_k = sigma_max(W_k) * |gamma_k / sqrt(running_var_k)|,

where ``W_k`` is filter k of the conv reshaped to ``(C_in, kh * kw)`` and sigma_max its
largest singular value. Within each layer, channels with UCLC > mean + u * std (the
unbiased std, as ``torch.std``) are pruned by zeroing the BN's gamma AND beta; the
returned state is an ordinary model state. No data is used (``data`` is ignored), so
every trial gives the same model.

Defaults (the survey's fork, ``defense/clp.py`` with ``config/defense/clp/*.yaml``):
u = 3 on every dataset (BackdoorBench's own ``tiny.yaml`` uses 5: ``--set u=5``).

Differences from the reference code:

- Each BN is paired with the conv whose OUTPUT it normalises
  (:func:`bdjax.kernels.bn.bn_layers`, by execution order). The reference pairs each
  BN with the conv registered just before it in ``named_modules`` order, which in a
  pre-activation ResNet block gives ``bn1`` the previous block's shortcut 1x1 conv (or,
  in a block without one, the right conv by luck): there the bound mixes a BN with a
  conv it never follows.
- The reference also sweeps u over ``linspace(0, 10, 21)`` and evaluates each on the
  TEST set for its plots; that sweep selects nothing and is left out.

References:
  Zheng et al., "Data-free Backdoor Removal based on Channel Lipschitzness", ECCV 2022;
  the survey (papers/001), section IV; WhoDunnett/BackdoorBenchmark ``defense/clp.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bdjax.data import DefenseData
from bdjax.errors import check_range
from bdjax.kernels import bn
from bdjax.models import Model, State


@dataclasses.dataclass(frozen=True)
class CLPConfig:
    """CLP settings.

    Attributes:
      u: prune channels whose UCLC exceeds mean + u * std within their layer.
    """

    u: float = 3.0

    @property
    def uses_validation(self) -> bool:
        return False

    def __post_init__(self):
        check_range("u", self.u, 0.0, 100.0)


def uclc(kernel: jax.Array, scale: jax.Array, var: jax.Array) -> jax.Array:
    """Per output channel k: the largest singular value of the HWIO ``kernel[..., k]``
    reshaped to ``(C_in, kh * kw)`` (PyTorch's ``weight[k].reshape(C_in, -1)``) times
    ``|scale_k / sqrt(var_k)|``."""
    kh, kw, cin, cout = kernel.shape
    w = jnp.transpose(kernel, (3, 2, 0, 1)).reshape(cout, cin, kh * kw)
    sigma = jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False)[:, 0]
    return sigma * jnp.abs(scale / jnp.sqrt(var))


def outliers(values: jax.Array, u: float) -> jax.Array:
    """``values > mean + u * std`` with the unbiased std (ddof 1), as ``torch.std``."""
    return values > jnp.mean(values) + u * jnp.std(values, ddof=1)


def defend(model: Model, state: State, data: DefenseData, config: CLPConfig,
           key: jax.Array):
    """CLP for one trial (data-free: ``data`` and ``key`` are unused); returns
    (state, report).

    Report: ``pruned`` (channels pruned over the network), ``pruned_per_layer``
    ([number of BN layers], in :func:`bdjax.kernels.bn.bn_layers` order) and
    ``max_uclc`` (the largest bound per layer).
    """
    del data, key
    params, stats = state["params"], state["batch_stats"]
    keep, counts, tops = {}, [], []
    for layer in bn.bn_layers(model):
        if not layer.conv:  # a BN before any conv (none in bdjax's models) has no bound
            continue
        p = bn.bn_params(params, model)[layer.path]
        s = bn.bn_stats(stats, model)[layer.path]
        bound = uclc(bn.conv_kernel(params, layer.conv), p["scale"], s["var"])
        prune = outliers(bound, config.u)
        keep[layer.path] = jnp.where(prune, 0.0, 1.0)
        counts.append(jnp.sum(prune))
        tops.append(jnp.max(bound))
    pruned = {**state, "params": bn.scale_bn(params, keep, keep)}
    counts = jnp.stack(counts).astype(jnp.int32)
    return pruned, {"pruned": jnp.sum(counts), "pruned_per_layer": counts,
                    "max_uclc": jnp.stack(tops)}
