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
model. Each resource file is named by a digest of exactly what it depends on
(``_DEPENDS``): the data and the resource's own settings and ``resource_seed``; the model
and its training only where it is made against a clean or robust model (LF, Trojan, LC);
the target only where it aims at it (LF, LC). The SSBA encoder is therefore made once
per dataset, whatever the model or target (:mod:`bdjax.attacks.resources`).
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


# per attack with resources: (made against a clean or robust model of the attacked
# architecture and training, depends on the target, the attack settings it reads)
_DEPENDS = {"lf": (True, True, ("resource_seed", "n_images", "passes")),
            "trojan": (True, False, ("resource_seed", "iters")),
            "lc": (True, True, ("resource_seed", "eps", "steps", "robust_epochs",
                                "robust_steps")),
            "ssba": (False, False, ("resource_seed", "epochs", "lr"))}


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
    if name not in _DEPENDS or all(v is not None for v in files.values()):
        return attack  # nothing to make here (IAB's generator is trained with the model)
    rseed = int(p.get("resource_seed", 0))
    key = jax.random.key(rseed)
    # exactly what the file depends on (a setting that does not change it never makes a
    # second copy): the data, the resource's own settings, and where it uses them the
    # clean/robust model (model and training) and the target
    uses_model, uses_target, own = _DEPENDS[name]
    base = {"dataset": ds.name, "load": load_args or {}, "image_shape": ds.x_train.shape[1:],
            **{k: p[k] for k in own}}
    if uses_model:
        base.update(_settings(ds, model, train_config, load_args or {}))
    if uses_target:
        base["target"] = attack.target
    kw = dict(load_args=load_args, progress=progress, log=log)

    def cached(kind: str, make) -> tuple[str, str]:
        # the model's name only where the file depends on it: one SSBA encoder per dataset
        owner = f"{ds.name}-{model.name}" if uses_model else ds.name
        file = f"{kind}-{owner}-{resources.digest(base)}.npz"
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

            cfg = ssba.SSBAConfig(epochs=p["epochs"], lr=p["lr"])
            params, history = ssba.train_encoder(ds.x_train, key, cfg, progress=progress)
            last = history[-1]
            log(f"ssba encoder: bit accuracy {last['bit_acc']:.3f}, PSNR "
                f"{last['psnr']:.1f} dB after {len(history)} epochs")
            if not last["activated"]:
                log(f"warning: the SSBA encoder's image loss never switched on (bit "
                    f"accuracy {last['bit_acc']:.3f} never passed {cfg.ramp_threshold}): "
                    "its triggers are not invisible; train it longer (--param epochs=N: "
                    "the reference's CIFAR-10 run has ~15,600 steps)")
            secret = ssba.make_secret(jax.random.fold_in(key, 1), cfg.bits)
            return {**resources.flatten(params), "secret": np.asarray(secret),
                    "bit_acc": np.float32(last["bit_acc"]), "psnr": np.float32(last["psnr"])}

        p["encoder"], p["encoder_sha256"] = cached("ssba", make)
    return get(name, **common, **p)


__all__ = ["clean_model", "prepare", "robust_model"]
