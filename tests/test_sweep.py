"""``bdjax sweep``: the grid runs every cell once, resumes after kill -9, spreads trials
over local devices, and runs through Ray with the same rows.

All tests share one run of ``sweep_smoke --smoke`` (the session fixture) and its compiled
programs; ``make test`` sends each test file to one pytest worker (``--dist loadfile``).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bdjax import config, data, grid, projection, records, runner, sweep
from bdjax.errors import BdjaxError

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "results" / "2026-11-22-cpu-quick.json"
# Scores may differ between separately compiled programs by a few test images (of 200).
IMAGES = 2.5 / 200


def _quiet(_):
    return None


def _grid(**sweep_changes) -> grid.Grid:
    cfg = config.load("sweep_smoke", smoke=True)
    cfg["sweep"] = {**cfg["sweep"], **sweep_changes}
    return grid.expand(cfg)


def _by_key(rows: list[dict]) -> dict[str, dict]:
    out = {records.row_key(r): r for r in rows}
    assert len(out) == len(rows), "a row is written twice"
    return out


def _assert_same_rows(rows: list[dict], reference: list[dict]) -> None:
    got, ref = _by_key(rows), _by_key(reference)
    assert set(got) <= set(ref)
    for k, r in got.items():
        for m in ("acc", "asr", "ra", "acc_before", "asr_before"):
            assert abs(r[m] - ref[k][m]) <= IMAGES, (m, r["defense"], r["trial"])


def _config_file(tmp_path, attacks, defenses) -> str:
    """A config file: sweep_smoke --smoke restricted to some attacks and defenses (its
    cells keep the names and row keys they have in the whole grid)."""
    path = tmp_path / "sub.py"
    path.write_text(
        "from bdjax.configs import sweep_smoke\n\n\n"
        "def get_config(smoke=False):\n"
        "    cfg = sweep_smoke.get_config(True)\n"
        f"    cfg['sweep'] = {{**cfg['sweep'], 'attacks': {attacks!r}, "
        f"'defenses': {defenses!r}}}\n"
        "    return cfg\n")
    return str(path)


def _copy_checkpoints(src, dst):
    shutil.copytree(src / "checkpoints", dst / "checkpoints")


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    g = _grid()
    counts = sweep.run(g, out, progress=False, log=_quiet)
    return g, out, counts, records.read_rows(out / sweep.RESULTS)


def test_grid_of_the_smoke_config_and_bad_grids():
    g = _grid()
    assert len(g.attack_cells) == 2 and len(g.cells) == 2 * 3 * 1
    assert len({a.name for a in g.attack_cells}) == 2
    keys = [k for c in g.cells for k in c.row_keys().values()]
    assert len(set(keys)) == len(keys) == 12
    # A changed training setting is another checkpoint; a changed defense setting
    # another row key.
    cfg = config.load("sweep_smoke", smoke=True)
    cfg["train"] = {**cfg["train"], "epochs": 3}
    assert {a.name for a in grid.expand(cfg).attack_cells}.isdisjoint(
        {a.name for a in g.attack_cells})
    other = _grid(defenses={"ft": {"lr": 0.02}})
    assert set(other.cells[0].row_keys().values()).isdisjoint(keys)
    for change, message in (({"atacks": {}}, "sweep key 'atacks' is unknown"),
                            ({"defenses": {"nope": {}}}, "unknown defense 'nope'"),
                            ({"defenses": {"ft": {"epoch": 2}}}, "'epoch'"),
                            ({"spc": []}, "no defender-data setting"),
                            ({"trials": 0}, "sweep trials 0 is invalid")):
        with pytest.raises(BdjaxError, match=message):
            _grid(**change)
    planned = _grid(planned={"defenses": ["ft_sam", "ep"]}, defenses={"ft": {}})
    assert {c.defense for c in planned.cells} == {"ft", "ft_sam"}
    assert planned.unavailable["defenses"] == ["ep"]


def test_every_cell_once_then_resume_does_no_work(smoke, monkeypatch):
    g, out, counts, rows = smoke
    assert counts["ran"] == 6 and counts["rows"] == 12 and counts["skipped"] == 0
    keys = {k for c in g.cells for k in c.row_keys().values()}
    assert set(_by_key(rows)) == keys
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        a.name for a in g.attack_cells)
    assert {r["checkpoint"] for r in rows} == {a.checkpoint_id for a in g.attack_cells}

    def nothing(*a, **k):
        raise AssertionError("a finished sweep trained or compiled again")

    monkeypatch.setattr(sweep.experiment, "run_attack", nothing)
    monkeypatch.setattr(runner, "_compiled", nothing)
    again = sweep.run(g, out, progress=False, log=_quiet)
    assert again["skipped"] == 6 and again["ran"] == 0
    # A smaller grid keeps the rows it still has: nothing to run.
    assert sweep.pending(_grid(defenses={"ft": {}, "fst": {}}), out) == []
    assert len(records.read_rows(out / sweep.RESULTS)) == 12


def test_kill_9_loses_no_cell_and_writes_none_twice(smoke, tmp_path):
    g, src, _, reference = smoke
    out = tmp_path / "killed"
    _copy_checkpoints(src, out)  # the kill lands among the defense cells
    proc = subprocess.Popen([sys.executable, "-m", "bdjax", "sweep", "sweep_smoke", "--smoke",
                             "--out", str(out), "--no-progress"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results, deadline = out / sweep.RESULTS, time.time() + 240
    try:
        while len(records.read_rows(results)) < 4 and proc.poll() is None:
            assert time.time() < deadline, "the sweep wrote no rows in time"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = records.read_rows(results)
    assert 4 <= len(killed) < 12, len(killed)  # killed at a third or more, before the end
    trials_done = {}
    for r in killed:
        trials_done.setdefault((r["checkpoint"], r["defense"]), set()).add(r["trial"])
    whole = sum(len(t) == 2 for t in trials_done.values())
    counts = sweep.run(g, out, progress=False, log=_quiet)
    assert counts["skipped"] == whole and counts["rows"] == 12 - len(killed)
    rows = records.read_rows(results)
    assert len(rows) == 12
    assert set(_by_key(rows)) == set(_by_key(reference))
    _assert_same_rows(rows, reference)


def test_four_devices_give_the_one_device_rows(smoke, tmp_path):
    """Trials spread over 4 (fake CPU) devices with shard_map: the rows of one device."""
    _, src, _, reference = smoke
    out = tmp_path / "four"
    _copy_checkpoints(src, out)
    cfg = _config_file(tmp_path, {"badnets": {}, "blended": {}}, {"ft": {}})
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-m", "bdjax", "sweep", cfg, "--out", str(out),
                           "--no-progress"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = records.read_rows(out / sweep.RESULTS)
    assert len(rows) == 4 and {r["devices"] for r in rows} == {4}
    _assert_same_rows(rows, reference)


def test_ray_engine_gives_the_local_rows(smoke, tmp_path):
    """Ray tasks on a local Ray instance (a checkpoint trained by one task, its defense
    cell run by another): the driver writes the rows the local engine wrote."""
    import ray

    g, src, _, reference = smoke
    out = tmp_path / "ray"
    sub = _grid(attacks={"blended": {}}, defenses={"ft": {}})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        counts = sweep.run(sub, out, engine="ray", progress=False, log=_quiet)
    finally:
        ray.shutdown()
    assert counts["ran"] == 1 and counts["rows"] == 2
    assert sweep.is_trained(out, sub.attack_cells[0])  # trained by a Ray task
    rows = records.read_rows(out / sweep.RESULTS)
    assert len(rows) == 2
    _assert_same_rows(rows, reference)


def test_plan_counts_cells_and_projects_the_rest(smoke, tmp_path):
    g, out, _, _ = smoke
    done = projection.plan(g, out, bench=str(BENCH))
    assert "done: 6 cells; to run: 0 cells" in done and "projected" not in done
    fresh = projection.plan(g, tmp_path / "empty", bench=str(BENCH))
    assert "6 cells of 2 trials = 12 defense runs" in fresh
    assert "projected on cpu:cpu" in fresh and "attack training" in fresh
    assert "| small_cnn | ft | 4 |" in fresh
    survey = grid.expand(config.load("survey_cifar10"))
    text = projection.plan(survey, tmp_path / "survey", bench=str(BENCH))
    assert "= 48 backdoored models" in text and "2880 cells of 10 trials" in text
    assert "not yet available" not in text  # the survey's eight attacks are all here
    assert "| preact_resnet18 | npd | 720 |" in text  # 24 models x 3 SPC x 10 trials


def test_a_checkpoint_that_is_not_complete_is_never_reused(tmp_path):
    g = _grid()
    acell = g.attack_cells[0]
    # What a save killed midway leaves: a hidden temporary directory, not the name.
    hidden = tmp_path / "checkpoints" / f".{acell.name}.tmp-123-abcd"
    hidden.mkdir(parents=True)
    assert not sweep.is_trained(tmp_path, acell)
    junk = sweep.checkpoint_dir(tmp_path, acell)
    junk.mkdir()
    (junk / "state").write_text("half")
    assert not sweep.is_trained(tmp_path, acell)
    with pytest.raises(BdjaxError, match="not a complete bdjax checkpoint"):
        sweep.train_attack_cell(tmp_path, acell)


def test_sweep_cli_bad_input_is_one_sentence(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(smoke=False):\n    return {'sweep': {'defenses': ['ft'], "
                   "'attacks': ['badnets'], 'spc': [2], 'engine': 1}}\n")
    proc = subprocess.run([sys.executable, "-m", "bdjax", "sweep", str(bad), "--out",
                           str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sweep key 'engine' is unknown" in lines[0]
    assert not (tmp_path / "o").exists()


def test_data_info_matches_the_loaded_dataset():
    """What --plan knows of a dataset without loading it is what loading gives."""
    ds = data.load("synthetic", n_train=600, n_test=200)
    assert data.info("synthetic", n_train=600, n_test=200) == {
        "n_train": len(ds.x_train), "num_classes": ds.num_classes, "flip": ds.flip}
    assert data.info("synthetic")["n_train"] == 10_000 and data.info("cifar10")["flip"]
