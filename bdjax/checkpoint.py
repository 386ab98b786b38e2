"""Orbax save/restore of a model state with human-readable JSON metadata.

A checkpoint is a directory::

    DIR/
      bdjax.json   model description, caller metadata (dataset, attack, ACC/ASR...),
                   library versions, creation time and a summary of the state tree
      state/       the state pytree {"params", "batch_stats", ...extras} written by Orbax

:func:`save` writes everything into a hidden sibling directory and renames it into place
as its last step, so ``DIR`` either holds a complete checkpoint or nothing.
:func:`restore` rebuilds the :class:`~bdjax.models.Model` from ``bdjax.json`` and
restores the arrays onto a local device through an abstract target with explicit
shardings, which is what lets a checkpoint saved on a GPU (or on another device of a
multi-device host) load on a CPU.

Example::

    path = checkpoint.save("runs/badnet", model, state, {"dataset": "cifar10", "acc": 0.93})
    model, state, meta = checkpoint.restore(path, expect_model="preact_resnet18")
    print(checkpoint.describe(path))
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import logging
import math
import os
import pathlib
import platform
import secrets
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import models
from bdjax.errors import BdjaxError
from bdjax.models import Model, State

FORMAT = 1
METADATA_FILE = "bdjax.json"
STATE_DIR = "state"

# Keys save() computes itself; caller metadata with the same names is superseded, so a
# metadata dict read from one checkpoint can be passed straight to save() for another.
_RESERVED = ("model", "versions", "created", "format", "tree")
_ACCEPTED = "a directory written by `bdjax attack --out DIR`"
_VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "bdjax")


# ----------------------------------------------------------------------------- save


def save(directory, model: Model, state: State, metadata: Mapping[str, Any] | None = None,
         *, overwrite: bool = False,
         files: Mapping[str, str | os.PathLike] | None = None) -> pathlib.Path:
    """Writes ``state`` and its metadata to ``directory`` atomically.

    Args:
      directory: the checkpoint directory to create (its parent is created if needed).
      model: the model ``state`` belongs to; recorded under ``"model"``.
      state: ``{"params", "batch_stats"}`` plus optional defense-owned entries (masks...),
        as nested dicts of arrays.
      metadata: JSON-able facts about the run (dataset, attack and its parameters,
        target, poison_ratio, n_poisoned, acc/asr/ra, seed, train config...). numpy/jax
        scalars and arrays are converted to plain numbers and lists.
      overwrite: replace an existing bdjax checkpoint at ``directory``.
      files: ``{relative path: source file}`` copied into the checkpoint with the state
        (an attack's resources, e.g. ``resources/lf_pattern.npz``), so it is complete
        on its own.

    Returns:
      The absolute path of the checkpoint directory.

    Raises:
      BdjaxError: NaN/Inf in the state or metadata, a state that does not fit ``model``,
        an existing checkpoint without ``overwrite``, an existing path that is not a
        checkpoint, or a failed write. Nothing is left behind on failure.
    """
    final = pathlib.Path(directory).expanduser().absolute()
    check_destination(final, overwrite)
    leaves = _flatten_state(state)
    _check_finite(leaves)
    tree = _summary(leaves)
    _check_fits_model(model, tree, where=f"the state to save to {final}")
    document = _document(model, tree, metadata or {})

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_state(tmp / STATE_DIR, nest_paths(leaves), final)
        for rel, source in (files or {}).items():
            dest = tmp / rel
            if dest.resolve().parent != tmp.resolve() / pathlib.Path(rel).parent:
                raise BdjaxError(f"checkpoint file name {rel!r} leaves the checkpoint; "
                                 "accepted: a relative path inside it.")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        _write_json(tmp / METADATA_FILE, document)
        _install(tmp, final, overwrite)
    except BaseException:
        # BaseException too: a Ctrl-C mid-save must not leave a hidden half-checkpoint.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def check_destination(final: pathlib.Path, overwrite: bool) -> None:
    """Refuses paths that are not ours to replace, before any work is done (callers
    check before a long training run too)."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise BdjaxError(
            f"checkpoint path {final} exists and is not a directory; accepted: a new or "
            f"empty directory, or an existing bdjax checkpoint with --overwrite.")
    if not final.is_dir() or not any(final.iterdir()):
        return
    if not _is_checkpoint(final):
        raise BdjaxError(
            f"directory {final} is not empty and is not a bdjax checkpoint (no "
            f"{METADATA_FILE}); refusing to write into it; accepted: a new or empty "
            f"directory, or an existing bdjax checkpoint with --overwrite.")
    if not overwrite:
        raise BdjaxError(
            f"checkpoint {final} already exists; pass overwrite=True (CLI: --overwrite) "
            f"to replace it, or choose another directory.")


def _is_checkpoint(path: pathlib.Path) -> bool:
    return path.is_dir() and (path / METADATA_FILE).is_file()


def _install(tmp: pathlib.Path, final: pathlib.Path, overwrite: bool) -> None:
    """Renames the finished ``tmp`` to ``final``; the old checkpoint goes only after."""
    # The destination may have changed while we were writing.
    check_destination(final, overwrite)
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    if not final.exists():
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return
    old = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: pathlib.Path) -> None:
    """Makes a rename durable; best effort (not every OS lets a directory be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_state(path: pathlib.Path, state: State, final: pathlib.Path) -> None:
    """Orbax-writes ``state`` to ``path``; errors name ``final``, the path the user chose."""
    import orbax.checkpoint as ocp

    try:
        with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, state)
            checkpointer.wait_until_finished()
    except Exception as e:  # Orbax/TensorStore raise many types; one sentence for all.
        raise BdjaxError(
            f"could not write the model state of checkpoint {final} ({_first_line(e)}); "
            f"accepted: a writable directory with free space.") from e


def _write_json(path: pathlib.Path, document: dict) -> None:
    text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------- state summaries


def _flatten_state(state: State) -> dict[str, Any]:
    """``{"params/conv1/kernel": array, ...}``; an empty dict is kept as ``{}``.

    Only nested string-keyed dicts are accepted because the JSON tree summary must be
    enough to rebuild the restore target without reading the arrays.
    """
    if not isinstance(state, Mapping) or "params" not in state:
        raise BdjaxError(
            f"state of type {type(state).__name__} is not a model state; accepted: a dict "
            f"with 'params' and 'batch_stats' (plus optional extra entries).")
    leaves: dict[str, Any] = {}

    def visit(node, path):
        if isinstance(node, Mapping):
            if not node and path:
                leaves["/".join(path)] = {}
            for key, child in node.items():
                if not isinstance(key, str) or not key or "/" in key:
                    where = "/".join(path) or "the top level"
                    raise BdjaxError(
                        f"state key {key!r} under {where} cannot be saved; accepted: "
                        f"non-empty strings without '/'.")
                visit(child, (*path, key))
        else:
            leaves["/".join(path)] = _as_array(node, "/".join(path))

    visit(state, ())
    return leaves


def _as_array(value, path: str):
    if isinstance(value, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return value
    if isinstance(value, (bool, int, float, np.generic)):
        # jnp, not np: a Python float must keep JAX's default dtype, not become float64.
        return jnp.asarray(value)
    raise BdjaxError(
        f"state entry {path} is a {type(value).__name__}; accepted: arrays (or scalars) "
        f"in nested dicts.")


def _check_finite(leaves: dict[str, Any]) -> None:
    for path, leaf in leaves.items():
        if isinstance(leaf, dict) or not jnp.issubdtype(leaf.dtype, jnp.inexact):
            continue
        if not bool(jnp.isfinite(leaf).all()):
            raise BdjaxError(
                f"state entry {path} contains NaN or Inf; refusing to save a broken model; "
                f"accepted: finite values only.")


def _summary(leaves: dict[str, Any]) -> dict[str, dict]:
    """``path -> {"shape", "dtype"}`` (``{}`` for an empty dict), for bdjax.json."""
    return {path: ({} if isinstance(leaf, dict) else
                   {"shape": [int(d) for d in leaf.shape], "dtype": jnp.dtype(leaf.dtype).name})
            for path, leaf in leaves.items()}


def _expected_summary(model: Model) -> dict[str, dict]:
    """The summary of ``model.init``'s params and batch_stats, computed without FLOPs."""
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    return _summary(_flatten_state(abstract))


def _check_fits_model(model: Model, tree: dict[str, dict], *, where: str) -> None:
    """Raises unless params/batch_stats in summary ``tree`` match ``model`` exactly.

    Dtypes are not compared: a bf16 copy of the weights is still this model.
    """
    expected = _expected_summary(model)
    got = {p: e for p, e in tree.items() if p.split("/", 1)[0] in ("params", "batch_stats")}
    for path in sorted(set(expected) | set(got)):
        want, have = expected.get(path), got.get(path)
        if want is None or have is None or want.get("shape") != have.get("shape"):
            raise BdjaxError(
                f"{where} does not fit model {model.name!r} with {model.num_classes} "
                f"classes: entry {path} is {_entry_text(have)}, the model expects "
                f"{_entry_text(want)}.")


def _entry_text(entry: dict | None) -> str:
    if entry is None:
        return "absent"
    return "an empty dict" if not entry else f"of shape {tuple(entry['shape'])}"


def nest_paths(leaves: Mapping[str, Any]) -> dict:
    """``{"a/b/c": leaf}`` as nested dicts, the inverse of :func:`_flatten_state` (key
    order follows ``leaves``); attack resource files use it too."""
    root: dict = {}
    for path, leaf in leaves.items():
        node = root
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return root


# ------------------------------------------------------------------------ metadata


def _document(model: Model, tree: dict[str, dict], metadata: Mapping[str, Any]) -> dict:
    """The content of bdjax.json."""
    if not isinstance(metadata, Mapping):
        raise BdjaxError(
            f"metadata of type {type(metadata).__name__} cannot be saved; accepted: a dict.")
    document = {str(k): _to_json(v, str(k)) for k, v in metadata.items()
                if str(k) not in _RESERVED}
    document.update(
        model=_to_json(dataclasses.asdict(model), "model"),
        versions=_versions(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        format=FORMAT,
        tree=tree,
    )
    return document


def _to_json(value, key: str):
    """Plain JSON for ``value``; ``key`` (dotted path) names it in errors."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return _finite(value, key)
    if isinstance(value, np.generic):
        return _numpy_scalar_to_json(value, key)
    if isinstance(value, (jax.Array, np.ndarray)):
        array = np.asarray(value)
        # Element by element (not tolist()) so float32 keeps its short decimal form.
        return _to_json(array[()] if array.ndim == 0 else list(array), key)
    if isinstance(value, Mapping):
        return {str(k): _to_json(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_json(dataclasses.asdict(value), key)
    raise BdjaxError(
        f"metadata {key} is a {type(value).__name__}; accepted: numbers, strings, booleans, "
        f"None, lists, dicts and numpy/jax arrays.")


def _numpy_scalar_to_json(value: np.generic, key: str):
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if jnp.issubdtype(value.dtype, jnp.floating):  # includes ml_dtypes' bfloat16
        number = _finite(float(value), key)
        # str() is the shortest decimal that round-trips at the scalar's own precision:
        # np.float32(0.91) is written 0.91, not 0.9100000262260437.
        return number if value.dtype.itemsize >= 8 else float(str(value))
    raise BdjaxError(
        f"metadata {key} is a numpy {value.dtype} scalar; accepted: booleans, integers "
        f"and real floating-point numbers.")


def _finite(number: float, key: str) -> float:
    if not math.isfinite(number):
        raise BdjaxError(f"metadata {key} is {number}; accepted: finite numbers only.")
    return number


def _versions() -> dict[str, str]:
    """Versions of the libraries that produced the checkpoint (absent ones skipped)."""
    versions = {"python": platform.python_version()}
    for package in _VERSION_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "bdjax" not in versions:
        # A source checkout is not an installed distribution.
        import bdjax

        version = getattr(bdjax, "__version__", None)
        if version is not None:
            versions["bdjax"] = str(version)
    return versions


def load_metadata(directory) -> dict:
    """The parsed ``bdjax.json`` of a checkpoint.

    Args:
      directory: a checkpoint directory.

    Returns:
      The metadata dict (caller keys plus "model", "versions", "created", "format",
      "tree").

    Raises:
      BdjaxError: the directory or its bdjax.json is missing or unreadable.
    """
    path = pathlib.Path(directory).expanduser().absolute()
    if not path.is_dir():
        raise BdjaxError(f"checkpoint directory {path} does not exist; accepted: {_ACCEPTED}.")
    file = path / METADATA_FILE
    if not file.is_file():
        raise BdjaxError(
            f"{path} is not a bdjax checkpoint (no {METADATA_FILE}); accepted: {_ACCEPTED}.")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BdjaxError(f"{file} cannot be read ({_first_line(e)}); accepted: {_ACCEPTED}.") from e
    missing = [k for k in ("format", "model", "tree") if not isinstance(document, dict)
               or k not in document]
    if missing:
        raise BdjaxError(
            f"{file} lacks {', '.join(missing)}; accepted: {_ACCEPTED}.")
    if document["format"] != FORMAT:
        raise BdjaxError(
            f"{file} has format {document['format']!r}; this bdjax reads format {FORMAT} "
            f"(upgrade bdjax to read newer checkpoints).")
    return document


# ------------------------------------------------------------------------- restore


def restore(directory, *, expect_model: str | None = None,
            expect_classes: int | None = None) -> tuple[Model, State, dict]:
    """Loads a checkpoint onto the local default device.

    Args:
      directory: a checkpoint directory written by :func:`save`.
      expect_model: if given, the registry name the checkpoint must hold.
      expect_classes: if given, the class count the checkpoint must have.

    Returns:
      ``(model, state, metadata)``: the rebuilt Model, the state as jax arrays on the
      first local device, and the parsed bdjax.json.

    Raises:
      BdjaxError: missing/corrupt checkpoint, an unexpected model or class count, or a
        state that does not fit its model.
    """
    path = pathlib.Path(directory).expanduser().absolute()
    metadata = load_metadata(path)
    model = _model_from(metadata["model"], path)
    _check_expected(model, path, expect_model, expect_classes)
    _check_fits_model(model, metadata["tree"], where=f"checkpoint {path}")
    try:
        target = _abstract_target(model, metadata["tree"], _local_device())
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BdjaxError(
            f"checkpoint {path} has a malformed state summary ('tree' in {METADATA_FILE}: "
            f"{_first_line(e)}); accepted: {_ACCEPTED}.") from e
    state = _read_state(path / STATE_DIR, target)
    return model, state, metadata


def _model_from(description, path: pathlib.Path) -> Model:
    try:
        return models.get(
            description["name"], num_classes=description["num_classes"],
            mean=description["mean"], std=description["std"],
            image_shape=description["image_shape"], dtype=description.get("dtype", "float32"))
    except (KeyError, TypeError) as e:
        raise BdjaxError(
            f"checkpoint {path} has an incomplete model description ({_first_line(e)}); "
            f"accepted: {_ACCEPTED}.") from e
    except BdjaxError as e:
        raise BdjaxError(f"checkpoint {path}: {e}") from e


def _check_expected(model: Model, path: pathlib.Path, expect_model, expect_classes) -> None:
    if expect_model is not None and model.name != expect_model:
        raise BdjaxError(
            f"checkpoint {path} holds model {model.name!r}, but {expect_model!r} was "
            f"expected; accepted: a checkpoint of {expect_model!r}.")
    if expect_classes is not None and model.num_classes != int(expect_classes):
        raise BdjaxError(
            f"checkpoint {path} has {model.num_classes} classes, but {expect_classes} were "
            f"expected; accepted: a checkpoint with {expect_classes} classes.")


def _local_device() -> jax.Device:
    # local_devices, not devices: on a multi-host run devices()[0] may be another host's.
    return jax.local_devices()[0]


def _abstract_target(model: Model, tree: dict, device: jax.Device) -> State:
    """Shape/dtype/sharding per leaf; nothing is allocated.

    The structure of params/batch_stats comes from the model itself (so empty
    collections survive); dtypes and the extra entries come from the saved summary. The
    explicit sharding is what stops Orbax from trying to reuse the devices recorded at
    save time, which need not exist here.
    """
    sharding = jax.sharding.SingleDeviceSharding(device)
    model_paths = list(_expected_summary(model))  # Validated equal to tree's already.
    flat = {}
    for path in model_paths + [p for p in tree if p not in model_paths]:
        entry = tree[path]
        flat[path] = jax.ShapeDtypeStruct(tuple(entry["shape"]), jnp.dtype(entry["dtype"]),
                                          sharding=sharding) if entry else {}
    return nest_paths(flat)


def _read_state(path: pathlib.Path, target: State) -> State:
    import orbax.checkpoint as ocp

    if not path.is_dir():
        raise BdjaxError(
            f"checkpoint {path.parent} has no {STATE_DIR}/ directory; accepted: {_ACCEPTED}.")
    try:
        with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target)
    except Exception as e:  # Orbax raises many types (ValueError, FileNotFoundError...).
        raise BdjaxError(
            f"checkpoint state {path} is corrupt or incomplete ({_first_line(e)}); "
            f"accepted: {_ACCEPTED}.") from e


# ------------------------------------------------------------------------ describe


# Shown first, in this order; everything else follows alphabetically.
_ORDER = ("dataset", "attack", "attack_params", "trigger", "poisoning", "resources", "target",
          "poison_ratio",
          "n_poisoned", "acc", "asr", "ra", "seed", "train")
_LABELS = {"acc": "ACC", "asr": "ASR", "ra": "RA", "n_poisoned": "poisoned",
           "poison_ratio": "poison ratio", "attack_params": "attack params"}
_FRACTIONS = ("acc", "asr", "ra")


def describe(directory) -> str:
    """A multi-line human-readable summary of a checkpoint (for ``bdjax info DIR``).

    Args:
      directory: a checkpoint directory.

    Returns:
      Lines ``label  value``: checkpoint path, model, parameter count, the caller's
      metadata (known keys first), creation time and library versions.

    Raises:
      BdjaxError: as :func:`load_metadata`.
    """
    path = pathlib.Path(directory).expanduser().absolute()
    meta = load_metadata(path)
    rows = [("checkpoint", str(path)), ("model", _model_line(meta["model"]))]
    rows += _tree_rows(meta["tree"])
    known = [k for k in _ORDER if k in meta]
    rest = sorted(k for k in meta if k not in _ORDER and k not in _RESERVED)
    for key in known + rest:
        rows.append((_LABELS.get(key, key.replace("_", " ")), _format_value(key, meta[key])))
    rows.append(("created", str(meta.get("created", "unknown"))))
    versions = meta.get("versions") or {}
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _model_line(m: dict) -> str:
    shape = "x".join(str(s) for s in m.get("image_shape", ()))
    return (f"{m.get('name')} ({m.get('num_classes')} classes, input {shape}, "
            f"{m.get('dtype', 'float32')})")


def _tree_rows(tree: dict) -> list[tuple[str, str]]:
    arrays = {p: e for p, e in tree.items() if e}
    params = sum(math.prod(e["shape"]) for p, e in arrays.items() if p.startswith("params/"))
    size = sum(math.prod(e["shape"]) * jnp.dtype(e["dtype"]).itemsize for e in arrays.values())
    extras = sorted({p.split("/", 1)[0] for p in tree} - {"params", "batch_stats"})
    state = f"{len(arrays)} arrays, {size / 2**20:.2f} MiB"
    if extras:
        state += f" (extra entries: {', '.join(extras)})"
    return [("parameters", f"{params:,}"), ("state", state)]


def _format_value(key: str, value) -> str:
    if key in _FRACTIONS and isinstance(value, float) and 0.0 <= value <= 1.0:
        return f"{value:.4f} ({100 * value:.2f}%)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format_value(k, v)}" for k, v in value.items()) or "{}"
    if isinstance(value, list):
        return "[" + ", ".join(_format_value("", v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# --------------------------------------------------------------------------- utils


@contextlib.contextmanager
def _quiet_orbax():
    """Silences Orbax's INFO chatter (dozens of absl lines per save) but not warnings.

    Orbax logs through absl, which forwards to the stdlib logger named "absl"; a CLI
    that configures INFO logging would otherwise print every step of every save.
    """
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(error: BaseException, limit: int = 240) -> str:
    """``Type: first line`` of an error, cut short: TensorStore specs run to pages."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
