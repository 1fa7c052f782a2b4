"""The U-Net, its loss, exact tiling and patched gradients."""

from __future__ import annotations

from chemmap.models.loss import LossConfig, l2_penalty, output_mask, sample_loss
from chemmap.models.patched import patched_backward
from chemmap.models.tiling import (
    Geometry,
    canvas_pads,
    core_windows,
    model_geometry,
    predict_full,
    predict_tiled,
    read_padded,
)
from chemmap.models.unet import UNet, UNetConfig

__all__ = [
    "Geometry",
    "LossConfig",
    "UNet",
    "UNetConfig",
    "canvas_pads",
    "core_windows",
    "l2_penalty",
    "model_geometry",
    "output_mask",
    "patched_backward",
    "predict_full",
    "predict_tiled",
    "read_padded",
    "sample_loss",
]
