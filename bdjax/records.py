"""Durable result rows: one JSON line per trial, appended so a killed run loses nothing.

A row's identity is :data:`ROW_KEY` (which checkpoint, defense setting, defender data,
seed and trial); runs skip rows whose key is already in their result file, which is how
``bdjax defend`` and ``bdjax sweep`` resume. Rows also carry their provenance
(:func:`device_name`, :func:`versions`).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
from typing import Iterable

import jax
import numpy as np

from bdjax.errors import BdjaxError

ROW_KEY = ("checkpoint", "dataset", "model", "attack", "poison_ratio", "target", "defense",
           "settings", "spc", "ratio", "seed", "trial")


def row_key(row: dict) -> str:
    """Identity of a result row: the same key means the same trial of the same run."""
    return json.dumps([row.get(k) for k in ROW_KEY], sort_keys=True)


def read_rows(path) -> list[dict]:
    """Complete rows of a JSONL result file (a torn last line is ignored)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _repair_tail(fd: int) -> None:
    """Cuts a partial last line left by a killed writer, so appends start clean."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return
    pos = size
    while pos > 0:
        step = min(4096, pos)
        chunk = os.pread(fd, step, pos - step)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            end = pos - step + nl + 1
            if end != size:
                os.ftruncate(fd, end)
            return
        pos -= step
    os.ftruncate(fd, 0)


def append_rows(path, rows: Iterable[dict]) -> None:
    """Appends rows durably: each row is one ``write`` of a whole line, then fsync.

    A run killed mid-write can leave at most a torn last line, which the next append
    removes and :func:`read_rows` skips; complete rows are never lost or duplicated.
    """
    path = pathlib.Path(path)
    if path.parent and not path.parent.exists():
        raise BdjaxError(f"result file {str(path)!r} is in a missing directory; accepted: "
                         "a path in an existing directory.")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _repair_tail(fd)
        for row in rows:
            line = (json.dumps(jsonable(row), sort_keys=True, allow_nan=False)
                    + "\n").encode()
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, line)
            os.fsync(fd)
    finally:
        os.close(fd)


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return jsonable(np.asarray(x).tolist())
    if isinstance(x, np.generic):
        x = x.item()  # a numpy NaN becomes a Python float NaN: handled below
    if isinstance(x, float) and not np.isfinite(x):
        return None  # JSON has no NaN; a missing value reads as null
    return x


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("bdjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            if pkg == "bdjax":
                from bdjax import __version__

                out[pkg] = __version__
    return out


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}".rstrip(":")


