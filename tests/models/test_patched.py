"""Patched gradients equal the whole-image loss gradient (DESIGN.md "Exact tiling", loss)."""

from __future__ import annotations

import functools

import pytest
import torch

from chemmap.models.loss import LossConfig, sample_loss
from chemmap.models.patched import patched_backward
from chemmap.models.tiling import canvas_pads, core_windows, model_geometry, read_padded
from chemmap.models.unet import UNet

HEIGHT, WIDTH = 50, 57


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def irregular_mask() -> torch.Tensor:
    """An ellipse with a slot cut into it and a few isolated pixels: seams cross it everywhere."""
    yy, xx = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    mask = (((yy - 25) / 21) ** 2 + ((xx - 28) / 25) ** 2 < 1) & ~((yy > 20) & (yy < 24) & (xx > 10))
    mask[0, 0] = mask[49, 56] = mask[31, 2] = True
    return mask.float()


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def compare(model: UNet, cfg: LossConfig, y: tuple[float, ...] = (30.0, 12.0)) -> tuple[float, dict, dict]:
    """(relative gradient error, whole-image terms, patched terms) for one random sample."""
    torch.manual_seed(1)
    dtype = next(model.parameters()).dtype
    x = (torch.randn(model.config.in_channels, HEIGHT, WIDTH, dtype=torch.float64) * 2 + 1).to(dtype)
    mask = irregular_mask().to(dtype)  # (H, W)
    targets = torch.tensor(y, dtype=dtype)[: model.config.out_channels]  # (T,)
    # Whole image: the canvas predict_full uses, one pass, the loss of DESIGN.md.
    model.zero_grad()
    top, bottom, left, right = canvas_pads(model, HEIGHT, WIDTH)
    canvas = read_padded(x, -top, -left, HEIGHT + bottom, WIDTH + right)  # (C, H', W')
    p = model(canvas[None])[..., :HEIGHT, :WIDTH]  # (1, T, H, W)
    whole = sample_loss(p, mask[None], targets[None], cfg)
    whole["total"].backward()
    reference = grads(model).clone()
    # Patches of 16 x 16 (several seams through the mask), each read with the same padding.
    model.zero_grad()
    geometry = model_geometry(model)
    windows = core_windows(HEIGHT, WIDTH, 16, geometry.stride)
    read = functools.partial(read_padded, x)  # read(y0, x0, y1, x1)
    patched = patched_backward(model, read, windows, mask, targets, cfg, geometry=geometry)
    return rel(grads(model), reference), {k: float(v.detach()) for k, v in whole.items()}, patched


CFG = LossConfig(mean=1.0, smooth=20.0, out_of_range=1e-2)
# The identity is exact arithmetic (exact tiling, sums split over patches), so it is checked
# in float64: the two gradients differ by rounding only, ~eps per layer and per reordered
# sum. Bound: 1000 eps = 2.2e-13; measured <= 2.5e-15 (layer norm over 4 channels, which
# divides by variances that can be tiny, amplifies rounding most: it broke float32 bounds).
EXACT = 1000 * torch.finfo(torch.float64).eps


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pad": True, "normalization": None},
        {"pad": False, "normalization": None},
        {"pad": False, "normalization": None, "front_end": True, "in_channels": 9},
        {"pad": True, "normalization": "ln", "out_channels": 2},
        {"pad": False, "normalization": "ln", "bilinear": False},
    ],
)
def test_patched_gradient_equals_whole_image_gradient(kwargs: dict) -> None:
    torch.manual_seed(0)
    model = UNet(**{"in_channels": 3, "depth": 3, "features": 4, **kwargs}).double()
    err, whole, patched = compare(model, CFG)
    assert err < EXACT
    for name in ("mean", "smooth", "out_of_range", "total"):
        assert patched[name] == pytest.approx(whole[name], rel=EXACT), name


def test_patched_gradient_with_two_targets_one_unknown() -> None:
    """A NaN lab value leaves its target out of the mean term, in patches as in the whole image."""
    torch.manual_seed(0)
    model = UNet(in_channels=3, out_channels=2, depth=3, features=4, pad=False).double()
    err, whole, patched = compare(model, CFG, y=(30.0, float("nan")))
    assert err < EXACT
    assert patched["mean"] == pytest.approx(whole["mean"], rel=EXACT)
    assert patched["total"] == pytest.approx(whole["total"], rel=EXACT)


def test_batch_norm_is_exact_in_eval_and_approximate_in_training() -> None:
    """Training-mode batch norm normalises each patch with its own statistics.

    Measured on this set-up (depth 3, 4 features, 16 px cores): relative gradient error
    about 0.75 in training mode (the whole image's statistics are not any patch's),
    rounding in eval mode. Patched training with "bn" is therefore not the whole-image
    gradient; use normalization None or "ln", or freeze batch norm (eval).
    """
    torch.manual_seed(0)
    model = UNet(in_channels=3, depth=3, features=4, normalization="bn").double()
    err_train, _, _ = compare(model.train(), CFG)
    err_eval, _, _ = compare(model.eval(), CFG)
    print(f"batch norm, patched vs whole-image gradient: train {err_train:.3g}, eval {err_eval:.3g}")
    assert err_eval < EXACT
    assert err_train > 1e-2


def test_windows_must_cover_the_mask_once() -> None:
    model = UNet(in_channels=3, depth=2, features=2)
    x = torch.randn(3, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="exactly once"):
        read = functools.partial(read_padded, x)
        patched_backward(model, read, [(0, 0, 16, 16)], irregular_mask(), torch.tensor([1.0]))


@pytest.mark.parametrize(
    "form",
    [
        {"smooth_penalty": "huber", "smooth_delta": 0.5},
        {"smooth_penalty": "tv", "smooth_delta": 2.0},
        {"smooth_pairs": "anchor"},
        {"smooth_penalty": "huber", "smooth_delta": 0.5, "smooth_pairs": "anchor"},
        {"out_of_range_norm": "pixel"},
    ],
)
def test_patched_gradient_equals_whole_image_gradient_for_every_smoothness(form: dict) -> None:
    """Edge-preserving penalties and the paper's anchor pairs split over patches exactly too."""
    torch.manual_seed(0)
    model = UNet(in_channels=3, depth=3, features=4, pad=False).double()
    cfg = LossConfig(mean=1.0, smooth=20.0, out_of_range=1e-2, **form)
    err, whole, patched = compare(model, cfg)
    assert err < EXACT
    for name in ("mean", "smooth", "out_of_range", "total"):
        assert patched[name] == pytest.approx(whole[name], rel=EXACT), name
