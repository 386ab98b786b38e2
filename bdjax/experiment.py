"""Run attacks and defenses on checkpoints: evaluation, the defender's data per trial,
``bdjax attack`` and ``bdjax defend`` as functions.

The trials themselves run through :mod:`bdjax.runner` (vmapped, mapped or in sequence,
over every local device); rows are written by :mod:`bdjax.records`.

Keys: the root key is ``key(seed)``; trial ``t`` draws its defense data with
``fold_in(root, t)`` and runs the defense with ``fold_in(fold_in(root, t), 1)``, so a
trial's numbers do not depend on which other trials run beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import attacks, checkpoint, data, metrics, models
from bdjax.attacks import resources
from bdjax.data import DefenseData, defense_split
from bdjax.defenses import Defense
from bdjax.errors import BdjaxError, check_choice, check_range
from bdjax.kernels import logits_in_batches
from bdjax.models import Model, State
from bdjax.records import append_rows, device_name, jsonable, read_rows, row_key, versions
from bdjax.runner import run_defense
from bdjax.train import TrainConfig, train


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


# --------------------------------------------------------------------------------- attack
def dataset_from_meta(meta: dict) -> data.Dataset:
    ds = meta["dataset"]
    return data.load(ds["name"], **ds.get("load", {}))


def attack_from_meta(meta: dict, num_classes: int, directory=None) -> attacks.Attack:
    """The checkpoint's attack; its resource files are read from ``directory`` (the
    checkpoint) where the metadata names them by relative path."""
    a = meta["attack"]
    return attacks.get(a["name"], target=a["target"], mode=a["mode"],
                       num_classes=num_classes, root=directory, **a.get("params", {}))


def run_attack(*, dataset: str = "synthetic", model: str = "small_cnn",
               attack: str = "badnets", ratio: float = 0.1, target: int = 0,
               mode: str = "all_to_one", seed: int = 0, out, train_config: TrainConfig,
               attack_params: dict | None = None, dataset_args: dict | None = None,
               resources_dir=None, overwrite: bool = False, progress: bool = True,
               log=print) -> dict:
    """Poisons ``dataset``, trains ``model`` on it, evaluates, and checkpoints to ``out``.

    Attacks with resources (LF, SSBA, Trojan, LC) first make them, or reuse them from
    ``resources_dir`` (default ``resources/`` beside ``out``); training-control attacks
    (WaNet, BPP, Input-aware) poison each batch during training instead of the dataset
    (``ratio`` is then the share of each batch). The checkpoint gets a copy of every
    resource file it needs.

    Keys: poisoning uses ``fold_in(key(seed), 1)`` and training ``fold_in(key(seed), 2)``.
    Returns the checkpoint metadata.
    """
    from bdjax.attacks import control
    from bdjax.attacks.prepare import prepare

    # the names, the attack's settings and the destination first: a typo is reported
    # before the data is loaded
    load_args = {k: v for k, v in (dataset_args or {}).items() if v is not None}
    num_classes = data.info(dataset, **load_args)["num_classes"]
    check_choice("model", model, models.names())
    atk = attacks.get(attack, target=target, mode=mode, num_classes=num_classes,
                      **(attack_params or {}))
    out = pathlib.Path(out).expanduser().absolute()
    checkpoint.check_destination(out, overwrite)
    ds = data.load(dataset, **load_args)
    mdl = models.for_dataset(model, ds)
    res_dir = pathlib.Path(resources_dir or out.parent / resources.RESOURCE_DIR).absolute()
    atk = prepare(atk, ds=ds, model=mdl, train_config=train_config, seed=seed,
                  directory=res_dir, load_args=load_args, user_params=tuple(attack_params or ()),
                  progress=progress, log=log)
    root = jax.random.key(seed)
    t0 = time.perf_counter()
    if atk.control:
        check_range("poison ratio", ratio, 0, 1, low_open=True, high_open=True)
        log(f"{dataset}: {len(ds.x_train)} train / {len(ds.x_test)} test images; {atk.name} "
            f"poisons {ratio:.1%} of every batch during training, target {target}; "
            f"{mdl.name}: training {train_config.epochs} epochs")
        ctx = control.Batch(atk, ratio, ds.num_classes, ds.flip)
        state, history, arrays = control.train_controlled(
            mdl, ds.x_train, ds.y_train, train_config, jax.random.fold_in(root, 2), ctx,
            progress=progress, log=log)
        n_poisoned = None
        if arrays:  # what the test-time trigger needs (Input-aware's generator and mask)
            param = next(iter(atk.files))
            file = res_dir / (f"{atk.name}-{ds.name}-{mdl.name}-seed{seed}-"
                              f"{resources.digest(atk.config)}.npz")
            sha = resources.save_arrays(file, arrays)
            atk = attacks.get(atk.name, target=target, mode=mode, num_classes=ds.num_classes,
                              **{**dict(atk.params), param: str(file), param + "_sha256": sha})
    else:
        poisoned = attacks.poison(atk, ds.x_train, ds.y_train, ds.num_classes, ratio,
                                  jax.random.fold_in(root, 1))
        n_poisoned = int(len(poisoned.indices))
        log(f"{dataset}: {len(ds.x_train)} train / {len(ds.x_test)} test images; "
            f"{atk.name} poisons {n_poisoned} ({ratio:.1%}), target {target}; "
            f"{mdl.name}: training {train_config.epochs} epochs")
        state, history = train(mdl, poisoned.x, poisoned.y, train_config,
                               jax.random.fold_in(root, 2), flip=ds.flip, progress=progress)
    seconds = time.perf_counter() - t0
    scores = evaluate(mdl, state, attacks.test_set(atk, ds.x_test, ds.y_test, ds.num_classes))
    files, config, kept = {}, atk.config, {}
    for param, path in atk.files.items():
        if path is not None:  # the checkpoint's own copy, named relative to it
            rel = f"{resources.RESOURCE_DIR}/{pathlib.Path(path).name}"
            files[rel] = path
            config["params"][param] = rel
            kept[param] = {"file": rel, "sha256": config["params"][param + "_sha256"],
                           "cache": path}
    meta = {
        "dataset": {"name": ds.name, "num_classes": ds.num_classes, "load": load_args,
                    "n_train": len(ds.x_train), "n_test": len(ds.x_test)},
        "attack": config, "poison_ratio": ratio, "target": target,
        "n_poisoned": n_poisoned, "seed": seed,
        "train": {**dataclasses.asdict(train_config), "seconds": round(seconds, 2),
                  "final_loss": history[-1]["loss"], "final_train_acc": history[-1]["acc"]},
        **scores, "device": device_name(),
    }
    if kept:
        meta["resources"] = kept
    if atk.control:
        meta["poisoning"] = "per batch during training"
    checkpoint.save(out, mdl, state, meta, overwrite=overwrite, files=files)
    return checkpoint.load_metadata(out)


# -------------------------------------------------------------------------------- defense
@dataclasses.dataclass(frozen=True)
class Backdoored:
    """A restored checkpoint with what its defenses need: the model and state, the
    dataset it was trained on, its attack and the poisoned test set."""

    directory: str
    model: Model
    state: State
    meta: dict
    dataset: data.Dataset
    attack: attacks.Attack
    test: attacks.TestSet

    @classmethod
    def restore(cls, directory) -> "Backdoored":
        model, state, meta = checkpoint.restore(directory)
        ds = dataset_from_meta(meta)
        atk = attack_from_meta(meta, ds.num_classes, directory)
        test = attacks.test_set(atk, ds.x_test, ds.y_test, ds.num_classes)
        return cls(str(directory), model, state, meta, ds, atk, test)

    def defense(self, name: str, overrides: dict | None = None) -> Defense:
        """Defense ``name`` as it runs on this checkpoint's dataset and model."""
        from bdjax import defenses

        return defenses.for_run(name, overrides, dataset=self.dataset.name,
                                model=self.model.name, flip=self.dataset.flip)


def _report_row(reports: dict, i: int) -> dict:
    return {k: jsonable(np.asarray(v)[i]) for k, v in reports.items()}


def row_base(*, checkpoint_id: str, dataset: str, model: str, attack: str,
             poison_ratio, target: int, defense: Defense, spc, ratio, seed: int) -> dict:
    """The identity fields of a row (all of ``records.ROW_KEY`` but the trial)."""
    return {"checkpoint": checkpoint_id, "dataset": dataset, "model": model,
            "attack": attack, "poison_ratio": poison_ratio, "target": target,
            "defense": defense.name, "settings": defense.settings, "spc": spc,
            "ratio": ratio, "seed": seed}


def _base(bd: Backdoored, dfn: Defense, checkpoint_id: str | None, **setting) -> dict:
    cid = checkpoint_id or str(pathlib.Path(bd.directory).resolve())
    return row_base(checkpoint_id=cid, dataset=bd.dataset.name, model=bd.model.name,
                    attack=bd.attack.name, poison_ratio=bd.meta.get("poison_ratio"),
                    target=bd.attack.target, defense=dfn, **setting)


def defend(bd: Backdoored, dfn: Defense, *, spc: int | None = None,
           ratio: float | None = None, trials: Iterable[int], seed: int = 0,
           checkpoint_id: str | None = None, strategy: str = "vmap",
           conv_rule: str = "auto", devices: int | None = None, log=print) -> list[dict]:
    """Runs ``dfn`` on ``bd`` for ``trials`` (one compiled call) and returns their rows.

    Rows name the checkpoint by ``checkpoint_id`` (default: its resolved path).
    """
    trials = list(trials)
    if not trials:
        raise BdjaxError("trials is empty; accepted: at least one trial.")
    base = _base(bd, dfn, checkpoint_id, spc=spc, ratio=ratio, seed=seed)
    before = evaluate(bd.model, bd.state, bd.test)
    split = split_for_trials(bd.dataset, trials, seed, spc=spc, ratio=ratio,
                             validation=dfn.uses_validation)
    if dfn.needs_trigger:
        split = dataclasses.replace(split, trigger=bd.attack)
    keys = jnp.stack([jax.random.fold_in(trial_key(seed, t), 1) for t in trials])
    log(f"{dfn.name}: {len(trials)} trial(s), {split.x_train.shape[1]} train + "
        f"{split.x_val.shape[1]} val images each, strategy {strategy}")
    run = run_defense(bd.model, bd.state, dfn, split, keys, strategy=strategy,
                      conv_rule=conv_rule, devices=devices)
    after = evaluate_trials(bd.model, run.states, bd.test)
    common = {"device": device_name(), "versions": versions(),
              "seconds_compile": round(run.seconds_compile, 3),
              "seconds_run": round(run.seconds_run / len(trials), 3),
              "seconds_run_batch": round(run.seconds_run, 3),
              "trials_batched": len(trials) if strategy != "sequential" else 1,
              "strategy": strategy, "conv_rule": conv_rule, "devices": run.devices,
              "n_train": int(split.x_train.shape[1]), "n_val": int(split.x_val.shape[1])}
    rows = []
    for i, t in enumerate(trials):
        scores = metrics.summary(before, {k: float(v[i]) for k, v in after.items()})
        rows.append({**base, "trial": t, **common,
                     **{f"{k}_before": v for k, v in before.items()}, **scores,
                     "report": _report_row(run.reports, i)})
    return rows


def run_defense_on_checkpoint(checkpoint_dir, defense: str, *, overrides: dict | None = None,
                              spc: int | None = None, ratio: float | None = None,
                              trials: int | Iterable[int] = 5, seed: int = 0, out=None,
                              strategy: str = "vmap", log=print) -> list[dict]:
    """Defends the checkpointed model over trials; returns (and appends) result rows.

    Rows already present in ``out`` (same checkpoint, setting, seed and trial) are
    skipped, so an interrupted run resumes where it stopped.
    """
    bd = Backdoored.restore(checkpoint_dir)
    dfn = bd.defense(defense, overrides)
    trial_ids = list(range(trials)) if isinstance(trials, int) else list(trials)
    if not trial_ids:
        raise BdjaxError("trials is empty; accepted: at least one trial.")
    base = _base(bd, dfn, None, spc=spc, ratio=ratio, seed=seed)
    done = {row_key(r) for r in read_rows(out)} if out else set()
    todo = [t for t in trial_ids if row_key({**base, "trial": t}) not in done]
    if not todo:
        log(f"all {len(trial_ids)} trials already in {out}; nothing to do")
        return []
    rows = defend(bd, dfn, spc=spc, ratio=ratio, trials=todo, seed=seed, strategy=strategy,
                  log=log)
    if out:
        append_rows(out, rows)
    return rows
