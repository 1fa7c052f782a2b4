"""The evaluation report a person opens: ``metrics.json``, ``summary.md`` and ``summary.html``.

The figures it shows come from :mod:`chemmap.figures`; every file is written atomically
(:mod:`chemmap.files`), so an interrupted run never leaves half a ``metrics.json`` behind.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chemmap.files import write_bytes_atomic

__all__ = ["ReportTable", "results_markdown", "summary_table", "write_report"]


@dataclass(frozen=True)
class ReportTable:
    """One more table of the summaries: a heading, an optional paragraph, rows and columns."""

    heading: str
    rows: Mapping[str, Mapping[str, Any]]
    columns: Sequence[str] | None = None
    text: str = ""
    first: str = "method"


# Columns first in the summary table, in this order; other keys follow alphabetically.
_PREFERRED_COLUMNS = (
    "n",
    "rmse",
    "r2",
    "bias",
    "sep",
    "rpd",
    "slope",
    "intercept",
    "rmsecv",
    "n_components",
    "spatial_correlated_share",
    "out_of_range_fraction",
    "pixel_rmse",
)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalars of ``d``, nested dicts as ``outer.inner``; lists and arrays are left out."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        elif isinstance(v, (bool, int, float, str, np.integer, np.floating)) or v is None:
            out[key] = v
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


def summary_table(
    metrics: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None, *, first: str = "model"
) -> tuple[str, str]:
    """One row per model, one column per metric, as Markdown and as an HTML table.

    Args:
        metrics: Model name -> metrics dict (e.g. :func:`~chemmap.evaluate.metrics.regression_metrics`
            merged with map metrics). Nested dicts become ``outer.inner`` columns; lists are left
            out. Floats are written with 4 significant digits.
        columns: The columns, in order (others are left out); default every key, the usual
            ones first.
        first: Heading of the first column (the row names).

    Returns:
        ``(markdown, html)``.
    """
    rows = {name: _flatten(m) for name, m in metrics.items()}
    keys = {k for r in rows.values() for k in r}
    if columns is None:
        columns = [k for k in _PREFERRED_COLUMNS if k in keys] + sorted(keys - set(_PREFERRED_COLUMNS))
    else:
        columns = [c for c in columns if c in keys]
    header = [first, *columns]
    body = [[name, *(_fmt(r.get(c)) for c in columns)] for name, r in rows.items()]

    def md_cell(s: str) -> str:
        return s.replace("|", "\\|")

    md = [
        "| " + " | ".join(map(md_cell, header)) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|",
    ]
    md += ["| " + " | ".join(map(md_cell, row)) + " |" for row in body]
    ht = [
        '<table class="chemmap-summary">',
        "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header),
    ]
    ht[-1] += "</tr></thead>"
    ht.append("<tbody>")
    for row in body:
        cells = [f"<th>{html.escape(row[0])}</th>"] + [
            f'<td align="right">{html.escape(c)}</td>' for c in row[1:]
        ]
        ht.append("<tr>" + "".join(cells) + "</tr>")
    ht += ["</tbody>", "</table>"]
    return "\n".join(md) + "\n", "\n".join(ht) + "\n"


def _jsonable(v: Any) -> Any:
    """numpy scalars/arrays to Python; NaN and inf to ``None`` (strict JSON has neither)."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, Path):
        return str(v)
    return v


def write_report(
    folder: Path | str,
    metrics: Mapping[str, Mapping[str, Any]],
    *,
    title: str = "chemmap evaluation",
    figures: Sequence[Path | str] | None = None,
    extra: Mapping[str, Any] | None = None,
    notes: str | None = None,
    tables: Sequence[ReportTable] = (),
) -> dict[str, Path]:
    """Write ``metrics.json``, ``summary.md`` and ``summary.html`` into ``folder``.

    Args:
        folder: Output folder (created if missing).
        metrics: Model name -> metrics dict; the table is :func:`summary_table` of it.
        title: Heading of the summaries.
        figures: PNG files to show under the table (default: every ``*.png`` already in
            ``folder``, sorted); paths are written relative to ``folder`` when inside it.
        extra: More JSON-able content stored in ``metrics.json`` next to ``models`` (e.g. the
            paired bootstrap, the PLS CV curve, the config hash).
        notes: Markdown paragraph placed under the heading of ``summary.md`` (escaped in HTML).
        tables: More tables, each under its own heading, after the models' table.

    Returns:
        ``{"json": ..., "markdown": ..., "html": ...}`` paths. ``metrics.json`` is
        ``{"title", "models": metrics, **extra}`` with NaN/inf written as ``null``.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "models": metrics, **(dict(extra) if extra else {})}
    text = json.dumps(_jsonable(payload), indent=2, allow_nan=False, sort_keys=False)
    paths = {"json": write_bytes_atomic(out / "metrics.json", (text + "\n").encode())}

    figs = sorted(out.glob("*.png")) if figures is None else [Path(f) for f in figures]
    rel = []
    for f in figs:
        try:
            rel.append(f.resolve().relative_to(out.resolve()).as_posix())
        except ValueError:
            rel.append(f.as_posix())
    md_table, html_table = summary_table(metrics)

    md = [f"# {title}", ""]
    if notes:
        md += [notes, ""]
    md += [md_table]
    for t in tables:
        t_md, _ = summary_table(t.rows, t.columns, first=t.first)
        md += [f"## {t.heading}", "", *([t.text, ""] if t.text else []), t_md]
    md += [f"![{Path(r).stem}]({r})\n" for r in rel]
    paths["markdown"] = write_bytes_atomic(out / "summary.md", "\n".join(md).encode())

    page = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse}"
        " td,th{border:1px solid #ccc;padding:4px 8px} img{max-width:100%;margin:1em 0}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if notes:
        page.append(f"<p>{html.escape(notes)}</p>")
    page.append(html_table)
    for t in tables:
        _, t_html = summary_table(t.rows, t.columns, first=t.first)
        page += [f"<h2>{html.escape(t.heading)}</h2>", *([f"<p>{html.escape(t.text)}</p>"] if t.text else [])]
        page.append(t_html)
    page += [f'<figure><img src="{html.escape(r)}" alt="{html.escape(Path(r).stem)}"></figure>' for r in rel]
    page.append("</body></html>")
    paths["html"] = write_bytes_atomic(out / "summary.html", ("\n".join(page) + "\n").encode())
    return paths


def _cell(v: Any, digits: int = 2, percent: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, str):
        return v
    return f"{100 * v:.{digits}f} %" if percent else f"{v:.{digits}f}"


def results_markdown(metrics: Mapping[str, Any]) -> str:
    """The README's results tables from one evaluation's ``metrics.json`` (first target).

    Two tables: the mean of each sample (every model against the lab value and against the
    true surface mean), and every map method against the true maps, with its role and the
    setting the protocol chose.
    """
    models, maps = metrics["models"], metrics["maps"]
    target = next(iter(models.values()))
    if "rmse" not in target:  # several targets: the first
        first = next(iter(target))
        models = {k: v[first] for k, v in models.items()}
        maps = maps[first]
    boot, rel = metrics["bootstrap_rmse_unet_minus_pls"], metrics["relative_rmse_change"]
    lines = [
        f"Mean of each test sample ({metrics['n_test']} samples):",
        "",
        "| model | RMSE vs lab | RMSE vs true surface mean | R² | bias |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in models.items():
        truth = maps.get(name, {}).get("mean_rmse_truth")
        cells = [_cell(m["rmse"], 3), _cell(truth, 3), _cell(m["r2"], 3), _cell(m["bias"], 3)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"U-Net vs PLS: {_cell(rel, percent=True)} in RMSE; paired bootstrap of the difference "
        f"{boot['estimate']:+.3f}, 95 % CI [{boot['ci_low']:+.3f}, {boot['ci_high']:+.3f}]. "
        f"RMSECV (a selection criterion: the same folds chose each model's stopping epoch or "
        f"component count): U-Net {metrics['rmsecv']['unet']:.3f}, PLS {metrics['rmsecv']['pls']:.3f}.",
        "",
        "Maps against the true maps of the test split (per-pixel RMSE pooled over all test pixels; "
        "settings chosen out of fold on the training splits, docs/evaluation.md):",
        "",
        "| map | role | setting | px RMSE | out-of-fold px RMSE | bias in fat / lean | "
        "spatial share, own grid / full grid | outside 0-100 % |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in maps.items():
        lines.append(
            f"| {name} | {r['role']} | {r.get('setting', '')} | {_cell(r.get('pixel_rmse'))} | "
            f"{_cell(r.get('oof_pixel_rmse'))} | {_cell(r.get('bias_fat_tissue'), 1)} / "
            f"{_cell(r.get('bias_lean_tissue'), 1)} | {_cell(r['spatial_correlated_share'], percent=True)} / "
            f"{_cell(r['spatial_correlated_share_full'], percent=True)} | "
            f"{_cell(r['out_of_range_fraction'], percent=True)} |"
        )
    return "\n".join(lines) + "\n"
