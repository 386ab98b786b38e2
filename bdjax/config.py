"""Configs as code: modules with ``get_config(smoke) -> dict`` (see ``bdjax.configs``).

A config gives defaults (``dataset``, ``model``, ``dataset_args``, ``train`` for attack
training, ``attack_train`` per-attack changes to it (e.g. more epochs for an attack whose
trigger the model learns slowly), ``attacks`` parameters per attack (e.g. the lengths of
resource generation),
``defenses`` overrides per defense, and a ``sweep`` grid); command-line flags
override it. Values not given anywhere fall back to the reference defaults in the
dataclasses and the defenses' ``dataset_settings``.

The shipped configs live in ``configs/`` at the top of the repository and are installed
as the package ``bdjax.configs``, so a wheel install has them too. ``--config`` takes a
shipped config's name (``survey_cifar10``) or a path to a Python file.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import pkgutil
import sys

from bdjax.errors import BdjaxError

SECTIONS = ("dataset_args", "train", "attack_train", "attacks", "defenses", "sweep")  # dicts
VALUES = ("dataset", "model")  # strings or None
_ACCEPTED = ("a shipped config name ({names}) or a Python file defining "
             "get_config(smoke) -> dict")


def _package():
    """``bdjax.configs``: installed (wheel or editable install), or, when bdjax runs from
    a source tree on ``PYTHONPATH``, the repository's ``configs/`` loaded under that name."""
    try:
        return importlib.import_module("bdjax.configs")
    except ModuleNotFoundError:
        init = pathlib.Path(__file__).resolve().parent.parent / "configs" / "__init__.py"
        if not init.is_file():
            raise BdjaxError("bdjax's configs are missing (no bdjax.configs package and no "
                             f"{init.parent}); accepted: an installed bdjax or a source "
                             "tree with configs/.") from None
        spec = importlib.util.spec_from_file_location(
            "bdjax.configs", init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["bdjax.configs"] = module
        spec.loader.exec_module(module)
        return module


def names() -> list[str]:
    """The shipped configs (modules of ``bdjax.configs``)."""
    pkg = _package()
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.ispkg)


def _shipped(name: str):
    _package()
    return importlib.import_module(f"bdjax.configs.{name}")


def empty() -> dict:
    return {**{k: {} for k in SECTIONS}, **{k: None for k in VALUES}}


def load(name_or_path: str | None, *, dataset: str | None = None, smoke: bool = False) -> dict:
    """The config ``name_or_path`` (a shipped name or a file), else the shipped
    ``<dataset>`` config, else an empty config."""
    if name_or_path:
        module = _module(name_or_path)
    elif dataset and dataset in names():
        module = _shipped(dataset)
    else:
        return empty()
    where = getattr(module, "__file__", name_or_path)
    try:
        cfg = module.get_config(smoke)
    except Exception as e:  # a config is user code: report it in one sentence
        raise BdjaxError(f"config {str(where)!r} failed to load ({type(e).__name__}: {e}); "
                         "accepted: a module defining get_config(smoke) -> dict.") from e
    if not isinstance(cfg, dict):
        raise BdjaxError(f"config {str(where)!r} returned a {type(cfg).__name__}; accepted: "
                         "get_config(smoke) returning a dict.")
    unknown = sorted(set(cfg) - set(SECTIONS) - set(VALUES))
    if unknown:
        raise BdjaxError(f"config {str(where)!r} has unknown section {unknown[0]!r}; "
                         f"accepted: {', '.join(SECTIONS + VALUES)}.")
    out = empty()
    out.update({k: dict(cfg.get(k) or {}) for k in SECTIONS})
    out.update({k: cfg.get(k) for k in VALUES})
    return out


def check_attack_names(cfg: dict, known) -> None:
    """One sentence for an unknown attack name in ``attacks`` or ``attack_train`` (the
    caller passes ``bdjax.attacks.names()``: this module imports no jax)."""
    for name in sorted(set(cfg.get("attack_train") or {}) | set(cfg.get("attacks") or {})):
        if name not in known:
            raise BdjaxError(f"the config names unknown attack {name!r}; accepted: "
                             f"{', '.join(known)}.")


def _module(name_or_path: str):
    path = pathlib.Path(name_or_path)
    if path.suffix == ".py" or path.is_file():
        if not path.is_file():
            raise BdjaxError(f"config {name_or_path!r} does not exist; accepted: "
                             + _ACCEPTED.format(names=", ".join(names())) + ".")
        spec = importlib.util.spec_from_file_location(f"bdjax_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise BdjaxError(f"config {str(path)!r} failed to load ({type(e).__name__}: "
                             f"{e}); accepted: a file defining get_config(smoke).") from e
        return module
    if name_or_path not in names():
        raise BdjaxError(f"unknown config {name_or_path!r}; accepted: "
                         + _ACCEPTED.format(names=", ".join(names())) + ".")
    return _shipped(name_or_path)


__all__ = ["SECTIONS", "VALUES", "empty", "load", "names"]
