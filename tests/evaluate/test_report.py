"""Report pictures and tables: files exist, are real PNGs, and the tables carry the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chemmap.evaluate.report import summary_table, write_report
from chemmap.figures import plot_learning_curve, plot_maps, plot_residuals, plot_scatter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, min_bytes: int = 5000) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    assert not list(Path(path).parent.glob("*.tmp"))  # atomic writes leave no temp files


def _maps():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:60]
    truth = 20 + 15 * np.sin(xx / 8.0) * np.cos(yy / 6.0)
    mask = (xx - 30) ** 2 / 28**2 + (yy - 20) ** 2 / 18**2 < 1
    unet = truth + rng.normal(0, 1, truth.shape)
    pls = truth + rng.normal(0, 40, truth.shape)  # leaves 0-100 %
    return {k: np.where(mask, v, np.nan) for k, v in {"U-Net": unet, "PLS": pls, "truth": truth}.items()}


def test_plot_maps_fixed_and_shared_scale(tmp_path):
    maps = _maps()
    _assert_png(plot_maps(maps, tmp_path / "maps.png", title="sample 12"))
    _assert_png(plot_maps(maps, tmp_path / "maps_auto.png", vmin=None, vmax=None))
    with pytest.raises(ValueError, match="2-D"):
        plot_maps({"bad": np.zeros((2, 3, 4))}, tmp_path / "x.png")


def test_plot_scatter_and_residuals(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.uniform(10, 50, 40)
    preds = {"U-Net": y + rng.normal(0, 1, 40), "PLS": y + rng.normal(0.5, 2, 40)}
    _assert_png(plot_scatter(y, preds, tmp_path / "scatter.png"))
    _assert_png(plot_residuals(y, preds, tmp_path / "residuals.png"))
    with pytest.raises(ValueError, match="has 3 values"):
        plot_scatter(y, {"short": y[:3]}, tmp_path / "bad.png")


def test_plot_learning_curve_with_folds(tmp_path):
    history = [
        {"epoch": e, "fold": f, "train_loss": 10 / (e + 1), "val_loss": 12 / (e + 1), "val_rmse": 3 - 0.1 * e}
        for f in (1, 2)
        for e in range(15)
    ]
    history.append({"epoch": 15, "fold": 1, "train_loss": float("nan")})  # skipped, not an error
    _assert_png(plot_learning_curve(history, tmp_path / "learning.png"))


def test_summary_table_contains_numbers():
    metrics = {
        "U-Net": {"n": 36, "rmse": 1.23456, "r2": 0.9512, "bootstrap": {"ci_low": -0.4}},
        "PLS": {"n": 36, "rmse": 1.41, "r2": 0.9367, "curve": [1, 2, 3]},
    }
    md, html = summary_table(metrics)
    for s in ("U-Net", "PLS", "1.235", "0.9512", "1.41", "0.9367", "36", "bootstrap.ci_low", "-0.4"):
        assert s in md and s in html
    assert "curve" not in md
    header = md.splitlines()[0]
    assert header.index("rmse") < header.index("r2") < header.index("bootstrap.ci_low")
    assert html.count("<tr>") == 3  # header + 2 models


def test_write_report(tmp_path):
    maps = _maps()
    plot_maps(maps, tmp_path / "maps.png")
    metrics = {"U-Net": {"rmse": 1.5, "rpd": float("inf")}, "PLS": {"rmse": np.float64(1.75), "r2": np.nan}}
    paths = write_report(tmp_path, metrics, title="test split", extra={"bootstrap": {"estimate": -0.25}})
    data = json.loads(paths["json"].read_text())
    assert data["models"]["PLS"]["rmse"] == 1.75
    assert data["models"]["U-Net"]["rpd"] is None and data["models"]["PLS"]["r2"] is None
    assert data["bootstrap"]["estimate"] == -0.25
    md = paths["markdown"].read_text()
    assert "# test split" in md and "1.75" in md and "](maps.png)" in md
    page = paths["html"].read_text()
    assert "<table" in page and "1.75" in page and 'src="maps.png"' in page
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "maps.png",
        "metrics.json",
        "summary.html",
        "summary.md",
    ]
