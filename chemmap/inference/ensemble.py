"""The trained model as it is evaluated and registered: the mean of the fold models.

Weights are plain state dicts loaded with ``weights_only=True``; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chemmap.errors import InputError

# Above this many pixels a scan is scored in tiles (exact: halo = the model's radius).
TILE_ABOVE_PIXELS = 1024 * 1024
TILE_CORE = 256


class MapEnsemble(nn.Module):
    """Averages the maps of several U-Nets of one configuration: ``(B, C, H, W) -> (B, T, H, W)``.

    It behaves like one U-Net for tiling (same margin, stride and receptive radius), so
    :func:`chemmap.models.tiling.predict_tiled` scores it exactly.
    """

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)
        first = models[0]
        self.config = getattr(first, "config", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return out / len(self.members)

    def __getattr__(self, name: str) -> Any:
        # Geometry helpers of the U-Net (margin, accepts, valid_size, ...) come from a member.
        try:
            return super().__getattr__(name)
        except AttributeError:
            members = super().__getattr__("members")
            return getattr(members[0], name)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from disk; refuses anything that is not plain tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"model weights not found: {path}") from None
    except Exception as err:  # weights_only refuses pickled code: say so, in one line
        raise InputError(f"{path}: not a plain state dict ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: expected a state dict of tensors")
    return state


def load_ensemble(model_dir: Path) -> tuple[MapEnsemble, dict[str, Any]]:
    """The fold ensemble written by the training stage (``model.json`` + ``fold<k>/best.pt``)."""
    from chemmap.models.unet import UNet, UNetConfig

    model_dir = Path(model_dir)
    card_path = model_dir / "model.json"
    if not card_path.is_file():
        raise InputError(f"no trained model at {model_dir} (model.json missing)")
    card = json.loads(card_path.read_text())
    ucfg = UNetConfig(**card["unet"])
    models = []
    for rel in card["weights"]:
        net = UNet(ucfg)
        net.load_state_dict(load_weights(model_dir / rel))
        models.append(net.eval())
    return MapEnsemble(models).eval(), card


def predict_map(model: nn.Module, x: Any, geometry=None) -> torch.Tensor:
    """``(C, H, W)`` normalised input -> ``(T, H, W)`` map; tiled (exactly) for large scans."""
    from chemmap.models.tiling import predict_full, predict_tiled

    h, w = x.shape[-2:]
    with torch.no_grad():
        if h * w <= TILE_ABOVE_PIXELS:
            xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(x)
            return predict_full(model, xt).float()
        return predict_tiled(model, x, core=TILE_CORE, geometry=geometry).float()
