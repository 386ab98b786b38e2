"""WaNet and BPP: exact trigger values, the warp's pieces, and the per-batch poisoning."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import attacks
from bdjax.attacks import control, triggers, warp
from bdjax.errors import BdjaxError
from bdjax.kernels.augment import post_augment, rotate


# ------------------------------------------------------------------------------- BPP
def test_bpp_squeezes_to_eight_levels_exactly():
    grey = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    out = np.asarray(attacks.get("bpp").stamp(grey))
    levels = np.round(np.round(np.arange(256) / 255 * 7) / 7 * 255)
    np.testing.assert_array_equal(out[0, ..., 0].ravel(), levels)
    assert sorted(set(out.ravel().tolist())) == [0, 36, 73, 109, 146, 182, 219, 255]
    four = np.asarray(attacks.get("bpp", squeeze=4).stamp(grey))
    assert sorted(set(four.ravel().tolist())) == [0, 85, 170, 255]


def _floyd_numpy(img, n):
    img = img.astype(np.float64).copy()
    h, w, _ = img.shape
    for y in range(h):
        for x in range(w):
            old = img[y, x].copy()
            new = np.round(old / 255 * (n - 1)) / (n - 1) * 255
            err = old - new
            img[y, x] = new
            if x + 1 < w:
                img[y, x + 1] += err * 7 / 16
            if y + 1 < h and x + 1 < w:
                img[y + 1, x + 1] += err * 1 / 16
            if y + 1 < h:
                img[y + 1, x] += err * 5 / 16
            if x - 1 >= 0 and y + 1 < h:
                img[y + 1, x - 1] += err * 3 / 16
    return np.clip(np.round(img), 0, 255)


def test_bpp_dithering_is_floyd_steinberg():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2, 6, 7, 3), dtype=np.uint8)
    out = np.asarray(attacks.get("bpp", dithering=True).stamp(imgs))
    want = np.stack([_floyd_numpy(im, 8) for im in imgs])
    assert np.abs(out.astype(int) - want).max() <= 1  # float32 here, float64 in numpy
    assert (out != want).mean() < 0.01
    # dithering keeps the mean colour far better than plain squeezing
    plain = np.asarray(attacks.get("bpp").stamp(imgs)).astype(float)
    assert abs(out.mean() - imgs.mean()) < abs(plain.mean() - imgs.mean()) + 0.5


# ----------------------------------------------------------------------------- WaNet
def test_bicubic_matrix_is_torchs_align_corners_upsampling():
    m = warp.bicubic_matrix(4, 32)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)   # weights sum to one
    np.testing.assert_allclose(m[0], [1, 0, 0, 0], atol=1e-12)  # corners align
    np.testing.assert_allclose(m[-1], [0, 0, 0, 1], atol=1e-12)
    # inner rows against Keys' kernel with A = -0.75 written out independently
    def kernel(d, a=-0.75):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a if d < 2 else 0.0

    for i in (11, 15, 20):  # sources in [1, 2): all four taps inside
        src = i * 3 / 31
        np.testing.assert_allclose(m[i], [kernel(src - j) for j in range(4)], atol=1e-12)
    # torch's coefficients at t = 0.5 with A = -0.75
    np.testing.assert_allclose(warp._cubic_weights(np.asarray(0.5)),
                               [-0.09375, 0.59375, 0.59375, -0.09375])


def test_warp_grid_values():
    noise = warp.noise_field(3, 4, 32, 32)
    # the (2, k, k) noise is scaled to mean |noise| = 1; the upsampling keeps the corners
    ins = np.random.default_rng(3).uniform(-1, 1, (2, 4, 4))
    ins = ins / np.abs(ins).mean()
    np.testing.assert_allclose(noise[0, 0], ins[:, 0, 0])
    np.testing.assert_allclose(noise[-1, -1], ins[:, -1, -1])
    ident = warp.identity_grid(32, 32)
    assert ident[0, 0].tolist() == [-1, -1] and ident[0, -1].tolist() == [1, -1]
    grid = warp.warp_grid(3, 4, 0.5, 1.0, 32, 32)
    np.testing.assert_allclose(grid, np.clip(ident + 0.5 * noise / 32, -1, 1), atol=1e-6)
    assert grid.min() >= -1 and grid.max() <= 1
    assert np.abs(grid - ident).max() < 0.5 * np.abs(noise).max() / 32 + 1e-6


def _bilinear_numpy(img, grid):
    h, w, _ = img.shape
    out = np.zeros_like(img, dtype=np.float64)
    for i in range(h):
        for j in range(w):
            x = (grid[i, j, 0] + 1) * (w - 1) / 2
            y = (grid[i, j, 1] + 1) * (h - 1) / 2
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[i, j] += wy * wx * img[yy, xx]
    return out


def test_grid_sample_matches_bilinear_and_identity():
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, (1, 8, 9, 3)).astype(np.float32)
    ident = warp.identity_grid(8, 9).astype(np.float32)
    np.testing.assert_allclose(np.asarray(warp.grid_sample(jnp.asarray(img), ident)), img,
                               atol=1e-3)
    grid = np.clip(ident + rng.uniform(-0.3, 0.3, ident.shape), -1.2, 1.2).astype(np.float32)
    got = np.asarray(warp.grid_sample(jnp.asarray(img), grid))[0]
    np.testing.assert_allclose(got, _bilinear_numpy(img[0], grid), atol=1e-3)


def test_wanet_stamp_is_a_small_fixed_warp():
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    atk = attacks.get("wanet", grid_seed=5)
    a, b = np.asarray(atk.stamp(imgs)), np.asarray(atk.stamp(imgs))
    np.testing.assert_array_equal(a, b)
    other = np.asarray(attacks.get("wanet", grid_seed=6).stamp(imgs))
    assert (a != other).any()
    # s = 0 is the identity grid: no change at all
    np.testing.assert_array_equal(np.asarray(attacks.get("wanet", s=0.0).stamp(imgs)), imgs)
    # smooth images move by a fraction of a grey level per pixel of displacement
    smooth = np.broadcast_to(np.linspace(0, 255, 32)[None, None, :, None],
                             (1, 32, 32, 3)).round().astype(np.uint8)
    diff = np.abs(np.asarray(atk.stamp(smooth)).astype(int) - smooth.astype(int))
    assert 0 < diff.max() <= 8


# ----------------------------------------------------------------- augmentation
def test_post_augment_pieces():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (3, 8, 8, 1)).astype(np.float32))
    key = jax.random.key(0)
    same = post_augment(x, key, p_crop=0.0, p_rotate=0.0, flip=False)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(x))
    r90 = np.asarray(rotate(x, jnp.full((3,), 90.0)))
    np.testing.assert_array_equal(r90, np.rot90(np.asarray(x), 1, axes=(1, 2)))
    a = np.asarray(post_augment(x, key))
    np.testing.assert_array_equal(a, np.asarray(post_augment(x, key)))
    assert (a != np.asarray(x)).any()


# --------------------------------------------------------------- per-batch poisoning
def test_poison_count_follows_the_reference():
    assert int(control.poison_count(0.1, 128, jax.random.key(0))) == 12
    assert int(control.poison_count(0.05, 100, jax.random.key(0))) == 5
    draws = [int(control.poison_count(0.002, 128, jax.random.key(i))) for i in range(400)]
    assert set(draws) <= {0, 1} and 0.15 < np.mean(draws) < 0.36  # p = 0.256
    bd, cross = control.positions(8, jnp.int32(2), jnp.int32(3))
    assert np.asarray(bd).tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert np.asarray(cross).tolist() == [0, 0, 1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("name", ["wanet", "bpp"])
def test_batch_hooks_relabel_the_first_share(name):
    atk = attacks.get(name, target=3)
    ctx = control.Batch(atk, 0.1, 10, flip=False)
    hk = control.hooks(name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (40, 16, 16, 3)).astype(np.float32) / 255)
    y = jnp.asarray(rng.integers(4, 10, 40), jnp.int32)
    xp, yp, extra, state = hk.poison(ctx, {}, {}, {}, x, y, jax.random.key(1))
    assert state == {}  # nothing carried
    assert np.asarray(yp[:4]).tolist() == [3] * 4  # int(0.1 * 40)
    np.testing.assert_array_equal(np.asarray(yp[4:]), np.asarray(y[4:]))
    assert xp.shape == x.shape and float(extra) == 0.0
    assert 0 <= float(xp.min()) and float(xp.max()) <= 1


def test_bpp_batch_poisoning_before_augmentation():
    """With the post-augmentation switched off (rotation/crop probability 0 through a
    patched hook), poisoned images are squeezed exactly and negatives keep labels."""
    atk = attacks.get("bpp", target=0)
    ctx = control.Batch(atk, 0.25, 10, flip=False)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.integers(0, 256, (8, 8, 8, 3)).astype(np.float32) / 255)
    y = jnp.asarray(rng.integers(1, 10, 8), jnp.int32)
    import bdjax.attacks.control as ctl

    orig = ctl.post_augment
    ctl.post_augment = lambda v, k, flip: v
    try:
        xp, yp, _, _ = control.hooks("bpp").poison(ctx, {}, {}, {}, x, y, jax.random.key(0))
    finally:
        ctl.post_augment = orig
    pix = np.asarray(x) * 255
    np.testing.assert_allclose(np.asarray(xp[:2]) * 255,
                               np.round(pix[:2] / 255 * 7) / 7 * 255, atol=1e-4)
    # one negative (int(8 * 0.1) = 0 -> none); the rest untouched
    np.testing.assert_allclose(np.asarray(xp[2:]), np.asarray(x[2:]), atol=1e-6)
    assert np.asarray(yp).tolist() == [0, 0] + np.asarray(y[2:]).tolist()


def test_control_attacks_refuse_dataset_poisoning():
    x = np.zeros((10, 8, 8, 3), np.uint8)
    with pytest.raises(BdjaxError, match="each batch"):
        attacks.poison(attacks.get("wanet"), x, np.zeros(10, np.int32), 10, 0.1,
                       jax.random.key(0))


def test_static_stamps_follow_the_trigger_contract():
    imgs = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    for name in ("bpp", "wanet"):
        out = attacks.stamp_all(attacks.get(name), imgs, jax.random.key(0))
        assert out.dtype == np.uint8 and out.shape == imgs.shape
        np.testing.assert_array_equal(
            np.asarray(jax.vmap(lambda im: attacks.get(name).stamp(im[None])[0])(imgs)), out)
    assert triggers.quantise(jnp.float32(255), 8) == 255


def test_only_iab_batches_get_the_standard_augmentation_before_poisoning(monkeypatch):
    """The reference loads WaNet's and BPP's batches with the test transform (their only
    augmentation follows the poisoning) and IAB's with the training transform."""
    from bdjax import models
    from bdjax.train import TrainConfig

    assert (control.hooks("wanet").pre_augment, control.hooks("bpp").pre_augment,
            control.hooks("iab").pre_augment) == (False, False, True)
    calls = []

    def spy(images, key, *, flip=True, pad=4):
        calls.append(images.shape)
        return images

    monkeypatch.setattr(control, "crop_flip", spy)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    y = (np.arange(16) % 10).astype(np.int32)
    model = models.get("small_cnn")
    plain = control.Hooks(poison=lambda ctx, p, s, f, xb, yb, k: (xb, yb, jnp.float32(0), s))
    monkeypatch.setitem(control._HOOKS, "plain_test_hook", plain)
    for atk, expected in ((attacks.get("bpp"), 0),
                          (dataclasses.replace(attacks.get("badnets"), name="plain_test_hook"), 1)):
        ctx = control.Batch(atk, 0.25, 10, flip=False)
        calls.clear()
        control.train_controlled(model, x, y, TrainConfig(epochs=1, batch_size=8, lr=0.01),
                                 jax.random.key(0), ctx, progress=False, log=lambda m: None)
        assert len(calls) == expected, (atk.name, calls)  # traced once per compiled epoch


def _train_with_hook(monkeypatch, hook, x, **train):
    """``train_controlled`` of the small CNN on ``x`` (labels 0..9 repeated) with
    ``hook`` registered under a test name; returns the hook's ``arrays``."""
    from bdjax import models
    from bdjax.train import TrainConfig

    monkeypatch.setitem(control._HOOKS, "control_test_hook", hook)
    y = (np.arange(len(x)) % 10).astype(np.int32)
    ctx = control.Batch(dataclasses.replace(attacks.get("badnets"), name="control_test_hook"),
                        0.25, 10, flip=False)
    _, _, arrays = control.train_controlled(
        models.get("small_cnn"), x, y, TrainConfig(batch_size=8, lr=0.01, **train),
        jax.random.key(0), ctx, progress=False, log=lambda m: None)
    return arrays


def test_attack_optimizer_gets_the_classifiers_schedule(monkeypatch):
    """``Hooks.tx`` gets the classifier's lr over its peak (IAB's G follows it): an attack
    parameter with a unit gradient each update moves by lr times the sum of the
    fractions, here 4 updates of a per-batch cosine, 1 + 0.854 + 0.5 + 0.146 = 2.5 (a
    constant schedule's 1.0: ``test_iab``). Its ``poison`` takes no ``x2``: a hook
    without ``partners`` gets none."""
    import optax

    def poison(ctx, p, s, f, xb, yb, k):
        return xb, yb, p["w"], s

    def tx(ctx, scale):
        return optax.sgd(lambda c: 0.1 * scale(c)) if callable(scale) else optax.sgd(0.1 * scale)

    hook = control.Hooks(poison=poison, init=lambda ctx, key, x, y, log: ({"w": 0.0}, {}, {}),
                         tx=tx, arrays=lambda ctx, p, s, f: {"w": p["w"]})
    x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    arrays = _train_with_hook(monkeypatch, hook, x, epochs=2, schedule="cosine",
                              schedule_unit="batch", t_max=0)
    np.testing.assert_allclose(float(arrays["w"]), -0.1 * 2.5, rtol=1e-5)


def test_partner_hook_gets_a_second_pass_over_the_training_set(monkeypatch):
    """``Hooks.partners``: ``poison`` gets ``x2``, a second shuffle of the training
    images in [0, 1], each image once per epoch (16 images, 2 batches of 8: no fill)."""

    def poison(ctx, p, s, f, xb, yb, k, x2):
        return xb, yb, jnp.float32(0), {"sum": s["sum"] + jnp.sum(x2),
                                        "same": s["same"] + jnp.all(x2 == xb)}

    hook = control.Hooks(poison=poison, partners=True,
                         init=lambda ctx, key, x, y, log: ({}, {"sum": 0.0, "same": 0}, {}),
                         arrays=lambda ctx, p, s, f: s)
    x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    arrays = _train_with_hook(monkeypatch, hook, x, epochs=1, augment=False)
    np.testing.assert_allclose(float(arrays["sum"]), x.sum() / 255.0, rtol=1e-5)
    assert int(arrays["same"]) < 2  # not the batch itself
