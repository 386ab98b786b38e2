"""Test-time triggers made from generated resources (trigger contract, uint8 in and out).

Each reads its resource file (:mod:`bdjax.attacks.resources`, cached per checksum) and
applies the attack's own arithmetic from the module that generates it (the other
parameters, ``**_settings``, are how the resource was generated): LF's additive
low-frequency pattern, Trojan's masked trigger, SSBA's encoder, Input-aware's generator
and mask. LC's test trigger is the corner checkerboard alone (its resource, the
adversarial training images, only matters for poisoning).
"""

from __future__ import annotations

import jax.numpy as jnp

from bdjax.attacks import resources
from bdjax.errors import BdjaxError


def _arrays(path, sha, attack: str, param: str):
    if path is None:
        raise BdjaxError(f"attack {attack!r} has no {param} file yet; accepted: a checkpoint "
                         f"made by `bdjax attack --attack {attack}` (it generates the file).")
    return resources.load_arrays(path, sha)


def lf(images, key=None, *, pattern=None, pattern_sha256=None, **_settings):
    """LF: the universal low-frequency pattern added and clipped."""
    arrays = _arrays(pattern, pattern_sha256, "lf", "pattern")
    from bdjax.attacks.lf import apply_lf

    return apply_lf(images, jnp.asarray(arrays["pattern"]))


def trojan(images, key=None, *, trigger=None, trigger_sha256=None, **_settings):
    """Trojan: the optimised trigger (zero outside its mask) added and clipped."""
    arrays = _arrays(trigger, trigger_sha256, "trojan", "trigger")
    from bdjax.attacks.trojan import apply_trojan

    return apply_trojan(images, jnp.asarray(arrays["trigger"]))


def lc(images, key=None, *, amplitude: float = 1.0, **_settings):
    """LC at test time: the four-corner checkerboards alone."""
    from bdjax.attacks.lc import lc_corners

    return lc_corners(images, key, amplitude=amplitude)


def ssba(images, key=None, *, encoder=None, encoder_sha256=None, **_settings):
    """SSBA: each image re-encoded with the fixed secret by the trained encoder."""
    arrays = _arrays(encoder, encoder_sha256, "ssba", "encoder")
    from bdjax.attacks import ssba as ssba_mod

    # the nets' parameters are the "encoder/..." and "decoder/..." entries (the file also
    # holds the secret and the training's final bit accuracy and PSNR)
    flat = {k: jnp.asarray(v) for k, v in arrays.items() if "/" in k}
    return ssba_mod.encode(resources.nest(flat), images, jnp.asarray(arrays["secret"]))


def iab(images, key=None, *, generator=None, generator_sha256=None, **_settings):
    """Input-aware: x + (G(x) - x) * M(x) with the generator and mask trained with the
    classifier."""
    arrays = _arrays(generator, generator_sha256, "iab", "generator")
    from bdjax.attacks import iab as iab_mod

    return iab_mod.stamp(resources.nest({k: jnp.asarray(v) for k, v in arrays.items()}),
                         images)


__all__ = ["iab", "lc", "lf", "ssba", "trojan"]
