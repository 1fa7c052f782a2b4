"""Build ``dataset.zarr``: calibrated cubes, masks, the sample table, the recipe and a patch index.

Layout (Zarr v3)::

    dataset.zarr/
      attrs: recipe, samples (table), scans (table), targets, input key
      scans/<scan_id>/
        cube        float32 (band, y, x), chunks (all bands, chunk_lines, chunk_samples)
        mask        bool    (y, x)
        brightness  float32 (y, x)           -- mean reflectance over the mask's bands, before
                                                any transform (what SNV would take away)
        wavelength  float64 (band,)          -- the cube's coordinate
        attrs: sample_id, source files, per-band sums over the mask, complete
        truth/<target> float32 (y, x)         -- true maps, where the scanner wrote them (synthetic)
      patches/<core>_<halo>_<stride>  int32 (n, 5): scan index, y0, x0, y1, x1 of each core window

Every raw scan goes through :mod:`chemmap.preprocess.scan`, the one path from raw counts
to model input that scoring uses too. :mod:`chemmap.preprocess.store` reads the result.

Each scan costs one read of its raw file: a single Dask graph stores the preprocessed cube
and returns the mean reflectance and the bad-pixel flags the mask needs; a second, cheaper
pass over the stored cube (a quarter of the raw bytes with the VNIR recipe) checks that
every masked value is finite and sums the normalisation statistics. A scan group is marked
complete only after both, so an interrupted build resumes at the first unfinished scan.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chemmap.config import ClusterConfig, PreprocessConfig
from chemmap.errors import InputError
from chemmap.io import Scan, ScanFiles, open_scan
from chemmap.preprocess.recipe import Recipe
from chemmap.preprocess.scan import check_finite, reference_means, sample_mask, transform

# Calibrated reflectance of noisy pixels compresses poorly and zstd costs CPU on every read;
# stored uncompressed, a window read is a plain memcpy (measured in bench/preprocess.py).
CUBE_COMPRESSORS: Any = None
# 2: true maps copied in, one patch index named in the root attributes; 3: each scan's brightness
DATASET_FORMAT = 3
BLOCKS_IN_FLIGHT = 2  # write units per worker thread in one Dask compute


@dataclass(frozen=True)
class ScanInput:
    """One scan to ingest: its files, the sample it belongs to, and what lies beside it."""

    sample_id: str
    files: ScanFiles
    mask_file: Path | None = None
    truth_file: Path | None = None  # true maps (``.npz`` of the built-in scanner), copied in

    @property
    def scan_id(self) -> str:
        return self.files.scan_id

    @property
    def raw(self) -> Path:
        return self.files.raw


@dataclass(frozen=True)
class PatchGeometry:
    """The patch index's windows: core and halo in px, on the model's stride grid."""

    core: int
    halo: int
    stride: int

    @classmethod
    def on_grid(cls, core: int, radius: int, stride: int) -> PatchGeometry:
        """Core rounded up to a stride multiple, halo the smallest stride multiple >= ``radius``."""
        return cls(int(math.ceil(core / stride) * stride), int(math.ceil(radius / stride) * stride), stride)

    @property
    def name(self) -> str:
        return f"core{self.core}_halo{self.halo}_stride{self.stride}"


def dask_scheduler(cluster: ClusterConfig):
    """A context manager selecting the Dask scheduler ``cluster.dask_scheduler`` names."""
    import dask

    name = cluster.dask_scheduler
    if name in ("threads", "synchronous", "sync", "processes"):
        kw: dict[str, Any] = {"scheduler": name}
        if name == "threads" and cluster.dask_workers:
            kw["num_workers"] = cluster.dask_workers
        return dask.config.set(**kw)
    # Anything else is a dask.distributed scheduler address; the client becomes the default.
    from distributed import Client

    try:
        client = Client(name, timeout="10s", set_as_default=True)
    except OSError as err:
        raise InputError(f"cluster.dask_scheduler: cannot reach Dask scheduler {name!r}: {err}") from None
    return contextlib.closing(client)


def core_windows_on_mask(mask: np.ndarray, core: int) -> np.ndarray:
    """Core windows ``(y0, x0, y1, x1)`` of a ``core`` grid that hold at least one mask pixel.

    Windows start at multiples of ``core`` (a multiple of the model's stride), so every
    window, and every window widened by a halo that is a multiple of the stride, starts on
    the model's stride grid; edge windows are clipped to the image. (The same grid as
    :func:`chemmap.models.tiling.core_windows`, kept here so preprocessing needs no torch.)
    """
    h, w = mask.shape
    out = []
    for y0 in range(0, h, core):
        for x0 in range(0, w, core):
            y1, x1 = min(y0 + core, h), min(x0 + core, w)
            if mask[y0:y1, x0:x1].any():
                out.append((y0, x0, y1, x1))
    return np.asarray(out, dtype=np.int32).reshape(-1, 4)


def write_patch_index(store: Path, geometry: PatchGeometry) -> str:
    """Write the patch index of the dataset's masks for a geometry; returns its name under ``patches/``."""
    import zarr

    root = zarr.open_group(store, mode="a")
    rows = []
    for i, s in enumerate(root.attrs["scans"]):
        win = core_windows_on_mask(root[f"scans/{s['scan_id']}/mask"][...], geometry.core)
        rows.append(np.column_stack([np.full(len(win), i, np.int32), win]))
    index = np.concatenate(rows) if rows else np.zeros((0, 5), np.int32)
    arr = root.create_array(
        f"patches/{geometry.name}",
        shape=index.shape,
        dtype="int32",
        chunks=(max(len(index), 1), 5),
        overwrite=True,
    )
    arr[...] = index
    arr.attrs.update(
        {
            "core": geometry.core,
            "halo": geometry.halo,
            "stride": geometry.stride,
            "columns": ["scan", "y0", "x0", "y1", "x1"],
        }
    )
    root.attrs["patches"] = geometry.name
    return geometry.name


def _write_units(cfg: PreprocessConfig, channels: int, lines: int, samples: int):
    """Zarr chunks and shards of a cube: ``(chunks, shards or None)``."""
    chunks = (channels, min(cfg.chunk_lines, lines), min(cfg.chunk_samples, samples))
    if not cfg.shard_lines:
        return chunks, None
    # A shard holds whole chunks: shard_lines rounded up to the chunk, the full width.
    shard_y = math.ceil(min(cfg.shard_lines, lines) / chunks[1]) * chunks[1]
    return chunks, (channels, shard_y, math.ceil(samples / chunks[2]) * chunks[2])


def _unit_lines(cfg: PreprocessConfig) -> int:
    """Lines of one write unit (a shard's or a chunk's): raw blocks span this many."""
    if cfg.shard_lines:
        return math.ceil(cfg.shard_lines / cfg.chunk_lines) * cfg.chunk_lines
    return cfg.chunk_lines


def _cube_array(group, shape: tuple[int, int, int], chunks, shards):
    return group.create_array(
        "cube",
        shape=shape,
        dtype="float32",
        chunks=chunks,
        shards=shards,
        compressors=CUBE_COMPRESSORS,
        fill_value=np.float32("nan"),
        dimension_names=("band", "y", "x"),
        overwrite=True,
    )


@dataclass(frozen=True)
class _Flags:
    """Per-pixel results of the storing pass: what the mask and the finiteness check need."""

    reflectance_mean: np.ndarray  # (lines, samples) float32
    bad: np.ndarray  # (lines, samples) bool
    nonfinite: np.ndarray  # (lines, samples) bool: some channel NaN or inf


def _store_cube(scan: Scan, white, dark, recipe: Recipe, arr, unit: tuple[int, ...], workers: int) -> _Flags:
    """Transform the raw scan block by block into ``arr``; returns the 2-D flags.

    Every Dask block covers whole shards (or chunks): concurrent writers of one shard
    overwrite each other (dask #12583), so the cube is stored into an array created here,
    never through ``dask.array.to_zarr`` on a URL. A few write units per compute: the
    scheduler cannot read ahead of the writes, so peak memory is a few blocks whatever
    the scan's length (paper scans are 2.3 GB).
    """
    import dask
    import dask.array as da

    channels, lines, samples = arr.shape
    saturation = recipe.saturation_level(scan.header, scan.dtype)
    flags = _Flags(
        np.empty((lines, samples), np.float32),
        np.empty((lines, samples), bool),
        np.empty((lines, samples), bool),
    )
    step = unit[1] * BLOCKS_IN_FLIGHT * max(1, workers)
    raw = scan.data  # blocks of the write unit's lines (open_scan clamps them to the scan)
    for l0 in range(0, lines, step):
        l1 = min(l0 + step, lines)
        block = transform(raw[:, l0:l1], white, dark, recipe, saturation)
        cube = block.cube.rechunk((channels, unit[1], unit[2]))
        store_task = da.store(
            cube, arr, regions=(slice(None), slice(l0, l1), slice(None)), lock=False, compute=False
        )
        _, flags.reflectance_mean[l0:l1], flags.bad[l0:l1], flags.nonfinite[l0:l1] = dask.compute(
            store_task, block.reflectance_mean, block.bad, ~da.isfinite(cube).all(axis=0)
        )
    return flags


def _finite_or_none(v: float) -> float | None:
    """JSON has no infinity: an unbounded saturation level is stored as None."""
    return float(v) if np.isfinite(v) else None


def _write_maps_and_wavelengths(group, mask: np.ndarray, brightness: np.ndarray, recipe: Recipe) -> None:
    maps = (("mask", np.asarray(mask, dtype=bool)), ("brightness", np.asarray(brightness, dtype=np.float32)))
    for name, values in maps:
        arr = group.create_array(
            name,
            shape=values.shape,
            dtype=values.dtype,
            chunks=values.shape,
            dimension_names=("y", "x"),
            overwrite=True,
        )
        arr[...] = values
    units = "counts" if recipe.config.calibration == "none" else "reflectance"
    group["brightness"].attrs.update({"units": units})
    channels = recipe.n_channels
    wl = group.create_array(
        "wavelength",
        shape=(channels,),
        dtype="float64",
        chunks=(channels,),
        dimension_names=("band",),
        overwrite=True,
    )
    wl[...] = np.asarray(recipe.wavelengths)
    wl.attrs.update({"units": "nm"})


def _training_stats(arr, mask: np.ndarray) -> dict[str, Any]:
    """Per-channel sums over the sample's pixels only: the belt is not what the model will see."""
    import dask
    import dask.array as da

    stored = da.from_zarr(arr)
    m = da.from_array(mask, chunks=stored.chunksize[1:])
    sel = da.where(m[None], stored, 0.0).astype(np.float64)
    s1, s2 = dask.compute(sel.sum(axis=(1, 2)), (sel * sel).sum(axis=(1, 2)))
    return {"sum": s1.tolist(), "sumsq": s2.tolist(), "count": int(mask.sum())}


def _copy_truth(group, truth_file: Path | None, targets: Sequence[str], shape: tuple[int, int]) -> None:
    """Copy a scan's true maps (targets only) into the dataset, so evaluation never needs the raw folder."""
    if truth_file is None or not truth_file.is_file():
        return
    with np.load(truth_file, allow_pickle=False) as z:
        maps = {t: np.asarray(z[t], np.float32) for t in targets if t in z.files}
    if not maps:
        return
    tg = group.require_group("truth")
    for name, m in maps.items():
        if m.shape != shape:
            raise InputError(f"{truth_file}: true map {name!r} is {m.shape}, the scan is {shape}")
        tg.create_array(name, shape=m.shape, dtype="float32", chunks=m.shape, overwrite=True)[...] = m


def _combine_stats(recipe: Recipe, infos: Sequence[dict[str, Any]]) -> Recipe:
    """The recipe with normalisation statistics from the training samples (splits 1..k, never 0)."""
    tot = np.zeros(recipe.n_channels)
    tot2 = np.zeros(recipe.n_channels)
    count = 0
    for info in infos:
        st = info.get("stats") or {}
        if st:
            tot += np.asarray(st["sum"])
            tot2 += np.asarray(st["sumsq"])
            count += st["count"]
    if count == 0:
        raise InputError("no training pixels (every sample is in split 0); cannot compute statistics")
    mean = tot / count
    std = np.sqrt(np.maximum(tot2 / count - mean**2, 0.0))
    return recipe.with_stats(mean, np.where(std > 1e-8, std, 1.0))


def _sample_table(
    references: pd.DataFrame, infos: Sequence[dict[str, Any]], targets: Sequence[str]
) -> list[dict]:
    """One row per sample that kept at least one scan: split, lab values, scans."""
    kept = {i["sample_id"] for i in infos}
    samples = []
    for _, row in references.iterrows():
        sid = str(row["sample_id"])
        if sid in kept:
            samples.append(
                {
                    "sample_id": sid,
                    "split": int(row["split"]),
                    "targets": [float(row[t]) for t in targets],
                    "scans": [i["scan_id"] for i in infos if i["sample_id"] == sid],
                }
            )
    return samples


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("preprocess"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    return Progress(*columns, disable=not enabled, transient=False)


class DatasetBuilder:
    """Ingest scans into one Zarr store, chunk-parallel and out of core.

    Args:
        store: path of ``dataset.zarr`` (created; an unfinished one is resumed).
        config: the preprocessing section.
        targets: reference columns the dataset carries (``["fat"]``).
        cluster: where Dask runs (local threads by default).
        on_error: ``"fail"`` stops at the first bad scan; ``"skip"`` reports and drops it.
        progress: show a progress bar.
    """

    def __init__(
        self,
        store: Path,
        config: PreprocessConfig,
        targets: Sequence[str],
        *,
        cluster: ClusterConfig | None = None,
        on_error: str = "fail",
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.store = Path(store)
        self.config = config
        self.targets = list(targets)
        self.cluster = cluster or ClusterConfig()
        self.on_error = on_error
        self.progress = progress
        self.log = log
        self.skipped: list[str] = []

    # ------------------------------------------------------------------ per scan
    def ingest_scan(self, root, recipe: Recipe, scan_in: ScanInput, train: bool) -> dict[str, Any]:
        """Preprocess one scan into ``scans/<scan_id>``; returns its row of the scan table."""
        scan = open_scan(scan_in.raw, chunk_lines=_unit_lines(self.config))
        source = str(scan.path)
        recipe.check_wavelengths(scan.wavelengths, source)
        white, dark = reference_means(scan, scan_in.files, recipe)
        _, lines, samples = scan.shape
        chunks, shards = _write_units(self.config, recipe.n_channels, lines, samples)
        group = root.require_group(f"scans/{scan_in.scan_id}")
        arr = _cube_array(group, (recipe.n_channels, lines, samples), chunks, shards)
        workers = self.cluster.dask_workers or os.cpu_count() or 1
        flags = _store_cube(scan, white, dark, recipe, arr, shards or chunks, workers)
        sm = sample_mask(
            flags.reflectance_mean, flags.bad, self.config.mask, mask_file=scan_in.mask_file, source=source
        )
        check_finite(flags.nonfinite, sm.mask, source)
        _write_maps_and_wavelengths(group, sm.mask, flags.reflectance_mean, recipe)
        _copy_truth(group, scan_in.truth_file, self.targets, (lines, samples))
        arr.attrs.update({"coordinates": "wavelength", "units": recipe.config.transform})
        info = {
            "scan_id": scan_in.scan_id,
            "sample_id": scan_in.sample_id,
            "raw": str(scan_in.raw),
            "lines": lines,
            "samples": samples,
            "mask_pixels": int(sm.mask.sum()),
            "bad_pixels_in_mask": sm.bad_removed,
            "saturation": _finite_or_none(recipe.saturation_level(scan.header, scan.dtype)),
            "stats": _training_stats(arr, sm.mask) if train else {},
            "complete": True,
        }
        group.attrs.update(info)
        return info

    # ------------------------------------------------------------------ whole dataset
    def _ingest_all(self, root, recipe: Recipe, scans: Sequence[ScanInput], split_of: dict) -> list[dict]:
        """Every scan, resuming those an interrupted run completed; bad ones fail or are skipped."""
        infos: list[dict[str, Any]] = []
        bar = _progress(self.progress)
        with bar, dask_scheduler(self.cluster):
            task = bar.add_task("", total=len(scans))
            for s in scans:
                bar.update(task, description=s.scan_id)
                key = f"scans/{s.scan_id}"
                if key in root and root[key].attrs.get("complete"):
                    infos.append(dict(root[key].attrs))  # resumed: done by an earlier, interrupted run
                elif (info := self._ingest_or_skip(root, recipe, s, split_of[s.sample_id] != 0)) is not None:
                    infos.append(info)
                bar.advance(task)
        return infos

    def _ingest_or_skip(self, root, recipe: Recipe, s: ScanInput, train: bool) -> dict[str, Any] | None:
        try:
            return self.ingest_scan(root, recipe, s, train)
        except InputError as err:
            if self.on_error != "skip":
                raise
            self.skipped.append(str(err))
            self.log(f"[skip] {err}")
            if f"scans/{s.scan_id}" in root:
                del root[f"scans/{s.scan_id}"]
            return None

    def build(self, scans: Sequence[ScanInput], references: pd.DataFrame, input_key: str) -> dict[str, Any]:
        """Ingest every scan and write the root metadata; returns a summary.

        Args:
            scans: the scans, each naming its sample.
            references: one row per sample: ``sample_id``, the target columns and ``split``.
            input_key: the key of the inputs (stored, so consumers can check provenance).
        """
        import zarr

        if not scans:
            raise InputError("no scans to preprocess")
        first = open_scan(scans[0].raw)
        recipe = Recipe.create(self.config, first.wavelengths, str(first.path))
        split_of = dict(
            zip(references["sample_id"].astype(str), references["split"].astype(int), strict=True)
        )
        root = zarr.open_group(self.store, mode="a", zarr_format=3)
        infos = self._ingest_all(root, recipe, scans, split_of)
        if not infos:
            raise InputError("every scan was skipped; nothing to build a dataset from")
        recipe = _combine_stats(recipe, infos)
        samples = _sample_table(references, infos, self.targets)
        root.attrs.update(
            {
                "format": DATASET_FORMAT,
                "recipe": recipe.to_dict(),
                "targets": self.targets,
                "samples": samples,
                "scans": [{k: v for k, v in i.items() if k not in ("stats", "complete")} for i in infos],
                "input_key": input_key,
                "skipped": self.skipped,
            }
        )
        return {
            "n_scans": len(infos),
            "n_samples": len(samples),
            "n_channels": recipe.n_channels,
            "mask_pixels": int(sum(i["mask_pixels"] for i in infos)),
            "skipped": self.skipped,
        }
