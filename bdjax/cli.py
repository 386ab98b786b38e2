"""The ``bdjax`` command: a thin layer over the library.

    bdjax attack --dataset synthetic --model small_cnn --attack badnets --ratio 0.1 \
        --target 0 --seed 0 --out DIR
    bdjax defend --checkpoint DIR --defense ft --spc 10 --trials 5 --seed 0 --out results.jsonl
    bdjax info DIR
    bdjax table results.jsonl
    bdjax sweep sweep_smoke --out runs/sweep [--plan] [--engine ray]
    bdjax report runs/sweep/results.jsonl --out runs/sweep/report
    bdjax demo

Bad input ends with one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys
import time


def _key_values(items: list[str] | None, what: str) -> dict:
    """Parses ``k=v`` pairs; values are Python literals where they parse, else strings."""
    from bdjax.errors import BdjaxError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise BdjaxError(f"{what} {item!r} is not NAME=VALUE; accepted: e.g. epochs=20.")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bdjax", description=(
        "Backdoor attacks and defenses for image classifiers in JAX: plant a backdoor, "
        "remove it over many vmapped trials, measure ACC/ASR/RA."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("attack", help="poison a dataset, train a backdoored model, checkpoint it")
    a.add_argument("--dataset", help="synthetic (default) or cifar10 (default: the config's)")
    a.add_argument("--model", help="small_cnn, preact_resnet18, vgg19_bn (default: the "
                   "config's: small_cnn for synthetic, preact_resnet18 for cifar10)")
    a.add_argument("--attack", default="badnets",
                   help="badnets (default), blended, sig, lf, ssba, trojan, lc (poisoned "
                   "data), wanet, bpp, iab (poisoned per batch during training)")
    a.add_argument("--ratio", type=float, default=0.1, help="poisoning ratio (default 0.1)")
    a.add_argument("--target", type=int, default=0, help="target label (default 0)")
    a.add_argument("--mode", default="all_to_one", help="all_to_one (default) or all_to_all")
    a.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="trigger parameter, e.g. alpha=0.1 or (blended) image=PATH "
                   "(repeatable)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", required=True, help="checkpoint directory to write")
    a.add_argument("--resources", metavar="DIR",
                   help="where generated attack resources (clean/robust models, LF and "
                   "Trojan patterns, LC images, SSBA encoder) are cached and reused "
                   "(default: resources/ beside --out)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    a.add_argument("--epochs", type=int, help="training epochs (default: dataset config)")
    a.add_argument("--lr", type=float, help="learning rate (default: dataset config)")
    a.add_argument("--batch-size", type=int, help="batch size (default: dataset config)")
    a.add_argument("--config", help="a shipped config name (e.g. survey_cifar10) or a "
                   "Python file (default: the dataset's config)")
    a.add_argument("--smoke", action="store_true", help="tiny settings for a quick check")
    a.add_argument("--data-dir", help="where prepared datasets live (cifar10)")
    a.add_argument("--data-archive", help="local cifar-10-binary.tar.gz (cifar10)")
    a.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    d = sub.add_parser("defend", help="run a defense over trials on a checkpoint, record rows")
    d.add_argument("--checkpoint", required=True, help="directory written by `bdjax attack`")
    d.add_argument("--defense", required=True, help="defense name, e.g. ft")
    g = d.add_mutually_exclusive_group(required=True)
    g.add_argument("--spc", type=int, help="defender samples per class (2, 10, 100)")
    g.add_argument("--ratio", type=float, help="defender fraction of the training set (0.05)")
    d.add_argument("--trials", type=int, default=5, help="number of trials (default 5)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True, help="JSONL file to append result rows to")
    d.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="defense setting override, e.g. epochs=20 (repeatable)")
    d.add_argument("--strategy", default="vmap", help="vmap (default; over every local "
                   "device), map (trials in sequence in one program) or sequential")
    d.add_argument("--config", help="a shipped config name (e.g. survey_cifar10) or a "
                   "Python file (default: the checkpoint's dataset's config)")
    d.add_argument("--smoke", action="store_true", help="tiny settings for a quick check")

    i = sub.add_parser("info", help="print a checkpoint's metadata")
    i.add_argument("directory")

    t = sub.add_parser("table", help="mean/std table of result rows (JSONL files)")
    t.add_argument("files", nargs="+", help="JSONL files written by `bdjax defend`")

    w = sub.add_parser("sweep", help="run a benchmark grid (a config's sweep section): "
                       "checkpoints trained once, resumable, every local device or Ray")
    w.add_argument("config", help="a shipped config name (sweep_smoke, survey_cifar10) or a "
                   "Python file whose get_config returns a 'sweep' section")
    w.add_argument("--out", required=True, help="sweep directory (checkpoints/, "
                   "results.jsonl)")
    w.add_argument("--plan", action="store_true", help="print the cells, how many are "
                   "done and the projected cost of the rest; run nothing")
    w.add_argument("--engine", default="local", help="local (default) or ray")
    w.add_argument("--address", help="Ray cluster address (--engine ray; default: start "
                   "a local Ray instance)")
    w.add_argument("--devices", type=int, help="local devices a cell's trials are spread "
                   "over (default: all)")
    w.add_argument("--bench", help="benchmark JSON for --plan's projection (default: the "
                   "newest under benchmarks/results/ for this device)")
    w.add_argument("--smoke", action="store_true", help="the config's tiny settings")
    w.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    r = sub.add_parser("report", help="report.md with the survey's figures (box plots, "
                       "ACC-vs-ASR), and row export, from result files")
    r.add_argument("files", nargs="+", help="JSONL files written by bdjax defend/sweep")
    r.add_argument("--out", required=True, help="directory for report.md and the figures")
    r.add_argument("--format", action="append", choices=("csv", "parquet"),
                   help="also export the rows (repeatable)")

    b = sub.add_parser("bench", help="time models, defense units and whole defenses; "
                       "bdjax vs PyTorch; JSON under benchmarks/results/")
    b.add_argument("--quick", action="store_true",
                   help="small sizes: a few minutes on a CPU (default: the full run)")
    b.add_argument("--models", help="models of the units, comma-separated "
                   "(default: small_cnn,preact_resnet18,vgg19_bn)")
    b.add_argument("--defense-models", help="models whose defenses and trial scaling are "
                   "timed (default: all three; quick: small_cnn; '' for none)")
    b.add_argument("--defenses", help="defenses to time (default: all)")
    b.add_argument("--trials", help="trial counts of the scaling runs (default 1,2,4,8,16; "
                   "quick 1,2,5)")
    b.add_argument("--layouts", help="trial layouts of the scaling runs, comma-separated: "
                   "vmap (default), vmap-native, vmap-fold, map")
    b.add_argument("--dtypes", help="compute dtypes of the units, comma-separated: float32, "
                   "bfloat16 (default: float32 on CPU, both on accelerators)")
    b.add_argument("--repeats", type=int, help="timed runs per figure (default 5; quick 3)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    b.add_argument("--out", help="JSON path (default benchmarks/results/DATE-DEVICE.json)")

    m = sub.add_parser("demo", help="attack + defend on the embedded data, then a table")
    m.add_argument("--out-dir", default="runs/demo", help="where to write (default runs/demo)")
    m.add_argument("--trials", type=int, default=5)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--smoke", action="store_true", help="tiny settings (seconds)")
    m.add_argument("--no-progress", action="store_true")
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def attack_settings(args) -> tuple[str, str, dict, dict]:
    """(dataset, model, config, training settings) of ``bdjax attack``: flags win over
    the config (``--config``, else the dataset's shipped one), which wins over the
    defaults (synthetic data, small CNN)."""
    import dataclasses

    from bdjax import config
    from bdjax.errors import BdjaxError
    from bdjax.train import TrainConfig

    if args.config:
        cfg = config.load(args.config, smoke=args.smoke)
        dataset = args.dataset or cfg["dataset"] or "synthetic"
    else:
        dataset = args.dataset or "synthetic"
        cfg = config.load(None, dataset=dataset, smoke=args.smoke)
    from bdjax import attacks

    config.check_attack_names(cfg, attacks.names())
    model = args.model or cfg["model"] or "small_cnn"
    flags = (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size))
    train = {**cfg["train"], **cfg["attack_train"].get(args.attack, {}),
             **{k: v for k, v in flags if v is not None}}
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    for k in train:
        if k not in fields:
            raise BdjaxError(f"unknown training setting {k!r} in the config; accepted: "
                             f"{', '.join(fields)}.")
    return dataset, model, cfg, train


def _attack(args) -> None:
    from bdjax import experiment
    from bdjax.train import TrainConfig

    dataset, model, cfg, train = attack_settings(args)
    dataset_args = {**cfg["dataset_args"], "data_dir": args.data_dir,
                    "archive": args.data_archive}
    meta = experiment.run_attack(
        dataset=dataset, model=model, attack=args.attack, ratio=args.ratio,
        target=args.target, mode=args.mode, seed=args.seed, out=args.out,
        train_config=TrainConfig(**train),
        attack_params={**cfg["attacks"].get(args.attack, {}), **_key_values(args.param, "--param")},
        dataset_args=dataset_args, resources_dir=args.resources, overwrite=args.overwrite,
        progress=not args.no_progress, log=_log)
    print(f"saved {args.out}: clean ACC {meta['acc']:.4f}  ASR {meta['asr']:.4f}  "
          f"RA {meta['ra']:.4f}")


def _defend(args) -> list[dict]:
    from bdjax import checkpoint, config, experiment, report

    meta = checkpoint.load_metadata(args.checkpoint)
    cfg = config.load(args.config, dataset=meta["dataset"]["name"], smoke=args.smoke)
    overrides = {**cfg["defenses"].get(args.defense, {}), **_key_values(args.set, "--set")}
    if args.trials < 1:
        from bdjax.errors import BdjaxError

        raise BdjaxError(f"--trials {args.trials} is invalid; accepted: >= 1.")
    rows = experiment.run_defense_on_checkpoint(
        args.checkpoint, args.defense, overrides=overrides, spc=args.spc, ratio=args.ratio,
        trials=args.trials, seed=args.seed, out=args.out, strategy=args.strategy, log=_log)
    if rows:
        print(report.table(rows))
        print(f"{len(rows)} row(s) appended to {args.out} "
              f"(compile {rows[0]['seconds_compile']:.1f} s, "
              f"run {rows[0]['seconds_run_batch']:.1f} s for {len(rows)} trial(s))")
    return rows


def _table(args) -> None:
    from bdjax import report

    print(report.table(_rows_of(args.files)))


def _rows_of(files: list[str]) -> list[dict]:
    from bdjax import records
    from bdjax.errors import BdjaxError

    rows = []
    for f in files:
        if not pathlib.Path(f).is_file():
            raise BdjaxError(f"results file {f!r} does not exist; accepted: a JSONL file "
                             "written by `bdjax defend --out` or `bdjax sweep`.")
        rows += records.read_rows(f)
    if not rows:
        raise BdjaxError(f"no result rows in {' '.join(files)}; accepted: files with "
                         "rows written by `bdjax defend --out` or `bdjax sweep`.")
    return rows


def _sweep(args) -> None:
    from bdjax import config, grid, projection, sweep

    g = grid.expand(config.load(args.config, smoke=args.smoke))
    if args.plan:
        print(projection.plan(g, args.out, bench=args.bench))
        return
    counts = sweep.run(g, args.out, engine=args.engine, address=args.address,
                       devices=args.devices, progress=not args.no_progress, log=_log)
    print(f"sweep {args.config}: {counts['cells']} cells, {counts['skipped']} already done, "
          f"{counts['ran']} run ({counts['rows']} rows) in {counts['seconds']:.0f} s -> "
          f"{pathlib.Path(args.out) / sweep.RESULTS}")


def _report(args) -> None:
    from bdjax import report

    written = report.write(_rows_of(args.files), args.out, formats=args.format or ())
    for path in written:
        print(path)


def _demo(args) -> None:
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, results = out / "badnets", out / "results.jsonl"
    t0 = time.perf_counter()
    _log(f"[1/2] BadNets 10% on the synthetic data, small CNN -> {ckpt}")
    ns = argparse.Namespace
    _attack(ns(dataset="synthetic", model=None, attack="badnets", ratio=0.1, target=0,
               mode="all_to_one", param=None, seed=args.seed, out=str(ckpt), overwrite=True,
               epochs=None, lr=None, batch_size=None, config=None, smoke=args.smoke,
               data_dir=None, data_archive=None, resources=None,
               no_progress=args.no_progress))
    _log(f"[2/2] FT, SPC 10, {args.trials} vmapped trials -> {results}")
    if results.exists():
        results.unlink()  # the demo shows one fresh run, not an accumulation
    _defend(ns(checkpoint=str(ckpt), defense="ft", spc=10, ratio=None, trials=args.trials,
               seed=args.seed, out=str(results), set=None, strategy="vmap", config=None,
               smoke=args.smoke))
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from bdjax.errors import BdjaxError

    try:
        if args.command == "attack":
            _attack(args)
        elif args.command == "defend":
            _defend(args)
        elif args.command == "info":
            from bdjax import checkpoint

            print(checkpoint.describe(args.directory))
        elif args.command == "bench":
            from bdjax import bench

            bench.main(args)
        elif args.command == "table":
            _table(args)
        elif args.command == "sweep":
            _sweep(args)
        elif args.command == "report":
            _report(args)
        elif args.command == "demo":
            _demo(args)
    except BdjaxError as e:
        print(f"bdjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bdjax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
