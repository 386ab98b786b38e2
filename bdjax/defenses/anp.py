"""ANP: Adversarial Neuron Pruning, masks on BatchNorm channels learnt under adversarial
neuron perturbation, then pruning of the original model by mask value.

Every BN channel k gets a mask ``m_k`` in [0, 1] (init 1) and two noises ``d_k``,
``b_k``. The clean forward uses ``gamma * m`` and ``beta``; the perturbed one
``gamma * (m + d)`` and ``beta * (1 + b)``. BatchNorm runs in training mode (batch
statistics) throughout. For each of ``iterations`` batches drawn with replacement from
the defender's training split (training augmentation):

1. draw ``d, b ~ U[-eps, eps]`` and take ``steps`` signed gradient steps of size
   ``eps / steps`` that INCREASE the cross-entropy of the perturbed model;
2. one SGD step (momentum 0.9) on the masks for
   ``alpha * CE(clean) + (1 - alpha) * CE(perturbed)``; clamp them to [0, 1].

Then the ORIGINAL model is pruned: a channel's gamma is zeroed when its mask is at most
the threshold. With ``threshold < 0`` (default) the thresholds 0, step, ..., ``max``
are scored by the accuracy on the defender's validation split, and the largest one
whose relative accuracy drop stays below ``acc_ratio`` is kept (anywhere in the list,
as the reference keeps every passing level it meets; none passing: nothing is pruned).
A fixed ``threshold`` (the ANP paper uses 0.2) skips the search.

Defaults (the survey's fork, ``defense/anp.py`` with ``config/defense/anp/default.yaml``):
batch 256, mask lr 0.01, 2000 iterations, eps 0.4, 1 step, alpha 0.2, thresholds
0..0.9 by 0.05, acc_ratio 0.1, validation split 10%.

Differences from the reference code:

- The accuracy limit is measured against the original model's VALIDATION accuracy. The
  fork compares each level's validation accuracy with the original model's TEST
  accuracy (a test-set leak); BackdoorBench's original picks the level with the test
  set's ASR and accuracy.
- The stop is on the accuracy drop; the reference takes ``abs(...)`` (a 10% gain also
  fails).
- The validation images are scored without augmentation; the fork's validation loader
  applies the training transform.
- The ANP authors' code (and ``METHODS.md``) learns the masks at lr 0.2 on batches of
  128; the fork's ``default.yaml`` has lr 0.01 and batch 256, which produced the
  survey's numbers and are kept (``lr=0.2 batch_size=128`` is the authors' run).

References:
  Wu and Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS
  2021; the survey (papers/001), section IV; WhoDunnett/BackdoorBenchmark
  ``defense/anp.py`` and ``utils/defense_utils/anp/anp_model/anp_batchnorm.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax.data import DefenseData
from bdjax.errors import BdjaxError, check_range
from bdjax.kernels import cross_entropy, crop_flip, evaluate
from bdjax.kernels import bn
from bdjax.kernels.select import last_within
from bdjax.models import Model, State


@dataclasses.dataclass(frozen=True)
class ANPConfig:
    """ANP settings.

    Attributes:
      iterations: mask updates (one batch each, drawn with replacement).
      batch_size: images per batch.
      lr: the masks' SGD learning rate (momentum ``momentum``).
      momentum: the masks' SGD momentum.
      eps: the noise's range and total step (0: no perturbation, masks on CE alone).
      steps: signed gradient steps on the noise per batch.
      alpha: weight of the clean loss (1 - alpha: the perturbed loss).
      threshold: a fixed mask threshold (prune m <= threshold); < 0: search.
      max_threshold, step: the searched thresholds 0, step, ..., max_threshold.
      acc_ratio: the relative validation accuracy drop a searched threshold must stay
        below.
      augment, flip: training augmentation of the mask batches (flip set by the runner).
    """

    iterations: int = 2000
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    eps: float = 0.4
    steps: int = 1
    alpha: float = 0.2
    threshold: float = -1.0
    max_threshold: float = 0.9
    step: float = 0.05
    acc_ratio: float = 0.1
    augment: bool = True
    flip: bool = True

    def __post_init__(self):
        for name in ("iterations", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 1.")
        if not self.lr > 0:
            raise BdjaxError(f"lr {self.lr!r} is invalid; accepted: > 0.")
        check_range("eps", self.eps, 0.0, 10.0)
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("max_threshold", self.max_threshold, 0.0, 1.0)
        check_range("acc_ratio", self.acc_ratio, 0.0, 1.0)
        if not 0 < self.step <= 1:
            raise BdjaxError(f"step {self.step!r} is invalid; accepted: (0, 1].")
        if self.threshold > 1:
            raise BdjaxError(f"threshold {self.threshold!r} is invalid; accepted: a mask "
                             "value in [0, 1], or < 0 to search.")

    @property
    def uses_validation(self) -> bool:
        return self.threshold < 0

    @property
    def thresholds(self) -> np.ndarray:
        """The searched thresholds 0, step, ..., max_threshold."""
        return np.arange(0.0, self.max_threshold + self.step / 2, self.step, dtype=np.float32)


def _logits(model: Model, state: State, scale, bias, x):
    """Train-mode (batch statistics) logits with BN gamma * scale, beta * bias."""
    params = bn.scale_bn(state["params"], scale, bias)
    logits, _ = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x,
                            train=True)
    return logits


def learn_masks(model: Model, state: State, x, y, config: ANPConfig, key):
    """The masks ``{bn path: [C]}`` after ANP's adversarial mask learning, and the mean
    training loss of the last 10% of the iterations."""
    ones = bn.channel_ones(model)
    tx = optax.sgd(config.lr, momentum=config.momentum)
    noise_step = config.eps / config.steps

    def perturbed(m, d, b, xb, yb):
        scale = {k: m[k] + d[k] for k in m}
        return cross_entropy(_logits(model, state, scale, {k: 1 + b[k] for k in b}, xb), yb)

    def body(i, c):
        m, opt, tail = c
        k_idx, k_aug, k_d, k_b = jax.random.split(jax.random.fold_in(key, i), 4)
        idx = jax.random.randint(k_idx, (config.batch_size,), 0, x.shape[0])
        xb = crop_flip(x[idx], k_aug, flip=config.flip) if config.augment else x[idx]
        yb = y[idx]
        if config.eps > 0:
            leaves, tree = jax.tree_util.tree_flatten(m)
            kd = jax.random.split(k_d, len(leaves))
            kb = jax.random.split(k_b, len(leaves))
            d = tree.unflatten([jax.random.uniform(k, v.shape, minval=-config.eps,
                                                   maxval=config.eps) for k, v in zip(kd, leaves)])
            b = tree.unflatten([jax.random.uniform(k, v.shape, minval=-config.eps,
                                                   maxval=config.eps) for k, v in zip(kb, leaves)])
            for _ in range(config.steps):
                gd, gb = jax.grad(perturbed, argnums=(1, 2))(m, d, b, xb, yb)
                d = jax.tree_util.tree_map(lambda v, g: v + noise_step * jnp.sign(g), d, gd)
                b = jax.tree_util.tree_map(lambda v, g: v + noise_step * jnp.sign(g), b, gb)

        def loss_fn(mm):
            clean = cross_entropy(_logits(model, state, mm, None, xb), yb)
            if config.eps == 0:
                return config.alpha * clean
            return config.alpha * clean + (1 - config.alpha) * perturbed(mm, d, b, xb, yb)

        loss, g = jax.value_and_grad(loss_fn)(m)
        updates, opt = tx.update(g, opt, m)
        m = jax.tree_util.tree_map(lambda v: jnp.clip(v, 0.0, 1.0), optax.apply_updates(m, updates))
        late = i >= config.iterations - max(1, config.iterations // 10)
        return m, opt, tail + jnp.where(late, loss, 0.0)

    m, _, tail = jax.lax.fori_loop(0, config.iterations, body, (ones, tx.init(ones), 0.0))
    return m, tail / max(1, config.iterations // 10)


def prune_gamma(params, masks, threshold):
    """``params`` with BN gamma zeroed where the mask is at most ``threshold``."""
    return bn.scale_bn(params, {k: (v > threshold).astype(jnp.float32) for k, v in masks.items()})


def defend(model: Model, state: State, data: DefenseData, config: ANPConfig, key: jax.Array):
    """ANP for one trial; returns (state, report).

    Report: ``threshold`` (the one applied; NaN when the search kept nothing),
    ``pruned`` (channels), ``val_acc_before``, ``val_acc`` per searched threshold (NaN
    with a fixed threshold), ``mask_mean``, ``mask_below_half`` (channels) and
    ``train_loss`` (mean of the last 10% of the mask iterations).
    """
    masks, loss = learn_masks(model, state, data.x_train, data.y_train, config, key)
    thresholds = jnp.asarray(config.thresholds)
    if config.uses_validation:
        if data.x_val.shape[0] == 0:
            raise BdjaxError("ANP's threshold search needs validation images; accepted: "
                             "DefenseData with a validation split, or a fixed threshold.")
        acc0, _ = evaluate(model, state, data.x_val, data.y_val)
        accs = jax.lax.map(lambda t: evaluate(
            model, {**state, "params": prune_gamma(state["params"], masks, t)},
            data.x_val, data.y_val)[0], thresholds)
        level = last_within(accs, acc0, config.acc_ratio, relative=True, contiguous=False)
        threshold = jnp.where(level >= 0, thresholds[jnp.maximum(level, 0)], -1.0)
    else:
        acc0 = jnp.float32(jnp.nan)
        accs = jnp.full(thresholds.shape, jnp.nan, jnp.float32)
        threshold = jnp.float32(config.threshold)
    params = prune_gamma(state["params"], masks, threshold)  # threshold -1 prunes nothing
    flat = jnp.concatenate(list(masks.values()))
    report = dict(threshold=jnp.where(threshold < 0, jnp.nan, threshold),
                  pruned=jnp.sum(flat <= threshold).astype(jnp.int32),
                  val_acc_before=acc0, val_acc=accs, mask_mean=jnp.mean(flat),
                  mask_below_half=jnp.sum(flat < 0.5).astype(jnp.int32), train_loss=loss)
    return {**state, "params": params}, report
