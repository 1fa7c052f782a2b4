"""Exact tiling: the stitched map equals the whole-image map (DESIGN.md "Exact tiling")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from chemmap.models.geometry import unet_geometry
from chemmap.models.tiling import canvas_pads, model_geometry, predict_full, predict_tiled, read_padded
from chemmap.models.unet import UNet

# Exactness is a claim about arithmetic, so it is checked in float64: the tiled and the
# whole-image pass do the same operations in different blockings, so they differ by
# rounding only: a few dozen layers, each adding ~eps relative. Bound: 1000 eps (2.2e-13);
# measured <= 2e-16. A halo one stride short is off by >= 8e-5 on these cases, so
# "not exact" is asserted as > 1e6 times that bound.
EXACT = 1000 * torch.finfo(torch.float64).eps
NOT_EXACT = 1e6 * EXACT


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def small_model(dtype: torch.dtype = torch.float64, **kwargs) -> UNet:
    torch.manual_seed(0)
    kwargs = {"in_channels": 3, "depth": 3, "features": 4, **kwargs}
    return UNet(**kwargs).eval().to(dtype)


def image(model: UNet, height: int = 61, width: int = 70) -> torch.Tensor:
    """A seeded input for ``model`` in its dtype: ``(C, H, W)``, odd and even sizes."""
    torch.manual_seed(1)
    x = torch.randn(model.config.in_channels, height, width, dtype=torch.float64) * 2 + 1
    return x.to(next(model.parameters()).dtype)


@pytest.mark.parametrize(
    ("bilinear", "radius"),
    [(False, 94), (True, 110)],
)
def test_depth_5_radius_matches_the_measurement_in_design(bilinear: bool, radius: int) -> None:
    """DESIGN.md measured R = 94 px (transposed) and 110 px (bilinear) for a depth-5 U-Net."""
    model = UNet(in_channels=3, depth=5, features=64, bilinear=bilinear)
    geometry = model_geometry(model, cache=False)
    assert (geometry.radius, geometry.stride, geometry.exact) == (radius, 16, True)
    assert geometry.reach >= geometry.radius
    assert unet_geometry(model.config) == geometry  # and from the config alone (test_geometry.py)


def test_front_end_doubles_the_grid_and_about_doubles_the_radius() -> None:
    plain = model_geometry(small_model())
    front = model_geometry(small_model(in_channels=9, front_end=True))
    assert front.stride == 2 * plain.stride
    assert 2 * plain.radius - plain.stride <= front.radius <= 2 * plain.radius + front.stride


CASES = [
    {"pad": True, "bilinear": True},
    {"pad": True, "bilinear": False},
    {"pad": False, "bilinear": True},
    {"pad": True, "bilinear": True, "front_end": True, "in_channels": 9},
    {"pad": False, "bilinear": True, "front_end": True, "in_channels": 9},
    {"pad": False, "bilinear": True, "encoder": "resnet", "normalization": "ln"},
]


@pytest.mark.parametrize("kwargs", CASES)
def test_tiles_with_halo_radius_equal_the_whole_image_and_one_stride_less_does_not(kwargs: dict) -> None:
    model = small_model(**kwargs)
    geometry = model_geometry(model)
    x = image(model)
    full = predict_full(model, x)  # (T, H, W)
    assert full.shape == (1, 61, 70)
    for core in (16, 24):
        tiled = predict_tiled(model, x, core=core, halo=geometry.radius, geometry=geometry)
        assert rel(tiled, full) < EXACT, core
    short = predict_tiled(model, x, core=16, halo=geometry.radius - geometry.stride, geometry=geometry)
    assert rel(short, full) > NOT_EXACT


@pytest.mark.parametrize("kwargs", [CASES[0], CASES[-1]])
def test_float32_tiles_are_as_accurate_as_a_float32_whole_image_pass(kwargs: dict) -> None:
    """Rule: both float32 passes round the same arithmetic, so the tiled map is no farther
    from the exact (float64) map than 4 times the whole-image float32 map is (measured:
    0.8-1.0 times; layer norm amplifies both alike, to ~1e-5)."""
    model = small_model(**kwargs)
    geometry = model_geometry(model)
    x = image(model)
    exact = predict_full(model, x)
    model, x = model.float(), x.float()
    whole = rel(predict_full(model, x).double(), exact)
    tiled = rel(predict_tiled(model, x, core=16, geometry=geometry).double(), exact)
    assert tiled <= 4 * max(whole, torch.finfo(torch.float32).eps)


def test_valid_transposed_net_needs_no_halo_beyond_its_margin() -> None:
    """Valid convolutions and transposed up-sampling have no border effects: R equals the margin.

    A window can never be smaller than core + margin (it would not produce the core), so a
    halo one stride below R is widened back to the margin and stays exact.
    """
    model = small_model(pad=False, bilinear=False)
    geometry = model_geometry(model)
    assert geometry.radius == geometry.margin == model.margin
    x = image(model)
    full = predict_full(model, x)
    short = predict_tiled(model, x, core=16, halo=geometry.radius - geometry.stride, geometry=geometry)
    assert rel(short, full) < EXACT


def test_align_corners_true_tiles_only_approximate() -> None:
    """The seed's bilinear grid depends on the tensor's size: measured as not exact (7e-4 in DESIGN.md)."""
    model = small_model(align_corners=True)
    geometry = model_geometry(model)
    assert not geometry.exact
    x = image(model)
    tiled = predict_tiled(model, x, core=16, halo=geometry.radius, geometry=geometry)
    assert NOT_EXACT < rel(tiled, predict_full(model, x)) < 0.1


def test_known_answer_model_and_batches() -> None:
    """A predictor whose answer is known (x + 1 through a 3x3 identity conv) and a batch.

    Exact arithmetic gives x + 1 with one rounding; a convolution algorithm that transforms
    its input (Winograd, FFT) may round more: allow EXACT, in float64.
    """
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=True, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = conv.weight[1, 1, 1, 1] = 1.0
        conv.bias.fill_(1.0)
    geometry = model_geometry(conv, in_channels=2)
    assert (geometry.radius, geometry.stride, geometry.margin) == (1, 1, 0)
    x = torch.randn(3, 2, 33, 47, dtype=torch.float64)  # (B, C, H, W)
    assert rel(predict_tiled(conv, x, core=8, halo=1, geometry=geometry), x + 1) < EXACT
    assert rel(predict_full(conv, x), x + 1) < EXACT


@pytest.mark.parametrize("mode", ["reflect", "replicate", "zeros"])
def test_read_padded_equals_padding_the_whole_image(mode: str) -> None:
    """Windows read what numpy's padding of the whole image holds (pads larger than the image too)."""
    x = torch.randn(2, 13, 17)
    big = 30
    np_mode = {"replicate": "edge", "zeros": "constant"}.get(mode, mode)
    whole = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (big, big), (big, big)), mode=np_mode))
    for y0, x0, y1, x1 in [(-5, -3, 8, 9), (4, 10, 20, 25), (-30, -30, 43, 47), (2, 3, 11, 15)]:
        window = read_padded(x, y0, x0, y1, x1, mode)
        assert torch.equal(window, whole[:, y0 + big : y1 + big, x0 + big : x1 + big]), (y0, x0, y1, x1)
    assert torch.equal(read_padded(x.numpy(), -5, -3, 8, 9, mode), read_padded(x, -5, -3, 8, 9, mode))


def test_canvas_makes_any_size_acceptable() -> None:
    model = small_model(pad=False)
    for height in (1, 5, 44, 45, 61):
        top, bottom, _, _ = canvas_pads(model, height, height)
        assert top == model.margin and model.accepts(height + top + bottom)
        assert height + top + bottom - 2 * model.margin >= height
    assert predict_full(model, torch.randn(3, 5, 7, dtype=torch.float64)).shape == (1, 5, 7)
