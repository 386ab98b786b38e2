"""FT-SAM: fine-tuning with adaptive sharpness-aware minimisation.

A backdoored model keeps large weights on the neurons that carry the trigger; plain
fine-tuning on a little clean data barely moves them. FT-SAM fine-tunes with ASAM, whose
weight perturbation ``e = rho * w^2 * g / ||(|w| g)||`` is largest on exactly those large
weights, so the minimiser is pushed to shrink them and the backdoor's shortcut breaks
while clean accuracy is kept (paper section 4).

Defaults from REFERENCE.md (FT-SAM row, CIFAR-10 / PreAct-ResNet18): 100 epochs, batch
256, SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine schedule, augmentation, label
smoothing 0.1, adaptive perturbation with rho 2 (see :func:`default_rho` for the other
datasets and models). Like the reference, the result is the model after the last epoch.

References:
  Zhu et al., "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
  Minimization", ICCV 2023, eq. 3-5 and section 5.1 (details of the proposed method).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bdjax.data import DefenseData
from bdjax.errors import BdjaxError
from bdjax.kernels import StepOptions, evaluate, sgd
from bdjax.kernels.sam import run_sam_epoch
from bdjax.models import Model, State
from bdjax.train import TrainConfig

# rho of the paper (section 5.1) for the adaptive perturbation; plain SAM uses 0.5.
_RHO_PREACT = {"cifar10": 2.0, "gtsrb": 8.0, "tiny": 8.0, "tiny_imagenet": 8.0}
_RHO_VGG = 6.0
_RHO_PLAIN = 0.5
# small_cnn on synthetic data (bdjax's CPU model, not in the paper): measured, see
# default_rho.
_RHO_SMALL_CNN = 2.0


def default_rho(dataset: str, model: str, adaptive: bool = True) -> float:
    """The perturbation radius of the FT-SAM paper for ``(dataset, model)``.

    ============================  ==========================================
    model                          rho (adaptive)
    ============================  ==========================================
    preact_resnet18                2 CIFAR-10, 8 GTSRB and Tiny-ImageNet
    vgg19_bn                       6 on every dataset
    small_cnn (bdjax, synthetic)   2 (not in the paper; measured, see below)
    anything else                  2 (the CIFAR-10 default)
    ============================  ==========================================

    Without the adaptive scaling (plain SAM) the paper uses 0.5 everywhere, because an
    unscaled ball of radius 2 would destroy clean accuracy.

    The small CNN on synthetic data is bdjax's own CPU test model. On the test fixture
    (BadNets 10%, SPC 100, batch 128, lr 0.02, 10 epochs) larger radii cut the ASR
    faster but cost clean accuracy: rho 2 / 3 / 4 / 8 gave ACC 77 / 73 / 71 / 42% and
    ASR 53 / 51 / 48 / 53% (from 84% / 93%). The CNN has ~100x fewer weights than
    PreAct-ResNet18, so the same radius is a larger perturbation per weight; the
    smallest paper value, 2, keeps accuracy, and with 15 epochs it halves the ASR
    (tests/test_ft_sam.py).

    References:
      FT-SAM (Zhu et al., ICCV 2023), section 5.1 "Details of proposed method".
    """
    if not adaptive:
        return _RHO_PLAIN
    if model == "vgg19_bn":
        return _RHO_VGG
    if model == "small_cnn":
        return _RHO_SMALL_CNN
    return _RHO_PREACT.get(dataset, 2.0)


@dataclasses.dataclass(frozen=True)
class FTSAMConfig(TrainConfig):
    """FT-SAM settings (REFERENCE.md, FT-SAM row): the SGD run of :class:`TrainConfig`
    with batch 256 and label smoothing 0.1, plus:

    Attributes:
      rho: perturbation radius (2 for CIFAR-10 / PreAct-ResNet18; :func:`default_rho`).
      adaptive: ASAM's weight-scaled perturbation (FT-SAM) instead of plain SAM.
      flip: horizontal flips in augmentation (set from the dataset by the runner).
    """

    batch_size: int = 256
    label_smoothing: float = 0.1
    rho: float = 2.0
    adaptive: bool = True
    flip: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not self.rho > 0:
            raise BdjaxError(f"rho {self.rho!r} is invalid; accepted: > 0.")
        if not 0 <= self.label_smoothing < 1:
            raise BdjaxError(f"label_smoothing {self.label_smoothing!r} is invalid; "
                             "accepted: [0, 1).")


def defend(model: Model, state: State, data: DefenseData, config: FTSAMConfig,
           key: jax.Array):
    """Fine-tunes ``state`` on ``data`` with (A)SAM for one trial; returns (state, report).

    One compiled program (``fori_loop`` over epochs, ``scan`` over batches) so the runner
    can ``vmap`` it over trials. The report holds the validation accuracy before, and per
    epoch the mean training loss (unperturbed pass) and the validation accuracy/loss.
    """
    n = data.x_train.shape[0]
    steps = -(-n // min(config.batch_size, n))
    tx = sgd(config.sgd, config.epochs * steps)
    opts = StepOptions(augment=config.augment, flip=config.flip,
                       label_smoothing=config.label_smoothing)
    val_acc0, val_loss0 = evaluate(model, state, data.x_val, data.y_val)
    zeros = jnp.zeros((config.epochs,), jnp.float32)
    carry0 = dict(state=state, opt=tx.init(state["params"]),
                  train_loss=zeros, val_acc=zeros, val_loss=zeros)

    def epoch(e, c):
        st, os_, loss, _ = run_sam_epoch(model, tx, opts, config.rho, config.adaptive,
                                         config.batch_size, c["state"], c["opt"],
                                         data.x_train, data.y_train, jax.random.fold_in(key, e))
        vacc, vloss = evaluate(model, st, data.x_val, data.y_val)
        return dict(state=st, opt=os_, train_loss=c["train_loss"].at[e].set(loss),
                    val_acc=c["val_acc"].at[e].set(vacc), val_loss=c["val_loss"].at[e].set(vloss))

    c = jax.lax.fori_loop(0, config.epochs, epoch, carry0)
    report = dict(val_acc_before=val_acc0, val_loss_before=val_loss0,
                  train_loss=c["train_loss"], val_acc=c["val_acc"], val_loss=c["val_loss"])
    return c["state"], report
