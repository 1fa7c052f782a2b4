"""bench/energy.py and bench/blindspot.py on the CI preset's dataset: they run, print their
figures, refuse the test split."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_energy_script_runs_on_a_development_dataset(tiny_dataset):
    _, pre = tiny_dataset
    cmd = [sys.executable, str(ROOT / "bench" / "energy.py"), str(pre.path / "dataset.zarr"), "--scans", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    figures = dict(re.findall(r"^(.+): per-pixel RMSE ([0-9.]+)$", out, flags=re.M))
    assert set(figures) == {"ridge map", "median 5x5", "energy minimiser"}
    assert all(float(v) > 0 for v in figures.values())


def test_the_test_split_is_refused(tiny_dataset):
    _, pre = tiny_dataset
    script, store = str(ROOT / "bench" / "energy.py"), str(pre.path / "dataset.zarr")
    cmd = [sys.executable, script, store, "--eval-folds", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and "test split" in res.stderr


def test_a_fold_model_is_scored_beside_the_minimiser(tiny_dataset, tmp_path):
    """--train-dir: the fold model's map and the minimiser from its spectral map, with their energies."""
    import torch
    import yaml

    from chemmap.models.unet import UNet, UNetConfig
    from chemmap.preprocess.store import Dataset

    _, pre = tiny_dataset
    data = Dataset(pre.path / "dataset.zarr")
    model = {"depth": 2, "features": 4, "front_end": True, "spectral_path": True, "kernel_head": 3}
    (tmp_path / "fold1").mkdir()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=data.n_channels, **model))
    torch.save({"model": net.state_dict()}, tmp_path / "fold1" / "best.pt")
    script, store = str(ROOT / "bench" / "energy.py"), str(pre.path / "dataset.zarr")
    cmd = [sys.executable, script, store, "--scans", "2", "--train-dir", str(tmp_path), "--eval-folds", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "U-Net: per-pixel RMSE" in out and "minimiser from the U-Net's spectral map: weighted" in out


def test_the_blind_spot_script_runs_and_refuses_the_test_split(tiny_dataset):
    """bench/blindspot.py: a few steps on the CI preset's dataset print every figure."""
    _, pre = tiny_dataset
    script, store = str(ROOT / "bench" / "blindspot.py"), str(pre.path / "dataset.zarr")
    cmd = [sys.executable, script, store, "--scans", "2", "--steps", "3", "--crop", "24", "--batch", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    figures = dict(re.findall(r"^(.+): per-pixel RMSE ([0-9.]+) \(", out, flags=re.M))
    assert set(figures) == {"ridge map", "blind-spot net", *(f"median {k}x{k}" for k in (3, 5, 7, 9))}
    assert all(float(v) > 0 for v in figures.values())
    res = subprocess.run([*cmd[:3], "--fit-folds", "0"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and "test split" in res.stderr


def test_the_pixel_path_script_prints_every_map_and_refuses_the_test_split(tiny_dataset):
    """bench/pixelpath.py: a few steps of each fit on the CI preset's dataset, a row per map."""
    _, pre = tiny_dataset
    script, store = str(ROOT / "bench" / "pixelpath.py"), str(pre.path / "dataset.zarr")
    cmd = [sys.executable, script, store, "--scans", "2", "--steps", "3", "--n2v-steps", "2", "--hidden", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rows = dict(re.findall(r"^(pls|mlp[^\d]*?[\w )]*?)\s+([0-9.]+)\s+[0-9.]+\s+[0-9.]+$", out, flags=re.M))
    assert set(rows) == {"pls", "mlp, smooth 0", "mlp, smooth 1", "mlp on pixel truth (headroom)"}, out
    assert all(float(v) > 0 for v in rows.values())
    res = subprocess.run([*cmd[:3], "--fit-folds", "0"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and "test split" in res.stderr
