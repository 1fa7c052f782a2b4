"""Build ``dataset.zarr``: calibrated cubes, masks, the sample table, the recipe and a patch index.

Layout (Zarr v3)::

    dataset.zarr/
      attrs: recipe, samples (table), scans (table), targets, input key
      scans/<scan_id>/
        cube        float32 (band, y, x), chunks (all bands, chunk_lines, chunk_samples)
        mask        bool    (y, x)
        wavelength  float64 (band,)          -- the cube's coordinate
        attrs: sample_id, source files, per-band sums over the mask, complete
      patches/<core>_<halo>_<stride>  int32 (n, 5): scan index, y0, x0, y1, x1 of each core window

Each scan costs one read of its raw file: a single Dask graph stores the preprocessed cube
and returns the mean reflectance and the bad-pixel flags the mask needs; a second, cheaper
pass over the stored cube (a quarter of the raw bytes with the VNIR recipe) checks that
every masked value is finite and sums the normalisation statistics. A scan group is marked
complete only after both, so an interrupted build resumes at the first unfinished scan.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chemmap.config import PreprocessConfig
from chemmap.errors import InputError
from chemmap.io.layout import ScanFiles
from chemmap.preprocess.mask import read_mask_file, threshold_mask
from chemmap.preprocess.recipe import Recipe

# Calibrated reflectance of noisy pixels compresses poorly and zstd costs CPU on every read;
# stored uncompressed, a window read is a plain memcpy (measured in bench/preprocess.py).
CUBE_COMPRESSORS: Any = None
DATASET_FORMAT = 1
BLOCKS_IN_FLIGHT = 2  # write units per worker thread in one Dask compute


@dataclass(frozen=True)
class ScanInput:
    """One scan to ingest: its files and the sample it belongs to."""

    sample_id: str
    files: ScanFiles
    mask_file: Path | None = None

    @property
    def scan_id(self) -> str:
        return self.files.scan_id

    @property
    def raw(self) -> Path:
        return self.files.raw


def _dask_scheduler(cfg: PreprocessConfig):
    """A context manager selecting the Dask scheduler the config names."""
    import contextlib

    import dask

    if cfg.scheduler in ("threads", "synchronous", "sync", "processes"):
        kw: dict[str, Any] = {"scheduler": cfg.scheduler}
        if cfg.scheduler == "threads" and cfg.num_workers:
            kw["num_workers"] = cfg.num_workers
        return dask.config.set(**kw)
    # Anything else is a dask.distributed scheduler address; the client becomes the default.
    try:
        from distributed import Client
    except ImportError as err:  # pragma: no cover - dask[distributed] is a dependency
        raise InputError(f"preprocess.scheduler={cfg.scheduler!r} needs dask.distributed") from err
    try:
        client = Client(cfg.scheduler, timeout="10s", set_as_default=True)
    except OSError as err:
        msg = f"preprocess.scheduler: cannot reach Dask scheduler {cfg.scheduler!r}: {err}"
        raise InputError(msg) from None

    @contextlib.contextmanager
    def _ctx():
        try:
            yield client
        finally:
            client.close()

    return _ctx()


def core_windows_on_mask(mask: np.ndarray, core: int) -> np.ndarray:
    """Core windows ``(y0, x0, y1, x1)`` of a ``core`` grid that hold at least one mask pixel.

    Windows start at multiples of ``core`` (a multiple of the model's stride), so every
    window, and every window widened by a halo that is a multiple of the stride, starts on
    the model's stride grid; edge windows are clipped to the image.
    """
    h, w = mask.shape
    out = []
    for y0 in range(0, h, core):
        for x0 in range(0, w, core):
            y1, x1 = min(y0 + core, h), min(x0 + core, w)
            if mask[y0:y1, x0:x1].any():
                out.append((y0, x0, y1, x1))
    return np.asarray(out, dtype=np.int32).reshape(-1, 4)


def patch_key(core: int, halo: int, stride: int) -> str:
    return f"core{core}_halo{halo}_stride{stride}"


def tiling_for(radius: int, stride: int, core: int) -> tuple[int, int]:
    """Core and halo on the stride grid: core rounded up to a stride multiple, halo >= radius."""
    core = int(math.ceil(core / stride) * stride)
    halo = int(math.ceil(radius / stride) * stride)
    return core, halo


def write_patch_index(store: Path, radius: int, stride: int, core: int) -> str:
    """Add (or find) the patch index for a model geometry; returns its name under ``patches/``.

    Cheap (masks only), idempotent, so training with a model of another geometry adds its
    own index to an existing dataset without preprocessing again.
    """
    import zarr

    core, halo = tiling_for(radius, stride, core)
    name = patch_key(core, halo, stride)
    root = zarr.open_group(store, mode="a")
    if f"patches/{name}" in root:
        return name
    scans = root.attrs["scans"]
    rows = []
    for i, s in enumerate(scans):
        mask = root[f"scans/{s['scan_id']}/mask"][...]
        win = core_windows_on_mask(mask, core)
        rows.append(np.column_stack([np.full(len(win), i, np.int32), win]))
    index = np.concatenate(rows) if rows else np.zeros((0, 5), np.int32)
    arr = root.create_array(
        f"patches/{name}", shape=index.shape, dtype="int32", chunks=(max(len(index), 1), 5), overwrite=True
    )
    arr[...] = index
    arr.attrs.update(
        {
            "core": core,
            "halo": halo,
            "stride": stride,
            "radius": radius,
            "columns": ["scan", "y0", "x0", "y1", "x1"],
        }
    )
    return name


class DatasetBuilder:
    """Ingest scans into one Zarr store, chunk-parallel and out of core.

    Args:
        store: path of ``dataset.zarr`` (created; an unfinished one is resumed).
        config: the preprocessing section.
        targets: reference columns the dataset carries (``["fat"]``).
        on_error: ``"fail"`` stops at the first bad scan; ``"skip"`` reports and drops it.
        progress: show a progress bar.
    """

    def __init__(
        self,
        store: Path,
        config: PreprocessConfig,
        targets: Sequence[str],
        *,
        on_error: str = "fail",
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.store = Path(store)
        self.config = config
        self.targets = list(targets)
        self.on_error = on_error
        self.progress = progress
        self.log = log
        self.skipped: list[str] = []

    # ------------------------------------------------------------------ per scan
    def _ingest_scan(self, root, recipe: Recipe, scan_in: ScanInput, train: bool) -> dict[str, Any]:
        import dask
        import dask.array as da

        from chemmap.io import check_references, open_scan

        cfg = self.config
        # Raw blocks span the write unit's lines (a shard's or a chunk's; see below).
        unit_lines = cfg.chunk_lines
        if cfg.shard_lines:
            unit_lines = math.ceil(cfg.shard_lines / cfg.chunk_lines) * cfg.chunk_lines
        scan = open_scan(scan_in.raw, chunk_lines=unit_lines)
        recipe.check_wavelengths(scan.wavelengths, str(scan.path))
        white = dark = None
        if cfg.calibration == "white_dark":
            f = scan_in.files
            w_scan = open_scan(f.white) if f.white else None
            d_scan = open_scan(f.dark) if f.dark else None
            check_references(scan, w_scan, d_scan, f)
            white, dark = dask.compute(
                w_scan.data.astype(np.float64).mean(axis=1), d_scan.data.astype(np.float64).mean(axis=1)
            )
        _, lines, samples = scan.shape
        channels = recipe.n_channels
        chunks = (channels, min(cfg.chunk_lines, lines), min(cfg.chunk_samples, samples))
        shards = None
        if cfg.shard_lines:
            # A shard holds whole chunks: shard_lines rounded up to the chunk, the full width.
            shard_y = math.ceil(min(cfg.shard_lines, lines) / chunks[1]) * chunks[1]
            shards = (channels, shard_y, math.ceil(samples / chunks[2]) * chunks[2])
        # Every Dask block must cover whole shards (or chunks): concurrent writers of one shard
        # overwrite each other (dask #12583). Raw blocks span the write unit's lines, and the
        # cube is stored into an array created here, never through dask.array.to_zarr on a URL.
        unit = shards or chunks
        raw = scan.data  # blocks of unit[1] lines (open_scan clamps unit_lines to the scan)
        saturation = recipe.saturation_level(scan.header, scan.dtype)

        group = root.require_group(f"scans/{scan_in.scan_id}")
        arr = group.create_array(
            "cube",
            shape=(channels, lines, samples),
            dtype="float32",
            chunks=chunks,
            shards=shards,
            compressors=CUBE_COMPRESSORS,
            fill_value=np.float32("nan"),
            dimension_names=("band", "y", "x"),
            overwrite=True,
        )
        refl_mean = np.empty((lines, samples), np.float32)
        bad = np.empty((lines, samples), bool)
        nonfinite = np.empty((lines, samples), bool)
        # A few write units per compute: the scheduler cannot read ahead of the writes, so
        # peak memory is a few blocks whatever the scan's length (paper scans are 2.3 GB).
        step = unit[1] * BLOCKS_IN_FLIGHT * max(1, cfg.num_workers or os.cpu_count() or 1)
        for l0 in range(0, lines, step):
            l1 = min(l0 + step, lines)
            cube, r_mean, r_bad = recipe.apply(raw[:, l0:l1], white, dark, saturation)
            cube = cube.rechunk((channels, unit[1], unit[2]))
            region = (slice(None), slice(l0, l1), slice(None))
            store_task = da.store(cube, arr, regions=region, lock=False, compute=False)
            r_nonfinite = ~da.isfinite(cube).all(axis=0)
            _, refl_mean[l0:l1], bad[l0:l1], nonfinite[l0:l1] = dask.compute(
                store_task, r_mean, r_bad, r_nonfinite
            )

        if cfg.mask.method == "files":
            if scan_in.mask_file is None:
                raise InputError(f"{scan.path}: no mask file found (mask.pattern={cfg.mask.pattern!r})")
            mask = read_mask_file(scan_in.mask_file, (lines, samples))
        else:
            mask = threshold_mask(refl_mean, cfg.mask)
        n_bad = int((mask & bad).sum())
        mask &= ~bad
        if (mask & nonfinite).any():
            y, x = np.argwhere(mask & nonfinite)[0]
            raise InputError(
                f"{scan.path}: {int((mask & nonfinite).sum())} sample pixels are NaN or infinite after "
                f"preprocessing (first at line {y}, sample {x}); check the raw values and references"
            )
        if not mask.any():
            raise InputError(
                f"{scan.path}: no sample pixels found (mask method {cfg.mask.method}, "
                f"threshold {cfg.mask.threshold}); is the scan empty or the threshold wrong?"
            )
        group.create_array(
            "mask",
            shape=mask.shape,
            dtype="bool",
            chunks=mask.shape,
            dimension_names=("y", "x"),
            overwrite=True,
        )[...] = mask
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

        stats: dict[str, Any] = {}
        if train:
            # Statistics over the sample's pixels only: the belt is not what the model will see.
            stored = da.from_zarr(arr)
            m = da.from_array(mask, chunks=stored.chunksize[1:])
            sel = da.where(m[None], stored, 0.0).astype(np.float64)
            s1, s2 = dask.compute(sel.sum(axis=(1, 2)), (sel * sel).sum(axis=(1, 2)))
            stats = {"sum": s1.tolist(), "sumsq": s2.tolist(), "count": int(mask.sum())}
        arr.attrs.update({"coordinates": "wavelength", "units": recipe.config.transform})
        info = {
            "scan_id": scan_in.scan_id,
            "sample_id": scan_in.sample_id,
            "raw": str(scan_in.raw),
            "lines": lines,
            "samples": samples,
            "mask_pixels": int(mask.sum()),
            "bad_pixels_in_mask": n_bad,
            "stats": stats,
            "complete": True,
        }
        group.attrs.update(info)
        return info

    # ------------------------------------------------------------------ whole dataset
    def build(self, scans: Sequence[ScanInput], references: pd.DataFrame, input_key: str) -> dict[str, Any]:
        """Ingest every scan and write the root metadata; returns a summary.

        Args:
            scans: the scans, each naming its sample.
            references: one row per sample: ``sample_id``, the target columns and ``split``.
            input_key: the key of the inputs (stored, so consumers can check provenance).
        """
        import zarr

        from chemmap.io import open_scan

        if not scans:
            raise InputError("no scans to preprocess")
        first = open_scan(scans[0].raw)
        recipe = Recipe.create(self.config, first.wavelengths, str(first.path))
        ids, splits = references["sample_id"].astype(str), references["split"].astype(int)
        split_of = dict(zip(ids, splits, strict=True))

        root = zarr.open_group(self.store, mode="a", zarr_format=3)
        infos: list[dict[str, Any]] = []
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("preprocess"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
        )
        bar = Progress(*columns, disable=not self.progress, transient=False)
        with bar, _dask_scheduler(self.config):
            task = bar.add_task("", total=len(scans))
            for s in scans:
                bar.update(task, description=s.scan_id)
                key = f"scans/{s.scan_id}"
                if key in root and root[key].attrs.get("complete"):
                    infos.append(dict(root[key].attrs))  # resumed: done by an earlier, interrupted run
                    bar.advance(task)
                    continue
                try:
                    infos.append(self._ingest_scan(root, recipe, s, train=split_of[s.sample_id] != 0))
                except InputError as err:
                    if self.on_error != "skip":
                        raise
                    self.skipped.append(str(err))
                    self.log(f"[skip] {err}")
                    if key in root:
                        del root[key]
                bar.advance(task)

        if not infos:
            raise InputError("every scan was skipped; nothing to build a dataset from")
        # Normalisation statistics from the training samples only (splits 1..k, never 0).
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
        std = np.where(std > 1e-8, std, 1.0)
        recipe = recipe.with_stats(mean, std)

        kept = {i["sample_id"] for i in infos}
        samples = []
        for _, row in references.iterrows():
            sid = str(row["sample_id"])
            if sid not in kept:
                continue
            samples.append(
                {
                    "sample_id": sid,
                    "split": int(row["split"]),
                    "targets": [float(row[t]) for t in self.targets],
                    "scans": [i["scan_id"] for i in infos if i["sample_id"] == sid],
                }
            )
        scan_table = [{k: v for k, v in i.items() if k not in ("stats", "complete")} for i in infos]
        root.attrs.update(
            {
                "format": DATASET_FORMAT,
                "recipe": recipe.to_dict(),
                "targets": self.targets,
                "samples": samples,
                "scans": scan_table,
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


def open_dataset(store: Path) -> dict[str, Any]:
    """The root metadata of a finished ``dataset.zarr`` (recipe, samples, scans, targets)."""
    import zarr

    store = Path(store)
    if not store.exists():
        raise InputError(f"dataset not found: {store}")
    root = zarr.open_group(store, mode="r")
    attrs = dict(root.attrs)
    if "recipe" not in attrs:
        raise InputError(f"{store}: not a finished chemmap dataset (no recipe in its attributes)")
    attrs["recipe"] = Recipe.from_dict(attrs["recipe"])
    return attrs
