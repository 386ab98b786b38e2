"""Grad-Prune: prune the conv filters that carry the backdoor, found by unlearning-loss
gradients, then fine-tune on clean and true-labelled triggered data.

Threat model (papers/000, section III-C): the defender holds a few clean labelled
images AND can synthesise a trigger-stamped copy of each (here: ``data.trigger.stamp``
on its own images), labelled with the TRUE label. The unlearning loss is
``L = sum_i CE(f(trigger(x_i)), y_i)`` (eq. 2).

1. Pruning rounds (one ``lax.while_loop``): score every conv filter of the CURRENT
   masked model by the mean absolute gradient of L summed over the defender's training
   batches (eq. 3, :func:`bdjax.kernels.scores.filter_scores`), prune the single top
   filter not pruned yet (a mask: it stays exactly zero), then measure the validation
   clean accuracy and validation unlearning loss. Stop when the accuracy has dropped by
   ``alpha`` (absolute) from the original model's, when the unlearning loss has not
   improved for ``prune_patience`` rounds, or at ``max_rounds``. Keep the round with
   the lowest unlearning loss among rounds whose drop is below ``alpha`` (round 0, the
   unpruned model, if none improves on it).
2. Fine-tuning (another ``lax.while_loop``): SGD on each batch's clean images plus
   their triggered copies with true labels (loss CE_clean + CE_triggered, two forward
   passes as the reference), pruned filters held at zero, until the validation clean
   loss has not improved for ``ft_patience`` epochs (or ``epochs``); keep the best
   epoch (epoch 0, the pruned model, included).

The defender's images are split: the rounds and the fine-tuning select on a validation
split (SPC 2 -> 2 train + 1 validation per class, 10 -> 9 + 1, 100 -> 90 + 10). The
report says what ended each phase: ``prune_capped`` / ``ft_capped`` are true when
``max_rounds`` / ``epochs`` (caps the reference does not have), not the accuracy test or
patience, ended it, and ``prune_alpha_stop`` when the accuracy drop did.

Measured on bdjax's synthetic data (small CNN, BadNets 10%, SPC 100): on models trained
with crop augmentation, 2-5 pruned filters and the fine-tuning take the ASR from ~95% to
~3% at a cost of ~2 accuracy points. A small CNN trained WITHOUT augmentation memorises
its training images and leans on single filters: pruning any top-scored filter costs
>= alpha of validation accuracy, so pruning keeps round 0 and the ASR stays.

Differences from the reference code (github.com/WhoDunnett/Grad-Prune), where bdjax does
what the code means to do:

- Pruned filters are masked, so neither fine-tuning nor weight decay regrows them (the
  reference zeroes the weights once and lets them train again); an already pruned
  filter is never chosen again.
- The conv's own bias is zeroed with its filter (the reference zeroes "the next
  parameter", which for bias-free convs is a BatchNorm scale or another kernel).
- The accuracy stop applies ``drop >= alpha`` exactly. The reference compares
  ``c0/n - c/n < alpha`` in float64, where a drop of exactly one validation image at
  SPC 10 (0.9 - 0.8 = 0.09999999999999998) or two at SPC 2 still passes, so its runs
  prune one round further there.
- Every scoring batch runs BatchNorm in training mode (``score_batch_stats``), and the
  scoring pass does not update the running statistics. The reference switches the
  model to eval mode after the first batch's backward pass (``prune_model.eval()``
  inside its loop), so only its first scoring batch uses batch statistics, and that
  batch moves its running statistics.
- The pruning rounds are capped at ``max_rounds`` (100) and the fine-tuning at
  ``epochs`` (100): the reference stops on patience alone. ``prune_capped`` and
  ``ft_capped`` in the report show when a cap decided.
- The validation unlearning loss is a mean over images; the reference sums the batch
  means (the same order of rounds).

References:
  Dunnett et al., "Unlearning Backdoor Attacks through Gradient-Based Model Pruning"
  (papers/000), section IV, eqs. 2-3; REFERENCE.md, Grad-Prune row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from bdjax.data import DefenseData
from bdjax.errors import BdjaxError, check_range
from bdjax.kernels import batch_indices, cross_entropy, evaluate, sgd, steps_per_epoch
from bdjax.kernels.masks import apply_masks, ones_masks, param_mask
from bdjax.kernels.scores import filter_scores, flatten, top_filter, unflatten
from bdjax.models import Model, State
from bdjax.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class GradPruneConfig(TrainConfig):
    """Grad-Prune settings (REFERENCE.md, Grad-Prune row; reference ``cifar10.yaml``).

    The :class:`TrainConfig` fields are the fine-tuning run: SGD lr 0.001, momentum 0.9,
    weight decay 5e-4, batch 128, constant lr, no augmentation; ``epochs`` caps it (the
    reference stops on patience alone). ``batch_size`` also batches the scoring pass.

    Attributes:
      alpha: stop pruning when validation clean accuracy has dropped by this much
        (absolute, from the original model's).
      prune_patience: P_t, stop pruning after this many rounds without a lower
        validation unlearning loss.
      max_rounds: cap on pruning rounds (static shapes of the report; the reference has
        none).
      ft_patience: F_t, stop fine-tuning after this many epochs without a lower
        validation clean loss.
      score_batch_stats: compute the scoring gradients with BatchNorm in training mode
        (batch statistics), as the reference; False uses running statistics.
      defender_synthesises_triggers: the paper's threat model: the defender stamps the
        attack's trigger (``data.trigger``) on its own clean images and keeps their TRUE
        labels. Grad-Prune has no variant without it, so only True is accepted.
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.001
    schedule: str = "constant"
    augment: bool = False
    alpha: float = 0.1
    prune_patience: int = 10
    max_rounds: int = 100
    ft_patience: int = 10
    score_batch_stats: bool = True
    defender_synthesises_triggers: bool = True

    @property
    def uses_validation(self) -> bool:
        return True

    def __post_init__(self):
        super().__post_init__()
        check_range("alpha", self.alpha, 0.0, 1.0, low_open=True)
        for name in ("prune_patience", "max_rounds", "ft_patience"):
            if getattr(self, name) < 1:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 1.")
        if self.defender_synthesises_triggers is not True:
            raise BdjaxError(
                f"defender_synthesises_triggers {self.defender_synthesises_triggers!r} is "
                "invalid; accepted: True (Grad-Prune's threat model gives the defender "
                "trigger-stamped copies of its images).")


def _even_batches(key, n: int, batch_size: int):
    """One shuffled pass in ``steps = ceil(n / batch)`` equal batches, plus 0/1 weights.

    Equal batches keep shapes static; the few filler slots (fewer than ``steps``) repeat
    images with weight 0, so every image counts exactly once in a summed loss.
    """
    steps = -(-n // min(batch_size, n))
    bs = -(-n // steps)
    perm = jax.random.permutation(key, n)
    fill = steps * bs - n
    idx = jnp.concatenate([perm, perm[:fill]]).reshape(steps, bs)
    weight = (jnp.arange(steps * bs) < n).astype(jnp.float32).reshape(steps, bs)
    return idx, weight


def _unlearning_loss_fn(model: Model, batch_stats, train_mode: bool, key):
    """``loss(params, (x_triggered, y_true, weight))`` of eq. 2 for one batch."""

    def loss(params, batch):
        x, y, w = batch
        variables = {"params": params, "batch_stats": batch_stats}
        if train_mode:
            logits, _ = model.apply(variables, x, train=True, key=key)  # stats discarded
        else:
            logits = model.apply(variables, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(w * ce) / w.shape[0]

    return loss


def _val_metrics(model: Model, state: State, data: DefenseData, x_val_trig):
    """(validation clean accuracy, validation unlearning loss) of the eval-mode model."""
    acc, _ = evaluate(model, state, data.x_val, data.y_val)
    _, unlearn = evaluate(model, state, x_val_trig, data.y_val)
    return acc, unlearn


def prune_round(model: Model, state: State, mask, index, batches, data: DefenseData,
                x_val_trig, score_batch_stats: bool, key):
    """One pruning round on the unpruned ``state`` with the pruned filters of ``mask``.

    Scores every conv filter of the masked model (eq. 3, gradients of eq. 2 summed over
    ``batches`` = (triggered images, true labels, weights) with a leading batch axis),
    prunes the top filter not pruned yet, and measures the pruned model on the
    validation split.

    Returns:
      (new flat mask, the pruned filter's flat index, validation clean accuracy,
      validation unlearning loss).
    """
    loss = _unlearning_loss_fn(model, state["batch_stats"], score_batch_stats, key)
    masks = unflatten(mask, index)
    scores = filter_scores(loss, apply_masks(state["params"], masks), batches)
    pick = top_filter(scores, eligible=masks)
    mask = mask.at[pick].set(0.0)
    pruned = {**state, "params": apply_masks(state["params"], unflatten(mask, index))}
    acc, unlearn = _val_metrics(model, pruned, data, x_val_trig)
    return mask, pick, acc, unlearn


def _prune(model: Model, state: State, data: DefenseData, x_trig, x_val_trig,
           config: GradPruneConfig, key):
    """Pruning rounds; returns (best masks, report)."""
    params0 = state["params"]
    flat0, index = flatten(ones_masks(params0))
    total = flat0.shape[0]
    rounds_cap = min(config.max_rounds, total)
    k_perm, k_drop = jax.random.split(key)
    idx, weight = _even_batches(k_perm, data.x_train.shape[0], config.batch_size)
    batches = (x_trig[idx], data.y_train[idx], weight)
    acc0, unlearn0 = _val_metrics(model, state, data, x_val_trig)
    nan = jnp.full((config.max_rounds,), jnp.nan, jnp.float32)

    def cond(c):
        return ~c["done"]

    def body(c):
        r = c["round"]
        mask, pick, acc, unlearn = prune_round(
            model, state, c["mask"], index, batches, data, x_val_trig,
            config.score_batch_stats, jax.random.fold_in(k_drop, r))
        # Tolerance: a drop of exactly alpha (e.g. 0.9 - 0.8 in float32) must stop.
        within = acc0 - acc < config.alpha - 1e-6
        better = within & (unlearn < c["best_loss"])
        stale = jnp.where(better, 0, c["stale"] + 1)
        done = (~within) | (stale >= config.prune_patience) | (r + 1 >= rounds_cap)
        return dict(
            mask=mask, round=r + 1, done=done, stale=stale,
            best_mask=jnp.where(better, mask, c["best_mask"]),
            best_loss=jnp.where(better, unlearn, c["best_loss"]),
            best_round=jnp.where(better, r + 1, c["best_round"]),
            val_acc=c["val_acc"].at[r].set(acc),
            val_unlearn_loss=c["val_unlearn_loss"].at[r].set(unlearn),
            pruned=c["pruned"].at[r].set(pick.astype(jnp.int32)))

    carry0 = dict(mask=flat0, round=jnp.int32(0), done=jnp.bool_(False), stale=jnp.int32(0),
                  best_mask=flat0, best_loss=unlearn0, best_round=jnp.int32(0),
                  val_acc=nan, val_unlearn_loss=nan,
                  pruned=jnp.full((config.max_rounds,), -1, jnp.int32))
    c = jax.lax.while_loop(cond, body, carry0)
    last = jnp.maximum(c["round"] - 1, 0)
    alpha_stop = ~(acc0 - c["val_acc"][last] < config.alpha - 1e-6)
    capped = (c["round"] >= rounds_cap) & ~alpha_stop & (c["stale"] < config.prune_patience)
    report = dict(rounds=c["round"], best_round=c["best_round"], val_acc_before=acc0,
                  val_unlearn_loss_before=unlearn0, val_acc=c["val_acc"],
                  val_unlearn_loss=c["val_unlearn_loss"], pruned_filter=c["pruned"],
                  prune_alpha_stop=alpha_stop, prune_capped=capped)
    return unflatten(c["best_mask"], index), report


def _finetune_step(model: Model, tx, grad_mask, state: State, opt_state, x, xt, y, key):
    """One SGD step on a clean batch and its triggered copy (true labels), masked."""
    k1, k2 = jax.random.split(key)

    def loss_fn(params):
        logits, bs = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                                 x, train=True, key=k1)
        logits_t, bs = model.apply({"params": params, "batch_stats": bs}, xt, train=True,
                                   key=k2)
        return cross_entropy(logits, y) + cross_entropy(logits_t, y), bs

    (loss, bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grads = jax.tree_util.tree_map(jnp.multiply, grads, grad_mask)
    updates, opt_state = tx.update(grads, opt_state, state["params"])
    updates = jax.tree_util.tree_map(jnp.multiply, updates, grad_mask)
    params = optax.apply_updates(state["params"], updates)
    return {**state, "params": params, "batch_stats": bs}, opt_state, loss


def _finetune(model: Model, state: State, masks, data: DefenseData, x_trig,
              config: GradPruneConfig, key):
    """Fine-tuning epochs with validation-loss patience; returns (best state, report)."""
    n = data.x_train.shape[0]
    tx = sgd(config.sgd, steps_per_epoch(n, config.batch_size), config.epochs)
    grad_mask = param_mask(state["params"], masks)
    _, loss0 = evaluate(model, state, data.x_val, data.y_val)
    nan = jnp.full((config.epochs,), jnp.nan, jnp.float32)

    def epoch(st, os_, k):
        k_perm, k_steps = jax.random.split(k)
        idx = batch_indices(k_perm, n, config.batch_size)

        def step(carry, inp):
            b, kb = inp
            s, o, loss = _finetune_step(model, tx, grad_mask, *carry, data.x_train[b],
                                        x_trig[b], data.y_train[b], kb)
            return (s, o), loss

        keys = jax.random.split(k_steps, idx.shape[0])
        (st, os_), losses = jax.lax.scan(step, (st, os_), (idx, keys))
        return st, os_, jnp.mean(losses)

    def body(c):
        e = c["epoch"]
        st, os_, train_loss = epoch(c["state"], c["opt"], jax.random.fold_in(key, e))
        _, vloss = evaluate(model, st, data.x_val, data.y_val)
        better = vloss < c["best_loss"]
        stale = jnp.where(better, 0, c["stale"] + 1)
        keep = lambda new, old: jax.tree_util.tree_map(
            lambda a, b: jnp.where(better, a, b), new, old)
        return dict(state=st, opt=os_, epoch=e + 1, stale=stale,
                    done=(stale >= config.ft_patience) | (e + 1 >= config.epochs),
                    best=keep(st, c["best"]), best_loss=jnp.where(better, vloss, c["best_loss"]),
                    best_epoch=jnp.where(better, e + 1, c["best_epoch"]),
                    train_loss=c["train_loss"].at[e].set(train_loss),
                    val_loss=c["val_loss"].at[e].set(vloss))

    carry0 = dict(state=state, opt=tx.init(state["params"]), epoch=jnp.int32(0),
                  stale=jnp.int32(0), done=jnp.bool_(False), best=state, best_loss=loss0,
                  best_epoch=jnp.int32(0), train_loss=nan, val_loss=nan)
    c = jax.lax.while_loop(lambda c: ~c["done"], body, carry0)
    capped = (c["epoch"] >= config.epochs) & (c["stale"] < config.ft_patience)
    report = dict(ft_epochs=c["epoch"], ft_best_epoch=c["best_epoch"], ft_capped=capped,
                  ft_val_loss_before=loss0, ft_train_loss=c["train_loss"],
                  ft_val_loss=c["val_loss"])
    return c["best"], report


def defend(model: Model, state: State, data: DefenseData, config: GradPruneConfig,
           key: jax.Array):
    """Grad-Prune for one trial; returns (state, report).

    The returned state is a plain model state whose pruned filters are zero in the
    kernels (and biases), so ``model.apply`` and the runner's evaluation use it as is.

    Report: ``rounds`` (pruning rounds run), ``best_round`` (= filters pruned in the
    returned model), ``val_acc`` / ``val_unlearn_loss`` / ``pruned_filter`` per round
    ([max_rounds], NaN / -1 after the last round; filter numbers index
    :func:`bdjax.kernels.scores.flatten`'s order), their values before pruning,
    ``prune_alpha_stop`` (the accuracy drop ended the rounds), ``prune_capped`` (
    ``max_rounds`` or the filter count did), ``ft_epochs``, ``ft_best_epoch``,
    ``ft_capped`` (``epochs`` ended the fine-tuning, not ``ft_patience``),
    ``ft_train_loss`` / ``ft_val_loss`` per epoch ([epochs], NaN padded).

    Raises:
      BdjaxError: when ``data.trigger`` is None (the threat model needs it).
    """
    if data.trigger is None:
        raise BdjaxError("Grad-Prune needs the trigger (its threat model lets the defender "
                         "stamp its own images); accepted: DefenseData with trigger=<attack>.")
    k_trig, k_val_trig, k_prune, k_ft = jax.random.split(key, 4)
    # Stamped once, as the reference's fixed backdoor copy of the defender's set.
    x_trig = data.trigger.stamp(data.x_train, k_trig)
    x_val_trig = data.trigger.stamp(data.x_val, k_val_trig)
    masks, prune_report = _prune(model, state, data, x_trig, x_val_trig, config, k_prune)
    pruned = {**state, "params": apply_masks(state["params"], masks)}
    tuned, ft_report = _finetune(model, pruned, masks, data, x_trig, config, k_ft)
    # Exact zeros already (masked updates); re-applying guards any float path.
    tuned = {**tuned, "params": apply_masks(tuned["params"], masks)}
    return tuned, {**prune_report, **ft_report}
