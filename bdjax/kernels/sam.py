"""(Adaptive) sharpness-aware minimisation: the perturbed-gradient training step.

One SAM step takes the gradient ``g`` at the weights ``w``, moves to the worst-case
neighbour ``w + e`` inside a radius-``rho`` ball, takes the gradient there, and lets the
base optax optimizer (SGD with momentum, weight decay and cosine schedule from
:func:`bdjax.kernels.sgd`) apply that gradient at ``w``. With ``adaptive=True`` the ball
is scaled per weight by ``T_w = |w|`` (ASAM), so

    e = rho * w^2 * g / (|| |w| * g ||_2 + 1e-12)      (FT-SAM eq. 4)

and with ``adaptive=False`` it is the plain SAM step ``e = rho * g / (||g||_2 + 1e-12)``.
The norm is global over every trainable parameter, BatchNorm scale and bias included.
BatchNorm running statistics come from the first, unperturbed forward pass only: the
perturbed pass exists to compute a gradient and must not move the model's statistics.

References:
  Zhu et al., "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
  Minimization" (FT-SAM), ICCV 2023, eq. 3-5. Kwon et al., "ASAM: Adaptive
  Sharpness-Aware Minimization", ICML 2021. Foret et al., "Sharpness-Aware Minimization
  for Efficiently Improving Generalization", ICLR 2021.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from bdjax.kernels.augment import crop_flip
from bdjax.kernels.steps import StepOptions, cross_entropy, scan_epoch, to_unit
from bdjax.models import Model, State

EPS = 1e-12


def sam_perturbation(params, grads, rho: float, adaptive: bool = True):
    """The weight perturbation ``e`` of one (A)SAM step (a pytree like ``params``).

    Args:
      params: the current weights ``w``.
      grads: the loss gradient ``g`` at ``w``.
      rho: the radius of the perturbation ball (in the ``T_w``-scaled space if adaptive).
      adaptive: ASAM's ``T_w = |w|`` scaling (FT-SAM) instead of plain SAM.

    Returns:
      ``rho * T^2 g / (||T g||_2 + 1e-12)`` with ``T = |w|`` (adaptive) or ``T = 1``. A
      zero gradient gives ``e = 0`` (the epsilon keeps the division finite).

    References:
      FT-SAM eq. 3-4; ASAM (Kwon et al. 2021) eq. 11.
    """
    grads = jax.lax.stop_gradient(grads)
    if adaptive:
        scaled = jax.tree_util.tree_map(lambda w, g: jnp.abs(w) * g, params, grads)
        direction = jax.tree_util.tree_map(lambda w, g: jnp.square(w) * g, params, grads)
    else:
        scaled = direction = grads
    scale = rho / (optax.tree.norm(scaled) + EPS)
    return jax.tree_util.tree_map(lambda d: (scale * d).astype(d.dtype), direction)


def sam_grad(loss_fn: Callable, params, rho: float, adaptive: bool = True):
    """(A)SAM gradient of ``loss_fn(params) -> (loss, aux)``.

    Returns ``((loss, aux), grads)`` where ``loss`` and ``aux`` come from the
    unperturbed pass at ``params`` and ``grads`` is the gradient at ``params + e``.
    The caller decides what to keep from ``aux`` (e.g. the unperturbed BN statistics).
    """
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    e = sam_perturbation(params, g, rho, adaptive)
    perturbed = jax.tree_util.tree_map(jnp.add, params, e)
    _, g_sam = jax.value_and_grad(loss_fn, has_aux=True)(perturbed)
    return (loss, aux), g_sam


def sam_train_step(model: Model, tx: optax.GradientTransformation, opts: StepOptions,
                   rho: float, adaptive: bool, state: State, opt_state, x, y, key):
    """One (A)SAM step on a uint8 batch; returns (state, opt_state, loss, accuracy).

    Both passes see the same augmented batch and dropout key (SAM perturbs the weights,
    not the data). ``loss``/``accuracy`` are those of the unperturbed pass, and the new
    BatchNorm statistics are those of the unperturbed pass. The base optimizer (weight
    decay included) is applied at the unperturbed weights.
    """
    k_aug, k_drop = jax.random.split(key)
    xb = crop_flip(x, k_aug, flip=opts.flip) if opts.augment else x
    xb = to_unit(xb)

    def loss_fn(params):
        logits, new_bs = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                                     xb, train=True, key=k_drop)
        return cross_entropy(logits, y, opts.label_smoothing), (logits, new_bs)

    (loss, (logits, new_bs)), grads = sam_grad(loss_fn, state["params"], rho, adaptive)
    updates, opt_state = tx.update(grads, opt_state, state["params"])
    params = optax.apply_updates(state["params"], updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return {**state, "params": params, "batch_stats": new_bs}, opt_state, loss, acc


def run_sam_epoch(model: Model, tx, opts: StepOptions, rho: float, adaptive: bool,
                  batch_size: int, state: State, opt_state, x, y, key):
    """One shuffled epoch of :func:`sam_train_step` inside ``lax.scan``."""
    step = lambda st, os_, xb, yb, k: sam_train_step(model, tx, opts, rho, adaptive,
                                                     st, os_, xb, yb, k)
    return scan_epoch(step, batch_size, state, opt_state, x, y, key)


__all__ = ["sam_perturbation", "sam_grad", "sam_train_step", "run_sam_epoch"]
