"""Tests of the LF attack's generator (bdjax.attacks.lf): filter, DeepFool, pattern, poisoning."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.attacks import lf
from bdjax.errors import BdjaxError


@dataclasses.dataclass(frozen=True)
class Linear:
    """A hashable linear classifier with the Model interface lf_pattern needs."""

    num_classes: int

    def apply(self, state, x, **kwargs):
        return x.reshape(x.shape[0], -1) @ state["w"] + state["b"]


def _np_lowpass(v, sigma):
    """Independent re-computation: pixel Gaussian of std sigma on 5 sigma taps centred at
    (n - 1) / 2, zero padding (n - 1 - n // 2) before and n // 2 after, rows then columns."""
    n = int(round(5 * sigma))
    off = np.arange(n) - (n - 1) / 2
    k = np.exp(-off ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    before, after = n - 1 - n // 2, n // 2
    h, w, _ = v.shape
    pad = np.pad(v.astype(np.float64), ((before, after), (before, after), (0, 0)))
    rows = np.stack([sum(k[j] * pad[i + j] for j in range(n)) for i in range(h)])
    return np.stack([sum(k[j] * rows[:, i + j] for j in range(n)) for i in range(w)], axis=1)


@pytest.mark.parametrize("sigma, shape", [(6.0, (12, 10, 3)), (1.0, (9, 11, 1)),
                                          (0.8, (7, 7, 3))])
def test_gaussian_lowpass_matches_numpy(sigma, shape):
    v = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    out = np.asarray(jax.jit(lf.gaussian_lowpass, static_argnums=1)(v, sigma))
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out, _np_lowpass(v, sigma), rtol=1e-5, atol=1e-6)


def test_gaussian_kernel_is_the_references_30_taps():
    k = lf.gaussian_kernel(6.0)
    assert k.shape == (30,) and k.dtype == np.float32
    assert abs(float(k.sum()) - 1.0) < 1e-6
    np.testing.assert_allclose(k, k[::-1], rtol=1e-6)  # symmetric about 14.5, no centre tap
    assert np.argmax(k) in (14, 15)
    # Zero border: a constant image darkens at the edges, stays 1 in the middle of a big one.
    out = np.asarray(lf.gaussian_lowpass(np.ones((64, 64, 1), np.float32), 6.0))
    assert abs(out[32, 32, 0] - 1.0) < 1e-4 and out[0, 0, 0] < 0.4
    with pytest.raises(BdjaxError, match="sigma"):
        lf.gaussian_kernel(0.3)


def test_minmax_scale_range_and_constant_input():
    v = np.random.default_rng(1).normal(size=(5, 5, 3)).astype(np.float32)
    out = np.asarray(lf.minmax_scale(v, 0.2))
    np.testing.assert_allclose(out, (v - v.min()) / (v.max() - v.min()) * 0.2, rtol=1e-6,
                               atol=1e-7)
    assert out.min() == 0.0 and out.max() == np.float32(0.2)
    assert np.all(np.asarray(lf.minmax_scale(np.full((3, 3, 1), 2.0), 0.2)) == 0.0)


def test_deepfool_linear_exact_step_and_per_image_stop():
    rng = np.random.default_rng(2)
    d, t = 12, 0
    w = rng.normal(size=(d, 4)).astype(np.float32)
    x = rng.uniform(size=(3, 2, 2, 3)).astype(np.float32)
    b = np.array([0.0, 50.0, -1e4, -1e4], np.float32)  # class 1; classes 2, 3 out of reach
    logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w + b
    r, info = jax.jit(lambda z: lf.deepfool_targeted(logits_fn, z, t, overshoot=0.02,
                                                     max_iter=20))(x[:1])
    f = x[0].ravel() @ w + b
    wk = w[:, t] - w[:, 1]
    expected = 1.02 * abs(f[t] - f[1]) / np.sum(wk ** 2) * wk
    np.testing.assert_allclose(np.asarray(r)[0].ravel(), expected, rtol=1e-4, atol=1e-6)
    assert int(info["iterations"][0]) == 1 and bool(info["success"][0])
    assert int(info["label"][0]) == 1 and int(info["pred"][0]) == t

    # A batch: one image needing a step, one already at the target (no step), one whose
    # target direction is zero (non-finite step: adds zero, runs to max_iter, fails).
    w2 = w.copy()
    w2[:, 2] = w2[:, 1]
    b2 = np.array([0.0, 50.0, 40.0, -1e4], np.float32)
    fn2 = lambda z: z.reshape(z.shape[0], -1) @ w2 + b2
    targets = jnp.array([0, 1, 2])
    r, info = lf.deepfool_targeted(fn2, x, targets, overshoot=0.02, max_iter=7)
    r = np.asarray(r)
    assert list(np.asarray(info["iterations"])) == [1, 0, 7]
    assert list(np.asarray(info["success"])) == [True, True, False]
    assert np.all(r[1] == 0) and np.all(r[2] == 0) and np.abs(r[0]).max() > 0


def test_deepfool_reaches_target_on_a_nonlinear_model():
    rng = np.random.default_rng(8)
    w1 = jnp.asarray(rng.normal(size=(48, 32)) / 4, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(32, 5)) / 4, jnp.float32)
    logits_fn = lambda z: jnp.tanh(z.reshape(z.shape[0], -1) @ w1) @ w2
    x = jnp.asarray(rng.uniform(size=(16, 4, 4, 3)), jnp.float32)
    label = np.asarray(jnp.argmax(logits_fn(x), -1))
    counts = np.bincount(label, minlength=5)
    target = int(np.where(counts > 0, counts, 99).argmin())  # the rarest class present
    assert 0 < (label == target).sum() < 4
    r, info = jax.jit(lambda z: lf.deepfool_targeted(logits_fn, z, target, max_iter=50))(x)
    assert np.all(np.asarray(info["success"]))
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits_fn(x + r), -1)), target)
    np.testing.assert_array_equal(np.asarray(info["label"]), label)
    iters = np.asarray(info["iterations"])
    moved = label != target
    assert np.all(iters[moved] >= 1) and np.all(iters[~moved] == 0) and iters.max() > 1
    assert np.all(np.asarray(r)[~moved] == 0)
    # Minimal: shrinking each moved image's r by a third leaves it short of the target.
    short = np.asarray(jnp.argmax(logits_fn(x + r / 1.5), -1))
    assert (short[moved] != target).mean() > 0.5


def _blob_problem(h=12, k=4, n=200, target=0):
    """A linear model whose target class reads a smooth blob; random images and labels."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:h, 0:h]
    blob = np.exp(-((yy - 5.0) ** 2 + (xx - 6.0) ** 2) / 18.0)
    w = rng.normal(scale=0.02, size=(h, h, 3, k))
    w[..., 0, target] += 0.3 * blob
    w = w.reshape(-1, k).astype(np.float32)
    b = np.zeros((k,), np.float32)
    b[target] = -0.5 * 0.3 * blob.sum() - 0.6  # about one std below: few images start there
    state = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
    x = rng.integers(0, 256, (n, h, h, 3), dtype=np.uint8)
    y = rng.integers(0, k, n)
    return Linear(k), state, x, y


def _high_freq_share(p):
    """Share of the spectral energy (mean removed) above half the band in either axis."""
    f = np.abs(np.fft.fft2(p - p.mean(axis=(0, 1)), axes=(0, 1))) ** 2
    fy = np.abs(np.fft.fftfreq(p.shape[0]))[:, None, None]
    fx = np.abs(np.fft.fftfreq(p.shape[1]))[None, :, None]
    high = np.broadcast_to((fy > 0.25) | (fx > 0.25), f.shape)
    return f[high].sum() / f.sum()


def test_lf_pattern_range_low_frequency_determinism_and_effect():
    model, state, x, y = _blob_problem()
    kw = dict(n_images=20, max_passes=3, fooling_rate=1.0, sigma=2.0)
    p, info = lf.lf_pattern(model, state, x, y, 0, jax.random.key(5), return_info=True, **kw)
    assert p.shape == (12, 12, 3) and p.dtype == np.float32
    assert p.min() == 0.0 and p.max() == 51.0 and np.all(p == np.floor(p))
    np.testing.assert_array_equal(p, np.floor(info["v"] * np.float32(255)))
    assert 1 <= info["passes"] <= 3 and sum(info["updates"]) > 0
    assert len(info["fooling_rates"]) == info["passes"]

    noise = np.random.default_rng(0).uniform(0, 51, p.shape)
    assert _high_freq_share(p) < 0.05 < 0.5 < _high_freq_share(noise)

    again = lf.lf_pattern(model, state, x, y, 0, jax.random.key(5), **kw)
    np.testing.assert_array_equal(p, again)
    raw = lf.lf_pattern(model, state, x, y, 0, jax.random.key(5), quantize=False, **kw)
    np.testing.assert_array_equal(np.floor(raw), p)
    assert not np.array_equal(raw, p)
    # Another key draws other images. (Linear logits give every DeepFool step the same
    # direction per class, so only the unquantised pattern tells the keys apart.)
    other, other_info = lf.lf_pattern(model, state, x, y, 0, jax.random.key(6),
                                      quantize=False, return_info=True, **kw)
    assert not np.array_equal(info["images"], other_info["images"])
    assert not np.array_equal(raw, other)

    # The intended effect: the pattern pushes images toward the target class.
    before = np.asarray(model.apply(state, jnp.asarray(x, jnp.float32) / 255)).argmax(-1)
    xp = np.asarray(lf.apply_lf(x, p))
    after = np.asarray(model.apply(state, jnp.asarray(xp, jnp.float32) / 255)).argmax(-1)
    assert (after == 0).mean() > (before == 0).mean() + 0.2


def test_lf_pattern_stopping_rules():
    model, state, x, y = _blob_problem()
    kw = dict(n_images=10, sigma=2.0)
    _, info = lf.lf_pattern(model, state, x, y, 0, jax.random.key(1), fooling_rate=0.0,
                            max_passes=4, return_info=True, **kw)
    assert info["passes"] == 1  # any rate >= 0 stops after the first pass
    _, info = lf.lf_pattern(model, state, x, y, 0, jax.random.key(1), fooling_rate=1.0,
                            max_passes=4, patience=2, plateau=1.01, return_info=True, **kw)
    assert info["passes"] == 2  # two rates always span less than 1.01
    _, info = lf.lf_pattern(model, state, x, y, 0, jax.random.key(1), fooling_rate=1.0,
                            max_passes=3, patience=0, return_info=True, **kw)
    assert info["passes"] == 3 or max(info["fooling_rates"]) >= 1.0


def test_apply_lf_matches_reference_arithmetic():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    pattern = rng.uniform(-300, 300, (6, 7, 3)).astype(np.float32)
    pattern[0, 0] = [0.999999, -0.5, 254.5]
    expected = np.clip(x.astype(np.float64) + pattern.astype(np.float64), 0, 255).astype(np.uint8)
    out = np.asarray(jax.jit(lf.apply_lf)(x, pattern))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    small = rng.uniform(0, 51, (6, 7, 3)).astype(np.float32)
    expected = np.clip(x.astype(np.float64) + small, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(lf.apply_lf(x, small)), expected)


def test_bad_input_raises():
    model, state, x, y = _blob_problem(n=20)
    with pytest.raises(BdjaxError, match="dtype"):
        lf.apply_lf(x.astype(np.float32), np.zeros((12, 12, 3)))
    with pytest.raises(BdjaxError, match="pattern"):
        lf.apply_lf(x, np.zeros((5, 5, 3)))
    with pytest.raises(BdjaxError, match="target"):
        lf.lf_pattern(model, state, x, y, 4, jax.random.key(0))
    with pytest.raises(BdjaxError, match="n_images"):
        lf.lf_pattern(model, state, x, y, 0, jax.random.key(0), n_images=21)
    with pytest.raises(BdjaxError, match="sigma"):
        lf.lf_pattern(model, state, x, y, 0, jax.random.key(0), sigma=0.1, n_images=5)
    with pytest.raises(BdjaxError, match="x_uint8"):
        lf.lf_pattern(model, state, x.astype(np.float32), y, 0, jax.random.key(0))
