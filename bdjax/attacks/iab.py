"""Input-aware dynamic backdoor (IAB): a trained generator and mask make each image's
own trigger.

A generator G (C -> C channels) proposes a pattern for every image and a mask net M
(C -> 1) chooses where it goes: ``x' = x + (G(x) - x) * M(x)``. Training follows the
reference (BackdoorBench ``attack/inputaware.py`` with
``config/attack/inputaware/default.yaml``) in two stages:

1. ``mask_epochs`` (25) epochs train M alone (:func:`train_mask`): Adam ``lr_m`` (0.01,
   betas (0.5, 0.9), x0.1 after epochs 10 and 20) on
   ``lambda_norm * mean(relu(M(x1) - mask_density)) + lambda_div**2 * D(x1, x2, M)``
   with the diversity ``D = mean_i RMS(x1_i - x2_i) / (RMS(M(x1)_i - M(x2)_i) + 1e-7)``
   between two independently shuffled views of the training set.
2. M is frozen (eval mode) and G trains with the classifier, batch by batch
   (:func:`poison_batch`, the :class:`bdjax.attacks.control.Hooks` ``poison``): the
   first ``n_bd`` images of a batch become ``x + (G(x) - x) M(x)`` labelled with the
   target, the next ``n_cross`` become cross samples ``x1 + (G(x2) - x1) M(x2)`` (``x2``
   the image at the same position of a second, independent shuffle of the training
   set, :attr:`bdjax.attacks.control.Hooks.partners`) keeping ``x1``'s label, the rest
   stay clean; G gets the classifier's loss plus ``lambda_div * D`` on the patterns.
   G's Adam: ``lr_g`` (0.01, betas (0.5, 0.9)) times the classifier's schedule relative
   to its peak (``lr_g_schedule = "classifier"``; ``"constant"`` keeps it at ``lr_g``).
   In the reference both lrs stay constant through its 100 epochs (their milestones
   start at epochs 100 and 200), so G's lr is a fixed multiple of the classifier's;
   following the classifier's schedule keeps that relation under bdjax's cosine.

Both nets see images normalised with the training set's per-channel mean and std, as
the reference's (whose data loaders normalise); the blend itself is affine per channel,
so it is computed in [0, 1] pixel space. G and M are the reference's
``InputAwareGenerator`` (:class:`InputAwareNet`): Conv-BN-ReLU pairs at 32, 64, 128
channels each followed by a 2x2 max-pool, one 128 block, then per stage a bilinear x2
upsampling and two blocks (128 -> 64, 64 -> 32, 32 -> out, the last without ReLU), output
``tanh(z) / (2 + 1e-7) + 0.5``; the mask is :func:`threshold` of M's output. BatchNorm
follows PyTorch (momentum 0.05, eps 1e-5, running variance unbiased); its running
statistics are saved with the weights and used at test time (:func:`stamp`).

The module registers ``control.register("iab", Hooks(...))`` on import.
"""

from __future__ import annotations

import functools
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax.attacks import control, resources
from bdjax.errors import BdjaxError, check_choice, check_range
from bdjax.kernels.augment import crop_flip
from bdjax.kernels.steps import batch_indices, steps_per_epoch, to_unit
from bdjax.models.inits import torch_bias, torch_default
from bdjax.models.layers import Conv

EPS = 1e-7  # the reference's EPSILON (output scaling, threshold, diversity)
BN_MOMENTUM = 0.05  # PyTorch convention: running = (1 - m) running + m batch
BN_EPS = 1e-5
WIDTHS = (32, 64, 128)  # the reference's non-MNIST generator
MASK_MILESTONES = (10, 20)  # schedulerM_milestones, gamma 0.1
MASK_BATCH = 128  # the reference's batch size for the mask stage
LR_G_SCHEDULES = ("classifier", "constant")  # G's lr: follows the classifier's, or fixed
_STAMP_CHUNK = 256  # images per generator call at test time (bounds memory)


# ----------------------------------------------------------------------- the networks
class TorchBatchNorm(nn.Module):
    """PyTorch's ``BatchNorm2d`` (affine, running stats) over the last axis.

    Training mode normalises with the batch's mean and biased variance and updates the
    running mean and the running *unbiased* variance with ``momentum`` (PyTorch's
    convention); eval mode uses the running statistics.
    """

    momentum: float = BN_MOMENTUM
    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes)
            var = jnp.mean(jnp.square(x - mean), axes)
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
                ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(unbiased)
        else:
            mean, var = ra_mean.value, ra_var.value
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class _Block(nn.Module):
    """The reference's ``Conv2dBlock``: 3x3 conv (padding 1, bias, PyTorch init), BN,
    optional ReLU."""

    features: int
    relu: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=torch_default,
                 bias_init=torch_bias(9 * x.shape[-1]), name="conv")(x)
        x = TorchBatchNorm(name="bn")(x, train)
        return nn.relu(x) if self.relu else x


def max_pool2(x):
    """2x2/2 max-pool (by reshape; ``nn.MaxPool2d(2)`` on even sizes)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _interp_matrix(n: int) -> np.ndarray:
    """[2n, n] weights of PyTorch's bilinear x2 resize along one axis
    (``align_corners=False``: source ``(o + 0.5) / 2 - 0.5`` clamped at 0)."""
    u = np.zeros((2 * n, n), np.float32)
    for o in range(2 * n):
        src = max((o + 0.5) / 2 - 0.5, 0.0)
        i0 = int(np.floor(src))
        frac = src - i0
        u[o, i0] += 1.0 - frac
        u[o, min(i0 + 1, n - 1)] += frac
    return u


def upsample2(x):
    """Bilinear x2 upsampling as ``nn.Upsample(scale_factor=2, mode="bilinear")``
    (``align_corners=False``): each output pixel is 3/4 of its source pixel plus 1/4 of
    the neighbour on its side, the border pixel repeated at the edges. Two small matrix
    products (cheaper to compile than gathers or slices).

    Args:
      x: [N, H, W, C].

    Returns:
      [N, 2H, 2W, C].
    """
    uh = jnp.asarray(_interp_matrix(x.shape[1]), x.dtype)
    uw = jnp.asarray(_interp_matrix(x.shape[2]), x.dtype)
    x = jnp.einsum("ph,nhwc->npwc", uh, x)
    return jnp.einsum("qw,npwc->npqc", uw, x)


def squash(z):
    """The generator's output map ``tanh(z) / (2 + 1e-7) + 0.5`` (into (0, 1))."""
    return jnp.tanh(z) / (2 + EPS) + 0.5


def threshold(z):
    """The mask's soft threshold ``tanh(20 z - 10) / (2 + 1e-7) + 0.5``."""
    return jnp.tanh(z * 20 - 10) / (2 + EPS) + 0.5


class InputAwareNet(nn.Module):
    """The reference's ``InputAwareGenerator`` (G with ``out_channels = C``, M with 1).

    Input: normalised images [N, H, W, C] with H and W multiples of 8; output in (0, 1).
    """

    out_channels: int
    widths: tuple[int, ...] = WIDTHS

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, w in enumerate(self.widths):
            x = _Block(w, name=f"down{2 * i}")(x, train)
            x = _Block(w, name=f"down{2 * i + 1}")(x, train)
            x = max_pool2(x)
        x = _Block(self.widths[-1], name="middle")(x, train)
        c, steps = self.widths[-1], len(self.widths)
        for s in range(steps):
            x = upsample2(x)
            x = _Block(c, name=f"up{2 * s}")(x, train)
            last = s == steps - 1
            nxt = self.out_channels if last else self.widths[-2 - s]
            x = _Block(nxt, relu=not last, name=f"up{2 * s + 1}")(x, train)
            c = nxt
        return squash(x)


def _check_size(h: int, w: int, what: str):
    if h % 8 or w % 8 or h < 8 or w < 8:
        raise BdjaxError(f"{what} of size {h}x{w} are invalid; accepted: height and width "
                         "multiples of 8 (e.g. 16x16, 32x32).")


def init_nets(key: jax.Array, image_shape: tuple[int, int, int]) -> tuple[dict, dict]:
    """Fresh G and M variables ``{"params", "batch_stats"}`` (PyTorch initialisation,
    BN scale 1, shift 0, running mean 0, variance 1).

    Args:
      key: the key (G from its first half, M from its second).
      image_shape: (H, W, C), H and W multiples of 8.

    Returns:
      (generator variables, mask variables).
    """
    h, w, c = (int(v) for v in image_shape)
    _check_size(h, w, "images")
    return _init_nets(key, (h, w, c))


@functools.partial(jax.jit, static_argnums=1)
def _init_nets(key, image_shape):
    k_g, k_m = jax.random.split(key)
    return (_torch_init(k_g, InputAwareNet(image_shape[2]), image_shape),
            _torch_init(k_m, InputAwareNet(1), image_shape))


def _torch_init(key, net: nn.Module, image_shape) -> dict:
    """``net``'s variables with every conv's kernel and bias drawn from
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (``nn.Conv2d``'s default) by one draw from
    ``key`` (a flax ``init`` here runs hundreds of small ops: seconds on a CPU)."""
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0),
                                             jnp.zeros((1, *image_shape)), train=False))
    params, stats = shapes["params"], shapes["batch_stats"]
    names = sorted(params)
    sizes = [math.prod(params[b]["conv"][k].shape) for b in names for k in ("kernel", "bias")]
    u = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    out_p, out_s, i = {}, {}, 0
    for b in names:
        kshape = params[b]["conv"]["kernel"].shape  # (3, 3, in, out)
        bound = 1.0 / math.sqrt(kshape[0] * kshape[1] * kshape[2])
        conv = {}
        for k in ("kernel", "bias"):
            shape = params[b]["conv"][k].shape
            n = math.prod(shape)
            conv[k] = (u[i:i + n] * bound).reshape(shape)
            i += n
        ch = params[b]["bn"]["scale"].shape
        out_p[b] = {"conv": conv, "bn": {"scale": jnp.ones(ch, jnp.float32),
                                         "bias": jnp.zeros(ch, jnp.float32)}}
        out_s[b] = {"bn": {"mean": jnp.zeros(stats[b]["bn"]["mean"].shape, jnp.float32),
                           "var": jnp.ones(stats[b]["bn"]["var"].shape, jnp.float32)}}
    return {"params": out_p, "batch_stats": out_s}


# -------------------------------------------------------------------------- losses
def _rms(a):
    """Per-sample root mean square over all non-batch axes (the reference's
    ``sqrt(mean(MSELoss(reduction="none")))``)."""
    return jnp.sqrt(jnp.mean(jnp.square(a), axis=tuple(range(1, a.ndim))))


def diversity(x1, x2, p1, p2):
    """The reference's diversity loss: ``mean_i RMS(x1_i - x2_i) / (RMS(p1_i - p2_i) +
    1e-7)`` (small when different inputs get different patterns or masks).

    Args:
      x1, x2: [N, H, W, C] image pairs (normalised, as the reference's).
      p1, p2: [N, H, W, K] their patterns (normalised) or masks.

    Returns:
      float32 scalar.
    """
    return jnp.mean(_rms(x1 - x2) / (_rms(p1 - p2) + EPS))


def _normalize(x01, fixed):
    return (x01 - fixed["mean"]) / fixed["std"]


def _apply_train(variables: dict, xn, out_channels: int):
    """One train-mode pass: (output, new batch_stats)."""
    out, upd = InputAwareNet(out_channels).apply(variables, xn, train=True,
                                                 mutable=["batch_stats"])
    return out, upd["batch_stats"]


def _apply_eval(variables: dict, xn, out_channels: int):
    return InputAwareNet(out_channels).apply(variables, xn, train=False)


def _apply_train_groups(variables: dict, groups, out_channels: int, order):
    """Train-mode passes over equally sized ``groups`` [K, n, H, W, C], each normalised
    with its own batch statistics, as ONE vmapped pass (half the program of separate
    calls). ``order`` lists which group's statistics update the running ones, in turn
    (the reference's sequence of calls).

    Returns:
      (outputs [K, n, H, W, out], running statistics after the updates of ``order``).
    """
    outs, single = jax.vmap(lambda v: _apply_train(variables, v, out_channels))(groups)
    keep = 1 - BN_MOMENTUM

    def run(r, s):  # single update of group k: s_k = keep r + m b_k, so m b_k = s_k - keep r
        cur = r
        for k in order:
            cur = keep * cur + (s[k] - keep * r)
        return cur

    return outs, jax.tree_util.tree_map(run, variables["batch_stats"], single)


# ------------------------------------------------------------------- stage 1: the mask
def _settings(p: dict) -> dict:
    """The IAB parameters of ``ctx.params``, checked."""
    check_range("cross_ratio", float(p["cross_ratio"]), 0, math.inf)
    check_range("mask_density", float(p["mask_density"]), 0, 1)
    check_range("lambda_div", float(p["lambda_div"]), 0, math.inf)
    check_range("lambda_norm", float(p["lambda_norm"]), 0, math.inf)
    check_range("lr_g", float(p["lr_g"]), 0, math.inf, low_open=True)
    check_range("lr_m", float(p["lr_m"]), 0, math.inf, low_open=True)
    check_choice("lr_g_schedule", p["lr_g_schedule"], LR_G_SCHEDULES)
    epochs = p["mask_epochs"]
    if int(epochs) != epochs or epochs < 0:
        raise BdjaxError(f"mask_epochs {epochs!r} is invalid; accepted: an integer >= 0.")
    return {k: float(p[k]) for k in ("cross_ratio", "mask_density", "lambda_div",
                                     "lambda_norm", "lr_g", "lr_m")} | {
        "mask_epochs": int(epochs), "lr_g_schedule": p["lr_g_schedule"]}


def mask_tx(lr_m, steps: int):
    """The mask net's optimizer: Adam (betas (0.5, 0.9), eps 1e-8) with the reference's
    MultiStepLR (x0.1 after epochs 10 and 20).

    Args:
      lr_m: the initial learning rate (float or traced scalar).
      steps: optimizer steps per epoch.

    Returns:
      optax.GradientTransformation.
    """
    bounds = [m * steps for m in MASK_MILESTONES]

    def lr(count):
        drops = sum((count >= b).astype(jnp.float32) for b in bounds)
        return lr_m * jnp.power(jnp.float32(0.1), drops)

    return optax.adam(lr, b1=0.5, b2=0.9)


def _mask_loss(m_params, m_stats, x1n, x2n, density, lambda_norm, lambda_div):
    # the reference runs M on x1 twice (the first output unused) and then on x2, each in
    # train mode on its own batch: x1's statistics update the running ones twice
    outs, s = _apply_train_groups({"params": m_params, "batch_stats": m_stats},
                                  jnp.stack([x1n, x2n]), 1, order=(0, 0, 1))
    m1, m2 = threshold(outs[0]), threshold(outs[1])
    norm = jnp.mean(jax.nn.relu(m1 - density))
    div = diversity(x1n, x2n, m1, m2) * lambda_div  # the reference scales it twice
    return lambda_norm * norm + lambda_div * div, (s, norm, div)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1, 2))
def _mask_epoch(static, m_vars, opt_state, x, fixed, hyper, key):
    """One epoch of stage 1 (one ``lax.scan`` over batches); ``hyper`` = (density,
    lambda_norm, lambda_div, lr_m) are traced, so other settings reuse the program.
    Returns (variables, optimizer state, mean loss, mean norm term, mean diversity)."""
    batch, flip, steps = static
    density, lambda_norm, lambda_div, lr_m = (hyper[i] for i in range(4))
    tx = mask_tx(lr_m, steps)
    k1, k2, k_steps = jax.random.split(key, 3)
    idx1 = batch_indices(k1, x.shape[0], batch)  # two independently shuffled loaders
    idx2 = batch_indices(k2, x.shape[0], batch)
    keys = jax.random.split(k_steps, idx1.shape[0])

    def body(carry, inp):
        (params, stats), opt = carry
        i1, i2, k = inp
        ka, kb = jax.random.split(k)
        x1 = _normalize(to_unit(crop_flip(x[i1], ka, flip=flip)), fixed)
        x2 = _normalize(to_unit(crop_flip(x[i2], kb, flip=flip)), fixed)
        (loss, (stats, norm, div)), g = jax.value_and_grad(_mask_loss, has_aux=True)(
            params, stats, x1, x2, density, lambda_norm, lambda_div)
        updates, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, updates)
        return ((params, stats), opt), (loss, norm, div)

    ((params, stats), opt_state), (loss, norm, div) = jax.lax.scan(
        body, ((m_vars["params"], m_vars["batch_stats"]), opt_state), (idx1, idx2, keys))
    return ({"params": params, "batch_stats": stats}, opt_state, jnp.mean(loss),
            jnp.mean(norm), jnp.mean(div))


def data_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) standard deviation of uint8 images in [0, 1]
    units, the normalisation G and M see.

    Args:
      x: uint8 [N, H, W, C].

    Returns:
      (mean [C], std [C]) float32.
    """
    x = np.asarray(x)
    c = x.shape[-1]
    s = np.zeros(c, np.float64)
    s2 = np.zeros(c, np.float64)
    for i in range(0, len(x), 4096):
        v = x[i:i + 4096].reshape(-1, c).astype(np.float64) / 255.0
        s += v.sum(0)
        s2 += np.square(v).sum(0)
    n = x.size // c
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def train_mask(m_vars: dict, x: np.ndarray, fixed: dict, key: jax.Array, *, epochs: int,
               lr_m: float, mask_density: float, lambda_norm: float, lambda_div: float,
               flip: bool, batch_size: int = MASK_BATCH, log=print):
    """Stage 1: trains the mask net alone (one compiled call per epoch).

    Each step draws a batch from each of two independent shuffles of ``x``, augments
    both (random crop, flip where allowed), runs M in train mode and minimises
    ``lambda_norm * mean(relu(m1 - mask_density)) + lambda_div**2 * diversity``.

    Args:
      m_vars: M's variables ``{"params", "batch_stats"}``.
      x: uint8 [N, H, W, C] training images.
      fixed: ``{"mean", "std"}`` of the normalisation.
      key: epoch ``e`` uses ``fold_in(key, e)``.
      epochs, lr_m, mask_density, lambda_norm, lambda_div: the attack's settings.
      flip: horizontal flips in the augmentation.
      batch_size: images per batch (the reference: 128).
      log: progress lines (one per epoch).

    Returns:
      (M's trained variables, [per-epoch (loss, norm term, diversity)]).
    """
    n = len(x)
    steps = steps_per_epoch(n, batch_size)
    tx = mask_tx(lr_m, steps)
    static = (min(batch_size, n), bool(flip), steps)
    hyper = jnp.asarray([mask_density, lambda_norm, lambda_div, lr_m], jnp.float32)
    opt_state = tx.init(m_vars["params"])
    m_vars = jax.tree_util.tree_map(jnp.array, m_vars)  # own buffers (donated)
    x_dev = jnp.asarray(x)
    history = []
    for e in range(epochs):
        t0 = time.perf_counter()
        m_vars, opt_state, loss, norm, div = _mask_epoch(static, m_vars, opt_state, x_dev,
                                                         fixed, hyper, jax.random.fold_in(key, e))
        history.append((float(loss), float(norm), float(div)))
        log(f"iab mask epoch {e + 1}/{epochs}: loss {history[-1][0]:.4f} "
            f"(norm {history[-1][1]:.4f}, diversity {history[-1][2]:.4f}), "
            f"{time.perf_counter() - t0:.1f} s")
    return m_vars, history


# ---------------------------------------------------------------- stage 2: the hooks
def counts(ratio: float, batch: int, cross_ratio: float) -> tuple[int, int, int, int]:
    """Static sizes of a batch's slices: (n_bd, n_cross, n_g2, n_div).

    ``n_bd`` is the most images a batch poisons (``int(ratio * B)``, or 1 when
    ``ratio * B < 1``: then :func:`bdjax.attacks.control.poison_count` decides per batch
    whether that one is poisoned); ``n_cross = int(n_bd * cross_ratio)``; G runs on the
    partner images ``x2[n_bd : n_bd + n_g2]`` (the cross sources, and the diversity
    partners of the poisoned images), ``n_div`` pairs enter the diversity loss.

    Args:
      ratio: the per-batch poisoning ratio, in (0, 1).
      batch: the batch size B.
      cross_ratio: cross samples per poisoned image.

    Returns:
      (n_bd, n_cross, n_g2, n_div) Python ints.
    """
    n_bd = int(ratio * batch) if ratio * batch >= 1 else 1
    n_bd = min(n_bd, batch - 1) if batch > 1 else batch
    rest = batch - n_bd
    n_cross = min(int(n_bd * cross_ratio), rest)
    n_g2 = min(max(n_cross, n_bd), rest)
    return n_bd, n_cross, n_g2, min(n_bd, n_g2)


def poison_parts(ctx: control.Batch, params, fixed, x, y, key, x2):
    """The stage-2 batch and what G's update needs (the body of :func:`poison_batch`).

    The first ``n_bd`` images become ``x + (G(x) - x) M(x)`` with the target label, the
    next ``n_cross`` ``x1 + (G(x2) - x1) M(x2)`` with their own label (``x2`` the partner
    batch at the same positions, as the reference's ``inputs2[num_bd : num_bd +
    num_cross]``), the rest stay clean. G runs in train
    mode (batch statistics of each slice: the reference calls it once on the poisoned
    images, then once on the cross sources), M in eval mode.

    Args:
      ctx: the run (``ctx.params``: cross_ratio, lambda_div).
      params: ``{"params", "batch_stats"}`` of G.
      fixed: ``{"mask": M's variables, "mean", "std"}``.
      x: float [B, H, W, C] in [0, 1] (after the standard augmentation).
      y: int [B] labels.
      key: the batch's key (the poison count when ``ratio * B < 1``).
      x2: float [B, H, W, C] in [0, 1], the partner batch (a second shuffle of the
        training set, augmented with its own draws; the cross sources and the
        diversity partners of the poisoned images).

    Returns:
      (images in [0, 1], labels, ``lambda_div * diversity`` of the patterns, G's new BN
      running statistics); a batch that poisons nothing (``ratio * B < 1``) comes back
      unchanged with 0 and the old statistics.
    """
    p = ctx.params
    b, _, _, c = x.shape
    n_bd, n_cross, n_g2, n_div = counts(ctx.ratio, b, float(p["cross_ratio"]))
    active = control.poison_count(ctx.ratio, b, key) > 0
    xn, x2n = _normalize(x, fixed), _normalize(x2, fixed)
    g = lambda v, s: _apply_train({"params": params["params"], "batch_stats": s}, v, c)  # noqa: E731

    if n_g2 == n_bd:  # the usual case (cross_ratio 1): both passes as one vmapped pass
        pats, stats = _apply_train_groups(
            params, jnp.stack([xn[:n_bd], x2n[n_bd:n_bd + n_g2]]), c, order=(0, 1))
        pat1, pat2 = pats[0], pats[1]
    else:
        pat1, stats = g(xn[:n_bd], params["batch_stats"])
        if n_g2:  # (a batch of one image has no room for cross samples)
            pat2, stats = g(x2n[n_bd:n_bd + n_g2], stats)
    # M in eval mode is per image: one pass for the poisoned images and the cross sources
    masks = threshold(_apply_eval(fixed["mask"], jnp.concatenate(
        [xn[:n_bd], x2n[n_bd:n_bd + n_cross]]), 1))
    parts = [x[:n_bd] + (pat1 - x[:n_bd]) * masks[:n_bd]]
    if n_cross:
        x1c = x[n_bd:n_bd + n_cross]
        parts.append(x1c + (pat2[:n_cross] - x1c) * masks[n_bd:])
    parts.append(x[n_bd + n_cross:])
    out = jnp.concatenate(parts)
    out_y = jnp.concatenate([ctx.target_labels(y[:n_bd]), y[n_bd:]]).astype(y.dtype)
    div = jnp.float32(0)
    if n_div:
        div = diversity(xn[:n_div], x2n[n_bd:n_bd + n_div], _normalize(pat1[:n_div], fixed),
                        _normalize(pat2[:n_div], fixed))
    stats = jax.tree_util.tree_map(lambda new, old: jnp.where(active, new, old), stats,
                                   params["batch_stats"])
    return (jnp.where(active, out, x), jnp.where(active, out_y, y),
            jnp.where(active, float(p["lambda_div"]) * div, 0.0).astype(jnp.float32), stats)


def poison_batch(ctx: control.Batch, params, state, fixed, x, y, key, x2):
    """The stage-2 batch: :class:`bdjax.attacks.control.Hooks` ``poison``.

    Args:
      ctx, fixed, x, y, key, x2: as :func:`poison_parts`.
      params: G's ``params``; state: G's ``batch_stats`` (the hook's state).

    Returns:
      (images, labels, ``lambda_div * diversity`` (its gradient trains G), G's new
      running statistics).
    """
    return poison_parts(ctx, {"params": params, "batch_stats": state}, fixed, x, y, key, x2)


def generator_tx(lr_g: float, scale=1.0):
    """G's optimizer: Adam(betas (0.5, 0.9), eps 1e-8, as PyTorch's) on G's ``params``
    (its running statistics are the hook's state).

    Args:
      lr_g: G's peak learning rate.
      scale: 1.0 (a constant lr) or a ``count -> fraction`` schedule (the classifier's
        relative to its peak, :func:`bdjax.attacks.control.lr_fraction`): G's lr at
        update ``count`` is ``lr_g * scale(count)``.
    """
    lr = (lambda count: lr_g * scale(count)) if callable(scale) else lr_g * scale
    return optax.adam(lr, b1=0.5, b2=0.9)


def init_attack(ctx: control.Batch, key: jax.Array, x, y, log=print):
    """Initialises G and M and trains M (stage 1) (:class:`Hooks` ``init``).

    Args:
      ctx: the run (its ``params``: mask_epochs, lr_m, mask_density, lambda_norm,
        lambda_div).
      key: G and M from ``fold_in(key, 0)``, stage 1 from ``fold_in(key, 1)``.
      x: uint8 [N, H, W, C] training images (H, W multiples of 8); y: unused.
      log: progress lines.

    Returns:
      (params, state, fixed): G's ``params`` (trained with the classifier), G's
      ``batch_stats`` (updated by each batch) and ``{"mask": M's trained variables,
      "mean", "std"}``.

    Raises:
      BdjaxError: a parameter out of range, or images that are not uint8 [N, H, W, C]
        with H and W multiples of 8.

    References:
      T. A. Nguyen, A. Tran. Input-Aware Dynamic Backdoor Attack. NeurIPS 2020
      (BackdoorBench ``attack/inputaware.py``, ``config/attack/inputaware/default.yaml``).

    Differences from the reference:
      - Partners: the cross sources and diversity partners ``x2`` come from a second,
        independent shuffle of the training set, as the reference's second loader, but
        drawn from the epoch's key (``fold_in``), not torch's global generator.
      - Normalisation: G and M see images normalised with the training set's own
        per-channel mean and std (the hooks do not know the dataset's name); for
        CIFAR-10 these are the reference's constants up to rounding.
      - Stage 1 batches: the last batch of an epoch is filled with images of the same
        shuffle (:func:`bdjax.kernels.steps.batch_indices`) instead of being smaller.
      - Stage 1's unused extra pass of M over x1 is not computed; its effect on the BN
        running statistics (x1's statistics applied twice) is reproduced exactly.
      - A batch that poisons nothing (``ratio * B < 1``): the reference's diversity is
        the mean over an empty batch, a NaN loss; bdjax adds 0 and keeps G's statistics.
      - ``cross_ratio``: the reference fixes ``n_cross = n_bd``; bdjax makes
        ``int(n_bd * cross_ratio)`` (default 1: the same) and pairs at most
        ``B - n_bd`` images in the diversity (the reference fails for ratio > 0.5).
      - G's two train-mode passes (poisoned images, cross sources) run as one vmapped
        pass with the statistics of each slice and the running statistics updated in
        the reference's order (same values, half the compiled program).
      - Only the 32-64-128 networks (the reference's MNIST variant, 16-32, does not
        apply: bdjax has no MNIST).
      - The classifier trains with the run's :class:`bdjax.train.TrainConfig` (bdjax's
        SGD schedule); the reference's classifier SGD keeps lr 0.01 (MultiStepLR
        milestones from epoch 100). Like the reference, no extra augmentation follows
        the poisoning (its ``random_crop``/``random_rotation`` settings are unused).
      - G's lr follows the classifier's schedule (``lr_g_schedule = "classifier"``,
        the default): ``lr_g`` times the classifier's lr over its peak. The reference
        keeps both constant for its 100 epochs, so G's lr is a fixed multiple of the
        classifier's there and the two are the same under a constant schedule. Under
        bdjax's cosine a constant G keeps moving the trigger while the classifier's lr
        reaches 0 (synthetic data, small CNN, 20 epochs: seed 0, cross sources from the
        same batch, ASR 54.5 with G constant, 62.6 following; seed 1, this code, 64.2
        and 66.0). ``"constant"`` is the reference's literal setting.
      - Stage 1's per-epoch evaluation on the test set (logging only) is not run.
      - Test-time rounding: see :func:`stamp`.
    """
    s = _settings(ctx.params)
    x = np.asarray(x)
    if x.ndim != 4 or x.dtype != np.uint8:
        raise BdjaxError(f"training images of shape {x.shape} and dtype {x.dtype} are "
                         "invalid; accepted: uint8 [N, H, W, C].")
    g_vars, m_vars = init_nets(jax.random.fold_in(key, 0), x.shape[1:])
    mean, std = data_stats(x)
    fixed = {"mean": jnp.asarray(mean), "std": jnp.asarray(std)}
    m_vars, _ = train_mask(m_vars, x, fixed, jax.random.fold_in(key, 1),
                           epochs=s["mask_epochs"], lr_m=s["lr_m"],
                           mask_density=s["mask_density"], lambda_norm=s["lambda_norm"],
                           lambda_div=s["lambda_div"], flip=ctx.flip, log=log)
    return g_vars["params"], g_vars["batch_stats"], {**fixed, "mask": m_vars}


def arrays(ctx, params, state, fixed) -> dict:
    """What :func:`stamp` needs (:class:`Hooks` ``arrays``).

    Args:
      ctx: the run (unused).
      params, state: G's ``params`` and ``batch_stats``; fixed: ``{"mask", "mean",
        "std"}``.

    Returns:
      ``{name: array}`` flattened by ``resources.flatten``: ``generator/...`` and
      ``mask/...`` (each ``params`` and ``batch_stats``), ``mean``, ``std``.
    """
    generator = {"params": params, "batch_stats": state}
    return resources.flatten({"generator": generator, "mask": fixed["mask"],
                              "mean": fixed["mean"], "std": fixed["std"]})


def _stamp_float(tree, x01):
    c = x01.shape[-1]
    fixed = {"mean": jnp.asarray(tree["mean"]), "std": jnp.asarray(tree["std"])}
    xn = _normalize(x01, fixed)
    pattern = _apply_eval(tree["generator"], xn, c)
    mask = threshold(_apply_eval(tree["mask"], xn, 1))
    return x01 + (pattern - x01) * mask


def stamp(tree: dict, images_uint8):
    """Input-aware's test-time trigger: ``x + (G(x) - x) M(x)`` with each image's own
    pattern and mask (G and M in eval mode), as uint8 (rounded, clipped).

    Pure and jittable; runs the nets on chunks of 256 images.

    Args:
      tree: ``resources.nest`` of :func:`arrays` (``generator``, ``mask``, ``mean``,
        ``std``).
      images_uint8: uint8 [N, H, W, C], H and W multiples of 8.

    Returns:
      uint8 [N, H, W, C].

    References:
      T. A. Nguyen, A. Tran. Input-Aware Dynamic Backdoor Attack. NeurIPS 2020.

    Differences from the reference:
      - Rounding: the reference saves its poisoned test images through ``ToPILImage``
        (``x * 255`` truncated); after its normalise/denormalise round trip that drops
        about half of the unmasked pixels by one level. bdjax rounds to nearest.
      - Normalisation: the training set's own per-channel mean and std (saved as
        ``mean``/``std``); see :func:`init_attack`.
    """
    images = jnp.asarray(images_uint8)
    if images.ndim != 4 or images.dtype != jnp.uint8:
        raise BdjaxError(f"images of shape {tuple(images.shape)} and dtype {images.dtype} "
                         "are invalid; accepted: uint8 [N, H, W, C].")
    n, h, w, c = images.shape
    _check_size(h, w, "images")
    x01 = images.astype(jnp.float32) / 255.0
    if n <= _STAMP_CHUNK:
        out = _stamp_float(tree, x01)
    else:
        chunks = -(-n // _STAMP_CHUNK)
        pad = chunks * _STAMP_CHUNK - n
        xs = jnp.concatenate([x01, jnp.zeros((pad, h, w, c), x01.dtype)])
        out = jax.lax.map(lambda v: _stamp_float(tree, v),
                          xs.reshape(chunks, _STAMP_CHUNK, h, w, c))
        out = out.reshape(-1, h, w, c)[:n]
    return jnp.clip(jnp.round(out * 255.0), 0, 255).astype(jnp.uint8)


def _hooks_tx(ctx, scale):
    s = _settings(ctx.params)
    return generator_tx(s["lr_g"], scale if s["lr_g_schedule"] == "classifier" else 1.0)


control.register("iab", control.Hooks(poison=poison_batch, init=init_attack, tx=_hooks_tx,
                                      arrays=arrays, partners=True))

__all__ = ["InputAwareNet", "TorchBatchNorm", "arrays", "counts", "data_stats",
           "diversity", "generator_tx", "init_attack", "init_nets", "mask_tx",
           "poison_batch", "poison_parts", "squash", "stamp", "threshold", "train_mask",
           "upsample2"]
