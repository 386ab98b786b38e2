"""SAU: Shared Adversarial Unlearning, fine-tuning on shared adversarial examples.

The model h starts as the backdoored model h0, which stays frozen as the reference. Both
run in eval mode (running BatchNorm statistics, as the reference's default
``train_mode=False``); every parameter of h learns, BN scales and biases included, and
no augmentation is used. For each batch of the defender's images, every epoch:

1. shared PGD (:func:`shared_pgd`) in [0, 1] pixel space: delta starts at +eps in
   every pixel (``init="max"``) and takes up to ``pgd_steps`` sign steps of ``pgd_step``
   DOWN the gradient of

       beta1 L_adv + beta2 L_js,
       L_adv = -[sum CE(h(x'), y) over samples whose h-prediction has not yet left
                 h(x) + the same for h0] / 2N,
       L_js  = sum JS(softmax h(x'), softmax h0(x')) over samples not yet shared / N,

   (probabilities clamped at 1e-8), each step followed by the Linf clamp to [-eps, eps].
   A sample is shared-adversarial when both models' predictions left their clean ones
   and agree; such a sample has no gradient, so it stays where it is, and the loop stops
   when every sample of the batch is shared (carried state of a ``while_loop``);
2. one Adam (amsgrad) step on

       lambda1 CE(h(x), y) + lambda2 CE(h(x'), y) + lambda3 L_shared,
       L_shared = sum [-log(1e-6 + min(1 - p, 0.999)) - log(1 + 1e-6 - max(p, 0.001))]
                  / 2N,

   with p = softmax(h(x'))[h0(x')], summed over the samples with h0(x') != y and
   h0(x') != h0(x) (:func:`shared_loss`; both terms are -log(1 - p), the reference
   keeps the two forms for round-off; p < 0.001 gets no gradient).

Defaults are the code the survey ran (its fork of BackdoorBench, ``defense/sau.py`` and
``config/defense/sau/cifar10.yaml``; REFERENCE.md, "NAD, PBE, SAU" row): 100 epochs
(``n_rounds``; Tiny-ImageNet 20, :func:`dataset_settings`), batch 256, Adam with
amsgrad, lr 1e-4, betas (0.9, 0.999), no weight decay, constant lr (the YAML names a
cosine schedule but the code never steps it); PGD Linf eps 0.2, step 0.2, 5 steps,
``init="max"``; beta (0.01, 1); lambda (1, 0, 1). Adam follows PyTorch's amsgrad (the
maximum of the raw second moment, bias-corrected afterwards; optax's ``amsgrad`` takes
the maximum of the corrected one). The perturbed image is not clipped to [0, 1] (the
reference's ``pert_func`` adds the perturbation unclipped, its comment saying the box is
not needed); ``clip=True`` keeps ``x + delta`` in [0, 1]. All of the defender's images
train (the fork draws its SPC images with ``val_ratio=0``).

Differences from the reference:

- The last partial batch is filled with images of the same shuffled pass instead of
  being a smaller batch (static shapes under ``jit``).
- The reference's PGD tests "all shared" at the top of each iteration and breaks after
  that iteration's step; as shared samples have zero gradient that step moves nothing,
  so bdjax tests before the step and skips it (same perturbation, one pass fewer).
- ``init="random"`` starts uniformly in the ball; the reference's draws U[0, 1) and
  clamps it, which leaves ~80% of the pixels at +eps.
- The reference recomputes both models' clean predictions at every PGD step; bdjax
  once per batch (eval mode: the same values).

Cost: one step is ~12 forward passes' worth of the small CNN per image (up to 5 PGD
steps, each a forward and an input gradient through both models, then the outer step on
clean and perturbed images), ~12 times a fine-tuning step; the PGD rarely stops early
(mean steps 4.5-5 on bdjax's synthetic checkpoints). The reference's 100 epochs at SPC
100 are ~400 such steps of 256 images per trial.

Measured on bdjax's synthetic checkpoints (small CNN, BadNets and Blended 10%, attack
seeds 1 and 2, 3 trials, ``benchmarks/defense_check.py``; ACC drop / ASR after for
badnets-1, badnets-2, blended-1, blended-2): the reference settings at SPC 10 leave the
backdoor (-3.5/-3.8/-3.3/-6.0, ASR .80/.64/.55/.72); at SPC 100, 20 of its epochs leave
ASR .68 (badnets-1, one trial). At lr 1e-3 with 20 epochs of batch 32 SAU meets issue 8's
bar at SPC 100 (-1.9/-5.2/-4.4/-2.1, ASR .13/.12/.10/.32) and SPC 10 (-9.8/-7.7/-9.0/
-9.4, ASR .31/.33/.11/.27).

References:
  Wei, Zhang, Zha, Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning
  Shared Adversarial Examples", NeurIPS 2023; survey (papers/001), Eqs. (33)-(34);
  BackdoorBench ``defense/sau.py`` (``Shared_PGD``) and ``config/defense/sau/*.yaml``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from bdjax.data import DefenseData
from bdjax.defenses.reference import reference_dataset
from bdjax.errors import BdjaxError, check_choice
from bdjax.kernels import batch_indices, cross_entropy, to_unit
from bdjax.kernels.optim import torch_adam
from bdjax.kernels.pgd import NORMS, clip_to_box, project, random_start
from bdjax.models import Model, State

INITS = ("max", "min", "zero", "random")
# Rounds per dataset (config/defense/sau/*.yaml n_rounds); others take CIFAR-10's 100.
EPOCHS = {"tiny": 20}
_P_MIN = 1e-8  # the reference's clamp of probabilities in the JS divergence


@dataclasses.dataclass(frozen=True)
class SAUConfig:
    """SAU settings (CIFAR-10 defaults of the reference, module docstring).

    Attributes:
      epochs: passes over the defender's images (the reference's ``n_rounds``).
      batch_size: images per step.
      lr, b1, b2, adam_eps, weight_decay: Adam with amsgrad, as ``torch.optim.Adam``
        (weight decay added to the gradient); constant lr.
      norm: the perturbation's ball, ``linf`` (reference) or ``l2``.
      eps: the ball's radius in [0, 1] pixel units (``trigger_norm``).
      pgd_step: size of each sign step (``adv_lr``).
      pgd_steps: most PGD steps per batch (``adv_steps``).
      init: the perturbation's start: ``max`` (+eps), ``min`` (-eps), ``zero`` or
        ``random`` (uniform in the ball), each projected onto the ball.
      clip: keep ``x + delta`` in [0, 1] (the reference does not).
      beta1, beta2: weights of L_adv and L_js in the PGD loss.
      lambda1, lambda2, lambda3: weights of the clean CE, the adversarial CE (adversarial
        training; 0 in the reference) and L_shared.
      train_mode: the reference's ``--train_mode``: the outer forward pass of h uses
        batch statistics and updates the running ones (the PGD stays in eval mode).
    """

    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    norm: str = "linf"
    eps: float = 0.2
    pgd_step: float = 0.2
    pgd_steps: int = 5
    init: str = "max"
    clip: bool = False
    beta1: float = 0.01
    beta2: float = 1.0
    lambda1: float = 1.0
    lambda2: float = 0.0
    lambda3: float = 1.0
    train_mode: bool = False

    def __post_init__(self):
        check_choice("norm", self.norm, NORMS)
        check_choice("init", self.init, INITS)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 1.")
        if self.pgd_steps < 0:
            raise BdjaxError(f"pgd_steps {self.pgd_steps!r} is invalid; accepted: >= 0.")
        for name in ("lr", "eps", "pgd_step", "adam_eps"):
            if not getattr(self, name) > 0:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: > 0.")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is out of range; "
                                 "accepted: [0, 1).")
        for name in ("weight_decay", "beta1", "beta2", "lambda1", "lambda2", "lambda3"):
            if not getattr(self, name) >= 0:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 0.")

    @property
    def uses_validation(self) -> bool:
        return False


def dataset_settings(dataset: str, model: str) -> dict:
    """The reference's rounds for ``dataset``: 20 on Tiny-ImageNet, else the defaults."""
    epochs = EPOCHS.get(reference_dataset(dataset))
    return {} if epochs is None else {"epochs": epochs}


# --------------------------------------------------------------------------- optimizer
# ------------------------------------------------------------------------------ losses
def js_divergence(logits_a, logits_b):
    """Per-row Jensen-Shannon divergence of the two softmaxes, each clamped at 1e-8 (the
    reference's form: 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2)."""
    p = jnp.maximum(jax.nn.softmax(logits_a, -1), _P_MIN)
    q = jnp.maximum(jax.nn.softmax(logits_b, -1), _P_MIN)
    m = 0.5 * (p + q)
    return jnp.sum(0.5 * (p * jnp.log(p) + q * jnp.log(q)) - 0.5 * (p + q) * jnp.log(m), -1)


def shared_status(pred_h, pred_h0, clean_h, clean_h0):
    """(h fooled, h0 fooled, shared) per sample: a model is fooled when its prediction
    left its clean one; shared when both are fooled into the same class."""
    fooled_h = pred_h != clean_h
    fooled_h0 = pred_h0 != clean_h0
    return fooled_h, fooled_h0, fooled_h & fooled_h0 & (pred_h == pred_h0)


def pgd_loss(logits_h, logits_h0, y, clean_h, clean_h0, beta1: float, beta2: float):
    """beta1 L_adv + beta2 L_js at one perturbation (module docstring), and the per-sample
    shared mask it was computed with."""
    n = y.shape[0]
    fooled_h, fooled_h0, shared = shared_status(jnp.argmax(logits_h, -1),
                                                jnp.argmax(logits_h0, -1), clean_h, clean_h0)
    ce_h = optax.softmax_cross_entropy_with_integer_labels(logits_h, y)
    ce_h0 = optax.softmax_cross_entropy_with_integer_labels(logits_h0, y)
    l_adv = -(jnp.sum(jnp.where(fooled_h, 0.0, ce_h)) + jnp.sum(jnp.where(fooled_h0, 0.0, ce_h0)))
    l_adv = l_adv / (2 * n)
    l_js = jnp.sum(jnp.where(shared, 0.0, js_divergence(logits_h, logits_h0))) / n
    return beta1 * l_adv + beta2 * l_js, shared


def shared_loss(logits_adv, pred_h0_adv, pred_h0_clean, y):
    """(L_shared, unlearn mask): the reference's -log(1 - p) pair on p =
    softmax(logits_adv)[h0(x')] over samples with h0(x') != y and h0(x') != h0(x),
    divided by 2N."""
    unlearn = (pred_h0_adv != y) & (pred_h0_adv != pred_h0_clean)
    probs = jax.nn.softmax(logits_adv, -1)
    hot = jax.nn.one_hot(pred_h0_adv, logits_adv.shape[-1], dtype=probs.dtype)
    pos = jnp.sum(probs * hot, -1)
    neg = jnp.sum(probs * (1 - hot), -1)
    per = (-jnp.log(1e-6 + jnp.minimum(neg, 0.999))
           - jnp.log(1 + 1e-6 - jnp.maximum(pos, 0.001)))
    return jnp.sum(jnp.where(unlearn, per, 0.0)) / (2 * y.shape[0]), unlearn


# --------------------------------------------------------------------------------- PGD
def _start(x, eps: float, norm: str, init: str, key):
    if init == "random":
        return random_start(key, x, eps, norm)
    value = {"max": eps, "min": -eps, "zero": 0.0}[init]
    return project(jnp.full_like(x, value), eps, norm)


def shared_pgd(logits_h: Callable, logits_h0: Callable, x, y, *, norm: str = "linf",
               eps: float = 0.2, step: float = 0.2, steps: int = 5, init: str = "max",
               beta1: float = 0.01, beta2: float = 1.0, clip: bool = False,
               key: jax.Array | None = None):
    """Shared adversarial examples for a batch of [0, 1] images (module docstring, 1).

    Args:
      logits_h, logits_h0: eval-mode logits of the model being purified and of the frozen
        original (``[B, H, W, C] -> [B, K]``).
      x: clean images in [0, 1] (uint8 is converted); y: true labels ``[B]``.
      norm, eps: the ball (``linf`` or ``l2``) and its radius.
      step, steps: sign-step size and most steps.
      init: ``max``, ``min``, ``zero`` or ``random`` (needs ``key``).
      beta1, beta2: weights of L_adv and L_js.
      clip: keep ``x + delta`` in [0, 1].

    Returns:
      ``(x_adv, info)``: ``x_adv = x + delta`` (in [0, 1] only with ``clip``) and
      ``info`` = ``iterations`` (steps taken, int32), ``stopped`` (every sample was
      shared), ``clean_h``, ``clean_h0`` (the clean predictions).
    """
    check_choice("norm", norm, NORMS)
    check_choice("init", init, INITS)
    if init == "random" and key is None:
        raise BdjaxError("init 'random' needs a key; accepted: key=jax.random.key(...).")
    x = to_unit(x)
    clean_h = jnp.argmax(logits_h(x), -1)
    clean_h0 = jnp.argmax(logits_h0(x), -1)
    box = (lambda d: clip_to_box(x, d)) if clip else (lambda d: d)

    def loss(delta):
        xa = x + delta
        return pgd_loss(logits_h(xa), logits_h0(xa), y, clean_h, clean_h0, beta1, beta2)

    grad = jax.value_and_grad(loss, has_aux=True)

    def body(c):
        (_, shared), g = grad(c["delta"])
        done = jnp.all(shared)  # shared samples have no gradient: nothing would move
        delta = box(project(c["delta"] - step * jnp.sign(g), eps, norm))
        return dict(i=c["i"] + jnp.where(done, 0, 1), done=done,
                    delta=jnp.where(done, c["delta"], delta))

    delta0 = box(_start(x, eps, norm, init, key))
    c = jax.lax.while_loop(lambda c: (c["i"] < steps) & ~c["done"], body,
                           dict(i=jnp.int32(0), done=jnp.bool_(False), delta=delta0))
    info = dict(iterations=c["i"], stopped=c["done"], clean_h=clean_h, clean_h0=clean_h0)
    return x + c["delta"], info


# ----------------------------------------------------------------------------- defense
def _step(model: Model, tx, config: SAUConfig, h0: State, state: State, opt, xb, yb, key):
    """One batch: shared PGD, then one Adam step on the outer loss."""
    k_pgd, k_drop = jax.random.split(key)
    x = to_unit(xb)
    x_adv, info = shared_pgd(lambda z: model.apply(state, z), lambda z: model.apply(h0, z),
                             x, yb, norm=config.norm, eps=config.eps, step=config.pgd_step,
                             steps=config.pgd_steps, init=config.init, beta1=config.beta1,
                             beta2=config.beta2, clip=config.clip, key=k_pgd)
    x_adv = jax.lax.stop_gradient(x_adv)
    pred_h0_adv = jnp.argmax(model.apply(h0, x_adv), -1)
    b = x.shape[0]

    def loss_fn(params):
        st = {**state, "params": params}
        both = jnp.concatenate([x, x_adv])
        if config.train_mode:
            logits, stats = model.apply(st, both, train=True, key=k_drop)
        else:  # eval mode makes samples independent: one pass serves both halves
            logits, stats = model.apply(st, both), state["batch_stats"]
        l_cl = cross_entropy(logits[:b], yb)
        l_at = cross_entropy(logits[b:], yb)
        l_sh, unlearn = shared_loss(logits[b:], pred_h0_adv, info["clean_h0"], yb)
        loss = config.lambda1 * l_cl + config.lambda2 * l_at + config.lambda3 * l_sh
        return loss, (stats, logits[b:], l_cl, l_sh, unlearn)

    (loss, (stats, adv_logits, l_cl, l_sh, unlearn)), g = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(g, opt, state["params"])
    state = {**state, "params": optax.apply_updates(state["params"], updates),
             "batch_stats": stats}
    # Shared at the PGD's end, judged by h before this step (the reference's test).
    _, _, shared = shared_status(jnp.argmax(adv_logits, -1), pred_h0_adv, info["clean_h"],
                                 info["clean_h0"])
    out = dict(train_loss=loss, clean_loss=l_cl, shared_loss=l_sh,
               shared_fraction=jnp.mean(shared), unlearn_fraction=jnp.mean(unlearn),
               pgd_iterations=info["iterations"])
    return state, opt, out


_REPORT = ("train_loss", "clean_loss", "shared_loss", "shared_fraction", "unlearn_fraction",
           "pgd_iterations")


def defend(model: Model, state: State, data: DefenseData, config: SAUConfig,
           key: jax.Array):
    """Runs SAU for one trial; returns (state, report).

    ``state`` is the frozen h0 and the start of h. Everything runs in one compiled
    program (fori over epochs, scan over batches, while over PGD steps), so the runner
    can ``vmap`` it. The report holds per epoch the batch means of the outer loss, its
    clean CE and L_shared terms, the fraction of shared adversarial examples at the
    PGD's end, the fraction of samples in L_shared, and the PGD steps taken.

    References:
      Wei et al., NeurIPS 2023 (SAU); BackdoorBench ``defense/sau.py``.
    """
    x, y = data.x_train, data.y_train
    n = x.shape[0]
    h0 = state
    tx = torch_adam(config.lr, amsgrad=True, b1=config.b1, b2=config.b2, eps=config.adam_eps,
                    weight_decay=config.weight_decay)

    def epoch(e, carry):
        st, os_, hist = carry
        k_perm, k_steps = jax.random.split(jax.random.fold_in(key, e))
        idx = batch_indices(k_perm, n, config.batch_size)
        keys = jax.random.split(k_steps, idx.shape[0])

        def body(c, inp):
            bi, k = inp
            st, os_, out = _step(model, tx, config, h0, c[0], c[1], x[bi], y[bi], k)
            return (st, os_), {k_: jnp.asarray(v, jnp.float32) for k_, v in out.items()}

        (st, os_), outs = jax.lax.scan(body, (st, os_), (idx, keys))
        hist = {k_: hist[k_].at[e].set(jnp.mean(outs[k_])) for k_ in _REPORT}
        return st, os_, hist

    hist0 = {k_: jnp.zeros((config.epochs,), jnp.float32) for k_ in _REPORT}
    state, _, hist = jax.lax.fori_loop(0, config.epochs, epoch,
                                       (state, tx.init(state["params"]), hist0))
    return state, hist


__all__ = ["SAUConfig", "defend", "dataset_settings", "shared_pgd", "shared_loss",
           "pgd_loss", "js_divergence", "shared_status"]
