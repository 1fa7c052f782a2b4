"""Flags that say when not to trust a map, on the shared tiny dataset and on scans made for them.

The PCA is checked against a direct NumPy computation and against spectra whose T² and Q are
known by construction; the limits out of fold against in-sample ones; and the flags on the
dataset's held-out samples, as recorded and recorded *frozen*: the same bellies, the same
camera and noise draws, with the O-H bands of ice instead of liquid water.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from chemmap.config import load_config
from chemmap.errors import ConfigError, InputError
from chemmap.inference.flags import (
    SpectralModel,
    acquisition_time,
    fit_spectral_model,
    flags_columns,
    saturated_share,
    scan_flags,
    scan_mean_spectrum,
    white_reference_age_hours,
)
from chemmap.io import ScanFiles, create_envi, open_scan
from chemmap.preprocess.recipe import Recipe
from chemmap.preprocess.scan import reference_means, sample_mask, transform
from chemmap.preprocess.store import Dataset
from chemmap.synth import SynthSpec, synthesize
from chemmap.synth import physics as ph

ROOT = Path(__file__).resolve().parents[2]

# Frozen meat: the O-H bands of ice sit ~50-75 nm longer than liquid water's (ice's 1.03 µm
# band, used to size snow grains, against water's 0.97 µm; Warren & Brandt, J. Geophys. Res.
# 2008, 113, D14220; Nolin & Dozier, Remote Sens. Environ. 2000, 74, 207). Widths and strengths
# are kept as they are: only the bands' positions change.
ICE_SHIFT_NM = (60.0, 60.0, 60.0, 75.0, 50.0)  # per row of physics.WATER_BANDS
ICE_BANDS = tuple(
    (centre + shift, fwhm, peak)
    for (centre, fwhm, peak), shift in zip(ph.WATER_BANDS, ICE_SHIFT_NM, strict=True)
)


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tiny_dataset) -> Dataset:
    _, pre = tiny_dataset
    return Dataset(pre.path / "dataset.zarr")


@pytest.fixture(scope="module")
def model(data) -> SpectralModel:
    return fit_spectral_model(data)


def _direct_sample_spectra(data: Dataset, ids: list[str]) -> np.ndarray:
    """``(n, C)`` mean spectra read whole, without :mod:`chemmap.inference.flags`."""
    out = []
    for sid in ids:
        cubes = [np.asarray(data.cube(s)[...], np.float64) for s in data.samples[sid].scans]
        masks = [data.mask(s) for s in data.samples[sid].scans]
        pixels = np.concatenate([c[:, m] for c, m in zip(cubes, masks, strict=True)], axis=1)
        out.append(pixels.mean(axis=1))
    return np.stack(out)


def _table_row(data: Dataset, scan: str) -> dict:
    return next(r for r in data.scan_table if r["scan_id"] == scan)


def _raw_scan_numbers(hdr: Path, recipe: Recipe) -> tuple[np.ndarray, int, int]:
    """A raw scan through the one path (references, transform, sample mask): mean spectrum,
    mask pixels, bad pixels removed."""
    scan = open_scan(hdr)
    cap, sid = hdr.parent, hdr.stem
    files = ScanFiles(sid, hdr, cap / f"WHITEREF_{sid}.hdr", cap / f"DARKREF_{sid}.hdr")
    white, dark = reference_means(scan, files, recipe)
    t = transform(scan.data.compute(), white, dark, recipe, recipe.saturation_level(scan.header, scan.dtype))
    sm = sample_mask(np.asarray(t.reflectance_mean), np.asarray(t.bad), recipe.config.mask, source=str(hdr))
    return scan_mean_spectrum(np.asarray(t.cube), sm.mask), int(sm.mask.sum()), sm.bad_removed


# ---------------------------------------------------------------------------------------------
# The PCA: known answers
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_t2_and_q_of_training_samples_match_a_direct_numpy_pca(data, model):
    ids = data.ids([s for s in data.splits if s != 0])
    X = _direct_sample_spectra(data, ids)  # (n, C)
    mean = X.mean(axis=0)
    _, s, vt = np.linalg.svd(X - mean, full_matrices=False)
    lam = s**2 / (len(ids) - 1)
    # The stated rule: fewest components explaining >= 99 %, <= 10, <= (smallest PCA's n) - 2.
    folds = np.array([data.samples[i].split for i in ids])
    smallest = min(len(ids) - int((folds == f).sum()) for f in np.unique(folds))
    k_rule = int(np.argmax(np.cumsum(lam) / lam.sum() >= 0.99)) + 1
    k = min(k_rule, 10, smallest - 2)
    assert model.n_components == k
    assert model.n_samples == len(ids) and model.n_scans == len(ids)
    np.testing.assert_allclose(model.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(model.eigenvalues, lam[:k], rtol=1e-9)
    P = vt[:k]  # (k, C)
    for x in X:
        t = P @ (x - mean)
        t2, q = model.score(x)
        assert t2 == pytest.approx(float((t**2 / lam[:k]).sum()), rel=1e-9)
        assert q == pytest.approx(float(((x - mean - P.T @ t) ** 2).sum()), rel=1e-9)


@pytest.mark.slow
def test_spectra_with_known_t2_and_q(model):
    mean = np.asarray(model.mean)
    P = np.asarray(model.loadings)  # (k, C)
    assert model.score(mean) == (0.0, 0.0)
    # Along the first axis only: T² = c² / λ1, nothing left over.
    c = 3.0 * np.sqrt(model.eigenvalues[0])
    t2, q = model.score(mean + c * P[0])
    assert t2 == pytest.approx(9.0, rel=1e-9)
    assert q == pytest.approx(0.0, abs=1e-12)
    # Orthogonal to every axis: T² = 0, Q = |e|².
    e = np.random.default_rng(0).standard_normal(model.n_channels)
    e -= P.T @ (P @ e)
    e *= 0.05 / np.linalg.norm(e)
    t2, q = model.score(mean + e)
    assert t2 == pytest.approx(0.0, abs=1e-12)
    assert q == pytest.approx(0.05**2, rel=1e-9)


@pytest.mark.slow
def test_to_dict_round_trip_through_json_gives_identical_scores(data, model):
    stored = json.loads(json.dumps(model.to_dict()))
    assert all(isinstance(v, list | float | int | bool) for v in stored.values())
    again = SpectralModel.from_dict(stored)
    assert again == model
    for sid in data.ids(data.splits):
        scan = data.samples[sid].scans[0]
        x = scan_mean_spectrum(data.cube(scan), data.mask(scan))
        assert again.score(x) == model.score(x)


@pytest.mark.slow
def test_out_of_fold_limits_are_not_optimistic(data, model):
    in_sample = fit_spectral_model(data, out_of_fold=False, max_components=model.n_components)
    assert in_sample.n_components == model.n_components
    assert model.out_of_fold and not in_sample.out_of_fold
    assert model.t2_limit >= in_sample.t2_limit  # measured (scanner v2): 4.74 >= 2.74
    assert model.q_limit > in_sample.q_limit  # measured: 0.0087 against 0.0068
    assert model.min_mask_pixels == in_sample.min_mask_pixels
    assert model.max_saturated_share == in_sample.max_saturated_share


@pytest.mark.slow
def test_area_and_saturation_limits_are_the_stated_percentiles(data, model):
    training = data.ids([s for s in data.splits if s != 0])
    rows = [_table_row(data, scan) for s in training for scan in data.samples[s].scans]
    pixels = [r["mask_pixels"] for r in rows]
    shares = [r["bad_pixels_in_mask"] / (r["mask_pixels"] + r["bad_pixels_in_mask"]) for r in rows]
    assert model.min_mask_pixels == pytest.approx(np.percentile(pixels, 1.0))
    assert model.max_saturated_share == pytest.approx(np.percentile(shares, 99.0))


# ---------------------------------------------------------------------------------------------
# Flags: held-out scans as recorded, and frozen
# ---------------------------------------------------------------------------------------------


def _frozen_scans(tiny_dataset, ids: list[str], out: Path, monkeypatch) -> dict[str, Path]:
    """The dataset's scanner, same spec and seed, with ice's O-H bands: ``{sample: raw .hdr}``."""
    sets, _ = tiny_dataset
    spec = SynthSpec.from_config(load_config(ROOT / "configs" / "ci.yaml", sets).synth)
    index = {sid: int(sid.removeprefix("belly")) for sid in ids}
    spec = dataclasses.replace(spec, n_samples=max(6, max(index.values()) + 1))
    with monkeypatch.context() as m:
        m.setattr(ph, "WATER_BANDS", ICE_BANDS)
        root = synthesize(out, spec, progress=False, workers=1)
    return {sid: root / f"{sid}_a" / "capture" / f"{sid}_a.hdr" for sid in ids}


@pytest.mark.slow
def test_held_out_scans_pass_and_the_same_bellies_frozen_are_flagged(
    tiny_dataset, data, model, tmp_path, monkeypatch
):
    held_out = data.ids([0])
    assert held_out
    frozen = _frozen_scans(tiny_dataset, held_out, tmp_path / "frozen", monkeypatch)
    for sid in held_out:
        scan = data.samples[sid].scans[0]
        row = _table_row(data, scan)
        # The one path from the raw scan gives the dataset's mean spectrum.
        x, pixels, bad = _raw_scan_numbers(Path(row["raw"]), data.recipe)
        np.testing.assert_allclose(x, scan_mean_spectrum(data.cube(scan), data.mask(scan)), rtol=1e-9)
        assert (pixels, bad) == (row["mask_pixels"], row["bad_pixels_in_mask"])
        normal = scan_flags(
            model, mean_spectrum=x, mask_pixels=pixels, saturated_share=saturated_share(pixels, bad)
        )
        assert normal.flags == [], (sid, normal)  # measured Q 0.0172, 0.0163; T² 6.31, 1.66
        xf, pf, bf = _raw_scan_numbers(frozen[sid], data.recipe)
        ice = scan_flags(model, mean_spectrum=xf, mask_pixels=pf, saturated_share=saturated_share(pf, bf))
        assert ice.t2 > model.t2_limit or ice.q > model.q_limit, (sid, ice, model.q_limit)
        assert ice.q > 2.0 * normal.q  # measured 0.0424 vs 0.0172, 0.0371 vs 0.0163; limit 0.0325
        assert f"q>{model.q_limit:.4g}" in ice.flags


@pytest.mark.slow
def test_every_limit_exceeded_is_named_in_order(model):
    mean, P = np.asarray(model.mean), np.asarray(model.loadings)
    along = np.sqrt(2.0 * model.t2_limit * model.eigenvalues[0]) * P[0]  # T² = 2 x the limit
    e = np.random.default_rng(1).standard_normal(model.n_channels)
    e -= P.T @ (P @ e)
    e *= np.sqrt(2.0 * model.q_limit) / np.linalg.norm(e)  # Q = 2 x the limit
    f = scan_flags(
        model,
        mean_spectrum=mean + along + e,
        mask_pixels=int(model.min_mask_pixels) - 1,
        saturated_share=min(1.0, 2.0 * model.max_saturated_share),
        white_age_hours=-30.0,
        max_white_age_hours=24.0,
    )
    assert f.t2 == pytest.approx(2.0 * model.t2_limit, rel=1e-9)
    assert f.q == pytest.approx(2.0 * model.q_limit, rel=1e-9)
    assert f.flags == [
        f"t2>{model.t2_limit:.4g}",
        f"q>{model.q_limit:.4g}",
        f"area<{model.min_mask_pixels:.4g}",
        f"saturated>{model.max_saturated_share:.4g}",
        "white_age>24h",
    ]
    row = f.row()
    assert list(row) == flags_columns()
    assert row["flags"] == ";".join(f.flags) and row["white_age_h"] == -30.0
    ok = scan_flags(model, mean_spectrum=mean, mask_pixels=10**6, saturated_share=0.0, white_age_hours=5.0)
    assert ok.flags == [] and ok.row()["flags"] == ""


@pytest.mark.slow
def test_bad_input_is_one_clear_error(data, model):
    with pytest.raises(InputError, match=r"shape \(3,\), the spectral model expects"):
        model.score([1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="not finite"):
        model.score(np.full(model.n_channels, np.nan))
    with pytest.raises(InputError, match="saturated_share must be in"):
        scan_flags(model, mean_spectrum=model.mean, mask_pixels=10, saturated_share=1.5)
    with pytest.raises(ConfigError, match="percentile must be in"):
        fit_spectral_model(data, percentile=20.0)
    broken = model.to_dict()
    del broken["q_limit"]
    with pytest.raises(InputError, match="spectral model has no q_limit"):
        SpectralModel.from_dict(broken)
    with pytest.raises(InputError, match="version"):
        SpectralModel.from_dict({**model.to_dict(), "version": 99})


# ---------------------------------------------------------------------------------------------
# The white reference's age
# ---------------------------------------------------------------------------------------------


def _header(path: Path, fields: dict[str, str]) -> dict:
    """A real ENVI header with ``fields``, as chemmap reads it."""
    mm = create_envi(path, bands=2, lines=1, samples=2, wavelengths=[800.0, 900.0], extra=fields)
    del mm
    return open_scan(path).header


def test_white_age_from_specim_and_envi_headers(tmp_path):
    scan = _header(
        tmp_path / "scan.hdr",
        {"acquisition date": "DATE(dd-mm-yyyy): 04-05-2023", "Start Time": "UTC TIME: 10:11:12"},
    )
    white = _header(tmp_path / "WHITEREF_scan.hdr", {"acquisition time": "2023-05-03T22:11:12Z"})
    assert white_reference_age_hours(scan, white) == pytest.approx(12.0)
    assert white_reference_age_hours(white, scan) == pytest.approx(-12.0)
    # The synthetic scanner, like many recorders, writes no time: no age, never a flag.
    plain = _header(tmp_path / "plain.hdr", {"ceiling": "4095"})
    assert white_reference_age_hours(scan, plain) is None


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"acquisition time": "2023-05-04T10:11:12Z"}, datetime(2023, 5, 4, 10, 11, 12, tzinfo=UTC)),
        ({"acquisition time": "2023-05-04T12:11:12+02:00"}, datetime(2023, 5, 4, 10, 11, 12, tzinfo=UTC)),
        ({"acquisition time": "2023-05-04 10:11:12.5"}, datetime(2023, 5, 4, 10, 11, 12, 500000, tzinfo=UTC)),
        (
            {"acquisition date": "DATE(yyyy-mm-dd): 2023-05-04", "start time": "UTC TIME: 10:11:12"},
            datetime(2023, 5, 4, 10, 11, 12, tzinfo=UTC),
        ),
        (
            {"acquisition date": "DATE(dd-mm-yyyy): 04-05-2023", "acquisition time": "10:11:12"},
            datetime(2023, 5, 4, 10, 11, 12, tzinfo=UTC),
        ),
        ({"acquisition date": "2023-05-04", "start time": "10:11"}, datetime(2023, 5, 4, 10, 11, tzinfo=UTC)),
        ({"acquisition date": "2023-05-04"}, None),  # a date alone: the age would be a guess
        ({"acquisition date": "04/05/2023", "start time": "10:11:12"}, None),  # d/m or m/d?
        ({"acquisition time": "yesterday"}, None),
        ({}, None),
    ],
)
def test_acquisition_time_forms(fields, expected):
    assert acquisition_time(fields) == expected
