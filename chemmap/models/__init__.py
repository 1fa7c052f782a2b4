"""The U-Net, its loss, exact tiling and patched gradients.

Names are imported on first use, so that ``chemmap.models.geometry`` (pure Python) loads
without torch: preprocessing sizes its patch index from a config alone.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Geometry": "geometry",
    "core_windows": "geometry",
    "unet_geometry": "geometry",
    "LossConfig": "loss",
    "l2_penalty": "loss",
    "sample_loss": "loss",
    "patched_backward": "patched",
    "patched_sum": "patched",
    "canvas_pads": "tiling",
    "model_geometry": "tiling",
    "predict_full": "tiling",
    "predict_tiled": "tiling",
    "read_padded": "tiling",
    "UNet": "unet",
    "UNetConfig": "unet",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
