"""A hand-made scanner folder with known numbers, for dataset tests independent of the synthesiser."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from chemmap.config import ChemmapConfig, load_config
from chemmap.io.envi import create_envi

CI_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ci.yaml"
WL = np.linspace(700.0, 1000.0, 16)
WHITE, DARK = 3000, 100  # counts


def write_scan(root: Path, scan_id: str, fat: float, *, lines=24, samples=20, rng=None, raw_dtype="uint16"):
    """A bright rectangle of 'meat' (reflectance ~0.5, tilted by fat) on a dark belt (0.05)."""
    rng = rng or np.random.default_rng(zlib.crc32(scan_id.encode()))  # not hash(): salted per process
    cap = root / scan_id / "capture"
    refl = np.full((lines, WL.size, samples), 0.05, np.float64)
    slope = (fat / 100.0) * np.linspace(-0.2, 0.2, WL.size)
    refl[4:-4, :, 3:-3] = (
        0.5 + slope[None, :, None] + 0.01 * rng.standard_normal((lines - 8, WL.size, samples - 6))
    )
    counts = DARK + refl * (WHITE - DARK)
    mm = create_envi(
        cap / f"{scan_id}.hdr",
        bands=WL.size,
        lines=lines,
        samples=samples,
        dtype=raw_dtype,
        wavelengths=WL,
        extra={"ceiling": 4095},
    )
    mm[...] = counts.astype(raw_dtype) if np.dtype(raw_dtype).kind in "ui" else counts
    mm.flush()
    for name, level in (("WHITEREF", WHITE), ("DARKREF", DARK)):
        ref = create_envi(
            cap / f"{name}_{scan_id}.hdr", bands=WL.size, lines=4, samples=samples, wavelengths=WL
        )
        ref[...] = level
        ref.flush()
    return cap / f"{scan_id}.hdr"


def write_folder(root: Path, n: int = 8, **kw) -> Path:
    """``n`` scans, one per sample, and a references.csv with splits (two test samples)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = ["scan_id,sample_id,fat,split"]
    for i in range(n):
        fat = 10.0 + 5 * i
        write_scan(root, f"S{i:02d}", fat, rng=np.random.default_rng(i), **kw)
        rows.append(f"S{i:02d},P{i:02d},{fat},{0 if i < 2 else 1 + i % 5}")
    (root / "references.csv").write_text("\n".join(rows) + "\n")
    return root


def folder_config(tmp_path: Path, *extra: str) -> ChemmapConfig:
    """configs/ci.yaml reading the folder ``tmp_path/scans`` (see :func:`write_folder`), a tiny model."""
    sets = [
        f"workdir={tmp_path / 'runs'}",
        "data.source=folder",
        f"data.root={tmp_path / 'scans'}",
        "preprocess.wavelength_min=750",
        "preprocess.bin=2",
        "preprocess.chunk_lines=8",
        "preprocess.chunk_samples=8",
        "preprocess.patch_core=8",
        "preprocess.mask.min_size=8",
        "model.depth=2",
        "model.features=2",
        "model.front_end=false",
        *extra,
    ]
    return load_config(CI_CONFIG, sets)
