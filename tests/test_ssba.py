"""Tests of the SSBA encoder/decoder (bdjax.attacks.ssba).

Tiny on purpose: 16x16 images, width 8, 4-bit secrets, 128 images in batches of 16, so
every training run shares one compiled epoch (the hyperparameters that differ between
runs enter it as values).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import data
from bdjax.attacks import ssba
from bdjax.errors import BdjaxError

# Shapes shared by every training run below (one compile): 128 images, batch 16, 4 bits.
SMALL = ssba.SSBAConfig(epochs=2, batch_size=16, lr=2e-3, bits=4, width=8)


@pytest.fixture(scope="module")
def images():
    """128 synthetic images downsampled 2x2 to 16x16 (uint8)."""
    ds = data.load("synthetic", seed=0, n_train=128, n_test=8)
    x = ds.x_train.astype(np.float32).reshape(128, 16, 2, 16, 2, 3).mean((2, 4))
    return np.round(x).astype(np.uint8)


@pytest.fixture(scope="module")
def trained(images):
    """400 steps; the image loss starts once a batch decodes > 90% of its bits."""
    cfg = dataclasses.replace(SMALL, epochs=50, image_await=0, image_ramp=20,
                              image_weight=40.0)
    params, history = ssba.train_encoder(images, jax.random.key(0), cfg)
    return cfg, params, history


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) / 255.0 ** 2
    return 10 * np.log10(1 / mse)


def test_architecture_matches_the_reference_layers():
    # Layer shapes of BackdoorBench resource/ssba/models.py (StegaStampEncoder/Decoder)
    # at 32x32x3, 100 bits; flax kernels are HWIO / (in, out).
    p = ssba.init_params(jax.random.key(0), (32, 32, 3))
    enc = {k: v["kernel"].shape for k, v in p["encoder"]["params"].items()}
    assert enc == {
        "secret_dense": (100, 768), "conv1": (3, 3, 6, 32), "conv2": (3, 3, 32, 32),
        "conv3": (3, 3, 32, 64), "conv4": (3, 3, 64, 128), "conv5": (3, 3, 128, 256),
        "up6": (2, 2, 256, 128), "conv6": (3, 3, 256, 128), "up7": (2, 2, 128, 64),
        "conv7": (3, 3, 128, 64), "up8": (2, 2, 64, 32), "conv8": (3, 3, 64, 32),
        "up9": (2, 2, 32, 32), "conv9": (3, 3, 70, 32), "conv10": (3, 3, 32, 32),
        "residual": (1, 1, 32, 3)}
    dec = {k: v["kernel"].shape for k, v in p["decoder"]["params"].items()}
    assert dec == {
        "conv1": (3, 3, 3, 32), "conv2": (3, 3, 32, 32), "conv3": (3, 3, 32, 64),
        "conv4": (3, 3, 64, 64), "conv5": (3, 3, 64, 64), "conv6": (3, 3, 64, 128),
        "conv7": (3, 3, 128, 128), "dense1": (128, 512), "dense2": (512, 100)}
    # 64x64, one channel: the decoder's dense input grows to 2*2*128 (reference formula
    # resolution^2 * 128 / 32 / 32), the encoder's secret map to 16*16*1.
    q = ssba.init_params(jax.random.key(0), (64, 64, 1))
    assert q["decoder"]["params"]["dense1"]["kernel"].shape == (64 * 64 * 128 // 1024, 512)
    assert q["encoder"]["params"]["secret_dense"]["kernel"].shape == (100, 256)
    assert q["encoder"]["params"]["residual"]["kernel"].shape == (1, 1, 32, 1)


def test_init_is_pytorch_uniform_and_follows_the_key():
    a = ssba.init_params(jax.random.key(3), (16, 16, 3), SMALL)
    b = ssba.init_params(jax.random.key(3), (16, 16, 3), SMALL)
    c = ssba.init_params(jax.random.key(4), (16, 16, 3), SMALL)
    for part in ("encoder", "decoder"):
        for name, layer in a[part]["params"].items():
            bound = 1 / np.sqrt(np.prod(layer["kernel"].shape[:-1]))
            for leaf in (layer["kernel"], layer["bias"]):
                v = np.asarray(leaf)
                assert v.dtype == np.float32 and np.abs(v).max() <= bound * (1 + 1e-6), name
            k = np.asarray(layer["kernel"])
            if k.size >= 200:  # U(-b, b): the extremes come close to b, the spread is b/sqrt3
                assert np.abs(k).max() > 0.9 * bound, name
                assert abs(k.std() - bound / np.sqrt(3)) < 0.15 * bound, name
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_make_secret():
    s = ssba.make_secret(jax.random.key(0), 1000)
    assert s.dtype == jnp.float32 and s.shape == (1000,)
    assert set(np.unique(np.asarray(s))) == {0.0, 1.0}
    assert 0.45 < float(s.mean()) < 0.55
    np.testing.assert_array_equal(s, ssba.make_secret(jax.random.key(0), 1000))
    assert not np.array_equal(s, ssba.make_secret(jax.random.key(1), 1000))
    with pytest.raises(BdjaxError, match="bits"):
        ssba.make_secret(jax.random.key(0), 0)


def test_to_uint8_rounds_half_up_like_torchvision_save_image():
    x = np.random.default_rng(0).uniform(-0.2, 1.2, 5000).astype(np.float32)
    x[:6] = [0.0, 1.0, -1.0, 2.0, np.float32(0.5), np.float32(0.25)]
    expected = np.clip(np.floor(x * np.float32(255) + np.float32(0.5)), 0, 255)
    out = np.asarray(ssba._to_uint8(jnp.asarray(x)))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    assert list(out[:6]) == [0, 255, 0, 255, 128, 64]  # 127.5 -> 128, 63.75 -> 64


def test_encode_decode_match_the_modules(images):
    params = ssba.init_params(jax.random.key(1), (16, 16, 3), SMALL)
    x = images[:8]
    secret = ssba.make_secret(jax.random.key(2), SMALL.bits)
    out = np.asarray(ssba.encode(params, x, secret))
    assert out.shape == x.shape and out.dtype == np.uint8
    y = np.asarray(jax.jit(lambda v, s, im: ssba.Encoder(4, 8).apply(v, s, im))(
        params["encoder"], jnp.tile(secret, (8, 1)), x.astype(np.float32) / 255))
    assert y.min() > 0 and y.max() < 1  # sigmoid output: the encoded image itself
    scaled = y * 255 + 0.5
    expected = np.clip(np.floor(scaled), 0, 255)
    assert np.abs(out - expected).max() <= 1
    clear = np.abs(scaled - np.round(scaled)) > 1e-3  # away from a rounding boundary
    np.testing.assert_array_equal(out[clear], expected[clear])
    # One secret for all images = the same secret given per image.
    np.testing.assert_array_equal(out, ssba.encode(params, x, jnp.tile(secret, (8, 1))))
    probs = np.asarray(ssba.decode_bits(params, out))
    logits = np.asarray(jax.jit(lambda v, im: ssba.Decoder(4, 8).apply(v, im))(
        params["decoder"], out.astype(np.float32) / 255))
    assert probs.shape == (8, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-6)
    # vmappable over a trial axis, and a trigger in the stamp(images, key) contract.
    stacked = jax.vmap(ssba.encode, in_axes=(None, 0, None))(params, x.reshape(2, 4, 16, 16, 3),
                                                             secret)
    np.testing.assert_array_equal(np.asarray(stacked).reshape(x.shape), out)
    np.testing.assert_array_equal(ssba.stamp_fn(params, secret)(x, jax.random.key(0)), out)


def test_weight_schedule_matches_the_reference_formula():
    # train.py: min(max(0, 10 * (steps_since - 1000) / 3000), 10), steps_since = -1 before
    since = np.arange(-1, 5000)
    w = np.asarray(ssba._weight(ssba._hyper(ssba.SSBAConfig()), jnp.asarray(since, jnp.int32)))
    expected = np.minimum(np.maximum(0, 10 * (since - 1000) / 3000), 10)
    np.testing.assert_allclose(w, expected, rtol=1e-6, atol=1e-6)


def test_training_is_deterministic_and_the_ramp_is_carried_state(images):
    # Threshold 0.99 on 64 bits a batch is never reached in 16 steps: no image loss.
    off = dataclasses.replace(SMALL, ramp_threshold=0.99)
    p1, h1 = ssba.train_encoder(images, jax.random.key(7), off)
    p2, h2 = ssba.train_encoder(images, jax.random.key(7), off)
    p3, _ = ssba.train_encoder(images, jax.random.key(8), off)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1),
                                                        jax.tree.leaves(p3)))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(h1) == strip(h2)
    for row in h1:
        assert not row["activated"] and row["image_weight"] == 0 and row["loss"] == row["bce"]
        assert row["steps"] == 8 and 0 <= row["bit_acc"] <= 1
        np.testing.assert_allclose(row["psnr"], 10 * np.log10(1 / row["mse"]), rtol=1e-9)

    # Threshold 0: the first step activates, so the counter is -1, 0, 1, ... and the
    # weight min(max(0, 10 (since - 3) / 5), 10) ramps over steps 5..9; epochs 8 steps.
    on = dataclasses.replace(SMALL, ramp_threshold=0.0, image_await=3, image_ramp=5)
    _, h = ssba.train_encoder(images, jax.random.key(7), on)
    since = np.arange(16) - 1
    w = np.minimum(np.maximum(0, 10 * (since - 3) / 5), 10)
    np.testing.assert_allclose([r["image_weight"] for r in h], w.reshape(2, 8).mean(1),
                               rtol=1e-6)
    assert all(r["activated"] for r in h)
    assert all(r["loss"] > r["bce"] for r in h)  # the image term is in the loss


def test_training_hides_a_secret_that_the_decoder_reads(images, trained):
    cfg, params, history = trained
    first, last = history[0], history[-1]
    assert last["activated"] and last["image_weight"] == cfg.image_weight
    assert last["bce"] < 0.5 * first["bce"]  # ~0.69 (chance) at the start
    assert last["bit_acc"] > 0.8
    # The fixed objective at the final weight, on fresh secrets: lower after training.
    init = ssba.init_params(jax.random.fold_in(jax.random.key(0), 0), (16, 16, 3), cfg)
    secrets = jax.random.bernoulli(jax.random.key(11), 0.5, (128, 4)).astype(jnp.float32)
    x = jnp.asarray(images, jnp.float32) / 255
    objective = jax.jit(lambda p: ssba._losses(p, ssba.Encoder(4, 8), ssba.Decoder(4, 8), x,
                                               secrets, cfg.image_weight, 1.0)[0])
    assert float(objective(params)) < 0.6 * float(objective(init))

    # One fixed secret in every image: decoded far better than chance, and better than
    # from the clean images; the images change little, each in its own way.
    secret = ssba.make_secret(jax.random.key(5), 4)
    encoded = np.asarray(ssba.encode(params, images, secret))
    bits = np.asarray(ssba.decode_bits(params, encoded)) > 0.5
    acc = (bits == (np.asarray(secret) > 0.5)).mean()
    clean = np.asarray(ssba.decode_bits(params, images)) > 0.5
    acc_clean = (clean == (np.asarray(secret) > 0.5)).mean()
    assert acc > 0.85 and acc > acc_clean + 0.25
    psnr0 = _psnr(np.asarray(ssba.encode(init, images, secret)), images)
    psnr = _psnr(encoded, images)
    assert psnr > 13 and psnr > psnr0 + 2
    residual = encoded.astype(np.int16) - images
    assert (residual[0] != residual[1]).mean() > 0.5  # sample-specific, not one pattern


@pytest.mark.parametrize("field,value", [
    ("epochs", 0), ("batch_size", 0), ("bits", 0), ("width", 0), ("epochs", 1.5),
    ("lr", 0.0), ("lr", float("nan")), ("image_weight", -1.0), ("bce_weight", float("inf")),
    ("ramp_threshold", 1.0), ("ramp_threshold", -0.1), ("image_await", -1),
    ("image_ramp", 0)])
def test_bad_config_raises(field, value):
    with pytest.raises(BdjaxError, match=field):
        ssba.SSBAConfig(**{field: value})


def test_bad_inputs_raise(images):
    params = ssba.init_params(jax.random.key(0), (16, 16, 3), SMALL)
    secret = ssba.make_secret(jax.random.key(0), 4)
    with pytest.raises(BdjaxError, match="uint8"):
        ssba.encode(params, images[:2].astype(np.float32), secret)
    with pytest.raises(BdjaxError, match="uint8"):
        ssba.decode_bits(params, images[0])
    with pytest.raises(BdjaxError, match="multiples of 16"):
        ssba.encode(params, np.zeros((2, 20, 20, 3), np.uint8), secret)
    with pytest.raises(BdjaxError, match="secret"):
        ssba.encode(params, images[:2], jnp.zeros(5))
    with pytest.raises(BdjaxError, match="params"):
        ssba.decode_bits({"encoder": {}}, images[:2])
    with pytest.raises(BdjaxError, match="empty"):
        ssba.train_encoder(images[:0], jax.random.key(0), SMALL)
    with pytest.raises(BdjaxError, match="SSBAConfig"):
        ssba.train_encoder(images, jax.random.key(0), {"epochs": 1})
    with pytest.raises(BdjaxError, match="multiples of 16"):
        ssba.init_params(jax.random.key(0), (24, 24, 3), SMALL)
