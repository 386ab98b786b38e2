"""Compares two sweeps' result files row by row (same row keys, nothing twice, numbers).

    python benchmarks/sweep_compare.py runs/whole/results.jsonl runs/killed/results.jsonl

Prints how many rows each has, whether their row keys are the same set, duplicates,
and per metric the largest difference over matching rows (in test images when
``--n-test`` is given). Exit code 1 when the keys differ or a row is written twice.
"""

from __future__ import annotations

import argparse
import collections
import sys

from bdjax import records

METRICS = ("acc", "asr", "ra", "acc_before", "asr_before")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--n-test", type=int, help="test images, to express differences in")
    args = p.parse_args(argv)
    rows = {}
    for name in (args.a, args.b):
        rs = records.read_rows(name)
        counts = collections.Counter(records.row_key(r) for r in rs)
        twice = sum(c > 1 for c in counts.values())
        print(f"{name}: {len(rs)} rows, {len(counts)} keys, {twice} written twice, "
              f"devices {sorted({r.get('devices', 1) for r in rs})}")
        rows[name] = {records.row_key(r): r for r in rs}
    a, b = rows[args.a], rows[args.b]
    same = set(a) == set(b)
    print(f"same row keys: {same}" + ("" if same else
                                      f" ({len(set(a) - set(b))} only in a, "
                                      f"{len(set(b) - set(a))} only in b)"))
    for m in METRICS:
        diffs = [abs(a[k][m] - b[k][m]) for k in set(a) & set(b)]
        worst = max(diffs, default=0.0)
        unit = f" = {worst * args.n_test:.1f} test images" if args.n_test else ""
        print(f"  {m}: max |a - b| {worst:.4f}{unit}; equal in "
              f"{sum(d == 0 for d in diffs)}/{len(diffs)} rows")
    ok = same and all(len(r) == len(records.read_rows(n)) for n, r in rows.items())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
