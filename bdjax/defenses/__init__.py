"""Defense registry: ``get(name, **overrides)`` and ``names()``.

A defense is ``defend(model, state, data, config, key) -> (state, report)`` for ONE
trial (DESIGN.md, Contracts): ``data`` is the defender's :class:`~bdjax.data.DefenseData`
(never the test set), ``config`` a frozen dataclass of settings, ``report`` a small dict
of arrays. The experiment runner compiles it once and vmaps it over trials.

Settings come from four layers, later ones winning: the config class's defaults (the
reference's CIFAR-10 values), the defense module's ``dataset_settings(dataset, model)``
(the reference's per-dataset or per-model values, e.g. NPD's radius or FST's epochs),
the variant's defaults (``lp`` = FST without the penalty...), and the caller's overrides
(a config file, ``--set``). :func:`for_run` applies all four; :func:`get` skips the
dataset layer.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any, Callable

from bdjax.errors import BdjaxError, check_choice


@dataclasses.dataclass(frozen=True)
class Defense:
    """A defense with its settings (hashable, so one compile per (model, defense, setting)).

    Attributes:
      name: registry name.
      defend: the one-trial function.
      config: the settings (a frozen dataclass).
      needs_trigger: whether the threat model gives the defender the trigger function.
    """

    name: str
    defend: Callable
    config: Any
    needs_trigger: bool = False

    @property
    def settings(self) -> dict:
        """JSON-ready settings, recorded in every result row."""
        return dataclasses.asdict(self.config)

    @property
    def uses_validation(self) -> bool:
        """Whether the defense selects or stops on a validation split of the defender's
        data. Those that do not (FT with ``select=last``, FT-SAM, the FST family, NPD)
        train on ALL of it, as the reference code does (the survey's fork draws their SPC
        images with ``val_ratio=0``); a config without the property is given one."""
        return bool(getattr(self.config, "uses_validation", True))


# name -> (module, defend function, config class, needs_trigger, default overrides).
# Modules are imported on first use so one defense's import cost or failure never touches
# the others; variants of one method share a module and differ in their defaults.
_REGISTRY: dict[str, tuple[str, str, str, bool, dict]] = {
    "ft": ("ft", "defend", "FTConfig", False, {}),
    "fst": ("fst", "defend", "FSTConfig", False, {}),
    "lp": ("fst", "defend", "FSTConfig", False, dict(reinit_head=False, tune="head", alpha=0.0)),
    "fe_tuning": ("fst", "defend", "FSTConfig", False, dict(
        reinit_head=True, tune="backbone", alpha=0.0)),
    "ft_init": ("fst", "defend", "FSTConfig", False, dict(
        reinit_head=True, tune="all", alpha=0.0)),
    "npd": ("npd", "defend", "NPDConfig", False, {}),
    "grad_prune": ("grad_prune", "defend", "GradPruneConfig", True, {}),
    "ft_sam": ("ft_sam", "defend", "FTSAMConfig", False, {}),
    # The survey's pruning and masking defenses (issue 10).
    "fp": ("fp", "defend", "FPConfig", False, {}),
    "anp": ("anp", "defend", "ANPConfig", False, {}),
    "rnp": ("rnp", "defend", "RNPConfig", False, {}),
    "awm": ("awm", "defend", "AWMConfig", False, {}),
    "mmbd": ("mmbd", "defend", "MMBDConfig", False, {}),
    "bnp": ("bnp", "defend", "BNPConfig", False, {}),
    "clp": ("clp", "defend", "CLPConfig", False, {}),
    # The survey's unlearning and fine-tuning defenses (issue 11).
    "nad": ("nad", "defend", "NADConfig", False, {}),
    "pbe": ("pbe", "defend", "PBEConfig", False, {}),
    "ibau": ("ibau", "defend", "IBAUConfig", False, {}),
    "sau": ("sau", "defend", "SAUConfig", False, {}),
    "nc": ("nc", "defend", "NCConfig", False, {}),
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> tuple[Callable, type, bool, dict]:
    module, fn, cls, needs_trigger, defaults = _REGISTRY[name]
    mod = importlib.import_module(f"bdjax.defenses.{module}")
    return getattr(mod, fn), getattr(mod, cls), needs_trigger, defaults


def _coerce(cls, field: dataclasses.Field, value):
    """Converts a command-line string to the field's type; others pass through."""
    if not isinstance(value, str):
        return value
    typ = typing.get_type_hints(cls)[field.name]
    try:
        if typ is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        return typ(value)
    except (TypeError, ValueError):
        raise BdjaxError(f"setting {field.name}={value!r} is not a valid "
                         f"{getattr(typ, '__name__', typ)}.") from None


def get(name: str, **overrides) -> Defense:
    """The defense ``name`` with ``overrides`` applied to its default settings."""
    return _build(name, {}, overrides)


def _build(name: str, base: dict, overrides: dict) -> Defense:
    check_choice("defense", name, names())
    fn, cls, needs_trigger, defaults = _entry(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in overrides:
        check_choice(f"setting of defense {name!r}", k, fields)
    settings = {**base, **defaults,
                **{k: _coerce(cls, fields[k], v) for k, v in overrides.items()}}
    config = cls(**settings)
    return Defense(name=name, defend=fn, config=config, needs_trigger=needs_trigger)


def dataset_settings(name: str, dataset: str, model: str) -> dict:
    """The reference's settings of defense ``name`` for ``(dataset, model)``: what its
    module's ``dataset_settings`` returns (empty where the class defaults hold)."""
    check_choice("defense", name, names())
    module = importlib.import_module(f"bdjax.defenses.{_REGISTRY[name][0]}")
    hook = getattr(module, "dataset_settings", None)
    return dict(hook(dataset, model)) if hook else {}


def for_run(name: str, overrides: dict | None, *, dataset: str, model: str,
            flip: bool = True) -> Defense:
    """The defense as a run on ``dataset`` with ``model`` gets it: class defaults <
    :func:`dataset_settings` < the variant's defaults < ``overrides``; a dataset without
    horizontal flips (``flip=False``) turns them off unless ``overrides`` say otherwise."""
    overrides = dict(overrides or {})
    base = dataset_settings(name, dataset, model)
    _, cls, _, _ = _entry(name)
    if not flip and "flip" in {f.name for f in dataclasses.fields(cls)}:
        base["flip"] = False
    return _build(name, base, overrides)


__all__ = ["Defense", "dataset_settings", "for_run", "get", "names"]
