"""Attack resources that bdjax generates itself, once, and reuses.

Some attacks need more than a formula: LF's universal pattern and Trojan's trigger are
computed against a clean model, LC's poisoned images against an adversarially trained
one, SSBA's triggers come from an encoder network, Input-aware's from the generator it
trains with the classifier. The reference ships these as files that users often lack;
bdjax makes them deterministically from a seed and caches them in a resource directory
(``bdjax attack --resources DIR``, default ``resources/`` beside the checkpoint):

- array files (``.npz``): a dict of arrays, or a flax parameter tree flattened to
  ``a/b/c`` keys; written atomically; named ``{kind}-{dataset}-{model}-{digest}.npz``
  where the digest covers everything the resource depends on, so a changed setting never
  reuses a stale file;
- models (the clean and the robust classifier): bdjax checkpoints (Orbax).

An attack refers to its file by path plus SHA-256 in its parameters; the checkpoint gets
its own copy (``resources/NAME`` inside it, a relative path in its metadata), so a
checkpoint is complete on its own and a changed file is refused when it is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import secrets
from typing import Callable

import numpy as np

from bdjax.errors import BdjaxError

RESOURCE_DIR = "resources"  # inside a checkpoint, and the default beside one


def digest(settings) -> str:
    """A short stable hash of JSON-able ``settings`` (sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def file_sha256(path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict of arrays as ``{"a/b/c": array}``."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "/"))
        else:
            out[name] = np.asarray(v)
    return out


def nest(flat: dict[str, np.ndarray]) -> dict:
    """The inverse of :func:`flatten` (the checkpoint's own path nesting)."""
    from bdjax.checkpoint import nest_paths

    return nest_paths(flat)


def save_arrays(path, arrays: dict[str, np.ndarray]) -> str:
    """Writes ``arrays`` to ``path`` (.npz) atomically; returns the file's SHA-256."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file_sha256(path)


def resolve(path, sha256: str | None = None, root=None, *, what: str = "resource") -> tuple[str, str]:
    """(absolute path, SHA-256) of a resource file; a relative ``path`` is taken inside
    ``root`` (a checkpoint directory) when given.

    Raises:
      BdjaxError: the file is missing, or its checksum is not ``sha256``.
    """
    p = pathlib.Path(str(path)).expanduser()
    if not p.is_absolute() and root is not None:
        p = pathlib.Path(root) / p
    if not p.is_file():
        raise BdjaxError(f"{what} file {str(p)!r} does not exist; accepted: a file that "
                         "bdjax wrote (`bdjax attack` makes it).")
    p = p.resolve()
    found = file_sha256(p)
    if sha256 is not None and found != sha256:
        raise BdjaxError(f"{what} file {str(p)!r} has SHA-256 {found[:12]}... but the attack "
                         f"was made with {str(sha256)[:12]}...; accepted: the file the "
                         "checkpoint was made with.")
    return str(p), found


@functools.lru_cache(maxsize=32)
def _load(path: str, sha256: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def load_arrays(path: str, sha256: str) -> dict[str, np.ndarray]:
    """The arrays of a resource file (cached per path and checksum; treat as read-only)."""
    try:
        return _load(str(path), str(sha256))
    except (OSError, ValueError) as e:
        raise BdjaxError(f"resource file {str(path)!r} could not be read ({type(e).__name__}); "
                         "accepted: an .npz file written by bdjax.") from e


def cached_arrays(directory, name: str, make: Callable[[], dict], log=print) -> tuple[str, str]:
    """``directory/name`` (.npz), made by ``make()`` only if it is not there yet.

    Returns:
      (absolute path, SHA-256) of the file.
    """
    path = pathlib.Path(directory).expanduser().absolute() / name
    if path.is_file():
        log(f"resource {path.name}: reusing {path}")
        return str(path), file_sha256(path)
    log(f"resource {path.name}: generating (cached in {path.parent})")
    sha = save_arrays(path, make())
    return str(path), sha


def cached_model(directory, name: str, model, make: Callable, log=print):
    """The state of a classifier kept as a bdjax checkpoint ``directory/name``; trained
    by ``make() -> (state, metadata)`` only if the checkpoint is not there yet."""
    from bdjax import checkpoint

    path = pathlib.Path(directory).expanduser().absolute() / name
    if (path / checkpoint.METADATA_FILE).is_file():
        log(f"resource {name}: reusing the model in {path}")
        _, state, _ = checkpoint.restore(path, expect_model=model.name)
        return state
    log(f"resource {name}: training (cached in {path.parent})")
    state, meta = make()
    checkpoint.save(path, model, state, meta)
    return state


__all__ = ["RESOURCE_DIR", "cached_arrays", "cached_model", "digest", "file_sha256",
           "flatten", "load_arrays", "nest", "resolve", "save_arrays"]
