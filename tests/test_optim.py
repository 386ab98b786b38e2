"""The SGD transformation (PyTorch's CosineAnnealingLR stepped per epoch or per batch)
and PyTorch's Adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bdjax.errors import BdjaxError
from bdjax.kernels import SGDConfig, sgd
from bdjax.kernels.optim import cosine_schedule, torch_adam
from bdjax.train import TrainConfig


def _torch_closed_form(lr, t, t_max):
    """CosineAnnealingLR with eta_min 0 after t scheduler steps (periodic past T_max)."""
    return lr * (1 + np.cos(np.pi * t / t_max)) / 2


def test_per_epoch_cosine_is_a_staircase_with_t_max_100():
    """BackdoorBench's attack training and FT: one scheduler step per epoch, T_max 100."""
    f = cosine_schedule(0.01, steps_per_epoch=4, epochs=20, unit="epoch", t_max=100)
    lrs = np.array([float(f(c)) for c in range(80)]).reshape(20, 4)
    assert (lrs == lrs[:, :1]).all()  # constant within an epoch
    np.testing.assert_allclose(lrs[:, 0], _torch_closed_form(0.01, np.arange(20), 100),
                               rtol=1e-5)
    assert lrs[-1, 0] > 0.009  # 20 of 100 epochs: the rate has barely moved


def test_per_batch_cosine_with_t_max_100_cycles():
    """BackdoorBench's FT-SAM steps T_max = 100 per batch: 0 at batch 100, back at 200."""
    f = cosine_schedule(0.01, steps_per_epoch=4, epochs=100, unit="batch", t_max=100)
    got = np.array([float(f(c)) for c in range(401)])
    np.testing.assert_allclose(got, _torch_closed_form(0.01, np.arange(401), 100),
                               rtol=1e-5, atol=1e-9)
    assert got[100] < 1e-9 and got[200] == pytest.approx(0.01)


@pytest.mark.parametrize("unit,period", [("epoch", 10), ("batch", 30)])
def test_t_max_zero_is_the_whole_run(unit, period):
    f = cosine_schedule(0.1, steps_per_epoch=3, epochs=10, unit=unit, t_max=0)
    counts = np.arange(30)
    t = counts // 3 if unit == "epoch" else counts
    np.testing.assert_allclose([float(f(c)) for c in counts],
                               _torch_closed_form(0.1, t, period), rtol=1e-5, atol=1e-9)


def test_sgd_applies_the_schedule_with_coupled_weight_decay():
    """With momentum off, each update is -lr_t * (g + wd * w), lr_t from the schedule."""
    cfg = SGDConfig(lr=0.5, momentum=0.0, weight_decay=0.1, unit="epoch", t_max=4)
    tx = sgd(cfg, steps_per_epoch=2, epochs=4)
    w = jnp.ones(3)
    state = tx.init(w)
    for count in range(8):
        g = jnp.full(3, 2.0)
        upd, state = tx.update(g, state, w)
        lr = _torch_closed_form(0.5, count // 2, 4)
        np.testing.assert_allclose(upd, -lr * (g + 0.1 * w), rtol=1e-5, atol=1e-8)
        w = optax.apply_updates(w, upd)


def test_config_validation():
    with pytest.raises(BdjaxError, match="schedule unit 'step'"):
        SGDConfig(unit="step")
    with pytest.raises(BdjaxError, match="t_max -1"):
        SGDConfig(t_max=-1)
    with pytest.raises(BdjaxError, match="schedule unit"):
        TrainConfig(schedule_unit="week")
    c = TrainConfig()  # BackdoorBench's attack training
    assert (c.schedule, c.schedule_unit, c.t_max) == ("cosine", "epoch", 100)


def _run(tx, grads, p0):
    def step(c, g):
        p, s = c
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p
    p0 = jnp.asarray(p0, jnp.float32)
    return np.asarray(jax.jit(lambda: jax.lax.scan(
        step, (p0, tx.init(p0)), jnp.asarray(grads, jnp.float32))[1])())


def test_torch_adam_is_optax_adam_without_amsgrad():
    grads = [[1.0, -2.0], [0.1, 0.5], [0.01, 3.0]]
    np.testing.assert_allclose(_run(torch_adam(0.1), grads, [0.0, 0.0]),
                               _run(optax.adam(0.1), grads, [0.0, 0.0]), rtol=1e-5)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_torch_adam_amsgrad_is_pytorchs_rule(wd):
    """``torch.optim.Adam(amsgrad=True, weight_decay=wd)``: g += wd p, then the running
    maximum of the RAW second moments, bias-corrected with the current step, which
    differs from optax's amsgrad (maximum of the bias-corrected moments) once the
    gradients shrink."""
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    grads = np.array([[1.0, -2.0], [0.1, 0.5], [0.01, 3.0], [-0.5, 0.01]])
    p = np.array([0.5, -0.5])
    m = v = vmax = np.zeros(2)
    want = []
    for t, g in enumerate(grads, 1):
        g = g + wd * p
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v)
        p = p - lr / (1 - b1 ** t) * m / (np.sqrt(vmax) / np.sqrt(1 - b2 ** t) + eps)
        want.append(p)
    got = _run(torch_adam(lr, amsgrad=True, weight_decay=wd), grads, [0.5, -0.5])
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5)
    if wd == 0:
        assert np.abs(got - _run(optax.amsgrad(lr), grads, [0.5, -0.5])).max() > 1e-3
