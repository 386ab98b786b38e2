"""Attacks: triggers as pure functions, dataset poisoning, and the poisoned test set.

``get(name, **params)`` returns an :class:`Attack`; ``names()`` lists them. An attack's
``stamp`` follows the trigger contract ``stamp(images_uint8, key) -> images_uint8``.

Three kinds: poisoned-dataset attacks with a formula trigger (BadNets, Blended, SIG);
poisoned-dataset attacks whose trigger or poisoned images come from a generated
resource file (LF, SSBA, Trojan, LC; :mod:`bdjax.attacks.resources`, made by
:mod:`bdjax.attacks.prepare`); training-control attacks that poison each batch inside
the compiled training step (WaNet, BPP, Input-aware; :mod:`bdjax.attacks.control`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import numpy as np

from bdjax import metrics
from bdjax.attacks import learned, resources, triggers
from bdjax.errors import BdjaxError, check_choice, check_range

MODES = metrics.MODES


@dataclasses.dataclass(frozen=True)
class _Spec:
    """fn: the stamp; defaults: its parameters; clean_label: draws only target-class
    images and keeps labels; control: poisons per batch during training; files: the
    parameters naming resource files (each with a ``<name>_sha256`` partner)."""

    fn: Callable
    defaults: dict
    clean_label: bool = False
    control: bool = False
    files: tuple[str, ...] = ()


_REGISTRY = {
    "badnets": _Spec(triggers.badnets, {"size": None, "value": 255}),  # size None: 3/32 of H
    # image None: bdjax's own picture; a path: that file (its SHA-256 filled in by get()).
    "blended": _Spec(triggers.blended, {"alpha": 0.2, "image": None, "image_sha256": None}),
    "sig": _Spec(triggers.sig, {"delta": 40.0, "freq": 6.0}, clean_label=True),
    "bpp": _Spec(triggers.bpp, {"squeeze": 8, "dithering": False, "neg_ratio": 0.1},
                 control=True),
    # grid_seed: the warp's noise; `bdjax attack` sets it to the run's seed
    "wanet": _Spec(triggers.wanet, {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0,
                                    "grid_seed": 0}, control=True),
    "iab": _Spec(learned.iab, {"cross_ratio": 1.0, "mask_density": 0.032, "lambda_div": 1.0,
                               "lambda_norm": 100.0, "mask_epochs": 25, "lr_g": 0.01,
                               "lr_g_schedule": "classifier", "lr_m": 0.01,
                               "generator": None, "generator_sha256": None},
                 control=True, files=("generator",)),
    # resource_seed: the key of the generated resource (one per dataset and model, as
    # the reference ships one file per pair), independent of the attack's seed; the
    # other settings are the generators' lengths (bdjax.attacks.prepare); SSBA's `epochs`
    # and `lr` are its encoder's Adam run (the reference: 20 epochs of CIFAR-10, ~15,600
    # steps; fewer steps leave its image loss off, and `bdjax attack` warns)
    "lf": _Spec(learned.lf, {"pattern": None, "pattern_sha256": None, "resource_seed": 0,
                             "n_images": 100, "passes": 50}, files=("pattern",)),
    "trojan": _Spec(learned.trojan, {"trigger": None, "trigger_sha256": None,
                                     "resource_seed": 0, "iters": 1000}, files=("trigger",)),
    "ssba": _Spec(learned.ssba, {"encoder": None, "encoder_sha256": None, "resource_seed": 0,
                                 "epochs": 20, "lr": 1e-4}, files=("encoder",)),
    # eps in 1/255 units (16 or 8), PGD `steps`; the robust model: `robust_epochs` (0:
    # the attack's training epochs) of PGD training with `robust_steps` steps at 8/255
    "lc": _Spec(learned.lc, {"eps": 16, "amplitude": 1.0, "adversarial": None,
                             "adversarial_sha256": None, "resource_seed": 0, "steps": 100,
                             "robust_epochs": 0, "robust_steps": 10},
                clean_label=True, files=("adversarial",)),
}


def names() -> list[str]:
    return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Attack:
    """A poisoning attack with fixed parameters (hashable; static under jit).

    Attributes:
      name: registry name.
      target: the target label (all-to-one) or ignored offset base (all-to-all).
      mode: ``all_to_one`` or ``all_to_all`` (y -> (y + 1) mod C).
      params: trigger parameters as sorted (name, value) pairs.
    """

    name: str
    target: int = 0
    mode: str = "all_to_one"
    params: tuple = ()

    @property
    def clean_label(self) -> bool:
        return _REGISTRY[self.name].clean_label

    @property
    def control(self) -> bool:
        """Poisons each batch inside training (WaNet, BPP, Input-aware)."""
        return _REGISTRY[self.name].control

    @property
    def files(self) -> dict[str, str | None]:
        """The resource files this attack's parameters name ({param: path or None})."""
        p = dict(self.params)
        return {k: p.get(k) for k in _REGISTRY[self.name].files}

    @property
    def config(self) -> dict:
        """JSON-ready description, stored in checkpoints and records."""
        return {"name": self.name, "target": self.target, "mode": self.mode,
                "clean_label": self.clean_label, "params": dict(self.params)}

    def stamp(self, images, key=None):
        """Trigger-stamped copies of uint8 images (jittable)."""
        return _REGISTRY[self.name].fn(images, key, **dict(self.params))

    def target_labels(self, labels, num_classes: int):
        """The label the attacker wants for each image (numpy or jax arrays)."""
        return np.asarray(metrics.poison_labels(labels, self.target, self.mode, num_classes))

    def asr_valid(self, labels):
        """Which test images count for ASR/RA (all-to-one drops target-class images)."""
        return np.asarray(metrics.asr_mask(labels, self.target, self.mode))


def get(name: str, *, target: int = 0, mode: str = "all_to_one", num_classes: int = 10,
        root=None, **params) -> Attack:
    """The attack ``name``; unknown names or parameters raise BdjaxError.

    Resource files named by relative paths are looked up inside ``root`` (the checkpoint
    directory they were saved in); each is checked against its recorded SHA-256.
    """
    check_choice("attack", name, names())
    check_choice("attack mode", mode, MODES)
    spec = _REGISTRY[name]
    if int(target) != target or not 0 <= target < num_classes:
        raise BdjaxError(f"target {target!r} is not a label; accepted: 0..{num_classes - 1}.")
    if spec.clean_label and mode != "all_to_one":
        raise BdjaxError(f"attack {name!r} is clean-label; accepted mode: all_to_one.")
    for k in params:
        check_choice(f"parameter of attack {name!r}", k, spec.defaults)
    merged = {**spec.defaults, **params}
    if "alpha" in merged:
        check_range("alpha", merged["alpha"], 0, 1, low_open=True)
    if merged.get("image") is not None:
        from bdjax.attacks.images import resolve_trigger_image

        merged["image"], merged["image_sha256"] = resolve_trigger_image(
            merged["image"], merged.get("image_sha256"))
    elif merged.get("image_sha256") is not None:
        raise BdjaxError("image_sha256 is given without image; accepted: image=PATH "
                         "(its checksum is computed and recorded by bdjax).")
    for f in spec.files:
        if merged[f] is not None:
            merged[f], merged[f + "_sha256"] = resources.resolve(
                merged[f], merged[f + "_sha256"], root, what=f"{name} {f}")
        elif merged[f + "_sha256"] is not None:
            raise BdjaxError(f"{f}_sha256 is given without {f}; accepted: {f}=PATH (its "
                             "checksum is computed and recorded by bdjax).")
    return Attack(name=name, target=int(target), mode=mode,
                  params=tuple(sorted(merged.items())))


@dataclasses.dataclass(frozen=True)
class Poisoned:
    """A poisoned training set: all images, labels after relabelling, poisoned indices."""

    x: np.ndarray
    y: np.ndarray
    indices: np.ndarray


@functools.partial(jax.jit, static_argnums=0)
def _stamp_batch(attack: Attack, images, key):
    return attack.stamp(images, key)


def stamp_all(attack: Attack, images: np.ndarray, key: jax.Array, batch: int = 4096):
    """Stamps every image (in chunks to bound memory); returns a numpy uint8 array."""
    out = [np.asarray(_stamp_batch(attack, images[i:i + batch], jax.random.fold_in(key, i)))
           for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else images.copy()


def poison(attack: Attack, x: np.ndarray, y: np.ndarray, num_classes: int, ratio: float,
           key: jax.Array) -> Poisoned:
    """Poisons ``round(ratio * N)`` training images chosen with ``key``.

    Dirty-label attacks draw from the whole set and relabel to the attack's target label;
    clean-label attacks draw only from target-class images and keep the labels.
    """
    check_range("poison ratio", ratio, 0, 1, low_open=True, high_open=True)
    if attack.control:
        raise BdjaxError(f"attack {attack.name!r} poisons each batch during training, not a "
                         "dataset; accepted: `bdjax attack` or "
                         "bdjax.attacks.control.train_controlled.")
    n = int(round(ratio * len(x)))
    pool = np.flatnonzero(y == attack.target) if attack.clean_label else np.arange(len(x))
    if n > len(pool):
        raise BdjaxError(
            f"poison ratio {ratio} needs {n} images but clean-label attack {attack.name!r} "
            f"can only use the {len(pool)} images of target class {attack.target}; "
            f"accepted: ratio <= {len(pool) / len(x):.4f}.")
    if n < 1:
        raise BdjaxError(f"poison ratio {ratio} poisons no image of {len(x)}; accepted: "
                         f"ratio >= {0.5 / len(x):.2g}.")
    k_pick, k_stamp = jax.random.split(key)
    seed = np.asarray(jax.random.key_data(k_pick)).astype(np.uint32).tolist()
    idx = np.sort(np.random.default_rng(seed).choice(pool, n, replace=False))
    x_p, y_p = x.copy(), y.astype(np.int32).copy()
    x_p[idx] = stamp_all(attack, _source(attack, x, idx), k_stamp)
    if not attack.clean_label:
        y_p[idx] = attack.target_labels(y_p[idx], num_classes)
    return Poisoned(x=x_p, y=y_p, indices=idx)


def _source(attack: Attack, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The images the trigger is stamped on: LC stamps its adversarial versions."""
    if attack.name != "lc":
        return x[idx]
    p = dict(attack.params)
    if p["adversarial"] is None:
        raise BdjaxError("attack 'lc' has no adversarial images yet; accepted: "
                         "`bdjax attack --attack lc` (it generates them).")
    arrays = resources.load_arrays(p["adversarial"], p["adversarial_sha256"])
    where = {int(i): k for k, i in enumerate(arrays["indices"])}
    missing = [int(i) for i in idx if int(i) not in where]
    if missing:
        raise BdjaxError(f"LC's adversarial images do not cover training image {missing[0]}; "
                         "accepted: poisoned images of the target class they were made for.")
    return arrays["images"][[where[int(i)] for i in idx]]


@dataclasses.dataclass(frozen=True)
class TestSet:
    """The clean and poisoned test sets that ACC, ASR and RA are measured on."""

    x_clean: np.ndarray
    y: np.ndarray
    x_poisoned: np.ndarray
    y_target: np.ndarray
    valid: np.ndarray


def test_set(attack: Attack, x: np.ndarray, y: np.ndarray, num_classes: int,
             key: jax.Array | None = None) -> TestSet:
    """Every test image stamped, with attack labels and the ASR validity mask."""
    key = jax.random.key(0) if key is None else key
    return TestSet(x_clean=x, y=y.astype(np.int32), x_poisoned=stamp_all(attack, x, key),
                   y_target=np.asarray(attack.target_labels(y.astype(np.int32), num_classes)),
                   valid=attack.asr_valid(y))


__all__ = ["Attack", "Poisoned", "TestSet", "get", "names", "poison", "test_set",
           "stamp_all", "MODES"]
