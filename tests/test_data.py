import jax
import numpy as np
import pytest

from bdjax import data
from bdjax.data import synthetic
from bdjax.errors import BdjaxError


def test_synthetic_defaults_shape_and_balance():
    ds = data.load("synthetic")
    assert ds.x_train.shape == (10_000, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (2_000, 32, 32, 3)
    assert ds.num_classes == 10 and len(ds.class_names) == 10
    np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 1000))
    # The images use the whole intensity range and are not constant.
    assert ds.x_train.min() == 0 and ds.x_train.max() == 255
    assert ds.x_train.reshape(len(ds.x_train), -1).std(axis=1).min() > 10


def test_synthetic_is_a_pure_function_of_the_seed():
    a, ya = synthetic.generate(300, seed=5)
    b, yb = synthetic.generate(300, seed=5)
    c, _ = synthetic.generate(300, seed=6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    assert (a != c).mean() > 0.5
    # Chunking does not change the output.
    d, _ = synthetic.generate(300, seed=5, chunk=64)
    assert d.shape == a.shape


def test_synthetic_colour_does_not_give_away_the_class():
    """Mean colour per class is nearly the same: the class is in the shape, not the hue."""
    ds = data.load("synthetic")
    means = np.stack([ds.x_train[ds.y_train == c].mean(axis=(0, 1, 2)) for c in range(10)])
    assert np.ptp(means, axis=0).max() < 12  # grey levels, out of 255


@pytest.mark.parametrize("spc,expected", [(2, (2, 1)), (10, (9, 1)), (100, (90, 10))])
def test_spc_split_rule(spc, expected):
    assert data.split_sizes(spc) == expected


@pytest.mark.parametrize("spc", [2, 10, 100])
def test_without_validation_every_image_trains(spc):
    """Defenses that select nothing on validation train on all SPC images (the survey's
    fork: val_ratio=0), so SPC 2 gives 2 images per class, not 2 + 1."""
    assert data.split_sizes(spc, validation=False) == (spc, 0)


@pytest.mark.parametrize("kwargs,per_class", [({"spc": 2}, 2), ({"spc": 10}, 10),
                                              ({"ratio": 0.05}, 40)])
def test_defense_split_without_validation(small_data, kwargs, per_class):
    ds = small_data
    split = data.defense_split(ds.x_train, ds.y_train, 10, key=jax.random.key(0),
                               trials=(0, 1), validation=False, **kwargs)
    assert split.x_train.shape == (2, 10 * per_class, 32, 32, 3)
    assert split.x_val.shape == (2, 0, 32, 32, 3) and split.y_val.shape == (2, 0)
    np.testing.assert_array_equal(np.bincount(split.y_train[1], minlength=10),
                                  np.full(10, per_class))


def test_defense_split_spc_per_trial(small_data):
    ds = small_data
    key = jax.random.key(0)
    split = data.defense_split(ds.x_train, ds.y_train, 10, key=key, trials=(0, 1, 2), spc=10)
    assert split.x_train.shape == (3, 90, 32, 32, 3) and split.x_val.shape == (3, 10, 32, 32, 3)
    for t in range(3):
        np.testing.assert_array_equal(np.bincount(split.y_train[t], minlength=10), np.full(10, 9))
        np.testing.assert_array_equal(np.bincount(split.y_val[t], minlength=10), np.ones(10))
    # Trials differ; the same trial id gives the same subset wherever it runs.
    assert (split.x_train[0] != split.x_train[1]).any()
    alone = data.defense_split(ds.x_train, ds.y_train, 10, key=key, trials=(2,), spc=10)
    np.testing.assert_array_equal(alone.x_train[0], split.x_train[2])


def test_defense_split_train_and_val_are_disjoint(small_data):
    ds = small_data
    from bdjax.data.splits import draw_indices

    tr, va = draw_indices(ds.y_train, 10, 100, jax.random.key(3))
    assert len(tr) == 900 and len(va) == 100 and not set(tr) & set(va)


def test_defense_split_ratio_is_class_balanced(small_data):
    ds = small_data
    split = data.defense_split(ds.x_train, ds.y_train, 10, key=jax.random.key(0),
                               trials=(0,), ratio=0.05)
    # 5% of 8000 = 400 = 40 per class -> 4 val + 36 train per class.
    np.testing.assert_array_equal(np.bincount(split.y_train[0], minlength=10), np.full(10, 36))
    np.testing.assert_array_equal(np.bincount(split.y_val[0], minlength=10), np.full(10, 4))


@pytest.mark.parametrize("kwargs,match", [
    ({"spc": 0}, "spc 0"), ({"ratio": 1.5}, "ratio 1.5"), ({"spc": 1000}, "smallest class"),
    ({}, "exactly one"), ({"spc": 10, "ratio": 0.1}, "exactly one")])
def test_defense_split_rejects_bad_settings(small_data, kwargs, match):
    with pytest.raises(BdjaxError, match=match):
        data.defense_split(small_data.x_train, small_data.y_train, 10, key=jax.random.key(0),
                           **kwargs)


def test_load_rejects_unknown_dataset():
    with pytest.raises(BdjaxError, match="unknown dataset 'mnist'.*synthetic"):
        data.load("mnist")


def test_dataset_validates_images_and_labels():
    x = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(BdjaxError, match="dtype float32"):
        data.Dataset("t", x.astype(np.float32), np.zeros(4, int), x, np.zeros(4, int), 10,
                     (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(BdjaxError, match="label 10"):
        data.Dataset("t", x, np.array([0, 1, 2, 10]), x, np.zeros(4, int), 10,
                     (0.5,) * 3, (0.5,) * 3)
