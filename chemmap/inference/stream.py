"""Streamed tiled scoring: a raw scan of any length -> its maps, without ever holding the cube.

The scan is read a block of lines at a time (``raw[b0:b1, l0:l1]``: the recipe's band span
only, :attr:`Recipe.band_span`) through the one path for a scan
(:mod:`chemmap.preprocess.scan`), in two passes:

1. **Mask pass.** :func:`transform` per block fills the 2-D mean reflectance and bad-pixel
   flags (and where the cube is not finite); then :func:`sample_mask` on the whole 2-D scan
   and :func:`check_finite`. The mask's steps (opening, hole filling, minimum size) are
   global, so they cannot run per block. Each block's preprocessed cube goes to a spill
   file (unlinked from the start; in the OS's file cache, not the process's memory).
2. **Map pass.** The spill file's blocks (or, without one, :func:`transform` of the raw
   lines again), :func:`model_input`, and model windows run in batches. A rolling band of
   model-input rows keeps only the rows the pending windows read
   (their halo included); the output rows the windows complete go to ``out`` from this one
   writer, in whole chunks of ``out``, NaN outside the mask. The scan's mean spectrum over
   the mask (preprocessed units) is summed on the way.

Blocks of lines are read and preprocessed by a few threads (NumPy releases the GIL): in the
mask pass all along; in the map pass on CUDA ahead of need, while the GPU computes, and on
the CPU in parallel bursts between model calls (a thread beside PyTorch's parallel loops
would only stall them; measured here: more memory, no faster).

Regions: ``tissue`` (the default) plans the windows once the mask is known, around it:
exact cores tile the mask's bounding box (as many as ``tile`` needs, made even), blended
windows start at the box and take the smallest size that covers it in as many windows as
full ones would; a window without a mask pixel is skipped, and the map pass preprocesses
only the lines and columns the windows read. Pixels outside the mask are NaN whatever the
model says there, so the map is the same (exact: still the whole-image map). ``scan``
places windows over the whole scan, as MONAI does.

Modes (windows always start on the model's stride grid, see DESIGN.md "Exact tiling"):

- ``exact``: cores of ``tile`` with a halo of at least the model's measured receptive
  radius, read with the whole-image padding (:func:`read_padded`), cores stitched without
  blending: the map equals the whole-image map (:func:`chemmap.inference.mapping.map_arrays`)
  to float rounding. Windows at the scan's border are clipped to the model's canvas as
  :func:`chemmap.models.tiling.predict_tiled` clips them, so a batch holds windows of one
  shape: border windows run in batches of their own shape (padding them to the interior
  size would change what the convolutions see at the canvas edge: not exact).
- ``gaussian`` / ``constant``: blending like MONAI's ``sliding_window_inference``. Windows
  of :func:`window_shape` (the input window exact tiling reads around an interior core of
  ``tile``), one every ``floor(window * (1 - overlap))`` px rounded down to the stride
  grid, the last one on the grid at or past the end (read with reflect padding beyond
  the scan); each window's output weighted by MONAI's importance map (a separable
  gaussian with sigma = ``sigma_scale`` x window, or ones; clamped at 1e-3), weighted sums
  and weights accumulated in float64, divided.

Memory: one batch of windows, the rolling band (window rows x samples x channels, float32),
a block of raw lines per thread, the 2-D arrays of the scan (a few bytes per pixel) and the
output rows being built; never the cube. Disk: the spill file, the cube in float32 (0.4x
the raw scan for the VNIR recipe), only where the disk has room for it and (by default) the
kernel keeps it in its file cache. Peak memory grows with the scan's length by the 2-D
arrays only (``tests/inference/test_stream.py`` measures it).

Tiles: the cost of exact tiling is the halo. Behind the paper's front-end a depth-5 U-Net
has a radius of 220 px, so square 256 px cores read windows of 700 x 700 px (7.5x the
pixels they keep); cores as wide as the scan and ~1024 lines tall read about 1.4x the scan
(``bench/score.py``, ``docs/benchmarks.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chemmap.errors import InputError
from chemmap.inference.ensemble import TILE_CORE
from chemmap.models.tiling import (
    Box,
    Geometry,
    _source_index,
    canvas_pads,
    model_geometry,
    plan_window,
    read_padded,
)
from chemmap.models.unet import UNet, channels_last_2d
from chemmap.preprocess.recipe import Recipe
from chemmap.preprocess.scan import check_finite, model_input, sample_mask, transform

__all__ = ["MODES", "StreamResult", "importance_map", "stream_scan", "window_shape"]

MODES = ("exact", "gaussian", "constant")
REGIONS = ("tissue", "scan")  # where windows go: around the sample mask, or over the whole scan
OVERLAP = 0.25  # blended modes: share of a window its neighbour overlaps (MONAI's default too)
SIGMA_SCALE = 0.125  # gaussian blending: sigma = this x window side (MONAI's default)
MIN_WEIGHT = 1e-3  # MONAI clamps importance weights at this, so that every pixel has weight
BLOCK_LINES = 64  # raw lines read and preprocessed at a time (unless the raw array has line chunks)
BATCH = 4  # windows per model call
PAD_MODE = "reflect"  # as the whole-image canvas is padded (tiling.predict_full)
KEEP_FREED = 1 << 30  # bytes: glibc's mmap and trim thresholds while scoring on the CPU

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class StreamResult:
    """One streamed scan.

    Attributes:
        maps: ``out``, or the float32 NumPy array made when none was given:
            ``(targets, lines, samples)`` in the targets' units, NaN outside the mask.
        mask: ``(lines, samples)`` bool sample pixels.
        bad_removed: saturated or dead pixels taken out of the mask.
        saturated: share (0-1) of all the scan's pixels flagged bad (saturated in a selected
            band, or a dead detector element).
        mean_spectrum: ``(channels,)`` float64 mean of the preprocessed cube over the mask, in
            its physical units (reflectance or absorbance; not normalised).
        mask_pixels: pixels in the mask.
        sums: ``(targets,)`` float64 sum of each map over the mask.
        mask_seconds, map_seconds: wall time of the mask pass and of the map pass.
        windows: model windows run.
        window_pixels: input pixels the model read, over all windows (padding included).
        spilled: the map pass read the mask pass's cube back from a spill file (not the raw scan).
    """

    maps: Any
    mask: np.ndarray
    bad_removed: int
    saturated: float
    mean_spectrum: np.ndarray
    mask_pixels: int
    sums: np.ndarray
    mask_seconds: float
    map_seconds: float
    windows: int
    window_pixels: int = 0
    spilled: bool = False

    @property
    def means(self) -> np.ndarray:
        """``(targets,)`` mean of each map over the mask."""
        return self.sums / max(self.mask_pixels, 1)


@dataclass(frozen=True)
class _Settings:
    """The validated options of :func:`stream_scan`."""

    mode: str
    region: str
    tile: tuple[int, int]  # core (exact) rows x columns, before rounding to the stride grid
    overlap: float
    sigma_scale: float
    batch: int
    device: torch.device
    amp: bool
    channels_last: bool
    block_lines: int
    prefetch: bool


@dataclass(frozen=True)
class _Scan:
    """The raw scan and what preprocessing it needs; ``mask`` once the mask pass is done."""

    raw: Any  # (bands, lines, samples), read by blocks of lines
    white: np.ndarray | None  # (bands, samples) float64 reference means
    dark: np.ndarray | None
    recipe: Recipe
    saturation: float
    lines: int
    samples: int
    mask: np.ndarray | None = None  # (lines, samples) bool
    spill: _Spill | None = None  # the mask pass's cube, for the map pass (None: read the raw again)


@dataclass(frozen=True)
class _Job:
    """One model window.

    Attributes:
        read: ``(y0, x0, y1, x1)`` input window, image coordinates (may pass the border).
        origin: image pixel ``(y, x)`` of the window output's pixel ``(0, 0)``.
        keep: ``(y0, x0, y1, x1)`` the output pixels the window contributes.
        rows: image rows ``[lo, hi)`` the window reads, its border padding resolved.
    """

    read: Box
    origin: tuple[int, int]
    keep: Box
    rows: tuple[int, int]


# ----------------------------------------------------------------------------- checks


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int | np.integer) and v >= 1 for v in pair):
        raise InputError(f"{name} must be a positive integer or (rows, columns), got {value!r}")
    return int(pair[0]), int(pair[1])


def _settings(
    mode: str,
    region: str,
    tile: int | Sequence[int],
    overlap: float,
    batch: int,
    device: str | torch.device,
    amp: bool,
    channels_last: bool | None,
    block_lines: int,
    prefetch: bool,
    sigma_scale: float,
) -> _Settings:
    """The options, checked: a bad one stops with one line naming it and what it got."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if region not in REGIONS:
        raise InputError(f"region must be one of {REGIONS}, got {region!r}")
    if not 0 <= overlap < 1:
        raise InputError(f"overlap must be >= 0 and < 1, got {overlap}")
    if not sigma_scale > 0:
        raise InputError(f"sigma_scale must be > 0, got {sigma_scale}")
    for name, value in (("batch", batch), ("block_lines", block_lines)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {dev} requested, but CUDA is not available here")
    if amp and dev.type != "cuda":
        raise InputError(f"amp=True (bf16 autocast) runs on a CUDA device only, got device {dev}")
    if channels_last is None:  # CPU: 1.2-2.1x faster (docs/benchmarks.md, Scoring)
        channels_last = dev.type == "cpu"
    return _Settings(
        mode,
        region,
        _pair(tile, "tile"),
        overlap,
        sigma_scale,
        int(batch),
        dev,
        amp,
        channels_last,
        int(block_lines),
        prefetch,
    )


def _scan(raw: Any, white: Any, dark: Any, recipe: Recipe, saturation: float, source: str) -> _Scan:
    """The raw scan and references, checked against the recipe."""
    shape = tuple(getattr(raw, "shape", ()))
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"{source}: raw must be a (bands, lines, samples) array, got shape {shape}")
    bands, lines, samples = (int(n) for n in shape)
    if bands != len(recipe.raw_wavelengths):
        raise InputError(
            f"{source}: the scan has {bands} bands, the recipe expects {len(recipe.raw_wavelengths)}"
        )
    if not recipe.mean:
        raise InputError(f"{source}: the recipe has no normalisation statistics (mean, std)")
    refs = []
    for name, ref in (("white", white), ("dark", dark)):
        if ref is not None:
            ref = np.asarray(ref, dtype=np.float64)
            if ref.shape != (bands, samples):
                raise InputError(
                    f"{source}: the {name} reference mean must be (bands, samples) = {(bands, samples)}, "
                    f"got {ref.shape}"
                )
        elif recipe.config.calibration == "white_dark":
            raise InputError(f"{source}: calibration white_dark needs a {name} reference mean, got None")
        refs.append(ref)
    return _Scan(raw, refs[0], refs[1], recipe, float(saturation), lines, samples)


# ----------------------------------------------------------------------------- windows


def _block_lines(raw: Any, block_lines: int | None) -> int:
    """``block_lines``, or for None the raw Dask array's own lines per chunk (reading whole chunks
    saves a copy: 2.3x faster on a BIL file here), else :data:`BLOCK_LINES`."""
    if block_lines is not None:
        return block_lines
    chunks = getattr(raw, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == 3 and isinstance(chunks[1], tuple) and chunks[1]:
        return int(chunks[1][0])
    return BLOCK_LINES


def _grid_tile(tile: tuple[int, int], stride: int, lines: int, samples: int) -> tuple[int, int]:
    """``tile`` rounded up to the stride grid, and no larger than the scan (rounded up)."""

    def up(n: int) -> int:
        return -(-n // stride) * stride

    return min(up(tile[0]), up(lines)), min(up(tile[1]), up(samples))


def window_shape(
    model: nn.Module, geometry: Geometry, lines: int, samples: int, tile: int | Sequence[int] = TILE_CORE
) -> tuple[int, int]:
    """The input window ``(rows, columns)`` of the blended modes, and of exact tiling's interior.

    It is the window :func:`chemmap.models.tiling.plan_window` reads around an interior core
    of ``tile`` (core + halo on the stride grid, an accepted size), clipped to the model's
    canvas of a ``lines x samples`` scan. MONAI's ``roi_size`` for a like-for-like comparison.
    """
    s, reach = geometry.stride, geometry.radius + geometry.margin
    cy, cx = _grid_tile(_pair(tile, "tile"), s, lines, samples)
    k = -(-(reach + s) // s) * s  # an interior core's first row and column, on the grid
    big = 2 * k + max(cy, cx) + 2 * reach + 4 * s
    read = plan_window(model, geometry, big, big, (k, k, k + cy, k + cx)).read
    top, bottom, left, right = canvas_pads(model, lines, samples)
    return min(read[2] - read[0], lines + top + bottom), min(read[3] - read[1], samples + left + right)


def _rows_read(read: Box, lines: int) -> tuple[int, int]:
    src, _ = _source_index(read[0], read[2], lines, PAD_MODE)
    return int(src.min()), int(src.max()) + 1


def _region(mask: np.ndarray | None, stride: int) -> Box | None:
    """The mask's bounding box, its top-left corner moved back onto the stride grid (None: no mask)."""
    if mask is None:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows[0] // stride * stride, cols[0] // stride * stride, int(rows[-1]) + 1, int(cols[-1]) + 1


def _cores(lo: int, hi: int, tile: int, stride: int, balance: bool) -> list[tuple[int, int]]:
    """Core spans over ``[lo, hi)`` (``lo`` on the grid), ``tile`` long (a grid multiple); with
    ``balance`` as many as ``tile`` needs, made as even as the grid allows."""
    size = tile
    if balance:
        n = -(-(hi - lo) // tile)  # cores tile's size needs
        even = -(-(hi - lo) // n)
        size = -(-even // stride) * stride
    return [(a, min(a + size, hi)) for a in range(lo, hi, size)]


def _touches(mask: np.ndarray | None, box: Box) -> bool:
    return mask is None or bool(mask[box[0] : box[2], box[1] : box[3]].any())


def _exact_jobs(
    model: nn.Module,
    geometry: Geometry,
    lines: int,
    samples: int,
    tile: tuple[int, int],
    mask: np.ndarray | None = None,
) -> list[_Job]:
    """Core tiles row by row, each with the window that computes it exactly (as predict_tiled).

    With ``mask`` (region ``tissue``) the cores cover the mask's bounding box only, as few as
    ``tile`` needs and as even as the grid allows, and a core without a mask pixel is skipped.
    """
    s = geometry.stride
    cy, cx = _grid_tile(tile, s, lines, samples)
    y0, x0, y1, x1 = _region(mask, s) or (0, 0, lines, samples)
    jobs = []
    for a_y, b_y in _cores(y0, y1, cy, s, mask is not None):
        for a_x, b_x in _cores(x0, x1, cx, s, mask is not None):
            box = (a_y, a_x, b_y, b_x)
            if _touches(mask, box):
                window = plan_window(model, geometry, lines, samples, box)
                jobs.append(_Job(window.read, window.origin, box, _rows_read(window.read, lines)))
    return jobs


def _starts(n: int, size: int, step: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``step`` px, the last on the grid at or past ``n - size``."""
    if size >= n:
        return [0]
    return [*range(0, n - size, step), -(-(n - size) // stride) * stride]


def _step(side: int, overlap: float, stride: int) -> int:
    """Distance between blended windows of output ``side``: the overlap's share off, on the grid."""
    return max(stride, int(side * (1 - overlap)) // stride * stride)


def _fitted_window(
    model: nn.Module,
    geometry: Geometry,
    lines: int,
    samples: int,
    tile: tuple[int, int],
    extent: tuple[int, int],
    overlap: float,
) -> tuple[int, int]:
    """The smallest window (per axis, an accepted size) whose windows cover ``extent`` in as few
    windows as :func:`window_shape`'s for ``tile`` need: the region is tiled evenly instead of
    by full windows that overhang it."""
    m, s = geometry.margin, geometry.stride
    full = window_shape(model, geometry, lines, samples, tile)
    out = []
    for axis, n in enumerate(extent):

        def count(w: int, n: int = n) -> int:
            side = w - 2 * m
            return len(_starts(n, side, _step(side, overlap, s), s)) if side >= s else 1 << 30

        best, need = full[axis], count(full[axis])
        for t in range(tile[axis] - s, 0, -s):  # smaller cores, smaller windows
            cores = (t, tile[1]) if axis == 0 else (tile[0], t)
            w = window_shape(model, geometry, lines, samples, cores)[axis]
            if count(w) > need:
                break
            best = w
        out.append(best)
    return out[0], out[1]


def _blend_jobs(
    geometry: Geometry,
    lines: int,
    samples: int,
    window: tuple[int, int],
    overlap: float,
    mask: np.ndarray | None = None,
) -> list[_Job]:
    """Overlapping windows of ``window`` (input size) row by row; each keeps its whole output in the scan.

    With ``mask`` (region ``tissue``) the windows start at the mask's bounding box and cover it
    alone; a window without a mask pixel in its output is skipped.
    """
    m, s = geometry.margin, geometry.stride
    py, px = window[0] - 2 * m, window[1] - 2 * m  # output side of a window
    y_lo, x_lo, y_hi, x_hi = _region(mask, s) or (0, 0, lines, samples)
    jobs = []
    for dy in _starts(y_hi - y_lo, py, _step(py, overlap, s), s):
        for dx in _starts(x_hi - x_lo, px, _step(px, overlap, s), s):
            y0, x0 = y_lo + dy, x_lo + dx
            read = (y0 - m, x0 - m, y0 + py + m, x0 + px + m)
            keep = (y0, x0, min(y0 + py, lines), min(x0 + px, samples))
            if _touches(mask, keep):
                jobs.append(_Job(read, (y0, x0), keep, _rows_read(read, lines)))
    return jobs


def importance_map(shape: tuple[int, int], mode: str, sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """Blending weights of a window's output ``(rows, columns)``, float64: MONAI's
    ``compute_importance_map`` in 2-D.

    ``constant``: ones. ``gaussian``: ``exp(-d**2 / (2 sigma**2))`` per axis, ``d`` the distance
    from the window's centre ``(n - 1) / 2``, ``sigma = sigma_scale * n``, the outer product of
    the two, clamped below at ``max(its minimum, 1e-3)``.
    """
    if mode == "constant":
        return np.ones(shape)
    axes = []
    for n in shape:
        d = np.arange(n) - (n - 1) / 2
        axes.append(np.exp(-(d**2) / (2 * (sigma_scale * n) ** 2)))
    weights = np.outer(axes[0], axes[1])  # (rows, columns)
    return np.maximum(weights, max(weights.min(), MIN_WEIGHT))


# ----------------------------------------------------------------------------- reading


def _read(scan: _Scan, l0: int, l1: int, cols: tuple[int, int] | None = None) -> np.ndarray:
    """Raw lines ``[l0, l1)`` of the recipe's band span only (the bands it never reads are not copied)."""
    b0, b1 = scan.recipe.band_span
    if cols is None:
        return np.asarray(scan.raw[b0:b1, l0:l1])  # (b1 - b0, l1 - l0, samples)
    return np.asarray(scan.raw[b0:b1, l0:l1, cols[0] : cols[1]])  # (b1 - b0, l1 - l0, c1 - c0)


def _spans(lines: int, block: int) -> list[tuple[int, int]]:
    return [(l0, min(l0 + block, lines)) for l0 in range(0, lines, block)]


class _Feed:
    """``fn(l0, l1)`` for blocks of lines, in order, computed by ``workers`` threads.

    :meth:`upto` returns the blocks that start above a row, computing them in parallel on
    demand; with ``ahead`` > 0 it then starts the next ``ahead`` blocks in the background, to
    be ready when the caller comes back. ``workers`` 0: everything in the caller's thread.
    """

    def __init__(
        self, fn: Callable[[int, int], Any], spans: Sequence[tuple[int, int]], workers: int, ahead: int
    ):
        self.fn, self.todo, self.ahead = fn, deque(spans), ahead
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="chemmap-stream") if workers > 0 else None
        self.queue: deque[tuple[int, Future]] = deque()  # (l0, the block's future), in order

    def _submit(self) -> None:
        assert self.pool is not None
        l0, l1 = self.todo.popleft()
        self.queue.append((l0, self.pool.submit(self.fn, l0, l1)))

    def upto(self, row: int) -> list[Any]:
        """The results of the blocks not yet returned that start above ``row``, in order."""
        if self.pool is None:
            out = []
            while self.todo and self.todo[0][0] < row:
                out.append(self.fn(*self.todo.popleft()))
            return out
        while self.todo and self.todo[0][0] < row:
            self._submit()
        out = []
        while self.queue and self.queue[0][0] < row:
            out.append(self.queue.popleft()[1].result())
        while self.todo and len(self.queue) < self.ahead:
            self._submit()
        return out

    def close(self) -> None:
        for _, future in self.queue:
            future.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _workers(run: _Settings) -> int:
    """Threads that read and preprocess blocks: a few (NumPy releases the GIL); none without prefetch."""
    return min(4, os.cpu_count() or 1) if run.prefetch else 0


class _Spill:
    """The mask pass's preprocessed cube, written to an unlinked temporary file block by block
    (``(C, l1 - l0, samples)`` float32 at line ``l0``'s offset) and read back by the map pass,
    so the raw scan is read and preprocessed once. The pages live in the OS's file cache, not in
    the process. A failed write (a full disk) drops the spill: the map pass reads the raw again.
    """

    def __init__(self, file: Any, channels: int, samples: int) -> None:
        self.file, self.fd = file, file.fileno()
        self.line_bytes = channels * samples * 4
        self.channels, self.samples = channels, samples
        self.failed: OSError | None = None

    @classmethod
    def open(cls, where: bool | str | os.PathLike, channels: int, lines: int, samples: int) -> _Spill | None:
        """A spill file for the scan's cube, or None: where ``where`` is False; where the disk lacks
        room (the cube plus 1 GiB and a tenth of the disk must stay free); and with ``where``
        True where the cube is larger than the kernel lets dirty file data wait in memory
        (:func:`_writeback_threshold`): past it the file would be written to disk while the
        scan is scored, and on a slow disk that costs more than reading the raw scan again
        (measured: a 9600-line scan's mask pass 10.8 -> 13-15 s here). A folder named
        explicitly is used whatever the threshold."""
        if where is False:
            return None
        folder = None if where is True else os.fspath(where)
        need = channels * lines * samples * 4
        usage = shutil.disk_usage(folder or tempfile.gettempdir())
        if usage.free < need + max(2**30, usage.total // 10):
            return None
        if where is True and need > _writeback_threshold():
            return None
        try:
            file = tempfile.TemporaryFile(dir=folder, prefix="chemmap-spill-")
        except OSError as err:
            if folder is None:
                return None  # no usable temporary folder: read the raw scan again
            raise InputError(f"spill folder {folder}: cannot create a file there ({err.strerror})") from err
        return cls(file, channels, samples)

    def write(self, l0: int, cube: np.ndarray) -> None:
        if self.failed is not None:
            return
        view = memoryview(np.ascontiguousarray(cube, np.float32)).cast("B")
        offset = l0 * self.line_bytes
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as err:  # e.g. the disk filled up meanwhile
            self.failed = err

    def read(self, l0: int, l1: int) -> np.ndarray:
        """The cube of lines ``[l0, l1)``, as :meth:`write` got it: ``(C, l1 - l0, samples)``."""
        out = np.empty((self.channels, l1 - l0, self.samples), np.float32)
        view, offset = memoryview(out).cast("B"), l0 * self.line_bytes
        while view:
            n = os.preadv(self.fd, [view], offset)
            if n == 0:
                raise RuntimeError(f"spill file ends before line {l1}")  # a bug, not bad input
            view, offset = view[n:], offset + n
        return out

    def close(self) -> None:
        self.file.close()


def _writeback_threshold() -> int:
    """Bytes of dirty file data Linux keeps in memory before it starts writing them back
    (``vm.dirty_background_bytes``, or ``vm.dirty_background_ratio`` % of the available
    memory); 0 where this cannot be read (not Linux)."""
    try:
        vm = Path("/proc/sys/vm")
        fixed = int((vm / "dirty_background_bytes").read_text())
        if fixed > 0:
            return fixed
        ratio = int((vm / "dirty_background_ratio").read_text())
        meminfo = Path("/proc/meminfo").read_text().split("\n")
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, ValueError, StopIteration):
        return 0
    return available * ratio // 100


def _mask_block(scan: _Scan, l0: int, l1: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Mask pass, one block: ``(l0, reflectance_mean, bad, not finite)``, each ``(l1 - l0, samples)``."""
    first = scan.recipe.band_span[0]
    t = transform(_read(scan, l0, l1), scan.white, scan.dark, scan.recipe, scan.saturation, first)
    cube = np.asarray(t.cube)  # (C, l1 - l0, samples)
    if scan.spill is not None:
        scan.spill.write(l0, cube)
    return l0, np.asarray(t.reflectance_mean), np.asarray(t.bad), ~np.isfinite(cube).all(axis=0)


def _map_block(scan: _Scan, cols: tuple[int, int], l0: int, l1: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Map pass, one block of lines, columns ``cols`` only (from the spill file, or the raw scan):
    ``(l0, model input (C, rows, c1 - c0) float32, the cube's sums over the block's mask pixels (C,))``.

    The sums cover every mask pixel once (each line is preprocessed once in this pass, and
    the windows' columns hold the mask's).
    """
    c0, c1 = cols
    if scan.spill is not None:
        cube = scan.spill.read(l0, l1)[:, :, c0:c1]  # (C, l1 - l0, c1 - c0)
    else:
        white = None if scan.white is None else scan.white[:, c0:c1]
        dark = None if scan.dark is None else scan.dark[:, c0:c1]
        first = scan.recipe.band_span[0]
        t = transform(_read(scan, l0, l1, cols), white, dark, scan.recipe, scan.saturation, first)
        cube = np.asarray(t.cube)  # (C, l1 - l0, c1 - c0)
    assert scan.mask is not None
    sums = cube[:, scan.mask[l0:l1, c0:c1]].sum(axis=1, dtype=np.float64)  # (C,)
    # The block is this call's own: standardised in place. A column slice of the spilled block
    # stays a view: the band copies it into its ring anyway.
    z = model_input(cube, scan.recipe, overwrite=True)  # (C, l1 - l0, c1 - c0) float32
    return l0, z, sums


def _mask_pass(
    scan: _Scan, run: _Settings, mask_file: Path | None, source: str, progress: Progress | None
) -> tuple[_Scan, int, float]:
    """The sample mask of the whole scan: ``(scan with its mask, bad pixels removed, bad share)``."""
    shape = (scan.lines, scan.samples)
    refl, bad, nonfinite = np.empty(shape, np.float32), np.empty(shape, bool), np.empty(shape, bool)
    workers = _workers(run)  # nothing else runs: every worker is busy all along
    feed = _Feed(partial(_mask_block, scan), _spans(scan.lines, run.block_lines), workers, workers)
    with closing(feed):
        for start, _ in _spans(scan.lines, run.block_lines):
            for l0, r, b, nf in feed.upto(start + 1):
                l1 = l0 + r.shape[0]
                refl[l0:l1], bad[l0:l1], nonfinite[l0:l1] = r, b, nf
                if progress is not None:
                    progress(l1, 2 * scan.lines)
    sm = sample_mask(refl, bad, scan.recipe.config.mask, mask_file=mask_file, source=source)
    check_finite(nonfinite, sm.mask, source)
    spill = scan.spill
    if spill is not None and spill.failed is not None:
        spill.close()  # the map pass reads the raw scan again
        spill = None
    scan = replace(scan, mask=sm.mask, spill=spill)
    return scan, sm.bad_removed, float(bad.mean())


# ----------------------------------------------------------------------------- the rolling band


class _Band:
    """Model-input rows ``[lo, hi)``, columns ``cols``, of the scan in a ring of ``capacity`` rows,
    allocated once.

    It reads like the whole ``(C, lines, samples)`` model input (``shape`` is the scan's),
    so :func:`read_padded` pads a window at the border exactly as the whole image is padded;
    only the columns the windows read are held.
    One buffer for the whole scan: blocks from the worker threads are copied in and freed
    at once (kept as they came, their memory crept up with the scan's length: glibc's
    per-thread arenas fragment).
    """

    def __init__(self, shape: tuple[int, int, int], capacity: int, first: int, cols: tuple[int, int]) -> None:
        self.shape, self.cols = shape, cols
        self.ring = np.empty((shape[0], capacity, cols[1] - cols[0]), np.float32)  # (C, capacity, c1 - c0)
        self.lo = self.hi = first
        self._batch: torch.Tensor | None = None

    def _pieces(self, y0: int, y1: int) -> Iterator[tuple[int, int, int]]:
        """Rows ``[y0, y1)`` as ``(ring row, first row, end row)`` pieces (two where they wrap)."""
        capacity = self.ring.shape[1]
        while y0 < y1:
            r = y0 % capacity
            n = min(y1 - y0, capacity - r)
            yield r, y0, y0 + n
            y0 += n

    def append(self, l0: int, block: np.ndarray) -> None:
        """Rows ``[l0, l0 + r)`` of the model input ``(C, r, samples)``, in order."""
        assert l0 == self.hi and l0 + block.shape[1] - self.lo <= self.ring.shape[1], "ring overrun"
        for r, a, b in self._pieces(l0, l0 + block.shape[1]):
            self.ring[:, r : r + b - a] = block[:, a - l0 : b - l0]
        self.hi = l0 + block.shape[1]

    def drop_below(self, row: int) -> None:
        self.lo = min(max(self.lo, row), self.hi)

    def copy_into(self, dst: torch.Tensor, y0: int, y1: int, x0: int, x1: int) -> None:
        """``dst (C, y1 - y0, x1 - x0) <- input[:, y0:y1, x0:x1]`` (rows held by the band)."""
        assert self.lo <= y0 and y1 <= self.hi, "rows not in the band"
        c0, c1 = self.cols
        assert c0 <= x0 and x1 <= c1, "columns not in the band"
        out = dst.numpy()
        for r, a, b in self._pieces(y0, y1):
            out[:, a - y0 : b - y0] = self.ring[:, r : r + b - a, x0 - c0 : x1 - c0]

    def batch(self, n: int, height: int, width: int, pin: bool) -> torch.Tensor:
        """A float32 ``(n, C, height, width)`` tensor for windows, reused while their shape stays
        (a scan's windows are mostly of one shape: no fresh pages to fault in for every batch)."""
        shape = (self.shape[0], height, width)
        if self._batch is None or tuple(self._batch.shape[1:]) != shape or self._batch.shape[0] < n:
            self._batch = None  # free the old one first
            self._batch = torch.empty((n, *shape), pin_memory=pin)  # (n, C, h, w)
        return self._batch[:n]

    def __getitem__(self, key: tuple[slice, slice, slice]) -> torch.Tensor:
        _, ys, xs = key
        out = torch.empty(self.shape[0], ys.stop - ys.start, xs.stop - xs.start)  # (C, h, w)
        self.copy_into(out, ys.start, ys.stop, xs.start, xs.stop)
        return out


def _window_batch(band: _Band, reads: Sequence[Box], pin: bool) -> torch.Tensor:
    """The windows ``reads`` (all one size) as a float32 batch ``(B, C, h, w)``, valid until the next call."""
    y0, x0, y1, x1 = reads[0]
    _, lines, samples = band.shape
    x = band.batch(len(reads), y1 - y0, x1 - x0, pin)  # (B, C, h, w)
    for i, (y0, x0, y1, x1) in enumerate(reads):
        if y0 >= 0 and x0 >= 0 and y1 <= lines and x1 <= samples:
            band.copy_into(x[i], y0, y1, x0, x1)
        else:
            x[i] = read_padded(band, y0, x0, y1, x1, PAD_MODE)
    return x


class _Fp32Head(nn.Module):
    """A U-Net's 1x1 head outside autocast: its input cast back to float32, its output float32."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.head(x.float())  # (B, T, h, w) float32


@contextmanager
def _precision(model: nn.Module, run: _Settings) -> Iterator[None]:
    """bf16 autocast on CUDA with every U-Net head in float32 (``amp``); nothing otherwise."""
    nets = [m for m in model.modules() if isinstance(m, UNet)] if run.amp else []
    for net in nets:
        net.head = _Fp32Head(net.head)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16) if run.amp else nullcontext():
            yield
    finally:
        for net in nets:
            net.head = net.head.head


def _forward(model: nn.Module, x: torch.Tensor, run: _Settings) -> np.ndarray:
    """``(B, C, h, w)`` windows -> ``(B, T, h', w')`` outputs on the CPU (float32, or the model's float64)."""
    param = next(model.parameters(), None)
    x = x.to(device=run.device, dtype=param.dtype if param is not None else x.dtype, non_blocking=True)
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = model(x)  # (B, T, h', w')
    y = y if y.dtype in (torch.float32, torch.float64) else y.float()
    if run.device.type == "cpu":
        release_freed_memory()  # the activations are free: no growth from window to window
    return y.cpu().numpy()


def _run_jobs(
    model: nn.Module, band: _Band, jobs: Sequence[_Job], run: _Settings, keep_from: int
) -> Iterator[tuple[_Job, np.ndarray]]:
    """Each job with its output over ``job.keep`` ``(T, h, w)``; one model call per window shape.

    Once the windows are copied out, the band's rows above ``keep_from`` (no later window
    reads them) go, before the model runs: its activations are the largest allocation.
    """
    shapes: dict[tuple[int, int], list[_Job]] = {}
    for job in jobs:
        shapes.setdefault((job.read[2] - job.read[0], job.read[3] - job.read[1]), []).append(job)
    pin = run.device.type == "cuda"
    batches = [(group, _window_batch(band, [j.read for j in group], pin)) for group in shapes.values()]
    band.drop_below(keep_from)
    for group, x in batches:
        for job, out in zip(group, _forward(model, x, run), strict=True):
            (oy, ox), (y0, x0, y1, x1) = job.origin, job.keep
            yield job, out[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox]


# ----------------------------------------------------------------------------- output


class _Rows:
    """Output rows ``[lo, lo + len)`` being built: weighted sums and weights, float64.

    Exact tiles are assigned with weight 1 (each pixel has one tile); blended windows add.
    A pixel no window covers (outside the mask, region ``tissue``) comes out NaN.
    """

    def __init__(self, samples: int) -> None:
        self.lo = 0
        self.num = np.zeros((0, 0, samples))  # (T, rows, samples)
        self.den = np.zeros((0, samples))  # (rows, samples)

    def _grow(self, upto: int, targets: int) -> None:
        have = self.lo + self.den.shape[0]
        if upto > have:  # grow downwards
            w = self.den.shape[1]
            self.num = np.concatenate(
                [self.num.reshape(targets, -1, w), np.zeros((targets, upto - have, w))], 1
            )
            self.den = np.concatenate([self.den, np.zeros((upto - have, w))])

    def add(self, keep: Box, values: np.ndarray, weight: np.ndarray | None) -> None:
        y0, x0, y1, x1 = keep
        self._grow(y1, values.shape[0])
        rows = slice(y0 - self.lo, y1 - self.lo)
        if weight is None:
            self.num[:, rows, x0:x1] = values
            self.den[rows, x0:x1] = 1.0
        else:
            self.num[:, rows, x0:x1] += values * weight
            self.den[rows, x0:x1] += weight

    def take(self, upto: int, mask: np.ndarray, targets: int) -> np.ndarray:
        """Rows ``[lo, upto)`` (final: no later window touches them), ``(T, upto - lo, samples)``;
        ``mask``: the scan's, whose pixels must all be covered."""
        self._grow(upto, targets)
        k = upto - self.lo
        covered = self.den[:k] > 0
        assert k > 0 and covered[mask[self.lo : upto]].all(), "mask pixels not covered by windows"
        with np.errstate(invalid="ignore", divide="ignore"):
            done = np.where(covered, self.num[:, :k] / self.den[:k], np.nan)
        self.num, self.den, self.lo = self.num[:, k:], self.den[k:], upto
        return done


class _Writer:
    """The one writer of ``out``: rows masked (NaN outside), summed over the mask, written in whole
    chunks of ``out`` when it has chunks (a Zarr chunk must have one writer: DESIGN.md)."""

    def __init__(self, out: Any, mask: np.ndarray, source: str) -> None:
        self.out, self.mask, self.source = out, mask, source
        chunks = getattr(out, "chunks", None)
        self.chunk = int(chunks[1]) if isinstance(chunks, tuple) and isinstance(chunks[1], int) else None
        self.pending: list[np.ndarray] = []
        self.lo = self.hi = 0  # rows written to out, and rows received
        self.sums: np.ndarray | None = None

    def _ready(self, targets: int) -> None:
        lines, samples = self.mask.shape
        if self.out is None:
            self.out = np.full((targets, lines, samples), np.nan, np.float32)
        if tuple(self.out.shape) != (targets, lines, samples):
            raise InputError(
                f"{self.source}: out must have shape (targets, lines, samples) = "
                f"{(targets, lines, samples)}, got {tuple(self.out.shape)}"
            )
        self.sums = np.zeros(targets)

    def write(self, y0: int, rows: np.ndarray) -> None:
        """Map rows ``[y0, y0 + r)`` ``(T, r, samples)``, in order."""
        assert y0 == self.hi, "rows arrive in order"
        if self.sums is None:
            self._ready(rows.shape[0])
        m = self.mask[y0 : y0 + rows.shape[1]]
        rows = np.where(m[None], rows, np.nan).astype(np.float32)  # (T, r, samples)
        self.sums += rows[:, m].sum(axis=1, dtype=np.float64)
        self.pending.append(rows)
        self.hi = y0 + rows.shape[1]
        self._flush(self.hi if self.chunk is None else self.hi // self.chunk * self.chunk)

    def close(self) -> None:
        self._flush(self.hi)

    def _flush(self, upto: int) -> None:
        if upto <= self.lo:
            return
        block = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending, axis=1)
        k = upto - self.lo
        self.out[:, self.lo : upto, :] = block[:, :k]
        self.pending = [block[:, k:]] if k < block.shape[1] else []
        self.lo = upto


# ----------------------------------------------------------------------------- the map pass


def _suffix_min(values: Sequence[int], last: int) -> list[int]:
    """``out[i] = min(values[i:] + [last])``."""
    out = [last] * (len(values) + 1)
    for i in range(len(values) - 1, -1, -1):
        out[i] = min(values[i], out[i + 1])
    return out


def _blocks_ahead(jobs: Sequence[_Job], run: _Settings) -> int:
    """Blocks to preprocess while the model runs in the map pass.

    On CUDA: as far as a batch of windows reaches past the previous batch, so that the next
    batch's rows are ready when the GPU is done. On the CPU none: the model's parallel loops
    use every core, and a thread beside them would only stall them (the blocks are then
    preprocessed in parallel between model calls).
    """
    if not run.prefetch or run.device.type != "cuda":
        return 0
    reach = [max(j.rows[1] for j in jobs[i : i + run.batch]) for i in range(0, len(jobs), run.batch)]
    advance = max([b - a for a, b in itertools.pairwise(reach)] + [1])
    return -(-advance // run.block_lines)


def _capacity(jobs: Sequence[_Job], need_lo: Sequence[int], run: _Settings) -> int:
    """Rows the band must hold: a batch's rows from the first one a window still reads, plus
    two blocks (blocks arrive whole: the first may start up to a block above the rows read,
    the last may end up to a block below)."""
    spans = [
        max(j.rows[1] for j in jobs[i : i + run.batch]) - need_lo[i] for i in range(0, len(jobs), run.batch)
    ]
    return max(spans) + 2 * run.block_lines  # the first block may start a block above need_lo


def _cols_read(jobs: Sequence[_Job], samples: int) -> tuple[int, int]:
    """The scan's columns ``[c0, c1)`` the windows read, their border padding resolved."""
    lo, hi = samples, 0
    for job in jobs:
        src, _ = _source_index(job.read[1], job.read[3], samples, PAD_MODE)
        lo, hi = min(lo, int(src.min())), max(hi, int(src.max()) + 1)
    return lo, hi


def _fill(band: _Band, feed: _Feed, upto: int) -> np.ndarray:
    """Pull preprocessed blocks into the band until it holds row ``upto - 1``; their mask sums ``(C,)``."""
    sums = np.zeros(band.shape[0])
    for l0, z, block_sums in feed.upto(upto):
        band.append(l0, z)
        sums += block_sums
    assert band.hi >= upto
    return sums


def _map_pass(
    model: nn.Module,
    scan: _Scan,
    jobs: list[_Job],
    weights: np.ndarray | None,
    writer: _Writer,
    run: _Settings,
    progress: Progress | None,
) -> np.ndarray:
    """Run every window, write every output row; the cube summed over the mask ``(C,)``.

    ``weights``: the blending weights of a window's output ``(h', w')``; None: exact tiles.
    """
    assert scan.mask is not None
    need_lo = _suffix_min([j.rows[0] for j in jobs], scan.lines)  # first row any later window reads
    done_lo = _suffix_min([j.keep[0] for j in jobs], scan.lines)  # first row any later window writes
    block = run.block_lines
    first = min(j.rows[0] for j in jobs) // block * block  # rows above no window reads: not preprocessed
    spans = [span for span in _spans(scan.lines, block) if span[0] >= first]
    last = max(j.rows[1] for j in jobs)
    spans = [span for span in spans if span[0] < last]
    cols = _cols_read(jobs, scan.samples)
    band = _Band(
        (scan.recipe.n_channels, scan.lines, scan.samples), _capacity(jobs, need_lo, run), first, cols
    )
    rows = _Rows(scan.samples)
    spectrum = np.zeros(band.shape[0])
    feed = _Feed(partial(_map_block, scan, cols), spans, _workers(run), _blocks_ahead(jobs, run))
    targets = 0
    with closing(feed), _precision(model, run):
        for i in range(0, len(jobs), run.batch):
            chunk = jobs[i : i + run.batch]
            spectrum += _fill(band, feed, max(j.rows[1] for j in chunk))
            for job, values in _run_jobs(model, band, chunk, run, need_lo[i + len(chunk)]):
                (oy, ox), (y0, x0, y1, x1) = job.origin, job.keep
                w = None if weights is None else weights[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
                rows.add(job.keep, values, w)
                targets = values.shape[0]
            upto = done_lo[i + len(chunk)]
            if upto > rows.lo:
                writer.write(rows.lo, rows.take(upto, scan.mask, targets))
                if progress is not None:
                    progress(scan.lines + upto, 2 * scan.lines)
        spectrum += _fill(band, feed, spans[-1][1])  # rows no window reads (none, normally)
    writer.close()
    return spectrum


def _plan(model: nn.Module, geometry: Geometry, scan: _Scan, run: _Settings) -> tuple[list[_Job], Any]:
    """The mode's windows, and the blending weights of a window's output (None: exact).

    Region ``tissue`` plans them around the scan's mask (known after the mask pass): pixels
    outside it are NaN in the map whatever the model says there.
    """
    mask = scan.mask if run.region == "tissue" else None
    if run.mode == "exact":
        return _exact_jobs(model, geometry, scan.lines, scan.samples, run.tile, mask), None
    if mask is None:
        window = window_shape(model, geometry, scan.lines, scan.samples, run.tile)
    else:
        y0, x0, y1, x1 = _region(mask, geometry.stride)  # type: ignore[misc]
        tile = _grid_tile(run.tile, geometry.stride, scan.lines, scan.samples)
        window = _fitted_window(
            model, geometry, scan.lines, scan.samples, tile, (y1 - y0, x1 - x0), run.overlap
        )
    jobs = _blend_jobs(geometry, scan.lines, scan.samples, window, run.overlap, mask)
    out_shape = (window[0] - 2 * geometry.margin, window[1] - 2 * geometry.margin)
    return jobs, importance_map(out_shape, run.mode, run.sigma_scale)


@functools.cache
def _libc() -> Any | None:
    """The C library, where it has glibc's ``mallopt`` and ``malloc_trim``; None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and libc.mallopt and libc.malloc_trim else None
    except (OSError, AttributeError):
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc reuse the memory of freed activations instead of unmapping it (once per process).

    A window's activations are tensors of tens to hundreds of MB. glibc maps every block
    larger than its mmap threshold (at most 32 MiB by default) afresh and unmaps it when
    freed, so each layer of each window faults its output's pages in again. Raising the mmap
    and trim thresholds to :data:`KEEP_FREED` keeps them in the heap for the next layer.
    Kept across windows, though, the heap fragments and grows with the scan, so the map pass
    hands the free pages back after every model call (:func:`release_freed_memory`).
    On the 2-core CPU (docs/benchmarks.md, Scoring) exact scoring of the paper-size scan went
    from 14.2 to 12.3 s, and its peak RSS increase from 2058 to 2575 MiB. False where the C
    library is not glibc: nothing changes there.
    """
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, KEEP_FREED)) and bool(
        libc.mallopt(m_trim_threshold, KEEP_FREED)
    )


def release_freed_memory() -> None:
    """The heap's free pages back to the OS (glibc's ``malloc_trim``), where
    :func:`keep_freed_memory` kept them; nothing (and no setting changed) where it has not run."""
    libc = _libc()
    if libc is not None and keep_freed_memory.cache_info().currsize and keep_freed_memory():
        libc.malloc_trim(0)


def _prepare_model(model: nn.Module, run: _Settings) -> nn.Module:
    """The model on ``run.device`` (moved in place), channels-last if asked; on the CPU, freed
    activations kept for reuse (:func:`keep_freed_memory`)."""
    if run.device.type == "cpu":
        keep_freed_memory()
    param = next(model.parameters(), None)
    if param is not None and param.device != run.device:
        model.to(run.device)
    if run.channels_last:
        channels_last_2d(model)
    return model


def stream_scan(
    model: nn.Module,
    recipe: Recipe,
    raw: Any,
    white_mean: Any | None,
    dark_mean: Any | None,
    *,
    saturation: float,
    out: Any = None,
    mode: str = "exact",
    region: str = "tissue",
    tile: int | Sequence[int] = TILE_CORE,
    overlap: float = OVERLAP,
    sigma_scale: float = SIGMA_SCALE,
    batch: int = BATCH,
    device: str | torch.device = "cpu",
    amp: bool = False,
    channels_last: bool | None = None,
    geometry: Geometry | None = None,
    mask_file: Path | None = None,
    block_lines: int | None = None,
    prefetch: bool = True,
    progress: Progress | None = None,
    source: str = "scan",
    spill: bool | str | os.PathLike = True,
) -> StreamResult:
    """The maps of a raw scan of any length, read by blocks of lines (never whole): a :class:`StreamResult`.

    Args:
        model: the fold ensemble (or one U-Net) of ``recipe``, in eval mode; moved to
            ``device`` (and to channels-last with ``channels_last``) in place.
        recipe: the bundle's preprocessing recipe, with normalisation statistics.
        raw: ``(bands, lines, samples)`` counts, every raw band, read as ``raw[b0:b1, l0:l1]`` and
            ``raw[b0:b1, l0:l1, c0:c1]`` (slices; Dask or NumPy): the recipe's band span only.
        white_mean, dark_mean: ``(bands, samples)`` :func:`~chemmap.preprocess.scan.reference_means`.
        saturation: counts at or above this are saturated.
        out: a float32 ``(targets, lines, samples)`` array-like taking ``out[:, y0:y1, :] = rows``
            (a Zarr array one tile row per chunk: each written once, whole); None: NumPy.
        mode: ``"exact"`` (default; equals the whole-image map), ``"gaussian"`` or ``"constant"``
            (blended windows, like MONAI's ``sliding_window_inference``).
        region: ``"tissue"`` (default): windows around the sample mask only (see the module's
            docstring); ``"scan"``: over the whole scan, as MONAI places them.
        tile: exact core side, or ``(rows, columns)``, px; rounded up to the stride grid and
            clipped to the scan. Blended modes use windows of :func:`window_shape` of it.
        overlap, sigma_scale: blended modes: share of a window its neighbour overlaps, in [0, 1);
            gaussian: sigma of the weights as a share of the window side.
        batch: windows per model call (exact: border windows of another shape go apart).
        device: where the model runs (e.g. ``"cuda"``).
        amp, channels_last: bf16 autocast (CUDA only) and channels-last format (None: on CPU only).
            The U-Net heads (1x1 convolutions) run outside autocast on float32 input: the map is
            float32 from bf16 features (up-sampling and ensemble mean in float32).
        geometry: the model's tiling geometry (measured with :func:`model_geometry` if None).
        mask_file: the scan's mask image (``mask.method: files``).
        block_lines: raw lines read and preprocessed at a time; None: a Dask array's lines per
            chunk (:func:`chemmap.io.open_scan`'s ``chunk_lines``), else 64.
        prefetch: read and preprocess the next blocks in a background thread while computing.
        progress: called with ``(done, 2 * lines)``: lines of the mask pass, then of the map.
        source: what error messages call the scan.
        spill: keep the mask pass's cube in an unlinked temporary file for the map pass (in this
            folder; True: the system's, while its file cache holds it; see :class:`_Spill`), so
            the raw scan is read once; False: the map pass reads the raw scan again.

    Raises:
        InputError: a bad option, a scan unlike the recipe, no sample pixel, or a non-finite one.
    """
    block = _block_lines(raw, block_lines)
    run = _settings(
        mode, region, tile, overlap, batch, device, amp, channels_last, block, prefetch, sigma_scale
    )
    scan = _scan(raw, white_mean, dark_mean, recipe, saturation, source)
    model = _prepare_model(model, run)
    geometry = model_geometry(model, recipe.n_channels) if geometry is None else geometry
    if spill is not True and spill is not False and not Path(spill).is_dir():
        raise InputError(f"{source}: spill must be True, False or an existing folder, got {spill!r}")
    scan = replace(scan, spill=_Spill.open(spill, recipe.n_channels, scan.lines, scan.samples))
    try:
        return _passes(model, geometry, scan, run, out, mask_file, source, progress)
    finally:
        if scan.spill is not None:
            scan.spill.close()


def _passes(
    model: nn.Module,
    geometry: Geometry,
    scan: _Scan,
    run: _Settings,
    out: Any,
    mask_file: Path | None,
    source: str,
    progress: Progress | None,
) -> StreamResult:
    """The mask pass, the windows' plan and the map pass of :func:`stream_scan`."""
    t0 = time.perf_counter()
    scan, bad_removed, saturated = _mask_pass(scan, run, mask_file, source, progress)
    t1 = time.perf_counter()
    assert scan.mask is not None
    jobs, weights = _plan(model, geometry, scan, run)
    writer = _Writer(out, scan.mask, source)
    spectrum = _map_pass(model, scan, jobs, weights, writer, run, progress)
    pixels, read = int(scan.mask.sum()), sum((j.read[2] - j.read[0]) * (j.read[3] - j.read[1]) for j in jobs)
    assert writer.sums is not None
    return StreamResult(
        writer.out, scan.mask, bad_removed, saturated, spectrum / pixels, pixels, writer.sums,
        mask_seconds=t1 - t0, map_seconds=time.perf_counter() - t1, windows=len(jobs), window_pixels=read,
        spilled=scan.spill is not None,
    )  # fmt: skip
