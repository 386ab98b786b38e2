"""``bdjax sweep --plan``: the grid's cells, what is done, and what the rest will cost.

The cost is projected from ``bdjax bench`` JSONs (``benchmarks/results/``): those
measured on this device, each figure from the newest file that has it, and the same
for the newest GPU when this device is not a GPU (the project's performance claim is the
survey grid on a GPU). Per defense cell:

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


def for_device(device: str, folder=RESULTS) -> list[pathlib.Path]:
    """The bench JSONs measured on ``device``, newest first."""
    return [p for _, d, p in reversed(_benches(folder)) if d == device]


def for_gpus(folder=RESULTS) -> list[pathlib.Path]:
    """The bench JSONs of the newest GPU among them, newest first."""
    gpus = [d for _, d, _ in reversed(_benches(folder)) if not d.startswith("cpu")]
    return for_device(gpus[0], folder) if gpus else []


class Costs:
    """Seconds of grid cells from bench JSONs: the first file's figures, then each
    later file's for what the earlier ones lack (pass the newest first)."""

    def __init__(self, paths):
        paths = [pathlib.Path(p) for p in (paths if isinstance(paths, (list, tuple))
                                           else [paths])]
        self.path = paths[0]
        self.names = [p.name for p in paths]
        self.device = None
        self.ips, self.single = {}, {}
        self.scaling: dict[tuple, dict[int, float]] = {}
        for path in paths:
            doc = json.loads(path.read_text())
            self.device = self.device or doc["machine"]["device"]
            for m, u in doc.get("units", {}).items():
                ips = u.get("float32", {}).get("train_step", {}).get("images_per_second")
                self.ips.setdefault(m, ips)
            for r in doc.get("defenses", []):
                self.single.setdefault((r["model"], r["defense"]),
                                       {**r, "n_train": doc["profile"]["n_train"]})
            scaling: dict[tuple, dict[int, float]] = {}
            for r in doc.get("scaling", []):
                if r.get("layout", "vmap") != "vmap":  # the runner's default layout
                    continue
                scaling.setdefault((r["model"], r["defense"]), {})[r["trials"]] = \
                    r["seconds"]["median"]
            for k, v in scaling.items():
                self.scaling.setdefault(k, v)

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
        seconds *= n_cell / r["n_train"]
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
    if seconds < 360:
        return f"{seconds:,.0f} s"
    return f"{seconds / 60:,.0f} min" if seconds < 7200 else f"{seconds / 3600:,.1f} h"


def projection(grid: Grid, out, paths) -> list[str]:
    costs = Costs(paths)
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
    lines = [f"projected on {costs.device} (from {', '.join(costs.names)}): "
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
    sets = [[pathlib.Path(bench)]] if bench else [for_device(here)]
    if not bench and not here.startswith(("gpu", "cuda", "tpu")):
        sets.append(for_gpus())
    if not bench and not sets[0]:
        lines.append(f"no benchmark JSON for this device ({here}) under {RESULTS}: run "
                     "`bdjax bench` for a projection")
    if not bench and len(sets) > 1 and not sets[1]:
        lines.append("no GPU benchmark JSON yet: no GPU projection")
    for paths in [p for p in sets if p]:
        if todo:
            lines += projection(grid, out, paths)
    return "\n".join(lines)


__all__ = ["Costs", "for_device", "for_gpus", "plan"]
