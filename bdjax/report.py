"""Read results back: the mean ± std table (``bdjax table``), the survey-style report
with figures (``bdjax report``) and row export.

``bdjax report RESULTS... --out DIR`` writes, for each defender-data setting (``spc=N``
or ``ratio=R``):

- ``box-<setting>.png``: box plots over trials of ASR, RDR and ARR (rows) per defense
  (one box each), per attack and for all attacks pooled (columns), as the survey plots
  them (papers/001);
- ``scatter-<setting>.png``: each defense's median clean ACC against its median ASR
  after defending, with the undefended models' medians for reference;

and ``report.md`` with the mean ± std table of each setting and the figures. ``--format
csv|parquet`` also writes the rows (``rows.csv``, ``rows.parquet``; nested fields as
JSON text). Figures need matplotlib and parquet needs pyarrow (``bdjax[report]``).
Every file is written to a temporary name and renamed, so none is left half written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib

import numpy as np

from bdjax import metrics
from bdjax.errors import BdjaxError

BOX_METRICS = (("asr", "ASR"), ("rdr", "RDR"), ("arr", "ARR"))
FORMATS = ("csv", "parquet")

def table(rows: list[dict]) -> str:
    """Mean and std over trials of ACC/ASR/RA before and after, DER, ARR and RDR, per
    (attack, defense, setting), with the run seconds per trial (the batch's run time over
    its trials)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        setting = f"spc={r['spc']}" if r.get("spc") is not None else f"ratio={r.get('ratio')}"
        groups.setdefault((r.get("attack", "?"), f"{r['defense']} {setting}"), []).append(r)
    head = ["attack", "defense", "trials", "ACC before", "ASR before", "RA before", "ACC",
            "ASR", "RA", "DER", "ARR", "RDR", "s/trial"]
    lines = [head]
    for (attack, name), rs in groups.items():
        cells = [attack, name, str(len(rs))]
        for k in ("acc_before", "asr_before", "ra_before", "acc", "asr", "ra", "der", "arr",
                  "rdr"):
            vals = np.array([np.nan if r.get(k) is None else r[k] for r in rs], float)
            mean, std = metrics.mean_std(vals)
            cells.append(f"{100 * float(mean):5.1f} ± {100 * float(std):4.1f}")
        secs = [r["seconds_run"] for r in rs if r.get("seconds_run") is not None]
        cells.append(f"{np.mean(secs):.1f}" if secs else "-")
        lines.append(cells)
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    fmt = lambda l: "| " + " | ".join(c.ljust(w) for c, w in zip(l, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), sep] + [fmt(l) for l in lines[1:]])


# ------------------------------------------------------------------------------ figures
def setting_of(row: dict) -> str:
    """``spc=N`` or ``ratio=R``: the defender-data setting of a row."""
    return f"spc={row['spc']}" if row.get("spc") is not None else f"ratio={row.get('ratio')}"


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _values(rows: list[dict], key: str) -> np.ndarray:
    v = np.array([np.nan if r.get(key) is None else r[key] for r in rows], float)
    return v[np.isfinite(v)]


def _figure(**kw):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BdjaxError("bdjax report draws its figures with matplotlib, which is not "
                         "installed; accepted: pip install 'bdjax[report]'.") from None
    return Figure(**kw)


def box_figure(rows: list[dict], setting: str):
    """Box plots of ASR, RDR and ARR per defense for ``setting``: one row of axes per
    metric, one column per attack plus one for all attacks pooled."""
    rows = [r for r in rows if setting_of(r) == setting]
    defenses = _ordered(r["defense"] for r in rows)
    columns = _ordered(r.get("attack", "?") for r in rows)
    columns = columns + ["all attacks"] if len(columns) > 1 else columns
    fig = _figure(figsize=(1.2 + 0.55 * len(defenses) * len(columns) + 1.2 * len(columns),
                           7.5), layout="constrained")
    axes = fig.subplots(len(BOX_METRICS), len(columns), squeeze=False, sharey="row")
    for i, (key, label) in enumerate(BOX_METRICS):
        for j, attack in enumerate(columns):
            ax = axes[i][j]
            mine = rows if attack == "all attacks" else [r for r in rows
                                                         if r.get("attack", "?") == attack]
            data = [_values([r for r in mine if r["defense"] == d], key) for d in defenses]
            ax.boxplot([d if d.size else [np.nan] for d in data], tick_labels=defenses,
                       patch_artist=True, widths=0.6,
                       boxprops={"facecolor": "#9ecae1"}, medianprops={"color": "k"})
            ax.tick_params(axis="x", labelrotation=45)
            ax.grid(axis="y", alpha=0.3)
            if i == 0:
                ax.set_title(attack)
            if j == 0:
                ax.set_ylabel(label)
    fig.suptitle(f"{setting}: over trials, per defense")
    return fig


def scatter_figure(rows: list[dict], setting: str):
    """Each defense's median clean ACC (x) against its median ASR (y) after defending,
    for ``setting``, with the backdoored models' medians before any defense."""
    rows = [r for r in rows if setting_of(r) == setting]
    fig = _figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(np.median(_values(rows, "acc_before")), np.median(_values(rows, "asr_before")),
               marker="x", color="k", s=60, label="no defense")
    for d in _ordered(r["defense"] for r in rows):
        mine = [r for r in rows if r["defense"] == d]
        x, y = np.median(_values(mine, "acc")), np.median(_values(mine, "asr"))
        ax.scatter(x, y, s=50, label=d)
        ax.annotate(d, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("clean ACC (median over trials and attacks)")
    ax.set_ylabel("ASR (median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{setting}: ACC vs ASR after defending")
    return fig


# ------------------------------------------------------------------------------- output
def _atomic(path: pathlib.Path, write) -> pathlib.Path:
    """Calls ``write(binary file)`` on a temporary file beside ``path``, then renames."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def flat_rows(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """(columns, rows) with nested values (settings, report, versions) as JSON text."""
    columns = _ordered(k for r in rows for k in r)
    flat = [{k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
             for k, v in r.items()} for r in rows]
    return columns, flat


def _write_csv(rows: list[dict], f) -> None:
    columns, flat = flat_rows(rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    f.write(text.getvalue().encode())


def _write_parquet(rows: list[dict], f) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BdjaxError("--format parquet needs pyarrow, which is not installed; "
                         "accepted: pip install 'bdjax[report]', or --format csv.") from None
    columns, flat = flat_rows(rows)
    pq.write_table(pa.Table.from_pylist(flat, schema=None), f)


def write(rows: list[dict], out, *, formats=()) -> list[pathlib.Path]:
    """Writes ``report.md``, the figures and the requested exports into ``out``; returns
    the written paths."""
    for fmt in formats:
        if fmt not in FORMATS:
            raise BdjaxError(f"export format {fmt!r} is unknown; accepted: "
                             f"{', '.join(FORMATS)}.")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    md = [f"# bdjax report\n\n{len(rows)} rows; "
          f"{len(_ordered(r['defense'] for r in rows))} defenses, "
          f"{len(_ordered(r.get('attack') for r in rows))} attacks.\n"]
    for setting in _ordered(setting_of(r) for r in rows):
        mine = [r for r in rows if setting_of(r) == setting]
        name = setting.replace("=", "")
        figures = []
        for kind, make in (("box", box_figure), ("scatter", scatter_figure)):
            fig = make(rows, setting)
            path = _atomic(out / f"{kind}-{name}.png",
                           lambda f, fig=fig: fig.savefig(f, format="png", dpi=110))
            written.append(path)
            figures.append(path.name)
        md += [f"## {setting}\n", table(mine), "",
               *(f"![{f}]({f})\n" for f in figures)]
    for fmt in formats:
        writer = _write_csv if fmt == "csv" else _write_parquet
        written.append(_atomic(out / f"rows.{fmt}", lambda f, w=writer: w(rows, f)))
    written.insert(0, _atomic(out / "report.md",
                              lambda f: f.write("\n".join(md).encode())))
    return written
