"""Pictures a person opens: maps, scatter and residual plots, learning curves.

A leaf module (matplotlib and NumPy only), used by training (learning curves) and by
evaluation (maps, scatter, residuals). Figures use matplotlib's object API on the Agg
canvas (no ``pyplot``, no global state, no display needed) and are written atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chemmap.files import write_bytes_atomic

__all__ = ["plot_learning_curve", "plot_maps", "plot_residuals", "plot_scatter"]


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path | str, dpi: int = 110) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return write_bytes_atomic(Path(path), buf.getvalue())


def _vector(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (n,), got {arr.shape}.")
    return arr


def _check_preds(y: Any, preds: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    yv = _vector(y, "y")
    if not preds:
        raise ValueError("preds is empty: give at least one model's predictions.")
    out = {}
    for name, p in preds.items():
        pv = _vector(p, f"preds[{name!r}]")
        if pv.shape != yv.shape:
            raise ValueError(f"preds[{name!r}] has {pv.shape[0]} values, y has {yv.shape[0]}.")
        out[name] = pv
    return yv, out


def plot_maps(
    maps: Mapping[str, np.ndarray],
    path: Path | str,
    vmin: float | None = 0.0,
    vmax: float | None = 100.0,
    title: str | None = None,
    *,
    cmap: str = "viridis",
    units: str = "% fat",
    bad_color: str = "0.85",
) -> Path:
    """Chemical maps side by side on one colour scale with one colour bar.

    Args:
        maps: Name -> map ``(H, W)`` in ``units``, NaN outside the sample (drawn in
            ``bad_color``), e.g. ``{"U-Net": ..., "PLS": ..., "truth": ...}``. Maps may differ
            in size.
        path: PNG file to write.
        vmin: Lower end of the shared scale; ``None``: 1st percentile of all finite pixels.
        vmax: Upper end; ``None``: 99th percentile. Pixels beyond the scale saturate, and the
            colour bar shows arrows for them (PLS maps leave 0-100 %).
        title: Figure title.
        cmap: Matplotlib colour map name.
        units: Colour bar label.
        bad_color: Colour of NaN pixels (background).

    Returns:
        ``path``.
    """
    import matplotlib as mpl

    if not maps:
        raise ValueError("maps is empty: give at least one map.")
    arrays = {}
    for name, m in maps.items():
        a = np.asarray(m, dtype=np.float32)
        if a.ndim != 2:
            raise ValueError(f"map {name!r} must be 2-D (H, W), got shape {a.shape}.")
        arrays[name] = a
    if vmin is None or vmax is None:
        finite = np.concatenate([a[np.isfinite(a)] for a in arrays.values()])
        lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        vmin = float(lo) if vmin is None else vmin
        vmax = float(hi) if vmax is None else vmax
        if vmax <= vmin:
            vmax = vmin + 1.0
    cm = mpl.colormaps[cmap].with_extremes(bad=bad_color)
    n = len(arrays)
    h, w = max(a.shape[0] for a in arrays.values()), max(a.shape[1] for a in arrays.values())
    panel_w = 3.2
    fig = _new_figure(panel_w * n + 1.0, max(2.5, panel_w * h / max(w, 1) + 0.8))
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for ax, (name, a) in zip(axes, arrays.items(), strict=True):
        im = ax.imshow(a, cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    cb = fig.colorbar(im, ax=list(axes), extend="both", shrink=0.9)
    cb.set_label(units)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_scatter(
    y: np.ndarray,
    preds: Mapping[str, np.ndarray],
    path: Path | str,
    title: str | None = None,
    *,
    units: str = "% fat",
) -> Path:
    """Predicted vs reference for one or more models, with the 1:1 line and RMSE in the legend.

    Args:
        y: Reference values, shape ``(n,)``.
        preds: Model name -> predictions ``(n,)`` in the same units.
        path: PNG file to write.
        title: Figure title.
        units: Axis units.

    Returns:
        ``path``.
    """
    yv, pv = _check_preds(y, preds)
    fig = _new_figure(5.0, 5.0)
    ax = fig.subplots()
    allv = np.concatenate([yv, *pv.values()])
    lo, hi = float(np.nanmin(allv)), float(np.nanmax(allv))
    pad = 0.05 * (hi - lo if hi > lo else 1.0)
    for name, p in pv.items():
        r = float(np.sqrt(np.mean((p - yv) ** 2)))
        ax.scatter(yv, p, s=18, alpha=0.75, label=f"{name} (RMSE {r:.3g})")
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="1:1")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel(f"reference ({units})")
    ax.set_ylabel(f"predicted ({units})")
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_residuals(
    y: np.ndarray,
    preds: Mapping[str, np.ndarray],
    path: Path | str,
    title: str | None = None,
    *,
    units: str = "% fat",
    bins: int = 20,
) -> Path:
    """Histograms of residuals (predicted - reference), one per model, on shared bins.

    Args:
        y: Reference values, shape ``(n,)``.
        preds: Model name -> predictions ``(n,)``.
        path: PNG file to write.
        title: Figure title.
        units: Axis units.
        bins: Number of shared bins.

    Returns:
        ``path``.
    """
    yv, pv = _check_preds(y, preds)
    res = {name: p - yv for name, p in pv.items()}
    allr = np.concatenate(list(res.values()))
    edges = np.histogram_bin_edges(allr[np.isfinite(allr)], bins=bins)
    fig = _new_figure(6.0, 4.0)
    ax = fig.subplots()
    for name, r in res.items():
        sd = float(np.std(r, ddof=1)) if r.size > 1 else float("nan")
        ax.hist(r, bins=edges, alpha=0.5, label=f"{name} (bias {r.mean():.3g}, SEP {sd:.3g})")
    ax.axvline(0.0, color="k", lw=1)
    ax.set_xlabel(f"predicted - reference ({units})")
    ax.set_ylabel("samples")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_learning_curve(
    history: Sequence[Mapping[str, Any]], path: Path | str, title: str | None = None
) -> Path:
    """Training history: losses (log scale) and RMSEs per epoch.

    Args:
        history: One dict per epoch (and fold), e.g. ``{"epoch": 3, "fold": 1, "train_loss": ...,
            "val_loss": ..., "train_rmse": ..., "val_rmse": ...}``. Keys ending in ``loss`` go to
            the left panel, keys ending in ``rmse`` to the right one; entries with a ``fold`` key
            draw one line per fold. Missing or non-finite values are skipped.
        path: PNG file to write.
        title: Figure title.

    Returns:
        ``path``.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot.")
    series: dict[str, dict[str, list[tuple[float, float]]]] = {"loss": {}, "rmse": {}}
    for i, row in enumerate(history):
        epoch = float(row.get("epoch", i))
        fold = row.get("fold")
        for key, val in row.items():
            if key in ("epoch", "fold") or not isinstance(val, (int, float, np.floating, np.integer)):
                continue
            kind = "loss" if key.endswith("loss") else "rmse" if key.endswith("rmse") else None
            if kind is None or not math.isfinite(float(val)):
                continue
            label = key if fold is None else f"{key} (fold {fold})"
            series[kind].setdefault(label, []).append((epoch, float(val)))
    fig = _new_figure(10.0, 4.0)
    ax_loss, ax_rmse = fig.subplots(1, 2)
    for ax, kind in ((ax_loss, "loss"), (ax_rmse, "rmse")):
        for label, pts in series[kind].items():
            e, v = zip(*sorted(pts), strict=True)
            ax.plot(e, v, marker="." if len(e) < 50 else None, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(kind)
        ax.grid(alpha=0.3)
        if series[kind]:
            ax.legend(fontsize="x-small")
    if series["loss"] and all(v > 0 for pts in series["loss"].values() for _, v in pts):
        ax_loss.set_yscale("log")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
