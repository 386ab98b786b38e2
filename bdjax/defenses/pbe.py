"""PBE: backdoor erasing by adversarial fine-tuning (Mu et al., "Progressive Backdoor
Erasing via connecting Backdoor and Adversarial Attacks", CVPR 2023; survey, papers/001).

Untargeted adversarial examples of a backdoored model tend to land in the backdoor's
target class, so fine-tuning on adversarial copies of the defender's images, labelled
with their TRUE labels, unlearns the trigger's shortcut; plain fine-tuning on the clean
images restores accuracy.

What the survey's fork runs (``defense/pbe.py``, ``config/defense/pbe/default.yaml``):
20 epochs, each one adversarial pass over the defender's images followed by one clean
pass ("the paper describes iterating between Step-1 and Step-2 of Algorithm 1", the
fork's comment; the authors' code instead trains adversarially for the first epochs
only: ``passes=first``). Each pass builds a fresh SGD (lr 0.01, momentum 0.9, weight
decay 5e-4, no schedule), batch 256, the training augmentation. The adversarial copies:
PGD-Linf from a uniform random start, radius 0.02 and step 0.02 / 5 in the model's
normalised input space, 7 sign steps ascending the cross-entropy of the true label, no
early stop. All SPC images train (``val_ratio=0``); the model after the last epoch is
returned. The one PGD kernel is :func:`bdjax.kernels.pgd.pgd`.

Differences from the reference:

- The fork clamps the NORMALISED adversarial image to [0, 1] (its PGD was written for
  [0, 1] inputs), which zeroes every negative normalised value, about half of each
  CIFAR-10 image. bdjax attacks in [0, 1] pixel space with the same ball: ``eps`` and
  the step are in normalised units by default (``eps_unit=normalized``: per channel
  ``eps * std`` in pixels, 0.02 x 0.25 ~ 1.3/255 on CIFAR-10), and the box is the valid
  pixel range. ``eps_unit=pixel`` takes them in pixels (the paper's 6/255).
- The fork runs the PGD with the model in train mode after the first batch (it calls
  ``model.train()`` after each attack), so BatchNorm normalises with each batch's
  statistics and its running statistics move on each of the 7 attack passes; bdjax
  attacks the model in eval mode (each sample's attack is its own) and updates the
  running statistics only in the training step.
- The random start is clipped into the pixel box before the first step (the fork's
  first forward pass may see values outside it).
- The last partial batch is filled (static shapes), as in FT.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bdjax.data import DefenseData
from bdjax.errors import BdjaxError, check_choice
from bdjax.kernels import StepOptions, crop_flip, run_epoch, scan_epoch, sgd, steps_per_epoch
from bdjax.kernels import to_unit, train_step
from bdjax.kernels.pgd import pgd
from bdjax.models import Model, State
from bdjax.train import TrainConfig

PASSES = ("alternate", "first")
EPS_UNITS = ("normalized", "pixel")


@dataclasses.dataclass(frozen=True)
class PBEConfig(TrainConfig):
    """PBE settings (the fork's YAML): the SGD fields of :class:`TrainConfig` (lr 0.01,
    momentum 0.9, weight decay 5e-4, constant) at batch 256 for 20 epochs, plus:

    Attributes:
      passes: ``alternate`` (the fork: an adversarial and a clean pass each epoch) or
        ``first`` (the authors' code: adversarial passes for ``adv_epochs`` epochs,
        clean passes after).
      adv_epochs: the adversarial epochs of ``passes=first`` (the authors: 3).
      eps: the PGD-Linf radius (the fork: 0.02).
      eps_unit: ``normalized`` (the fork: the model's normalised input space, per
        channel ``eps * std`` in pixels) or ``pixel``.
      step_scale: the PGD step is ``eps / step_scale`` (the fork: 5).
      adv_steps: PGD sign steps (the fork: 7).
      flip: horizontal flips in augmentation (set from the dataset by the runner).
    """

    epochs: int = 20
    batch_size: int = 256
    schedule: str = "constant"
    passes: str = "alternate"
    adv_epochs: int = 3
    eps: float = 0.02
    eps_unit: str = "normalized"
    step_scale: float = 5.0
    adv_steps: int = 7
    flip: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_choice("passes", self.passes, PASSES)
        check_choice("eps_unit", self.eps_unit, EPS_UNITS)
        if self.passes == "first" and not 0 <= self.adv_epochs <= self.epochs:
            raise BdjaxError(f"adv_epochs {self.adv_epochs!r} is invalid; accepted: 0.."
                             f"epochs ({self.epochs}).")
        if not self.eps > 0:
            raise BdjaxError(f"eps {self.eps!r} is invalid; accepted: > 0.")
        if not self.step_scale > 0:
            raise BdjaxError(f"step_scale {self.step_scale!r} is invalid; accepted: > 0.")
        if self.adv_steps < 1:
            raise BdjaxError(f"adv_steps {self.adv_steps!r} is invalid; accepted: >= 1.")

    @property
    def uses_validation(self) -> bool:
        return False  # the fork fine-tunes on all SPC images

    def radius(self, model: Model):
        """The Linf radius in pixels: a scalar, or per channel ``[1, 1, 1, C]``."""
        if self.eps_unit == "pixel":
            return jnp.float32(self.eps)
        return self.eps * jnp.asarray(model.std, jnp.float32).reshape(1, 1, 1, -1)


def defend(model: Model, state: State, data: DefenseData, config: PBEConfig, key: jax.Array):
    """Adversarial and clean fine-tuning passes for one trial; returns (state, report)
    with the per-epoch adversarial-pass loss and PGD success rate (NaN for epochs
    without an adversarial pass) and the clean-pass loss (NaN without one)."""
    x, y = data.x_train, data.y_train
    spe = steps_per_epoch(x.shape[0], config.batch_size)
    tx = sgd(config.sgd, spe, 1)  # a fresh optimizer per pass, as the fork's
    opts = StepOptions(augment=config.augment, flip=config.flip)
    no_aug = StepOptions(augment=False)
    eps = config.radius(model)
    step = eps / config.step_scale

    def adv_step(st, os_, xb, yb, k):
        k_aug, k_start, k_train = jax.random.split(k, 3)
        xb = to_unit(crop_flip(xb, k_aug, flip=config.flip) if config.augment else xb)
        x_adv, info = pgd(lambda z: model.apply(st, z), xb, yb, norm="linf", eps=eps,
                          step=step, steps=config.adv_steps, targeted=False, key=k_start,
                          freeze_successes=False)
        st, os_, loss, _ = train_step(model, tx, no_aug, st, os_, x_adv, yb, k_train)
        return st, os_, loss, info["success_rate"]  # scan_epoch averages both

    def adv_pass(st, k):
        st, _, loss, success = scan_epoch(adv_step, config.batch_size, st,
                                          tx.init(st["params"]), x, y, k)
        return st, loss, success

    def clean_pass(st, k):
        st, _, loss, _ = run_epoch(model, tx, opts, config.batch_size, st,
                                   tx.init(st["params"]), x, y, k)
        return st, loss

    nan = jnp.float32(jnp.nan)

    def epoch(e, c):
        st, rep = c
        k_adv, k_clean = jax.random.split(jax.random.fold_in(key, e))
        if config.passes == "alternate":
            st, adv_loss, success = adv_pass(st, k_adv)
            st, clean_loss = clean_pass(st, k_clean)
        else:
            def adversarial(st):
                st, loss, success = adv_pass(st, k_adv)
                return st, loss, success, nan

            def clean(st):
                st, loss = clean_pass(st, k_clean)
                return st, nan, nan, loss

            st, adv_loss, success, clean_loss = jax.lax.cond(e < config.adv_epochs,
                                                             adversarial, clean, st)
        new = (adv_loss, success, clean_loss)
        return st, tuple(r.at[e].set(v) for r, v in zip(rep, new))

    empty = tuple(jnp.full((config.epochs,), jnp.nan, jnp.float32) for _ in range(3))
    state, (adv_loss, success, clean_loss) = jax.lax.fori_loop(0, config.epochs, epoch,
                                                               (state, empty))
    return state, {"adv_loss": adv_loss, "pgd_success": success, "clean_loss": clean_loss}
