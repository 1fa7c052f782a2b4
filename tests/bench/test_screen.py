"""bench/screen.py reads out-of-fold figures only and refuses reporting seeds (no pipeline run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import screen  # the script's own functions (bench/ is importable from the repo root)

ROOT = Path(__file__).resolve().parents[2]


METRICS = {
    "maps": {
        "unet": {"oof_pixel_rmse": 23.3, "pixel_rmse": 99.0},
        "pls": {"oof_pixel_rmse": 13.5, "pixel_rmse": 99.0},
        "pls_median": {"oof_pixel_rmse": 7.3, "pixel_rmse": 99.0},
    },
    "protocol": {"best_label_free": "pls_median"},
    "rmsecv": {"unet": 3.2, "pls": 2.8},
    "rmsecv_unet_training": 3.2,
    "models": {"unet": {"rmse": 99.0}, "pls": {"rmse": 99.0}},  # the test split's: never read
}


def test_only_out_of_fold_figures_are_read():
    got = screen.oof_figures(METRICS, "fat")
    assert got == {
        "unet_oof_pixel_rmse": 23.3,
        "best_label_free": "pls_median",
        "best_oof_pixel_rmse": 7.3,
        "pls_oof_pixel_rmse": 13.5,
        "unet_rmsecv": 3.2,
        "pls_rmsecv": 2.8,
    }
    assert 99.0 not in got.values()  # no test-split figure


def test_variants_parse_and_the_test_figures_stay_out_of_the_log(capsys):
    assert screen.parse_variant("base=") == ("base", [])
    assert screen.parse_variant("hub=a.b=1,c=x") == ("hub", ["a.b=1", "c=x"])
    assert screen.parse_variant("kernel5_r2_mean10") == (
        "kernel5_r2_mean10",
        screen.VARIANTS["kernel5_r2_mean10"],
    )
    with pytest.raises(SystemExit, match="not a variant"):
        screen.parse_variant("no_such_variant")
    screen._log_without_test_figures("evaluate: test RMSE U-Net 3 vs PLS 2")
    screen._log_without_test_figures("evaluate: per-pixel RMSE U-Net 20")
    screen._log_without_test_figures("train: fold 1/2")
    assert capsys.readouterr().out == "  train: fold 1/2\n"


def test_reporting_seeds_are_refused():
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "screen.py"), "--seeds", "100"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "reporting seeds" in res.stderr


def test_every_named_variant_is_a_valid_pipeline_config():
    from bench.screen import VARIANTS
    from chemmap.config import load_config

    for name, sets in VARIANTS.items():
        cfg = load_config(ROOT / "pipelines" / "pork_belly.yaml", sets)
        assert cfg.model.spectral_path or not name.startswith(("denoise", "kernel")), name
