"""FT: plain fine-tuning of the backdoored model on the defender's clean data.

The baseline every mitigation paper reports (survey, papers/001, section IV). Defaults
from REFERENCE.md and BackdoorBench's ``defense/ft.py``: 100 epochs, batch 256, SGD lr
0.01, momentum 0.9, weight decay 5e-4, training augmentation, and a cosine schedule
stepped once per epoch with ``T_max = 100`` (BackdoorBench's scheduler, whatever
``epochs`` is). Like the reference, the result is the model after the last epoch, and
it trains on ALL of the defender's images (no validation split is held out).
``select`` can instead keep the epoch with the best accuracy or loss on the defender's
own validation split (never the test set), and ``patience`` stops early when that
validation score has not improved for so many epochs; only then is a split held out.

Differences from the reference (BackdoorBench ``defense/ft.py`` and the survey's fork):

- BackdoorBench draws its 5% uniformly from the training set; bdjax's ``ratio`` split
  is class-balanced (as BackdoorBench's NPD and FT-SAM draw theirs).
- The last partial batch is filled with images of the same shuffled pass instead of
  being a smaller batch (static shapes under ``jit``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bdjax.data import DefenseData
from bdjax.errors import BdjaxError, check_choice
from bdjax.kernels import StepOptions, evaluate, run_epoch, sgd, steps_per_epoch
from bdjax.models import Model, State
from bdjax.train import TrainConfig

SELECT = ("last", "val_acc", "val_loss")


@dataclasses.dataclass(frozen=True)
class FTConfig(TrainConfig):
    """FT settings (REFERENCE.md, FT row): the SGD run of :class:`TrainConfig` with
    batch 256, plus:

    Attributes:
      flip: horizontal flips in augmentation (set from the dataset by the runner).
      select: which epoch's model to return: ``last`` (reference), ``val_acc`` or
        ``val_loss`` on the defender's validation split.
      patience: with ``select`` != last, stop after this many epochs without
        improvement (0 = run all epochs).
    """

    batch_size: int = 256
    flip: bool = True
    select: str = "last"
    patience: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_choice("select", self.select, SELECT)
        if self.patience < 0:
            raise BdjaxError(f"patience {self.patience!r} is invalid; accepted: >= 0.")
        if self.patience and self.select == "last":
            raise BdjaxError(f"patience {self.patience!r} needs a validation score; accepted: "
                             "patience=0 with select=last, or select=val_acc/val_loss.")

    @property
    def uses_validation(self) -> bool:
        return self.select != "last"


def _score(cfg: FTConfig, val_acc, val_loss):
    """Higher is better."""
    return val_acc if cfg.select == "val_acc" else -val_loss


def defend(model: Model, state: State, data: DefenseData, config: FTConfig, key: jax.Array):
    """Fine-tunes ``state`` on ``data`` for one trial; returns (state, report).

    Everything runs in one compiled program (``fori_loop`` over epochs, ``scan`` over
    batches), so the runner can ``vmap`` it over trials. The report holds the training
    loss per epoch and, with a ``select`` on validation, the chosen epoch and the
    validation scores before and per epoch.
    """
    tx = sgd(config.sgd, steps_per_epoch(data.x_train.shape[0], config.batch_size),
             config.epochs)
    opts = StepOptions(augment=config.augment, flip=config.flip,
                       label_smoothing=config.label_smoothing)
    x, y = data.x_train, data.y_train
    validate = config.uses_validation
    if validate and data.x_val.shape[0] == 0:
        raise BdjaxError(f"FT with select={config.select!r} needs validation images; "
                         "accepted: DefenseData with a validation split.")
    nan = jnp.full((config.epochs,), jnp.nan, jnp.float32)
    if not validate:
        def last_epoch(e, c):
            st, os_, loss, _ = run_epoch(model, tx, opts, config.batch_size, c[0], c[1], x, y,
                                         jax.random.fold_in(key, e))
            return st, os_, c[2].at[e].set(loss)

        state, _, losses = jax.lax.fori_loop(0, config.epochs, last_epoch,
                                             (state, tx.init(state["params"]), nan))
        return state, {"train_loss": losses}
    val_acc0, val_loss0 = evaluate(model, state, data.x_val, data.y_val)
    carry0 = dict(state=state, opt=tx.init(state["params"]), best=state,
                  best_score=jnp.float32(-jnp.inf), best_epoch=jnp.int32(0),
                  stale=jnp.int32(0), stopped=jnp.bool_(False),
                  train_loss=nan, val_acc=nan, val_loss=nan)

    def epoch(e, c):
        st, os_, loss, _ = run_epoch(model, tx, opts, config.batch_size, c["state"], c["opt"],
                                     x, y, jax.random.fold_in(key, e))
        vacc, vloss = evaluate(model, st, data.x_val, data.y_val)
        score = _score(config, vacc, vloss)
        better = score > c["best_score"]
        run = ~c["stopped"]  # after an early stop the carry is frozen
        keep = run & better
        stale = jnp.where(keep, 0, c["stale"] + 1)
        stopped = c["stopped"] | (config.patience > 0) & (stale >= config.patience)
        pick = lambda new, old: jax.tree_util.tree_map(
            lambda a, b: jnp.where(run, a, b), new, old)
        return dict(
            state=pick(st, c["state"]), opt=pick(os_, c["opt"]),
            best=jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), st, c["best"]),
            best_score=jnp.where(keep, score, c["best_score"]),
            best_epoch=jnp.where(keep, e + 1, c["best_epoch"]),
            stale=jnp.where(run, stale, c["stale"]), stopped=stopped,
            train_loss=c["train_loss"].at[e].set(jnp.where(run, loss, jnp.nan)),
            val_acc=c["val_acc"].at[e].set(jnp.where(run, vacc, jnp.nan)),
            val_loss=c["val_loss"].at[e].set(jnp.where(run, vloss, jnp.nan)))

    c = jax.lax.fori_loop(0, config.epochs, epoch, carry0)
    report = dict(epoch=c["best_epoch"], val_acc_before=val_acc0, val_loss_before=val_loss0,
                  train_loss=c["train_loss"], val_acc=c["val_acc"], val_loss=c["val_loss"])
    return c["best"], report
