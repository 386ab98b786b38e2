"""TrojanNN's trigger: a masked patch optimised to excite chosen penultimate neurons.

A clean model's final linear layer is read to pick the ``k`` inputs ("neurons") with
the largest summed absolute outgoing weight; a trigger that starts as a fixed mask
picture is then optimised, pixel by pixel inside the mask, so that those features reach
a large target value (100). Poisoned images are the clean images plus the trigger,
clipped to [0, 255]. The trigger is a resource computed once per clean model; the caller
caches it and does the poisoning (``round(ratio * N)`` images relabelled to the target).

The pieces:

- :func:`trojan_mask`: the mask picture (the trigger's start and, where it is > 0, the
  pixels the optimisation may change);
- :func:`penultimate_features`: the INPUT of the last linear layer
  (``model.spec.head[-1]``), captured with a flax method interceptor;
- :func:`top_neurons`: the most-connected inputs of that layer;
- :func:`optimise_trigger`: the compiled signed-gradient loop;
- :func:`trojan_trigger`: all of the above, returning the trigger in pixel units;
- :func:`apply_trojan`: the poisoning arithmetic.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bdjax.errors import BdjaxError
from bdjax.kernels.bn import module_name
from bdjax.models import Model, State

# The reference's mask is a 224 x 224 black picture with a white apple silhouette
# (BackdoorBench ``resource/trojannn/apple4.png``) resized to the input size with PIL's
# bilinear filter. bdjax draws its own apple on the same canvas, at the same place and
# size (rows 120-203, columns 128-194), from ellipses in canvas pixels:
# (centre row, centre column, half height, half width, angle in degrees).
_CANVAS = 224
_BODY = ((173.0, 161.0, 31.0, 33.0, 0.0),  # the body
         (158.0, 147.0, 17.0, 18.0, 0.0),  # left shoulder
         (158.0, 177.0, 17.0, 18.0, 0.0))  # right shoulder
_CUTS = ((141.0, 163.0, 4.0, 6.0, 0.0),    # dimple at the stalk
         (205.0, 163.0, 6.0, 5.0, 0.0),    # dimple at the bottom
         (165.0, 198.0, 14.0, 13.0, 0.0))  # the bite
_LEAF = (128.5, 170.0, 11.0, 4.5, -40.0)


def _ellipse(rows, cols, shape) -> np.ndarray:
    cr, cc, ar, ac, deg = shape
    t = np.deg2rad(deg)
    dr, dc = rows - cr, cols - cc
    u = dr * np.cos(t) + dc * np.sin(t)
    v = -dr * np.sin(t) + dc * np.cos(t)
    return (u / ar) ** 2 + (v / ac) ** 2 <= 1.0


def apple_canvas() -> np.ndarray:
    """The binary apple silhouette on the reference's 224 x 224 canvas (bool [224, 224]).

    Returns:
      True inside the apple (body, shoulders and leaf, minus the two dimples and the
      bite), sampled at pixel centres.
    """
    rows, cols = np.mgrid[:_CANVAS, :_CANVAS] + 0.5
    body = np.zeros((_CANVAS, _CANVAS), bool)
    for e in _BODY:
        body |= _ellipse(rows, cols, e)
    for e in _CUTS:
        body &= ~_ellipse(rows, cols, e)
    return body | _ellipse(rows, cols, _LEAF)


@functools.lru_cache(maxsize=8)
def _mask_cached(h: int, w: int, c: int) -> np.ndarray:
    from PIL import Image

    picture = Image.fromarray(np.where(apple_canvas(), 255, 0).astype(np.uint8))
    small = np.asarray(picture.resize((w, h), Image.BILINEAR), np.float32) / 255.0
    out = np.repeat(small[..., None], c, axis=-1)
    out.setflags(write=False)
    return out


def trojan_mask(h: int, w: int, c: int = 3) -> np.ndarray:
    """The Trojan mask picture at the input size, as the reference builds it.

    The 224 x 224 apple (:func:`apple_canvas`, 0 or 255) is resized to ``w`` x ``h``
    with PIL's bilinear filter (which averages over the source pixels a target pixel
    covers, so the edge is soft) and divided by 255, the same in every channel.

    Args:
      h, w, c: the image's height, width and channels.

    Returns:
      float32 ``[h, w, c]`` in [0, 1] (read-only): the trigger's starting image; the
      optimisation may change exactly the pixels where it is > 0.
    """
    for name, v in (("height", h), ("width", w), ("channels", c)):
        if int(v) != v or v < 1:
            raise BdjaxError(f"mask {name} {v!r} is invalid; accepted: an integer >= 1.")
    return _mask_cached(int(h), int(w), int(c))


def penultimate_features(model: Model, state: State, x01):
    """The input of the model's last linear layer (``model.spec.head[-1]``), eval mode.

    Args:
      model: the classifier.
      state: its state.
      x01: images ``[N, H, W, C]`` in [0, 1] (float) or uint8.

    Returns:
      float32 ``[N, D]``: for PreAct-ResNet18 and the small CNN the pooled last-stage
      features, for VGG19-BN the output of the second classifier layer after its ReLU
      (dropout is off in eval mode).
    """
    name = model.spec.head[-1]
    sink = []

    def spy(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and module_name(context.module) == name:
            sink.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        model.apply(state, x01)
    if not sink:
        raise BdjaxError(f"layer {name!r} did not run in model {model.name!r}; accepted: a "
                         "model whose spec.head names its last linear layer.")
    return sink[-1].reshape(sink[-1].shape[0], -1).astype(jnp.float32)


def _head_kernel(params, model: Model):
    node = params
    for part in model.spec.head[-1].split("/"):
        node = node[part]
    return node["kernel"]


def top_neurons(params, model: Model, k: int = 2) -> np.ndarray:
    """The ``k`` most-connected inputs of the last linear layer.

    A neuron's connection is the sum over the layer's outputs of the absolute weights
    from it (flax kernels are ``[in, out]``); ties go to the lower index.

    Args:
      params: the model's parameters (``state["params"]``).
      model: the classifier (its ``spec.head[-1]`` names the layer).
      k: how many neurons.

    Returns:
      int32 ``[k]``: input indices, most connected first.
    """
    kernel = np.asarray(_head_kernel(params, model), np.float64)
    d = kernel.shape[0]
    if int(k) != k or not 1 <= k <= d:
        raise BdjaxError(f"neurons {k!r} is invalid; accepted: an integer in 1..{d}.")
    strength = np.abs(kernel).sum(axis=1)
    return np.argsort(-strength, kind="stable")[:int(k)].astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _optimise(model: Model, state: State, mask, neurons, target_value, step, eps, iters,
              tolerance):
    x0 = mask[None].astype(jnp.float32)
    keep = (x0 > 0).astype(jnp.float32)

    def cost(x):
        f = penultimate_features(model, state, x * keep)
        return jnp.sum(jnp.square(f[:, neurons] - target_value))

    grad = jax.value_and_grad(cost)

    def body(c):
        loss, g = grad(c["x"])
        x = c["x"] - step * jnp.sign(g)
        x = jnp.clip(x0 + jnp.clip(x - x0, -eps, eps), 0.0, 1.0)
        # As the reference: the step is taken, then the loop ends if the cost before it
        # was already under the tolerance.
        return dict(i=c["i"] + 1, x=x, done=loss < tolerance)

    c = jax.lax.while_loop(lambda c: (c["i"] < iters) & ~c["done"], body,
                           dict(i=jnp.int32(0), x=x0, done=jnp.bool_(False)))
    x = c["x"][0] * keep[0]
    return x, dict(iterations=c["i"], loss=cost(x[None]),
                   features=penultimate_features(model, state, x[None])[0, neurons])


def optimise_trigger(model: Model, state: State, mask, neurons, *,
                     target_value: float = 100.0, step: float = 0.1, eps: float = 0.3,
                     iters: int = 1000, tolerance: float = 1e-3):
    """The Trojan trigger in [0, 1], optimised in one compiled ``lax.while_loop``.

    Each iteration: ``cost = sum_k (f_k(x * keep) - target_value)^2`` over the chosen
    features ``f`` (:func:`penultimate_features`, model in eval mode), ``keep = mask >
    0``; ``x <- x - step * sign(grad cost)``; the change from the mask is clipped to
    ``[-eps, eps]`` and ``x`` to [0, 1]. It stops after ``iters`` iterations or after the
    one whose starting cost was below ``tolerance``.

    Args:
      model, state: the clean classifier.
      mask: the starting picture ``[H, W, C]`` in [0, 1] (:func:`trojan_mask`).
      neurons: int indices of the features to excite (:func:`top_neurons`).
      target_value, step, eps, iters, tolerance: as above.

    Returns:
      ``(x, info)``: ``x`` float32 ``[H, W, C]`` in [0, 1], zero outside the mask;
      ``info`` = ``iterations`` taken, final ``loss`` and the chosen ``features`` at ``x``.
    """
    if int(iters) != iters or iters < 0:
        raise BdjaxError(f"iters {iters!r} is invalid; accepted: an integer >= 0.")
    for name, v in (("step", step), ("eps", eps)):
        if not v >= 0:
            raise BdjaxError(f"{name} {v!r} is invalid; accepted: a number >= 0.")
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return _optimise(model, state, jnp.asarray(mask, jnp.float32),
                     jnp.asarray(neurons, jnp.int32), f32(target_value), f32(step), f32(eps),
                     jnp.int32(iters), f32(tolerance))


def trojan_trigger(model: Model, state: State, key: jax.Array | None = None, *,
                   neurons: int = 2, target_value: float = 100.0, step: float = 0.1,
                   eps: float = 0.3, iters: int = 1000) -> np.ndarray:
    """TrojanNN's trigger for a clean model, in pixel units, ready to add to uint8 images.

    Picks the ``neurons`` most-connected inputs of the last linear layer
    (:func:`top_neurons`), optimises the mask picture (:func:`trojan_mask`) so that they
    reach ``target_value`` (:func:`optimise_trigger`: signed steps of ``step``, at most
    ``eps`` from the mask, ``iters`` iterations, [0, 1]) and scales the result to
    [0, 255] with rounding.

    Args:
      model, state: the clean classifier.
      key: unused: the optimisation starts from the fixed mask and has no randomness
        (kept so every resource generator takes a key).
      neurons, target_value, step, eps, iters: as above (the reference's defaults).

    Returns:
      uint8 ``[H, W, C]``: the trigger, zero outside the mask.

    References: Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018, Sec. 4
      (trigger generation); BackdoorBench ``attack/trojannn.py``.

    Differences from the reference:
      - The reference builds the pre-trained network with 1000 outputs and loads the
        clean model "partially": the clean 10-output linear layer does not fit and is
        skipped, so its neurons are chosen from a RANDOMLY initialised last layer (the
        features before it are the clean model's). bdjax ranks the clean model's own
        last layer, as the method describes.
      - The reference feeds the [0, 1] mask picture to a model trained on NORMALISED
        images; bdjax's models normalise inside, so the trigger is optimised in the
        input space the model was trained on.
      - The mask picture is bdjax's own apple drawn at the reference's place and size
        (intersection over union 0.92 with ``apple4.png`` on the 224 canvas), not the
        reference's file.
      - The trigger is rounded to the nearest grey level; the reference truncates
        (``ToPILImage``).
    """
    del key
    h, w, c = model.image_shape
    idx = top_neurons(state["params"], model, neurons)
    x, _ = optimise_trigger(model, state, trojan_mask(h, w, c), idx,
                            target_value=target_value, step=step, eps=eps, iters=iters)
    return np.asarray(jnp.clip(jnp.round(x * 255.0), 0, 255).astype(jnp.uint8))


def apply_trojan(images, trigger):
    """Poisoned copies: ``clip(images + trigger, 0, 255)`` (jittable).

    Args:
      images: uint8 ``[N, H, W, C]``.
      trigger: uint8 (or integer) ``[H, W, C]`` from :func:`trojan_trigger`.

    Returns:
      uint8 ``[N, H, W, C]``. The reference casts the sum to uint8 BEFORE clipping, so
      sums above 255 wrap around (255 + 1 -> 0); bdjax clips them to 255.
    """
    if images.dtype != jnp.uint8:
        raise BdjaxError(f"images of dtype {images.dtype} cannot be poisoned; accepted: "
                         "uint8 [N, H, W, C].")
    if tuple(images.shape[-3:]) != tuple(trigger.shape):
        raise BdjaxError(f"trigger of shape {tuple(trigger.shape)} does not fit images of "
                         f"shape {tuple(images.shape)}; accepted: a trigger [H, W, C] of "
                         "the images' size.")
    total = jnp.asarray(images, jnp.int32) + jnp.asarray(trigger, jnp.int32)
    return jnp.clip(total, 0, 255).astype(jnp.uint8)


__all__ = ["apple_canvas", "apply_trojan", "optimise_trigger", "penultimate_features",
           "top_neurons", "trojan_mask", "trojan_trigger"]
