"""The trained model as it is evaluated and registered: the mean of the fold models.

Weights are plain state dicts loaded with ``weights_only=True``; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chemmap.errors import InputError
from chemmap.models.loss import MAP_RANGE
from chemmap.models.tiling import Geometry, predict_full, predict_tiled
from chemmap.models.unet import UNet, UNetConfig

__all__ = [
    "MAP_RANGE",
    "MapEnsemble",
    "MemberMaps",
    "bound_map",
    "check_bound",
    "load_ensemble",
    "load_weights",
    "member_maps",
    "output_step",
    "predict_map",
]

# Above this many pixels a scan is scored in tiles (exact: halo = the model's radius).
TILE_ABOVE_PIXELS = 1024 * 1024
TILE_CORE = 256


def check_bound(bound: Sequence[float] | None) -> tuple[float, float] | None:
    """``(low, high)`` as floats with low < high, or None; anything else is refused."""
    if bound is None:
        return None
    lo, hi = (float(v) for v in bound)
    if not lo < hi:
        raise ValueError(f"a map bound needs low < high, got {list(bound)}")
    return lo, hi


def bound_map(maps: Any, bound: tuple[float, float] | None) -> Any:
    """Maps (tensor or array) clamped to ``bound``, or as they are without one (NaN stays NaN).

    A clamp is per pixel, so an ensemble with a bound still tiles exactly.
    """
    if bound is None:
        return maps
    if isinstance(maps, torch.Tensor):
        return maps.clamp(*bound)
    return np.clip(maps, *bound)


class MapEnsemble(nn.Module):
    """Averages the maps of several U-Nets of one configuration: ``(B, C, H, W) -> (B, T, H, W)``.

    With a ``bound`` (``model.bounded``: :data:`MAP_RANGE`) the mean is clamped to it; the
    members' own maps are not. It behaves like one U-Net for tiling (same margin, stride and
    receptive radius; a clamp is per pixel), so :func:`chemmap.models.tiling.predict_tiled`
    scores it exactly.
    """

    def __init__(self, models: list[nn.Module], bound: tuple[float, float] | None = None) -> None:
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)
        first = models[0]
        self.config = getattr(first, "config", None)
        self.bound = check_bound(bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return bound_map(out / len(self.members), self.bound)

    @property
    def geometry_member(self) -> nn.Module:
        """The member whose tiling geometry is the ensemble's (every member has the same config)."""
        return self.members[0]

    def __getattr__(self, name: str) -> Any:
        # Geometry helpers of the U-Net (margin, accepts, valid_size, ...) come from a member.
        try:
            return super().__getattr__(name)
        except AttributeError:
            members = super().__getattr__("members")
            return getattr(members[0], name)


def _refusal(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words (torch's own text is long)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if found:
        return f"it holds a pickled object ({found.group(1)}), which weights-only loading refuses"
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:160]}"


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from disk, loaded with ``weights_only=True``.

    Raises:
        InputError: one line naming ``path``: the file is missing, not a PyTorch file, holds a
            pickled object, or is not a flat mapping of names to tensors.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"model weights not found: {path}") from None
    except Exception as err:  # weights_only refuses pickled code: say so, in one line
        raise InputError(f"{path}: not a plain state dict ({_refusal(err)})") from None
    if not isinstance(state, dict):
        raise InputError(
            f"{path}: expected a state dict of tensors, got an object of type {type(state).__name__}"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        more = f" (and {len(bad) - 1} more entries are not tensors)" if len(bad) > 1 else ""
        kind = type(state[bad[0]]).__name__
        raise InputError(f"{path}: expected a state dict of tensors, but {bad[0]!r} is of type {kind}{more}")
    return state


def _read_card(model_dir: Path) -> dict[str, Any]:
    card_path = model_dir / "model.json"
    if not card_path.is_file():
        raise InputError(f"no trained model at {model_dir} (model.json missing)")
    card = json.loads(card_path.read_text())
    missing = [k for k in ("unet", "weights") if k not in card]
    if missing:
        raise InputError(f"{card_path}: no {' and no '.join(missing)} entry")
    return card


def _member(config: UNetConfig, path: Path) -> UNet:
    """One fold model; weights whose names or shapes do not fit the card's U-Net get one line."""
    net = UNet(config)
    state = load_weights(path)
    expected = net.state_dict()
    problems = [
        f"{len(keys)} {what} (e.g. {keys[0]!r})"
        for what, keys in (
            ("missing", [k for k in expected if k not in state]),
            ("unexpected", [k for k in state if k not in expected]),
            ("of another shape", [k for k in expected if k in state and state[k].shape != expected[k].shape]),
        )
        if keys
    ]
    if problems:
        raise InputError(f"{path}: the weights do not fit the U-Net of model.json: {', '.join(problems)}")
    net.load_state_dict(state)
    return net.eval()


def load_ensemble(
    model_dir: Path, bound: tuple[float, float] | None = None
) -> tuple[MapEnsemble, dict[str, Any]]:
    """The fold ensemble written by the training stage (``model.json`` + ``fold<k>/best.pt``).

    Args:
        model_dir: the training stage folder.
        bound: the range the ensemble's map is clamped to (``model.bounded``), or None.

    Returns:
        ``(ensemble, card)``: the mean of the fold models in eval mode, and ``model.json`` as read
        (``unet`` config, ``targets``, ``folds``, ``weights`` paths relative to ``model_dir``).
    """
    model_dir = Path(model_dir)
    card = _read_card(model_dir)
    try:
        config = UNetConfig(**card["unet"])
    except (TypeError, ValueError) as err:
        raise InputError(f"{model_dir / 'model.json'}: unet: {err}") from None
    members = [_member(config, model_dir / rel) for rel in card["weights"]]
    return MapEnsemble(members, bound).eval(), card


def predict_map(model: nn.Module, x: Any, geometry: Geometry | None = None) -> torch.Tensor:
    """``(C, H, W)`` normalised input -> ``(T, H, W)`` float32 map; tiled (exactly) for large scans.

    Args:
        model: a map model (a U-Net or a :class:`MapEnsemble`).
        x: ``(C, H, W)`` model input: a tensor, a NumPy array, or anything that reads
            ``x[:, y0:y1, x0:x1]`` windows as arrays (a large scan is then never read whole).
        geometry: the model's tiling geometry (measured when needed and not given).
    """
    h, w = x.shape[-2:]
    with torch.no_grad():
        if h * w <= TILE_ABOVE_PIXELS:
            xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x[...]))
            return predict_full(model, xt).float()
        return predict_tiled(model, x, core=TILE_CORE, geometry=geometry).float()


def output_step(model: nn.Module) -> int:
    """Scan pixels per pixel of the grid a U-Net makes its map on: 2 with the front-end, else 1.

    With the paper's front-end the map is made at half resolution and up-sampled x2
    (bilinear) to the scan's grid; an up-sampled map looks smoother than what the model made.
    """
    net = model.members[0] if isinstance(model, MapEnsemble) else model
    return 2 if getattr(net, "front_end", None) is not None else 1


@contextmanager
def _native_output(net: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects what the U-Net's head puts out: its map before the front-end's up-sampling."""
    seen: list[torch.Tensor] = []
    handle = net.head.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        yield seen
    finally:
        handle.remove()


@dataclass(frozen=True)
class MemberMaps:
    """Every fold model's map of one scan, on the scan's grid and on the models' own grid.

    Attributes:
        full: ``(M, T, H, W)`` float32, one map per member; their mean is the ensemble's map.
        native: ``(M, T, ceil(H / step), ceil(W / step))`` the maps as the members made them
            (before up-sampling), or None for a scan scored in tiles.
        step: scan pixels per native pixel (:func:`output_step`).
        bound: the ensemble's bound (:attr:`MapEnsemble.bound`), or None.
    """

    full: np.ndarray
    native: np.ndarray | None
    step: int
    bound: tuple[float, float] | None = None

    def ensemble(self, bounded: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """The ensemble's maps ``(T, H, W)`` and ``(T, h, w)``: members summed in order, then / M,
        then clamped to the bound (unless ``bounded`` is False), as :meth:`MapEnsemble.forward`
        does (so the same float32 bits)."""
        bound = self.bound if bounded else None

        def mean(maps: np.ndarray) -> np.ndarray:
            out = torch.from_numpy(maps[0].copy())
            for m in maps[1:]:
                out = out + torch.from_numpy(m)
            return bound_map(out / len(maps), bound).numpy()

        return mean(self.full), None if self.native is None else mean(self.native)


def member_maps(model: MapEnsemble, x: Any, geometry: Geometry | None = None) -> MemberMaps:
    """Each member's map of a ``(C, H, W)`` input, as :func:`predict_map` scores it.

    Scans up to :data:`TILE_ABOVE_PIXELS` are scored whole and also give the native maps;
    larger scans are scored in tiles (exact) and give none.
    """
    h, w = x.shape[-2:]
    step = output_step(model)
    whole = h * w <= TILE_ABOVE_PIXELS
    if whole:
        x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x[...]))
    fulls, natives = [], []
    with torch.no_grad():
        for net in model.members:
            if not whole:
                fulls.append(predict_tiled(net, x, core=TILE_CORE, geometry=geometry).float().numpy())
                continue
            with _native_output(net) as seen:
                fulls.append(predict_full(net, x).float().numpy())
            native = seen[-1][0] if step > 1 else torch.from_numpy(fulls[-1])
            natives.append(native[:, : math.ceil(h / step), : math.ceil(w / step)].float().numpy())
    return MemberMaps(np.stack(fulls), np.stack(natives) if natives else None, step, model.bound)
