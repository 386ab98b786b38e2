import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import attacks
from bdjax.attacks import triggers
from bdjax.errors import BdjaxError

RNG = np.random.default_rng(0)
X = RNG.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)


def test_badnets_sets_rows_and_cols_29_to_31_and_nothing_else():
    out = np.asarray(attacks.get("badnets").stamp(X))
    assert out.dtype == np.uint8
    assert (out[:, 29:32, 29:32, :] == 255).all()
    changed = (out != X).any(axis=(0, 3))
    mask = np.zeros((32, 32), bool)
    mask[29:, 29:] = True
    assert not changed[~mask].any()
    np.testing.assert_array_equal(out[:, :29], X[:, :29])
    np.testing.assert_array_equal(out[:, :, :29], X[:, :, :29])


def test_badnets_scales_to_64x64():
    x = np.zeros((1, 64, 64, 3), np.uint8)
    out = np.asarray(triggers.badnets(x))
    assert out.sum() == 6 * 6 * 3 * 255 and (out[0, 58:, 58:] == 255).all()


def test_blended_formula():
    out = np.asarray(attacks.get("blended", alpha=0.2).stamp(X))
    t = triggers.blend_image(32, 32, 3).astype(np.float32)
    expected = np.clip(np.round(0.8 * X.astype(np.float32) + 0.2 * t), 0, 255)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_blend_image_is_fixed_and_natural_looking():
    a, b = triggers.blend_image(32, 32, 3), triggers.blend_image(32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.min() == 0 and a.max() == 255
    # Smooth: neighbouring pixels differ far less than random pixels do.
    assert np.abs(np.diff(a.astype(int), axis=1)).mean() < 20


def _picture(path, size=(57, 40)):
    """A sharp-edged RGB picture of another size, written as a real PNG file."""
    from PIL import Image

    w, h = size
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([(xx * 7) % 256, (yy * 11) % 256, ((xx // 6 + yy // 6) % 2) * 255], -1)
    Image.fromarray(img.astype(np.uint8)).save(path)
    return path


def test_blended_with_an_image_file_resizes_it_as_the_reference(tmp_path):
    """--param image=PATH: read the file, resize it to the input size with PIL's bilinear
    filter (the reference's transforms.Resize on a PIL image), blend it; the attack
    records the file's absolute path and SHA-256."""
    from PIL import Image

    path = _picture(tmp_path / "kitty.png")
    atk = attacks.get("blended", image=str(path))
    params = dict(atk.params)
    assert params["image"] == str(path.resolve())
    assert params["image_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with Image.open(path) as im:
        t = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR), np.float32)
    out = np.asarray(atk.stamp(X))
    want = np.clip(np.round(0.8 * X.astype(np.float32) + 0.2 * t), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, want)
    assert not np.array_equal(out, np.asarray(attacks.get("blended").stamp(X)))
    # Greyscale datasets get a greyscale trigger.
    g = np.asarray(atk.stamp(np.zeros((2, 16, 16, 1), np.uint8)))
    assert g.shape == (2, 16, 16, 1)


def test_blended_image_is_rebuilt_from_checkpoint_metadata_and_checked(tmp_path):
    from bdjax import experiment

    path = _picture(tmp_path / "t.png")
    atk = attacks.get("blended", image=str(path), alpha=0.1)
    meta = {"attack": json.loads(json.dumps(atk.config))}  # as bdjax.json stores it
    assert meta["attack"]["params"]["image_sha256"] == dict(atk.params)["image_sha256"]
    assert experiment.attack_from_meta(meta, 10) == atk
    _picture(path, size=(20, 20))  # the file changed since the checkpoint was made
    with pytest.raises(BdjaxError, match="has SHA-256"):
        experiment.attack_from_meta(meta, 10)


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing.png", "does not exist"),
    (lambda p: (p / "notes.png").write_text("not an image") and p / "notes.png",
     "could not be read"),
])
def test_blended_rejects_bad_image_files(tmp_path, make, match):
    with pytest.raises(BdjaxError, match=match):
        attacks.get("blended", image=str(make(tmp_path)))


def test_sig_adds_the_sinusoid_per_column():
    x = np.full((2, 32, 32, 3), 128, np.uint8)
    out = np.asarray(attacks.get("sig").stamp(x)).astype(int)
    for j in range(32):
        v = int(np.rint(40 * np.sin(2 * np.pi * j * 6 / 32)))
        assert (out[:, :, j, :] == 128 + v).all(), j
    # Clipping at both ends.
    lo = np.asarray(attacks.get("sig").stamp(np.zeros_like(x))).astype(int)
    hi = np.asarray(attacks.get("sig").stamp(np.full_like(x, 255))).astype(int)
    assert lo.min() == 0 and hi.max() == 255


# attacks whose stamp reads a generated file (tested with their files elsewhere)
NEEDS_FILE = ("iab", "lf", "ssba", "trojan")


def test_stamps_are_jittable_and_vmappable():
    for name in sorted(set(attacks.names()) - set(NEEDS_FILE)):
        a = attacks.get(name)
        direct = np.asarray(a.stamp(X))
        jitted = np.asarray(jax.jit(a.stamp)(jnp.asarray(X)))
        vmapped = np.asarray(jax.vmap(lambda img: a.stamp(img[None])[0])(jnp.asarray(X)))
        np.testing.assert_array_equal(direct, jitted)
        np.testing.assert_array_equal(direct, vmapped)


@pytest.mark.parametrize("name", NEEDS_FILE)
def test_a_missing_resource_file_is_one_clear_sentence(name):
    with pytest.raises(BdjaxError, match=f"has no .* file yet.*bdjax attack --attack {name}"):
        attacks.get(name).stamp(X)
    with pytest.raises(BdjaxError, match="does not exist"):
        attacks.get(name, **{attacks.get(name).files.popitem()[0]: "/nonexistent.npz"})


def test_dirty_label_poisoning():
    y = np.arange(1000) % 10
    x = np.zeros((1000, 32, 32, 3), np.uint8)
    atk = attacks.get("badnets", target=3)
    p = attacks.poison(atk, x, y, 10, 0.1, jax.random.key(0))
    assert len(p.indices) == 100 and len(set(p.indices)) == 100
    assert (p.y[p.indices] == 3).all()
    rest = np.setdiff1d(np.arange(1000), p.indices)
    np.testing.assert_array_equal(p.y[rest], y[rest])
    assert (p.x[p.indices, 29:, 29:] == 255).all() and (p.x[rest] == 0).all()
    # Same key, same poison; another key, another choice.
    again = attacks.poison(atk, x, y, 10, 0.1, jax.random.key(0))
    np.testing.assert_array_equal(again.indices, p.indices)
    other = attacks.poison(atk, x, y, 10, 0.1, jax.random.key(1))
    assert set(other.indices) != set(p.indices)


def test_all_to_all_labels():
    y = np.arange(20) % 10
    atk = attacks.get("badnets", mode="all_to_all")
    p = attacks.poison(atk, np.zeros((20, 32, 32, 3), np.uint8), y, 10, 0.5, jax.random.key(0))
    np.testing.assert_array_equal(p.y[p.indices], (y[p.indices] + 1) % 10)
    ts = attacks.test_set(atk, np.zeros((20, 32, 32, 3), np.uint8), y, 10)
    assert ts.valid.all() and (ts.y_target == (y + 1) % 10).all()


def test_clean_label_sig_poisons_only_target_class_and_keeps_labels():
    y = np.arange(1000) % 10
    x = np.full((1000, 32, 32, 3), 100, np.uint8)
    p = attacks.poison(attacks.get("sig", target=2), x, y, 10, 0.05, jax.random.key(0))
    assert len(p.indices) == 50 and (y[p.indices] == 2).all()
    np.testing.assert_array_equal(p.y, y)
    with pytest.raises(BdjaxError, match="clean-label"):
        attacks.poison(attacks.get("sig", target=2), x, y, 10, 0.2, jax.random.key(0))


def test_test_set_excludes_target_class_for_all_to_one():
    y = np.arange(30) % 10
    ts = attacks.test_set(attacks.get("badnets", target=4), np.zeros((30, 32, 32, 3), np.uint8),
                          y, 10)
    np.testing.assert_array_equal(ts.valid, y != 4)
    assert (ts.y_target == 4).all() and (ts.x_poisoned[:, 29:, 29:] == 255).all()


@pytest.mark.parametrize("call,match", [
    (lambda: attacks.get("trojannn"), "unknown attack 'trojannn'"),
    (lambda: attacks.get("badnets", target=10), "target 10"),
    (lambda: attacks.get("badnets", mode="one_to_one"), "one_to_one"),
    (lambda: attacks.get("blended", alpha=1.5), "alpha 1.5"),
    (lambda: attacks.get("badnets", colour=3), "colour"),
    (lambda: attacks.get("sig", mode="all_to_all"), "clean-label"),
    (lambda: attacks.poison(attacks.get("badnets"), X, np.zeros(6, int), 10, 1.5,
                            jax.random.key(0)), "poison ratio 1.5"),
])
def test_bad_attack_input_is_one_clear_error(call, match):
    with pytest.raises(BdjaxError, match=match):
        call()
