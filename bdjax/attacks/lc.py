"""The label-consistent (LC) attack's pieces: corner trigger, robust model, PGD images.

LC poisons target-class images only and keeps their labels. To make the trigger the
easiest feature to learn, each chosen image is first made hard to classify: an
untargeted PGD-Linf attack against an ADVERSARIALLY ROBUST model of the same
architecture (whose adversarial examples change the image's content rather than adding
noise) pushes it away from its own class; then 3 x 3 checkerboards of +-255 go into the
four corners. At test time the corner trigger alone is stamped on clean images.

- :func:`corner_pattern` and :func:`lc_corners`: the static trigger (bdjax's trigger
  contract ``stamp(images_uint8, key) -> images_uint8``);
- :func:`adversarial_train`: Madry PGD adversarial training of the robust model, each
  epoch one compiled call;
- :func:`lc_adversarial`: the perturbed images, saved as uint8.

The caller caches the perturbed images and does the poisoning; nothing here writes
files.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.errors import BdjaxError
from bdjax.kernels import (StepOptions, crop_flip, scan_epoch, sgd, steps_per_epoch, to_unit,
                           train_step)
from bdjax.kernels.optim import SGDConfig
from bdjax.kernels.pgd import pgd
from bdjax.models import Model, State

# The reference's "all-corners" trigger on a 32 x 32 image: in the two LEFT corners
# (top and bottom alike, rows read top to bottom) this 3 x 3 pattern of +1/-1, in the two
# RIGHT corners its left-right mirror image. +1 adds 255 x amplitude, -1 subtracts it.
_LEFT = np.array([[1, -1, -1],
                  [-1, 1, -1],
                  [1, -1, 1]], np.int8)
_BASE = 32


@functools.lru_cache(maxsize=16)
def _pattern_cached(h: int, w: int) -> np.ndarray:
    base = np.zeros((_BASE, _BASE), np.int8)
    base[:3, :3] = base[-3:, :3] = _LEFT
    base[:3, -3:] = base[-3:, -3:] = _LEFT[:, ::-1]
    if (h, w) != (_BASE, _BASE):
        # Nearest-neighbour resize as PyTorch's: source index floor(i * 32 / size).
        rows = np.minimum(np.floor(np.arange(h) * (_BASE / h)).astype(int), _BASE - 1)
        cols = np.minimum(np.floor(np.arange(w) * (_BASE / w)).astype(int), _BASE - 1)
        base = base[rows][:, cols]
    base.setflags(write=False)
    return base


def corner_pattern(h: int, w: int) -> np.ndarray:
    """The LC trigger's signs at the image size.

    Args:
      h, w: image height and width.

    Returns:
      int8 ``[h, w]`` (read-only) of +1 / -1 on the corner pixels and 0 elsewhere: the
      reference's 32 x 32 layout, resized with nearest neighbours for other sizes (a 2 x 2
      block per pixel at 64 x 64).
    """
    for name, v in (("height", h), ("width", w)):
        if int(v) != v or v < 1:
            raise BdjaxError(f"image {name} {v!r} is invalid; accepted: an integer >= 1.")
    return _pattern_cached(int(h), int(w))


def lc_corners(images, key=None, *, amplitude: float = 1.0):
    """LC's trigger: 3 x 3 checkerboards of +-255 x ``amplitude`` in all four corners.

    ``clip(round(x + 255 * amplitude * s), 0, 255)`` in every channel, with ``s`` the
    :func:`corner_pattern`; at amplitude 1 the +1 pixels become 255 and the -1 pixels 0
    whatever the image. Pure and jittable; ``key`` is unused (a fixed trigger).

    Args:
      images: uint8 ``[..., H, W, C]``.
      key: unused.
      amplitude: the trigger's strength in [0, 1] (the reference's
        ``reduced_amplitude``; 1 by default).

    Returns:
      uint8 images of the same shape.

    References: Turner, Tsipras, Madry, "Label-Consistent Backdoor Attacks", 2019,
      Sec. 4.3 (the four-corner trigger and reduced amplitude).

    Differences from the reference:
      - The sum is rounded to the nearest grey level; the reference truncates. The two
        agree at amplitude 1 (every trigger pixel saturates).
    """
    if not 0.0 <= amplitude <= 1.0:
        raise BdjaxError(f"amplitude {amplitude!r} is out of range; accepted: [0, 1].")
    h, w = images.shape[-3], images.shape[-2]
    s = jnp.asarray(corner_pattern(h, w), jnp.float32)[:, :, None]
    out = images.astype(jnp.float32) + (255.0 * float(amplitude)) * s
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class _Adv:
    """Static settings of one adversarial-training epoch."""

    batch_size: int
    steps: int
    augment: bool
    flip: bool


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def _adv_epoch(model: Model, tx, opts: _Adv, state, opt_state, x, y, eps, step, key):
    plain = StepOptions(augment=False)

    def adv_step(st, os_, xb, yb, k):
        k_aug, k_start, k_train = jax.random.split(k, 3)
        xb = crop_flip(xb, k_aug, flip=opts.flip) if opts.augment else xb
        x_adv, _ = pgd(lambda z: model.apply(st, z), to_unit(xb), yb, norm="linf", eps=eps,
                       step=step, steps=opts.steps, targeted=False, key=k_start,
                       freeze_successes=False)
        return train_step(model, tx, plain, st, os_, jax.lax.stop_gradient(x_adv), yb,
                          k_train)

    return scan_epoch(adv_step, opts.batch_size, state, opt_state, x, y, key)


@functools.lru_cache(maxsize=8)
def _optimizer(cfg: SGDConfig, spe: int, epochs: int):
    # One transformation object per setting, so a second run reuses the compiled epoch.
    return sgd(cfg, spe, epochs)


def _check_images(x, y, model: Model):
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != model.image_shape:
        hwc = ", ".join(map(str, model.image_shape))
        raise BdjaxError(f"images of dtype {x.dtype} and shape {x.shape} do not fit model "
                         f"{model.name!r}; accepted: uint8 [N, {hwc}].")
    y = np.asarray(y)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer) or (
            y.size and not (0 <= y.min() and y.max() < model.num_classes)):
        raise BdjaxError(f"labels of dtype {y.dtype} and shape {y.shape} are invalid; "
                         f"accepted: [{x.shape[0]}] integers in 0..{model.num_classes - 1}.")
    if x.shape[0] == 0:
        raise BdjaxError("no images were given; accepted: at least one image.")
    return x, y.astype(np.int32)


def adversarial_train(model: Model, x, y, key: jax.Array, *, epochs: int = 100,
                      lr: float = 0.01, batch_size: int = 128, eps: float = 8 / 255,
                      step: float = 2 / 255, steps: int = 10, momentum: float = 0.9,
                      weight_decay: float = 5e-4, schedule: str = "cosine",
                      augment: bool = True, flip: bool = True,
                      state: State | None = None) -> State:
    """An adversarially robust model by PGD-Linf adversarial training (Madry et al.).

    Every batch (after crop/flip augmentation) is replaced by its untargeted PGD-Linf
    examples (random start in the ball, ``steps`` sign steps of ``step``, radius ``eps``,
    [0, 1] pixel space, the model in eval mode) and the model takes one SGD step on them
    with the true labels (BatchNorm in train mode). Each epoch is one compiled call.

    Args:
      model: the classifier to train (the architecture of the attacked model).
      x, y: uint8 training images ``[N, H, W, C]`` and int labels.
      key: the root key: init ``fold_in(key, 0)``, epoch e ``fold_in(key, e + 1)``.
      epochs, lr, batch_size, momentum, weight_decay, schedule: the SGD run (cosine
        per epoch over the run, or ``constant``).
      eps, step, steps: the training attack (defaults: eps 8/255, step 2/255, 10 steps,
        the setting the reference's robust CIFAR-10 model is named after).
      augment, flip: random crop (4 px) and horizontal flips.
      state: start from this state instead of a fresh init.

    Returns:
      The trained state.

    References: Madry et al., "Towards Deep Learning Models Resistant to Adversarial
      Attacks", ICLR 2018, Eq. (2.1) and Sec. 4.

    Differences from the reference:
      - The reference downloads pre-trained robust models (a ResNet-18, not the attacked
        PreAct-ResNet18, for CIFAR-10/100 and GTSRB; a PreAct-ResNet18 for Tiny) and
        ships no training code; bdjax trains the attacked architecture itself.
      - The attack runs with the model in eval mode (each sample's example is its own);
        common PyTorch adversarial training attacks in train mode, where BatchNorm uses
        the batch's statistics and its running statistics move on every attack pass.
      - The last partial batch is filled from the same permutation (static shapes).
    """
    x, y = _check_images(x, y, model)
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("steps", steps)):
        if int(v) != v or v < (0 if name == "steps" else 1):
            raise BdjaxError(f"{name} {v!r} is invalid; accepted: an integer >= "
                             f"{0 if name == 'steps' else 1}.")
    for name, v in (("lr", lr), ("eps", eps), ("step", step)):
        if not v >= 0 or (name == "lr" and not v > 0):
            raise BdjaxError(f"{name} {v!r} is invalid; accepted: a number "
                             f"{'> 0' if name == 'lr' else '>= 0'}.")
    tx = _optimizer(SGDConfig(float(lr), float(momentum), float(weight_decay), schedule,
                              "epoch", 0), steps_per_epoch(len(x), batch_size), int(epochs))
    opts = _Adv(int(batch_size), int(steps), bool(augment), bool(flip))
    if state is None:
        state = model.init(jax.random.fold_in(key, 0))
    else:  # a copy: the epochs donate their input buffers
        state = jax.tree_util.tree_map(jnp.array, state)
    opt_state = tx.init(state["params"])
    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y)
    for epoch in range(int(epochs)):
        state, opt_state, loss, _ = _adv_epoch(model, tx, opts, state, opt_state, x_dev,
                                               y_dev, jnp.float32(eps), jnp.float32(step),
                                               jax.random.fold_in(key, epoch + 1))
        if not np.isfinite(float(loss)):
            raise BdjaxError(f"adversarial training diverged at epoch {epoch + 1} (loss "
                             f"{float(loss)}); accepted: a smaller lr.")
    return state


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _perturb(model: Model, state, x, y, steps: int, batch_size: int, random_start: bool,
             eps, step, key):
    n = x.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    xp = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    yp = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)]) if pad else y
    keys = jax.random.split(key, nb)

    def one(args):
        xb, yb, k = args
        x_adv, _ = pgd(lambda z: model.apply(state, z), to_unit(xb), yb, norm="linf",
                       eps=eps, step=step, steps=steps, targeted=False,
                       key=k if random_start else None, freeze_successes=False)
        return jnp.clip(jnp.round(x_adv * 255.0), 0, 255).astype(jnp.uint8)

    out = jax.lax.map(one, (xp.reshape(nb, batch_size, *x.shape[1:]),
                            yp.reshape(nb, batch_size), keys))
    return out.reshape(nb * batch_size, *x.shape[1:])[:n]


def lc_adversarial(model: Model, state: State, x_uint8, y, key: jax.Array | None = None, *,
                   eps: float = 16 / 255, step: float = 1.5 / 255, steps: int = 100,
                   batch_size: int = 256, random_start: bool = False) -> np.ndarray:
    """LC's adversarially perturbed images (before the corner trigger), as uint8.

    Untargeted PGD-Linf against the (robust) model in eval mode, ascending the
    cross-entropy of each image's true label: from the clean image (or a uniform random
    start), ``steps`` sign steps of ``step``, each followed by projection onto the
    ``eps`` ball and the [0, 1] box, every sample moving for all steps (no early exit).
    The result is rounded to the nearest grey level, so it stays within ``eps`` of the
    input in uint8 units. All batches run in one compiled call.

    Args:
      model, state: the adversarially robust model (:func:`adversarial_train`).
      x_uint8: uint8 images ``[N, H, W, C]`` (the target-class images to poison).
      y: their true labels ``[N]``.
      key: the random start's key (unused without ``random_start``; the reference
        starts from the clean image).
      eps: Linf radius in [0, 1] units (16/255, BackdoorBench's LC data; 8/255 the
        crafting script's own setting).
      step, steps: the sign step and the number of steps (1.5/255, 100).
      batch_size: images per PGD batch (memory only: eval mode makes samples
        independent).
      random_start: start uniformly in the ball.

    Returns:
      uint8 ``[N, H, W, C]``.

    References: Turner, Tsipras, Madry, "Label-Consistent Backdoor Attacks", 2019,
      Sec. 4.2 (adversarial perturbations of a robust model); BackdoorBench
      ``resource/label-consistent/craft_adv_dataset.py``.

    Differences from the reference:
      - The reference saves ``(x * 255).to(uint8)``, which truncates: a pixel the
        attack did not move can drop one grey level (k / 255 * 255 < k in float32),
        and a pixel at the edge of the ball can end 17/255 away; bdjax rounds.
      - The reference's robust model is a downloaded ResNet-18 (see
        :func:`adversarial_train`); bdjax attacks the robust model it trains.
      - bdjax perturbs only the images it is given (the target-class images to
        poison); the reference perturbs the whole training and test sets.
    """
    x, y = _check_images(x_uint8, y, model)
    if int(steps) != steps or steps < 0:
        raise BdjaxError(f"steps {steps!r} is invalid; accepted: an integer >= 0.")
    if int(batch_size) != batch_size or batch_size < 1:
        raise BdjaxError(f"batch_size {batch_size!r} is invalid; accepted: an integer >= 1.")
    for name, v in (("eps", eps), ("step", step)):
        if not v >= 0:
            raise BdjaxError(f"{name} {v!r} is invalid; accepted: a number >= 0.")
    if random_start and key is None:
        raise BdjaxError("random_start needs a key; accepted: key=jax.random.key(seed).")
    key = jax.random.key(0) if key is None else key
    bs = min(int(batch_size), x.shape[0])
    out = _perturb(model, state, jnp.asarray(x), jnp.asarray(y), int(steps), bs,
                   bool(random_start), jnp.float32(eps), jnp.float32(step), key)
    return np.asarray(out)


__all__ = ["adversarial_train", "corner_pattern", "lc_adversarial", "lc_corners"]
