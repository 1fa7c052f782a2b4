"""The realism check of the synthetic scanner (DESIGN.md, "The synthetic scanner is our dataset").

Two figures measured on real pork pin the scanner's noise:

- PLS on mean spectra predicts fat with R² ≈ 0.95 (Barbin et al., Food Chem. 2013);
- the same PLS applied pixel by pixel makes maps that are mostly noise: only ~2.5 % of their
  variance is spatially correlated and many pixels leave 0-100 % (Engstrøm et al. 2025).

:func:`check` measures both on a synthesized folder, independently of the preprocessing
stage (its calibration is the textbook ``(raw - dark) / (white - dark)``), so that the
scanner can be checked before any other part of the pipeline exists.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from chemmap.errors import InputError
from chemmap.spatial import spatial_correlated_share

# The paper's VNIR recipe: drop bands below 750 nm, average adjacent pairs.
VNIR_MIN_NM = 750.0
VNIR_BIN = 2
# A detector element whose white minus dark is below this (counts) is dead.
MIN_WHITE_SIGNAL = 20.0
MAX_COMPONENTS = 25


def _pls_class():
    try:  # ikpls < 6
        from ikpls.numpy_ikpls import PLS
    except ImportError:  # ikpls >= 6
        from ikpls.numpy import PLS
    return PLS


def _read_envi(hdr: Path) -> tuple[np.ndarray, dict]:
    """Counts in file order ``(lines, bands, samples)`` (BIL as written by the scanner) and the header."""
    import spectral.io.envi as envi

    img = envi.open(str(hdr), str(hdr.with_suffix(".raw")))
    meta = img.metadata
    if str(meta.get("interleave", "")).lower() != "bil":
        raise InputError(f"{hdr}: realism check reads BIL scans, got interleave {meta.get('interleave')!r}")
    arr = np.asarray(img.open_memmap(interleave="bil"))  # (lines, bands, samples)
    return arr, meta


def _calibrated(root: Path, sid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reflectance ``(lines, samples, bands)`` float32, usable pixels ``(lines, samples)``, wavelengths."""
    cap = root / sid / "capture"
    raw, meta = _read_envi(cap / f"{sid}.hdr")
    white, _ = _read_envi(cap / f"WHITEREF_{sid}.hdr")
    dark, _ = _read_envi(cap / f"DARKREF_{sid}.hdr")
    ceiling = float(meta.get("ceiling", 4095))
    w = white.astype(np.float64).mean(axis=0)  # (bands, samples)
    d = dark.astype(np.float64).mean(axis=0)
    span = w - d
    dead = span < MIN_WHITE_SIGNAL  # (bands, samples)
    inv = np.where(dead, 0.0, 1.0 / np.where(dead, 1.0, span)).astype(np.float32)
    raw32 = raw.astype(np.float32)
    saturated = (raw >= ceiling).any(axis=1)  # (lines, samples)
    refl = (raw32 - d.astype(np.float32)[None]) * inv[None]  # (lines, bands, samples)
    usable = ~saturated & ~dead.any(axis=0)[None, :]
    wl = np.asarray([float(v) for v in meta["wavelength"]])
    return refl.transpose(0, 2, 1), usable, wl


def _features(refl: np.ndarray, wl: np.ndarray, instrument: str) -> np.ndarray:
    """Spectra ``(..., bands)`` -> PLS inputs: the VNIR recipe for ``vnir``, all bands for ``nir``."""
    if instrument != "vnir":
        return refl
    keep = np.flatnonzero(wl >= VNIR_MIN_NM)
    n = (keep.size // VNIR_BIN) * VNIR_BIN
    x = refl[..., keep[:n]]
    return x.reshape(*x.shape[:-1], n // VNIR_BIN, VNIR_BIN).mean(axis=-1)


def _r2(y: np.ndarray, p: np.ndarray) -> float:
    return float(1.0 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2))


def check(root: str | Path, n_components: int | None = None, target: str = "fat") -> dict:
    """Mean-spectrum PLS and PLS maps on a synthetic folder: the two realism figures and more.

    Args:
        root: a folder written by :func:`chemmap.synth.synthesize`.
        n_components: PLS components; None: chosen by 5-fold CV on splits 1-5 (lowest RMSECV).
        target: reference column to predict.

    Returns:
        dict with ``r2_test`` (mean-spectrum PLS on split 0), ``rmsep``, ``rmsecv``,
        ``n_components``, ``spatial_share`` (median over test scans of the PLS maps' spatially
        correlated share), ``out_of_range`` (share of test pixels predicted outside 0-100 %),
        ``pixel_rmse`` (PLS map vs true map, %), ``truth_spatial_share``, ``map_sd`` (median
        within-scan SD of the PLS maps, %), ``truth_sd`` and counts.
    """
    import json

    root = Path(root)
    ok = root / "_SUCCESS.json"
    if not ok.is_file():
        raise InputError(f"{root} is not a finished synthetic dataset (no _SUCCESS.json)")
    instrument = json.loads(ok.read_text())["spec"]["instrument"]
    with open(root / "references.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    samples: dict[str, dict] = {}
    for r in rows:
        s = samples.setdefault(r["sample_id"], {"y": float(r[target]), "split": int(r["split"]), "scans": []})
        s["scans"].append(r["scan_id"])

    names = sorted(samples)
    X, y, split = [], [], []
    for name in names:
        acc, n = None, 0
        for sid in samples[name]["scans"]:
            refl, usable, wl = _calibrated(root, sid)
            with np.load(root / "truth" / f"{sid}.npz") as t:
                m = t["mask"] & usable
            f = _features(refl[m], wl, instrument).astype(np.float64)
            acc = f.sum(axis=0) if acc is None else acc + f.sum(axis=0)
            n += f.shape[0]
        X.append(acc / max(n, 1))
        y.append(samples[name]["y"])
        split.append(samples[name]["split"])
    X, y, split = np.asarray(X), np.asarray(y), np.asarray(split)
    train, test = split > 0, split == 0
    if test.sum() < 2 or train.sum() < 6:
        raise InputError(
            f"{root}: need >= 2 test and >= 6 training samples, got {test.sum()} and {train.sum()}"
        )

    PLS = _pls_class()

    def model() -> object:
        return PLS(center_X=True, center_Y=True, scale_X=False, scale_Y=False)

    amax = int(min(MAX_COMPONENTS, X.shape[1], int(train.sum() * 0.8) - 1))
    press = np.zeros(amax)
    for fold in np.unique(split[train]):
        tr, va = train & (split != fold), split == fold
        pls = model().fit(X[tr], y[tr], amax)
        pred = pls.predict(X[va])[..., 0]  # (A, n_va)
        press += ((pred - y[va][None]) ** 2).sum(axis=1)
    rmsecv = np.sqrt(press / train.sum())
    a = int(n_components or (int(np.argmin(rmsecv)) + 1))
    pls = model().fit(X[train], y[train], a)
    p_test = pls.predict(X[test], n_components=a)[:, 0]

    shares, truth_shares, sds, truth_sds, out, n_px, sq = [], [], [], [], 0, 0, 0.0
    for name in np.asarray(names)[test]:
        for sid in samples[name]["scans"]:
            refl, usable, wl = _calibrated(root, sid)
            with np.load(root / "truth" / f"{sid}.npz") as t:
                m = t["mask"] & usable
                truth = t[target]
            pix = _features(refl[m], wl, instrument).astype(np.float64)
            pred = pls.predict(pix, n_components=a)[:, 0]
            mp = np.full(m.shape, np.nan)
            mp[m] = pred
            shares.append(spatial_correlated_share(mp, m))
            truth_shares.append(spatial_correlated_share(np.where(m, truth, np.nan), m))
            sds.append(float(pred.std()))
            truth_sds.append(float(truth[m].std()))
            out += int(np.sum((pred < 0) | (pred > 100)))
            n_px += pred.size
            sq += float(np.sum((pred - truth[m]) ** 2))

    return {
        "instrument": instrument,
        "target": target,
        "n_samples": len(names),
        "n_test": int(test.sum()),
        "n_components": a,
        "rmsecv": float(rmsecv[a - 1]),
        "r2_test": _r2(y[test], p_test),
        "rmsep": float(np.sqrt(np.mean((y[test] - p_test) ** 2))),
        "spatial_share": float(np.median(shares)),
        "out_of_range": out / max(n_px, 1),
        "pixel_rmse": float(np.sqrt(sq / max(n_px, 1))),
        "map_sd": float(np.median(sds)),
        "truth_sd": float(np.median(truth_sds)),
        "truth_spatial_share": float(np.median(truth_shares)),
        "test_pixels": n_px,
    }
