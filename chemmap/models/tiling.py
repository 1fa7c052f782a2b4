"""Exact tiling: whole-image maps from windows, with no blending (DESIGN.md "Exact tiling").

A U-Net is local: an output pixel depends only on the input within its receptive
radius ``R``. A window of the input that starts on the net's pooling grid and keeps a
halo of at least ``R`` around the pixels it is trusted for computes those pixels
exactly as the whole image does, so cores cut from such windows stitch into the
whole-image map to float precision (pad ``True`` or ``False`` alike).

Coordinates are image coordinates throughout: output pixel ``(i, j)`` of
:func:`predict_full` is the map at image pixel ``(i, j)``. The model's input is the
*canvas*: the image padded by :func:`canvas_pads` (the valid-convolution margin on every
side, plus what makes the size acceptable). :func:`read_padded` pads a window exactly as
the whole canvas would be padded, so a window at the image border sees the same padding
as the whole-image pass.

``R`` and the stride grid are measured from the model (:func:`model_geometry`), never
hard-coded; for a U-Net, :func:`chemmap.models.geometry.unet_geometry` computes the same
from its config alone (the tests check the two agree).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from chemmap.models.geometry import Geometry, Reach, core_windows, halo_radius
from chemmap.models.unet import FRONT_END_BANDS, UNet, UNetConfig

__all__ = [
    "Box",
    "CanvasPads",
    "Geometry",
    "Window",
    "canvas_pads",
    "core_windows",
    "forward_full",
    "model_geometry",
    "plan_window",
    "predict_full",
    "predict_tiled",
    "read_padded",
]

PAD_MODES = ("reflect", "replicate", "zeros")

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), end exclusive, image coordinates


_GEOMETRY_CACHE: dict[Any, Geometry] = {}


# ----------------------------------------------------------------------------- model sizes


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose geometry is the model's: the one inside a DistributedDataParallel (or
    similar) wrapper, or the member an ensemble of equal members names (``geometry_member``;
    a clamp after the ensemble's mean would hide a probe's reach)."""
    for name in ("module", "geometry_member"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def _margin(model: nn.Module) -> int:
    return int(getattr(_unwrap(model), "margin", 0))


def _valid_size(model: nn.Module, n: int) -> int:
    valid_size = getattr(_unwrap(model), "valid_size", None)
    return int(valid_size(n)) if valid_size is not None else max(n, 1)


def _accepts(model: nn.Module, n: int) -> bool:
    accepts = getattr(_unwrap(model), "accepts", None)
    return bool(accepts(n)) if accepts is not None else n >= 1


@dataclass(frozen=True)
class CanvasPads:
    """Rows and columns added around an image to make the model's canvas.

    Unpacks as ``top, bottom, left, right = canvas_pads(...)``.
    """

    top: int
    bottom: int
    left: int
    right: int

    def __iter__(self) -> Iterator[int]:
        return iter((self.top, self.bottom, self.left, self.right))


def canvas_pads(model: nn.Module, height: int, width: int) -> CanvasPads:
    """Padding that turns an image into the model's canvas.

    The canvas is what :func:`predict_full` feeds the model: the margin on every side
    (``pad=False``), then rows/columns at the bottom/right up to the next accepted size.
    Its output covers the image (and possibly a few extra rows/columns, cropped off).
    """
    m = _margin(model)
    bottom = _valid_size(model, height + 2 * m) - height - m
    right = _valid_size(model, width + 2 * m) - width - m
    return CanvasPads(top=m, bottom=bottom, left=m, right=right)


# ----------------------------------------------------------------------------- padding


def _source_index(lo: int, hi: int, n: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Image rows that window rows ``lo..hi-1`` read under ``mode``, and which are real."""
    idx = np.arange(lo, hi)
    inside = (idx >= 0) & (idx < n)
    if mode == "reflect":
        period = 2 * (n - 1)
        if period == 0:
            src = np.zeros_like(idx)
        else:
            src = np.mod(idx, period)
            src = np.where(src >= n, period - src, src)
    elif mode in ("replicate", "zeros"):
        src = np.clip(idx, 0, n - 1)
    else:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {mode!r}.")
    return src, inside


def read_padded(x: Any, y0: int, x0: int, y1: int, x1: int, pad_mode: str = "reflect") -> torch.Tensor:
    """Read ``x[..., y0:y1, x0:x1]`` with the image padded outside its bounds.

    The padding is a function of image coordinates only, so a window reads exactly what
    the same region of the whole padded image holds (reflect repeats as often as needed).

    Args:
        x: ``(..., H, W)`` tensor, numpy or Zarr array (anything sliceable).
        y0, x0, y1, x1: window in image coordinates; may extend past the image.
        pad_mode: "reflect" (mirror without repeating the edge), "replicate" or "zeros".

    Returns:
        ``(..., y1 - y0, x1 - x0)`` tensor.
    """
    height, width = x.shape[-2:]
    sy, in_y = _source_index(y0, y1, height, pad_mode)
    sx, in_x = _source_index(x0, x1, width, pad_mode)
    ys, ye, xs, xe = int(sy.min()), int(sy.max()) + 1, int(sx.min()), int(sx.max()) + 1
    lead = (slice(None),) * (len(x.shape) - 2)
    block = x[(*lead, slice(ys, ye), slice(xs, xe))]
    block = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(block))
    if np.array_equal(sy, np.arange(y0, y1)) and np.array_equal(sx, np.arange(x0, x1)):
        return block  # inside the image: no padding, no copy (training's whole images are)
    iy = torch.as_tensor(sy - ys, device=block.device)
    ix = torch.as_tensor(sx - xs, device=block.device)
    out = block.index_select(-2, iy).index_select(-1, ix)  # (..., y1 - y0, x1 - x0)
    if pad_mode == "zeros" and not (in_y.all() and in_x.all()):
        keep = torch.as_tensor(in_y[:, None] & in_x[None, :], device=out.device)
        out = out * keep.to(out.dtype)
    return out


# ----------------------------------------------------------------------------- geometry


def _probe(model: nn.Module, in_channels: int | None = None) -> tuple[nn.Module, int]:
    """A linear, positive stand-in with the model's connectivity, and its input channels.

    A :class:`~chemmap.models.unet.UNet` is rebuilt one feature wide with the fewest input
    bands (widths do not change which pixels connect; the measurement gets ~100x cheaper);
    any other model is copied. Then max pooling becomes average pooling (a max routes the
    gradient to one pixel of four), normalisation layers (per pixel, or per channel in
    eval: no spatial reach) become identities, and weights become positive, so that with a
    positive input every ReLU passes and no dependency cancels: the support of one output
    pixel's gradient is its receptive field.
    """
    config = getattr(model, "config", None)
    if isinstance(model, UNet) and isinstance(config, UNetConfig):
        in_channels = FRONT_END_BANDS if config.front_end else 1
        slim = replace(config, features=1, in_channels=in_channels, out_channels=1, checkpointing=False)
        probe: nn.Module = UNet(slim)
    else:
        in_channels = in_channels if in_channels is not None else getattr(config, "in_channels", None)
        if in_channels is None:
            raise ValueError("model_geometry needs in_channels for a model without a config.in_channels.")
        probe = copy.deepcopy(model)
    probe = probe.to(torch.float64).eval()
    for parent in list(probe.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
            elif isinstance(child, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm):
                setattr(parent, name, nn.Identity())
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(p.abs() + 0.05)
    return probe, in_channels


def _measure_reach(probe: nn.Module, in_channels: int, n: int, stride: int, margin: int) -> Reach | None:
    """How far the field of an output pixel extends at each phase k of the grid (see :class:`Reach`).

    Phase k is the output pixel on input position ``centre + k``, with ``centre`` a
    multiple of ``stride`` in the probe's input; the larger of the row and column reach
    is kept on each side. Returns None if some field touches the border of the ``n x n``
    probe input (it is too small to see the whole field).
    """
    centre = (n // 2) // stride * stride
    before, after = [], []
    for start in range(0, stride, 8):
        ks = list(range(start, min(start + 8, stride)))
        x = torch.rand(len(ks), in_channels, n, n, dtype=torch.float64) + 0.5  # (K, C, n, n)
        x.requires_grad_(True)
        out = probe(x)  # (K, T, n - 2m, n - 2m)
        at = [centre + k - margin for k in ks]  # output index of the pixel on input centre + k
        picked = torch.stack([out[i, :, a, a].sum() for i, a in enumerate(at)])
        (grad,) = torch.autograd.grad(picked.sum(), x)  # (K, C, n, n)
        support = grad.abs().sum(1) > 0  # (K, n, n)
        for i, k in enumerate(ks):
            ys = torch.nonzero(support[i].any(1)).flatten()
            xs = torch.nonzero(support[i].any(0)).flatten()
            y_lo, y_hi, x_lo, x_hi = int(ys[0]), int(ys[-1]), int(xs[0]), int(xs[-1])
            if min(y_lo, x_lo) == 0 or max(y_hi, x_hi) == n - 1:
                return None
            p = centre + k
            before.append(max(p - y_lo, p - x_lo))
            after.append(max(y_hi - p, x_hi - p))
    return Reach(tuple(before), tuple(after))


def _measure_stride(
    model: nn.Module, probe: nn.Module, in_channels: int, size: int, reach: int, nominal: int
) -> tuple[int, bool]:
    """Smallest shift s (a power of two) with f(shift_s(x)) == shift_s(f(x)) away from borders.

    The shifted window is also larger than the reference one, so that a model whose
    output depends on the tensor's size (bilinear with ``align_corners=True``) shows up
    as not exact.
    """
    margin = _margin(model)
    larger = _valid_size(model, size + nominal)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, in_channels, nominal + larger, nominal + larger, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        base = probe(x[..., :size, :size])  # (1, T, size - 2m, size - 2m)

        def equivariant(s: int) -> bool:
            shifted = probe(x[..., s : s + larger, s : s + larger])  # (1, T, larger - 2m, larger - 2m)
            lo, hi = s + reach, size - 1 - reach  # input positions both windows see whole
            assert hi - lo >= nominal, "probe too small for the equivariance check"
            a = shifted[..., lo - s - margin : hi - s - margin + 1, lo - s - margin : hi - s - margin + 1]
            b = base[..., lo - margin : hi - margin + 1, lo - margin : hi - margin + 1]
            return bool((a - b).norm() <= 1e-9 * b.norm())

        if not equivariant(nominal):
            return nominal, False
        s = nominal
        while s > 1 and equivariant(s // 2):
            s //= 2
    return s, True


def model_geometry(model: nn.Module, in_channels: int | None = None, *, cache: bool = True) -> Geometry:
    """Measure a model's tiling halo (receptive radius on the grid) and stride grid.

    The reach of every output pixel comes from the gradient of that one pixel with
    respect to the input, on a linear positive stand-in of the model (see
    :func:`_probe`), for every phase of the stride grid; the stride from the stand-in's
    shift-equivariance. Results are cached per (hashable) ``model.config``.

    Args:
        model: a map model: a :class:`~chemmap.models.unet.UNet`, or any module with the
            same geometry contract (optional ``margin``, ``stride``, ``valid_size``,
            ``accepts``) and a ``config.in_channels`` unless ``in_channels`` is given.
        in_channels: input channels for a model that is not a UNet.
        cache: reuse the measurement for models with an equal ``config``.

    Returns:
        The :class:`Geometry`.
    """
    model = _unwrap(model)
    config = getattr(model, "config", None)
    key = config if cache and config is not None else None
    if key is not None and key in _GEOMETRY_CACHE:
        return _GEOMETRY_CACHE[key]
    declared = getattr(model, "stride", 1)  # a UNet's pooling grid; 1 for a model that declares none
    nominal = declared if isinstance(declared, int) else 1  # (a Conv2d.stride is a tuple: no grid)
    margin = _margin(model)
    probe, probe_channels = _probe(model, in_channels)
    n = _valid_size(model, 8 * nominal + 2 * margin)
    while True:
        with torch.enable_grad():
            reach = _measure_reach(probe, probe_channels, n, nominal, margin)
        if reach is not None:
            break
        n = _valid_size(model, 2 * n)
    farthest = max(reach.before + reach.after)
    size = _valid_size(model, max(n, 2 * farthest + 4 * nominal + 2 * margin))
    stride, exact = _measure_stride(model, probe, probe_channels, size, farthest, nominal)
    geometry = Geometry(halo_radius(reach, nominal, margin), stride, margin, exact, farthest)
    if key is not None:
        _GEOMETRY_CACHE[key] = geometry
    return geometry


# ----------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    """An input window that computes a box of the map exactly.

    Attributes:
        read: ``(y0, x0, y1, x1)`` input window in image coordinates (may pass the border:
            read it with :func:`read_padded`).
        origin: image coordinates ``(y, x)`` of the window's output pixel ``(0, 0)``.
    """

    read: Box
    origin: tuple[int, int]

    def crop(self, out: torch.Tensor, box: Box) -> torch.Tensor:
        """The part of a window output ``(..., h, w)`` that covers ``box`` (image coordinates)."""
        y0, x0, y1, x1 = box
        oy, ox = self.origin
        return out[..., y0 - oy : y1 - oy, x0 - ox : x1 - ox]


def _span(model: nn.Module, lo: int, hi: int, halo: int, c0: int, c1: int, stride: int) -> tuple[int, int]:
    """Input rows [a, b) of the canvas [c0, c1) whose output holds rows [lo, hi) exactly."""
    h = max(halo, _margin(model))
    a = max(c0 + math.floor((lo - h - c0) / stride) * stride, c0)
    b = hi + h
    b = c1 if b >= c1 else min(a + _valid_size(model, b - a), c1)
    while not _accepts(model, b - a):
        if a == c0:
            raise ValueError(f"no accepted window covers rows {lo}..{hi} of a canvas {c0}..{c1}.")
        a -= stride
    return a, b


def plan_window(
    model: nn.Module, geometry: Geometry, height: int, width: int, box: Box, halo: int | None = None
) -> Window:
    """The input window for which ``box`` of the map is exact (halo >= radius).

    Args:
        model: the map model (for its margin and accepted sizes).
        geometry: from :func:`model_geometry`.
        height, width: image size.
        box: ``(y0, x0, y1, x1)`` region of the map that must be exact.
        halo: input pixels kept around ``box``; default ``geometry.radius``. Rounded so the
            window starts on the stride grid of the canvas; clipped at the canvas border.
    """
    halo = geometry.radius if halo is None else halo
    top, bottom, left, right = canvas_pads(model, height, width)
    s = geometry.stride
    # Exactness is guaranteed for boxes whose edges lie on the image's stride grid: widen.
    y0, x0 = box[0] // s * s, box[1] // s * s
    y1, x1 = -(-box[2] // s) * s, -(-box[3] // s) * s
    a_y, b_y = _span(model, y0, y1, halo, -top, height + bottom, s)
    a_x, b_x = _span(model, x0, x1, halo, -left, width + right, s)
    m = _margin(model)
    return Window((a_y, a_x, b_y, b_x), (a_y + m, a_x + m))


# ----------------------------------------------------------------------------- prediction


def _as_batch(x: Any) -> tuple[Any, bool]:
    batched = len(x.shape) == 4
    if not batched and len(x.shape) != 3:
        raise ValueError(f"expected an image (C, H, W) or a batch (B, C, H, W), got shape {tuple(x.shape)}.")
    return x, batched


def _model_input(model: nn.Module, window: torch.Tensor, batched: bool) -> torch.Tensor:
    param = next(model.parameters(), None)
    if param is not None:
        window = window.to(device=param.device, dtype=param.dtype)
    return window if batched else window.unsqueeze(0)  # (B, C, h, w)


def forward_full(model: nn.Module, x: Any, pad_mode: str = "reflect") -> torch.Tensor:
    """The whole-image map with gradients: pad to the canvas, one forward pass, crop to the image.

    Training calls this and scoring calls :func:`predict_full` (the same, without gradients),
    so both see exactly the same canvas.

    Args:
        model: map model (its train/eval mode is left as it is).
        x: ``(B, C, H, W)`` or ``(C, H, W)`` image(s), any size.
        pad_mode: how the canvas extends the image (see :func:`read_padded`).

    Returns:
        ``(B, T, H, W)`` (or ``(T, H, W)``) maps in the image's geometry.
    """
    x, batched = _as_batch(x)
    height, width = x.shape[-2:]
    top, bottom, left, right = canvas_pads(model, height, width)
    canvas = read_padded(x, -top, -left, height + bottom, width + right, pad_mode)  # (B, C, H', W')
    out = model(_model_input(model, canvas, batched))  # (B, T, H' - 2m, W' - 2m)
    out = out[..., :height, :width]  # (B, T, H, W)
    return out if batched else out[0]


def predict_full(model: nn.Module, x: Any, pad_mode: str = "reflect") -> torch.Tensor:
    """:func:`forward_full` without gradients: the whole-image map for scoring."""
    with torch.no_grad():
        return forward_full(model, x, pad_mode)


def predict_tiled(
    model: nn.Module,
    x: Any,
    core: int,
    halo: int | None = None,
    pad_mode: str = "reflect",
    geometry: Geometry | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The whole-image map from windows of ``core + 2 * halo``: equal to :func:`predict_full`.

    Each window is read with :func:`read_padded` (so ``x`` may be a Zarr array that never
    fits in memory), run through the model, and only its core is kept; no blending.

    Args:
        model: map model.
        x: ``(B, C, H, W)`` or ``(C, H, W)`` image(s): tensor, numpy or Zarr array.
        core: side of the kept tiles, a multiple of the model's stride.
        halo: input pixels around each core; default the measured radius (exact).
        pad_mode: as in :func:`predict_full`.
        geometry: from :func:`model_geometry` (measured if not given).
        progress: called with ``(done, total)`` after each window.

    Returns:
        ``(B, T, H, W)`` (or ``(T, H, W)``) maps on the CPU, in the model's output dtype.
    """
    x, batched = _as_batch(x)
    height, width = x.shape[-2:]
    geometry = model_geometry(model) if geometry is None else geometry
    boxes = core_windows(height, width, core, geometry.stride)
    out: torch.Tensor | None = None
    with torch.no_grad():
        for done, box in enumerate(boxes, start=1):
            window = plan_window(model, geometry, height, width, box, halo)
            tile = model(_model_input(model, read_padded(x, *window.read, pad_mode), batched))  # (B, T, h, w)
            if out is None:
                out = torch.empty(tile.shape[0], tile.shape[1], height, width, dtype=tile.dtype)
            y0, x0, y1, x1 = box
            out[..., y0:y1, x0:x1] = window.crop(tile, box).cpu()
            if progress is not None:
                progress(done, len(boxes))
    assert out is not None
    return out if batched else out[0]
