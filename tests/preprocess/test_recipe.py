from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from chemmap.config import PreprocessConfig, SavGolConfig
from chemmap.errors import InputError
from chemmap.preprocess.recipe import Recipe, bin_bands, calibrate, select_bands

WL = np.linspace(700.0, 1000.0, 12)  # 12 bands, 27.27 nm apart


def test_calibration_numbers_on_known_counts():
    # white 1000, dark 100 counts: raw 550 is exactly half way -> reflectance 0.5.
    raw = np.array([[[100, 550, 1000, 1900]]], dtype=np.uint16)  # (1 band, 1 line, 4 samples)
    white = np.full((1, 4), 1000.0)
    dark = np.full((1, 4), 100.0)
    refl, dead = calibrate(raw, white, dark, min_signal=20)
    np.testing.assert_allclose(refl[0, 0], [0.0, 0.5, 1.0, 2.0])
    assert not dead.any()
    # A detector element whose white barely exceeds its dark is dead, not infinitely bright.
    white[0, 2] = 110.0
    refl, dead = calibrate(raw, white, dark, min_signal=20)
    assert dead[0, 2] and refl[0, 0, 2] == 0 and np.isfinite(refl).all()


def test_band_selection_and_binning():
    idx = select_bands(WL, 750, None)
    assert WL[idx].min() >= 750 and idx.size == 10
    np.testing.assert_allclose(bin_bands(np.arange(5.0), 2), [0.5, 2.5])  # remainder dropped
    with pytest.raises(InputError, match="no band lies"):
        select_bands(WL, 1200, 1300, "scan.hdr")


def _recipe(**kw) -> Recipe:
    return Recipe.create(PreprocessConfig(**kw), WL)


def _scan(rng, lines=6, samples=5):
    raw = rng.integers(300, 3000, size=(WL.size, lines, samples)).astype(np.uint16)
    white = np.full((WL.size, samples), 3500.0)
    dark = np.full((WL.size, samples), 200.0)
    return raw, white, dark


def test_recipe_numbers_and_flags():
    rng = np.random.default_rng(0)
    raw, white, dark = _scan(rng)
    raw[:, 2, 3] = 4095  # saturated (glare)
    white[:, 1] = dark[:, 1] + 5  # dead detector element
    r = _recipe(wavelength_min=750, bin=2, transform="absorbance")
    cube, refl_mean, bad = r.apply(raw, white, dark, saturation=4095)
    sel = raw[list(r.band_index)].astype(np.float64)
    refl = (sel - 200.0) / 3300.0
    expect = -np.log10(np.maximum(0.5 * (refl[0::2] + refl[1::2]), 1e-4))
    ok = np.ones(bad.shape, bool)
    ok[:, 1] = False
    np.testing.assert_allclose(cube[:, ok], expect[:, ok], rtol=1e-5)
    assert cube.shape == (5, 6, 5) and r.n_channels == 5
    wl = WL[list(r.band_index)]
    np.testing.assert_allclose(r.wavelengths, 0.5 * (wl[0::2] + wl[1::2]))
    assert bad[2, 3] and bad[:, 1].all() and bad.sum() == 6 + 1
    np.testing.assert_allclose(refl_mean[ok], refl.mean(axis=0)[ok], rtol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        {"wavelength_min": 750, "bin": 2},
        {"transform": "absorbance", "snv": True},
        {"savgol": SavGolConfig(window=5, polyorder=2, deriv=1)},
    ],
)
def test_dask_and_numpy_give_the_same_cube(kw):
    rng = np.random.default_rng(1)
    raw, white, dark = _scan(rng, lines=16, samples=12)
    r = _recipe(**kw)
    a, am, ab = r.apply(raw, white, dark, 4095)
    lazy = da.from_array(raw, chunks=(4, 5, 7))
    b, bm, bb = (x.compute() for x in r.apply(lazy, white, dark, 4095))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bm, am, rtol=1e-6)
    np.testing.assert_array_equal(bb, ab)


def test_a_reader_of_the_band_span_only_gets_the_same_cube():
    rng = np.random.default_rng(2)
    raw, white, dark = _scan(rng, lines=7, samples=6)
    raw[:, 3, 2] = 4095  # saturated in the span
    r = _recipe(wavelength_min=750, bin=2, transform="absorbance")
    b0, b1 = r.band_span
    assert 0 < b0 < b1 == raw.shape[0] and b1 - b0 == len(r.band_index)
    whole = r.apply(raw, white, dark, 4095)
    span = r.apply(raw[b0:b1], white, dark, 4095, first_band=b0)
    for a, b in zip(whole, span, strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    assert span[2][3, 2]


def test_wavelength_check_and_round_trip():
    r = _recipe(bin=3).with_stats(np.arange(4.0), np.ones(4))
    again = Recipe.from_dict(r.to_dict())
    assert again == r
    r.check_wavelengths(WL, "a.hdr")
    with pytest.raises(InputError, match=r"b\.hdr.*do not match"):
        r.check_wavelengths(WL + 1.0, "b.hdr")
    with pytest.raises(InputError, match="no 'wavelength'"):
        r.check_wavelengths(None, "c.hdr")
    x = np.ones((4, 2, 2), np.float32)
    np.testing.assert_allclose(again.normalize(x)[:, 0, 0], 1.0 - np.arange(4.0))
