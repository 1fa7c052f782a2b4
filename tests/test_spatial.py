"""spatial_correlated_share on fields whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from chemmap.spatial import semivariogram, spatial_correlated_share


def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (f - f.mean()) / f.std()


def test_white_noise_is_uncorrelated() -> None:
    z = np.random.default_rng(0).standard_normal((200, 180))
    assert spatial_correlated_share(z) < 0.05


def test_smooth_field_is_correlated() -> None:
    z = _smooth(np.random.default_rng(1), (200, 180), 8.0)
    assert spatial_correlated_share(z) > 0.95


@pytest.mark.parametrize("signal_share", [0.1, 0.5, 0.9])
def test_mix_recovers_the_share(signal_share: float) -> None:
    rng = np.random.default_rng(2)
    s = _smooth(rng, (256, 256), 10.0) * np.sqrt(signal_share)
    n = rng.standard_normal((256, 256)) * np.sqrt(1 - signal_share)
    assert spatial_correlated_share(s + n) == pytest.approx(signal_share, abs=0.04)


def test_mask_and_nan_leave_outside_pixels_out() -> None:
    rng = np.random.default_rng(3)
    z = _smooth(rng, (120, 100), 6.0)
    mask = np.zeros(z.shape, bool)
    mask[20:100, 10:80] = True
    noisy = np.where(mask, z, rng.standard_normal(z.shape) * 100)  # wild values off the mask
    assert spatial_correlated_share(noisy, mask) > 0.95
    assert spatial_correlated_share(np.where(mask, z, np.nan)) == pytest.approx(
        spatial_correlated_share(z, mask)
    )


def test_semivariogram_of_white_noise_is_its_variance() -> None:
    z = np.random.default_rng(4).normal(0, 2.0, (300, 300))
    np.testing.assert_allclose(semivariogram(z), 4.0, rtol=0.03)


def test_constant_and_degenerate_maps() -> None:
    assert spatial_correlated_share(np.ones((10, 10))) == 1.0
    assert np.isnan(spatial_correlated_share(np.ones((10, 10)), np.zeros((10, 10), bool)))
    with pytest.raises(ValueError, match="2-D"):
        spatial_correlated_share(np.ones(10))
