"""``bdjax report``: report.md, the survey-style figures, and row export."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest
from matplotlib.patches import PathPatch

from bdjax import cli, records, report

DEFENSES = ("ft", "fst", "npd")
ATTACKS = ("badnets", "blended")


def _rows() -> list[dict]:
    """Rows as bdjax writes them: 2 attacks x 3 defenses x SPC 2 and 10 x 3 trials."""
    rng = np.random.default_rng(0)
    rows = []
    for attack, defense, spc, trial in itertools.product(ATTACKS, DEFENSES, (2, 10), range(3)):
        acc, asr, ra = rng.uniform(0.6, 0.9), rng.uniform(0.0, 0.9), rng.uniform(0.1, 0.8)
        rows.append({"checkpoint": f"checkpoints/{attack}", "dataset": "synthetic",
                     "model": "small_cnn", "attack": attack, "poison_ratio": 0.1,
                     "target": 0, "defense": defense, "settings": {"epochs": 2}, "spc": spc,
                     "ratio": None, "seed": 0, "trial": trial, "acc_before": 0.9,
                     "asr_before": 0.95, "ra_before": 0.04, "acc": acc, "asr": asr, "ra": ra,
                     "der": 0.5, "arr": (0.9 - acc) / 0.9, "rdr": (0.9 - ra) / 0.9,
                     "seconds_run": 1.0, "report": {"train_loss": [1.0, 0.5]}})
    return rows


def _boxes(ax) -> int:
    return sum(isinstance(p, PathPatch) for p in ax.patches)


def test_box_figure_has_one_box_per_defense_per_metric_and_attack():
    fig = report.box_figure(_rows(), "spc=10")
    axes = fig.get_axes()
    assert len(axes) == 3 * (len(ATTACKS) + 1)  # ASR/RDR/ARR x (each attack + pooled)
    for ax in axes:
        assert _boxes(ax) == len(DEFENSES)
        assert [t.get_text() for t in ax.get_xticklabels()] == list(DEFENSES)
    assert [ax.get_title() for ax in axes[:3]] == [*ATTACKS, "all attacks"]
    # A defense missing from one attack still gets its (empty) place.
    rows = [r for r in _rows() if not (r["attack"] == "blended" and r["defense"] == "npd")]
    assert all(_boxes(ax) == 3 for ax in report.box_figure(rows, "spc=2").get_axes())


def test_scatter_has_one_point_per_defense_at_its_medians():
    rows = _rows()
    ax = report.scatter_figure(rows, "spc=2").get_axes()[0]
    points = [c.get_offsets()[0] for c in ax.collections]
    assert len(points) == 1 + len(DEFENSES)  # "no defense" + each defense
    mine = [r for r in rows if r["spc"] == 2 and r["defense"] == "fst"]
    np.testing.assert_allclose(points[2], [np.median([r["acc"] for r in mine]),
                                           np.median([r["asr"] for r in mine])])


def test_report_writes_markdown_pngs_and_exports(tmp_path):
    path = tmp_path / "results.jsonl"
    rows = _rows()
    records.append_rows(path, rows)
    assert cli.main(["report", str(path), "--out", str(tmp_path / "r"), "--format", "csv",
                     "--format", "parquet"]) == 0
    out = tmp_path / "r"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["box-spc10.png", "box-spc2.png", "scatter-spc10.png", "scatter-spc2.png"]
    for p in pngs:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert md.count("## spc=") == 2 and "![box-spc2.png](box-spc2.png)" in md
    assert "| badnets | fst spc=2 | 3 " in md
    with open(out / "rows.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[0]["settings"] == '{"epochs": 2}'
    parquet = pq.read_table(out / "rows.parquet").to_pylist()
    assert [r["asr"] for r in parquet] == pytest.approx([r["asr"] for r in rows])
    assert not list(out.glob(".*tmp*"))  # nothing half written left behind


def test_report_bad_input_is_one_sentence(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
