"""NPD: the Neural Polarizer, a learned linear filter inserted into a frozen model.

A polariser (a 1x1 convolution C -> C without bias, initialised to the identity, followed
by BatchNorm) transforms the INPUT of one convolution of the backdoored model, named by
``model.spec.polariser_at`` (small_cnn ``conv4``; PreAct-ResNet18 ``layer4_1/conv1``,
which only feeds the residual branch; VGG19-BN ``conv15``, the last 512->512 conv, the
fork's ``features.49``). The backbone is frozen and in eval mode; only the polariser
learns (Algorithm 1):

1. warm-up: ``warmup_epochs`` of cross-entropy with plain SGD at ``warmup_lr``, the
   polariser's BN in training mode (batch statistics; its running statistics are
   estimated here);
2. ``epochs`` of the bi-level problem, Eq. (5), one SGD step per batch, the polariser's
   BN in eval mode (running statistics fixed, scale and bias learned):
   - y' = argmax of the polarised model's clean logits with the true class masked out,
     once per batch (T ~ y', Section 3.3);
   - delta* = targeted PGD toward y' inside an L2 ball of radius ``radius`` in [0, 1]
     pixel space, Eq. (4), as BackdoorBench runs it: from zero, ``pgd_steps`` sign steps
     of ``pgd_step``, each followed by the projection and then the test "more than
     ``stop_fraction`` of the batch reaches y'" (so at least one step); every sample
     moves, the perturbation stays unclipped in its ball and only the image is clamped
     to [0, 1]; the per-sample cross-entropy is clamped at 80;
   - loss = lambda1 L_bn + lambda2 L_asr + lambda3 L_bce, with L_bn the cross-entropy on
     the clean images, L_asr = -log(1 - s_{y'}) on the adversarial ones (Eq. 2) and
     L_bce = CE(s, y_bce) - log(1 - max_{k != y} s_k) on the adversarial ones (Eq. 3).

Defaults follow the code that produced the published tables (BackdoorBench's
``defense/npd.py``; the survey's fork runs it unchanged but for its data), with the
paper's choice as a setting where they differ:

- both "1 - p" terms are floored, ``-log(1 - p + floor)`` with ``floor = 1e-4`` (the
  code's ``-log(1.0001 - p + 1e-12)``), so a saturated sample's loss and gradient stay
  bounded; ``floor=0`` is the paper's unbounded ``-log(1 - p)``;
- L_bce's cross-entropy term is toward the polarised model's prediction on the clean
  image (``bce_label="prediction"``); the paper's Eq. (3) uses y (``"true"``);
- the reference weighs the two L_bce terms apart (its ``lmd2`` on the cross-entropy,
  ``lmd3`` on the margin term; ``lmd4`` on L_asr): ``lambda3_ce`` and ``lambda3``. They
  are equal on CIFAR-10 (0.4) and GTSRB (0.5); Tiny-ImageNet uses 1.0 and 0.1;
- radius 5 on GTSRB (the code; the paper says 3);
- BackdoorBench trains without augmentation (``augment=False``, its "train = False for
  better performance"); the survey's fork uses the training transform (crop, and flip
  on CIFAR-10): ``configs/survey_cifar10.py``.

Per-dataset values (:func:`config_for`, wired into runs through
:func:`dataset_settings`): CIFAR-10 (and bdjax's synthetic set) radius 3, weights
(1, 0.4, 0.4, 0.4), 5 warm-up epochs; GTSRB radius 5, (1, 0.5, 0.5, 0.5); Tiny-ImageNet
radius 6, (1, 0.1, 0.1, 1.0) in the order (lambda1, lambda2, lambda3, lambda3_ce), no
warm-up. The defender's images all train (no validation split); BackdoorBench draws
its 5% class-balanced, the fork its SPC images with ``val_ratio=0``.

The returned state is the input state plus ``state["polariser"] = {"params",
"batch_stats"}``; ``Model.apply`` (and so every evaluation and checkpoint) honours it,
as does :func:`apply_with_polariser`. The backbone's own modules are not edited: the
polariser enters through ``flax.linen.intercept_methods``.

Differences from the reference:

- y' masks the true class with -inf; the code sets its logit to -10, which picks the
  true class when every other logit is below -10.
- Tiny-ImageNet's PGD in the code takes raw gradient steps (``SGD(lr=0.1)`` on the mean
  loss) and its main phase runs the polariser's BN in training mode; bdjax uses the
  sign steps and eval-mode BN of the other datasets there.
- The code computes L_bce's margin class with ``argsort`` (top two); bdjax with a masked
  argmax (the same class but for exact ties).
- The last partial batch is filled with images of the same shuffled pass instead of
  being a smaller batch (static shapes under ``jit``).

Measured on bdjax's synthetic data (small CNN, BadNets 10%): the target estimate works
on a well-trained model (y' is the backdoor target for 65% of the demo model's training
images; ~10% on a model trained without augmentation, whose runner-ups carry no trace of
the backdoor, and there NPD leaves the ASR at ~95%).

References:
  Zhu, Wei, Zha, Wu, "Neural Polarizer: A Lightweight and Effective Backdoor Defense via
  Purifying Poisoned Features", NeurIPS 2023 (papers/004), Eqs. (2)-(5), Algorithm 1;
  BackdoorBench ``defense/npd.py`` and ``config/defense/npd/*.yaml``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from bdjax.data import DefenseData
from bdjax.defenses.reference import REFERENCE_DATASETS, known_dataset, reference_dataset
from bdjax.errors import BdjaxError, check_choice
from bdjax.kernels import (batch_indices, cross_entropy, crop_flip, evaluate, sgd,
                           steps_per_epoch, to_unit)
from bdjax.kernels.pgd import NORMS, STEP_KINDS, pgd
from bdjax.models import Model, State
from bdjax.models.polariser import (apply_with_polariser, init_polariser, polarise,
                                    polariser_interceptor)
from bdjax.train import TrainConfig


# Per-dataset settings of the reference (BackdoorBench config/defense/npd/*.yaml):
# radius, (lambda1, lambda2, lambda3, lambda3_ce) = (lmd1, lmd4, lmd3, lmd2), warm-up.
RADIUS = {"cifar10": 3.0, "gtsrb": 5.0, "tiny": 6.0}
LAMBDAS = {"cifar10": (1.0, 0.4, 0.4, 0.4), "gtsrb": (1.0, 0.5, 0.5, 0.5),
           "tiny": (1.0, 0.1, 0.1, 1.0)}
WARMUP = {"cifar10": 5, "gtsrb": 5, "tiny": 0}
BCE_LABELS = ("prediction", "true")
PGD_LOSS_BOUND = 80.0  # the code's loss.clamp_(-80, 80) inside its PGD


@dataclasses.dataclass(frozen=True)
class NPDConfig(TrainConfig):
    """NPD settings (REFERENCE.md, NPD row; CIFAR-10 defaults, see :func:`config_for`).

    The inherited SGD fields drive the main phase: 50 epochs, batch 128, lr 0.01,
    momentum 0.9, weight decay 5e-4, constant lr (the reference steps no scheduler for
    the polariser), no augmentation (BackdoorBench trains on test-time transforms).

    Attributes:
      flip: horizontal flips when ``augment`` (set from the dataset by the runner).
      warmup_epochs: cross-entropy epochs before the main phase (Algorithm 1, line 4).
      warmup_lr: plain SGD learning rate of the warm-up (no momentum, no decay).
      norm: PGD ball, ``l2`` (reference) or ``linf``.
      radius: the ball's radius rho in [0, 1] pixel units (3 CIFAR-10, 5 GTSRB, 6 Tiny).
      pgd_step: PGD step size.
      pgd_steps: PGD steps per batch (at most; see ``stop_fraction``).
      step_kind: ``sign`` (reference), ``normalized`` or ``auto``.
      stop_fraction: PGD stops once more than this fraction of the batch is classified
        as y' (tested after each step).
      lambda1, lambda2, lambda3: weights of L_bn, L_asr and L_bce's margin term
        ``-log(1 - max_{k != y} s_k)`` (the paper's lambdas; the code's lmd1, lmd4, lmd3).
      lambda3_ce: weight of L_bce's cross-entropy term (the code's lmd2; the paper
        weighs it with lambda3).
      bce_label: the label of L_bce's cross-entropy term: ``prediction`` (the code: the
        polarised model's prediction on the clean image) or ``true`` (the paper: y).
      floor: ``-log(1 - p + floor)`` in L_asr and L_bce (the code: 1e-4; the paper: 0).
    """

    epochs: int = 50
    batch_size: int = 128
    schedule: str = "constant"
    augment: bool = False
    flip: bool = True
    warmup_epochs: int = 5
    warmup_lr: float = 1e-4
    norm: str = "l2"
    radius: float = 3.0
    pgd_step: float = 0.1
    pgd_steps: int = 2
    step_kind: str = "sign"
    stop_fraction: float = 0.6
    lambda1: float = 1.0
    lambda2: float = 0.4
    lambda3: float = 0.4
    lambda3_ce: float = 0.4
    bce_label: str = "prediction"
    floor: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        check_choice("norm", self.norm, NORMS)
        check_choice("step_kind", self.step_kind, STEP_KINDS)
        check_choice("bce_label", self.bce_label, BCE_LABELS)
        for name in ("warmup_epochs", "pgd_steps"):
            if getattr(self, name) < 0:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 0.")
        for name in ("radius", "pgd_step", "warmup_lr"):
            if not getattr(self, name) > 0:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: > 0.")
        if not 0 < self.stop_fraction <= 1:
            raise BdjaxError(f"stop_fraction {self.stop_fraction!r} is out of range; "
                             "accepted: (0, 1].")
        for name in ("lambda1", "lambda2", "lambda3", "lambda3_ce", "floor"):
            if getattr(self, name) < 0:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 0.")

    @property
    def uses_validation(self) -> bool:
        return False


def _reference_values(name: str) -> dict:
    l1, l2, l3, l3ce = LAMBDAS[name]
    return dict(radius=RADIUS[name], lambda1=l1, lambda2=l2, lambda3=l3, lambda3_ce=l3ce,
                warmup_epochs=WARMUP[name])


def config_for(dataset: str, **overrides) -> NPDConfig:
    """NPDConfig with the reference radius, weights and warm-up of ``dataset``.

    CIFAR-10 (and the synthetic set, CIFAR-100): radius 3, weights (1, 0.4, 0.4, 0.4),
    5 warm-up epochs; GTSRB: 5, (1, 0.5, 0.5, 0.5), 5; Tiny-ImageNet: 6,
    (1, 0.1, 0.1, 1.0), none. ``overrides`` win.
    """
    if not known_dataset(dataset):
        check_choice("dataset for NPD defaults", dataset, REFERENCE_DATASETS)
    return NPDConfig(**{**_reference_values(reference_dataset(dataset)), **overrides})


def dataset_settings(dataset: str, model: str) -> dict:
    """The reference's radius, weights and warm-up for ``dataset`` (the runner's layer
    under config files and ``--set``)."""
    return _reference_values(reference_dataset(dataset))


# ------------------------------------------------------------------------------ losses
def log_one_minus_softmax(logits, k, floor: float = 0.0):
    """log(1 - softmax(logits)[k] + floor) per row.

    ``log(1 - s_k)`` is logsumexp over the other classes minus logsumexp over all
    (stable where s_k -> 1); a ``floor`` > 0 adds ``floor + 1e-12`` inside the log as
    the reference's ``log(1.0001 - p + 1e-12)`` does, through ``logaddexp``, so the
    result stays finite and its gradient bounded.
    """
    others = jnp.where(jax.nn.one_hot(k, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    out = jax.nn.logsumexp(others, -1) - jax.nn.logsumexp(logits, -1)
    if floor:
        out = jnp.logaddexp(out, jnp.log(jnp.float32(floor + 1e-12)))
    return out


def _masked_argmax(logits, y):
    """argmax over classes != y."""
    return jnp.argmax(jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf,
                                logits), -1)


def npd_losses(logits_clean, logits_adv, y, y_target, y_bce=None, floor: float = 0.0):
    """(L_bn, L_asr, L_bce's margin term, L_bce's cross-entropy term), batch means.

    L_bn = CE(clean, y); L_asr = -log(1 - s_{y'} + floor) (Eq. 2); the margin term
    -log(1 - max_{k != y} s_k + floor) and the cross-entropy term CE(adv, y_bce) make
    up L_bce (Eq. 3; ``y_bce`` defaults to ``y``, the paper's choice).
    """
    y_bce = y if y_bce is None else y_bce
    l_bn = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_clean, y))
    l_asr = -jnp.mean(log_one_minus_softmax(logits_adv, y_target, floor))
    top_other = _masked_argmax(logits_adv, y)
    l_margin = -jnp.mean(log_one_minus_softmax(logits_adv, top_other, floor))
    l_ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_adv, y_bce))
    return l_bn, l_asr, l_margin, l_ce


# ----------------------------------------------------------------------------- defense
def _with_params(state: State, pol: dict, params) -> State:
    return {**state, "polariser": {**pol, "params": params}}


def _batch(x, config: NPDConfig, key):
    return to_unit(crop_flip(x, key, flip=config.flip) if config.augment else x)


def _warmup_step(model: Model, tx, config: NPDConfig, state: State, opt, xb, yb):
    """Algorithm 1 line 4: CE with the polariser's BN in training mode."""

    def loss_fn(params):
        logits, stats = apply_with_polariser(model, _with_params(state, state["polariser"],
                                                                 params), xb, train=True)
        return cross_entropy(logits, yb, config.label_smoothing), stats

    pol = state["polariser"]
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(pol["params"])
    updates, opt = tx.update(g, opt, pol["params"])
    new = {"params": optax.apply_updates(pol["params"], updates), "batch_stats": stats}
    return {**state, "polariser": new}, opt, loss


def adversarial_batch(model: Model, config: NPDConfig, state: State, xb, yb):
    """(y', the clean prediction, delta*-perturbed images, PGD info) for one batch
    (Algorithm 1 line 7; the PGD as BackdoorBench runs it, module docstring)."""
    logits_fn = lambda z: apply_with_polariser(model, state, z)
    clean = logits_fn(xb)
    y_target = _masked_argmax(clean, yb)
    x_adv, info = pgd(logits_fn, xb, yb, norm=config.norm, eps=config.radius,
                      step=config.pgd_step, steps=config.pgd_steps, targeted=True,
                      target=y_target, stop_fraction=config.stop_fraction,
                      step_kind=config.step_kind, exit_check="after",
                      freeze_successes=False, clip="image", loss_bound=PGD_LOSS_BOUND)
    return y_target, jnp.argmax(clean, -1), jax.lax.stop_gradient(x_adv), info


def _main_step(model: Model, tx, config: NPDConfig, state: State, opt, xb, yb):
    """Algorithm 1 lines 7-8: y', delta* by targeted PGD, one SGD step on Eq. (5)."""
    y_target, y_pred, x_adv, info = adversarial_batch(model, config, state, xb, yb)
    y_bce = y_pred if config.bce_label == "prediction" else yb
    b = xb.shape[0]
    pol = state["polariser"]

    def loss_fn(params):
        # BN in eval mode makes samples independent, so one pass serves both batches.
        logits = apply_with_polariser(model, _with_params(state, pol, params),
                                      jnp.concatenate([xb, x_adv]))
        l_bn, l_asr, l_margin, l_ce = npd_losses(logits[:b], logits[b:], yb, y_target,
                                                 y_bce, config.floor)
        if config.label_smoothing:
            l_bn = cross_entropy(logits[:b], yb, config.label_smoothing)
        return (config.lambda1 * l_bn + config.lambda2 * l_asr + config.lambda3 * l_margin
                + config.lambda3_ce * l_ce)

    loss, g = jax.value_and_grad(loss_fn)(pol["params"])
    updates, opt = tx.update(g, opt, pol["params"])
    state = _with_params(state, pol, optax.apply_updates(pol["params"], updates))
    return state, opt, loss, info["success_rate"], info["iterations"]


def _epochs(step, n_epochs: int, batch_size: int, state, opt, x, y, key, n_out: int):
    """``n_epochs`` shuffled passes of ``step`` (fori over epochs, scan over batches);
    returns the state, optimiser state and per-epoch means of the step's extra outputs."""
    n = x.shape[0]

    def epoch(e, carry):
        st, os_, hist = carry
        k_perm, k_aug = jax.random.split(jax.random.fold_in(key, e))
        idx = batch_indices(k_perm, n, batch_size)
        keys = jax.random.split(k_aug, idx.shape[0])

        def body(c, inp):
            b, k = inp
            st, os_, *outs = step(c[0], c[1], x[b], y[b], k)
            return (st, os_), tuple(jnp.asarray(o, jnp.float32) for o in outs)

        (st, os_), outs = jax.lax.scan(body, (st, os_), (idx, keys))
        hist = tuple(h.at[e].set(jnp.mean(o)) for h, o in zip(hist, outs))
        return st, os_, hist

    hist0 = tuple(jnp.zeros((n_epochs,), jnp.float32) for _ in range(n_out))
    return jax.lax.fori_loop(0, n_epochs, epoch, (state, opt, hist0))


def defend(model: Model, state: State, data: DefenseData, config: NPDConfig,
           key: jax.Array):
    """Learns a neural polariser for one trial; returns (state, report).

    The returned state is ``state`` plus ``"polariser"``. Everything runs in one
    compiled program (fori over epochs, scan over batches, while over PGD steps), so the
    runner can ``vmap`` it. The report holds per epoch the warm-up loss, the Eq. (5)
    loss, the PGD success rate and its steps, and the training accuracy of the final
    polarised model on the defender's images.

    References:
      Zhu et al., NeurIPS 2023, Algorithm 1 and Eq. (5).
    """
    x, y = data.x_train, data.y_train
    state = {**state, "polariser": init_polariser(model)}
    k_warm, k_main = jax.random.split(key)

    warm_tx = optax.sgd(config.warmup_lr)
    warm = lambda st, os_, xb, yb, k: _warmup_step(model, warm_tx, config, st, os_,
                                                   _batch(xb, config, k), yb)
    state, _, (warm_loss,) = _epochs(warm, config.warmup_epochs, config.batch_size, state,
                                     warm_tx.init(state["polariser"]["params"]), x, y,
                                     k_warm, 1)

    tx = sgd(config.sgd, steps_per_epoch(x.shape[0], config.batch_size), config.epochs)
    main = lambda st, os_, xb, yb, k: _main_step(model, tx, config, st, os_,
                                                 _batch(xb, config, k), yb)
    state, _, (loss, success, iters) = _epochs(main, config.epochs, config.batch_size, state,
                                               tx.init(state["polariser"]["params"]), x, y,
                                               k_main, 3)
    train_acc, _ = evaluate(model, state, x, y)
    report = dict(warmup_loss=warm_loss, train_loss=loss, pgd_success=success,
                  pgd_iterations=iters, train_acc=train_acc)
    return state, report


__all__ = ["NPDConfig", "config_for", "dataset_settings", "defend", "adversarial_batch",
           "apply_with_polariser", "init_polariser", "polarise", "polariser_interceptor",
           "npd_losses", "RADIUS", "LAMBDAS"]
