"""``bdjax sweep``: a benchmark grid as one resumable command.

    bdjax sweep sweep_smoke --out runs/smoke            # the grid on the embedded data
    bdjax sweep survey_cifar10 --out runs/survey --plan # cells, done, projected cost
    bdjax sweep survey_cifar10 --out runs/survey --engine ray --address auto

The sweep directory holds ``checkpoints/<cell name>/`` (one backdoored model per attack
cell, trained once and reused by every defense cell; :mod:`bdjax.checkpoint` writes it
atomically, so a half-written one never exists under that name) and ``results.jsonl``
(one row per trial, appended durably by :mod:`bdjax.records`).

Resume: a trial whose row key is already in ``results.jsonl`` is never run again, so a
rerun of the same command skips finished cells without training or compiling anything
for them; a run killed at any moment (``kill -9`` included) loses no finished cell and
writes none twice; a changed grid keeps the rows of the cells it still has (rows of
cells no longer in it stay in the file, unused).

Engines: ``local`` runs the cells in this process, each cell's trials as one compiled
call spread over every local device (:mod:`bdjax.runner`). ``ray`` sends attack cells
and then defense cells as Ray tasks (each asks for one GPU where the cluster has GPUs),
retried by Ray if their worker dies; the driver alone writes ``results.jsonl``. With
Ray the sweep directory must be on storage every node reads (the checkpoints are
shared through it).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import Iterable

from bdjax import checkpoint, experiment, records
from bdjax.errors import BdjaxError, check_choice
from bdjax.grid import AttackCell, DefenseCell, Grid

ENGINES = ("local", "ray")
RESULTS = "results.jsonl"


@dataclasses.dataclass(frozen=True)
class Todo:
    """A defense cell and the trials of it that have no row yet."""

    cell: DefenseCell
    trials: tuple[int, ...]


def results_path(out) -> pathlib.Path:
    return pathlib.Path(out) / RESULTS


def checkpoint_dir(out, acell: AttackCell) -> pathlib.Path:
    return pathlib.Path(out) / acell.checkpoint_id


def is_trained(out, acell: AttackCell) -> bool:
    try:
        checkpoint.load_metadata(checkpoint_dir(out, acell))
        return True
    except BdjaxError:
        return False


def pending(grid: Grid, out) -> list[Todo]:
    """The cells with trials still to run, in grid order."""
    done = {records.row_key(r) for r in records.read_rows(results_path(out))}
    todo = []
    for cell in grid.cells:
        left = tuple(t for t, k in cell.row_keys().items() if k not in done)
        if left:
            todo.append(Todo(cell, left))
    return todo


# ----------------------------------------------------------------------- one cell each
def train_attack_cell(out, acell: AttackCell, log=print) -> str:
    """Trains and checkpoints ``acell`` unless its checkpoint exists; returns its path.

    A directory of that name that is not a complete checkpoint (it cannot be: saves
    are atomic, but a user may have put something there) is an error, never reused.
    """
    path = checkpoint_dir(out, acell)
    if is_trained(out, acell):
        return str(path)
    if path.exists() and any(path.iterdir()):
        raise BdjaxError(f"{path} exists but is not a complete bdjax checkpoint; refusing "
                         "to reuse or replace it; accepted: remove it, and the sweep "
                         "trains that model again.")
    experiment.run_attack(
        dataset=acell.dataset, model=acell.model, attack=acell.attack,
        ratio=acell.poison_ratio, target=acell.target, seed=acell.seed, out=path,
        train_config=acell.train_config(), attack_params=json.loads(acell.params),
        dataset_args=json.loads(acell.dataset_args), progress=False, log=log)
    return str(path)


def defend_cell(out, todo: Todo, *, bd: experiment.Backdoored | None = None,
                devices: int | None = None, log=print) -> list[dict]:
    """The rows of ``todo``'s trials (one compiled call), not yet written."""
    cell = todo.cell
    bd = bd or experiment.Backdoored.restore(checkpoint_dir(out, cell.attack))
    dfn = bd.defense(cell.defense, json.loads(cell.overrides))
    rows = experiment.defend(bd, dfn, spc=cell.spc, ratio=cell.ratio, trials=todo.trials,
                             seed=cell.seed, checkpoint_id=cell.attack.checkpoint_id,
                             devices=devices, log=log)
    keys = cell.row_keys()
    for row in rows:  # the grid and the run must agree on identity, or resume breaks
        if records.row_key(row) != keys[row["trial"]]:
            raise BdjaxError(f"cell {cell.label}: its rows' keys differ from the grid's "
                             "(checkpoint metadata does not match its cell); accepted: "
                             "checkpoints written by this sweep.")
    return rows


# ---------------------------------------------------------------------------- progress
class Progress:
    """A bar over the trials still to run (ETA included) and one line per finished
    cell (the lines also without the bar)."""

    def __init__(self, todo: list[Todo], enabled: bool = True):
        from tqdm.auto import tqdm

        self.cells, self.done_cells = len(todo), 0
        self.bar = tqdm(total=sum(len(t.trials) for t in todo), unit="trial",
                        desc=f"cells 0/{len(todo)}", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True)
        self.enabled = enabled

    def cell_done(self, todo: Todo, rows: list[dict], seconds: float) -> None:
        self.done_cells += 1
        self.bar.update(len(todo.trials))
        self.bar.set_description(f"cells {self.done_cells}/{self.cells}")
        mean = lambda k: sum(r[k] for r in rows) / len(rows)
        self.write(f"done {todo.cell.label}: ACC {mean('acc_before'):.3f} -> "
                   f"{mean('acc'):.3f}, ASR {mean('asr_before'):.3f} -> {mean('asr'):.3f} "
                   f"({len(rows)} trials, {seconds:.1f} s)")

    def write(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- engines
def _group(todo: Iterable[Todo]) -> dict[AttackCell, list[Todo]]:
    groups: dict[AttackCell, list[Todo]] = {}
    for t in todo:
        groups.setdefault(t.cell.attack, []).append(t)
    return groups


def run_local(out, todo: list[Todo], progress: Progress, devices: int | None = None) -> int:
    """Runs ``todo`` in this process, attack cell by attack cell; returns rows written."""
    written = 0
    for acell, cells in _group(todo).items():
        if not is_trained(out, acell):
            progress.write(f"training {acell.name}")
        train_attack_cell(out, acell, log=progress.write)
        bd = experiment.Backdoored.restore(checkpoint_dir(out, acell))
        for t in cells:
            t0 = time.perf_counter()
            rows = defend_cell(out, t, bd=bd, devices=devices, log=_quiet)
            records.append_rows(results_path(out), rows)
            written += len(rows)
            progress.cell_done(t, rows, time.perf_counter() - t0)
    return written


def run_ray(out, todo: list[Todo], progress: Progress, address: str | None = None) -> int:
    """Runs ``todo`` as Ray tasks: first the missing checkpoints, then the defense cells;
    rows come back to this driver, which alone appends them."""
    try:
        import ray
    except ImportError:
        raise BdjaxError("--engine ray needs Ray, which is not installed; accepted: "
                         "pip install 'bdjax[ray]', or --engine local.") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    out = str(pathlib.Path(out).resolve())
    train = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=3)(train_attack_cell)
    defend = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=3)(_ray_defend)
    groups = _group(todo)
    trained = {a: train.remote(out, a, log=_quiet) for a in groups if not is_trained(out, a)}
    if trained:
        progress.write(f"training {len(trained)} checkpoint(s) as Ray tasks")
    ray.get(list(trained.values()))
    running = {defend.remote(out, t): (t, time.perf_counter()) for t in todo}
    written = 0
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        t, t0 = running.pop(ready[0])
        rows = ray.get(ready[0])
        records.append_rows(results_path(out), rows)
        written += len(rows)
        progress.cell_done(t, rows, time.perf_counter() - t0)
    return written


def _quiet(_):
    return None


def _ray_defend(out, todo: Todo) -> list[dict]:
    return defend_cell(out, todo, log=_quiet)


def run(grid: Grid, out, *, engine: str = "local", address: str | None = None,
        devices: int | None = None, progress: bool = True, log=print) -> dict:
    """Runs every pending cell of ``grid`` into ``out``; returns counts."""
    check_choice("engine", engine, ENGINES)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = pending(grid, out)
    done_cells = len(grid.cells) - len(todo)
    log(f"{len(grid.cells)} cells: {done_cells} done, {len(todo)} to run "
        f"({sum(len(t.trials) for t in todo)} trials) -> {out}")
    bar = Progress(todo, enabled=progress)
    t0 = time.perf_counter()
    try:
        if engine == "local":
            written = run_local(out, todo, bar, devices=devices)
        else:
            written = run_ray(out, todo, bar, address=address)
    finally:
        bar.close()
    return {"cells": len(grid.cells), "skipped": done_cells, "ran": len(todo),
            "rows": written, "seconds": round(time.perf_counter() - t0, 1)}


__all__ = ["ENGINES", "RESULTS", "Todo", "checkpoint_dir", "defend_cell", "pending", "run",
           "train_attack_cell"]
