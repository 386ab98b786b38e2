"""i-BAU: adversarial unlearning of backdoors via implicit hypergradient.

A minimax game between a universal perturbation ``delta`` (one image added to every
input) and the weights ``theta``. With the model in eval mode throughout (BatchNorm on
its running statistics, which never change), each of ``rounds`` rounds:

1. Inner maximisation: ``delta`` starts at 0 and takes one SGD step of size
   ``delta_lr`` per batch of a shuffled pass over the defender's images, on
   ``-CE(f(x + delta), argmax f(x)) + delta_l2 ||delta||^2`` (it moves the model away
   from its own predictions). The paper bounds ``||delta||_2`` instead (the survey's
   eq. 30); ``delta_radius`` projects the pass's result onto such a ball.
2. Outer minimisation, one Adam step per batch of the unlearning set (below) on the
   hypergradient of ``L(delta, theta) = CE(f(x + m delta), y)``, where the mask ``m``
   puts ``delta`` on ``int(portion * batch)`` random images of the batch and ``y`` are
   the true labels. ``delta`` is treated as the fixed point of the inner map
   ``Phi(delta, theta) = delta - inner_lr grad_delta [-CE(f(x0 + delta), y0)
   + delta_l2 ||delta||^2]`` on the FIRST unlearning batch ``(x0, y0)``, so
   ``dL/dtheta = dL/dtheta|_delta + (dPhi/dtheta)^T (I - dPhi/ddelta)^-T dL/ddelta``,
   the inverse approximated by ``k`` fixed-point iterations
   ``v <- (dPhi/ddelta)^T v + dL/ddelta`` from ``v = 0`` (:func:`hypergradient`).

The unlearning set is one shuffled, augmented pass over the defender's images drawn
once at the start and reused by every round (the reference collects its loader into a
list once); the perturbation passes draw a fresh shuffle and augmentation every round.

Defaults (the survey's fork, WhoDunnett/BackdoorBenchmark ``defense/i-bau.py`` with
``config/defense/i-bau/cifar10.yaml``; GTSRB and Tiny use the same values): 5 rounds,
K = 5, batch 256, outer Adam with ``amsgrad=True``, lr 1e-4, betas (0.9, 0.999), no
weight decay (``argparser_opt_scheduler`` with ``client_optimizer: adam``; the YAML's
CosineAnnealingLR is built but never stepped, so the rate is constant), inner map
step 0.1, perturbation SGD lr 10 without momentum, ``||delta||^2`` weight 0.001, 1% of
each batch perturbed, training augmentation (random crop; flip on CIFAR-10), all of
the defender's images (no validation split). The fork's ``epochs: 100`` and
``--optim Adam`` are read by nothing.

``delta`` lives in the model's normalised input units (the fork's loader normalises
before it is added, and nothing clamps), so ``delta_lr``, ``inner_lr`` and ``delta_l2``
mean what they mean in the reference; it is added to the [0, 1] image as
``delta * std``. ``space="pixel"`` puts it in [0, 1] pixel units instead, as the
authors' code, whose images are not normalised.

The authors' code (YiZeng623/I-BAU ``defense.py``) differs from the fork in four
settings: Adam without amsgrad at lr 1e-3, batch 100, no augmentation, pixel space
(``lr=1e-3, amsgrad=False, batch_size=100, augment=False, space="pixel"``); it
unlearns with 5,000 clean TEST images, bdjax (as the fork) with the defender's data. On
the small CNN these settings work where the fork's do not: with lr 10 a pixel-space
perturbation grows to an L2 norm of hundreds and changes ~90% of the predictions,
while a normalised-space one stays near norm 1.5 and changes 2-4% (tests/test_ibau.py
gives the figures).

Differences from the reference code:

- The last batch of a pass is filled with images of the same shuffled pass instead of
  being a smaller batch (static shapes under ``jit``), so every batch perturbs
  ``int(portion * batch)`` images (the fork's smaller last batch may perturb fewer).
- The fixed-point loop runs all ``k`` iterations; the reference stops early when
  ``v`` changes by less than 1e-10 (then the remaining iterations change nothing).
- The second-order products are forward-mode derivatives of gradients instead of
  reverse-mode ones (the same numbers; :func:`hypergradient`).

On CPU (the "fold" convolutions) the trials of a vmapped run go one after another inside
the compiled program (see the note above :func:`defend`).

References:
  Zeng, Chen, Park, Mao, Jin and Jia, "Adversarial Unlearning of Backdoors via Implicit
  Hypergradient", ICLR 2022, Algorithm 1; Grazzi et al., "On the Iteration Complexity of
  Hypergradient Computation", ICML 2020 (the fixed-point method); the survey
  (papers/001), section IV.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from bdjax.data import DefenseData
from bdjax.errors import BdjaxError, check_choice, check_range
from bdjax.kernels import batch_indices, crop_flip, cross_entropy, to_unit
from bdjax.kernels.optim import torch_adam
from bdjax.models import Model, State, layers

SPACES = ("normalised", "pixel")


@dataclasses.dataclass(frozen=True)
class IBAUConfig:
    """i-BAU settings.

    Attributes:
      rounds: unlearning rounds (each: a new perturbation, then one pass of outer steps).
      k: fixed-point iterations of the hypergradient (the reference's ``K``).
      batch_size: images per batch (perturbation and outer steps).
      lr: the outer Adam's learning rate (constant).
      amsgrad: Adam's amsgrad variant (PyTorch's).
      inner_lr: step size of the inner map ``Phi``.
      delta_lr: the perturbation's SGD step.
      delta_l2: weight of ``||delta||^2`` in the perturbation's and the inner loss.
      delta_radius: > 0: the pass's perturbation is projected onto the L2 ball of this
        radius (the paper's constraint; the code's projection, radius 10, is commented
        out); 0: no projection (the code).
      portion: fraction of each outer batch that gets ``delta`` (``int(portion *
        batch)`` images).
      space: ``normalised`` (delta in the model's normalised input units, the fork) or
        ``pixel`` ([0, 1] units, the authors' code).
      augment, flip: training augmentation of the batches (flip set by the runner).
    """

    rounds: int = 5
    k: int = 5
    batch_size: int = 256
    lr: float = 1e-4
    amsgrad: bool = True
    inner_lr: float = 0.1
    delta_lr: float = 10.0
    delta_l2: float = 0.001
    delta_radius: float = 0.0
    portion: float = 0.01
    space: str = "normalised"
    augment: bool = True
    flip: bool = True

    def __post_init__(self):
        check_choice("space", self.space, SPACES)
        for name in ("rounds", "batch_size"):
            if getattr(self, name) < 1:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 1.")
        if self.k < 0:
            raise BdjaxError(f"k {self.k!r} is invalid; accepted: >= 0 (0 = no implicit term).")
        for name in ("lr", "inner_lr", "delta_lr"):
            if not getattr(self, name) > 0:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: > 0.")
        for name in ("delta_l2", "delta_radius"):
            if not getattr(self, name) >= 0:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 0.")
        check_range("portion", self.portion, 0.0, 1.0)

    @property
    def uses_validation(self) -> bool:
        return False


def hypergradient(inner_loss: Callable, inner_lr: float, outer_loss: Callable, delta, params,
                  k: int):
    """The fixed-point hypergradient of ``outer_loss`` with respect to ``params``.

    ``delta`` is taken as a fixed point of the gradient step ``Phi(delta, params) = delta
    - inner_lr * grad_delta inner_loss(delta, params)``, so ``d delta / d params = (I -
    J)^-1 dPhi/dparams`` with ``J = dPhi/ddelta``; ``(I - J^T)^-1 g`` is approximated by
    ``k`` iterations ``v <- J^T v + g`` from ``v = 0`` (the first ``k`` terms of its
    Neumann series), then ``hypergradient = (dPhi/dparams)^T v + d outer_loss/dparams``.
    ``k = 0`` gives the partial derivative alone.

    ``J = I - inner_lr H`` with ``H`` the (symmetric) Hessian of ``inner_loss`` in
    ``delta``, so ``J^T v = v - inner_lr H v``, and ``(dPhi/dparams)^T v = -inner_lr
    (d^2 inner_loss / ddelta dparams)^T v`` is the derivative of ``grad_params
    inner_loss`` along ``v``: both are forward-mode derivatives of a gradient
    (forward-over-reverse), the same products as the reference's vector-Jacobian
    products of ``Phi`` (reverse-over-reverse). The gradient is linearised once at
    ``delta`` and its linear map reused by every iteration; forward derivatives are also
    what bdjax's CPU convolutions support (:func:`_twice_differentiable_convs`).

    Args:
      inner_loss, outer_loss: ``(delta, params) -> scalar``.
      inner_lr: the step of ``Phi``.
      delta, params: pytrees.
      k: fixed-point iterations (static).

    Returns:
      ``(outer loss, hypergradient)``, the latter a pytree like ``params``.
    """
    tmap = jax.tree_util.tree_map
    loss, (g_delta, g_params) = jax.value_and_grad(outer_loss, argnums=(0, 1))(delta, params)
    # v -> (H v, d^2 inner_loss / dparams ddelta v), linearised once at delta
    _, second = jax.linearize(lambda d: jax.grad(inner_loss, (0, 1))(d, params), delta)

    def step(_, v):
        return tmap(lambda a, b, c: a - inner_lr * b + c, v, second(v)[0], g_delta)

    v = jax.lax.fori_loop(0, k, step, tmap(jnp.zeros_like, g_delta))
    return loss, tmap(lambda a, b: b - inner_lr * a, second(v)[1], g_params)


# Second derivatives through bdjax's CPU convolutions (models/layers.py, the "fold"
# rule). Their custom VJP's forward rule calls the custom-VJP function again, so a
# gradient through them cannot be differentiated in forward mode; and the trial-folding
# batching rule of the plain convolution under it survives neither a transpose nor a
# linearisation. Under the fold rule i-BAU therefore runs its trials one at a time (a
# loop inside the compiled program, which costs nothing here: with per-trial weights
# the fold rule runs one convolution per trial anyway) and, while it traces a trial,
# swaps in the same VJP built on JAX's plain convolution (forward convolutions and
# matrix products only, which XLA:CPU runs fast inside loops). With the "native" rule
# (GPU) trials are vmapped as usual.
def _plain_conv(x, w, strides, pads, lhs_dilation=(1, 1)):
    return jax.lax.conv_general_dilated(x, w, strides, pads, lhs_dilation=lhs_dilation,
                                        dimension_numbers=layers._DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, pads):
    return _plain_conv(x, w, strides, pads)


def _conv_fwd(x, w, strides, pads):
    return _plain_conv(x, w, strides, pads), (x, w)


_conv.defvjp(_conv_fwd, layers._conv_bwd)


@contextlib.contextmanager
def _twice_differentiable_convs():
    """Fold-rule convolutions traced inside (on one trial, not vmapped) support
    forward-mode derivatives and linearisation of their gradients."""
    saved = layers._conv, layers._plain_conv
    layers._conv, layers._plain_conv = _conv, _plain_conv
    try:
        yield
    finally:
        layers._conv, layers._plain_conv = saved


def defend(model: Model, state: State, data: DefenseData, config: IBAUConfig, key: jax.Array):
    """i-BAU for one trial; returns (state with unlearnt weights, report).

    Report, per round: ``outer_loss`` (mean over the round's outer steps), ``delta_norm``
    (L2 norm of the round's perturbation, in its units) and ``delta_flip`` (the fraction
    of the last batch of the perturbation's pass whose prediction it changes, before its
    last step: the universal perturbation's success).
    """
    if not layers._fold():
        return _defend(model, config, state, data.x_train, data.y_train, key)

    @jax.custom_batching.sequential_vmap  # one trial at a time under vmap (see above)
    def one(state, x, y, key):
        with _twice_differentiable_convs():
            return _defend(model, config, state, x, y, key)

    return one(state, data.x_train, data.y_train, key)


def _defend(model: Model, config: IBAUConfig, state: State, x, y, key: jax.Array):
    n = x.shape[0]
    bs = min(config.batch_size, n)
    n_patch = int(bs * config.portion)  # the reference's int(number * portion)
    rest = {k: v for k, v in state.items() if k != "params"}
    tx = torch_adam(config.lr, amsgrad=config.amsgrad)
    scale = (jnp.asarray(model.std, jnp.float32) if config.space == "normalised"
             else jnp.float32(1.0))  # delta's units -> [0, 1] pixels

    def logits(p, xb):
        return model.apply({**rest, "params": p}, xb)

    def augment(xb, k):
        return crop_flip(xb, k, flip=config.flip) if config.augment else xb

    def reg(delta):
        return config.delta_l2 * jnp.sum(delta * delta)

    k_fix, k_aug, k_rounds = jax.random.split(key, 3)
    idx = batch_indices(k_fix, n, bs)  # the unlearning set: one pass, drawn once
    xs = augment(x[idx].reshape(-1, *x.shape[1:]), k_aug).reshape(*idx.shape, *x.shape[1:])
    ys = y[idx]
    x0, y0 = to_unit(xs[0]), ys[0]  # the inner map's batch

    def perturbation(p, k):
        """One shuffled, augmented pass of SGD steps on delta from 0; (delta, flip)."""
        k_perm, k_aug = jax.random.split(k)
        b = batch_indices(k_perm, n, bs)

        def step(c, inp):
            delta, _ = c
            bi, kb = inp
            xb = to_unit(augment(x[bi], kb))
            pred = jnp.argmax(logits(p, xb), -1)

            def loss(d):
                out = logits(p, xb + d * scale)
                return -cross_entropy(out, pred) + reg(d), out

            (_, out), g = jax.value_and_grad(loss, has_aux=True)(delta)
            flip = jnp.mean(jnp.argmax(out, -1) != pred)
            return (delta - config.delta_lr * g, flip), None

        delta0 = jnp.zeros((1, *x.shape[1:]), jnp.float32)
        delta, flip = jax.lax.scan(step, (delta0, jnp.float32(0)),
                                   (b, jax.random.split(k_aug, b.shape[0])))[0]
        if config.delta_radius:
            norm = jnp.sqrt(jnp.sum(delta * delta))
            delta = delta * jnp.minimum(1.0, config.delta_radius / jnp.maximum(norm, 1e-12))
        return delta, flip

    def inner_loss(delta, p):
        return -cross_entropy(logits(p, x0 + delta * scale), y0) + reg(delta)

    def outer_step(c, inp):
        p, os_, delta = c
        xb, yb, k = inp
        chosen = jax.random.permutation(k, bs)[:n_patch]
        m = jnp.zeros((bs,), jnp.float32).at[chosen].set(1.0)[:, None, None, None]
        xb = to_unit(xb)

        def outer_loss(d, pp):
            return cross_entropy(logits(pp, xb + m * d * scale), yb)

        loss, g = hypergradient(inner_loss, config.inner_lr, outer_loss, delta, p, config.k)
        updates, os_ = tx.update(g, os_, p)
        return (optax.apply_updates(p, updates), os_, delta), loss

    def round_(r, c):
        p, os_, losses, norms, flips = c
        k_delta, k_out = jax.random.split(jax.random.fold_in(k_rounds, r))
        delta, flip = perturbation(p, k_delta)
        (p, os_, _), loss = jax.lax.scan(
            outer_step, (p, os_, delta), (xs, ys, jax.random.split(k_out, xs.shape[0])))
        return (p, os_, losses.at[r].set(jnp.mean(loss)),
                norms.at[r].set(jnp.sqrt(jnp.sum(delta * delta))), flips.at[r].set(flip))

    nan = jnp.full((config.rounds,), jnp.nan, jnp.float32)
    p, _, losses, norms, flips = jax.lax.fori_loop(
        0, config.rounds, round_, (state["params"], tx.init(state["params"]), nan, nan, nan))
    report = dict(outer_loss=losses, delta_norm=norms, delta_flip=flips)
    return {**state, "params": p}, report
