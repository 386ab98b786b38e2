import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import models
from bdjax.errors import BdjaxError
from bdjax.kernels import batch_indices, crop_flip
from bdjax.train import TrainConfig, train


def test_crop_flip_is_a_shifted_window_of_the_zero_padded_image():
    x = jnp.asarray(np.random.default_rng(0).integers(1, 256, (64, 8, 8, 3), np.uint8))
    out = np.asarray(crop_flip(x, jax.random.key(0), pad=2, flip=False))
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if (padded[i, dy:dy + 8, dx:dx + 8] == out[i]).all()]
        assert hits, i
    # Different samples get different offsets.
    assert len({out[i].tobytes() for i in range(len(x))}) > 1


def test_crop_flip_flips_about_half():
    x = jnp.asarray(np.random.default_rng(0).integers(1, 256, (200, 8, 8, 3), np.uint8))
    out = np.asarray(crop_flip(x, jax.random.key(1), pad=0, flip=True))
    flipped = (out == np.asarray(x)[:, :, ::-1]).all(axis=(1, 2, 3))
    same = (out == np.asarray(x)).all(axis=(1, 2, 3))
    assert (flipped | same).all() and 60 < flipped.sum() < 140


def test_batch_indices_cover_every_image_once_per_epoch():
    idx = np.asarray(batch_indices(jax.random.key(0), 90, 256))
    assert idx.shape == (1, 90) and sorted(idx[0]) == list(range(90))
    idx = np.asarray(batch_indices(jax.random.key(0), 10, 4))
    assert idx.shape == (3, 4) and set(idx.ravel()) == set(range(10))


def test_scan_epoch_partner_stream_is_a_second_independent_shuffle():
    """``partners``: the step also gets the same batch position of a second shuffle
    (IAB's second data loader): every image once per epoch, another order, and the
    first stream and the step keys exactly as without it."""
    from bdjax.kernels import scan_epoch

    x, y = jnp.arange(10, dtype=jnp.int32), jnp.zeros(10, jnp.int32)

    def collect(partners):
        def step(rows, i, xb, yb, k, *x2b):  # records each batch as a row of the state
            row = jnp.concatenate([xb, jax.random.key_data(k).astype(jnp.int32), *x2b])
            return rows.at[i].set(row), i + 1, jnp.float32(0), jnp.float32(0)
        width = 4 + 2 + (4 if partners else 0)  # batch, key data, partner batch
        rows, _, _, _ = scan_epoch(step, 4, jnp.zeros((3, width), jnp.int32), jnp.int32(0),
                                   x, y, jax.random.key(3), partners=partners)
        return np.asarray(rows)

    plain, both = collect(False), collect(True)
    np.testing.assert_array_equal(both[:, :6], plain)  # batches and step keys unchanged
    first, second = both[:, :4].ravel(), both[:, 6:].ravel()
    assert sorted(second[:10]) == list(range(10))  # every image once (then the fill)
    assert not np.array_equal(first, second)


def test_training_learns_and_is_reproducible(small_data):
    ds = small_data
    model = models.for_dataset("small_cnn", ds)
    cfg = TrainConfig(epochs=2, lr=0.05)
    x, y = ds.x_train[:1024], ds.y_train[:1024]
    s1, h1 = train(model, x, y, cfg, jax.random.key(0), progress=False)
    s2, h2 = train(model, x, y, cfg, jax.random.key(0), progress=False)
    assert h1[-1]["loss"] < h1[0]["loss"]
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        np.testing.assert_array_equal(a, b)
    s3, _ = train(model, x, y, cfg, jax.random.key(1), progress=False)
    assert not np.array_equal(s1["params"]["head"]["kernel"], s3["params"]["head"]["kernel"])


def test_backdoored_fixture_learned_task_and_trigger(backdoored):
    from bdjax import experiment

    model, state, _, test = backdoored
    scores = experiment.evaluate(model, state, test)
    assert scores["acc"] > 0.8 and scores["asr"] > 0.9
    assert scores["asr"] + scores["ra"] <= 1 + 1e-6


def test_train_config_rejects_bad_values():
    with pytest.raises(BdjaxError, match="schedule 'linear'"):
        TrainConfig(schedule="linear")
    with pytest.raises(BdjaxError, match="epochs 0"):
        TrainConfig(epochs=0)
