"""``bdjax sweep --plan``: the grid's cells, what is done, and what the rest will cost.

The cost is projected from a ``bdjax bench`` JSON (``benchmarks/results/``): the newest
one measured on this device, plus the newest GPU one when this device is not a GPU (the
project's performance claim is the survey grid on a GPU). Per defense cell:

    seconds = per-trial seconds of (model, defense) in the bench
              x images trained on (cell / bench) x epochs (cell / bench, where both
                have an ``epochs`` setting)
              x T-scaling: time(T) / time(1) from the bench's trial-scaling runs,
                interpolated (linear in T; the largest T's per-trial cost beyond it)

and per backdoored model still to train: epochs x training images / the model's
training-step images/s. A model whose defenses the bench did not time is scaled from
one that it did by the ratio of their training-step speeds (said so in the output).
These are estimates: data-dependent stops (Grad-Prune's rounds, NPD's warm-up) and
evaluation are not modelled.
"""

from __future__ import annotations

import json
import pathlib

from bdjax import data, records
from bdjax.grid import DefenseCell, Grid
from bdjax.sweep import is_trained, pending

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _benches(folder=RESULTS) -> list[tuple[str, str, pathlib.Path]]:
    """(created, device, path) of every bench JSON under ``folder``, oldest first."""
    out = []
    for path in pathlib.Path(folder).glob("*.json"):
        try:
            doc = json.loads(path.read_text())
            out.append((doc["created"], doc["machine"]["device"], path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(out)


def newest(device: str, folder=RESULTS) -> pathlib.Path | None:
    hits = [p for _, d, p in _benches(folder) if d == device]
    return hits[-1] if hits else None


def newest_gpu(folder=RESULTS) -> pathlib.Path | None:
    hits = [p for _, d, p in _benches(folder) if not d.startswith("cpu")]
    return hits[-1] if hits else None


class Costs:
    """Seconds of grid cells from one bench JSON."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        doc = json.loads(self.path.read_text())
        self.device = doc["machine"]["device"]
        self.n_bench = doc["profile"]["n_train"]
        self.ips = {m: u.get("float32", {}).get("train_step", {}).get("images_per_second")
                    for m, u in doc.get("units", {}).items()}
        self.single = {(r["model"], r["defense"]): r for r in doc.get("defenses", [])}
        self.scaling: dict[tuple, dict[int, float]] = {}
        for r in doc.get("scaling", []):
            if r.get("layout", "vmap") != "vmap":  # the runner's default layout
                continue
            self.scaling.setdefault((r["model"], r["defense"]), {})[r["trials"]] = \
                r["seconds"]["median"]

    def _per_trial_fraction(self, model: str, defense: str, trials: int) -> float:
        """time(T) / (T time(1)) from the scaling runs (1 where there are none)."""
        s = self.scaling.get((model, defense), {})
        if 1 not in s or len(s) < 2:
            return 1.0
        pts = sorted((t, s[t] / (t * s[1])) for t in s)
        if trials >= pts[-1][0]:
            return pts[-1][1]
        for (t0, f0), (t1, f1) in zip(pts, pts[1:]):
            if t0 <= trials <= t1:
                return f0 + (f1 - f0) * (trials - t0) / (t1 - t0)
        return pts[0][1]

    def defense_seconds(self, cell: DefenseCell, trials: int) -> tuple[float | None, str]:
        """(projected seconds of ``trials`` trials of ``cell``, how it was derived)."""
        model, name = cell.attack.model, cell.defense
        how = "measured"
        ref = model
        if (model, name) not in self.single:
            others = [m for (m, d) in self.single if d == name and self.ips.get(m)]
            if not others or not self.ips.get(model):
                return None, "not in the bench"
            ref, how = others[0], f"scaled from {others[0]} by training-step speed"
        r = self.single[(ref, name)]
        seconds = r["seconds_per_trial"]
        if ref != model:
            seconds *= self.ips[ref] / self.ips[model]
        info = data.info(cell.attack.dataset, **json.loads(cell.attack.dataset_args))
        n_cell = (cell.spc * info["num_classes"] if cell.spc is not None
                  else cell.ratio * info["n_train"])
        seconds *= n_cell / self.n_bench
        settings = cell.resolved().settings
        if "epochs" in settings and r["settings"].get("epochs"):
            seconds *= settings["epochs"] / r["settings"]["epochs"]
        return seconds * trials * self._per_trial_fraction(ref, name, trials), how

    def attack_seconds(self, acell) -> float | None:
        ips = self.ips.get(acell.model)
        if not ips:
            return None
        info = data.info(acell.dataset, **json.loads(acell.dataset_args))
        return acell.train_config().epochs * info["n_train"] / ips


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 360 else f"{seconds:,.0f} s"


def projection(grid: Grid, out, path) -> list[str]:
    costs = Costs(path)
    todo = pending(grid, out)
    per: dict[tuple[str, str], list] = {}
    unknown = set()
    for t in todo:
        s, how = costs.defense_seconds(t.cell, len(t.trials))
        key = (t.cell.attack.model, t.cell.defense)
        if s is None:
            unknown.add(key)
            continue
        acc = per.setdefault(key, [0.0, 0, how])
        acc[0] += s
        acc[1] += len(t.trials)
    needed = {t.cell.attack for t in todo}
    train = [costs.attack_seconds(a) for a in needed if not is_trained(out, a)]
    train_s = sum(s for s in train if s is not None)
    defense_s = sum(v[0] for v in per.values())
    lines = [f"projected on {costs.device} (from {costs.path.name}): "
             f"{_hours(train_s + defense_s)} of device time = attack training "
             f"{_hours(train_s)} ({len(train)} models) + defenses {_hours(defense_s)}"]
    lines.append("  | model | defense | trials | projected | seconds/trial | from |")
    lines.append("  |---|---|---|---|---|---|")
    for (model, name), (s, n, how) in sorted(per.items()):
        lines.append(f"  | {model} | {name} | {n} | {_hours(s)} | {s / n:,.1f} | {how} |")
    if unknown:
        lines.append("  not in the bench (no projection): "
                     + ", ".join(f"{m} {d}" for m, d in sorted(unknown)))
    if any(s is None for s in train):
        lines.append("  some models have no training-step figure (attack training not "
                     "projected)")
    return lines


def plan(grid: Grid, out, *, bench: str | None = None) -> str:
    """What ``bdjax sweep --plan`` prints."""
    todo = pending(grid, out)
    trained = sum(is_trained(out, a) for a in grid.attack_cells)
    sh = grid.shape
    lines = [
        f"grid: {sh['datasets']} datasets x {sh['models']} models x {sh['attacks']} attacks "
        f"x {sh['poison_ratios']} poisoning ratios x {sh['targets']} targets x "
        f"{sh['attack_seeds']} attack seeds = {len(grid.attack_cells)} backdoored models "
        f"({trained} trained)",
        f"      x {sh['defenses']} defenses x {sh['defender_settings']} defender-data "
        f"settings = {len(grid.cells)} cells of {sh['trials']} trials = "
        f"{len(grid.cells) * sh['trials']:,} defense runs",
        f"done: {len(grid.cells) - len(todo)} cells; to run: {len(todo)} cells "
        f"({sum(len(t.trials) for t in todo):,} trials) in {pathlib.Path(out)}",
    ]
    for kind in ("attacks", "defenses"):
        if grid.unavailable.get(kind):
            lines.append(f"not yet available in bdjax ({kind}, skipped): "
                         + ", ".join(grid.unavailable[kind]))
    here = records.device_name()
    paths = [pathlib.Path(bench)] if bench else [newest(here)]
    if not bench and not here.startswith(("gpu", "cuda", "tpu")):
        paths.append(newest_gpu())
    if not bench and paths[0] is None:
        lines.append(f"no benchmark JSON for this device ({here}) under {RESULTS}: run "
                     "`bdjax bench` for a projection")
    if not bench and len(paths) > 1 and paths[1] is None:
        lines.append("no GPU benchmark JSON yet: no GPU projection")
    for path in [p for p in paths if p is not None]:
        if todo:
            lines += projection(grid, out, path)
    return "\n".join(lines)


__all__ = ["Costs", "newest", "newest_gpu", "plan"]
