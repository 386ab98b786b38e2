"""Trojan and label-consistent resources: the reference's mask and corner layout, neuron
choice, the trigger optimisation, PGD perturbations and adversarial training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import data, models
from bdjax.attacks import lc, trojan
from bdjax.errors import BdjaxError
from bdjax.train import TrainConfig, train

RNG = np.random.default_rng(0)

# The reference's "all-corners" trigger as its ((row, col), sign) list on a 32 x 32 image
# (BackdoorBench utils/bd_img_transform/lc.py), transcribed as data.
_REF_CORNERS = [
    ((0, 0), 1), ((0, 1), -1), ((0, 2), -1), ((1, 0), -1), ((1, 1), 1), ((1, 2), -1),
    ((2, 0), 1), ((2, 1), -1), ((2, 2), 1),
    ((-1, 0), 1), ((-1, 1), -1), ((-1, 2), 1), ((-2, 0), -1), ((-2, 1), 1), ((-2, 2), -1),
    ((-3, 0), 1), ((-3, 1), -1), ((-3, 2), -1),
    ((0, -1), 1), ((0, -2), -1), ((0, -3), -1), ((1, -1), -1), ((1, -2), 1), ((1, -3), -1),
    ((2, -1), 1), ((2, -2), -1), ((2, -3), 1),
    ((-1, -1), 1), ((-1, -2), -1), ((-1, -3), 1), ((-2, -1), -1), ((-2, -2), 1),
    ((-2, -3), -1), ((-3, -1), 1), ((-3, -2), -1), ((-3, -3), -1),
]


def _ref_pattern32():
    p = np.zeros((32, 32), np.int8)
    for (r, c), v in _REF_CORNERS:
        p[r, c] = v
    return p


@pytest.fixture(scope="module")
def tiny():
    """Two synthetic classes (square 0, ring 1) at 16 x 16: 128 training and 64
    held-out images."""
    ds = data.load("synthetic", seed=0, n_train=1000, n_test=10)
    sel = np.flatnonzero(np.isin(ds.y_train, (1, 3)))[:192]
    x = ds.x_train[sel].reshape(-1, 16, 2, 16, 2, 3).mean(axis=(2, 4)).round()
    x, y = x.astype(np.uint8), (ds.y_train[sel] == 3).astype(np.int32)
    model = models.get("small_cnn", num_classes=2, image_shape=(16, 16, 3))
    return model, x[:128], y[:128], x[128:], y[128:]


@pytest.fixture(scope="module")
def apply(tiny):
    """The eval-mode forward pass, compiled (eager conv layers are slow on a CPU)."""
    model = tiny[0]
    return jax.jit(lambda state, v: model.apply(state, v))


@pytest.fixture(scope="module")
def plain(tiny):
    """The small CNN trained plainly for 20 epochs on the 128 training images."""
    model, x, y, _, _ = tiny
    state, _ = train(model, x, y, TrainConfig(epochs=20, lr=0.05, batch_size=32,
                                              augment=False), jax.random.key(0),
                     flip=False, progress=False)
    return state


# ----------------------------------------------------------------------------- LC trigger

def test_corner_pattern_is_the_reference_layout():
    want = _ref_pattern32()
    np.testing.assert_array_equal(lc.corner_pattern(32, 32), want)
    assert np.count_nonzero(want) == 36
    # Left corners alike top and bottom, right corners their mirror image.
    np.testing.assert_array_equal(want[:3, :3], want[-3:, :3])
    np.testing.assert_array_equal(want[:3, -3:], want[:3, :3][:, ::-1])
    # 64 x 64: the reference resizes its 32 x 32 mask with nearest neighbours.
    np.testing.assert_array_equal(lc.corner_pattern(64, 64), np.kron(want, np.ones((2, 2))))
    with pytest.raises(BdjaxError, match="height"):
        lc.corner_pattern(0, 32)


def test_lc_corners_against_numpy():
    x = RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    s = _ref_pattern32()[None, :, :, None].astype(np.float64)
    out = np.asarray(jax.jit(lc.lc_corners)(x))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, s[0, :, :, 0] > 0], 255)
    np.testing.assert_array_equal(out[:, s[0, :, :, 0] < 0], 0)
    np.testing.assert_array_equal(out[:, s[0, :, :, 0] == 0], x[:, s[0, :, :, 0] == 0])
    half = np.asarray(lc.lc_corners(x, None, amplitude=0.5))
    want = np.clip(np.round(x + 127.5 * s), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(half, want)
    np.testing.assert_array_equal(np.asarray(lc.lc_corners(x, amplitude=0.0)), x)
    with pytest.raises(BdjaxError, match="amplitude"):
        lc.lc_corners(x, amplitude=1.5)


# ------------------------------------------------------------------------- Trojan pieces

def test_trojan_mask_is_an_apple_where_the_reference_puts_it():
    canvas = trojan.apple_canvas()
    rows, cols = np.nonzero(canvas)
    # The reference's apple4.png: rows 120-203, columns 128-194, 3524 pixels of 224^2.
    assert abs(rows.min() - 120) <= 2 and abs(rows.max() - 203) <= 2
    assert abs(cols.min() - 128) <= 2 and abs(cols.max() - 194) <= 2
    assert abs(canvas.sum() - 3524) < 0.05 * 3524
    m = trojan.trojan_mask(32, 32, 3)
    assert m.shape == (32, 32, 3) and m.dtype == np.float32
    assert m.min() == 0.0 and m.max() == 1.0
    np.testing.assert_array_equal(m[..., 0], m[..., 2])
    keep = np.argwhere(m[..., 0] > 0)
    assert keep[:, 0].min() >= 15 and keep[:, 1].min() >= 16 and keep.max() <= 30
    # The soft edge of a bilinear downscale: some pixels strictly between 0 and 1.
    assert ((m > 0) & (m < 1)).any()
    assert trojan.trojan_mask(64, 64, 1).shape == (64, 64, 1)
    with pytest.raises(BdjaxError, match="width"):
        trojan.trojan_mask(32, 0)


def test_top_neurons_against_numpy():
    model = models.get("small_cnn", num_classes=3, image_shape=(16, 16, 3))
    kernel = RNG.normal(size=(128, 3)).astype(np.float32)
    kernel[7] = [0.0, 0.0, 9.0]    # the largest sum |W| ...
    kernel[3] = [-4.0, 4.0, 0.5]   # ... and two tied second places
    kernel[90] = [4.0, -4.0, 0.5]
    params = {"head": {"kernel": jnp.asarray(kernel)}}
    got = trojan.top_neurons(params, model, 3)
    np.testing.assert_array_equal(got, [7, 3, 90])
    want = np.argsort(-np.abs(kernel.astype(np.float64)).sum(1), kind="stable")[:5]
    np.testing.assert_array_equal(trojan.top_neurons(params, model, 5), want)
    with pytest.raises(BdjaxError, match="neurons"):
        trojan.top_neurons(params, model, 129)


def test_penultimate_features_are_the_head_input(tiny, apply, plain):
    model, x, _, _, _ = tiny
    feats = jax.jit(lambda s, v: trojan.penultimate_features(model, s, v))
    f = np.asarray(feats(plain, x[:64]), np.float64)
    head = plain["params"]["head"]
    logits = f @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    np.testing.assert_allclose(logits, np.asarray(apply(plain, x[:64])), rtol=1e-4,
                               atol=1e-4)


def test_apply_trojan_clips_instead_of_wrapping():
    x = RNG.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    t = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = np.asarray(jax.jit(trojan.apply_trojan)(x, t))
    want = np.clip(x.astype(np.int64) + t, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, want)
    assert (out[(x.astype(int) + t) > 255] == 255).all()  # the reference wraps these
    with pytest.raises(BdjaxError, match="dtype"):
        trojan.apply_trojan(x.astype(np.float32), t)
    with pytest.raises(BdjaxError, match="shape"):
        trojan.apply_trojan(x, t[:4])


def test_trojan_trigger_excites_the_chosen_neurons_inside_the_mask(tiny, plain):
    model, *_ = tiny
    state = plain
    mask = trojan.trojan_mask(16, 16, 3)
    keep = mask > 0
    idx = trojan.top_neurons(state["params"], model, 2)
    trig = trojan.trojan_trigger(model, state, jax.random.key(0), iters=20)
    assert trig.dtype == np.uint8 and trig.shape == (16, 16, 3)
    assert not trig[~keep].any()
    assert np.abs(trig / 255.0 - mask)[keep].max() <= 0.3 + 0.5 / 255 + 1e-6
    feats = jax.jit(lambda v: trojan.penultimate_features(model, state, v[None] * keep)[0])
    before, after = (np.asarray(feats(jnp.asarray(v, jnp.float32)))[idx]
                     for v in (mask, trig / 255.0))
    assert (after > before + 0.05).all(), (before, after)
    # The key is unused: same trigger from another key (and from the same one).
    np.testing.assert_array_equal(
        trojan.trojan_trigger(model, state, jax.random.key(9), iters=20), trig)

    # One iteration is one signed step down the squared error, clipped to the ball and box.
    cost = lambda v: jnp.sum(jnp.square(feats(v)[idx] - 100.0))
    g = np.asarray(jax.jit(jax.grad(cost))(jnp.asarray(mask)))
    want = np.clip(mask - 0.1 * np.sign(g), 0, 1) * keep
    x1, info = trojan.optimise_trigger(model, state, mask, idx, iters=1)
    np.testing.assert_allclose(np.asarray(x1), want, atol=1e-6)
    assert int(info["iterations"]) == 1
    # The reference's early exit: a cost under the tolerance stops the loop after the
    # step that started there.
    _, info = trojan.optimise_trigger(model, state, mask, idx, iters=50, tolerance=1e12)
    assert int(info["iterations"]) == 1


# --------------------------------------------------------------------------- LC: the PGD

def _ce(apply, state, x, y):
    logits = np.asarray(apply(state, x), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                           keepdims=True)) - logits.max(1, keepdims=True)
    return -logp[np.arange(len(y)), y]


def test_lc_adversarial_stays_within_eps_and_raises_the_loss(tiny, apply, plain):
    model, _, _, xs, ys = tiny
    state = plain
    # The same static settings (3 steps, batch 64) as the robustness test: one compile.
    adv = lc.lc_adversarial(model, state, xs, ys, eps=16 / 255, step=7 / 255, steps=3,
                            batch_size=64)
    assert adv.dtype == np.uint8 and adv.shape == xs.shape
    diff = np.abs(adv.astype(int) - xs)
    assert diff.max() == 16
    assert _ce(apply, state, adv, ys).mean() > _ce(apply, state, xs, ys).mean() + 0.5
    again = lc.lc_adversarial(model, state, xs, ys, jax.random.key(1), eps=16 / 255,
                              step=7 / 255, steps=3, batch_size=64)
    np.testing.assert_array_equal(adv, again)  # no random start: the key does not matter
    with pytest.raises(BdjaxError, match="labels"):
        lc.lc_adversarial(model, state, xs, ys + 5)
    with pytest.raises(BdjaxError, match="images"):
        lc.lc_adversarial(model, state, xs[..., :1], ys)


def test_adversarial_training_is_robust_and_deterministic(tiny, apply, plain):
    """PGD accuracy (eps 16/255) on held-out images: the adversarially trained model beats
    the plainly trained one with the same data, epochs and lr (measured over 4 keys:
    0.33-0.39 against 0.00-0.02)."""
    model, x, y, xt, yt = tiny
    kw = dict(epochs=20, lr=0.05, batch_size=32, eps=16 / 255, step=6.4 / 255, steps=3,
              augment=False)
    robust = lc.adversarial_train(model, x, y, jax.random.key(0), **kw)

    def pgd_acc(state):
        adv = lc.lc_adversarial(model, state, xt, yt, eps=16 / 255, step=6.4 / 255,
                                steps=3, batch_size=64)
        return float((np.asarray(apply(state, adv)).argmax(-1) == yt).mean())

    r, p = pgd_acc(robust), pgd_acc(plain)
    assert r > p + 0.1, (r, p)
    again = lc.adversarial_train(model, x, y, jax.random.key(0), **kw)
    for a, b in zip(jax.tree_util.tree_leaves(robust), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(BdjaxError, match="steps"):
        lc.adversarial_train(model, x, y, jax.random.key(0), steps=-1)
