"""Streamed scoring equals the in-memory path, reads the scan by blocks and keeps memory flat.

The reference for ``exact`` is :func:`chemmap.inference.mapping.map_arrays` (the whole raw
scan in memory, the whole-image model pass). The reference for the blended modes is written
here in plain NumPy: every window run alone, weighted, summed, divided.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from chemmap.config import MaskConfig, PreprocessConfig
from chemmap.errors import InputError
from chemmap.inference.mapping import map_arrays
from chemmap.inference.stream import importance_map, stream_scan, window_shape
from chemmap.io import open_scan
from chemmap.io.envi import create_envi
from chemmap.models.tiling import Geometry, model_geometry
from chemmap.models.unet import UNet, UNetConfig
from chemmap.preprocess.recipe import Recipe
from chemmap.preprocess.scan import model_input, transform

BANDS = 300  # the VNIR camera's raw bands: 124 kept (>= 750 nm), binned by 2 -> 62 channels
WAVELENGTHS = np.linspace(400.0, 1000.0, BANDS)
WHITE, DARK, CEILING = 3000.0, 100.0, 4095
LINES, SAMPLES = 133, 97  # odd sizes, several 32 px tiles tall and wide
FP32 = 1e-5  # relative norm, float32 maps (DESIGN.md, "Exact tiling"; tests/models/test_tiling.py)


def _recipe() -> Recipe:
    config = PreprocessConfig(wavelength_min=750, bin=2, mask=MaskConfig(min_size=16))
    recipe = Recipe.create(config, WAVELENGTHS)
    return recipe.with_stats(np.full(recipe.n_channels, 0.35), np.full(recipe.n_channels, 0.12))


def _counts(l0: int, l1: int, samples: int, dtype: type = np.uint16) -> np.ndarray:
    """Raw counts ``(BANDS, l1 - l0, samples)`` of a belt of bellies, a pure function of the line.

    Bellies 48 lines long every 64 lines, 6 px in from the belt's edges; meat reflectance
    0.3-0.6 with a spectral slope and pseudo-random texture; belt 0.05; a few glare pixels
    saturated in some bands (they leave the mask).
    """
    y = np.arange(l0, l1)[None, :, None].astype(np.float64)
    x = np.arange(samples)[None, None, :].astype(np.float64)
    b = np.arange(BANDS)[:, None, None].astype(np.float64)
    texture = np.modf(np.sin(y * 12.9898 + x * 78.233) * 43758.5453)[0] ** 2  # (1, lines, samples)
    meat = ((y % 64) >= 8) & ((y % 64) < 56) & (x >= 6) & (x < samples - 6)
    refl = np.where(meat, 0.3 + 0.3 * texture + 0.05 * np.cos(b / 40 + x / 9), 0.05)
    counts = DARK + refl * (WHITE - DARK)
    glare = meat & ((y * 7 + x * 13) % 211 == 0) & (b > 200) & (b < 260)
    return np.where(glare, CEILING, np.rint(counts)).astype(dtype)


class Lines:
    """A raw scan ``(bands, lines, samples)`` made on demand, block by block; logs every read."""

    def __init__(self, lines: int, samples: int, dtype: type = np.uint16) -> None:
        self.shape = (BANDS, lines, samples)
        self.dtype = np.dtype(dtype)
        self.reads: list[tuple[int, int]] = []
        self.bands: set[tuple[int, int]] = set()  # the band ranges asked for

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        bands, rows, *cols = key  # (bands, lines) or (bands, lines, samples), slices
        assert rows.step is None, key
        l0, l1, _ = rows.indices(self.shape[1])
        self.reads.append((l0, l1))
        self.bands.add(bands.indices(self.shape[0])[:2])
        return self._block(l0, l1)[bands][..., cols[0] if cols else slice(None)]

    def _block(self, l0: int, l1: int) -> np.ndarray:
        return _counts(l0, l1, self.shape[2], self.dtype)


def _refs(samples: int) -> tuple[np.ndarray, np.ndarray]:
    """White and dark reference means ``(bands, samples)``."""
    return np.full((BANDS, samples), WHITE), np.full((BANDS, samples), DARK)


def _unet(dtype: torch.dtype = torch.float32, **kwargs) -> UNet:
    torch.manual_seed(3)
    config = {"in_channels": 62, "depth": 2, "features": 4, "front_end": True, **kwargs}
    return UNet(UNetConfig(**config)).eval().to(dtype)


def _whole(model: nn.Module, lines: int = LINES, samples: int = SAMPLES):
    """``map_arrays`` on the whole raw scan in memory (the references as 2-line recordings)."""
    white, dark = _refs(samples)
    refs = [np.repeat(r[:, None], 2, axis=1) for r in (white, dark)]  # (bands, 2, samples)
    return map_arrays(model, _recipe(), _counts(0, lines, samples), *refs, saturation=CEILING)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Relative norm of the difference, over the pixels both maps have (NaN where both are)."""
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(b)
    return float(np.linalg.norm(a[ok] - b[ok]) / np.linalg.norm(b[ok]))


class Rows:
    """An ``out`` with chunks one tile row tall that logs every write, like a Zarr array would take it."""

    def __init__(self, shape: tuple[int, int, int], chunk: int) -> None:
        self.shape, self.chunks = shape, (shape[0], chunk, shape[2])
        self.data = np.full(shape, -1.0, np.float32)
        self.writes: list[tuple[int, int]] = []

    def __setitem__(self, key: tuple[slice, slice, slice], rows: np.ndarray) -> None:
        self.writes.append((key[1].start, key[1].stop))
        self.data[key] = rows


# ----------------------------------------------------------------------------- exact


@pytest.mark.parametrize(
    ("kwargs", "dtype", "bound"),
    [
        ({}, torch.float32, FP32),
        ({"pad": False}, torch.float32, FP32),
        ({"depth": 3, "front_end": False, "out_channels": 2}, torch.float32, FP32),
        ({}, torch.float64, 1e-7),  # float64 model, float32 maps: the cast's rounding only
    ],
)
def test_exact_stream_equals_the_whole_image_map(kwargs: dict, dtype: torch.dtype, bound: float) -> None:
    model = _unet(dtype, **kwargs)
    ref = _whole(model)
    raw = Lines(LINES, SAMPLES)
    out = Rows((model.config.out_channels, LINES, SAMPLES), chunk=32)
    res = stream_scan(
        model, _recipe(), raw, *_refs(SAMPLES), saturation=CEILING, out=out, region="scan", tile=32, batch=3,
        block_lines=16,
    )  # fmt: skip
    assert res.maps is out and rel(out.data, ref.maps) < bound
    assert np.array_equal(res.mask, ref.mask) and res.bad_removed == ref.bad_removed > 0
    assert res.saturated == pytest.approx(ref.saturated.mean())
    np.testing.assert_allclose(res.sums, np.nansum(ref.maps, axis=(1, 2), dtype=np.float64), rtol=1e-6)
    # Reads: never more than a block, every line once (the map pass reads the mask pass's spill
    # file), the recipe's bands only (>= 750 nm).
    assert max(l1 - l0 for l0, l1 in raw.reads) == 16 and sum(l1 - l0 for l0, l1 in raw.reads) == LINES
    assert res.spilled
    assert raw.bands == {_recipe().band_span} and _recipe().band_span[0] > 0
    # Writes: whole chunks (the last one partial), each once, in order.
    assert out.writes == [(y, min(y + 32, LINES)) for y in range(0, LINES, 32)]
    cube = np.asarray(transform(_counts(0, LINES, SAMPLES), *_refs(SAMPLES), _recipe(), CEILING).cube)
    np.testing.assert_allclose(res.mean_spectrum, cube[:, ref.mask].mean(axis=1, dtype=np.float64), rtol=1e-6)
    assert res.mask_pixels == ref.mask.sum() and res.windows == 20  # 5 tile rows x 4 tile columns


def test_exact_stream_from_an_envi_file_into_zarr(tmp_path) -> None:
    """A real BIL file through ``open_scan`` (Dask blocks) into a Zarr array one tile row per chunk."""
    import zarr

    hdr = tmp_path / "scan.hdr"
    mm = create_envi(hdr, bands=BANDS, lines=LINES, samples=SAMPLES, wavelengths=WAVELENGTHS)
    mm[:] = _counts(0, LINES, SAMPLES).transpose(1, 0, 2)  # (lines, bands, samples): BIL
    mm.flush()
    del mm
    scan = open_scan(hdr, chunk_lines=24)
    model = _unet(depth=3)  # radius 52 px behind the front-end: border windows clipped, two shapes
    out = zarr.create_array(
        tmp_path / "map.zarr", shape=(1, LINES, SAMPLES), chunks=(1, 40, SAMPLES), dtype="float32"
    )
    res = stream_scan(model, _recipe(), scan.data, *_refs(SAMPLES), saturation=CEILING, out=out, tile=40)
    ref = _whole(model)
    assert rel(out[...], ref.maps) < FP32 and np.array_equal(res.mask, ref.mask)


def test_prefetch_batching_and_channels_last_change_nothing() -> None:
    args = (_recipe(), Lines(LINES, SAMPLES), *_refs(SAMPLES))
    a = stream_scan(
        _unet(), *args, saturation=CEILING, region="scan", tile=32, batch=1, prefetch=False, block_lines=7
    )
    model = _unet()
    b = stream_scan(
        model, *args, saturation=CEILING, region="scan", tile=(32, 64), batch=8, block_lines=50,
        channels_last=False,
    )  # fmt: skip
    assert rel(a.maps, b.maps) < FP32 and a.windows == 20 and b.windows == 10
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and not any(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


@pytest.mark.parametrize("region", ["scan", "tissue"])
def test_the_spill_file_changes_nothing_and_a_failed_one_falls_back_to_the_raw(
    region: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The map pass from the spill file, from the raw scan read again, and from the raw after
    the spill's disk filled up: the same maps and mean spectrum, bit for bit."""
    kwargs = {"saturation": CEILING, "region": region, "tile": 32, "block_lines": 16}
    runs, reads = {}, {}
    for spill in (True, tmp_path, False, "full"):
        raw = Lines(LINES, SAMPLES)
        with monkeypatch.context() as m:
            if spill == "full":

                def no_room(*args: object) -> int:
                    raise OSError(28, "No space left on device")

                m.setattr(os, "pwrite", no_room)
            res = stream_scan(
                _unet(), _recipe(), raw, *_refs(SAMPLES), spill=True if spill == "full" else spill, **kwargs
            )
        runs[str(spill)], reads[str(spill)] = res, sum(l1 - l0 for l0, l1 in raw.reads)
        assert res.spilled == (spill not in (False, "full"))
    assert list(tmp_path.iterdir()) == []  # the spill file is unlinked from the start
    first = runs["True"]
    for res in runs.values():
        assert np.array_equal(res.maps, first.maps, equal_nan=True)
        assert np.array_equal(res.mean_spectrum, first.mean_spectrum) and np.array_equal(res.sums, first.sums)
    assert reads["True"] == reads[str(tmp_path)] == LINES
    assert reads["False"] == reads["full"] > LINES  # the raw scan read again


def test_by_default_the_spill_file_stays_within_what_the_kernel_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cube larger than the dirty data Linux keeps in memory would be written to disk while the
    scan is scored: by default the map pass then reads the raw again; a folder named
    explicitly is used anyway."""
    import chemmap.inference.stream as stream

    assert stream._writeback_threshold() > 62 * LINES * SAMPLES * 4  # this scan's cube: spilled
    monkeypatch.setattr(stream, "_writeback_threshold", lambda: 62 * LINES * SAMPLES * 4 - 1)
    kwargs = {"saturation": CEILING, "tile": 32}
    default = stream_scan(_unet(), _recipe(), Lines(LINES, SAMPLES), *_refs(SAMPLES), **kwargs)
    named = stream_scan(_unet(), _recipe(), Lines(LINES, SAMPLES), *_refs(SAMPLES), spill=tmp_path, **kwargs)
    assert not default.spilled and named.spilled
    assert np.array_equal(default.maps, named.maps, equal_nan=True)

    # A folder where no file can be made (e.g. read-only): one line naming it if it was named,
    # the raw scan read again if it was the system's temporary folder.
    def refused(*args: object, **kw: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(stream.tempfile, "TemporaryFile", refused)
    monkeypatch.setattr(stream, "_writeback_threshold", lambda: 2**40)
    with pytest.raises(InputError, match=f"spill folder {tmp_path}: cannot create a file there"):
        stream_scan(_unet(), _recipe(), Lines(LINES, SAMPLES), *_refs(SAMPLES), spill=tmp_path, **kwargs)
    fallback = stream_scan(_unet(), _recipe(), Lines(LINES, SAMPLES), *_refs(SAMPLES), **kwargs)
    assert not fallback.spilled and np.array_equal(fallback.maps, named.maps, equal_nan=True)


def test_channels_last_is_the_cpu_default() -> None:
    """On the CPU the model runs channels-last unless told not to (faster there, same maps)."""
    model = _unet()
    stream_scan(model, _recipe(), Lines(LINES, SAMPLES), *_refs(SAMPLES), saturation=CEILING, tile=32)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_a_halo_one_stride_short_is_not_exact() -> None:
    """The exactness check can fail: with the halo one stride below the measured radius it does."""
    model = _unet()
    geometry = model_geometry(model)
    short = replace(geometry, radius=geometry.radius - geometry.stride)
    res = stream_scan(model, _recipe(), Lines(LINES, SAMPLES), *_refs(SAMPLES), saturation=CEILING, tile=32,
                      geometry=short)  # fmt: skip
    assert rel(res.maps, _whole(model).maps) > 100 * FP32


# ----------------------------------------------------------------------------- blended


class WindowAware(nn.Module):
    """A known predictor whose output depends on the window: ``2 x`` summed over channels, plus
    the window's mean. Every window adds a different constant, so a blend shows its positions
    and weights (a predictor without the mean would blend to ``2 sum(x)`` whatever they were)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x.sum(1, keepdim=True) + x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, H, W)


def _starts(n: int, size: int, overlap: float, stride: int) -> list[int]:
    """Window starts: MONAI's rule (every ``int(size * (1 - overlap))`` px, the last flush with the
    end) with steps and the last start rounded to the stride grid (down and up)."""
    if size >= n:
        return [0]
    step = max(stride, int(size * (1 - overlap)) // stride * stride)
    starts = []
    while starts == [] or starts[-1] + size < n:
        starts.append(min(len(starts) * step, -(-(n - size) // stride) * stride))
    return starts


def _blend_reference(
    model: nn.Module,
    x: np.ndarray,
    size: tuple[int, int],
    overlap: float,
    mode: str,
    stride: int = 1,
    margin: int = 0,
) -> np.ndarray:
    """Plain weighted window blending of ``model`` over ``x (C, H, W)``: ``(T, H, W)`` float64.

    Windows put out ``size`` pixels and read ``margin`` more on every side; beyond the image
    they see its reflection (``np.pad``). Each window's output is weighted with MONAI's
    importance map (written out here again), summed, and divided by the summed weights.
    """
    _, h, w = x.shape
    big = np.pad(x, ((0, 0), (h, h), (w, w)), mode="reflect")
    sy, sx = size
    if mode == "gaussian":
        gy, gx = (np.exp(-((np.arange(n) - (n - 1) / 2) ** 2) / (2 * (0.125 * n) ** 2)) for n in size)
        weight = np.outer(gy, gx)
        weight = np.maximum(weight, max(weight.min(), 1e-3))
    else:
        weight = np.ones(size)
    num, den = 0.0, np.zeros((h, w))
    for y0 in _starts(h, sy, overlap, stride):
        for x0 in _starts(w, sx, overlap, stride):
            a, b = h + y0 - margin, w + x0 - margin
            patch = torch.from_numpy(big[None, :, a : a + sy + 2 * margin, b : b + sx + 2 * margin].copy())
            with torch.no_grad():
                out = model(patch.to(torch.float32))[0].double().numpy()  # (T, sy, sx)
            ky, kx = min(sy, h - y0), min(sx, w - x0)
            pad = np.zeros((out.shape[0], h, w))
            pad[:, y0 : y0 + ky, x0 : x0 + kx] = (out * weight)[:, :ky, :kx]
            num = num + pad
            den[y0 : y0 + ky, x0 : x0 + kx] += weight[:ky, :kx]
    return num / den


@pytest.mark.parametrize(("mode", "overlap"), [("gaussian", 0.25), ("constant", 0.25), ("gaussian", 0.6)])
def test_blended_stream_equals_plain_window_blending(mode: str, overlap: float) -> None:
    recipe = _recipe()
    model, geometry = WindowAware(), Geometry(radius=0, stride=1)
    x = model_input(
        np.asarray(transform(_counts(0, LINES, SAMPLES), *_refs(SAMPLES), recipe, CEILING).cube), recipe
    )
    res = stream_scan(
        model,
        recipe,
        Lines(LINES, SAMPLES),
        *_refs(SAMPLES),
        saturation=CEILING,
        mode=mode,
        region="scan",
        overlap=overlap,
        tile=(24, 20),
        geometry=geometry,
        batch=5,
        block_lines=16,
    )
    assert window_shape(model, geometry, LINES, SAMPLES, (24, 20)) == (24, 20)
    ref = np.where(res.mask, _blend_reference(model, x, (24, 20), overlap, mode), np.nan)
    assert rel(res.maps, ref) < FP32
    plain = np.where(res.mask, 2 * x.sum(0), np.nan)[None]
    assert rel(res.maps, plain) > 100 * FP32  # the window means show: the check can fail


def test_gaussian_weights_are_monais() -> None:
    monai_utils = pytest.importorskip("monai.data.utils")
    theirs = monai_utils.compute_importance_map((40, 27), mode="gaussian", sigma_scale=0.125)
    np.testing.assert_allclose(importance_map((40, 27), "gaussian"), theirs.numpy(), rtol=1e-6)


def test_gaussian_stream_equals_monai_sliding_window_inference_on_the_cube() -> None:
    """With a stride-1 model MONAI's window positions are ours: the same map (float32 accumulation)."""
    inferers = pytest.importorskip("monai.inferers")
    recipe = _recipe()
    model = WindowAware()
    x = model_input(
        np.asarray(transform(_counts(0, LINES, SAMPLES), *_refs(SAMPLES), recipe, CEILING).cube), recipe
    )
    with torch.no_grad():
        theirs = inferers.sliding_window_inference(
            torch.from_numpy(x[None]), (24, 20), 4, model, overlap=0.25, mode="gaussian"
        )[0].numpy()  # (1, H, W)
    res = stream_scan(
        model, recipe, Lines(LINES, SAMPLES), *_refs(SAMPLES), saturation=CEILING, mode="gaussian",
        region="scan", tile=(24, 20), geometry=Geometry(radius=0, stride=1),
    )  # fmt: skip
    assert rel(res.maps, np.where(res.mask, theirs, np.nan)) < FP32


def test_blended_unet_with_valid_convolutions_on_its_stride_grid() -> None:
    """Margins (``pad=False``) and a stride grid of 4: windows start on it, the last one past the end."""
    recipe, model = _recipe(), _unet(pad=False)
    geometry = model_geometry(model)
    window = window_shape(model, geometry, LINES, SAMPLES, 16)
    size = (window[0] - 2 * model.margin, window[1] - 2 * model.margin)
    assert geometry.stride == 4 and model.margin == 16 and window == (56, 56)
    res = stream_scan(
        model, recipe, Lines(LINES, SAMPLES), *_refs(SAMPLES), saturation=CEILING, mode="gaussian",
        region="scan", tile=16, overlap=0.5, batch=2,
    )  # fmt: skip
    x = model_input(
        np.asarray(transform(_counts(0, LINES, SAMPLES), *_refs(SAMPLES), recipe, CEILING).cube), recipe
    )
    ref = _blend_reference(model, x, size, 0.5, "gaussian", stride=4, margin=16)
    assert rel(res.maps, np.where(res.mask, ref, np.nan)) < FP32


# ----------------------------------------------------------------------------- region "tissue"

ISLAND = (61, 37, 139, 101)  # one belly (y0, x0, y1, x1) on a 200 x 150 belt: the rest is belt


def _island(l0: int, l1: int, samples: int) -> np.ndarray:
    """``_counts`` with meat only inside :data:`ISLAND`; belt counts elsewhere."""
    counts = _counts(l0, l1, samples)
    y = np.arange(l0, l1)[:, None]
    x = np.arange(samples)[None, :]
    inside = (y >= ISLAND[0]) & (y < ISLAND[2]) & (x >= ISLAND[1]) & (x < ISLAND[3])
    belt = np.uint16(round(DARK + 0.05 * (WHITE - DARK)))
    return np.where(inside[None], counts, belt)


class Island(Lines):
    def _block(self, l0: int, l1: int) -> np.ndarray:
        return _island(l0, l1, self.shape[2])


@pytest.mark.parametrize("model_kwargs", [{}, {"pad": False}])
def test_tissue_region_exact_is_the_whole_image_map_from_fewer_windows(model_kwargs: dict) -> None:
    lines, samples = 200, 150
    model = _unet(**model_kwargs)
    white, dark = _refs(samples)
    refs = [np.repeat(r[:, None], 2, axis=1) for r in (white, dark)]  # (bands, 2, samples)
    ref = map_arrays(model, _recipe(), _island(0, lines, samples), *refs, saturation=CEILING)
    ys, xs = np.nonzero(ref.mask)
    assert ys.min() >= ISLAND[0] and ys.max() < ISLAND[2] and xs.min() >= ISLAND[1] and xs.max() < ISLAND[3]
    kwargs = {"saturation": CEILING, "tile": 32, "block_lines": 16}
    raw = Island(lines, samples)
    tissue = stream_scan(model, _recipe(), raw, white, dark, spill=False, **kwargs)
    scan = stream_scan(model, _recipe(), Island(lines, samples), white, dark, region="scan", **kwargs)
    assert rel(tissue.maps, ref.maps) < FP32 and rel(scan.maps, ref.maps) < FP32
    assert np.isnan(tissue.maps[:, ~ref.mask]).all()
    assert tissue.windows < scan.windows and tissue.window_pixels < 0.6 * scan.window_pixels
    assert sum(l1 - l0 for l0, l1 in raw.reads) < 2 * lines  # the map pass skips lines no window reads
    np.testing.assert_allclose(tissue.sums, scan.sums, rtol=1e-6)
    np.testing.assert_allclose(tissue.mean_spectrum, scan.mean_spectrum, rtol=1e-6)


@pytest.mark.parametrize("block_lines", [5, 13, 29, 64])
def test_tissue_region_any_block_size_fits_the_band(block_lines: int) -> None:
    """Blocks of lines that start above the first row read and end below the last (the ring
    once overran by a block on a paper-size scan): every block size gives the same map."""
    lines, samples = 200, 150
    model = _unet(depth=3)
    white, dark = _refs(samples)
    kwargs = {"saturation": CEILING, "tile": (40, samples), "batch": 1, "block_lines": block_lines}
    ref = stream_scan(model, _recipe(), Island(lines, samples), white, dark, block_lines=200, tile=40,
                      saturation=CEILING)  # fmt: skip
    for mode in ("exact", "gaussian"):
        res = stream_scan(model, _recipe(), Island(lines, samples), white, dark, mode=mode, **kwargs)
        assert rel(res.maps, ref.maps) < (FP32 if mode == "exact" else 0.5)


def _fitted(n: int, size: int, overlap: float) -> int:
    """The smallest window covering ``n`` px in as few windows as ``size``'s (stride 1)."""
    need = len(_starts(n, size, overlap, 1))
    return min(w for w in range(1, size + 1) if len(_starts(n, w, overlap, 1)) <= need)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_tissue_region_blends_windows_fitted_to_the_mask(mode: str) -> None:
    """Blended windows start at the mask's box and are shrunk to cover it evenly: the map equals
    plain blending of those windows (computed here from the mask alone)."""
    lines, samples, overlap, tile = 200, 150, 0.25, (48, 40)
    recipe, model, geometry = _recipe(), WindowAware(), Geometry(radius=0, stride=1)
    white, dark = _refs(samples)
    x = model_input(
        np.asarray(transform(_island(0, lines, samples), white, dark, recipe, CEILING).cube), recipe
    )
    res = stream_scan(
        model, recipe, Island(lines, samples), white, dark, saturation=CEILING, mode=mode, overlap=overlap,
        tile=tile, geometry=geometry, batch=3, block_lines=16,
    )  # fmt: skip
    ys, xs = np.nonzero(res.mask)
    y0, x0, y1, x1 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    size = (_fitted(y1 - y0, tile[0], overlap), _fitted(x1 - x0, tile[1], overlap))
    assert size[0] < tile[0] and size[1] < tile[1]  # the box is not a whole number of windows
    box = x[:, y0:y1, x0:x1]  # windows inside the box read nothing else with stride 1, radius 0
    ref = np.full((1, lines, samples), np.nan)
    ref[:, y0:y1, x0:x1] = _blend_reference(model, box, size, overlap, mode)
    assert rel(res.maps, np.where(res.mask, ref, np.nan)) < FP32
    starts = len(_starts(y1 - y0, size[0], overlap, 1)) * len(_starts(x1 - x0, size[1], overlap, 1))
    assert res.windows <= starts


# ----------------------------------------------------------------------------- memory and errors


class Sink:
    """An ``out`` that keeps nothing (the map's own storage is the caller's choice)."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape

    def __setitem__(self, key, rows) -> None:
        assert rows.dtype == np.float32


def _peak_bytes(lines: int) -> int:
    model, samples = _unet(), 64
    tracemalloc.start()
    try:
        raw, out = Lines(lines, samples), Sink((1, lines, samples))
        # Without reader threads: their timing would move the peak by a block or two.
        stream_scan(
            model, _recipe(), raw, *_refs(samples), saturation=CEILING, out=out, tile=32, block_lines=16,
            prefetch=False,
        )  # fmt: skip
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_peak_memory_grows_with_the_2d_arrays_only() -> None:
    """4x the lines: peak NumPy allocation grows by the scan's 2-D arrays (a few bytes a pixel),
    far below what holding the cube (62 channels x 4 B = 248 B a pixel) or the raw scan
    (300 bands x 2 B = 600 B a pixel) would add. Bound: 16 B per added pixel (measured: 1.4).

    Measured in a fresh process: tracemalloc counts every thread's allocations, and inside a
    long test session other threads (MLflow, zarr, lock heartbeats) allocate meanwhile (one
    full-suite run measured 95 B a pixel that way, none of it the scorer's)."""
    import subprocess
    import sys

    code = "from tests.inference.test_stream import _peak_bytes; print(_peak_bytes(256), _peak_bytes(1024))"
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    short, long = (int(v) for v in res.stdout.split()[-2:])
    per_pixel = (long - short) / ((1024 - 256) * 64)
    assert per_pixel < 16, (short, long, per_pixel)


def test_a_sample_pixel_that_is_not_finite_stops_with_its_line_and_sample() -> None:
    raw = _counts(0, LINES, SAMPLES, np.float32)
    raw[250, 40, 30] = np.nan  # band 250 (>= 750 nm: selected), a meat pixel
    with pytest.raises(
        InputError, match=r"1 sample pixels are NaN or infinite .*first at line 40, sample 30"
    ):
        stream_scan(_unet(), _recipe(), raw, *_refs(SAMPLES), saturation=CEILING, tile=32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "median"}, "mode must be one of"),
        ({"overlap": 1.0}, "overlap must be >= 0 and < 1, got 1.0"),
        ({"amp": True}, "amp=True .* CUDA device only"),
        ({"tile": 0}, "tile must be a positive integer"),
        ({"batch": 0}, "batch must be a positive integer"),
        (
            {"spill": "/no/such/folder"},
            "spill must be True, False or an existing folder, got '/no/such/folder'",
        ),
    ],
)
def test_bad_options_stop_with_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        stream_scan(_unet(), _recipe(), Lines(LINES, SAMPLES), *_refs(SAMPLES), saturation=CEILING, **kwargs)


def test_a_scan_that_does_not_fit_the_recipe_stops_with_one_line() -> None:
    with pytest.raises(InputError, match="the scan has 299 bands, the recipe expects 300"):
        stream_scan(_unet(), _recipe(), np.zeros((299, 8, 8)), *_refs(8), saturation=CEILING)
    with pytest.raises(InputError, match=r"white reference mean must be \(bands, samples\)"):
        stream_scan(_unet(), _recipe(), Lines(8, 8), np.zeros((300, 9)), _refs(8)[1], saturation=CEILING)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_and_channels_last_stay_close_to_fp32() -> None:
    ref = _whole(_unet())
    args = (_recipe(), Lines(LINES, SAMPLES), *_refs(SAMPLES))
    fp32 = stream_scan(_unet(), *args, saturation=CEILING, tile=32, device="cuda")
    last = stream_scan(_unet(), *args, saturation=CEILING, tile=32, device="cuda", channels_last=True)
    bf16 = stream_scan(_unet(), *args, saturation=CEILING, tile=32, device="cuda", amp=True)
    assert rel(fp32.maps, ref.maps) < 1e-3  # TF32 convolutions
    assert rel(last.maps, fp32.maps) < 1e-3
    assert rel(bf16.maps, fp32.maps) < 5e-2


_FORWARDS = """
import json, resource, sys, torch
from chemmap.inference.stream import keep_freed_memory
from chemmap.models.unet import UNet, UNetConfig
kept = sys.argv[1] == "kept" and keep_freed_memory()
torch.manual_seed(0)
model = UNet(UNetConfig(in_channels=4, pad=True, bilinear=True, depth=2, features=16)).eval()
x = torch.randn(1, 4, 1024, 1024)
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.inference_mode():
        model(x)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _forward_faults(setting: str) -> dict:
    """Page faults of four forward passes in a fresh process (its heap untouched by other tests)."""
    res = subprocess.run(
        [sys.executable, "-c", _FORWARDS, setting], capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_cpu_scoring_reuses_freed_activations_without_faulting_their_pages_in_again():
    # Activations of 64 MiB, past glibc's largest default mmap threshold (32 MiB): by default
    # every forward pass maps them afresh and faults every page in again; kept (what
    # stream_scan does on the CPU), the passes after the first reuse the heap.
    plain, kept = _forward_faults("plain"), _forward_faults("kept")
    assert kept["kept"] and not plain["kept"]
    again_plain, again_kept = min(plain["faults"][1:]), max(kept["faults"][1:])
    assert again_plain > 0.8 * plain["faults"][0], plain  # the default: every pass faults anew
    assert again_kept < again_plain / 4, (plain, kept)  # measured: 0-25k against 350-370k


_WINDOWS = """
import json, psutil, torch
from chemmap.inference.stream import keep_freed_memory, release_freed_memory
from chemmap.models.unet import UNet, UNetConfig
keep_freed_memory()
torch.manual_seed(0)
model = UNet(UNetConfig(in_channels=4, pad=True, bilinear=True, depth=2, features=16)).eval()
rss = []
for i in range(8):  # windows of three sizes, as a scan's are
    x = torch.randn(1, 4, 900 + 60 * (i % 3), 1024)
    with torch.inference_mode():
        model(x)
    del x
    release_freed_memory()  # what the map pass does after each model call
    rss.append(psutil.Process().memory_info().rss)
print(json.dumps(rss))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_kept_memory_is_released_after_each_window_so_it_does_not_grow_with_the_scan():
    # Kept across windows, the heap fragments and grows (measured without the release:
    # 783 -> 1280 MiB over these eight windows); released after each, it stays flat.
    res = subprocess.run([sys.executable, "-c", _WINDOWS], capture_output=True, text=True, check=True)
    rss = json.loads(res.stdout.strip().splitlines()[-1])
    assert max(rss) <= 1.1 * rss[0] + (16 << 20), [r >> 20 for r in rss]
