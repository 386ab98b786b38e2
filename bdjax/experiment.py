"""Run attacks and defenses: trials (vmapped), evaluation, durable result records.

A defense is compiled once per (model, defense, setting) as ``jit(vmap(defend))`` over
stacked trial data and keys; trials can also run in sequence through a compiled
one-trial program (``strategy="sequential"``), the reference the vmapped run is tested
against. Both compute the same function of the same keys and data, but XLA compiles the
two programs separately, so float results can differ in the last bits; over a whole
defense such a difference can move a test image across the decision boundary
(measured: a 3-trial vmapped FT run gave one trial ASR 0.7494 where the sequential run
gave 0.7500, one test image). Rows record how many trials shared the compiled call
(``trials_batched``).

Keys: the root key is ``key(seed)``; trial ``t`` draws its defense data with
``fold_in(root, t)`` and runs the defense with ``fold_in(fold_in(root, t), 1)``, so a
trial's numbers do not depend on which other trials run beside it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import pathlib
import platform
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import attacks, checkpoint, data, metrics, models
from bdjax.data import DefenseData, defense_split
from bdjax.defenses import Defense
from bdjax.errors import BdjaxError, check_choice
from bdjax.kernels import logits_in_batches
from bdjax.models import Model, State
from bdjax.train import TrainConfig, train

STRATEGIES = ("vmap", "sequential")


# ----------------------------------------------------------------------------- evaluation
def _predict(model: Model, state: State, x):
    return jnp.argmax(logits_in_batches(model, state, x), -1)


def _scores(model: Model, state: State, x_clean, y, x_poisoned, y_target, valid):
    clean = _predict(model, state, x_clean)
    poisoned = _predict(model, state, x_poisoned)
    out = metrics.attack_metrics(poisoned, y, y_target, valid)
    return {"acc": metrics.accuracy(clean, y), "asr": out["asr"], "ra": out["ra"]}


@functools.partial(jax.jit, static_argnums=0)
def _scores_one(model, state, *test):
    return _scores(model, state, *test)


@functools.partial(jax.jit, static_argnums=0)
def _scores_many(model, states, *test):
    return jax.vmap(lambda s: _scores(model, s, *test))(states)


def _test_arrays(test: attacks.TestSet):
    return (test.x_clean, test.y, test.x_poisoned, test.y_target, test.valid)


def evaluate(model: Model, state: State, test: attacks.TestSet) -> dict[str, float]:
    """Clean ACC, ASR and RA of one model state on ``test``."""
    return {k: float(v) for k, v in _scores_one(model, state, *_test_arrays(test)).items()}


def evaluate_trials(model: Model, states: State, test: attacks.TestSet) -> dict[str, np.ndarray]:
    """ACC, ASR and RA per trial for states stacked on a leading trial axis (vmapped)."""
    return {k: np.asarray(v) for k, v in
            _scores_many(model, states, *_test_arrays(test)).items()}


# ------------------------------------------------------------------------------- defenses
def trial_key(seed: int, trial: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), trial)


def split_for_trials(dataset: data.Dataset, trials: Iterable[int], seed: int, *,
                     spc: int | None = None, ratio: float | None = None,
                     validation: bool = True) -> DefenseData:
    """The defender's data of each trial, stacked (trial t from ``fold_in(root, t)``);
    ``validation=False`` gives all of it to training (``Defense.uses_validation``)."""
    return defense_split(dataset.x_train, dataset.y_train, dataset.num_classes,
                         key=jax.random.key(seed), trials=tuple(trials), spc=spc, ratio=ratio,
                         validation=validation)


@dataclasses.dataclass
class TrialRun:
    """Output of :func:`run_defense`: per-trial states/reports (leading axis T), timing."""

    states: State
    reports: dict
    seconds_compile: float
    seconds_run: float


def _one_trial(defense: Defense, model: Model) -> Callable:
    return lambda state, d, key: defense.defend(model, state, d, defense.config, key)


# Compiled defenses, one per (model, defense with its settings, strategy, argument shapes):
# a sweep that calls run_defense for many checkpoints or trial blocks compiles once. The
# least recently used executable is dropped beyond _MAX_COMPILED (each holds device code
# and, for big models, buffers), so a long sweep over many settings stays bounded.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_MAX_COMPILED = 32


def _signature(*args):
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((tuple(a.shape), str(a.dtype)) for a in leaves)


def _compiled(model: Model, defense: Defense, strategy: str, *args):
    """(executable, seconds spent compiling it now; 0 when it was cached)."""
    key = (model, defense, strategy, _signature(*args))
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key], 0.0
    fn = _one_trial(defense, model)
    if strategy == "vmap":
        fn = jax.vmap(fn, in_axes=(None, 0, 0))
    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    _COMPILED[key] = exe
    while len(_COMPILED) > _MAX_COMPILED:
        _COMPILED.popitem(last=False)
    return exe, time.perf_counter() - t0


def run_defense(model: Model, state: State, defense: Defense, split: DefenseData,
                keys: jax.Array, *, strategy: str = "vmap") -> TrialRun:
    """Runs ``defense`` on every trial of ``split`` (leading axis T) from ``state``.

    ``vmap`` compiles ``jit(vmap(defend))`` and runs all trials in one call;
    ``sequential`` compiles ``jit(defend)`` and calls it per trial. Either is compiled
    once per (model, defense setting, shapes) and cached for later calls. Compile and
    run time are measured apart (results are blocked on before reading clocks).
    """
    check_choice("strategy", strategy, STRATEGIES)
    split = jax.tree_util.tree_map(jnp.asarray, split)
    if strategy == "vmap":
        exe, seconds_compile = _compiled(model, defense, strategy, state, split, keys)
        t1 = time.perf_counter()
        states, reports = jax.block_until_ready(exe(state, split, keys))
    else:
        trial = lambda i: jax.tree_util.tree_map(lambda a: a[i], (split, keys))
        exe, seconds_compile = _compiled(model, defense, strategy, state, *trial(0))
        t1 = time.perf_counter()
        outs = [jax.block_until_ready(exe(state, *trial(i))) for i in range(keys.shape[0])]
        states, reports = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
    return TrialRun(states, reports, seconds_compile=seconds_compile,
                    seconds_run=time.perf_counter() - t1)


# -------------------------------------------------------------------------------- records
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
            line = (json.dumps(_jsonable(row), sort_keys=True, allow_nan=False)
                    + "\n").encode()
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, line)
            os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(x).tolist())
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


# --------------------------------------------------------------------------------- attack
def dataset_from_meta(meta: dict) -> data.Dataset:
    ds = meta["dataset"]
    return data.load(ds["name"], **ds.get("load", {}))


def attack_from_meta(meta: dict, num_classes: int) -> attacks.Attack:
    a = meta["attack"]
    return attacks.get(a["name"], target=a["target"], mode=a["mode"],
                       num_classes=num_classes, **a.get("params", {}))


def run_attack(*, dataset: str = "synthetic", model: str = "small_cnn",
               attack: str = "badnets", ratio: float = 0.1, target: int = 0,
               mode: str = "all_to_one", seed: int = 0, out, train_config: TrainConfig,
               attack_params: dict | None = None, dataset_args: dict | None = None,
               overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Poisons ``dataset``, trains ``model`` on it, evaluates, and checkpoints to ``out``.

    Keys: poisoning uses ``fold_in(key(seed), 1)`` and training ``fold_in(key(seed), 2)``.
    Returns the checkpoint metadata.
    """
    load_args = {k: v for k, v in (dataset_args or {}).items() if v is not None}
    ds = data.load(dataset, **load_args)
    mdl = models.for_dataset(model, ds)
    atk = attacks.get(attack, target=target, mode=mode, num_classes=ds.num_classes,
                      **(attack_params or {}))
    root = jax.random.key(seed)
    poisoned = attacks.poison(atk, ds.x_train, ds.y_train, ds.num_classes, ratio,
                              jax.random.fold_in(root, 1))
    log(f"{dataset}: {len(ds.x_train)} train / {len(ds.x_test)} test images; "
        f"{atk.name} poisons {len(poisoned.indices)} ({ratio:.1%}), target {target}; "
        f"{mdl.name}: training {train_config.epochs} epochs")
    t0 = time.perf_counter()
    state, history = train(mdl, poisoned.x, poisoned.y, train_config,
                           jax.random.fold_in(root, 2), flip=ds.flip, progress=progress)
    seconds = time.perf_counter() - t0
    scores = evaluate(mdl, state, attacks.test_set(atk, ds.x_test, ds.y_test, ds.num_classes))
    meta = {
        "dataset": {"name": ds.name, "num_classes": ds.num_classes, "load": load_args,
                    "n_train": len(ds.x_train), "n_test": len(ds.x_test)},
        "attack": atk.config, "poison_ratio": ratio, "target": target,
        "n_poisoned": int(len(poisoned.indices)), "seed": seed,
        "train": {**dataclasses.asdict(train_config), "seconds": round(seconds, 2),
                  "final_loss": history[-1]["loss"], "final_train_acc": history[-1]["acc"]},
        **scores, "device": device_name(),
    }
    checkpoint.save(out, mdl, state, meta, overwrite=overwrite)
    return checkpoint.load_metadata(out)


# -------------------------------------------------------------------------------- defense
def _report_row(reports: dict, i: int) -> dict:
    return {k: _jsonable(np.asarray(v)[i]) for k, v in reports.items()}


def run_defense_on_checkpoint(checkpoint_dir, defense: str, *, overrides: dict | None = None,
                              spc: int | None = None, ratio: float | None = None,
                              trials: int | Iterable[int] = 5, seed: int = 0, out=None,
                              strategy: str = "vmap", log=print) -> list[dict]:
    """Defends the checkpointed model over trials; returns (and appends) result rows.

    Rows already present in ``out`` (same checkpoint, setting, seed and trial) are
    skipped, so an interrupted run resumes where it stopped.
    """
    model, state, meta = checkpoint.restore(checkpoint_dir)
    ds = dataset_from_meta(meta)
    atk = attack_from_meta(meta, ds.num_classes)
    test = attacks.test_set(atk, ds.x_test, ds.y_test, ds.num_classes)
    from bdjax import defenses

    dfn = defenses.for_run(defense, overrides, dataset=ds.name, model=model.name,
                           flip=ds.flip)
    trial_ids = list(range(trials)) if isinstance(trials, int) else list(trials)
    if not trial_ids:
        raise BdjaxError("trials is empty; accepted: at least one trial.")
    base = {
        "checkpoint": str(pathlib.Path(checkpoint_dir).resolve()), "dataset": ds.name,
        "model": model.name, "attack": atk.name, "poison_ratio": meta.get("poison_ratio"),
        "target": atk.target, "defense": dfn.name, "settings": dfn.settings, "spc": spc,
        "ratio": ratio, "seed": seed,
    }
    done = {row_key(r) for r in read_rows(out)} if out else set()
    todo = [t for t in trial_ids if row_key({**base, "trial": t}) not in done]
    if not todo:
        log(f"all {len(trial_ids)} trials already in {out}; nothing to do")
        return []
    before = evaluate(model, state, test)
    split = split_for_trials(ds, todo, seed, spc=spc, ratio=ratio,
                             validation=dfn.uses_validation)
    if dfn.needs_trigger:
        split = dataclasses.replace(split, trigger=atk)
    keys = jnp.stack([jax.random.fold_in(trial_key(seed, t), 1) for t in todo])
    log(f"{dfn.name}: {len(todo)} trial(s), {split.x_train.shape[1]} train + "
        f"{split.x_val.shape[1]} val images each, strategy {strategy}")
    run = run_defense(model, state, dfn, split, keys, strategy=strategy)
    after = evaluate_trials(model, run.states, test)
    common = {"device": device_name(), "versions": versions(),
              "seconds_compile": round(run.seconds_compile, 3),
              "seconds_run": round(run.seconds_run / len(todo), 3),
              "seconds_run_batch": round(run.seconds_run, 3),
              "trials_batched": len(todo) if strategy == "vmap" else 1,
              "strategy": strategy, "n_train": int(split.x_train.shape[1]),
              "n_val": int(split.x_val.shape[1])}
    rows = []
    for i, t in enumerate(todo):
        scores = metrics.summary(before, {k: float(v[i]) for k, v in after.items()})
        rows.append({**base, "trial": t, **common,
                     **{f"{k}_before": v for k, v in before.items()}, **scores,
                     "report": _report_row(run.reports, i)})
    if out:
        append_rows(out, rows)
    return rows


# ---------------------------------------------------------------------------------- table
def table(rows: list[dict]) -> str:
    """Mean and std over trials of ACC/ASR/RA before and after, DER, ARR and RDR, per
    (attack, defense, setting), with the run seconds per trial (the batch's run time over
    its trials)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        setting = f"spc={r['spc']}" if r.get("spc") is not None else f"ratio={r.get('ratio')}"
        groups.setdefault((r.get("attack", "?"), f"{r['defense']} {setting}"), []).append(r)
    head = ["attack", "defense", "trials", "ACC before", "ASR before", "RA before", "ACC",
            "ASR", "RA", "DER", "ARR", "RDR", "s/trial"]
    lines = [head]
    for (attack, name), rs in groups.items():
        cells = [attack, name, str(len(rs))]
        for k in ("acc_before", "asr_before", "ra_before", "acc", "asr", "ra", "der", "arr",
                  "rdr"):
            vals = np.array([np.nan if r.get(k) is None else r[k] for r in rs], float)
            mean, std = metrics.mean_std(vals)
            cells.append(f"{100 * float(mean):5.1f} ± {100 * float(std):4.1f}")
        secs = [r["seconds_run"] for r in rs if r.get("seconds_run") is not None]
        cells.append(f"{np.mean(secs):.1f}" if secs else "-")
        lines.append(cells)
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    fmt = lambda l: "| " + " | ".join(c.ljust(w) for c, w in zip(l, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), sep] + [fmt(l) for l in lines[1:]])
