"""Generating an attack's resources before it poisons (``bdjax attack`` calls this).

- LF: the universal low-frequency pattern against a clean model (:mod:`bdjax.attacks.lf`);
- Trojan: the trigger that excites a clean model's two most connected last-layer inputs
  (:mod:`bdjax.attacks.trojan`);
- LC: PGD images of the target class against an adversarially trained model
  (:mod:`bdjax.attacks.lc`);
- SSBA: the StegaStamp-style encoder and the fixed secret (:mod:`bdjax.attacks.ssba`);
- WaNet: only its warp's seed (set to the run's seed unless given).

The clean and the robust model are the attacked architecture trained the way the attack
trains (the same :class:`~bdjax.train.TrainConfig`) on the clean training set; each is
cached as a bdjax checkpoint in the resource directory, so LF and Trojan share one clean
model, and every resource is made once per dataset, model, settings and
``resource_seed`` (:mod:`bdjax.attacks.resources`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from bdjax.attacks import Attack, get, resources


def _settings(ds, model, train_config, load_args) -> dict:
    return {"dataset": ds.name, "load": load_args, "model": model.name,
            "train": dataclasses.asdict(train_config)}


def clean_model(ds, model, train_config, directory, *, seed: int = 0, load_args=None,
                progress=False, log=print):
    """The clean classifier of ``model`` on ``ds`` (trained once, then reused)."""
    from bdjax.train import train

    settings = {**_settings(ds, model, train_config, load_args or {}), "seed": seed}
    name = f"clean-{ds.name}-{model.name}-{resources.digest(settings)}"

    def make():
        from bdjax.kernels import evaluate

        state, history = train(model, ds.x_train, ds.y_train, train_config,
                               jax.random.key(seed), flip=ds.flip, progress=progress)
        acc, _ = jax.jit(evaluate, static_argnums=0)(model, state, ds.x_test, ds.y_test)
        return state, {"resource": "clean model", **settings, "acc": float(acc),
                       "final_train_acc": history[-1]["acc"]}

    return resources.cached_model(directory, name, model, make, log=log)


def robust_model(ds, model, train_config, directory, *, eps: float, epochs: int,
                 steps: int, seed: int = 0, load_args=None, progress=False, log=print):
    """The PGD-adversarially-trained classifier LC crafts against (trained once):
    ``epochs`` of the attack's SGD run on PGD-Linf examples (``eps``, ``steps`` steps)."""
    from bdjax.attacks.lc import adversarial_train

    settings = {**_settings(ds, model, train_config, load_args or {}), "seed": seed,
                "eps": eps, "epochs": epochs, "steps": steps}
    name = f"robust-{ds.name}-{model.name}-{resources.digest(settings)}"

    def make():
        state = adversarial_train(model, ds.x_train, ds.y_train, jax.random.key(seed),
                                  epochs=epochs, lr=train_config.lr,
                                  batch_size=train_config.batch_size, eps=eps,
                                  step=eps / 4, steps=steps, flip=ds.flip)
        return state, {"resource": "robust model", **settings}

    return resources.cached_model(directory, name, model, make, log=log)


def prepare(attack: Attack, *, ds, model, train_config, seed: int, directory,
            load_args=None, user_params=(), progress: bool = False, log=print) -> Attack:
    """``attack`` with its resource files made (or found in ``directory``) and named in
    its parameters; unchanged for attacks without resources. ``user_params`` are the
    parameters the user set (those are never replaced)."""
    p = dict(attack.params)
    name = attack.name
    common = dict(target=attack.target, mode=attack.mode, num_classes=ds.num_classes)
    if name == "wanet" and "grid_seed" not in user_params:
        return get(name, **common, **{**p, "grid_seed": int(seed)})
    files = attack.files
    if not files or all(v is not None for v in files.values()):
        return attack
    rseed = int(p.get("resource_seed", 0))
    key = jax.random.key(rseed)
    # everything the file depends on: data, model, training, target, the settings
    settings = {k: v for k, v in p.items() if k not in files and not k.endswith("_sha256")}
    base = {**_settings(ds, model, train_config, load_args or {}), **settings,
            "target": attack.target}
    kw = dict(load_args=load_args, progress=progress, log=log)

    def cached(kind: str, make) -> tuple[str, str]:
        file = f"{kind}-{ds.name}-{model.name}-{resources.digest(base)}.npz"
        return resources.cached_arrays(directory, file, make, log=log)

    if name in ("lf", "trojan"):
        def make():
            state = clean_model(ds, model, train_config, directory, seed=rseed, **kw)
            if name == "lf":
                from bdjax.attacks.lf import lf_pattern

                return {"pattern": lf_pattern(model, state, ds.x_train, ds.y_train,
                                              attack.target, key, n_images=p["n_images"],
                                              max_passes=p["passes"])}
            from bdjax.attacks.trojan import trojan_trigger

            return {"trigger": trojan_trigger(model, state, key, iters=p["iters"])}

        param = "pattern" if name == "lf" else "trigger"
        p[param], p[param + "_sha256"] = cached(name, make)
    elif name == "lc":
        def make():
            from bdjax.attacks.lc import lc_adversarial

            state = robust_model(ds, model, train_config, directory, eps=8 / 255,
                                 epochs=p["robust_epochs"] or train_config.epochs,
                                 steps=p["robust_steps"], seed=rseed, **kw)
            idx = np.flatnonzero(ds.y_train == attack.target)
            images = lc_adversarial(model, state, ds.x_train[idx], ds.y_train[idx],
                                    jax.random.fold_in(key, 1), eps=p["eps"] / 255,
                                    steps=p["steps"])
            return {"indices": idx, "images": images}

        p["adversarial"], p["adversarial_sha256"] = cached("lc", make)
    elif name == "ssba":
        def make():
            from bdjax.attacks import ssba

            cfg = ssba.SSBAConfig(epochs=p["epochs"])
            params, _ = ssba.train_encoder(ds.x_train, key, cfg, progress=progress)
            secret = ssba.make_secret(jax.random.fold_in(key, 1), cfg.bits)
            return {**resources.flatten(params), "secret": np.asarray(secret)}

        p["encoder"], p["encoder_sha256"] = cached("ssba", make)
    return get(name, **common, **p)


__all__ = ["clean_model", "prepare", "robust_model"]
