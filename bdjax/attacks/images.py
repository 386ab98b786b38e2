"""Trigger images read from files (Blended's ``--param image=PATH``).

The reference reads its trigger picture with ``imageio`` and resizes it to the input
size with torchvision's ``Resize`` on a PIL image, i.e. PIL's bilinear filter (which
averages over the source pixels a target pixel covers when it shrinks an image). bdjax
does the same through Pillow, so the same file gives the same trigger array. The
file's SHA-256 goes into the attack's parameters and so into checkpoint metadata; a
checkpoint whose image has changed since refuses to load.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np

from bdjax.attacks.resources import file_sha256
from bdjax.errors import BdjaxError

_ACCEPTED = "a readable image file (PNG, JPEG, ...)"


def resolve_trigger_image(path, sha256: str | None = None) -> tuple[str, str]:
    """(absolute path, SHA-256) of a trigger image file, checked readable.

    Raises:
      BdjaxError: the file is missing or not an image, or its checksum is not ``sha256``
        (the file changed since the attack it belongs to was made).
    """
    p = pathlib.Path(str(path)).expanduser()
    if not p.is_file():
        raise BdjaxError(f"trigger image {str(path)!r} does not exist; accepted: {_ACCEPTED}.")
    p = p.resolve()
    digest = file_sha256(str(p))
    if sha256 is not None and digest != sha256:
        raise BdjaxError(f"trigger image {str(p)!r} has SHA-256 {digest[:12]}... but the attack "
                         f"was made with {str(sha256)[:12]}...; accepted: the same file the "
                         "checkpoint was trained with.")
    _read(str(p), digest)  # fails here, in one sentence, if it is not an image
    return str(p), digest


@functools.lru_cache(maxsize=8)
def _read(path: str, digest: str) -> np.ndarray:
    """The decoded image, RGB uint8 [H, W, 3] (cached per file content)."""
    try:
        from PIL import Image
    except ImportError as e:  # Pillow is a dependency; a broken install says so plainly
        raise BdjaxError("reading a trigger image needs Pillow; accepted: `pip install "
                         "pillow` (a bdjax dependency).") from e
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), np.uint8)
    except Exception as e:  # PIL raises many types for bad files; one sentence for all
        raise BdjaxError(f"trigger image {path!r} could not be read ({type(e).__name__}); "
                         f"accepted: {_ACCEPTED}.") from e


@functools.lru_cache(maxsize=16)
def _resized(path: str, digest: str, h: int, w: int, c: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(_read(path, digest))
    if c == 1:
        img = img.convert("L")
    out = np.asarray(img.resize((w, h), Image.BILINEAR), np.uint8)
    return out.reshape(h, w, c)


def load_trigger_image(path: str, h: int, w: int, c: int = 3) -> np.ndarray:
    """The image at ``path`` as uint8 ``[h, w, c]``, resized bilinearly (PIL) as the
    reference does; ``c`` 1 converts to greyscale."""
    return _resized(str(path), file_sha256(str(path)), int(h), int(w), int(c))


__all__ = ["file_sha256", "load_trigger_image", "resolve_trigger_image"]
