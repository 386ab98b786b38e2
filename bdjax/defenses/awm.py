"""AWM: Adversarial Weight Masking. Soft masks learnt against a universal perturbation
that the backdoor would answer, kept in the defended model.

Each of ``epochs`` rounds, with the model in eval mode:

1. Inner maximisation: a universal perturbation ``delta`` (one image, starting at 0)
   takes SGD steps of size ``delta_lr`` that INCREASE the cross-entropy between the
   masked model's prediction on ``x + delta`` and its prediction on ``x``; then it is
   projected onto the L1 ball of radius ``trigger_norm``:
   ``delta *= min(1, trigger_norm / ||delta||_1)``.
2. Outer minimisation: mask steps on
   ``alpha * CE(f(x), y) + (1 - alpha) * CE(f(clip(x + delta, 0, 1)), y) + gamma_l1 * ||M||_1``,
   the masks clamped to [0, 1] after each step.

``masks="bn"`` (default, the survey's fork) puts one mask on every BatchNorm channel's
gamma, trained with SGD whose learning rate decays by ``lr_decay`` per round, each phase
one shuffled pass over the defender's images. ``masks="kernel"`` (the AWM paper) puts a
mask of the kernel's shape on every conv kernel; with the paper's ``optimizer="adam"``,
``inner=15`` (batches drawn with replacement per phase), ``batch_size=128``,
``gamma_l1=1e-8`` and ``lr_decay=1``. Either way the soft (not binarised) mask is baked
into the weights (``gamma * m`` or ``kernel * M``): the defended state is the masked
model and evaluates, checkpoints and restores like any other.

``delta`` is in the model's normalised input units (the fork's loader normalises the
images before it is added), so ``delta_lr`` and ``trigger_norm`` mean what they mean in
the reference; it is added to the image as ``delta * std`` in [0, 1] pixel space.

Defaults (the survey's fork, ``defense/awn.py``: its argparse defaults override
``config/defense/awn/default.yaml``): BN masks, 20 rounds, batch 256, SGD lr 0.01
without momentum, ExponentialLR 0.9 per round, delta lr 10, trigger norm 1000, alpha
0.9, L1 weight 1e-7; all of the defender's images (no validation split).

Differences from the reference code:

- The perturbed images are clipped to [0, 1] in pixel space. The fork clamps the
  NORMALISED images plus delta to [0, 1] (an accident: it cuts every negative
  normalised value).
- The fork masks BatchNorm channels with SGD; the AWM paper masks every weight of every
  conv kernel with Adam (``masks="kernel"``, the settings above). The paper's delta
  lives in pixel space; bdjax's in normalised units in both modes.

References:
  Chai and Chen, "One-shot Neural Backdoor Erasing via Adversarial Weight Masking",
  NeurIPS 2022; the survey (papers/001), section IV; WhoDunnett/BackdoorBenchmark
  ``defense/awn.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from bdjax.data import DefenseData
from bdjax.errors import BdjaxError, check_choice, check_range
from bdjax.kernels import batch_indices, cross_entropy, crop_flip, to_unit
from bdjax.kernels import bn
from bdjax.kernels.scores import conv_kernels, path_name
from bdjax.models import Model, State

MASKS = ("bn", "kernel")
OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class AWMConfig:
    """AWM settings.

    Attributes:
      masks: ``bn`` (a mask per BN channel's gamma) or ``kernel`` (a mask per conv
        weight).
      epochs: outer rounds.
      inner: batches per phase drawn with replacement; 0 = one shuffled pass.
      batch_size: images per batch.
      optimizer: the masks' ``sgd`` (no momentum) or ``adam``.
      lr: the masks' learning rate.
      lr_decay: the learning rate's factor per round (ExponentialLR; 1 = constant).
      delta_lr: the perturbation's SGD step.
      trigger_norm: the perturbation's L1 radius (normalised units).
      alpha: weight of the clean loss (1 - alpha: the perturbed loss).
      gamma_l1: weight of the masks' L1 norm.
      augment, flip: training augmentation of the batches (flip set by the runner).
    """

    masks: str = "bn"
    epochs: int = 20
    inner: int = 0
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.01
    lr_decay: float = 0.9
    delta_lr: float = 10.0
    trigger_norm: float = 1000.0
    alpha: float = 0.9
    gamma_l1: float = 1e-7
    augment: bool = True
    flip: bool = True

    def __post_init__(self):
        check_choice("masks", self.masks, MASKS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 1.")
        if self.inner < 0:
            raise BdjaxError(f"inner {self.inner!r} is invalid; accepted: >= 0 (0 = one pass).")
        for name in ("lr", "delta_lr", "trigger_norm"):
            if not getattr(self, name) > 0:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: > 0.")
        check_range("lr_decay", self.lr_decay, 0.0, 1.0)
        check_range("alpha", self.alpha, 0.0, 1.0)
        if self.gamma_l1 < 0:
            raise BdjaxError(f"gamma_l1 {self.gamma_l1!r} is invalid; accepted: >= 0.")

    @property
    def uses_validation(self) -> bool:
        return False


def ones(model: Model, params, masks: str):
    """All-ones masks: ``{bn path: [C]}`` or ``{kernel path: kernel shape}``."""
    if masks == "bn":
        return bn.channel_ones(model)
    return {k: jnp.ones_like(v, jnp.float32) for k, v in conv_kernels(params).items()}


def apply_masks(params, m, masks: str):
    """``params`` with the masks multiplied in (gamma or kernels)."""
    if masks == "bn":
        return bn.scale_bn(params, m)
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: leaf * m[path_name(p)].astype(leaf.dtype) if path_name(p) in m else leaf,
        params)


def project_l1(delta, radius: float):
    """``delta * min(1, radius / ||delta||_1)``."""
    norm = jnp.sum(jnp.abs(delta))
    return delta * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))


def _batches(key, n: int, config: AWMConfig):
    """``[steps, batch]`` indices: one shuffled pass, or ``inner`` batches drawn with
    replacement."""
    if config.inner:
        return jax.random.randint(key, (config.inner, config.batch_size), 0, n)
    return batch_indices(key, n, config.batch_size)


def defend(model: Model, state: State, data: DefenseData, config: AWMConfig, key: jax.Array):
    """AWM for one trial; returns (state with the masks baked in, report).

    Report: ``loss`` per round (the mask phase's mean), ``delta_l1`` per round (after
    the projection), ``mask_mean`` and ``mask_below_half`` (the fraction of mask values
    below 0.5).
    """
    x, y = data.x_train, data.y_train
    std = jnp.asarray(model.std, jnp.float32)
    base = {"params": state["params"], "batch_stats": state["batch_stats"]}
    m0 = ones(model, state["params"], config.masks)
    opt = optax.sgd if config.optimizer == "sgd" else optax.adam
    tx = optax.inject_hyperparams(opt)(learning_rate=config.lr)

    def logits(m, xb):
        return model.apply({**base, "params": apply_masks(state["params"], m, config.masks)}, xb)

    def prep(xb, k):
        return to_unit(crop_flip(xb, k, flip=config.flip) if config.augment else xb)

    def delta_step(c, inp):
        m, delta = c
        idx, k = inp
        xb = prep(x[idx], k)
        pred = jnp.argmax(logits(m, xb), -1)
        g = jax.grad(lambda d: -cross_entropy(logits(m, xb + d * std), pred))(delta)
        return (m, delta - config.delta_lr * g), None

    def mask_step(c, inp):
        m, os_, delta = c
        idx, k = inp
        xb, yb = prep(x[idx], k), y[idx]
        xp = jnp.clip(xb + delta * std, 0.0, 1.0)

        def loss_fn(mm):
            l1 = sum(jnp.sum(jnp.abs(v)) for v in mm.values())
            return (config.alpha * cross_entropy(logits(mm, xb), yb)
                    + (1 - config.alpha) * cross_entropy(logits(mm, xp), yb)
                    + config.gamma_l1 * l1)

        loss, g = jax.value_and_grad(loss_fn)(m)
        updates, os_ = tx.update(g, os_, m)
        m = jax.tree_util.tree_map(lambda v: jnp.clip(v, 0.0, 1.0),
                                   optax.apply_updates(m, updates))
        return (m, os_, delta), loss

    def round_(e, c):
        m, os_, losses, norms = c
        k_d, k_da, k_m, k_ma = jax.random.split(jax.random.fold_in(key, e), 4)
        os_ = os_._replace(hyperparams={**os_.hyperparams, "learning_rate": jnp.float32(config.lr) * config.lr_decay ** e})
        idx = _batches(k_d, x.shape[0], config)
        (_, delta), _ = jax.lax.scan(delta_step, (m, jnp.zeros(x.shape[1:], jnp.float32)),
                                     (idx, jax.random.split(k_da, idx.shape[0])))
        delta = project_l1(delta, config.trigger_norm)
        idx = _batches(k_m, x.shape[0], config)
        (m, os_, _), loss = jax.lax.scan(mask_step, (m, os_, delta),
                                         (idx, jax.random.split(k_ma, idx.shape[0])))
        return (m, os_, losses.at[e].set(jnp.mean(loss)),
                norms.at[e].set(jnp.sum(jnp.abs(delta))))

    nan = jnp.full((config.epochs,), jnp.nan, jnp.float32)
    m, _, losses, norms = jax.lax.fori_loop(0, config.epochs, round_,
                                            (m0, tx.init(m0), nan, nan))
    flat = jnp.concatenate([v.ravel() for v in m.values()])
    report = dict(loss=losses, delta_l1=norms, mask_mean=jnp.mean(flat),
                  mask_below_half=jnp.mean(flat < 0.5))
    return {**state, "params": apply_masks(state["params"], m, config.masks)}, report
