"""A benchmark grid as cells: the ``sweep`` section of a config, expanded.

A config's ``sweep`` section (``get_config(smoke)["sweep"]``) names the grid:

=================  ==========================================================  ==========
key                what                                                        default
=================  ==========================================================  ==========
``datasets``       dataset names                                               the config's
``models``         model names                                                 the config's
``attacks``        ``{name: trigger parameters}`` (or a list of names)         required
``poison_ratios``  poisoning ratios                                            ``[0.1]``
``targets``        target labels (all-to-one)                                  ``[0]``
``attack_seeds``   seeds of the backdoored models                              ``[0]``
``defenses``       ``{name: setting overrides}`` (or a list of names)          required
``spc``            defender samples per class                                  ``[]``
``ratio``          defender fractions of the training set                      ``[]``
``trials``         trials per defense cell                                     ``5``
``seed``           root seed of the defender data and defense keys             ``0``
``planned``        ``{"attacks": [...], "defenses": [...]}``: names the grid    ``{}``
                   wants that bdjax does not have yet; each joins the grid (with
                   default settings) when it lands, the others are listed as
                   not yet available
=================  ==========================================================  ==========

``spc`` and ``ratio`` together give the defender-data settings (at least one). Attack
training uses the config's ``train`` and ``dataset_args`` sections; a defense's settings
are the config's ``defenses`` section for it, then the grid's overrides.

An :class:`AttackCell` is one backdoored model (its checkpoint is trained once and
named by everything that determines it); a :class:`DefenseCell` is one defense setting
on one defender-data setting of one backdoored model, its trials run as one compiled
call. Both are plain frozen dataclasses, so they pickle (Ray tasks) and hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json

from bdjax import attacks, config, data, defenses, models
from bdjax.errors import BdjaxError, check_choice
from bdjax.experiment import row_base
from bdjax.records import row_key
from bdjax.train import TrainConfig

KEYS = ("datasets", "models", "attacks", "poison_ratios", "targets", "attack_seeds",
        "defenses", "spc", "ratio", "trials", "seed", "planned")
DEFAULT_MODEL = {"synthetic": "small_cnn", "cifar10": "preact_resnet18"}


def _json(x) -> str:
    return json.dumps(x, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class AttackCell:
    """One backdoored model: what it is trained on, with which trigger, how."""

    dataset: str
    model: str
    attack: str
    params: str  # JSON of the trigger parameters
    poison_ratio: float
    target: int
    seed: int
    dataset_args: str  # JSON of data.load's arguments
    train: str  # JSON of the TrainConfig settings

    @property
    def name(self) -> str:
        """The checkpoint's directory name: readable fields, then a hash of them all (a
        changed trigger parameter or training setting is a different checkpoint)."""
        digest = hashlib.sha256(_json(dataclasses.asdict(self)).encode()).hexdigest()[:10]
        return (f"{self.dataset}-{self.model}-{self.attack}-p{self.poison_ratio:g}"
                f"-t{self.target}-s{self.seed}-{digest}")

    @property
    def checkpoint_id(self) -> str:
        """How rows name this checkpoint: relative to the sweep directory, so a sweep
        directory can move (or be shared by machines) and still resume."""
        return f"checkpoints/{self.name}"

    def train_config(self) -> TrainConfig:
        return TrainConfig(**json.loads(self.train))


@dataclasses.dataclass(frozen=True)
class DefenseCell:
    """One defense setting on one defender-data setting of one backdoored model."""

    attack: AttackCell
    defense: str
    overrides: str  # JSON of the setting overrides
    spc: int | None
    ratio: float | None
    trials: tuple[int, ...]
    seed: int

    def resolved(self) -> defenses.Defense:
        """The defense with every setting as it runs (the rows' ``settings``)."""
        flip = data.info(self.attack.dataset, **json.loads(self.attack.dataset_args))["flip"]
        return defenses.for_run(self.defense, json.loads(self.overrides),
                                dataset=self.attack.dataset, model=self.attack.model,
                                flip=flip)

    @property
    def setting(self) -> str:
        return f"spc={self.spc}" if self.spc is not None else f"ratio={self.ratio:g}"

    @property
    def label(self) -> str:
        a = self.attack
        return (f"{a.dataset} {a.model} {a.attack} {a.poison_ratio:g} s{a.seed} | "
                f"{self.defense} {self.setting}")

    def row_keys(self) -> dict[int, str]:
        """Trial -> the key its row has (``records.row_key``)."""
        a = self.attack
        base = row_base(checkpoint_id=a.checkpoint_id, dataset=a.dataset, model=a.model,
                        attack=a.attack, poison_ratio=a.poison_ratio, target=a.target,
                        defense=self.resolved(), spc=self.spc, ratio=self.ratio,
                        seed=self.seed)
        return {t: row_key({**base, "trial": t}) for t in self.trials}


@dataclasses.dataclass(frozen=True)
class Grid:
    """The expanded grid: backdoored models, defense cells (grouped by model, in order),
    and the planned names bdjax does not have yet."""

    attack_cells: tuple[AttackCell, ...]
    cells: tuple[DefenseCell, ...]
    unavailable: dict
    shape: dict  # how many of each axis, for the plan


def _named(value, what: str) -> dict[str, dict]:
    if isinstance(value, (list, tuple)):
        return {str(v): {} for v in value}
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(v, dict):
                raise BdjaxError(f"sweep {what} {k!r} has {type(v).__name__} settings; "
                                 "accepted: a dict of settings.")
        return {str(k): dict(v) for k, v in value.items()}
    raise BdjaxError(f"sweep {what} is a {type(value).__name__}; accepted: a dict of "
                     "name -> settings or a list of names.")


def _list(sweep: dict, key: str, default, kind) -> list:
    value = sweep.get(key, default)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, kind) or isinstance(v, bool):
            raise BdjaxError(f"sweep {key} has {v!r}; accepted: a list of "
                             f"{getattr(kind, '__name__', 'numbers')} values.")
    return values


def _available(sweep: dict, key: str, registry: list[str]) -> tuple[dict, list[str]]:
    """(names in the grid with their settings, planned names not yet available)."""
    named = _named(sweep.get(key) or {}, key)
    planned = list((sweep.get("planned") or {}).get(key, []))
    for name in named:
        check_choice(key[:-1], name, registry)
    for name in planned:
        if name in registry and name not in named:
            named[name] = {}
    return named, [n for n in planned if n not in registry]


def expand(cfg: dict) -> Grid:
    """The grid of a loaded config (``config.load``); every name and setting is checked
    here, before anything trains."""
    sweep = cfg.get("sweep") or {}
    if not sweep:
        raise BdjaxError("the config has no sweep section; accepted: a config whose "
                         "get_config returns a 'sweep' dict (e.g. sweep_smoke).")
    unknown = sorted(set(sweep) - set(KEYS))
    if unknown:
        raise BdjaxError(f"sweep key {unknown[0]!r} is unknown; accepted: {', '.join(KEYS)}.")
    datasets = _list(sweep, "datasets", [cfg.get("dataset") or "synthetic"], str)
    for d in datasets:
        check_choice("dataset", d, data.names())
    model_names = _list(sweep, "models", [cfg.get("model")] if cfg.get("model") else [], str)
    for m in model_names:
        check_choice("model", m, models.names())
    atks, atk_missing = _available(sweep, "attacks", attacks.names())
    dfns, dfn_missing = _available(sweep, "defenses", defenses.names())
    if not atks or not dfns:
        raise BdjaxError("the sweep names no available " + ("attack" if not atks else
                         "defense") + "; accepted: at least one of "
                         + ", ".join(attacks.names() if not atks else defenses.names()) + ".")
    ratios = _list(sweep, "poison_ratios", [0.1], (int, float))
    targets = _list(sweep, "targets", [0], int)
    seeds = _list(sweep, "attack_seeds", [0], int)
    spcs = _list(sweep, "spc", [], int)
    fractions = _list(sweep, "ratio", [], (int, float))
    if not spcs and not fractions:
        raise BdjaxError("the sweep has no defender-data setting; accepted: a non-empty "
                         "'spc' and/or 'ratio' list.")
    trials, seed = sweep.get("trials", 5), sweep.get("seed", 0)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise BdjaxError(f"sweep trials {trials!r} is invalid; accepted: an integer >= 1.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise BdjaxError(f"sweep seed {seed!r} is invalid; accepted: an integer.")
    config.check_attack_names(cfg, attacks.names())
    train = dict(cfg.get("train") or {})
    try:
        TrainConfig(**train)
        for over in (cfg.get("attack_train") or {}).values():
            TrainConfig(**{**train, **over})
    except TypeError as e:
        raise BdjaxError(f"the config's train section is invalid ({e}); accepted: "
                         f"{', '.join(f.name for f in dataclasses.fields(TrainConfig))}.")
    load_args = {k: v for k, v in (cfg.get("dataset_args") or {}).items() if v is not None}

    attack_cells, cells = [], []
    settings = [("spc", s) for s in spcs] + [("ratio", r) for r in fractions]
    for dataset, (atk, params), ratio, target, aseed in itertools.product(
            datasets, atks.items(), ratios, targets, seeds):
        for model in model_names or [DEFAULT_MODEL[dataset]]:
            acell = AttackCell(dataset, model, atk, _json(params), float(ratio), target,
                               aseed, _json(load_args),
                               _json({**train, **(cfg.get("attack_train") or {}).get(atk, {})}))
            attacks.get(atk, target=target, **params)  # trigger parameters checked now
            attack_cells.append(acell)
            for (dname, over), (kind, value) in itertools.product(dfns.items(), settings):
                over = {**cfg.get("defenses", {}).get(dname, {}), **over}
                cell = DefenseCell(acell, dname, _json(over),
                                   value if kind == "spc" else None,
                                   float(value) if kind == "ratio" else None,
                                   tuple(range(trials)), seed)
                cell.resolved()  # unknown settings fail here, before anything trains
                cells.append(cell)
    shape = {"datasets": len(datasets), "models": len(model_names) or 1,
             "attacks": len(atks), "poison_ratios": len(ratios), "targets": len(targets),
             "attack_seeds": len(seeds), "defenses": len(dfns),
             "defender_settings": len(settings), "trials": trials}
    return Grid(tuple(attack_cells), tuple(cells),
                {"attacks": atk_missing, "defenses": dfn_missing}, shape)


__all__ = ["AttackCell", "DefenseCell", "Grid", "KEYS", "expand"]
