"""NAD: neural attention distillation (Li et al., ICLR 2021; survey, papers/001, IV).

A teacher is the backdoored model fine-tuned on the defender's clean images; the
student, starting again from the backdoored model, is trained on the same images with
cross-entropy plus attention-transfer losses that pull its attention maps toward the
teacher's at the network's last stages. The attention map of a stage output ``f``
([B, H, W, C]) is ``A = sum_c |f_c|^p`` normalised by its L2 norm over H x W (+1e-6);
each stage adds ``beta * mean((A_student - stop_gradient(A_teacher))^2)``.

What the survey's fork runs (``defense/nad.py``, ``config/defense/nad/cifar10.yaml``):

- teacher: ``te_epochs`` = 10 epochs of plain fine-tuning with the YAML's optimizer
  (SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, augmentation) and
  ``CosineAnnealingLR(T_max=100)`` stepped per epoch: bdjax runs FT
  (:mod:`bdjax.defenses.ft`) with those settings;
- student: ALSO ``te_epochs`` epochs (the YAML's ``epochs: 100`` is unused), same SGD
  but no scheduler step: ``adjust_learning_rate`` sets lr 0.01 below epoch 20 and 1e-4
  from there, so 10 epochs run at a constant 0.01;
- PreAct-ResNet18: 500 AT(layer3 output) + 1000 AT(layer4 output) + 1000 AT(pooled
  features) (``children()[:-3]``, ``[:-2]``, ``[:-1]``), p = 2. The pooled map is 1 x 1,
  so it normalises to ~1 for both networks and its term is ~0; bdjax computes it (the
  global average of the last stage, ``beta3``) to run the same loss;
- it trains on all SPC images (``val_ratio=0``), returns the student after the last
  epoch.

The stages are each model's ``ModelSpec.stages`` (the last two): PreAct-ResNet18 the
outputs of ``layer3`` and ``layer4``, VGG19-BN its 4th and 5th conv blocks (before
their max-pool), the small CNN its 3rd and 4th conv-BN-ReLU stages.

Differences from the reference:

- VGG19-BN: the fork's VGG branch distils only the 7 x 7 map after ``avgpool``, which
  replicates the 1 x 1 last feature map and so normalises to the same constant for
  both networks (a loss of ~0: NAD degenerates to fine-tuning). bdjax distils the last
  two conv blocks as for the other models, as the paper intends.
- The fork runs the student's forward pass four times per batch in train mode (once
  for the logits, once per attention map), so BatchNorm's running statistics move four
  times per step toward the same batch; bdjax runs one pass (same gradients; the
  running statistics move once).
- ``adjust_learning_rate`` hard-codes 0.01 from epoch 2 whatever ``lr`` is; bdjax keeps
  ``lr`` and multiplies it by 0.01 from epoch 20 (the same rates at the default lr).
- Mixed precision (``amp: True``) is not used; the model's dtype decides.
- The last partial batch is filled (static shapes), as in FT.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from bdjax.data import DefenseData
from bdjax.defenses import ft
from bdjax.errors import BdjaxError
from bdjax.kernels import cross_entropy, crop_flip, scan_epoch, steps_per_epoch, to_unit
from bdjax.kernels.capture import stage_outputs
from bdjax.models import Model, State
from bdjax.train import TrainConfig

_EPS = 1e-6
_DECAY_EPOCH = 20  # the fork's adjust_learning_rate: 1e-4 from epoch 20


@dataclasses.dataclass(frozen=True)
class NADConfig(TrainConfig):
    """NAD settings (REFERENCE.md, NAD row; the fork's CIFAR-10 YAML).

    The :class:`TrainConfig` fields are the teacher's fine-tuning (FT: SGD lr 0.01,
    momentum 0.9, weight decay 5e-4, cosine with T_max 100 per epoch, batch 256);
    ``epochs`` is its length (the fork's ``te_epochs``). Plus:

    Attributes:
      student_epochs: the student's training epochs (the fork: ``te_epochs`` too).
      student_lr: the student's constant learning rate (x0.01 from epoch 20).
      beta1, beta2: attention-transfer weights of the model's two stages
        (``ModelSpec.stages``; the fork: 500 layer3, 1000 layer4).
      beta3: weight of the pooled last-stage map (1 x 1; a ~0 loss, as the fork's).
      p: the power of the attention map.
      flip: horizontal flips in augmentation (set from the dataset by the runner).
    """

    epochs: int = 10
    batch_size: int = 256
    student_epochs: int = 10
    student_lr: float = 0.01
    beta1: float = 500.0
    beta2: float = 1000.0
    beta3: float = 1000.0
    p: float = 2.0
    flip: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.student_epochs < 1:
            raise BdjaxError(f"student_epochs {self.student_epochs!r} is invalid; "
                             "accepted: >= 1.")
        if not self.student_lr > 0:
            raise BdjaxError(f"student_lr {self.student_lr!r} is invalid; accepted: > 0.")
        for name in ("beta1", "beta2", "beta3"):
            if getattr(self, name) < 0:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 0.")
        if not self.p > 0:
            raise BdjaxError(f"p {self.p!r} is invalid; accepted: > 0.")

    @property
    def uses_validation(self) -> bool:
        return False  # the fork trains teacher and student on all SPC images

    @property
    def teacher(self) -> ft.FTConfig:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        return ft.FTConfig(**{k: getattr(self, k) for k in fields}, flip=self.flip)


def attention_map(f, p: float):
    """``sum_c |f_c|^p`` of a [B, H, W, C] stage output, divided by its L2 norm over
    H x W (+1e-6): [B, H, W]."""
    a = jnp.sum(jnp.abs(f.astype(jnp.float32)) ** p, axis=-1)
    norm = jnp.sqrt(jnp.sum(jnp.square(a), axis=(1, 2), keepdims=True))
    return a / (norm + _EPS)


def at_loss(f_student, f_teacher, p: float):
    """Mean squared difference of the two attention maps (the teacher's held fixed)."""
    diff = attention_map(f_student, p) - jax.lax.stop_gradient(attention_map(f_teacher, p))
    return jnp.mean(jnp.square(diff))


def _distill_loss(feats_s, feats_t, config: NADConfig):
    pool = lambda f: jnp.mean(f, axis=(1, 2), keepdims=True)
    loss = config.beta3 * at_loss(pool(feats_s[-1]), pool(feats_t[-1]), config.p)
    for beta, fs, ft_ in zip((config.beta1, config.beta2), feats_s, feats_t):
        loss = loss + beta * at_loss(fs, ft_, config.p)
    return loss


def defend(model: Model, state: State, data: DefenseData, config: NADConfig, key: jax.Array):
    """Teacher fine-tuning, then the student's distillation, for one trial; returns
    (student state, report). The report holds the teacher's FT losses and the
    student's per-epoch CE and attention losses."""
    if len(model.spec.stages) != 2:
        raise BdjaxError(f"model {model.name!r} names {len(model.spec.stages)} stages; "
                         "accepted: a model with two (ModelSpec.stages).")
    k_teacher, k_student = jax.random.split(key)
    teacher, teacher_report = ft.defend(model, state, data, config.teacher, k_teacher)
    x, y = data.x_train, data.y_train
    spe = steps_per_epoch(x.shape[0], config.batch_size)
    lr = optax.piecewise_constant_schedule(config.student_lr, {_DECAY_EPOCH * spe: 0.01})
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(lr, momentum=config.momentum or None))

    def step(st, os_, xb, yb, k):
        k_aug, k_drop = jax.random.split(k)
        xb = crop_flip(xb, k_aug, flip=config.flip) if config.augment else xb
        xb = to_unit(xb)
        _, feats_t = stage_outputs(model, teacher, xb)  # eval mode, as the fork's teacher

        def loss_fn(params):
            (logits, new_bs), feats_s = stage_outputs(
                model, {**st, "params": params}, xb, train=True, key=k_drop)
            ce = cross_entropy(logits, yb)
            at = _distill_loss(feats_s, feats_t, config)
            return ce + at, (new_bs, ce, at)

        (_, (new_bs, ce, at)), grads = jax.value_and_grad(loss_fn, has_aux=True)(st["params"])
        updates, os_ = tx.update(grads, os_, st["params"])
        params = optax.apply_updates(st["params"], updates)
        return {**st, "params": params, "batch_stats": new_bs}, os_, jnp.stack([ce, at]), 0.0

    nan = jnp.full((config.student_epochs, 2), jnp.nan, jnp.float32)

    def epoch(e, c):
        st, os_, losses, _ = scan_epoch(step, config.batch_size, c[0], c[1], x, y,
                                        jax.random.fold_in(k_student, e))
        return st, os_, c[2].at[e].set(losses)

    student, _, losses = jax.lax.fori_loop(0, config.student_epochs, epoch,
                                           (state, tx.init(state["params"]), nan))
    return student, {"teacher_loss": teacher_report["train_loss"], "ce": losses[:, 0],
                     "attention_loss": losses[:, 1]}
