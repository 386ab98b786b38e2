"""The SGD transformation: PyTorch's CosineAnnealingLR stepped per epoch or per batch."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bdjax.errors import BdjaxError
from bdjax.kernels import SGDConfig, sgd
from bdjax.kernels.optim import cosine_schedule
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
