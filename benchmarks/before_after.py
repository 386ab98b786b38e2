"""Side-by-side table of two result files of the same grid (e.g. before/after a change).

    python benchmarks/before_after.py BEFORE.jsonl AFTER.jsonl [--labels before after]

One row per (attack, defense, defender data): mean ACC and ASR (in %, over every trial
of every checkpoint) of each file, and, per file, whether EVERY checkpoint's mean ASR is
at most half of its value before the defense with a mean ACC drop under 10 points
("yes"), as issue 8 asks of the seed defenses at SPC 100.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys

import numpy as np

from bdjax.experiment import read_rows


def _setting(r: dict) -> str:
    return f"spc {r['spc']}" if r.get("spc") is not None else f"ratio {r.get('ratio')}"


def summarise(rows: list[dict]) -> dict:
    """(attack, defense, setting) -> (mean acc, mean asr, bar met on every checkpoint,
    number of checkpoints, trials)."""
    cells: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
        cells[(r["attack"], r["defense"], _setting(r))][r["checkpoint"]].append(r)
    out = {}
    for key, per_ckpt in cells.items():
        every = [x for rs in per_ckpt.values() for x in rs]
        ok = all(np.mean([x["asr"] for x in rs]) <= rs[0]["asr_before"] / 2
                 and rs[0]["acc_before"] - np.mean([x["acc"] for x in rs]) < 0.10
                 for rs in per_ckpt.values())
        out[key] = (np.mean([x["acc"] for x in every]), np.mean([x["asr"] for x in every]),
                    ok, len(per_ckpt), len(every),
                    np.mean([x["acc_before"] for x in every]),
                    np.mean([x["asr_before"] for x in every]))
    return out


def table(files: list[str], labels: list[str]) -> str:
    sums = [summarise(read_rows(f)) for f in files]
    keys = sorted(set().union(*sums), key=lambda k: (k[0], k[1], int(k[2].split()[-1])
                                                     if k[2].startswith("spc") else 0))
    head = ["attack", "defense", "data", "ACC/ASR before defense"]
    for lab in labels:
        head += [f"{lab}: ACC", f"{lab}: ASR", f"{lab}: halves ASR, ACC -<10"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        base = next(s[k] for s in sums if k in s)
        cells = [*k, f"{100 * base[5]:.1f} / {100 * base[6]:.1f}"]
        for s in sums:
            if k in s:
                acc, asr, ok, n_ckpt, n, *_ = s[k]
                cells += [f"{100 * acc:.1f}", f"{100 * asr:.1f}",
                          f"{'yes' if ok else 'no'} ({n_ckpt} ckpt, {n} runs)"]
            else:
                cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--labels", nargs="+")
    args = p.parse_args(argv)
    labels = args.labels or [pathlib.Path(f).stem for f in args.files]
    if len(labels) != len(args.files):
        p.error("--labels needs one label per file")
    print(table(args.files, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
