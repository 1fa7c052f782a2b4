"""A U-Net's tiling geometry from its config alone: pure Python, no torch, no network built.

:func:`unet_geometry` answers what :func:`chemmap.models.tiling.model_geometry` measures
(receptive radius seen from the stride grid, the stride grid, the valid-convolution
margin), so that preprocessing can size its patch index without building a U-Net. It
follows the layers of :mod:`chemmap.models.unet` one by one: an output pixel's dependency
interval along one axis is propagated backwards through every layer, for every phase of
the stride grid, and the halo is taken exactly as ``model_geometry`` defines it. The
tests check it against the measurement for every configuration they build.

Every layer of the U-Net acts on rows and columns alike (3x3 and 1x1 convolutions, 2x2
pooling, x2 up-sampling, the front-end's 2x2 stride-2 kernel), so one axis is enough:
the field of a pixel is the product of its row and column intervals. Encoder type and
normalisation do not change it: a residual block's shortcut lies inside its convolutions'
field, and the normalisations act per pixel (batch norm in training mode is not local at
all; tiling assumes eval mode).

Index maps, output index ``o`` -> input interval, inside an image (away from its borders):

- 3x3 convolution: ``[o - 1, o + 1]`` with ``pad=True``, ``[o, o + 2]`` valid;
- 2x2 max pooling and the front-end's 2x2 stride-2 kernel: ``[2o, 2o + 1]``;
- bilinear x2, ``align_corners=False``: source ``o / 2 - 1/4``, so ``[(o - 1) // 2, (o - 1) // 2 + 1]``
  (both weights, 1/4 and 3/4, non-zero);
- 2x2 transposed convolution, stride 2: ``[o // 2, o // 2]``;
- the skip, centre-cropped to the up-sampled tensor with ``pad=False``: ``o + offset``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

Interval = tuple[int, int]  # (first, last) index, both included


@dataclass(frozen=True)
class Geometry:
    """What tiling needs to know about a model.

    Attributes:
        radius: the halo R that makes tiles exact: input pixels to keep around a core
            whose edges lie on the image's stride grid (multiples of ``stride``). It is
            the receptive radius seen from the grid: an output pixel ``k`` rows inside a
            core may reach ``R + k`` rows up. A halo one stride smaller is not exact.
        stride: the output shifts with the input by multiples of this (the pooling grid).
        margin: input pixels a valid-convolution net loses per side (0 with ``pad=True``).
        exact: whether the model is shift-equivariant on the stride grid; if False (e.g.
            bilinear with ``align_corners=True``) tiles only approximate the whole image.
        reach: the farthest input pixel any single output pixel depends on (>= radius).
    """

    radius: int
    stride: int
    margin: int = 0
    exact: bool = True
    reach: int | None = None


@dataclass(frozen=True)
class Reach:
    """How far an output pixel's field extends, for each phase ``k`` of the stride grid.

    ``before[k]`` and ``after[k]`` are for the output pixel on canvas position ``p`` with
    ``p % stride == k``: it depends on input rows ``p - before[k] .. p + after[k]`` (and
    columns alike, for a model that treats both axes the same).
    """

    before: tuple[int, ...]
    after: tuple[int, ...]


# ----------------------------------------------------------------------------- sizes


@functools.cache
def body_output_size(n: int, depth: int, pad: bool) -> int:
    """Output size of the U-Net body (no front-end) for input size ``n``; -1 if not accepted."""
    if pad:
        return n if n >= 2 ** (depth - 1) else -1
    for _ in range(depth - 1):
        n -= 4  # two valid 3x3 convolutions
        if n <= 0 or n % 2:
            return -1  # pooling needs an even size to keep the skip centred
        n //= 2
    n -= 4
    if n <= 0:
        return -1
    for _ in range(depth - 1):
        n = 2 * n - 4
    return n


@functools.cache
def body_min_size(depth: int) -> int:
    """Smallest input a valid-convolution body of this depth accepts."""
    n = 1
    while body_output_size(n, depth, pad=False) <= 0:
        n += 1
    return n


def unet_stride(depth: int, front_end: bool) -> int:
    """The pooling grid: 2 ** (depth - 1), doubled behind the stride-2 front-end."""
    return 2 ** (depth - 1) * (2 if front_end else 1)


def unet_margin(depth: int, pad: bool, front_end: bool) -> int:
    """Input pixels a U-Net loses per side: 0 with ``pad=True``, doubled behind the front-end."""
    if pad:
        return 0
    n = body_min_size(depth)
    margin = (n - body_output_size(n, depth, pad=False)) // 2
    return 2 * margin if front_end else margin


# ----------------------------------------------------------------------------- index maps


def _conv3(iv: Interval, pad: bool) -> Interval:
    return (iv[0] - 1, iv[1] + 1) if pad else (iv[0], iv[1] + 2)


def _block(iv: Interval, pad: bool) -> Interval:
    """Two 3x3 convolutions (a double conv, or a residual block whose shortcut lies inside)."""
    return _conv3(_conv3(iv, pad), pad)


def _halve(iv: Interval) -> Interval:
    """2x2 max pooling, or the front-end's 2x2 stride-2 kernel."""
    return 2 * iv[0], 2 * iv[1] + 1


def _bilinear_x2(iv: Interval) -> Interval:
    """Bilinear x2 with ``align_corners=False``: output ``o`` samples input ``o / 2 - 1/4``."""
    return (iv[0] - 1) // 2, (iv[1] - 1) // 2 + 1


def _transposed_x2(iv: Interval) -> Interval:
    return iv[0] // 2, iv[1] // 2


def _hull(a: Interval | None, b: Interval) -> Interval:
    """Smallest interval holding both; the extremes of a union are all that propagate."""
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


def _skip_offsets(depth: int, pad: bool) -> list[int]:
    """Per decoder level: skip index minus up-sampled index (the centre crop of ``pad=False``).

    With ``pad=True`` both tensors share their origin (odd sizes are padded at the bottom
    and right only), so every offset is 0.
    """
    if pad:
        return [0] * (depth - 1)
    sizes = [body_min_size(depth) - 4]  # encoder outputs, level by level
    for _ in range(depth - 1):
        sizes.append(sizes[-1] // 2 - 4)
    offsets = [0] * (depth - 1)
    x = sizes[-1]
    for level in reversed(range(depth - 1)):
        offsets[level] = (sizes[level] - 2 * x) // 2
        x = 2 * x - 4
    return offsets


DENOISER_DILATIONS = (1, 2, 4, 8, 4, 2, 1)  # a U-Net's denoiser head's layers, in order (models.unet)


@dataclass(frozen=True)
class _Layout:
    """The fields of a U-Net config that decide its geometry."""

    depth: int
    pad: bool
    bilinear: bool
    front_end: bool
    head_radius: int = 0  # a full-resolution head's own reach past the U-Net's (the denoiser's)


def _body_field(layout: _Layout, iv: Interval) -> Interval:
    """Body-input interval that the body-output interval ``iv`` depends on."""
    depth, pad = layout.depth, layout.pad
    offsets = _skip_offsets(depth, pad)
    skips: list[Interval] = []
    for level in range(depth - 1):  # decoder, from the head inwards
        cat = _block(iv, pad)
        skips.append((cat[0] + offsets[level], cat[1] + offsets[level]))
        iv = _bilinear_x2(cat) if layout.bilinear else _transposed_x2(cat)
    need: Interval = iv  # the bottleneck's output
    for level in reversed(range(1, depth)):  # encoder, from the bottleneck outwards
        below = _halve(_block(need, pad))  # through level's block and its pooling
        need = _hull(skips[level - 1], below)
    return _block(need, pad)


def _layout(config: Any) -> _Layout:
    fields = ("depth", "pad", "bilinear", "front_end", "align_corners")
    missing = [field for field in fields if not hasattr(config, field)]
    if missing:
        raise ValueError(f"unet_geometry needs a U-Net config; {type(config).__name__} has no {missing}.")
    if not isinstance(config.depth, int) or config.depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {config.depth!r}.")
    if config.bilinear and config.align_corners:
        raise ValueError(
            "unet_geometry: bilinear up-sampling with align_corners=True samples on a grid that "
            "depends on the tensor's size, so no radius makes tiles exact (DESIGN.md, 'Exact "
            "tiling'); use align_corners=False, or measure with tiling.model_geometry."
        )
    head = sum(DENOISER_DILATIONS[: int(getattr(config, "denoiser", 0) or 0)])
    return _Layout(int(config.depth), bool(config.pad), bool(config.bilinear), bool(config.front_end), head)


def _unet_reach(layout: _Layout) -> Reach:
    """Field of the output pixel at each phase of the stride grid (see :class:`Reach`)."""
    stride = unet_stride(layout.depth, layout.front_end)
    margin = unet_margin(layout.depth, layout.pad, layout.front_end)
    before, after = [], []
    for k in range(stride):
        p = 16 * stride + k  # canvas position; indices are unbounded, so any grid origin does
        iv = (p - margin, p - margin)  # the output pixel on canvas position p
        if layout.front_end:
            iv = _halve(_body_field(layout, _bilinear_x2(iv)))
        else:
            iv = _body_field(layout, iv)
        before.append(p - iv[0])
        after.append(iv[1] - p)
    r = layout.head_radius  # a head at full resolution reads the U-Net's output at p - r .. p + r
    if r:
        before, after = (
            [max(before[(k + j) % stride] - j for j in range(-r, r + 1)) for k in range(stride)],
            [max(after[(k + j) % stride] + j for j in range(-r, r + 1)) for k in range(stride)],
        )
    return Reach(tuple(before), tuple(after))


def halo_radius(reach: Reach, stride: int, margin: int) -> int:
    """The halo R seen from cores whose edges lie on the image's stride grid.

    The image starts ``margin`` pixels into the canvas, so its grid sits at phase
    ``margin % stride`` of the canvas grid. Core row ``j`` from a core's first row needs
    ``before - j`` rows of halo above it; core row ``j`` from its last row needs
    ``after - j`` below it.
    """
    phase = margin % stride
    above = max(reach.before[(phase + j) % stride] - j for j in range(stride))
    below = max(reach.after[(phase - 1 - j) % stride] - j for j in range(stride))
    return max(above, below)


def unet_geometry(config: Any) -> Geometry:
    """The tiling geometry of a U-Net from its config, without building it.

    Args:
        config: a :class:`chemmap.models.unet.UNetConfig`, or any object with its fields
            ``depth``, ``pad``, ``bilinear``, ``front_end`` and ``align_corners`` (e.g. the
            pipeline's ``model:`` section). Channels, widths, encoder and normalisation do
            not change the geometry.

    Returns:
        The :class:`Geometry` that :func:`chemmap.models.tiling.model_geometry` measures
        on the built network: ``radius``, ``stride``, ``margin``, ``exact=True`` and ``reach``.

    Raises:
        ValueError: for a config without those fields, or with bilinear up-sampling and
            ``align_corners=True`` (not shift-equivariant: tiles are never exact).
    """
    layout = _layout(config)
    stride = unet_stride(layout.depth, layout.front_end)
    margin = unet_margin(layout.depth, layout.pad, layout.front_end)
    reach = _unet_reach(layout)
    radius = halo_radius(reach, stride, margin)
    return Geometry(radius, stride, margin, exact=True, reach=max(reach.before + reach.after))


# ----------------------------------------------------------------------------- windows


def core_windows(height: int, width: int, core: int, stride: int = 1) -> list[tuple[int, int, int, int]]:
    """Non-overlapping ``core x core`` tiles covering the image, starting on the stride grid.

    Args:
        height, width: image size.
        core: tile side; a multiple of ``stride``. Tiles at the bottom/right are clipped.
        stride: the model's stride grid.

    Returns:
        ``(y0, x0, y1, x1)`` boxes, end exclusive, row-major.
    """
    if core < 1 or core % stride:
        raise ValueError(f"core must be a positive multiple of the stride {stride}, got {core}.")
    return [
        (y0, x0, min(y0 + core, height), min(x0 + core, width))
        for y0 in range(0, height, core)
        for x0 in range(0, width, core)
    ]
