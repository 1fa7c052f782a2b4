"""Shared by the reliability tests: hand-made scanner folders, configs, bundles and the real CLI.

Everything here writes real files: ENVI scans with :func:`chemmap.io.envi.create_envi` (via
``tests/preprocess/scanfolder.py``), a pipeline YAML, a model bundle of seeded random U-Nets
(what a finished training leaves, without the training). :func:`chemmap` runs the installed
``chemmap`` command in a subprocess, as a user does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from chemmap.config import PreprocessConfig
from chemmap.files import write_json_atomic
from chemmap.inference.bundle import write_bundle
from chemmap.io.envi import create_envi
from chemmap.models.unet import UNet, UNetConfig
from chemmap.preprocess.recipe import Recipe
from chemmap.stages import MARKER
from tests.preprocess.scanfolder import DARK, WHITE, WL, write_scan

ROOT = Path(__file__).resolve().parents[2]
CHEMMAP = Path(sys.executable).with_name("chemmap")
CI_CONFIG = ROOT / "configs" / "ci.yaml"
# The folder config's preprocessing (tests/preprocess/scanfolder.py's folder_config): 16 raw
# bands 700-1000 nm, those from 750 nm binned by 2.
PREPROCESS = {
    "wavelength_min": 750,
    "bin": 2,
    "chunk_lines": 8,
    "chunk_samples": 8,
    "patch_core": 8,
    "mask": {"min_size": 8},
}

__all__ = [
    "CHEMMAP",
    "PREPROCESS",
    "WL",
    "chemmap",
    "edit_header",
    "folder_config",
    "no_complete_stage",
    "one_error_line",
    "random_bundle",
    "scanner_folder",
    "write_scan",
    "write_scan_bands",
]


def scanner_folder(root: Path, n: int = 3, *, references: str | None = None, **scan_kw) -> Path:
    """``n`` scans ``S00``.. in Specim's layout, one per sample ``P00``.., and ``references.csv``.

    Args:
        root: the folder (created).
        references: the CSV's text; None: ``scan_id,sample_id,fat,split`` with valid rows.
        scan_kw: passed to :func:`write_scan` (``lines``, ``samples``, ``raw_dtype``).
    """
    root.mkdir(parents=True, exist_ok=True)
    rows = ["scan_id,sample_id,fat,split"]
    for i in range(n):
        fat = 10.0 + 5 * i
        write_scan(root, f"S{i:02d}", fat, rng=np.random.default_rng(i), **scan_kw)
        rows.append(f"S{i:02d},P{i:02d},{fat},{i % 2}")
    (root / "references.csv").write_text(references if references is not None else "\n".join(rows) + "\n")
    return root


def write_scan_bands(
    root: Path,
    scan_id: str,
    wavelengths,
    *,
    dtype: str = "uint16",
    lines: int = 24,
    samples: int = 20,
    value_at: tuple[int, int, float] | None = None,
) -> Path:
    """A scan like :func:`write_scan` (meat at reflectance ~0.5 on a dark belt) with any band centres.

    ``value_at``: ``(line, sample, value)`` written into every band of that raw pixel (NaN, inf).
    """
    wl = np.asarray(wavelengths, dtype=np.float64)
    cap = root / scan_id / "capture"
    refl = np.full((lines, wl.size, samples), 0.05)
    refl[4:-4, :, 3:-3] = 0.5 + 0.01 * np.random.default_rng(7).standard_normal(
        (lines - 8, wl.size, samples - 6)
    )
    counts = DARK + refl * (WHITE - DARK)
    if value_at is not None:
        counts[value_at[0], :, value_at[1]] = value_at[2]
    mm = create_envi(cap / f"{scan_id}.hdr", bands=wl.size, lines=lines, samples=samples, dtype=dtype,
                     wavelengths=wl, extra={"ceiling": 4095})  # fmt: skip
    mm[...] = counts.astype(dtype)
    mm.flush()
    for name, level in (("WHITEREF", WHITE), ("DARKREF", DARK)):
        ref = create_envi(
            cap / f"{name}_{scan_id}.hdr", bands=wl.size, lines=4, samples=samples, wavelengths=wl
        )
        ref[...] = level
        ref.flush()
    return cap / f"{scan_id}.hdr"


def folder_config(tmp: Path, data_root: Path, text: str = "", name: str = "cfg.yaml") -> Path:
    """A pipeline YAML (configs/ci.yaml reading ``data_root``, a tiny model) with ``text`` appended."""
    pre = json.dumps(PREPROCESS)
    body = (
        f"base: {CI_CONFIG}\n"
        f"workdir: {tmp / 'runs'}\n"
        f"data: {{source: folder, root: {data_root}}}\n"
        f"preprocess: {pre}\n"
        "model: {depth: 2, features: 2, front_end: false}\n"
    )
    path = tmp / name
    path.write_text(body + text)
    return path


def edit_header(hdr: Path, **fields: object) -> Path:
    """Set header fields (``data_type=6`` sets ``data type``); a value of None removes the field."""
    lines = hdr.read_text().splitlines()
    out, done = [], set()
    for line in lines:
        key = line.split("=", 1)[0].strip().lower().replace(" ", "_")
        if "=" in line and key in fields:
            done.add(key)
            if fields[key] is not None:
                out.append(f"{key.replace('_', ' ')} = {fields[key]}")
            continue
        out.append(line)
    out += [f"{k.replace('_', ' ')} = {v}" for k, v in fields.items() if k not in done and v is not None]
    hdr.write_text("\n".join(out) + "\n")
    return hdr


def chemmap(*args: str | os.PathLike, env: dict[str, str] | None = None, timeout: float = 120):
    """``chemmap ARGS`` in a subprocess (no progress bars); the finished process."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [str(CHEMMAP), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )


def one_error_line(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The one ``error:`` line of a refused command: exit ``code``, no traceback, naming ``needles``."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, (proc.returncode, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def no_complete_stage(workdir: Path) -> None:
    """No stage folder under ``workdir`` is marked complete (nothing half-made looks finished)."""
    done = sorted(str(p.relative_to(workdir)) for p in workdir.rglob(MARKER)) if workdir.exists() else []
    assert not done, done


def random_bundle(dest: Path, wavelengths=WL, *, seed: int = 0, preprocess: dict | None = None) -> Path:
    """A model bundle for scans with ``wavelengths``: two seeded random fold U-Nets and the recipe.

    The recipe is the folder config's (:data:`PREPROCESS`), with unit normalisation statistics.
    """
    recipe = Recipe.create(PreprocessConfig.model_validate(preprocess or PREPROCESS), np.asarray(wavelengths))
    recipe = recipe.with_stats(np.zeros(recipe.n_channels), np.ones(recipe.n_channels))
    config = UNetConfig(in_channels=recipe.n_channels, out_channels=1, depth=2, features=2)
    training = dest.with_name(dest.name + "-training")
    torch.manual_seed(seed)
    weights = []
    for fold in (1, 2):
        (training / f"fold{fold}").mkdir(parents=True)
        torch.save(UNet(config).state_dict(), training / f"fold{fold}" / "best.pt")
        weights.append(f"fold{fold}/best.pt")
    card = {"unet": asdict(config), "targets": ["fat"], "folds": [1, 2], "weights": weights}
    write_json_atomic(training / "model.json", card)
    return write_bundle(dest, training, recipe, provenance={"raw_saturation": 4095})


def touch(path: str) -> None:
    """What the payloads below would run: create a file."""
    Path(path).touch()


class Payload:
    """Unpickling this object calls ``touch(path)``: code no loader of chemmap may ever run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (touch, (self.path,))
