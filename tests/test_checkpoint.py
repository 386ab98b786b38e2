"""Tests for bdjax.checkpoint: round trips, cross-device restore, atomicity, validation."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import checkpoint, models
from bdjax.errors import BdjaxError

REPO = pathlib.Path(__file__).resolve().parents[1]

METADATA = {
    "dataset": "synthetic",
    "attack": "badnet",
    "attack_params": {"patch_size": 3, "location": "bottom_right"},
    "target": 0,
    "poison_ratio": 0.1,
    "n_poisoned": np.int64(50),
    "acc": np.float32(0.9125),
    "asr": jnp.asarray(0.987, jnp.float32),
    "ra": 0.0125,
    "seed": 7,
    "train": {"epochs": 2, "lr": 0.01, "milestones": np.array([1, 2])},
}


def _state(seed: int = 0):
    """A small_cnn state whose batch_stats differ from their init values."""
    model = models.get("small_cnn")
    state = model.init(jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    state["batch_stats"] = jax.tree.map(
        lambda x: x + jax.random.uniform(next(keys), x.shape), state["batch_stats"])
    return model, state


@pytest.fixture(scope="module")
def model_state():
    return _state()


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _listing(path: pathlib.Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_round_trip(tmp_path, model_state):
    model, state = model_state
    out = checkpoint.save(tmp_path / "ckpt", model, state, METADATA)
    assert out == (tmp_path / "ckpt").absolute()
    assert _listing(out) == ["bdjax.json", "state"]

    restored_model, restored, meta = checkpoint.restore(out)

    assert restored_model == model
    _assert_trees_equal(restored, state)
    device = jax.local_devices()[0]
    for leaf in jax.tree.leaves(restored):
        assert isinstance(leaf, jax.Array) and leaf.devices() == {device}
    assert meta["acc"] == 0.9125  # float32 written in its short decimal form
    assert meta["asr"] == pytest.approx(0.987)
    assert meta["n_poisoned"] == 50 and meta["seed"] == 7
    assert meta["attack_params"] == METADATA["attack_params"]
    assert meta["train"] == {"epochs": 2, "lr": 0.01, "milestones": [1, 2]}
    assert meta["format"] == 1


def test_json_is_human_readable(tmp_path, model_state):
    model, state = model_state
    out = checkpoint.save(tmp_path / "ckpt", model, state, METADATA)
    text = (out / "bdjax.json").read_text()
    assert text.startswith('{\n  "acc"')  # indented, sorted keys
    doc = json.loads(text)
    assert doc["model"] == {"name": "small_cnn", "num_classes": 10, "mean": [0.5] * 3,
                            "std": [0.25] * 3, "image_shape": [32, 32, 3],
                            "dtype": "float32"}
    assert {"python", "jax", "jaxlib", "flax", "numpy", "orbax-checkpoint"} <= set(
        doc["versions"])
    assert doc["created"].endswith("+00:00")
    assert doc["tree"]["params/conv1/kernel"] == {"shape": [3, 3, 3, 16], "dtype": "float32"}
    assert doc["tree"]["batch_stats/bn4/var"] == {"shape": [128], "dtype": "float32"}
    assert checkpoint.load_metadata(out) == doc


def test_metadata_from_a_checkpoint_can_be_saved_again(tmp_path, model_state):
    model, state = model_state
    first = checkpoint.save(tmp_path / "a", model, state, METADATA)
    meta = checkpoint.load_metadata(first)
    second = checkpoint.save(tmp_path / "b", model, state, meta)
    again = checkpoint.load_metadata(second)
    assert {k: v for k, v in again.items() if k != "created"} == {
        k: v for k, v in meta.items() if k != "created"}


def test_extra_entries_round_trip(tmp_path, model_state):
    model, state = model_state
    state = dict(state)
    state["masks"] = {"conv4": jnp.arange(128) % 3 == 0,
                      "head": {"kernel": jnp.ones((128, 10), jnp.float32)}}
    state["polariser"] = {"scale": jnp.asarray(1.5, jnp.bfloat16), "unused": {}}
    out = checkpoint.save(tmp_path / "ckpt", model, state, {})

    _, restored, meta = checkpoint.restore(out)

    _assert_trees_equal(restored, state)
    assert restored["masks"]["conv4"].dtype == jnp.bool_
    assert meta["tree"]["polariser/unused"] == {}


_SAVE_ON_DEVICE_1 = """
import sys, jax, numpy as np
from bdjax import checkpoint, models
assert len(jax.devices()) == 2, jax.devices()
model = models.get("small_cnn", num_classes=4)
# Random values of the model's shapes: eval_shape avoids seconds of eager init compiles.
rng = np.random.default_rng(3)
state = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                     jax.eval_shape(model.init, jax.random.key(3)))
state["masks"] = {"conv1": np.arange(16) > 4}
state = jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[1]))
assert all(leaf.devices() == {jax.devices()[1]} for leaf in jax.tree.leaves(state))
checkpoint.save(sys.argv[1], model, state, {"acc": 0.5})
np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(state)])
"""

_RESTORE_ON_ONE_DEVICE = """
import sys, jax, numpy as np
from bdjax import checkpoint
assert len(jax.devices()) == 1, jax.devices()
model, state, meta = checkpoint.restore(sys.argv[1], expect_model="small_cnn",
                                        expect_classes=4)
assert all(leaf.devices() == {jax.devices()[0]} for leaf in jax.tree.leaves(state))
np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(state)])
"""


def _python(code: str, *args, devices: int) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_restore_state_saved_on_a_device_that_does_not_exist_here(tmp_path):
    # Orbax records device 1 in the saved sharding; the restoring process has only
    # device 0, as when a GPU checkpoint is loaded on a CPU-only machine.
    out, saved, restored = tmp_path / "ckpt", tmp_path / "saved.npz", tmp_path / "restored.npz"
    _python(_SAVE_ON_DEVICE_1, out, saved, devices=2)
    _python(_RESTORE_ON_ONE_DEVICE, out, restored, devices=1)
    with np.load(saved) as a, np.load(restored) as b:
        assert len(a.files) == len(b.files) == 23
        for name in a.files:
            assert a[name].dtype == b[name].dtype
            np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_after_orbax_write_leaves_nothing(tmp_path, model_state, monkeypatch, error):
    model, state = model_state
    seen = []

    def fail(path, document):
        seen.append(_listing(path.parent))  # the state was written, then we fail
        raise error

    monkeypatch.setattr(checkpoint, "_write_json", fail)
    with pytest.raises(type(error)):
        checkpoint.save(tmp_path / "ckpt", model, state, METADATA)
    assert seen == [["state"]]
    assert _listing(tmp_path) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, model_state, monkeypatch):
    model, state = model_state
    out = checkpoint.save(tmp_path / "ckpt", model, state, {"acc": 0.5})
    monkeypatch.setattr(checkpoint, "_write_json", _raise)
    with pytest.raises(RuntimeError):
        checkpoint.save(out, model, _state(seed=5)[1], {"acc": 0.9}, overwrite=True)
    assert _listing(tmp_path) == ["ckpt"]
    _, restored, meta = checkpoint.restore(out)
    _assert_trees_equal(restored, state)
    assert meta["acc"] == 0.5


def _raise(*args, **kwargs):
    raise RuntimeError("injected failure")


def test_existing_checkpoint_needs_overwrite(tmp_path, model_state):
    model, state = model_state
    out = checkpoint.save(tmp_path / "ckpt", model, state, {"acc": 0.5})
    with pytest.raises(BdjaxError, match=r"already exists.*overwrite=True.*--overwrite"):
        checkpoint.save(out, model, state, {"acc": 0.6})
    assert checkpoint.load_metadata(out)["acc"] == 0.5


def test_overwrite_replaces(tmp_path, model_state):
    model, state = model_state
    out = checkpoint.save(tmp_path / "ckpt", model, state, {"acc": 0.5})
    _, new_state = _state(seed=5)
    checkpoint.save(out, model, new_state, {"acc": 0.9}, overwrite=True)
    assert _listing(tmp_path) == ["ckpt"]  # no temporary or old copy left
    _, restored, meta = checkpoint.restore(out)
    _assert_trees_equal(restored, new_state)
    assert meta["acc"] == 0.9


def test_saves_into_an_empty_existing_directory(tmp_path, model_state):
    model, state = model_state
    (tmp_path / "ckpt").mkdir()
    checkpoint.save(tmp_path / "ckpt", model, state, {})
    assert _listing(tmp_path / "ckpt") == ["bdjax.json", "state"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_refuses_to_replace_what_is_not_a_checkpoint(tmp_path, model_state, overwrite):
    model, state = model_state
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    file = tmp_path / "file"
    file.write_text("keep me too")
    with pytest.raises(BdjaxError, match="not a bdjax checkpoint"):
        checkpoint.save(folder, model, state, {}, overwrite=overwrite)
    with pytest.raises(BdjaxError, match="not a directory"):
        checkpoint.save(file, model, state, {}, overwrite=overwrite)
    assert _listing(folder) == ["notes.txt"]
    assert file.read_text() == "keep me too"
    assert _listing(tmp_path) == ["file", "results"]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_state_is_not_saved(tmp_path, model_state, bad):
    model, state = model_state
    broken = jax.tree.map(lambda x: x, state)
    broken["params"]["conv2"]["kernel"] = state["params"]["conv2"]["kernel"].at[0, 0, 0, 0].set(bad)
    with pytest.raises(BdjaxError, match="params/conv2/kernel contains NaN or Inf"):
        checkpoint.save(tmp_path / "ckpt", model, broken, {})
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("metadata, key", [
    ({"acc": float("nan")}, "acc"),
    ({"asr": np.float32(np.inf)}, "asr"),
    ({"train": {"losses": jnp.asarray([0.5, jnp.nan])}}, "train.losses"),
])
def test_non_finite_metadata_is_rejected(tmp_path, model_state, metadata, key):
    model, state = model_state
    with pytest.raises(BdjaxError, match=rf"metadata {key}\S* is (nan|inf)"):
        checkpoint.save(tmp_path / "ckpt", model, state, metadata)
    assert _listing(tmp_path) == []


def test_unserialisable_metadata_is_rejected(tmp_path, model_state):
    model, state = model_state
    with pytest.raises(BdjaxError, match="metadata trigger is a function"):
        checkpoint.save(tmp_path / "ckpt", model, state, {"trigger": lambda x: x})


def test_state_of_another_model_is_not_saved(tmp_path, model_state):
    _, state = model_state
    five_classes = models.get("small_cnn", num_classes=5)
    with pytest.raises(BdjaxError, match=r"params/head/bias is of shape \(10,\).*\(5,\)"):
        checkpoint.save(tmp_path / "ckpt", five_classes, state, {})
    assert _listing(tmp_path) == []


def test_expectation_mismatch_names_both(tmp_path, model_state):
    model, state = model_state
    out = checkpoint.save(tmp_path / "ckpt", model, state, {})
    with pytest.raises(BdjaxError, match=r"'small_cnn'.*'preact_resnet18'"):
        checkpoint.restore(out, expect_model="preact_resnet18")
    with pytest.raises(BdjaxError, match=r"10 classes.*43"):
        checkpoint.restore(out, expect_classes=43)
    checkpoint.restore(out, expect_model="small_cnn", expect_classes=10)


def test_summary_that_does_not_fit_the_model_is_rejected(tmp_path, model_state):
    model, state = model_state
    out = checkpoint.save(tmp_path / "ckpt", model, state, {})
    doc = json.loads((out / "bdjax.json").read_text())
    doc["model"]["num_classes"] = 7
    (out / "bdjax.json").write_text(json.dumps(doc))
    with pytest.raises(BdjaxError, match=r"does not fit model 'small_cnn' with 7 classes"):
        checkpoint.restore(out)


def test_missing_and_corrupt_checkpoints(tmp_path, model_state):
    model, state = model_state
    with pytest.raises(BdjaxError, match=r"does not exist.*bdjax attack --out DIR"):
        checkpoint.restore(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BdjaxError, match="not a bdjax checkpoint"):
        checkpoint.restore(tmp_path / "plain")

    out = checkpoint.save(tmp_path / "ckpt", model, state, {})
    json_text = (out / "bdjax.json").read_text()
    (out / "bdjax.json").write_text(json_text[:100])
    with pytest.raises(BdjaxError, match=r"bdjax.json cannot be read \(JSONDecodeError"):
        checkpoint.describe(out)
    (out / "bdjax.json").write_text(json_text)
    shutil.rmtree(out / "state")
    with pytest.raises(BdjaxError, match="has no state/ directory"):
        checkpoint.restore(out)


# After a failed read, TensorStore callbacks may still reach Orbax's closed event loop and
# Python reports "Event loop is closed" as an unraisable exception; the error we raise is
# what matters here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_state_is_one_clear_error(tmp_path, model_state):
    model, state = model_state
    out = checkpoint.save(tmp_path / "ckpt", model, state, {})
    for data in (out / "state").rglob("*"):
        if data.is_file() and data.parent.name == "d":
            data.write_bytes(b"garbage")
    with pytest.raises(BdjaxError, match=r"state .* is corrupt or incomplete \(\w+: ") as info:
        checkpoint.restore(out)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300 + 2 * len(str(out))
    # Let those late callbacks fire inside this test, where the warning is filtered.
    time.sleep(0.5)
    gc.collect()


def test_describe(tmp_path, model_state):
    model, state = model_state
    out = checkpoint.save(tmp_path / "ckpt", model, state, {**METADATA, "note": "smoke"})
    text = checkpoint.describe(out)
    lines = text.splitlines()
    assert "small_cnn (10 classes" in lines[1]
    assert "0.9125 (91.25%)" in text and "0.9870 (98.70%)" in text and "1.25%" in text
    assert "patch_size=3" in text and "orbax-checkpoint" in text
    assert f"{models.count_params(state):,}" in text
    labels = [line.split()[0] for line in lines]
    # Known keys in a fixed order, unknown ones after them.
    assert labels.index("dataset") < labels.index("attack") < labels.index("ACC") \
        < labels.index("seed") < labels.index("note") < labels.index("versions")
