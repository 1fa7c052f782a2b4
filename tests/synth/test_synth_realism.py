"""The realism check of scanner v2 (issue 14), per instrument, on the default data.

The default config's scan size and sample count (180 bellies of 128 x 96 px, 30 test samples),
on a development seed (7; the reporting seeds 100-104 are never used for development).
Measured figures (``python -m chemmap.synth.realism`` reproduces them) are in the README's
"The synthetic scanner" section; each bound here is the target where the physics meets it,
and the measured band where it does not (the miss is reported there, never tuned away):

| figure | target | VNIR | NIR |
|---|---|---:|---:|
| mean-spectrum PLS R² (test split) | VNIR 0.85-0.97, NIR ~0.95 | 0.972 | 0.974 |
| PLS map spatially correlated share | < 5 % on the paper's 0.2-0.3 mm grid | 0.894 | 0.979 |
| PLS map pixels outside 0-100 % | many | 23 % | 17 % |
| brightness R², per pixel / 3x3 | well below v1 (0.88 / 0.93) | 0.557 / 0.707 | 0.468 / 0.671 |
| pixel pitch | stated | 3.6 mm | 3.6 mm |
"""

from __future__ import annotations

import pytest

from chemmap.synth import SynthSpec, synthesize
from chemmap.synth.realism import check

DEV_SEED = 7


@pytest.fixture(scope="module", params=["vnir", "nir"])
def figures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = SynthSpec(instrument=request.param, seed=DEV_SEED)  # the default data's size
    root = synthesize(tmp_path_factory.mktemp(request.param) / "d", spec, progress=False, workers=2)
    return check(root)


@pytest.mark.slow
def test_mean_spectrum_pls_is_useful_and_not_trivial(figures: dict) -> None:
    assert figures["n_test"] == 30
    if figures["instrument"] == "vnir":
        assert 0.85 < figures["r2_test"] < 0.985  # literature 0.85-0.97; measured 0.972
    else:
        assert 0.90 < figures["r2_test"] < 0.99  # Barbin et al. 2013: ~0.95; measured 0.974


@pytest.mark.slow
def test_pls_maps_are_noisy_pixel_by_pixel_but_less_than_the_papers(figures: dict) -> None:
    """A miss, pinned: at 3.6 mm a pixel averages ~150-300 of the paper's 0.2-0.3 mm pixels, so
    independent per-pixel variation that leaves 2.5 % correlated there leaves ~80-90 % here."""
    assert 3.0 < figures["pixel_pitch_mm"] < 4.5
    assert figures["truth_spatial_share"] > 0.95  # the true maps are smooth
    assert 0.7 < figures["spatial_share"] < 0.995  # measured 0.89 (VNIR), 0.98 (NIR)
    assert figures["out_of_range"] > 0.1  # measured 0.23, 0.17
    assert figures["map_sd"] > figures["truth_sd"]


@pytest.mark.slow
def test_brightness_no_longer_gives_fat_away(figures: dict) -> None:
    """Fat is whiter than lean, so brightness keeps explaining much, but far less than in v1."""
    assert 0.25 < figures["brightness_r2"] < 0.7  # v1: 0.88 (VNIR), 0.76 (NIR)
    assert figures["brightness_r2_3x3"] < 0.8  # v1: 0.93, 0.88
