"""Compiled training and evaluation building blocks shared by training and defenses.

State is explicit: the model state ``{"params", "batch_stats"}`` and an optax state,
carried through ``lax.scan`` over batches and ``lax.fori_loop`` over epochs. Nothing
here branches in Python on traced values, so every function can run under ``vmap``
over trials.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from bdjax.kernels.augment import crop_flip
from bdjax.models import Model, State


def smooth_labels(labels, num_classes: int, label_smoothing: float):
    """Targets with ``1 - eps`` on the true class and ``eps / (C - 1)`` on each other.

    This is the smoothing of the reference code (BackdoorBench's FT-SAM
    ``smooth_crossentropy``, the FST authors' ``LabelSmoothingLoss``), not optax's or
    PyTorch's built-in one, which spreads ``eps / C`` over every class including the true
    one (``1 - eps + eps / C`` on it).
    """
    onehot = jax.nn.one_hot(labels, num_classes)
    if not label_smoothing:
        return onehot
    other = label_smoothing / (num_classes - 1)
    return onehot * (1.0 - label_smoothing) + (1.0 - onehot) * other


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Mean softmax cross-entropy against :func:`smooth_labels` (integer labels)."""
    targets = smooth_labels(labels, logits.shape[-1], label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one pass over ``n`` images (the last one filled, see
    :func:`batch_indices`)."""
    return -(-n // min(batch_size, n))


def to_unit(images):
    """uint8 [0, 255] -> float32 [0, 1]; float inputs pass through."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images


def batch_indices(key, n: int, batch_size: int):
    """A shuffled epoch as ``[steps, batch]`` indices, ``steps = ceil(n / batch)``.

    The last batch is filled with the first images of the same permutation instead of
    being dropped or padded, so shapes stay static and BatchNorm never sees padding.
    """
    bs = min(batch_size, n)
    steps = -(-n // bs)
    perm = jax.random.permutation(key, n)
    fill = steps * bs - n
    return jnp.concatenate([perm, perm[:fill]]).reshape(steps, bs)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of a training step.

    Attributes:
      augment: random crop + (if ``flip``) horizontal flip.
      flip: allow horizontal flips.
      label_smoothing: CE label smoothing.
    """

    augment: bool = True
    flip: bool = True
    label_smoothing: float = 0.0


LossFn = Callable[..., Any]


def train_step(model: Model, tx: optax.GradientTransformation, opts: StepOptions,
               state: State, opt_state, x, y, key, grad_mask=None, *, penalty=None,
               project=None, bn_train: bool = True):
    """One SGD step on a uint8 batch; returns (state, opt_state, loss, accuracy).

    Args:
      grad_mask: a pytree like params of 0/1 (or None) that freezes parameters: their
        gradients and updates are zeroed, so masked weights stay exactly where they are.
      penalty: ``params -> scalar`` added to the loss (e.g. FST's inner product).
      project: ``params -> params`` applied after the update (e.g. FST's norm projection).
      bn_train: False runs BatchNorm in eval mode and keeps its running statistics (a
        frozen feature extractor, as in linear probing).
    """
    k_aug, k_drop = jax.random.split(key)
    xb = crop_flip(x, k_aug, flip=opts.flip) if opts.augment else x
    xb = to_unit(xb)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state["batch_stats"]}
        if bn_train:
            logits, new_bs = model.apply(variables, xb, train=True, key=k_drop)
        else:
            logits, new_bs = model.apply(variables, xb, key=k_drop), state["batch_stats"]
        loss = cross_entropy(logits, y, opts.label_smoothing)
        if penalty is not None:
            loss = loss + penalty(params)
        return loss, (logits, new_bs)

    (loss, (logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    if grad_mask is not None:
        grads = jax.tree_util.tree_map(lambda g, m: g * m, grads, grad_mask)
    updates, opt_state = tx.update(grads, opt_state, state["params"])
    if grad_mask is not None:
        updates = jax.tree_util.tree_map(lambda u, m: u * m, updates, grad_mask)
    params = optax.apply_updates(state["params"], updates)
    if project is not None:
        params = project(params)
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return {**state, "params": params, "batch_stats": new_bs}, opt_state, loss, acc


def scan_epoch(step: Callable, batch_size: int, state: State, opt_state, x, y, key, *,
               partners: bool = False):
    """One shuffled pass over (x, y) inside ``lax.scan`` with any
    ``step(state, opt_state, xb, yb, key) -> (state, opt_state, loss, accuracy)``;
    returns the final (state, opt_state) and the epoch's mean loss and accuracy.

    With ``partners`` the step gets a sixth argument, the images of the same batch
    position in a second, independent shuffle of ``x`` (from ``fold_in(k_perm, 1)``, the
    first shuffle's key ``k_perm``; the rest of the keys are unchanged), as a second
    data loader zipped with the first would give.
    """
    k_perm, k_steps = jax.random.split(key)
    idx = batch_indices(k_perm, x.shape[0], batch_size)
    keys = jax.random.split(k_steps, idx.shape[0])
    xs = (idx, keys)
    if partners:
        xs += (batch_indices(jax.random.fold_in(k_perm, 1), x.shape[0], batch_size),)

    def body(carry, inp):
        b, k, *b2 = inp
        st, os_, loss, acc = step(*carry, x[b], y[b], k, *(x[i] for i in b2))
        return (st, os_), (loss, acc)

    (state, opt_state), (losses, accs) = jax.lax.scan(body, (state, opt_state), xs)
    return state, opt_state, jnp.mean(losses, axis=0), jnp.mean(accs, axis=0)


def run_epoch(model: Model, tx, opts: StepOptions, batch_size: int, state: State,
              opt_state, x, y, key, grad_mask=None, **step_kwargs):
    """One shuffled epoch of :func:`train_step`; ``step_kwargs`` go to it (penalty,
    project, bn_train)."""
    step = lambda st, os_, xb, yb, k: train_step(model, tx, opts, st, os_, xb, yb, k,
                                                 grad_mask, **step_kwargs)
    return scan_epoch(step, batch_size, state, opt_state, x, y, key)


def logits_in_batches(model: Model, state: State, x, batch_size: int = 500):
    """Eval-mode logits for all of ``x`` (uint8 or [0,1] float), batched with lax.map."""
    n = x.shape[0]
    if n == 0:  # static: an empty split (a defense without validation images)
        return jnp.zeros((0, model.num_classes), jnp.float32)
    bs = min(batch_size, n)
    steps = -(-n // bs)
    pad = steps * bs - n
    xp = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    out = jax.lax.map(lambda b: model.apply(state, to_unit(b)),
                      xp.reshape(steps, bs, *x.shape[1:]))
    return out.reshape(steps * bs, -1)[:n]


def evaluate(model: Model, state: State, x, y, batch_size: int = 500):
    """(accuracy, mean CE loss) of the eval-mode model on (x, y); NaN for no images."""
    if x.shape[0] == 0:
        return jnp.float32(jnp.nan), jnp.float32(jnp.nan)
    logits = logits_in_batches(model, state, x, batch_size)
    return jnp.mean(jnp.argmax(logits, -1) == y), cross_entropy(logits, y)
