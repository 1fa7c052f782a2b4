"""The realism check of the synthetic scanner (DESIGN.md, "The synthetic scanner is our dataset").

Figures measured on real pork that the scanner's data are compared with (issue 14 reports
them per instrument, misses included; they are never used to set a constant):

- PLS on mean spectra predicts fat with R² ≈ 0.95 (Barbin et al., Food Chem. 2013);
- the same PLS applied pixel by pixel makes maps that are mostly noise: only ~2.5 % of their
  variance is spatially correlated and many pixels leave 0-100 % (Engstrøm et al. 2025).

:func:`check` measures both on a synthesized folder, independently of the preprocessing
stage (its calibration is the textbook ``(raw - dark) / (white - dark)``), so that the
scanner can be checked before any other part of the pipeline exists.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
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


def _new_pls():
    """An unfitted PLS model: centred, unscaled X and y (ikpls)."""
    return _pls_class()(center_X=True, center_Y=True, scale_X=False, scale_Y=False)


@dataclass
class _LabSample:
    """One sample of ``references.csv``: its lab value, its split and its scans."""

    y: float
    split: int
    scans: list[str] = field(default_factory=list)


def _read_samples(root: Path, target: str) -> dict[str, _LabSample]:
    """The samples of ``root/references.csv`` by sample id, in the file's order."""
    with open(root / "references.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    samples: dict[str, _LabSample] = {}
    for r in rows:
        s = samples.setdefault(r["sample_id"], _LabSample(y=float(r[target]), split=int(r["split"])))
        s.scans.append(r["scan_id"])
    return samples


@dataclass(frozen=True)
class _ScanPixels:
    """The usable sample pixels of one scan and its true map.

    Attributes:
        mask: bool ``(lines, samples)``, sample pixels neither saturated nor dead.
        features: float64 ``(pixels in mask, features)``, the PLS inputs of those pixels.
        truth: float32 ``(lines, samples)``, the target's true map (%, NaN off the sample).
    """

    mask: np.ndarray
    features: np.ndarray
    truth: np.ndarray
    brightness: np.ndarray  # float32 (lines, samples): mean reflectance over every band
    sample_mask: np.ndarray  # bool (lines, samples): the truth's sample mask


def _scan_pixels(root: Path, sid: str, instrument: str, target: str) -> _ScanPixels:
    refl, usable, wl = _calibrated(root, sid)
    with np.load(root / "truth" / f"{sid}.npz") as t:
        sample = t["mask"]
        truth = t[target]
    m = sample & usable
    return _ScanPixels(
        mask=m,
        features=_features(refl[m], wl, instrument).astype(np.float64),
        truth=truth,
        brightness=refl.mean(axis=-1),
        sample_mask=sample,
    )


def pixel_pitch_mm(mask: np.ndarray) -> float:
    """The pixel pitch a scan stands for: the belly's width (``BELLY_WIDTH_MM``) over its short axis.

    The short axis is measured from the mask's second moments (an ellipse's axis is 4 SD long).
    """
    from chemmap.synth.physics import BELLY_WIDTH_MM

    yx = np.argwhere(mask).astype(np.float64)
    if len(yx) < 3:
        return float("nan")
    minor = 4.0 * np.sqrt(max(np.linalg.eigvalsh(np.cov(yx.T))[0], 1e-9))
    return float(BELLY_WIDTH_MM / minor)


def _box_mean(a: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """3 x 3 mean of ``a`` over the pixels in ``ok`` (NaN where none)."""
    from scipy import ndimage

    w = ok.astype(np.float64)
    num = ndimage.uniform_filter(np.where(ok, a, 0.0), 3, mode="constant")
    den = ndimage.uniform_filter(w, 3, mode="constant")
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


@dataclass(frozen=True)
class _MeanSpectra:
    """One row per sample (sorted ids): the mean PLS input over its scans' pixels, lab value, split."""

    names: list[str]
    X: np.ndarray  # (samples, features)
    y: np.ndarray  # (samples,)
    split: np.ndarray  # (samples,)


def _mean_spectra(root: Path, samples: dict[str, _LabSample], instrument: str, target: str) -> _MeanSpectra:
    names = sorted(samples)
    X = []
    for name in names:
        acc, n = None, 0
        for sid in samples[name].scans:
            f = _scan_pixels(root, sid, instrument, target).features
            acc = f.sum(axis=0) if acc is None else acc + f.sum(axis=0)
            n += f.shape[0]
        X.append(acc / max(n, 1))
    y = np.asarray([samples[name].y for name in names])
    split = np.asarray([samples[name].split for name in names])
    return _MeanSpectra(names=names, X=np.asarray(X), y=y, split=split)


def _cv_rmse(data: _MeanSpectra) -> np.ndarray:
    """RMSECV of 1, 2, ... components over the folds of splits 1-5, ``(components,)``."""
    train = data.split > 0
    amax = int(min(MAX_COMPONENTS, data.X.shape[1], int(train.sum() * 0.8) - 1))
    press = np.zeros(amax)
    for fold in np.unique(data.split[train]):
        tr, va = train & (data.split != fold), data.split == fold
        pls = _new_pls().fit(data.X[tr], data.y[tr], amax)
        pred = pls.predict(data.X[va])[..., 0]  # (A, n_va)
        press += ((pred - data.y[va][None]) ** 2).sum(axis=1)
    return np.sqrt(press / train.sum())


@dataclass
class _MapFigures:
    """PLS maps of the test scans against their true maps (sums and per-scan lists)."""

    shares: list[float] = field(default_factory=list)  # spatially correlated share per scan
    truth_shares: list[float] = field(default_factory=list)
    sds: list[float] = field(default_factory=list)  # within-scan SD of the PLS map, %
    truth_sds: list[float] = field(default_factory=list)
    pitches: list[float] = field(default_factory=list)  # mm per px
    bright: list[np.ndarray] = field(default_factory=list)  # mean reflectance of the masked pixels
    bright3: list[np.ndarray] = field(default_factory=list)  # the same, 3 x 3 mean
    truths: list[np.ndarray] = field(default_factory=list)  # their true values
    out: int = 0  # pixels predicted outside 0-100 %
    n_px: int = 0  # pixels predicted
    sq: float = 0.0  # sum of squared errors against the true map, %^2

    def add(self, px: _ScanPixels, pred: np.ndarray) -> None:
        """Add one scan's pixel predictions ``pred`` (of the pixels in ``px.mask``)."""
        m, truth = px.mask, px.truth
        mp = np.full(m.shape, np.nan)
        mp[m] = pred
        self.shares.append(spatial_correlated_share(mp, m))
        self.truth_shares.append(spatial_correlated_share(np.where(m, truth, np.nan), m))
        self.sds.append(float(pred.std()))
        self.truth_sds.append(float(truth[m].std()))
        self.pitches.append(pixel_pitch_mm(px.sample_mask))
        self.bright.append(px.brightness[m])
        self.bright3.append(_box_mean(px.brightness, m)[m])
        self.truths.append(truth[m])
        self.out += int(np.sum((pred < 0) | (pred > 100)))
        self.n_px += pred.size
        self.sq += float(np.sum((pred - truth[m]) ** 2))


def _test_maps(
    root: Path,
    samples: dict[str, _LabSample],
    test_names: Sequence[str],
    pls,
    a: int,
    instrument: str,
    target: str,
) -> _MapFigures:
    """Apply the PLS model pixel by pixel to every scan of the test samples."""
    figures = _MapFigures()
    for name in test_names:
        for sid in samples[name].scans:
            px = _scan_pixels(root, sid, instrument, target)
            figures.add(px, pls.predict(px.features, n_components=a)[:, 0])
    return figures


def _instrument(root: Path) -> str:
    ok = root / "_SUCCESS.json"
    if not ok.is_file():
        raise InputError(f"{root} is not a finished synthetic dataset (no _SUCCESS.json)")
    return json.loads(ok.read_text())["spec"]["instrument"]


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
        within-scan SD of the PLS maps, %), ``truth_sd``, ``pixel_pitch_mm`` (median over test
        scans, :func:`pixel_pitch_mm`), ``brightness_r2`` (share of the true map's per-pixel
        variance over the test pixels that a line in mean reflectance explains) and
        ``brightness_r2_3x3`` (the same after a 3 x 3 mean of the reflectance), and counts.
    """
    root = Path(root)
    instrument = _instrument(root)
    samples = _read_samples(root, target)
    data = _mean_spectra(root, samples, instrument, target)
    train, test = data.split > 0, data.split == 0
    if test.sum() < 2 or train.sum() < 6:
        raise InputError(
            f"{root}: need >= 2 test and >= 6 training samples, got {test.sum()} and {train.sum()}"
        )
    rmsecv = _cv_rmse(data)
    a = int(n_components or (int(np.argmin(rmsecv)) + 1))
    pls = _new_pls().fit(data.X[train], data.y[train], a)
    p_test = pls.predict(data.X[test], n_components=a)[:, 0]
    y_test = data.y[test]
    maps = _test_maps(root, samples, list(np.asarray(data.names)[test]), pls, a, instrument, target)
    truths = np.concatenate(maps.truths)
    return {
        "instrument": instrument,
        "target": target,
        "n_samples": len(data.names),
        "n_test": int(test.sum()),
        "n_components": a,
        "rmsecv": float(rmsecv[a - 1]),
        "r2_test": _r2(y_test, p_test),
        "rmsep": float(np.sqrt(np.mean((y_test - p_test) ** 2))),
        "spatial_share": float(np.median(maps.shares)),
        "out_of_range": maps.out / max(maps.n_px, 1),
        "pixel_rmse": float(np.sqrt(maps.sq / max(maps.n_px, 1))),
        "map_sd": float(np.median(maps.sds)),
        "truth_sd": float(np.median(maps.truth_sds)),
        "truth_spatial_share": float(np.median(maps.truth_shares)),
        "test_pixels": maps.n_px,
        "pixel_pitch_mm": float(np.median(maps.pitches)),
        "brightness_r2": _explained(np.concatenate(maps.bright), truths),
        "brightness_r2_3x3": _explained(np.concatenate(maps.bright3), truths),
    }


def _explained(x: np.ndarray, y: np.ndarray) -> float:
    """Share of ``y``'s variance a straight line in ``x`` explains (squared correlation)."""
    ok = np.isfinite(x) & np.isfinite(y)
    return float(np.corrcoef(x[ok], y[ok])[0, 1] ** 2)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m chemmap.synth.realism [FOLDER] [--instrument nir] [--seed 7]``: the figures as JSON.

    With an existing synthetic folder, checks it; otherwise synthesizes the default data (the
    default config's size) of ``--instrument`` and ``--seed`` into ``--out`` first.
    """
    import argparse
    import tempfile

    from chemmap.synth import SynthSpec, synthesize

    ap = argparse.ArgumentParser(prog="python -m chemmap.synth.realism", description=main.__doc__)
    ap.add_argument("folder", nargs="?", help="a folder written by chemmap synth (default: make one)")
    ap.add_argument("--instrument", choices=("vnir", "nir"), default="vnir")
    ap.add_argument("--seed", type=int, default=7, help="a development seed (default 7)")
    ap.add_argument("--out", help="where to synthesize (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.folder:
        root = Path(args.folder)
    else:
        base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="chemmap-realism-"))
        root = base / f"{args.instrument}-{args.seed}"
        synthesize(root, SynthSpec(instrument=args.instrument, seed=args.seed))
    print(json.dumps(check(root), indent=1))


if __name__ == "__main__":
    main()
