"""The benchmark harness behind ``bdjax bench``: how fast bdjax is, and against what.

    bdjax bench --quick                  # a few minutes on a 2-core CPU
    bdjax bench                          # full: every model at the real shapes (GPU)
    bdjax bench --models preact_resnet18 --defenses npd,ft_sam --trials 1,4,16

What it measures, for each model on data of the real shapes (random uint8 images and
labels: timing must not depend on a download), every figure the median of ``repeats``
runs with its spread, compile time always apart from run time:

- **units**: one training step (images/s), one FT-SAM (ASAM) epoch, one NPD main-phase
  epoch (with its PGD), one Grad-Prune scoring round; each also in PyTorch
  (``benchmarks/torch_ref.py``) on the same device, data and batch size in the same
  process, giving the bdjax/PyTorch time ratio;
- **work**: FLOPs from the compiled program's ``cost_analysis()``. XLA counts a loop
  body once whatever its trip count, so a unit's FLOPs are its per-batch step's FLOPs
  times the number of batches (NPD's PGD loop counted at one iteration of its at most
  ``pgd_steps``); achieved TFLOP/s and the fraction of the device's peak, measured in
  the same run with a large matrix product;
- **defenses**: one whole run of every implemented defense at the REFERENCE settings
  (``--quick``: scaled down, recorded in the JSON), through the same compiled
  ``run_defense`` a user calls. Grad-Prune's data-dependent rounds and epochs are fixed
  (``rounds`` pruning rounds, ``epochs`` of fine-tuning, no early stop) so that every
  run does the same work;
- **trial scaling**: each defense with T vmapped trials (``--trials``), time(T)/time(1),
  in each trial layout of ``--layouts`` (:data:`LAYOUTS`): ``vmap`` (the runner's
  default), ``vmap-native`` (per-trial conv weights as grouped convolutions),
  ``vmap-fold`` (bdjax's trial-folding conv rule on every backend), ``map`` (the trials
  in sequence inside one program), so one run shows which layout the runner should use;
- **bf16**: the units run with bfloat16 compute and float32 parameters too (default on
  accelerators; on a CPU, which emulates bfloat16, only with ``--dtypes``).

Output: one JSON file (machine, device, versions, settings, every figure) under
``benchmarks/results/``, written atomically, and markdown tables on stdout.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import attacks, defenses, experiment, models, records
from bdjax.data import DefenseData
from bdjax.errors import BdjaxError, check_choice
from bdjax.kernels import SGDConfig, StepOptions, evaluate, sgd, to_unit, train_step
from bdjax.kernels.masks import ones_masks
from bdjax.kernels.sam import run_sam_epoch, sam_train_step
from bdjax.kernels.scores import flatten

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
UNITS = ("train_step", "ft_sam_epoch", "npd_epoch", "grad_prune_round")


@dataclasses.dataclass(frozen=True)
class Profile:
    """What one ``bdjax bench`` run measures.

    Attributes:
      models: models for the units (train step on all of them).
      defense_models: models whose whole defense runs and trial scaling are timed.
      n_train, n_val: defender images per trial (REFERENCE's timing anchor: 2,500).
      batch: batch size of every unit (PyTorch uses the same).
      repeats: timed runs per figure (after one warm-up run).
      steps_per_repeat: training steps per timed train-step run.
      trials: trial counts for the scaling runs.
      defense_overrides: settings of the whole defense runs (REFERENCE defaults when
        empty), per defense.
      scaling_overrides: settings of the trial-scaling runs (shorter: the ratio, not
        the length, is the figure).
      matmul: size of the square matrix product that measures the peak.
      layouts: trial layouts of the scaling runs (:data:`LAYOUTS`).
    """

    models: tuple[str, ...]
    defense_models: tuple[str, ...]
    n_train: int
    n_val: int
    batch: int
    repeats: int
    steps_per_repeat: int
    trials: tuple[int, ...]
    defense_overrides: dict
    scaling_overrides: dict
    matmul: int
    layouts: tuple[str, ...] = ("vmap",)


# Trial layouts (bdjax.runner): name -> (strategy, conv_rule). "vmap" is the runner's
# default (conv rule auto: fold on CPU, native elsewhere).
LAYOUTS = {"vmap": ("vmap", "auto"), "vmap-native": ("vmap", "native"),
           "vmap-fold": ("vmap", "fold"), "map": ("map", "auto")}

# Grad-Prune: fixed work (no data-dependent stop); NPD/FT-SAM/FT/FST: REFERENCE defaults.
_FULL_DEFENSES = {"grad_prune": dict(max_rounds=20, prune_patience=20, alpha=1.0,
                                     epochs=20, ft_patience=20)}
_SHORT = {"ft": dict(epochs=1), "fst": dict(epochs=1), "lp": dict(epochs=1),
          "fe_tuning": dict(epochs=1), "ft_init": dict(epochs=1),
          "ft_sam": dict(epochs=1), "npd": dict(epochs=1, warmup_epochs=1),
          "grad_prune": dict(max_rounds=2, prune_patience=2, alpha=1.0, epochs=1,
                             ft_patience=1),
          "fp": dict(epochs=1), "anp": dict(iterations=10),
          "rnp": dict(unlearn_epochs=1, recovery_epochs=1), "awm": dict(epochs=1),
          "mmbd": dict(epochs=1), "nad": dict(epochs=1, student_epochs=1),
          "pbe": dict(epochs=1), "ibau": dict(rounds=1), "sau": dict(epochs=1),
          "nc": dict(nc_epochs=1, nc_batch_size=64, nc_batches=1,
                                                 epochs=1)}

FULL = Profile(models=("small_cnn", "preact_resnet18", "vgg19_bn"),
               defense_models=("small_cnn", "preact_resnet18", "vgg19_bn"), n_train=2500,
               n_val=250,
               batch=128, repeats=5, steps_per_repeat=20, trials=(1, 2, 4, 8, 16),
               defense_overrides=_FULL_DEFENSES, scaling_overrides=_SHORT, matmul=8192)
QUICK = Profile(models=("small_cnn", "preact_resnet18", "vgg19_bn"),
                defense_models=("small_cnn",),
                n_train=256, n_val=32, batch=64, repeats=3, steps_per_repeat=2,
                trials=(1, 2, 5), defense_overrides=_SHORT, scaling_overrides=_SHORT,
                matmul=1024)  # same settings: the T=1 scaling run reuses the compile


# --------------------------------------------------------------------------------- timing
def spread(seconds: list[float]) -> dict:
    """Median, min, max and all samples of a list of seconds."""
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
            "samples": [round(s, 6) for s in seconds]}


def time_calls(fn: Callable[[], object], repeats: int) -> dict:
    """One warm-up call, then ``repeats`` timed calls; every call blocks on its result."""
    jax.block_until_ready(fn())
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return spread(out)


def compile_timed(fn: Callable, *args):
    """(executable, compile seconds, FLOPs of one call per XLA's cost analysis)."""
    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    return exe, time.perf_counter() - t0, flops(exe)


def flops(compiled) -> float | None:
    """FLOPs of a compiled program (loop bodies counted once, as XLA does)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends have no cost model
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    value = (cost or {}).get("flops")
    return float(value) if value is not None and value >= 0 else None


def step_flops(fn: Callable, *args) -> float | None:
    """FLOPs of one call of ``fn`` (compiled for the cost model only)."""
    return flops(jax.jit(fn).lower(*args).compile())


def peak(dtype: str, n: int, repeats: int) -> dict:
    """Measured matrix-product throughput (TFLOP/s) of ``n x n`` operands: the peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
    mm = jax.jit(lambda a, b: a @ b)
    t = time_calls(lambda: mm(a, b), max(repeats, 3))
    return {"dtype": dtype, "n": n, "seconds": t, "tflops": 2 * n ** 3 / t["median"] / 1e12}


# ----------------------------------------------------------------------------------- data
def bench_data(n: int, n_val: int, image_shape=(32, 32, 3), num_classes: int = 10,
               seed: int = 0):
    """Random uint8 images and labels of the real shapes, their BadNets-stamped copies,
    and a validation split; everything a unit or a defense run needs."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n + n_val, *image_shape), dtype=np.uint8)
    y = rng.integers(0, num_classes, (n + n_val,)).astype(np.int32)
    attack = attacks.get("badnets", target=0, num_classes=num_classes)
    x_trig = np.asarray(attack.stamp(jnp.asarray(x), jax.random.key(seed)))
    return dict(x=x[:n], y=y[:n], x_trig=x_trig[:n], x_val=x[n:], y_val=y[n:],
                x_val_trig=x_trig[n:], attack=attack)


def _model(name: str, dtype: str = "float32") -> models.Model:
    return models.get(name, num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                      dtype=dtype)


# ----------------------------------------------------------------------------------- units
def _train_step_unit(model, state, d, batch, steps):
    tx = sgd(SGDConfig(schedule="constant"), 1, 1)
    opts = StepOptions(augment=False)
    xb, yb = jnp.asarray(d["x"][:batch]), jnp.asarray(d["y"][:batch])

    def run(state, opt, key):
        def body(i, c):
            st, os_ = c
            st, os_, _, _ = train_step(model, tx, opts, st, os_, xb, yb,
                                       jax.random.fold_in(key, i))
            return st, os_
        return jax.lax.fori_loop(0, steps, body, (state, opt))

    one = lambda st, os_, key: train_step(model, tx, opts, st, os_, xb, yb, key)
    args = (state, tx.init(state["params"]), jax.random.key(0))
    f = step_flops(one, *args)
    return run, args, f * steps if f else None, steps * batch


def _ft_sam_unit(model, state, d, batch):
    from bdjax.defenses.ft_sam import FTSAMConfig

    cfg = FTSAMConfig(augment=False, schedule="constant", batch_size=batch)
    tx = sgd(cfg.sgd, 1, 1)
    opts = StepOptions(augment=False, label_smoothing=cfg.label_smoothing)
    x, y = jnp.asarray(d["x"]), jnp.asarray(d["y"])
    run = lambda st, os_, key: run_sam_epoch(model, tx, opts, cfg.rho, cfg.adaptive, batch,
                                             st, os_, x, y, key)
    args = (state, tx.init(state["params"]), jax.random.key(0))
    one = lambda st, os_, key: sam_train_step(model, tx, opts, cfg.rho, cfg.adaptive, st, os_,
                                              x[:batch], y[:batch], key)
    f = step_flops(one, *args)
    steps = -(-x.shape[0] // batch)
    return run, args, f * steps if f else None, x.shape[0]


def _npd_unit(model, state, d, batch):
    from bdjax.defenses import npd

    cfg = npd.NPDConfig(batch_size=batch, augment=False)
    tx = sgd(cfg.sgd, 1, 1)
    x, y = jnp.asarray(d["x"]), jnp.asarray(d["y"])
    state = {**state, "polariser": npd.init_polariser(model)}
    main = lambda st, os_, xb, yb, k: npd._main_step(model, tx, cfg, st, os_,
                                                     npd._batch(xb, cfg, k), yb)
    run = lambda st, os_, key: npd._epochs(main, 1, batch, st, os_, x, y, key, 3)
    opt = tx.init(state["polariser"]["params"])
    args = (state, opt, jax.random.key(0))
    one = lambda st, os_: npd._main_step(model, tx, cfg, st, os_, to_unit(x[:batch]),
                                         y[:batch])
    f = step_flops(one, state, opt)
    steps = -(-x.shape[0] // batch)
    return run, args, f * steps if f else None, x.shape[0]


def _grad_prune_unit(model, state, d, batch):
    """One pruning round (scores over the defender's batches, top filter, validation);
    the carried mask makes consecutive calls prune consecutive filters, as PyTorch's."""
    from bdjax.defenses import grad_prune as gp

    x_trig, y = jnp.asarray(d["x_trig"]), jnp.asarray(d["y"])
    val = DefenseData(x_train=x_trig[:1], y_train=y[:1], x_val=jnp.asarray(d["x_val"]),
                      y_val=jnp.asarray(d["y_val"]))
    x_val_trig = jnp.asarray(d["x_val_trig"])
    flat0, index = flatten(ones_masks(state["params"]))

    def run(mask, key):
        idx, w = gp._even_batches(key, x_trig.shape[0], batch)
        mask, _, acc, unlearn = gp.prune_round(model, state, mask, index,
                                               (x_trig[idx], y[idx], w), val, x_val_trig,
                                               True, key)
        return mask, acc, unlearn

    def one_batch(params, key):
        loss = gp._unlearning_loss_fn(model, state["batch_stats"], True, key)
        w = jnp.ones((batch,), jnp.float32)
        return jax.grad(loss)(params, (x_trig[:batch], y[:batch], w))

    args = (flat0, jax.random.key(0))
    f_grad = step_flops(one_batch, state["params"], jax.random.key(0))
    f_val = step_flops(lambda s: evaluate(model, s, val.x_val, val.y_val), state)
    steps = -(-x_trig.shape[0] // batch)
    f = f_grad * steps + 2 * f_val if f_grad and f_val else None
    return run, args, f, x_trig.shape[0]


def run_units(model_name: str, dtype: str, profile: Profile, d: dict, peak_tflops,
              units=UNITS) -> dict:
    """Compile and time the bdjax units of ``model_name``; returns {unit: figures}."""
    model = _model(model_name, dtype)
    state = model.init(jax.random.key(0))
    out = {}
    for unit in units:
        if unit == "train_step":
            run, args, f, images = _train_step_unit(model, state, d, profile.batch,
                                                    profile.steps_per_repeat)
        else:
            make = {"ft_sam_epoch": _ft_sam_unit, "npd_epoch": _npd_unit,
                    "grad_prune_round": _grad_prune_unit}[unit]
            run, args, f, images = make(model, state, d, profile.batch)
        exe, seconds_compile, _ = compile_timed(run, *args)
        if unit == "grad_prune_round":
            carry = {"mask": args[0]}

            def call():
                carry["mask"], *rest = exe(carry["mask"], args[1])
                return rest
        else:
            call = lambda: exe(*args)
        t = time_calls(call, profile.repeats)
        rec = {"compile_seconds": seconds_compile, "seconds": t, "images": images,
               "images_per_second": images / t["median"], "flops": f}
        if f:
            rec["tflops"] = f / t["median"] / 1e12
            if peak_tflops:
                rec["fraction_of_peak"] = rec["tflops"] / peak_tflops
        out[unit] = rec
    return out


# ------------------------------------------------------------------------------ PyTorch
def load_torch_ref():
    """``benchmarks/torch_ref.py`` as a module, or (None, why) when it cannot run."""
    path = REPO / "benchmarks" / "torch_ref.py"
    if importlib.util.find_spec("torch") is None:
        return None, "torch is not installed (pip install -e '.[bench]')"
    if not path.exists():
        return None, f"{path} not found (run from a source checkout)"
    spec = importlib.util.spec_from_file_location("bdjax_torch_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, None


def run_torch_units(ref, model_name: str, profile: Profile, d: dict, units=UNITS) -> dict:
    """Times the PyTorch units on the device JAX uses (cuda when JAX runs on a GPU)."""
    import torch

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if device == "cuda":  # JAX's default float32 matmul/conv precision on GPUs is TF32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = _model(model_name)
    work = ref.workloads(model_name, 10, model.mean, model.std, d["x"], d["y"], d["x_trig"],
                         device=device, batch_size=profile.batch, seed=0)
    out = {}
    for unit in units:
        if unit == "train_step":
            fn = lambda: [work["train_step"]() for _ in range(profile.steps_per_repeat)]
        else:
            fn = work[unit]
        out[unit] = {"seconds": time_calls(fn, profile.repeats), "device": device}
    return out


def torch_logit_difference(ref, model_name: str, d: dict) -> float:
    """Max |bdjax - PyTorch| logit on 8 images with the same (random) weights."""
    model = _model(model_name)
    state = model.init(jax.random.key(3))
    x = d["x"][:8]
    ours = np.asarray(model.apply(state, jnp.asarray(x)))
    theirs = ref.logits(model_name, 10, model.mean, model.std,
                        jax.tree_util.tree_map(np.asarray, state["params"]),
                        jax.tree_util.tree_map(np.asarray, state["batch_stats"]), x)
    return float(np.max(np.abs(ours - theirs)))


# ------------------------------------------------------------------------------ defenses
def _split(d: dict, trials: int) -> DefenseData:
    stack = lambda a: jnp.broadcast_to(jnp.asarray(a), (trials, *a.shape))
    return DefenseData(x_train=stack(d["x"]), y_train=stack(d["y"]), x_val=stack(d["x_val"]),
                       y_val=stack(d["y_val"]))


def time_defense(model, state, name: str, overrides: dict, d: dict, trials: int,
                 repeats: int, layout: str = "vmap") -> dict:
    """Compile once, then time ``repeats`` whole runs of ``name`` over ``trials`` laid
    out as ``layout`` (:data:`LAYOUTS`)."""
    dfn = defenses.get(name, **overrides)
    split = _split(d, trials)
    if dfn.needs_trigger:
        split = dataclasses.replace(split, trigger=d["attack"])
    keys = jnp.stack([jax.random.key(t) for t in range(trials)])
    strategy, rule = LAYOUTS[layout]
    call = lambda: experiment.run_defense(model, state, dfn, split, keys, strategy=strategy,
                                          conv_rule=rule)
    first = call()
    runs = [first.seconds_run] + [call().seconds_run for _ in range(repeats - 1)]
    return {"defense": name, "trials": trials, "layout": layout, "settings": dfn.settings,
            "compile_seconds": first.seconds_compile, "seconds": spread(runs),
            "seconds_per_trial": statistics.median(runs) / trials}


# ---------------------------------------------------------------------------------- main
def machine() -> dict:
    dev = jax.devices()[0]
    info = {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
            "device": records.device_name(), "device_kind": getattr(dev, "device_kind", ""),
            "device_count": jax.device_count(), "versions": records.versions()}
    try:
        import torch

        info["versions"]["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def run(profile: Profile, *, dtypes=("float32",), defense_names=None, use_torch=True,
        log=print) -> dict:
    """Every measurement of ``profile``; returns the JSON-ready result."""
    names = list(defense_names or defenses.names())
    result = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": machine(), "profile": dataclasses.asdict(profile),
              "dtypes": list(dtypes), "peak": {}, "units": {}, "torch": {},
              "torch_logit_max_abs_diff": {}, "defenses": [], "scaling": []}
    for dt in dtypes:
        p = peak(dt, profile.matmul, profile.repeats)
        result["peak"][dt] = p
        log(f"peak {dt}: {p['tflops']:.3f} TFLOP/s ({profile.matmul}^2 matmul)")
    d = bench_data(profile.n_train, profile.n_val)
    ref, why = load_torch_ref() if use_torch else (None, "disabled (--no-torch)")
    result["torch_status"] = "ok" if ref else why
    for name in profile.models:
        units = UNITS if name in profile.defense_models else ("train_step",)
        for dt in dtypes:
            log(f"units: {name} {dt} ({', '.join(units)})")
            result["units"].setdefault(name, {})[dt] = run_units(
                name, dt, profile, d, result["peak"][dt]["tflops"], units)
        if ref is not None:
            log(f"torch: {name} ({', '.join(units)})")
            result["torch_logit_max_abs_diff"][name] = torch_logit_difference(ref, name, d)
            result["torch"][name] = run_torch_units(ref, name, profile, d, units)
    for name in profile.defense_models:
        model = _model(name)
        state = model.init(jax.random.key(0))
        for dname in names:
            over = profile.defense_overrides.get(dname, {})
            log(f"defense: {name} {dname} {over or '(reference settings)'}")
            result["defenses"].append({"model": name, **time_defense(
                model, state, dname, over, d, 1, profile.repeats)})
            for layout in profile.layouts:
                for t in profile.trials:
                    log(f"scaling: {name} {dname} T={t} {layout}")
                    result["scaling"].append({"model": name, **time_defense(
                        model, state, dname, profile.scaling_overrides.get(dname, {}), d, t,
                        profile.repeats, layout)})
    return result


def write_json(result: dict, path: pathlib.Path) -> None:
    """Atomic write: a temporary file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(records.jsonable(result), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------- tables
def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head, rows) -> list[str]:
    return [_row(head), "|" + "|".join("---" for _ in head) + "|"] + [_row(r) for r in rows]


def _s(t: dict) -> str:
    return f"{t['median']:.4g} [{t['min']:.3g}-{t['max']:.3g}]"


def tables(result: dict) -> str:
    """Markdown tables of a result (units with PyTorch ratios, defenses, scaling)."""
    out = [f"device: {result['machine']['device']}; "
           + "; ".join(f"peak {k} {v['tflops']:.3f} TFLOP/s" for k, v in result["peak"].items())
           + f"; torch: {result['torch_status']}", ""]
    rows = []
    for name, by_dtype in result["units"].items():
        for dt, units in by_dtype.items():
            for unit, r in units.items():
                tr = result["torch"].get(name, {}).get(unit) if dt == "float32" else None
                ratio = f"{r['seconds']['median'] / tr['seconds']['median']:.2f}" if tr else "-"
                rows.append([name, dt, unit, f"{r['compile_seconds']:.1f}", _s(r["seconds"]),
                             f"{r['images_per_second']:.0f}",
                             f"{r['tflops']:.3f}" if r.get("tflops") else "-",
                             f"{100 * r['fraction_of_peak']:.1f}%"
                             if r.get("fraction_of_peak") else "-",
                             _s(tr["seconds"]) if tr else "-", ratio])
    out += _table(["model", "dtype", "unit", "compile s", "bdjax s (median [min-max])",
                   "images/s", "TFLOP/s", "of peak", "PyTorch s", "bdjax/PyTorch"], rows)
    diffs = result.get("torch_logit_max_abs_diff") or {}
    if diffs:
        out += ["", "same weights, max |logit difference| bdjax vs PyTorch: "
                + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())]
    out += [""] + _table(
        ["model", "defense", "compile s", "run s (median [min-max])"],
        [[r["model"], r["defense"], f"{r['compile_seconds']:.1f}", _s(r["seconds"])]
         for r in result["defenses"]])
    layout = lambda r: r.get("layout", "vmap")
    base = {(r["model"], r["defense"], layout(r)): r["seconds"]["median"]
            for r in result["scaling"] if r["trials"] == 1}
    rows = []
    for r in result["scaling"]:
        one = base.get((r["model"], r["defense"], layout(r)))
        rows.append([r["model"], r["defense"], layout(r), r["trials"], _s(r["seconds"]),
                     f"{r['seconds_per_trial']:.4g}",
                     f"{r['seconds']['median'] / one:.2f}" if one else "-"])
    out += [""] + _table(["model", "defense", "layout", "T", "run s", "s/trial",
                          "time(T)/time(1)"], rows)
    return "\n".join(out)


def default_path(result: dict, quick: bool) -> pathlib.Path:
    kind = result["machine"]["device_kind"] or result["machine"]["backend"]
    slug = "".join(c if c.isalnum() else "-" for c in kind.lower()).strip("-")
    day = result["created"][:10]
    return RESULTS / f"{day}-{slug}{'-quick' if quick else ''}.json"


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise BdjaxError(f"{what} {text!r} is invalid; accepted: positive integers "
                         "separated by commas, e.g. 1,2,4.")
    return values


def main(args) -> dict:
    """``bdjax bench``: run, write the JSON, print the tables."""
    profile = QUICK if args.quick else FULL
    for flag, field in ((args.models, "models"), (args.defense_models, "defense_models")):
        if flag is not None:
            names = tuple(n for n in flag.split(",") if n)
            for n in names:
                check_choice("model", n, models.names())
            profile = dataclasses.replace(profile, **{field: names})
    if args.trials:
        profile = dataclasses.replace(profile, trials=parse_ints(args.trials, "--trials"))
    if args.repeats:
        profile = dataclasses.replace(profile, repeats=args.repeats)
    if args.layouts:
        layouts = tuple(args.layouts.split(","))
        for lay in layouts:
            check_choice("layout", lay, LAYOUTS)
        profile = dataclasses.replace(profile, layouts=layouts)
    # bfloat16 is for accelerators (CPUs emulate it); there it is measured by default.
    default = "float32" if jax.default_backend() == "cpu" else "float32,bfloat16"
    dtypes = tuple((args.dtypes or default).split(","))
    for dt in dtypes:
        check_choice("dtype", dt, models.DTYPES)
    names = args.defenses.split(",") if args.defenses else None
    for n in names or ():
        check_choice("defense", n, defenses.names())
    log = lambda m: print(m, file=sys.stderr, flush=True)
    result = run(profile, dtypes=dtypes, defense_names=names, use_torch=not args.no_torch,
                 log=log)
    path = pathlib.Path(args.out) if args.out else default_path(result, args.quick)
    write_json(result, path)
    print(tables(result))
    print(f"\nwritten {path}")
    return result
