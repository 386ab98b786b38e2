"""Does a defense setting meet issue 8's bar on given checkpoints?

    python benchmarks/defense_check.py CKPT [CKPT ...] --defense npd --spc 100 \
        [--trials 3] [--config synthetic|none|FILE] [--set lr=0.003 ...] [--out rows.jsonl]

For every checkpoint it runs the defense over ``--trials`` vmapped trials with the
settings a ``bdjax defend`` run would use (the config's overrides, then ``--set``;
``--config none`` for the reference settings alone) and prints mean ACC/ASR before and
after; the last line says whether every checkpoint's mean ASR is at most half of its
value before while its mean ACC drops by less than 10 points. This is how the
synthetic config's settings were chosen (``configs/synthetic.py`` lists the results).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bdjax import checkpoint, config, experiment, records
from bdjax.cli import _key_values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--defense", required=True)
    p.add_argument("--spc", type=int, default=100)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None, help="a config name or file; 'none': reference")
    p.add_argument("--set", action="append", metavar="NAME=VALUE")
    p.add_argument("--out", help="append the rows to this JSONL file")
    args = p.parse_args(argv)
    ok = True
    for ckpt in args.checkpoints:
        meta = checkpoint.load_metadata(ckpt)
        if args.config == "none":
            overrides = {}
        else:
            cfg = config.load(args.config, dataset=meta["dataset"]["name"])
            overrides = dict(cfg["defenses"].get(args.defense, {}))
        overrides.update(_key_values(args.set, "--set"))
        rows = experiment.run_defense_on_checkpoint(
            ckpt, args.defense, overrides=overrides, spc=args.spc, trials=args.trials,
            seed=args.seed, log=lambda m: None)
        if args.out:
            records.append_rows(args.out, rows)
        acc = np.mean([r["acc"] for r in rows])
        asr = np.mean([r["asr"] for r in rows])
        acc0, asr0 = rows[0]["acc_before"], rows[0]["asr_before"]
        good = asr <= asr0 / 2 and acc0 - acc < 0.10
        ok &= bool(good)
        per = " ".join(f"{r['acc']:.3f}/{r['asr']:.3f}" for r in rows)
        print(f"{ckpt}: ACC {acc0:.3f} -> {acc:.3f}  ASR {asr0:.3f} -> {asr:.3f}  "
              f"[{per}]  {'ok' if good else 'FAILS'}  ({rows[0]['seconds_run']:.1f} s/trial)",
              flush=True)
    print(f"{args.defense} spc={args.spc} {' '.join(args.set or [])}: "
          f"{'meets' if ok else 'does not meet'} the bar on every checkpoint")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
