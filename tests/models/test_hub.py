"""torch.hub entry points (the seed library's names) load from the repository directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = str(Path(__file__).resolve().parents[2])

ENTRY_POINTS = {
    "unet": {"in_channels": 3, "out_channels": 1, "pad": True, "bilinear": True, "normalization": None},
    "unet_bn": {"normalization": "bn"},
    "unet_ln": {"normalization": "ln"},
    "unet_medical": {"in_channels": 1, "out_channels": 1},
    "unet_transconv": {"bilinear": False},
}


@pytest.mark.parametrize(("name", "expected"), ENTRY_POINTS.items())
def test_entry_point_loads_locally(name: str, expected: dict) -> None:
    model = torch.hub.load(REPO, name, source="local", depth=2, features=4)
    for field, value in expected.items():
        assert getattr(model.config, field) == value, field
    out = model(torch.randn(1, model.config.in_channels, 20, 22))
    assert out.shape == (1, model.config.out_channels, 20, 22)


def test_kwargs_pass_through_and_override() -> None:
    model = torch.hub.load(REPO, "unet_bn", source="local", in_channels=56, pad=False, depth=2, features=4)
    assert (model.config.in_channels, model.config.pad, model.config.normalization) == (56, False, "bn")


def test_pretrained_weights_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no pretrained U-Net weights"):
        torch.hub.load(REPO, "unet", source="local", pretrained=True)
