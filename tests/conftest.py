"""Shared fixtures: a small backdoored model that the tests train themselves."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import jax
import pytest

from bdjax import attacks, checkpoint, data, models
from bdjax.train import TrainConfig, train


@pytest.fixture(scope="session")
def small_data():
    """8,000 / 1,000 synthetic images: enough for a small CNN to learn shapes and a trigger."""
    return data.load("synthetic", seed=0, n_train=8000, n_test=1000)


# `make test` sends whole files to its workers (--dist loadfile) in collection order.
# The longest files go first, so no worker is left with a long file at the end; of the
# first three only one needs the `backdoored` fixture, so one worker trains it while the
# others run the sweep and attack-resource tests.
_FIRST = ("test_npd.py", "test_sweep.py", "test_attack_resources.py", "test_iab.py",
          "test_nad_pbe.py", "test_ibau.py", "test_sau.py",
          "test_nc.py", "test_awm_mmbd.py", "test_anp_rnp.py",
          "test_ft_sam.py", "test_experiment.py", "test_grad_prune.py", "test_fst.py",
          "test_fp.py", "test_cli.py", "test_trojan_lc.py", "test_wanet_bpp.py",
          "test_ssba.py", "test_lf.py")


def pytest_configure(config):
    """One XLA compilation cache for the whole run: the workers, and the processes
    the tests start (Ray's workers, `python -m bdjax`), reuse each other's compiled
    programs (measured: ~70 s of compile saved over a 19-minute run; more on the Ray
    test). The controlling process makes it and removes it at the end."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        config._bdjax_xla_cache = tempfile.mkdtemp(prefix="bdjax-tests-xla-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config._bdjax_xla_cache
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    cache = getattr(config, "_bdjax_xla_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))  # stable


def _once_per_run(tmp_path_factory, worker_id, name: str, make):
    """``make()``'s (model, state) trained by one pytest worker and restored by the
    others from a checkpoint (atomic), instead of every worker training it again."""
    if worker_id == "master":
        return make()
    root = tmp_path_factory.getbasetemp().parent
    ckpt, lock = root / name, root / f"{name}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        deadline = time.time() + 900
        while not (ckpt / checkpoint.METADATA_FILE).is_file():
            if (root / f"{name}.failed").exists() or time.time() > deadline:
                return make()  # the trainer failed: train here
            time.sleep(0.5)
        model, state, _ = checkpoint.restore(ckpt)
        return model, state
    os.close(fd)
    try:
        model, state = make()
        checkpoint.save(ckpt, model, state, {"fixture": name})
    except BaseException:
        (root / f"{name}.failed").touch()
        raise
    return model, state


@pytest.fixture(scope="session")
def backdoored(small_data, tmp_path_factory, worker_id):
    """(model, state, attack, test set) of a small CNN backdoored with BadNets 10%.

    Trained with random-crop augmentation at batch 32 for 8 epochs (~45 s on 2 cores):
    ~84% clean accuracy and ~96% ASR (measured 2026-12-03). The augmentation matters for
    the pruning and polariser defenses: trained without it, the small CNN memorises its
    training images (the defender's images come from there) and leans on single
    filters, so Grad-Prune's first pruned filter already costs >= alpha of validation
    accuracy and pruning stops at round 0, and NPD's runner-up class is the backdoor
    target for only ~10% of the images, so its targeted PGD does not find the trigger.
    """
    ds = small_data
    atk = attacks.get("badnets", target=0)

    def make():
        model = models.for_dataset("small_cnn", ds)
        p = attacks.poison(atk, ds.x_train, ds.y_train, ds.num_classes, 0.1,
                           jax.random.key(1))
        state, _ = train(model, p.x, p.y, TrainConfig(epochs=8, lr=0.05, batch_size=32),
                         jax.random.key(2), flip=False, progress=False)
        return model, state

    model, state = _once_per_run(tmp_path_factory, worker_id, "backdoored", make)
    return model, state, atk, attacks.test_set(atk, ds.x_test, ds.y_test, ds.num_classes)
