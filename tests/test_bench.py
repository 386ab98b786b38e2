"""The benchmark harness: its counting, its units and its output (tiny sizes; timing
itself is never asserted)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import bench, cli
from bdjax.errors import BdjaxError

TINY = dataclasses.replace(bench.QUICK, models=("small_cnn",), defense_models=(), n_train=32,
                           n_val=8, batch=16, repeats=2, steps_per_repeat=1, trials=(1,),
                           matmul=64)


def test_flops_of_a_matrix_product_is_2n3():
    a = jnp.ones((32, 32))
    f = bench.step_flops(lambda a: a @ a, a)
    assert f == pytest.approx(2 * 32 ** 3, rel=0.01)


def test_spread_and_argument_parsing():
    s = bench.spread([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert bench.parse_ints("1,2,16", "--trials") == (1, 2, 16)
    for bad in ("0,2", "a", ""):
        with pytest.raises(BdjaxError, match="--trials"):
            bench.parse_ints(bad, "--trials")


def test_grad_prune_unit_prunes_one_more_filter_per_call():
    d = bench.bench_data(32, 8)
    model = bench._model("small_cnn")
    state = model.init(jax.random.key(0))
    run, (mask, key), f, images = bench._grad_prune_unit(model, state, d, 16)
    fn = jax.jit(run)
    assert images == 32 and f > 0
    for pruned in (1, 2, 3):
        mask, acc, unlearn = fn(mask, key)
        assert int(np.sum(np.asarray(mask) == 0)) == pruned
        assert 0 <= float(acc) <= 1 and np.isfinite(float(unlearn))


def test_defense_timing_runs_vmapped_trials():
    d = bench.bench_data(32, 8)
    model = bench._model("small_cnn")
    state = model.init(jax.random.key(0))
    r = bench.time_defense(model, state, "ft", dict(epochs=1, batch_size=16), d, trials=2,
                           repeats=2)
    assert r["trials"] == 2 and r["settings"]["epochs"] == 1
    assert len(r["seconds"]["samples"]) == 2 and r["seconds"]["median"] > 0
    assert r["seconds_per_trial"] == pytest.approx(r["seconds"]["median"] / 2)
    m = bench.time_defense(model, state, "ft", dict(epochs=1, batch_size=16), d, trials=2,
                           repeats=1, layout="map")
    assert m["layout"] == "map" and r["layout"] == "vmap"


def test_run_writes_json_and_tables(tmp_path):
    result = bench.run(TINY, use_torch=False, log=lambda m: None)
    unit = result["units"]["small_cnn"]["float32"]["train_step"]
    assert unit["images"] == TINY.batch and unit["flops"] > 0 and unit["tflops"] > 0
    assert result["peak"]["float32"]["tflops"] > 0
    assert result["torch_status"].startswith("disabled")
    path = tmp_path / "r.json"
    bench.write_json(result, path)
    back = json.loads(path.read_text())
    assert back["machine"]["backend"] == "cpu" and back["profile"]["batch"] == TINY.batch
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half written left behind
    text = bench.tables(result)
    assert "| small_cnn | float32 | train_step |" in text


def test_cli_rejects_bad_bench_arguments(capsys):
    assert cli.main(["bench", "--quick", "--trials", "0"]) == 2
    assert "--trials" in capsys.readouterr().err
    assert cli.main(["bench", "--quick", "--models", "resnet9000"]) == 2
    assert "resnet9000" in capsys.readouterr().err
    assert cli.main(["bench", "--quick", "--layouts", "vmap,grouped"]) == 2
    assert "layout 'grouped'" in capsys.readouterr().err
