"""SSBA: sample-specific invisible triggers from a StegaStamp encoder that bdjax trains.

The attack hides one fixed bit string (the *secret*) in every poisoned image with a
StegaStamp-style encoder/decoder pair: the encoder maps (secret, image) to an encoded
image that looks like the input, the decoder reads the secret back. Trained on the
clean training images with random secrets, the encoder's change to each image depends on
that image, so every poisoned image carries its own invisible trigger.

BackdoorBench does not train the encoder: ``attack/ssba.py`` reads pre-encoded arrays
made with its ``resource/ssba`` scripts (``train.py``, ``models.py``,
``embed_fingerprints.py``, a PyTorch port of StegaStamp), which are often missing. This
module is those scripts as pure JAX: :class:`Encoder`, :class:`Decoder`,
:func:`train_encoder` (one compiled call per epoch), :func:`encode` (the poisoned uint8
images) and :func:`decode_bits`. Parameters are a plain pytree; caching them is left to
the caller.

Settings of the reference's documented run (``resource/ssba/readme.md``): 100-bit
secret, 20 epochs, batch 64, Adam 1e-4, ``use_residual 0`` (the encoder's sigmoid output
IS the encoded image), images in [0, 1], loss ``BCE(bits) + w MSE(image)`` where ``w``
stays 0 until one batch's bit accuracy exceeds 0.9, waits 1000 more steps and then
rises linearly to 10 over 3000 steps; encoded images are saved with torchvision's
``save_image`` (``x * 255 + 0.5`` clamped to [0, 255] and truncated: round half up).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax.errors import BdjaxError
from bdjax.kernels.steps import batch_indices, steps_per_epoch
from bdjax.models.inits import torch_bias, torch_default
from bdjax.models.layers import Conv

_PAD1 = ((1, 1), (1, 1))  # PyTorch's padding=1 (flax "SAME" pads stride-2 convs 0/1)


def _conv(x, features: int, kernel: int, stride: int, padding, name: str):
    """A PyTorch-initialised conv (``nn.Conv2d`` defaults) built inside a compact call."""
    fan_in = kernel * kernel * x.shape[-1]
    return Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                kernel_init=torch_default, bias_init=torch_bias(fan_in), name=name)(x)


def _dense(x, features: int, name: str):
    """A PyTorch-initialised dense layer (``nn.Linear`` defaults)."""
    return nn.Dense(features, kernel_init=torch_default, bias_init=torch_bias(x.shape[-1]),
                    name=name)(x)


def _up(x, features: int, name: str):
    """StegaStamp's up-step: nearest x2, zero-pad right/bottom by 1, 2x2 conv, ReLU."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.relu(_conv(x, features, 2, 1, ((0, 1), (0, 1)), name))


class Encoder(nn.Module):
    """StegaStamp encoder: (secret [N, bits] in {0,1}, image [N, H, W, C] in [0,1]) ->
    encoded image [N, H, W, C] in (0, 1).

    The secret goes through a dense layer to 16x16xC (ReLU), is upsampled (nearest) to
    the image size and concatenated with the image; a U-Net with channels
    ``width * (1, 1, 2, 4, 8)`` (32-32-64-128-256) goes down with stride-2 convs and
    back up with skips; the last skip also carries the input; a 1x1 conv to C channels
    and a sigmoid give the encoded image. H and W must be multiples of 16.
    """

    bits: int = 100
    width: int = 32

    @nn.compact
    def __call__(self, secret, image):
        n, h, w, c = image.shape
        s = nn.relu(_dense(secret, 16 * 16 * c, "secret_dense")).reshape(n, 16, 16, c)
        s = jnp.repeat(jnp.repeat(s, h // 16, axis=1), w // 16, axis=2)
        inputs = jnp.concatenate([s, image], -1)
        wd = self.width
        c1 = nn.relu(_conv(inputs, wd, 3, 1, _PAD1, "conv1"))
        c2 = nn.relu(_conv(c1, wd, 3, 2, _PAD1, "conv2"))
        c3 = nn.relu(_conv(c2, 2 * wd, 3, 2, _PAD1, "conv3"))
        c4 = nn.relu(_conv(c3, 4 * wd, 3, 2, _PAD1, "conv4"))
        c5 = nn.relu(_conv(c4, 8 * wd, 3, 2, _PAD1, "conv5"))
        u = _up(c5, 4 * wd, "up6")
        u = nn.relu(_conv(jnp.concatenate([c4, u], -1), 4 * wd, 3, 1, _PAD1, "conv6"))
        u = _up(u, 2 * wd, "up7")
        u = nn.relu(_conv(jnp.concatenate([c3, u], -1), 2 * wd, 3, 1, _PAD1, "conv7"))
        u = _up(u, wd, "up8")
        u = nn.relu(_conv(jnp.concatenate([c2, u], -1), wd, 3, 1, _PAD1, "conv8"))
        u = _up(u, wd, "up9")
        u = nn.relu(_conv(jnp.concatenate([c1, u, inputs], -1), wd, 3, 1, _PAD1, "conv9"))
        u = nn.relu(_conv(u, wd, 3, 1, _PAD1, "conv10"))
        return nn.sigmoid(_conv(u, c, 1, 1, "VALID", "residual"))


class Decoder(nn.Module):
    """StegaStamp decoder: image [N, H, W, C] in [0,1] -> secret logits [N, bits].

    Seven 3x3 convs (ReLU) with channels ``width * (1, 1, 2, 2, 2, 4, 4)`` and strides
    (2, 1, 2, 1, 2, 2, 2), flattened, then dense ``16 * width`` (512) with ReLU and dense
    ``bits``.
    """

    bits: int = 100
    width: int = 32

    @nn.compact
    def __call__(self, image):
        x = image
        plan = ((1, 2), (1, 1), (2, 2), (2, 1), (2, 2), (4, 2), (4, 2))
        for i, (mult, stride) in enumerate(plan, start=1):
            x = nn.relu(_conv(x, mult * self.width, 3, stride, _PAD1, f"conv{i}"))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(_dense(x, 16 * self.width, "dense1"))
        return _dense(x, self.bits, "dense2")


@dataclasses.dataclass(frozen=True)
class SSBAConfig:
    """Training settings of the encoder/decoder (defaults: the reference's run).

    Attributes:
      epochs, batch_size, lr: the Adam run (20, 64, 1e-4).
      bits: secret length (100).
      width: the U-Net's first channel count (32: channels 32-32-64-128-256).
      image_weight: the final weight ``w`` of the image MSE (10).
      bce_weight: the weight of the bit BCE (1).
      ramp_threshold: ``w`` starts its schedule once one batch's bit accuracy exceeds this
        (0.9).
      image_await: steps after that before ``w`` leaves 0 (1000).
      image_ramp: steps over which ``w`` then rises linearly to ``image_weight`` (3000).
    """

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-4
    bits: int = 100
    width: int = 32
    image_weight: float = 10.0
    bce_weight: float = 1.0
    ramp_threshold: float = 0.9
    image_await: int = 1000
    image_ramp: int = 3000

    def __post_init__(self):
        for name in ("epochs", "batch_size", "bits", "width", "image_ramp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise BdjaxError(f"{name} {v!r} is invalid; accepted: an integer >= 1.")
        v = self.image_await
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise BdjaxError(f"image_await {v!r} is invalid; accepted: an integer >= 0.")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise BdjaxError(f"lr {self.lr!r} is invalid; accepted: a finite number > 0.")
        for name in ("image_weight", "bce_weight"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise BdjaxError(f"{name} {v!r} is invalid; accepted: a finite number >= 0.")
        if not 0 <= self.ramp_threshold < 1:
            raise BdjaxError(f"ramp_threshold {self.ramp_threshold!r} is invalid; "
                             "accepted: [0, 1).")

    @property
    def modules(self) -> tuple[Encoder, Decoder]:
        return Encoder(self.bits, self.width), Decoder(self.bits, self.width)


def make_secret(key: jax.Array, bits: int = 100) -> jax.Array:
    """A random secret: ``bits`` independent fair bits.

    Args:
      key: a ``jax.random`` key (same key, same secret).
      bits: the secret's length.

    Returns:
      float32 [bits] of zeros and ones.
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits < 1:
        raise BdjaxError(f"bits {bits!r} is invalid; accepted: an integer >= 1.")
    return jax.random.bernoulli(key, 0.5, (int(bits),)).astype(jnp.float32)


def _check_images(images, what: str = "images"):
    """Static checks (fine under jit): uint8 [N, H, W, C] with H, W multiples of 16."""
    if images.ndim != 4 or images.dtype != jnp.uint8:
        raise BdjaxError(f"{what} of shape {tuple(images.shape)} and dtype {images.dtype} "
                         "are invalid; accepted: uint8 [N, H, W, C].")
    h, w = images.shape[1:3]
    if h % 16 or w % 16 or h < 16 or w < 16:
        raise BdjaxError(f"{what} of size {h}x{w} are invalid; accepted: height and width "
                         "multiples of 16 (e.g. 32x32, 64x64).")


def _modules(params) -> tuple[Encoder, Decoder]:
    """The (Encoder, Decoder) whose parameters ``params`` are (bits and width read back)."""
    try:
        bits = params["decoder"]["params"]["dense2"]["kernel"].shape[-1]
        width = params["encoder"]["params"]["conv1"]["kernel"].shape[-1]
    except (KeyError, TypeError, AttributeError) as e:
        raise BdjaxError("params are not SSBA encoder/decoder parameters; accepted: the "
                         "params returned by bdjax.attacks.ssba.train_encoder.") from e
    return Encoder(bits, width), Decoder(bits, width)


def _to_unit(images):
    return images.astype(jnp.float32) / 255.0


def _to_uint8(x):
    """[0, 1] floats -> uint8 as torchvision's ``save_image``: +0.5, clamp, truncate."""
    return jnp.clip(jnp.floor(x * 255.0 + 0.5), 0, 255).astype(jnp.uint8)


def init_params(key: jax.Array, image_shape: tuple[int, int, int],
                config: SSBAConfig = SSBAConfig()):
    """Fresh encoder/decoder parameters for images of ``image_shape`` (H, W, C).

    PyTorch's defaults, as the reference: every weight and bias of a layer with
    ``fan_in`` inputs is U(-1/sqrt(fan_in), 1/sqrt(fan_in)). All of them come from ONE
    uniform draw, scaled per layer: the modules' own ``init`` (one draw per array) gives
    the same distribution but compiles one random generator per array, which took 35 s
    on a busy 2-core machine against ~1 s for this.

    Args:
      key: the init key (same key, same parameters).
      image_shape: (H, W, C), H and W multiples of 16.
      config: bits and width.

    Returns:
      ``{"encoder": variables, "decoder": variables}``.
    """
    image_shape = tuple(int(d) for d in image_shape)
    _check_images(jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8))
    return _init(config.bits, config.width, image_shape, key)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init(bits: int, width: int, image_shape: tuple, key):
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    s = jax.ShapeDtypeStruct((1, bits), jnp.float32)
    shapes = {"encoder": jax.eval_shape(Encoder(bits, width).init, key, s, x),
              "decoder": jax.eval_shape(Decoder(bits, width).init, key, x)}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [leaf.size for _, leaf in leaves]
    u = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    out, start = [], 0
    for (path, leaf), size in zip(leaves, sizes):
        layer = shapes
        for p in path[:-1]:
            layer = layer[p.key]
        fan_in = int(np.prod(layer["kernel"].shape[:-1]))
        out.append(u[start:start + size].reshape(leaf.shape) / np.sqrt(fan_in))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def _hyper(config: SSBAConfig) -> dict:
    """The settings that enter the compiled epoch as values (no recompile when changed)."""
    return {k: jnp.float32(getattr(config, k)) for k in
            ("lr", "image_weight", "bce_weight", "ramp_threshold", "image_await",
             "image_ramp")}


def _weight(hyper: dict, since):
    """The image-loss weight ``since`` steps after activation (-1: not yet):
    ``min(max(0, W (since - await) / ramp), W)`` as the reference."""
    ramp = (since.astype(jnp.float32) - hyper["image_await"]) / hyper["image_ramp"]
    return jnp.clip(hyper["image_weight"] * ramp, 0.0, hyper["image_weight"])


def _losses(params, enc: Encoder, dec: Decoder, images, secrets, w, bce_weight):
    encoded = enc.apply(params["encoder"], secrets, images)
    logits = dec.apply(params["decoder"], encoded)
    mse = jnp.mean((encoded - images) ** 2)
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, secrets))
    loss = w * mse + bce_weight * bce
    acc = jnp.mean((logits > 0).astype(jnp.float32) == secrets)
    return loss, (mse, bce, acc)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4, 5))
def _epoch(bits: int, width: int, batch_size: int, hyper, params, opt_state, since, x, key):
    """One shuffled epoch as one ``lax.scan``; ``since`` is the activation counter."""
    enc, dec = Encoder(bits, width), Decoder(bits, width)
    tx = optax.adam(hyper["lr"])
    k_perm, k_bits = jax.random.split(key)
    idx = batch_indices(k_perm, x.shape[0], batch_size)
    grad = jax.value_and_grad(_losses, has_aux=True)

    def step(carry, inp):
        params, opt_state, since = carry
        i, b = inp
        images = _to_unit(x[b])
        secrets = jax.random.bernoulli(jax.random.fold_in(k_bits, i), 0.5,
                                       (b.shape[0], bits)).astype(jnp.float32)
        w = _weight(hyper, since)
        (loss, (mse, bce, acc)), g = grad(params, enc, dec, images, secrets, w,
                                          hyper["bce_weight"])
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        # As the reference: the counter starts at the step after the first batch whose
        # bit accuracy (before this update) exceeds the threshold.
        since = jnp.where(since < 0, jnp.where(acc > hyper["ramp_threshold"], 0, -1),
                          since + 1)
        return (params, opt_state, since), (loss, mse, bce, acc, w)

    steps = jnp.arange(idx.shape[0])
    (params, opt_state, since), out = jax.lax.scan(step, (params, opt_state, since),
                                                   (steps, idx))
    return params, opt_state, since, jax.tree.map(jnp.mean, out)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="ssba encoder", unit="epoch", file=sys.stderr,
                leave=True, dynamic_ncols=True)


def train_encoder(x_uint8, key: jax.Array, config: SSBAConfig = SSBAConfig(), *,
                  progress: bool = False):
    """Trains the StegaStamp encoder and decoder on clean images (random secrets).

    Every step draws a fresh random secret per image, encodes, decodes and takes one
    Adam step on ``BCE(bits) + w MSE(encoded, image)``; ``w`` follows the reference's
    schedule (:class:`SSBAConfig`) as carried state. Each epoch is one compiled call.

    References: Li et al., "Invisible Backdoor Attack with Sample-Specific Triggers",
    ICCV 2021; Tancik et al., "StegaStamp: Invisible Hyperlinks in Physical
    Photographs", CVPR 2020 (the encoder/decoder and their loss).

    Differences from the reference (BackdoorBench ``resource/ssba/train.py``):
      - Batches: every epoch has ``ceil(N / batch)`` full batches, the last filled with
        the first images of the same permutation (bdjax's batching: static shapes), where
        the reference's last batch is smaller.
      - Randomness (init, shuffles, secrets) comes from ``key``: bitwise repeatable on
        CPU; the reference seeds torch/numpy globally.
      - Initial values: the same distribution as PyTorch's defaults, drawn in one
        uniform draw (:func:`init_params`; compile time). The secret's 16x16xC map and
        the decoder's flattened features are laid out HWC instead of CHW, a fixed
        permutation of weights that are learned anyway.
      - Sizes: the decoder's dense input is read from the feature map, so any H, W that
        are multiples of 16 work (the reference's ``resolution^2 * 128 / 1024`` needs
        square multiples of 32; e.g. 16x16 crashes there).
      - The poisoned images' secret is any bit vector (:func:`make_secret` draws one
        from a key); the reference BCH-encodes a string of up to 7 characters (96 bits
        plus 4 zeros), which matters only for reading the string back, not for the
        attack.
      - The reference's options that its documented run switches off (residual output,
        modulated convs, fc layers, fixed-string training fingerprints, the unused
        bit-flip loss) are not offered.

    Args:
      x_uint8: clean training images, uint8 [N, H, W, C]; H, W multiples of 16.
      key: root key: init ``fold_in(key, 0)``, epoch e ``fold_in(key, e + 1)``.
      config: settings (:class:`SSBAConfig`).
      progress: show a progress bar.

    Returns:
      (params, history): params ``{"encoder": ..., "decoder": ...}``; history a list of
      per-epoch dicts with the means over the epoch's steps of ``loss``, ``bce``,
      ``bit_acc``, ``mse`` and ``image_weight``, ``psnr`` (dB, of the mean MSE),
      ``activated`` (the weight schedule has started) and ``seconds``.
    """
    x = np.asarray(x_uint8) if not isinstance(x_uint8, jax.Array) else x_uint8
    _check_images(x, "training images")
    if x.shape[0] < 1:
        raise BdjaxError("training images are empty; accepted: at least one image.")
    if not isinstance(config, SSBAConfig):
        raise BdjaxError(f"config {config!r} is invalid; accepted: an SSBAConfig.")
    params = init_params(jax.random.fold_in(key, 0), tuple(x.shape[1:]), config)
    opt_state = optax.adam(config.lr).init(params)
    since = jnp.int32(-1)
    hyper = _hyper(config)
    x_dev = jnp.asarray(x)
    bar = _progress(config.epochs, progress)
    history = []
    try:
        for epoch in range(config.epochs):
            t0 = time.perf_counter()
            params, opt_state, since, (loss, mse, bce, acc, w) = _epoch(
                config.bits, config.width, config.batch_size, hyper, params, opt_state,
                since, x_dev, jax.random.fold_in(key, epoch + 1))
            row = {"epoch": epoch + 1, "loss": float(loss), "bce": float(bce),
                   "bit_acc": float(acc), "mse": float(mse),
                   "psnr": float(10 * np.log10(1.0 / max(float(mse), 1e-12))),
                   "image_weight": float(w), "activated": bool(since >= 0),
                   "steps": steps_per_epoch(x.shape[0], config.batch_size)}
            row["seconds"] = time.perf_counter() - t0
            if not np.isfinite(row["loss"]):
                raise BdjaxError(f"SSBA encoder training diverged at epoch {epoch + 1} "
                                 f"(loss {row['loss']}); accepted: a smaller lr.")
            history.append(row)
            if bar is not None:
                bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "bit_acc", "psnr")})
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return params, history


@jax.jit
def encode(params, images_uint8, secret):
    """The poisoned images: ``secret`` hidden in each image by the trained encoder.

    Pure and jittable (vmappable over a leading trial axis of any argument).

    Args:
      params: ``train_encoder``'s params.
      images_uint8: uint8 [N, H, W, C].
      secret: float {0, 1} [bits] (one secret for all images) or [N, bits].

    Returns:
      uint8 [N, H, W, C]: the encoder's output image, scaled to [0, 255] with round half
      up and clamped, as the reference's saved PNGs.
    """
    images = jnp.asarray(images_uint8)
    _check_images(images)
    enc, _ = _modules(params)
    secret = jnp.asarray(secret, jnp.float32)
    if secret.shape[-1] != enc.bits:
        raise BdjaxError(f"secret of shape {tuple(secret.shape)} is invalid; accepted: "
                         f"[{enc.bits}] or [N, {enc.bits}] (the encoder's bits).")
    secrets = jnp.broadcast_to(secret, (images.shape[0], enc.bits))
    return _to_uint8(enc.apply(params["encoder"], secrets, _to_unit(images)))


@jax.jit
def decode_bits(params, images_uint8):
    """The decoder's probability that each secret bit is 1.

    Args:
      params: ``train_encoder``'s params.
      images_uint8: uint8 [N, H, W, C] (encoded or clean).

    Returns:
      float32 [N, bits] in (0, 1); threshold at 0.5 for the bits.
    """
    images = jnp.asarray(images_uint8)
    _check_images(images)
    _, dec = _modules(params)
    return jax.nn.sigmoid(dec.apply(params["decoder"], _to_unit(images)))


def stamp_fn(params, secret):
    """A trigger ``stamp(images_uint8, key=None) -> images_uint8`` for the fixed secret.

    Args:
      params: ``train_encoder``'s params.
      secret: float {0, 1} [bits], the one secret of every poisoned image.

    Returns:
      the trigger function (the key is unused: the encoder is deterministic).
    """

    def stamp(images, key=None):
        return encode(params, images, secret)

    return stamp


__all__ = ["Encoder", "Decoder", "SSBAConfig", "make_secret", "init_params",
           "train_encoder", "encode", "decode_bits", "stamp_fn"]
