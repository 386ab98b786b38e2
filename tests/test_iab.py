"""Input-aware (IAB): networks and losses against numpy, the mask stage, the per-batch
poisoning hook, joint training through ``control.train_controlled`` and the test-time
stamp. Tiny: 8x8 images, one compiled stage-1 program shared by all tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import attacks, data
from bdjax.attacks import control, iab
from bdjax.errors import BdjaxError

N = 1024  # 8 stage-1 batches of 128


@pytest.fixture(scope="module")
def tiny():
    """1,024 synthetic training images shrunk to 8x8 (means of 4x4 blocks)."""
    ds = data.load("synthetic", seed=0, n_train=N, n_test=8)
    x = ds.x_train.reshape(N, 8, 4, 8, 4, 3).mean(axis=(2, 4)).round().astype(np.uint8)
    return x, ds.y_train


@pytest.fixture(scope="module")
def nets(tiny):
    x, _ = tiny
    g, m = iab.init_nets(jax.random.key(0), (8, 8, 3))
    mean, std = iab.data_stats(x)
    return g, m, {"mean": jnp.asarray(mean), "std": jnp.asarray(std)}


# ------------------------------------------------------------------- pure functions
def test_output_and_threshold_maps_match_numpy():
    z = np.linspace(-2, 2, 41, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(iab.threshold(jnp.asarray(z))),
                               np.tanh(z * 20 - 10) / (2 + 1e-7) + 0.5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(iab.squash(jnp.asarray(z))),
                               np.tanh(z) / (2 + 1e-7) + 0.5, atol=1e-6)
    assert float(iab.threshold(0.0)) < 1e-7 and float(iab.threshold(1.0)) > 1 - 1e-7
    assert abs(float(iab.threshold(0.5)) - 0.5) < 1e-7


def test_diversity_matches_numpy():
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(2, 3, 4, 4, 2)).astype(np.float32)
    p1, p2 = rng.normal(size=(2, 3, 4, 4, 1)).astype(np.float32)
    rms = lambda a: np.sqrt(np.mean(np.square(a), axis=(1, 2, 3)))  # noqa: E731
    want = np.mean(rms(x1 - x2) / (rms(p1 - p2) + 1e-7))
    got = iab.diversity(*(jnp.asarray(a) for a in (x1, x2, p1, p2)))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_upsample_is_pytorch_bilinear():
    """nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False), by its formula."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 5, 2)).astype(np.float32)

    def src(o, n):  # source index and weight of one output coordinate
        s = max((o + 0.5) / 2 - 0.5, 0.0)
        i0 = int(np.floor(s))
        return i0, min(i0 + 1, n - 1), s - i0

    want = np.zeros((2, 6, 10, 2), np.float32)
    for p in range(6):
        a0, a1, fa = src(p, 3)
        for q in range(10):
            b0, b1, fb = src(q, 5)
            want[:, p, q] = ((1 - fa) * ((1 - fb) * x[:, a0, b0] + fb * x[:, a0, b1])
                             + fa * ((1 - fb) * x[:, a1, b0] + fb * x[:, a1, b1]))
    np.testing.assert_allclose(np.asarray(iab.upsample2(jnp.asarray(x))), want, atol=1e-6)


def test_batchnorm_follows_pytorch():
    """Batch statistics with the biased variance; running var updated with the unbiased
    one and momentum 0.05."""
    rng = np.random.default_rng(2)
    x = rng.normal(2.0, 3.0, size=(4, 2, 2, 3)).astype(np.float32)
    bn = iab.TorchBatchNorm()
    v = bn.init(jax.random.key(0), jnp.asarray(x))
    out, upd = bn.apply(v, jnp.asarray(x), train=True, mutable=["batch_stats"])
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(np.asarray(out), (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.05 * mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]),
                               0.95 + 0.05 * var * 16 / 15, rtol=1e-5)


def test_networks_have_the_reference_layout(nets):
    g, m, _ = nets
    convs = [(b, g["params"][b]["conv"]["kernel"].shape[2:]) for b in
             ["down0", "down1", "down2", "down3", "down4", "down5", "middle",
              "up0", "up1", "up2", "up3", "up4", "up5"]]
    assert [s for _, s in convs] == [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128),
                                     (128, 128), (128, 128), (128, 128), (128, 64),
                                     (64, 64), (64, 32), (32, 32), (32, 3)]
    assert m["params"]["up5"]["conv"]["kernel"].shape == (3, 3, 32, 1)
    for b, (cin, _) in convs:  # PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1 / np.sqrt(9 * cin)
        for k in ("kernel", "bias"):
            a = np.abs(np.asarray(g["params"][b]["conv"][k]))
            assert a.max() <= bound and a.max() > 0.8 * bound
    a, b = iab.init_nets(jax.random.key(0), (8, 8, 3)), iab.init_nets(jax.random.key(1), (8, 8, 3))
    assert np.array_equal(a[0]["params"]["up0"]["conv"]["kernel"], g["params"]["up0"]["conv"]["kernel"])
    assert not np.array_equal(a[0]["params"]["up0"]["conv"]["kernel"],
                              b[0]["params"]["up0"]["conv"]["kernel"])
    with pytest.raises(BdjaxError, match="multiples of 8"):
        iab.init_nets(jax.random.key(0), (12, 12, 3))


def test_batch_slices_follow_the_reference_counts():
    assert iab.counts(0.1, 128, 1.0) == (12, 12, 12, 12)  # int(0.1 * 128), num_cross = num_bd
    assert iab.counts(0.002, 128, 1.0) == (1, 1, 1, 1)  # at most one, drawn per batch
    assert iab.counts(0.1, 40, 2.0) == (4, 8, 8, 4)
    assert iab.counts(0.6, 10, 1.0) == (6, 4, 4, 4)  # partners capped by the batch
    assert iab.counts(0.5, 1, 1.0) == (1, 0, 0, 0)
    with pytest.raises(BdjaxError, match="mask_epochs"):
        iab.init_attack(control.Batch(attacks.get("iab", mask_epochs=-1), 0.1, 10, False),
                        jax.random.key(0), np.zeros((4, 8, 8, 3), np.uint8), None)


# ------------------------------------------------------------------------- stage 1
def test_mask_stage_lowers_its_loss(tiny, nets):
    """With the diversity switched off the density term must fall fast; with the density
    term switched off the diversity must fall (same compiled program, traced weights)."""
    x, _ = tiny
    _, m, fixed = nets
    run = lambda **kw: iab.train_mask(m, x, fixed, jax.random.key(3), flip=False, lr_m=0.01,  # noqa: E731
                                      mask_density=0.032, epochs=2, log=lambda s: None, **kw)
    _, norm_only = run(lambda_norm=100.0, lambda_div=0.0)  # [(loss, norm, diversity)]
    assert norm_only[1][1] < 0.5 * norm_only[0][1] and norm_only[1][2] == 0.0
    _, div_only = run(lambda_norm=0.0, lambda_div=1.0)
    assert div_only[1][2] < 0.5 * div_only[0][2] and div_only[1][0] == div_only[1][2]


# ------------------------------------------------------------------------- stage 2
def _reference_batch(params, fixed, x, x2):
    """The poisoned batch recomputed from the networks for ratio 0.1, cross ratio 1
    (``x2``: the partner batch)."""
    n = int(0.1 * x.shape[0])
    norm = lambda v: (v - fixed["mean"]) / fixed["std"]  # noqa: E731
    net_g, net_m = iab.InputAwareNet(3), iab.InputAwareNet(1)

    def g(v, stats):
        out, upd = net_g.apply({"params": params["params"], "batch_stats": stats}, norm(v),
                               train=True, mutable=["batch_stats"])
        return out, upd["batch_stats"]

    m = lambda v: iab.threshold(net_m.apply(fixed["mask"], norm(v)))  # noqa: E731
    p1, s1 = g(x[:n], params["batch_stats"])
    p2, s2 = g(x2[n:2 * n], s1)
    bd = x[:n] + (p1 - x[:n]) * m(x[:n])
    cross = x[n:2 * n] + (p2 - x[n:2 * n]) * m(x2[n:2 * n])
    div = iab.diversity(norm(x[:n]), norm(x2[n:2 * n]), norm(p1), norm(p2))
    return bd, cross, div, s2


_REF = jax.jit(_reference_batch)


def test_poison_relabels_the_first_share_and_keeps_cross_labels(nets):
    g, m, fixed = nets
    fixed = {**fixed, "mask": m}
    atk = attacks.get("iab", target=3, lambda_div=2.0)
    ctx = control.Batch(atk, 0.1, 10, False)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.integers(0, 256, (40, 8, 8, 3)).astype(np.float32) / 255)
    x2 = jnp.asarray(rng.integers(0, 256, (40, 8, 8, 3)).astype(np.float32) / 255)
    y = jnp.asarray(rng.integers(4, 10, 40), jnp.int32)
    key = jax.random.key(5)
    # the registered hook: G's params are trained, its statistics are the hook's state
    assert control.hooks("iab").partners  # the loop hands it a second shuffle's batch
    hook = jax.jit(control.hooks("iab").poison, static_argnums=0)
    poison = lambda *a: hook(a[0], a[1]["params"], a[1]["batch_stats"], *a[2:])  # noqa: E731
    xp, yp, div_term, stats = poison(ctx, g, fixed, x, y, key, x2)
    assert np.asarray(yp[:4]).tolist() == [3] * 4  # int(0.1 * 40) poisoned
    np.testing.assert_array_equal(np.asarray(yp[4:]), np.asarray(y[4:]))  # cross + clean
    np.testing.assert_array_equal(np.asarray(xp[8:]), np.asarray(x[8:]))  # clean
    bd, cross, div, want_stats = _REF(g, fixed, x, x2)
    np.testing.assert_allclose(np.asarray(xp[:4]), np.asarray(bd), atol=1e-5)
    np.testing.assert_allclose(np.asarray(xp[4:8]), np.asarray(cross), atol=1e-5)
    assert np.abs(np.asarray(xp[:8]) - np.asarray(x[:8])).max() > 1e-3
    np.testing.assert_allclose(float(div_term), 2.0 * float(div), rtol=1e-4)
    # G's running statistics after its two train-mode passes
    for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(want_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert not np.allclose(stats["down0"]["bn"]["mean"], g["batch_stats"]["down0"]["bn"]["mean"])
    again = poison(ctx, g, fixed, x, y, key, x2)
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(xp))


def test_generator_optimizer_is_the_references_adam():
    """G's optimizer is Adam with betas (0.5, 0.9) on its params (its statistics are the
    hook's state, not optimised)."""
    params = {"w": jnp.asarray([1.0, -1.0])}
    tx = iab.generator_tx(0.01)
    upd, _ = tx.update({"w": jnp.asarray([0.2, -3.0])}, tx.init(params), params)
    out = optax_apply(params, upd)
    # Adam's first step (bias-corrected) moves each weight by lr against its gradient sign
    np.testing.assert_allclose(np.asarray(out["w"]), [0.99, -0.99], atol=1e-6)
    assert control.hooks("iab").tx is not None


def _first_steps(tx, n):
    """How far Adam moves a weight in each of its first ``n`` steps under a constant
    gradient (its normalised step is 1 then, so the move is the step's lr)."""
    params, state, out = {"w": jnp.zeros(())}, None, []
    state = tx.init(params)
    for _ in range(n):
        upd, state = tx.update({"w": jnp.ones(())}, state, params)
        out.append(-float(upd["w"]))
    return np.asarray(out)


def test_generator_lr_follows_the_classifiers_schedule():
    """By default G's lr is lr_g times the classifier's lr over its peak (the reference's
    fixed ratio of the two); ``lr_g_schedule=constant`` keeps lr_g; a constant
    classifier schedule leaves G at lr_g either way."""
    from bdjax.kernels import SGDConfig

    cos = SGDConfig(lr=0.05, schedule="cosine", unit="batch")
    frac = control.lr_fraction(cos, 2, 2)  # 4 updates in all
    np.testing.assert_allclose([float(frac(c)) for c in range(5)],
                               [(1 + np.cos(np.pi * c / 4)) / 2 for c in range(5)], rtol=1e-6)
    assert control.lr_fraction(SGDConfig(lr=0.05, schedule="constant"), 2, 2) == 1.0

    ctx = lambda **p: control.Batch(attacks.get("iab", **p), 0.1, 10, False)  # noqa: E731
    hk = control.hooks("iab")
    want = 0.01 * np.asarray([(1 + np.cos(np.pi * c / 4)) / 2 for c in range(4)])
    np.testing.assert_allclose(_first_steps(hk.tx(ctx(), frac), 4), want, rtol=1e-4)
    np.testing.assert_allclose(_first_steps(hk.tx(ctx(lr_g_schedule="constant"), frac), 4),
                               [0.01] * 4, rtol=1e-4)
    np.testing.assert_allclose(_first_steps(hk.tx(ctx(), 1.0), 4), [0.01] * 4, rtol=1e-4)
    with pytest.raises(BdjaxError, match="'cosine'.*accepted: classifier, constant"):
        hk.tx(ctx(lr_g_schedule="cosine"), frac)


def optax_apply(params, updates):
    return jax.tree_util.tree_map(lambda p, u: p + u, params, updates)


# ---------------------------------------------------------------- the whole attack
