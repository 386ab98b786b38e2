"""Training-control attacks: the poisoning happens per batch inside the compiled step.

WaNet, BPP and Input-aware do not poison a fixed set of images before training; each
training batch is poisoned afresh (a share relabelled to the target, a share of
"cross"/"negative" samples that keep their labels, the rest clean); WaNet's and BPP's
batches are augmented only after the poisoning, IAB's only before. This module is the
one extension point for all of them: an attack supplies :class:`Hooks` (how to start,
how to poison a batch, optionally trainable parameters of its own with an optimizer, and
the arrays its test-time trigger needs), and :func:`train_controlled` runs bdjax's
training loop (:func:`bdjax.train.fit_loop`) with :func:`control_step` in place of the
plain step. Nothing else is copied per attack.

Inside a batch of ``B`` shuffled images the first ``n_bd`` are poisoned and the next
``n_cross`` are cross samples, as in the reference: ``n_bd = int(ratio * B)`` (when
``ratio * B < 1``, one image with probability ``ratio * B``, else none) and
``n_cross = int(n_bd * cross_ratio)`` (WaNet) or ``int(B * neg_ratio)`` (BPP). Counts
are traced values: the batch keeps its shape and positions are chosen with masks.

References: Nguyen & Tran, "WaNet", ICLR 2021; Wang et al., "BppAttack", CVPR 2022;
Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020; BackdoorBench's
``attack/wanet.py`` and ``attack/bpp.py`` (what runs).

Differences from the reference:
  - The post-poisoning augmentation (crop pad 5 p 0.8, rotation +-10 p 0.5, flip) is
    drawn per image; BackdoorBench applies torchvision transforms to the whole batch
    tensor, so one crop and one rotation (and one coin for each) serve all 128 images,
    an accident of porting the original WaNet code (kornia, per image).
  - BPP's negatives take ``Q(x_j) - x_j`` from another image of the same shuffled batch
    (a random training image); the reference draws a random image of the training
    set (both un-augmented: WaNet's and BPP's batches get no augmentation before the
    poisoning, :attr:`Hooks.pre_augment`). The hook sees one batch.
  - The warp's noise comes from ``grid_seed`` (numpy), not torch's global generator;
    test-time stamps round to integers where the reference truncates on saving.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax import metrics
from bdjax.attacks import triggers, warp
from bdjax.kernels import StepOptions, scan_epoch, sgd, steps_per_epoch, to_unit
from bdjax.kernels.augment import crop_flip, post_augment
from bdjax.kernels.optim import lr_schedule
from bdjax.kernels.steps import cross_entropy
from bdjax.models import Model


@dataclasses.dataclass(frozen=True)
class Batch:
    """What a hook knows about the run (static): the attack, the per-batch poisoning
    ratio, the number of classes and whether flips are allowed."""

    attack: Any
    ratio: float
    num_classes: int
    flip: bool

    @property
    def params(self) -> dict:
        return dict(self.attack.params)

    def target_labels(self, y):
        return metrics.poison_labels(y, self.attack.target, self.attack.mode,
                                     self.num_classes)


@dataclasses.dataclass(frozen=True)
class Hooks:
    """A training-control attack.

    The attack carries three pytrees through training: ``params`` (its own trainable
    parameters, updated by ``tx`` from the gradient of the shared loss), ``state``
    (values it updates itself each batch and that no gradient touches, e.g. the running
    BatchNorm statistics of IAB's generator) and ``fixed`` (constant; e.g. IAB's mask
    net after its own stage). Each is ``{}`` when unused.

    Attributes:
      poison: ``(ctx, params, state, fixed, x01, y, key) -> (x01, y, extra_loss,
        state)``: the batch (floats in [0, 1]; after the standard augmentation when
        ``pre_augment``) poisoned and, where the attack does, re-augmented;
        ``extra_loss`` is added to the classifier's loss and
        differentiated with respect to ``params``; the new ``state``. With
        ``partners`` it gets ``x2=`` as well: the partner batch, floats in [0, 1].
      init: ``(ctx, key, x, y, log) -> (params, state, fixed)``; may train (IAB's mask
        net).
      tx: ``(ctx, scale) -> optax transform`` for ``params`` (None: nothing trained);
        ``scale`` is the classifier's learning-rate schedule relative to its peak (a
        ``count -> fraction`` function, or 1.0 for a constant lr), for an attack whose
        own lr should follow it (IAB's generator).
      arrays: ``(ctx, params, state, fixed) -> {name: array}``, what the test-time
        trigger needs, saved beside the checkpoint (empty: the stamp needs nothing saved).
      pre_augment: the batch gets the standard augmentation (random crop, flip) before
        ``poison`` (when the run's ``TrainConfig.augment`` is on). The reference's IAB
        loads its batches with the training transform; its WaNet and BPP swap in the
        test transform ("here must replace the regular train transform with test
        transform") and augment only after poisoning.
      partners: ``poison`` also gets a partner batch: the same position of a second,
        independent shuffle of the training set
        (:func:`bdjax.kernels.steps.scan_epoch`), augmented like the batch with its
        own draws (IAB's second data loader, its cross samples' sources).
    """

    poison: Callable
    init: Callable = lambda ctx, key, x, y, log: ({}, {}, {})
    tx: Callable | None = None
    arrays: Callable = lambda ctx, params, state, fixed: {}
    pre_augment: bool = True
    partners: bool = False


_HOOKS: dict[str, Hooks] = {}


def register(name: str, hooks: Hooks) -> None:
    _HOOKS[name] = hooks


def hooks(name: str) -> Hooks | None:
    """The training-control hooks of attack ``name`` (None for a poisoned-dataset
    attack)."""
    if name == "iab":  # registers itself on import (its networks live in their own file)
        import bdjax.attacks.iab  # noqa: F401
    return _HOOKS.get(name)


def poison_count(ratio: float, batch: int, key):
    """The reference's ``int(ratio * B)`` poisoned images a batch, or for
    ``ratio * B < 1`` one image with probability ``ratio * B`` (a traced int32)."""
    expected = ratio * batch
    if expected >= 1:
        return jnp.int32(int(expected))
    return jax.random.bernoulli(key, expected).astype(jnp.int32)


def positions(batch: int, n_bd, n_cross):
    """Masks [B] of the poisoned (first ``n_bd``) and cross (next ``n_cross``) images."""
    i = jnp.arange(batch)
    return i < n_bd, (i >= n_bd) & (i < n_bd + n_cross)


def _select(mask, a, b):
    return jnp.where(mask.reshape(-1, *([1] * (a.ndim - 1))), a, b)


# ---------------------------------------------------------------------------- WaNet
def _wanet_poison(ctx: Batch, params, state, fixed, x, y, key):
    p = ctx.params
    b, h, w, _ = x.shape
    k_n, k_noise, k_aug = jax.random.split(key, 3)
    n_bd = poison_count(ctx.ratio, b, k_n)
    n_cross = (n_bd * p["cross_ratio"]).astype(jnp.int32)  # int(num_bd * cross_ratio)
    bd, cross = positions(b, n_bd, n_cross)
    grid = jnp.asarray(warp.warp_grid(int(p["grid_seed"]), int(p["k"]), float(p["s"]),
                                      float(p["grid_rescale"]), h, w))
    warped = warp.grid_sample(x, grid)
    noisy = warp.grid_sample(x, warp.noisy_grids(k_noise, grid, b))
    x = _select(bd, warped, _select(cross, noisy, x))
    y = jnp.where(bd, ctx.target_labels(y), y)
    return post_augment(x, k_aug, flip=ctx.flip), y, jnp.float32(0), state


# ------------------------------------------------------------------------------ BPP
def _bpp_poison(ctx: Batch, params, state, fixed, x, y, key):
    p = ctx.params
    b = x.shape[0]
    k_n, k_other, k_aug = jax.random.split(key, 3)
    n_bd = poison_count(ctx.ratio, b, k_n)
    n_neg = jnp.int32(int(b * p["neg_ratio"]))
    bd, neg = positions(b, n_bd, n_neg)
    squeeze = int(p["squeeze"])
    if p["dithering"]:  # the reference rounds its dithered images
        squeezed = lambda v: jnp.round(jax.vmap(lambda im: triggers._dither_one(im, squeeze))(v))  # noqa: E731
    else:
        squeezed = lambda v: triggers.quantise(v, squeeze)  # noqa: E731
    pix = x * 255.0  # the reference's denormalised [0, 255] floats, not rounded
    q = squeezed(pix)
    # negatives: x_i + (Q(x_j) - x_j) for a random other image j of the batch, true label
    other = jnp.round(pix[jax.random.randint(k_other, (b,), 0, b)])
    negative = jnp.clip(jnp.round(pix) + squeezed(other) - other, 0, 255)
    out = _select(bd, q, _select(neg, negative, pix)) / 255.0
    y = jnp.where(bd, ctx.target_labels(y), y)
    return post_augment(out, k_aug, flip=ctx.flip), y, jnp.float32(0), state


# the reference loads WaNet's and BPP's batches with the test transform: the only
# augmentation is the one after poisoning (post_augment)
register("wanet", Hooks(poison=_wanet_poison, pre_augment=False))
register("bpp", Hooks(poison=_bpp_poison, pre_augment=False))


# ------------------------------------------------------------------------- the step
def control_step(model: Model, tx, opts: StepOptions, ctx: Batch, hk: Hooks, aux_tx,
                 fixed, carry, opt_carry, x, y, key, x2=None):
    """One step of joint training: the standard augmentation (``opts.augment``), the
    attack's poisoning, then one update of the classifier (``tx``) and of the attack's
    parameters (``aux_tx``) on the same loss. Returns (carry, opt_carry, loss, accuracy)
    with ``carry = (state, (attack params, attack state))`` and ``opt_carry`` the
    optimizer states of the classifier and the attack params. ``x2``: the partner
    batch (:attr:`Hooks.partners`), augmented with ``fold_in(k_aug, 1)``."""
    state, (aux, aux_state) = carry
    opt_state, aux_opt = opt_carry
    k_aug, k_poison, k_drop = jax.random.split(key, 3)
    prep = lambda v, k: to_unit(crop_flip(v, k, flip=opts.flip) if opts.augment else v)  # noqa: E731
    xb = prep(x, k_aug)
    kw = {} if x2 is None else {"x2": prep(x2, jax.random.fold_in(k_aug, 1))}

    def loss_fn(params, aux_params):
        xp, yp, extra, new_aux_state = hk.poison(ctx, aux_params, aux_state, fixed, xb, y,
                                                 k_poison, **kw)
        variables = {"params": params, "batch_stats": state["batch_stats"]}
        logits, new_bs = model.apply(variables, xp, train=True, key=k_drop)
        loss = cross_entropy(logits, yp, opts.label_smoothing) + extra
        return loss, (logits, yp, new_bs, new_aux_state)

    (loss, (logits, yp, new_bs, aux_state)), (g, g_aux) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state["params"], aux)
    updates, opt_state = tx.update(g, opt_state, state["params"])
    params = optax.apply_updates(state["params"], updates)
    if aux_tx is not None:
        aux_updates, aux_opt = aux_tx.update(g_aux, aux_opt, aux)
        aux = optax.apply_updates(aux, aux_updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == yp)
    return (({**state, "params": params, "batch_stats": new_bs}, (aux, aux_state)),
            (opt_state, aux_opt), loss, acc)


def lr_fraction(cfg, steps_per_epoch: int, epochs: int):
    """The classifier's lr relative to its peak: ``count -> lr(count) / cfg.lr`` for a
    cosine schedule, 1.0 for a constant one (or a zero peak)."""
    lr = lr_schedule(cfg, steps_per_epoch, epochs)
    if not callable(lr) or cfg.lr == 0:
        return 1.0
    return lambda count: lr(count) / cfg.lr


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6), donate_argnums=(8, 9))
def _epoch(model, tx, opts, batch_size, ctx, hk, aux_tx, fixed, carry, opt_carry, x, y, key):
    step = functools.partial(control_step, model, tx, opts, ctx, hk, aux_tx, fixed)
    return scan_epoch(step, batch_size, carry, opt_carry, x, y, key, partners=hk.partners)


def train_controlled(model: Model, x: np.ndarray, y: np.ndarray, config, key: jax.Array,
                     ctx: Batch, *, progress: bool = True, log=print):
    """Trains ``model`` on clean images with the attack of ``ctx`` poisoning every batch.

    Keys as in :func:`bdjax.train.train` (init ``fold_in(key, 0)``, epoch e
    ``fold_in(key, e + 1)``); the attack's own start (``Hooks.init``) uses
    ``fold_in(key, 2**31 - 1)``.

    Returns:
      (state, history, arrays): the classifier, the per-epoch history, and the arrays
      the test-time trigger needs (``Hooks.arrays``; empty for WaNet and BPP).
    """
    from bdjax.train import fit_loop

    hk = hooks(ctx.attack.name)
    state = model.init(jax.random.fold_in(key, 0))
    aux, aux_state, fixed = hk.init(ctx, jax.random.fold_in(key, 2**31 - 1), x, y, log)
    spe = steps_per_epoch(len(x), config.batch_size)
    tx = sgd(config.sgd, spe, config.epochs)
    aux_tx = (hk.tx(ctx, lr_fraction(config.sgd, spe, config.epochs))
              if hk.tx is not None else None)
    opts = StepOptions(augment=config.augment and hk.pre_augment, flip=ctx.flip,
                       label_smoothing=config.label_smoothing)
    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    opt_carry = (tx.init(state["params"]), aux_tx.init(aux) if aux_tx is not None else ())

    def epoch_fn(carry, k):
        c, o = carry
        c, o, loss, acc = _epoch(model, tx, opts, config.batch_size, ctx, hk, aux_tx, fixed,
                                 c, o, x_dev, y_dev, k)
        return (c, o), loss, acc

    ((state, (aux, aux_state)), _), history = fit_loop(
        epoch_fn, ((state, (aux, aux_state)), opt_carry), config.epochs, key,
        progress=progress)
    arrays = hk.arrays(ctx, aux, aux_state, fixed)
    return state, history, {k: np.asarray(v) for k, v in arrays.items()}


__all__ = ["Batch", "Hooks", "control_step", "hooks", "lr_fraction", "poison_count", "positions",
           "register", "train_controlled"]
