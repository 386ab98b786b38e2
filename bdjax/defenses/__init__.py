"""Defense registry: ``get(name, **overrides)`` and ``names()``.

A defense is ``defend(model, state, data, config, key) -> (state, report)`` for ONE
trial (DESIGN.md, Contracts): ``data`` is the defender's :class:`~bdjax.data.DefenseData`
(never the test set), ``config`` a frozen dataclass of settings, ``report`` a small dict
of arrays. The experiment runner compiles it once and vmaps it over trials.
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


# name -> (module, defend function, config class, needs_trigger, default overrides).
# Modules are imported on first use so one defense's import cost or failure never touches
# the others; variants of one method share a module and differ in their defaults.
_REGISTRY: dict[str, tuple[str, str, str, bool, dict]] = {
    "ft": ("ft", "defend", "FTConfig", False, {}),
    "fst": ("fst", "defend", "FSTConfig", False, {}),
    "lp": ("fst", "defend", "FSTConfig", False, dict(
        reinit_head=False, tune="head", alpha=0.0, project=False)),
    "fe_tuning": ("fst", "defend", "FSTConfig", False, dict(
        reinit_head=True, tune="backbone", alpha=0.0, project=False)),
    "ft_init": ("fst", "defend", "FSTConfig", False, dict(
        reinit_head=True, tune="all", alpha=0.0, project=False)),
    "npd": ("npd", "defend", "NPDConfig", False, {}),
    "grad_prune": ("grad_prune", "defend", "GradPruneConfig", True, {}),
    "ft_sam": ("ft_sam", "defend", "FTSAMConfig", False, {}),
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
    check_choice("defense", name, names())
    fn, cls, needs_trigger, defaults = _entry(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in overrides:
        check_choice(f"setting of defense {name!r}", k, fields)
    settings = {**defaults, **{k: _coerce(cls, fields[k], v) for k, v in overrides.items()}}
    config = cls(**settings)
    return Defense(name=name, defend=fn, config=config, needs_trigger=needs_trigger)


__all__ = ["Defense", "get", "names"]
