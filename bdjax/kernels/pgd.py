"""Batched projected gradient descent (PGD) in [0, 1] pixel space.

One compiled ``lax.while_loop`` over steps, with one perturbation per sample:

- norms ``linf`` and ``l2``, each with a per-sample projection onto the ball of radius
  ``eps`` around the clean image, followed by clipping ``x + delta`` to [0, 1] (models
  take [0, 1] inputs and normalise inside, so the box is the valid image range);
- ``targeted`` (descend the cross-entropy to ``target``) or untargeted (ascend the
  cross-entropy of the true label ``y``);
- ``sign`` steps (FGSM-style, the usual choice for Linf) or ``normalized`` steps
  (gradient divided by its per-sample L2 norm, the usual choice for L2). NPD's reference
  uses sign steps of 0.1 inside an L2 ball of radius 3 (REFERENCE.md, NPD row), so the
  step kind is chosen apart from the norm;
- zero or random start;
- early exit: the loop stops once ``stop_fraction`` of the batch reaches its goal (the
  target class, or any wrong class when untargeted), tested before each step (a batch
  that already succeeds takes none) or, as BackdoorBench's NPD, after each step (at
  least one step, strict ``>``); successful samples stop moving unless
  ``freeze_successes=False``. All of it is carried state, so the function runs under
  ``vmap`` (a batched ``while_loop`` keeps finished members frozen);
- the box: ``clip="delta"`` keeps ``x + delta`` in [0, 1] by clipping the perturbation
  after each projection; ``clip="image"`` (BackdoorBench's NPD) keeps the perturbation
  unclipped in its ball and clamps only the image it is added to;
- ``loss_bound`` clamps each sample's cross-entropy (BackdoorBench's NPD: 80), which
  zeroes the gradient of samples beyond it.

The model must be in eval mode inside ``logits_fn`` (no batch statistics), so each
sample's attack does not depend on the others.

References:
  Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
  ICLR 2018, Eq. (2) (the projected step); Zhu et al., "Neural Polarizer", NeurIPS 2023,
  Eq. (4) (targeted L2 PGD toward y').
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from bdjax.errors import BdjaxError, check_choice

NORMS = ("linf", "l2")
STEP_KINDS = ("auto", "sign", "normalized")
EXIT_CHECKS = ("before", "after")
CLIPS = ("delta", "image")
_TINY = 1e-12


def _per_sample_norm(v):
    """L2 norm of each sample, shaped to broadcast against ``v`` ([B, 1, 1, 1])."""
    sq = jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=1)
    return jnp.sqrt(sq).reshape((-1,) + (1,) * (v.ndim - 1))


def project(delta, eps, norm: str):
    """Projects each sample's ``delta`` onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return jnp.clip(delta, -eps, eps)
    n = _per_sample_norm(delta)
    return delta * jnp.minimum(1.0, eps / jnp.maximum(n, _TINY))


def clip_to_box(x, delta):
    """The delta that keeps ``x + delta`` in [0, 1]; it never leaves the ball, because
    clipping moves each coordinate toward ``x``."""
    return jnp.clip(x + delta, 0.0, 1.0) - x


def random_start(key, x, eps, norm: str):
    """A uniform draw from the ``norm`` ball of radius ``eps`` per sample (linf: per
    coordinate; l2: a uniform direction and a radius uniform in [0, eps])."""
    if norm == "linf":
        return jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    k_dir, k_rad = jax.random.split(key)
    direction = jax.random.normal(k_dir, x.shape, x.dtype)
    direction = direction / jnp.maximum(_per_sample_norm(direction), _TINY)
    radius = jax.random.uniform(k_rad, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
    return direction * radius * eps


def _direction(g, kind: str):
    if kind == "sign":
        return jnp.sign(g)
    return g / jnp.maximum(_per_sample_norm(g), _TINY)


def _success(logits, y, target, targeted: bool):
    pred = jnp.argmax(logits, -1)
    return pred == target if targeted else pred != y


def pgd(logits_fn: Callable[[jax.Array], jax.Array], x, y, *, norm: str, eps, step: float,
        steps: int, targeted: bool, target=None, stop_fraction: float | None = None,
        key: jax.Array | None = None, step_kind: str = "auto", exit_check: str = "before",
        freeze_successes: bool = True, clip: str = "delta",
        loss_bound: float | None = None):
    """Adversarial examples for a batch of [0, 1] images.

    Args:
      logits_fn: maps a [0, 1] float batch ``[B, H, W, C]`` to logits ``[B, K]``
        (eval mode, so samples are independent).
      x: clean images, float in [0, 1] (uint8 is converted).
      y: true labels ``[B]`` (used by untargeted attacks and the success test).
      norm: ``linf`` or ``l2``.
      eps: radius of the ball (scalar, or ``[B]`` for per-sample radii).
      step: step size (the sign step's magnitude, or the L2 length of a normalized step).
      steps: maximum number of steps.
      targeted: descend toward ``target`` instead of ascending the loss of ``y``.
      target: labels ``[B]`` (scalar broadcast) for targeted attacks.
      stop_fraction: stop once this fraction of the batch succeeds (None: run all
        steps).
      key: random start (uniform in the ball); None starts from zero.
      step_kind: ``sign``, ``normalized`` or ``auto`` (sign for Linf, normalized for L2).
      exit_check: test ``stop_fraction`` ``before`` each step (``>=``; zero steps when
        the batch already succeeds) or ``after`` each step (``>``; at least one step).
      freeze_successes: samples that reach their goal stop moving.
      clip: ``delta`` (clip the perturbation into the image box) or ``image`` (clamp
        only the perturbed image; the perturbation stays in its ball unclipped).
      loss_bound: clamp each sample's cross-entropy to ``[-bound, bound]`` (None: off).

    Returns:
      ``(x_adv, info)`` with ``x_adv`` in [0, 1] and ``info`` = ``iterations`` (steps
      taken, int32), ``success`` (per sample, at ``x_adv``), ``success_rate``,
      ``delta_norm`` (per-sample L2 or Linf norm of ``x_adv - x``).
    """
    check_choice("norm", norm, NORMS)
    check_choice("step_kind", step_kind, STEP_KINDS)
    check_choice("exit_check", exit_check, EXIT_CHECKS)
    check_choice("clip", clip, CLIPS)
    if targeted and target is None:
        raise BdjaxError("a targeted PGD needs target labels; accepted: target=[B] labels.")
    if steps < 0:
        raise BdjaxError(f"steps {steps!r} is invalid; accepted: >= 0.")
    kind = ("sign" if norm == "linf" else "normalized") if step_kind == "auto" else step_kind
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x
    b = x.shape[0]
    eps = jnp.asarray(eps, x.dtype)
    if eps.ndim == 1:
        eps = eps.reshape((b,) + (1,) * (x.ndim - 1))
    target = jnp.broadcast_to(jnp.asarray(target if targeted else y), (b,))
    goal = target if targeted else y
    sign = 1.0 if targeted else -1.0  # descend toward a target, ascend away from y
    stop = 2.0 if stop_fraction is None else float(stop_fraction)
    after = exit_check == "after"
    image = lambda delta: jnp.clip(x + delta, 0.0, 1.0) if clip == "image" else x + delta
    box = (lambda delta: delta) if clip == "image" else (lambda delta: clip_to_box(x, delta))

    def loss(delta):
        logits = logits_fn(image(delta))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, goal)
        if loss_bound is not None:
            ce = jnp.clip(ce, -loss_bound, loss_bound)
        return jnp.sum(ce), logits  # a sum: each sample's gradient is its own

    grad = jax.value_and_grad(loss, has_aux=True)

    def body(c):
        # The gradient pass also gives the logits at the current perturbation: the
        # success test of "before" this step, or of "after" the previous one.
        (_, logits), g = grad(c["delta"])
        success = _success(logits, y, target, targeted)
        rate = jnp.mean(success)
        if after:
            done = (c["i"] > 0) & (rate > stop)
        else:
            done = rate >= stop
        moving = ~done & (~success if freeze_successes else jnp.ones_like(success))
        mask = moving.reshape((b,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        delta = c["delta"] - sign * step * _direction(g, kind) * mask
        delta = jnp.where(done, c["delta"], box(project(delta, eps, norm)))
        return dict(i=c["i"] + jnp.where(done, 0, 1), delta=delta, done=done)

    delta0 = jnp.zeros_like(x) if key is None else random_start(key, x, eps, norm)
    delta0 = box(project(delta0, eps, norm))
    c = jax.lax.while_loop(lambda c: (c["i"] < steps) & ~c["done"], body,
                           dict(i=jnp.int32(0), delta=delta0, done=jnp.bool_(False)))
    x_adv = jnp.clip(x + c["delta"], 0.0, 1.0)  # clip="delta": only removes round-off
    success = _success(logits_fn(x_adv), y, target, targeted)
    flat = (x_adv - x).reshape(b, -1)
    dnorm = jnp.max(jnp.abs(flat), 1) if norm == "linf" else jnp.linalg.norm(flat, axis=1)
    info = dict(iterations=c["i"], success=success,
                success_rate=jnp.mean(success.astype(jnp.float32)), delta_norm=dnorm)
    return x_adv, info
