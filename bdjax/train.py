"""Train a (backdoored) classifier: every epoch is one compiled call (scan over batches).

Defaults are BackdoorBench's attack training (REFERENCE.md): SGD lr 0.01, momentum 0.9,
weight decay 5e-4, batch 128, 100 epochs, random crop + flip, and a cosine schedule
stepped once per epoch with ``T_max = 100`` whatever the number of epochs (so a 50-epoch
run ends near half the learning rate, as BackdoorBench's GTSRB runs do).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.errors import BdjaxError
from bdjax.kernels import SGDConfig, StepOptions, evaluate, run_epoch, sgd, steps_per_epoch
from bdjax.models import Model, State


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (REFERENCE.md defaults for CIFAR-10).

    Attributes:
      epochs, batch_size, lr, momentum, weight_decay: the SGD run.
      schedule: ``cosine`` or ``constant`` (:class:`bdjax.kernels.SGDConfig`).
      schedule_unit: the cosine advances per ``epoch`` or per ``batch``.
      t_max: the cosine's half period in ``schedule_unit``s; 0 = the whole run.
      augment: random crop (and flip where the dataset allows it).
      label_smoothing: ``1 - eps`` on the true class, ``eps / (C - 1)`` on the others.
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    schedule_unit: str = "epoch"
    t_max: int = 100
    augment: bool = True
    label_smoothing: float = 0.0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 1.")
        if not self.lr > 0:
            raise BdjaxError(f"lr {self.lr!r} is invalid; accepted: > 0.")
        if not 0 <= self.label_smoothing < 1:
            raise BdjaxError(f"label_smoothing {self.label_smoothing!r} is invalid; "
                             "accepted: [0, 1).")
        self.sgd  # validates schedule, schedule_unit and t_max

    @property
    def sgd(self) -> SGDConfig:
        return SGDConfig(self.lr, self.momentum, self.weight_decay, self.schedule,
                         self.schedule_unit, self.t_max)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4, 5))
def _epoch(model, tx, opts, batch_size, state, opt_state, x, y, key):
    return run_epoch(model, tx, opts, batch_size, state, opt_state, x, y, key)


@functools.partial(jax.jit, static_argnums=0)
def _eval(model, state, x, y):
    return evaluate(model, state, x, y)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="epoch", file=sys.stderr, leave=True,
                dynamic_ncols=True)


def fit_loop(epoch_fn, carry, epochs: int, key: jax.Array, *, progress: bool = True,
             val_fn=None):
    """The training loop shared by plain and training-control attacks: epoch ``e`` runs
    ``epoch_fn(carry, fold_in(key, e + 1)) -> (carry, loss, acc)`` (one compiled call),
    then ``val_fn(carry) -> (val_acc, val_loss)`` if given; a non-finite loss stops the
    run with one sentence. Returns (carry, history)."""
    bar = _progress(epochs, progress)
    history = []
    try:
        for epoch in range(epochs):
            t0 = time.perf_counter()
            carry, loss, acc = epoch_fn(carry, jax.random.fold_in(key, epoch + 1))
            row = {"epoch": epoch + 1, "loss": float(loss), "acc": float(acc)}
            if val_fn is not None:
                vacc, vloss = val_fn(carry)
                row.update(val_acc=float(vacc), val_loss=float(vloss))
            row["seconds"] = time.perf_counter() - t0
            if not np.isfinite(row["loss"]):
                raise BdjaxError(f"training diverged at epoch {epoch + 1} (loss {row['loss']});"
                                 " accepted: a smaller lr.")
            history.append(row)
            if bar is not None:
                bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()
                                 if k in ("loss", "acc", "val_acc")})
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return carry, history


def train(model: Model, x: np.ndarray, y: np.ndarray, config: TrainConfig, key: jax.Array,
          *, flip: bool = True, state: State | None = None, progress: bool = True,
          val: tuple[np.ndarray, np.ndarray] | None = None):
    """Trains ``model`` on uint8 images ``x`` with labels ``y``.

    Args:
      model: the classifier.
      x, y: training images (uint8 [N, H, W, C]) and int labels.
      config: hyperparameters.
      key: the root key; init uses ``fold_in(key, 0)``, epoch e ``fold_in(key, e + 1)``.
      flip: allow horizontal flips in augmentation (False for GTSRB).
      state: start from this state instead of a fresh init.
      progress: show a progress bar with loss and accuracy.
      val: optional (x, y) evaluated after every epoch for the display and history.

    Returns:
      (state, history) where history is a list of per-epoch dicts.
    """
    state = model.init(jax.random.fold_in(key, 0)) if state is None else state
    tx = sgd(config.sgd, steps_per_epoch(len(x), config.batch_size), config.epochs)
    opts = StepOptions(augment=config.augment, flip=flip,
                       label_smoothing=config.label_smoothing)
    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y, jnp.int32)

    def epoch_fn(carry, k):
        st, os_, loss, acc = _epoch(model, tx, opts, config.batch_size, *carry, x_dev, y_dev, k)
        return (st, os_), loss, acc

    val_fn = None
    if val is not None:
        xv, yv = jnp.asarray(val[0]), jnp.asarray(val[1])
        val_fn = lambda carry: _eval(model, carry[0], xv, yv)  # noqa: E731
    (state, _), history = fit_loop(epoch_fn, (state, tx.init(state["params"])), config.epochs,
                                   key, progress=progress, val_fn=val_fn)
    return state, history
