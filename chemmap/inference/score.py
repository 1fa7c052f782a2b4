"""A scanner's folder scored with a trained model: a map, a picture and a table row per scan.

Every scan goes through :func:`chemmap.inference.stream.stream_scan`, read as the scanner
wrote it (raw, white and dark references, and a mask image when the recipe's mask method is
``files``) by blocks of lines, never whole: a mask pass, then a map pass whose rows go
straight into the scan's Zarr map, chunked one tile row tall. In ``exact`` mode (the
default) the map is the whole-image map the evaluate stage makes
(:func:`chemmap.inference.mapping.map_arrays`) to float rounding. What lands in ``output_dir``::

    <scan_id>.zarr   the maps (target, y, x) in %, NaN outside the mask, and the mask
                     (:mod:`chemmap.inference.score_output`); attributes: model name and
                     version, the recipe, the scan id, the input files' sizes and times,
                     per-target means and sums, the summary row, ``complete: true`` last
    <scan_id>.png    the maps with a colour bar and the scan's mean in the title
    summary.csv      a row per scan of the input folder (columns: :func:`summary_columns`),
                     rewritten atomically as the run goes, so an interrupted run keeps what
                     it did
    samples.csv      with a scan -> sample table: each sample's pixel-weighted mean
    .locks/          while scorers run: one lock file per scan being scored

A run resumes: a scan whose map is complete, was made by the same model name and version
and whose input files have the sizes and modification times recorded with it is skipped
(its row is the earlier one, status ``ok``). A scan whose band centres drifted by more than
0.05 nm but at most ``wavelength_tolerance_nm`` is resampled to the model's bands, with a
note in its row. A bad scan gives an error row and one line in the log; the others go on.

Several scorers may share one output folder (two ``chemmap score`` processes, a
``--watch`` beside a batch run, :func:`chemmap.inference.actors.score_on_ray`'s actors): a
scan is scored by whoever takes its lock (:func:`chemmap.inference.score_output.acquire_lock`),
and a scorer that finds a scan locked by a live holder leaves it (a ``busy`` line in its log).

``summary.csv`` is a view, rebuilt at every write under the tables' lock and replaced
atomically. Its rows are the scans this run found, sorted by id, each:

1. this run's error row, if this run failed on the scan;
2. else the ``summary_row`` stored in the scan's complete map (made or skipped by this run,
   or made by another scorer for a scan that was ``busy`` here, when that map is of this
   model and of the input files as this run saw them);
3. else a ``busy`` row: another scorer still holds the scan (or made its map with another
   model); that scorer's own writes of the table list the scan when it is done.

So whichever scorer writes last writes a table that lists every map made so far; rows come
from the maps themselves, never from another process's memory. ``samples.csv`` is rebuilt
from the same view.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from chemmap.errors import InputError
from chemmap.figures import plot_maps
from chemmap.inference.bundle import ModelBundle
from chemmap.inference.flags import flags_columns, saturated_share, scan_flags, white_reference_age_hours
from chemmap.inference.score_output import (
    DEFAULT_STALE_SECONDS,
    TABLES_LOCK,
    LockBusy,
    acquire_lock,
    create_map_array,
    finish_map_group,
    read_map_array,
    read_map_attrs,
    read_map_zarr,
    remove_leftovers,
    remove_lock_dir,
    staged_dir,
    wait_for_lock,
    write_csv_atomic,
    write_map_zarr,
)
from chemmap.inference.stream import MODES, StreamResult, stream_scan
from chemmap.io import ScanFiles, check_references, discover_scans, open_scan
from chemmap.io.envi import find_data_file
from chemmap.models.tiling import Geometry, model_geometry
from chemmap.preprocess.recipe import Recipe
from chemmap.preprocess.scan import reference_means

__all__ = [
    "EXACT_NM",
    "SAMPLES_CSV",
    "SUMMARY_CSV",
    "Engine",
    "ScanOutcome",
    "ScanScorer",
    "ScoreSummary",
    "SummaryTable",
    "check_scan_id",
    "check_score_inputs",
    "finish_run",
    "input_files_key",
    "prepare_output",
    "progress_bar",
    "read_map_zarr",
    "read_sample_table",
    "resample_bands",
    "resample_flags",
    "sample_columns",
    "score_folder",
    "summary_columns",
    "wavelength_drift",
    "write_map_zarr",
]

Log = Callable[[str], None]

SUMMARY_CSV = "summary.csv"
SAMPLES_CSV = "samples.csv"
# Band centres this close to the model's (nm) are the same bands (Recipe.check_wavelengths).
EXACT_NM = 0.05
TILE_LINES = 1024  # scan lines per tile row: windows as wide as the scan (1.4x its pixels read at
# the paper's depth-5 radius of 220 px, against 6.7x for square 256 px cores: docs/benchmarks.md)
# Skipped scans rewrite the summary at most this often (s): a resumed run over thousands of
# done scans would otherwise rewrite a growing table thousands of times in a few seconds.
SKIPPED_WRITE_EVERY_S = 2.0


@dataclass(frozen=True)
class ScoreSummary:
    """What a scoring run did.

    Attributes:
        ok: scans scored by this run.
        skipped: scans done by an earlier run (or another scorer) with this model and unchanged
            input files.
        errors: scans that failed (their rows in ``summary.csv`` say why).
        seconds: wall time of the run.
        scans_per_second, megapixels_per_second: throughput of the scans scored by this run.
        output_dir: where maps, pictures and tables are.
        summary_csv: the per-scan table.
        samples_csv: the per-sample table, None without a scan -> sample table.
        failed: ids of the scans that failed.
        busy: scans left to another scorer that held their lock.
        scored: ids of the scans scored by this run (``ok``), in the order they were done.
    """

    ok: int
    skipped: int
    errors: int
    seconds: float
    scans_per_second: float
    megapixels_per_second: float
    output_dir: Path
    summary_csv: Path
    samples_csv: Path | None = None
    failed: tuple[str, ...] = field(default=())
    busy: int = 0
    scored: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Engine:
    """How a scan's map is computed (:func:`chemmap.inference.stream.stream_scan`).

    Attributes:
        mode: ``exact`` (the whole-image map, default), ``gaussian`` or ``constant`` (blended).
        tile_lines: scan lines per tile row; windows are as wide as the scan.
        device: where the model runs (``cpu``, ``cuda``...).
        amp: bf16 autocast on CUDA (opt-in; the output heads stay float32).
    """

    mode: str = "exact"
    tile_lines: int = TILE_LINES
    device: str = "cpu"
    amp: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"scoring mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.tile_lines, int) or self.tile_lines < 1:
            raise InputError(f"tile lines must be a positive integer, got {self.tile_lines!r}")
        if self.amp and not self.device.startswith("cuda"):
            raise InputError(f"bf16 autocast (--amp) runs on a CUDA device only, got device {self.device!r}")

    def record(self) -> dict[str, Any]:
        """What a map records of its engine: what changes its values beyond float rounding
        (exact maps are the whole-image map whatever the tiles or the device)."""
        return {"mode": self.mode, "amp": self.amp}


@dataclass(frozen=True)
class ScanOutcome:
    """One scan's result: its summary row, and what the sample table and throughput need."""

    status: str  # "ok", "skipped", "error" or "busy" (locked by another scorer)
    row: dict[str, Any]
    pixels: int = 0  # lines x samples scored by this run
    sums: dict[str, float] | None = None  # target -> sum of the map over the mask
    count: int = 0  # mask pixels
    inputs: dict[str, list[int]] | None = None  # a busy scan's input files as this run saw them


def summary_columns(targets: Sequence[str]) -> list[str]:
    """The columns of ``summary.csv`` for a model with these targets.

    ``scan_id``; ``status``: ``ok``, ``error`` or ``busy`` (another scorer holds the scan; see
    the module's docstring) (a scan skipped because an earlier run did it keeps that run's
    row, ``ok``); ``mean_<target>``: the map's mean over the mask, %;
    ``mask_pixels``; ``out_of_range_pct``: share of the mask's map values (all targets)
    outside 0-100 %; ``saturated_pct``: share of all the scan's pixels flagged bad
    (saturated, or a dead detector element); ``lines``, ``samples``: the scan's size;
    ``model_name``, ``model_version``; ``seconds``: reading, mapping and drawing the scan;
    ``scored_at``: when its map was made (UTC); ``t2``, ``q``: Hotelling T² and Q residual of
    the scan's mean spectrum against the training data, ``saturated_share`` (of the sample's
    pixels), ``white_age_h``, and ``flags``: each limit the scan exceeded, ``;``-separated
    (:mod:`chemmap.inference.flags`; empty for a model registered without a spectral model);
    ``note``: warnings (resampled wavelengths); ``error``: why the scan failed.
    """
    return [
        "scan_id",
        "status",
        *(f"mean_{t}" for t in targets),
        "mask_pixels",
        "out_of_range_pct",
        "saturated_pct",
        "lines",
        "samples",
        "model_name",
        "model_version",
        "seconds",
        "scored_at",
        *flags_columns(),
        "note",
        "error",
    ]


def sample_columns(targets: Sequence[str]) -> list[str]:
    """The columns of ``samples.csv`` for a model with these targets.

    ``sample_id``; ``mean_<target>``: the pixel-weighted mean over the sample's scored scans
    (the sum of their maps over their masks / their mask pixels, as training takes a
    sample's mean), %; ``mask_pixels``; ``scans``: how many were scored; ``scan_ids``: those
    scans, ``;``-separated; ``missing``: the table's scans of the sample without a map (failed,
    or not in the folder).
    """
    return ["sample_id", *(f"mean_{t}" for t in targets), "mask_pixels", "scans", "scan_ids", "missing"]


# ---------------------------------------------------------------------------------------------
# Checks on a scan's name, bands and files
# ---------------------------------------------------------------------------------------------


def check_scan_id(scan_id: str, output_dir: Path) -> None:
    """A scan id must name a file inside ``output_dir``.

    Raises:
        InputError: the id is empty, contains ``/``, ``\\`` or ``..``, starts with ``.``
            (hidden, or chemmap's temporary names), or ``<id>.zarr`` resolves outside
            ``output_dir`` (e.g. through a symbolic link).
    """
    unsafe = (
        not scan_id
        or scan_id.startswith(".")
        or any(c in scan_id for c in ("/", "\\", "\0"))
        or ".." in scan_id
        or (Path(output_dir) / f"{scan_id}.zarr").resolve().parent != Path(output_dir).resolve()
    )
    if unsafe:
        raise InputError(
            f"scan id {scan_id!r} is not a safe file name in {output_dir} (an id must not be empty, "
            "contain '/', '\\' or '..', or start with '.'); refusing to score it"
        )


def wavelength_drift(
    wavelengths: np.ndarray | None, expected: Sequence[float], tolerance_nm: float, source: str
) -> float:
    """How far (nm) a scan's band centres are from the model's, at most ``tolerance_nm``.

    Args:
        wavelengths: the scan's band centres (nm), None when its header has none.
        expected: the raw band centres the model's recipe was made for (nm).
        tolerance_nm: the largest difference that is resampled rather than refused.
        source: the scan's header, for messages.

    Returns:
        The largest absolute difference, nm (<= :data:`EXACT_NM`: the same bands).

    Raises:
        InputError: no band centres, another number of bands, or a larger difference.
    """
    ref = np.asarray(expected, dtype=np.float64)
    if wavelengths is None:
        raise InputError(f"{source}: header has no 'wavelength' list; the model needs band centres")
    wl = np.asarray(wavelengths, dtype=np.float64)
    if wl.shape != ref.shape:
        raise InputError(
            f"{source}: {wl.size} bands {wl[0]:.2f}-{wl[-1]:.2f} nm, the model expects "
            f"{ref.size} bands {ref[0]:.2f}-{ref[-1]:.2f} nm"
        )
    diff = np.abs(wl - ref)
    i = int(np.argmax(diff))
    if not diff[i] <= tolerance_nm:
        raise InputError(
            f"{source}: wavelengths differ from the model's by up to {diff[i]:.2f} nm (band {i + 1}: "
            f"{wl[i]:.2f} nm, expected {ref[i]:.2f} nm); the tolerance is {tolerance_nm:g} nm"
        )
    return float(diff[i])


def _neighbours(wavelengths: Sequence[float], target: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """For each target band, the lower of the two source bands around it and the weight of the upper.

    Target bands outside the source range take the nearest source band (weight 0 or 1).
    """
    src = np.asarray(wavelengths, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    if src.size == 1:
        return np.zeros(dst.size, np.int64), np.zeros(dst.size)
    pos = np.interp(dst, src, np.arange(src.size, dtype=np.float64))  # fractional band index
    lower = np.minimum(np.floor(pos).astype(np.int64), src.size - 2)
    return lower, pos - lower


def resample_bands(
    x: np.ndarray, wavelengths: Sequence[float], target: Sequence[float], *, dtype: Any = np.float32
) -> np.ndarray:
    """Linear interpolation along the band axis from one set of band centres to another.

    Args:
        x: ``(bands, ...)`` values at ``wavelengths``.
        wavelengths: ``(bands,)`` strictly increasing band centres of ``x``, nm.
        target: ``(bands_out,)`` band centres wanted, nm. Those outside ``wavelengths``
            take the nearest band's values.
        dtype: the result's dtype.

    Returns:
        ``(bands_out, ...)`` array.
    """
    lower, frac = _neighbours(wavelengths, target)
    out = np.empty((lower.size, *x.shape[1:]), dtype=dtype)
    for j, (i, f) in enumerate(zip(lower, frac, strict=True)):
        a = x[i].astype(np.float64)
        out[j] = a if f == 0.0 else a + f * (x[i + 1].astype(np.float64) - a)
    return out


def resample_flags(flags: np.ndarray, wavelengths: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """Flags ``(bands, ...)`` carried to the target bands: set where an interpolated value draws
    on a flagged source value (what :func:`resample_bands` mixes in with a weight above 0)."""
    lower, frac = _neighbours(wavelengths, target)
    out = np.empty((lower.size, *flags.shape[1:]), dtype=bool)
    for j, (i, f) in enumerate(zip(lower, frac, strict=True)):
        out[j] = (flags[i] & (f < 1.0)) | (flags[i + 1] & (f > 0.0)) if f > 0.0 else flags[i]
    return out


class ResampledLines:
    """A raw scan ``(bands, lines, samples)`` read by blocks of lines (``raw[b0:b1, l0:l1]``, columns
    too if asked), each block moved to the recipe's raw bands as it is read (then ``b0:b1`` of
    them); saturated counts stay saturated.

    A value interpolated from a saturated count stays at or above ``saturation``.
    """

    def __init__(self, raw: Any, wavelengths: Sequence[float], target: Sequence[float], saturation: float):
        self.raw, self.wavelengths, self.target, self.saturation = raw, wavelengths, target, saturation
        self.shape = (len(target), int(raw.shape[1]), int(raw.shape[2]))
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        bands, *place = key  # the recipe's bands asked for; lines (and samples) of the scan
        block = np.asarray(self.raw[(slice(None), *place)])  # (bands, r, samples), the scan's own bands
        target = list(self.target)[bands]  # only the bands asked for are interpolated
        out = resample_bands(block, self.wavelengths, target)
        saturated = resample_flags(block >= self.saturation, self.wavelengths, target)
        return np.where(saturated, np.maximum(out, np.float32(self.saturation)), out)


def resample_references(
    white: np.ndarray, dark: np.ndarray, wavelengths: Sequence[float], recipe: Recipe
) -> tuple[np.ndarray, np.ndarray]:
    """Reference means ``(bands, samples)`` moved to the recipe's raw bands, dead elements kept dead.

    A detector element interpolated from a dead one (white - dark below ``min_white_signal``,
    the recipe's rule) stays dead: its white is set to its dark.
    """
    target = recipe.raw_wavelengths
    dead = resample_flags(
        ~((white - dark).astype(np.float32) >= recipe.config.min_white_signal), wavelengths, target
    )
    w_out = resample_bands(white, wavelengths, target, dtype=np.float64)
    d_out = resample_bands(dark, wavelengths, target, dtype=np.float64)
    return np.where(dead, d_out, w_out), d_out


def input_files_key(files: ScanFiles, input_dir: Path, mask_file: Path | None = None) -> dict[str, list[int]]:
    """``{path relative to input_dir: [bytes, mtime ns]}`` of the files a scan's map is made from.

    Raw, white and dark headers and their data files, and the mask image if there is one.

    Raises:
        InputError: a header's data file is missing.
    """
    headers = [p for p in (files.raw, files.white, files.dark) if p is not None]
    paths = [*headers, *(find_data_file(h) for h in headers)]
    if mask_file is not None and mask_file.is_file():
        paths.append(mask_file)
    key = {}
    for p in paths:
        st = p.stat()
        key[Path(os.path.relpath(p, input_dir)).as_posix()] = [int(st.st_size), int(st.st_mtime_ns)]
    return key


def read_sample_table(path: str | os.PathLike) -> dict[str, str]:
    """A CSV with ``scan_id`` and ``sample_id`` columns (others ignored) -> ``{scan_id: sample_id}``.

    Raises:
        InputError: no such file, a missing column, an empty id, no rows, or a scan in two samples.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: scan -> sample table not found")
    out: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("scan_id", "sample_id") if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: no {' or '.join(missing)} column (it has {reader.fieldnames})")
            for line, row in enumerate(reader, start=2):
                scan, sample = (row["scan_id"] or "").strip(), (row["sample_id"] or "").strip()
                if not scan or not sample:
                    raise InputError(f"{path}, line {line}: empty scan_id or sample_id")
                if out.setdefault(scan, sample) != sample:
                    raise InputError(
                        f"{path}, line {line}: scan {scan!r} is in samples {out[scan]!r} and {sample!r}"
                    )
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a UTF-8 CSV ({err})") from None
    if not out:
        raise InputError(f"{path}: no rows")
    return out


# ---------------------------------------------------------------------------------------------
# One scan
# ---------------------------------------------------------------------------------------------


def _finite(v: float, digits: int) -> float | None:
    return round(float(v), digits) if math.isfinite(v) else None


def _map_stats(
    maps: np.ndarray, mask: np.ndarray, saturated: float, targets: Sequence[str]
) -> dict[str, Any]:
    """Mask pixels, per-target sums and means over the mask, out-of-range and saturated shares (%).

    ``saturated``: the share (0-1) of the scan's pixels flagged saturated or dead.
    """
    n = int(mask.sum())
    vals = maps[:, mask].astype(np.float64)  # (T, n)
    sums = vals.sum(axis=1)
    outside = ((vals < 0.0) | (vals > 100.0)).mean() if vals.size else 0.0
    return {
        "mask_pixels": n,
        "sums": {t: _finite(s, 9) for t, s in zip(targets, sums, strict=True)},
        "means": {t: _finite(s / n, 6) if n else None for t, s in zip(targets, sums, strict=True)},
        "out_of_range_pct": round(100.0 * float(outside), 4),
        "saturated_pct": round(100.0 * float(saturated), 4),
    }


class ScanScorer:
    """Scores scans one by one with one model; the ensemble is built at the first scan it scores.

    Local scoring, the watcher and every Ray actor score a scan through :meth:`score`, so a
    scan's map, picture and row are the same whoever makes them.

    Args:
        bundle: the model (:func:`chemmap.inference.bundle.read_bundle`).
        input_dir: the scanner's folder the scans' paths are relative to (for the records).
        output_dir: where maps and pictures go.
        model_name, model_version: recorded with every map.
        tolerance_nm: the largest band drift that is resampled (:func:`wavelength_drift`).
        stale_seconds: a lock held from another host is dead when its heartbeat is older (s).
        engine: how maps are computed (mode, tiles, device; :class:`Engine`).
        max_white_age_hours: flag a scan whose white reference is older than this (None: never).
    """

    def __init__(
        self,
        bundle: ModelBundle,
        input_dir: Path,
        output_dir: Path,
        model_name: str,
        model_version: str,
        tolerance_nm: float,
        *,
        stale_seconds: float = DEFAULT_STALE_SECONDS,
        engine: Engine = Engine(),
        max_white_age_hours: float | None = None,
    ) -> None:
        self.engine, device = engine, engine.device
        self.bundle, self.recipe, self.targets = bundle, bundle.recipe, list(bundle.targets)
        self.input_dir, self.output_dir = Path(input_dir), Path(output_dir)
        self.model_name, self.model_version = str(model_name), str(model_version)
        self.tolerance_nm, self.stale_seconds, self.device = tolerance_nm, stale_seconds, device
        self._model: nn.Module | None = None
        self._geometry: Geometry | None = None
        self._headers: tuple[dict[str, Any], dict[str, Any] | None] = ({}, None)
        self.max_white_age_hours = max_white_age_hours

    @property
    def model(self) -> nn.Module:
        """The fold ensemble on ``device``; its tiling geometry measured once, on the CPU."""
        if self._model is None:
            ensemble = self.bundle.ensemble()
            self._geometry = model_geometry(ensemble)  # builds its probe on the CPU
            self._model = ensemble.to(self.device).eval()
        return self._model

    def mask_file(self, scan_id: str) -> Path | None:
        """The scan's mask image (``mask.method: files``), None when the recipe draws its own mask."""
        mask = self.recipe.config.mask
        if mask.method != "files" or not mask.pattern:
            return None
        return self.input_dir / mask.pattern.replace("{scan_id}", scan_id)

    def _row(self, scan_id: str, status: str, seconds: float, **fields: Any) -> dict[str, Any]:
        return {
            "scan_id": scan_id,
            "status": status,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "seconds": round(seconds, 3),
            "scored_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "note": "",
            "error": "",
            **fields,
        }

    def score(self, files: ScanFiles) -> ScanOutcome:
        """Score one scan under its lock; bad input gives an error row, never an exception.

        Status ``skipped``: its map is up to date (checked again once the lock is held, as
        another scorer may have just made it); ``busy``: a live scorer holds its lock.
        """
        t0 = time.perf_counter()
        try:
            if files.refused:  # a link out of the input folder, an id that is no file name
                raise InputError(files.refused)
            check_scan_id(files.scan_id, self.output_dir)
            mask_file = self.mask_file(files.scan_id)
            key = input_files_key(files, self.input_dir, mask_file)
            done = self.up_to_date(files.scan_id, key)
            if done is not None:
                return _from_map("skipped", done)
            try:
                lock = acquire_lock(self.output_dir, files.scan_id, stale_seconds=self.stale_seconds)
            except LockBusy as busy:
                holder = busy.holder.describe() if busy.holder else "another scorer"
                row = self._row(files.scan_id, "busy", time.perf_counter() - t0, note=f"held by {holder}")
                return ScanOutcome("busy", row, inputs=key)
            with lock:
                done = self.up_to_date(files.scan_id, key)  # another scorer may have just made it
                if done is not None:
                    return _from_map("skipped", done)
                return self._score_new(files, mask_file, key, t0)
        except (InputError, ValueError, OSError) as err:
            return self.error_outcome(files.scan_id, str(err) or type(err).__name__, time.perf_counter() - t0)

    def error_outcome(self, scan_id: str, message: str, seconds: float = 0.0) -> ScanOutcome:
        """An error row for a scan: ``message`` on one line."""
        return ScanOutcome("error", self._row(scan_id, "error", seconds, error=" ".join(message.split())))

    def up_to_date(self, scan_id: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The attributes of a complete map of this scan by this model from these files, else None."""
        attrs = read_map_attrs(self.output_dir / f"{scan_id}.zarr")
        if (
            attrs is None
            or attrs.get("model_name") != self.model_name
            or attrs.get("model_version") != self.model_version
            or attrs.get("input_files") != key
            or attrs.get("engine", {"mode": "exact", "amp": False}) != self.engine.record()
            or not isinstance(attrs.get("summary_row"), dict)
            or not isinstance(attrs.get("sums"), dict)
            or not isinstance(attrs.get("mask_pixels"), int)
            or not (self.output_dir / f"{scan_id}.png").is_file()
        ):
            return None
        return attrs

    def _open(self, files: ScanFiles) -> tuple[Any, Any, Any, float, str, int]:
        """The raw scan, lazy, on the model's bands; the reference means ``(bands, samples)``; the
        saturation level; a note; the lines per block to read.

        Also keeps the scan's and the white reference's headers (``self._headers``) for the flags.
        """
        source = str(files.raw)
        scan = open_scan(files.raw)
        drift = wavelength_drift(scan.wavelengths, self.recipe.raw_wavelengths, self.tolerance_nm, source)
        calibrated = self.recipe.config.calibration == "white_dark"
        white = open_scan(files.white) if files.white else None
        dark = open_scan(files.dark) if files.dark else None
        check_references(scan, white, dark, files, required=calibrated)
        saturation = self.recipe.saturation_level(scan.header, scan.dtype)
        self._headers = (scan.header, white.header if white else None)
        w, d = reference_means(scan, files, self.recipe)  # (bands, samples) float64 each, or None
        block = int(scan.data.chunks[1][0])  # read whole Dask chunks of lines
        if drift <= EXACT_NM:
            return scan.data, w, d, saturation, "", block
        raw = ResampledLines(scan.data, scan.wavelengths, self.recipe.raw_wavelengths, saturation)
        if w is not None and d is not None:
            w, d = resample_references(w, d, scan.wavelengths, self.recipe)
        note = (
            f"wavelengths differ from the model's by up to {drift:.2f} nm; raw, white and dark "
            "resampled to the model's bands (linear)"
        )
        return raw, w, d, saturation, note, block

    def _stream(self, files: ScanFiles, mask_file: Path | None, folder: Path) -> tuple[StreamResult, str]:
        """Stream the scan's maps into ``folder``'s map array (one tile row per chunk)."""
        raw, white, dark, saturation, note, block = self._open(files)
        _, lines, samples = raw.shape
        model = self.model
        run = self.engine
        out = create_map_array(folder, (len(self.targets), lines, samples), chunk_lines=run.tile_lines)
        result = stream_scan(
            model, self.recipe, raw, white, dark, saturation=saturation, out=out, mode=run.mode,
            tile=(run.tile_lines, samples), device=run.device, amp=run.amp, geometry=self._geometry,
            mask_file=mask_file, block_lines=block, source=str(files.raw),
        )  # fmt: skip
        return result, note

    def _score_new(self, files: ScanFiles, mask_file: Path | None, key: dict, t0: float) -> ScanOutcome:
        sid = files.scan_id
        with staged_dir(self.output_dir / f"{sid}.zarr") as tmp:
            result, note = self._stream(files, mask_file, tmp)
            maps = read_map_array(tmp)  # (T, lines, samples) float32: the output, 2-D per target
            stats = _map_stats(maps, result.mask, result.saturated, self.targets)
            self._plot(sid, maps, stats["means"])
            _, lines, samples = maps.shape
            row = self._row(
                sid,
                "ok",
                time.perf_counter() - t0,
                **{f"mean_{t}": stats["means"][t] for t in self.targets},
                mask_pixels=stats["mask_pixels"],
                out_of_range_pct=stats["out_of_range_pct"],
                saturated_pct=stats["saturated_pct"],
                lines=lines,
                samples=samples,
                note=note,
                **self._flags(result, stats["mask_pixels"]),
            )
            attrs = {
                "scan_id": sid,
                "model_name": self.model_name,
                "model_version": self.model_version,
                "weights_sha256": self.bundle.manifest.get("sha256", {}),
                "recipe": self.recipe.to_dict(),
                "raw": Path(os.path.relpath(files.raw, self.input_dir)).as_posix(),
                "input_files": key,
                "engine": self.engine.record(),
                **stats,
                "summary_row": row,
            }
            finish_map_group(tmp, result.mask, targets=self.targets, attrs=attrs)
        return ScanOutcome("ok", row, pixels=lines * samples, sums=stats["sums"], count=stats["mask_pixels"])

    def _flags(self, scan_map: StreamResult, mask_pixels: int) -> dict[str, Any]:
        """The scan against the training data (:mod:`chemmap.inference.flags`); {} without a model of it."""
        model = self.bundle.spectral_model
        if model is None:
            return {}
        scan_header, white_header = self._headers
        age = white_reference_age_hours(scan_header, white_header) if white_header is not None else None
        return scan_flags(
            model,
            mean_spectrum=scan_map.mean_spectrum,
            mask_pixels=mask_pixels,
            saturated_share=saturated_share(mask_pixels, scan_map.bad_removed),
            white_age_hours=age,
            max_white_age_hours=self.max_white_age_hours,
        ).row()

    def _plot(self, scan_id: str, maps: np.ndarray, means: Mapping[str, float | None]) -> None:
        shown = ", ".join(f"{t} {m:.1f} %" if m is not None else f"{t} -" for t, m in means.items())
        plot_maps(
            {t: maps[i] for i, t in enumerate(self.targets)},
            self.output_dir / f"{scan_id}.png",
            title=f"{scan_id}: mean {shown}\nmodel {self.model_name}, version {self.model_version}",
            units=f"% {self.targets[0]}" if len(self.targets) == 1 else "%",
        )


# ---------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------


def progress_bar(enabled: bool):
    """A rich progress bar over scans (shown when ``enabled``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("score"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    return Progress(*columns, disable=not enabled, transient=False)


class SummaryTable:
    """``summary.csv`` and ``samples.csv`` of an output folder: this run's outcomes and the maps.

    The tables are a view rebuilt at every write (the rule is in the module's docstring),
    written under the tables' lock and replaced atomically, so two scorers writing them
    leave a table that is right for the maps on disk. A skipped scan rewrites them at most
    every :data:`SKIPPED_WRITE_EVERY_S` seconds; other outcomes at once.

    Args:
        scorer: the run's scorer (for the model, the columns and the output folder).
        sample_of: a scan -> sample table (``samples.csv`` is written with one), or None.
        log: where the lines about failed and busy scans go.
    """

    def __init__(self, scorer: ScanScorer, sample_of: Mapping[str, str] | None, log: Log) -> None:
        self.scorer, self.sample_of, self.log = scorer, sample_of, log
        self.output_dir, self.targets = scorer.output_dir, scorer.targets
        self.outcomes: dict[str, ScanOutcome] = {}  # this run's, by scan id, the latest of each
        self.scored: list[str] = []  # ids this run scored, in order
        self.pixels = 0  # lines x samples this run scored
        self._last_write = -math.inf
        self._dirty = False  # outcomes added since the last write

    @property
    def summary_csv(self) -> Path:
        return self.output_dir / SUMMARY_CSV

    @property
    def samples_csv(self) -> Path | None:
        return self.output_dir / SAMPLES_CSV if self.sample_of is not None else None

    def add(self, outcome: ScanOutcome, *, write: bool = True) -> None:
        """Record a scan's outcome, log a line if it failed or is busy, and write the tables."""
        sid = outcome.row["scan_id"]
        before = self.outcomes.get(sid)
        self.outcomes[sid], self._dirty = outcome, True
        if outcome.status == "ok":
            self.scored.append(sid)
            self.pixels += outcome.pixels
        elif outcome.status == "error":
            self.log(f"score: {sid} failed: {outcome.row['error']}")
        elif outcome.status == "busy" and (before is None or before.status != "busy"):
            self.log(f"score: {sid} busy: {outcome.row['note']}; left to that scorer")
        now = time.perf_counter()
        if write and (outcome.status != "skipped" or now - self._last_write >= SKIPPED_WRITE_EVERY_S):
            self.write()

    def flush(self) -> None:
        """Write the tables if outcomes were added since the last write."""
        if self._dirty:
            self.write()

    def view(self) -> list[ScanOutcome]:
        """The tables' rows: this run's scans sorted by id, busy ones resolved from their maps."""
        out = []
        for sid in sorted(self.outcomes):
            outcome = self.outcomes[sid]
            if outcome.status == "busy" and outcome.inputs is not None:
                done = self.scorer.up_to_date(sid, outcome.inputs)
                outcome = _from_map("busy", done) if done is not None else outcome
            out.append(outcome)
        return out

    def write(self) -> None:
        """Write both tables from the current view (under the tables' lock)."""
        with wait_for_lock(self.output_dir, TABLES_LOCK, stale_seconds=self.scorer.stale_seconds) as lock:
            if lock is None:
                self.log(f"score: {self.summary_csv} is locked for long; writing it without the lock")
            view = self.view()
            write_csv_atomic(self.summary_csv, summary_columns(self.targets), [o.row for o in view])
            if self.sample_of is not None:
                write_csv_atomic(
                    self.output_dir / SAMPLES_CSV, sample_columns(self.targets), _sample_rows(self, view)
                )
        self._last_write, self._dirty = time.perf_counter(), False

    def close(self) -> None:
        """The last write; says which scans are in no sample of the scan -> sample table."""
        if self.outcomes:
            self.write()
        if self.sample_of is not None:
            unlisted = sorted(set(self.outcomes) - set(self.sample_of))
            if unlisted:
                self.log(
                    f"score: {len(unlisted)} scans are in no sample of the scan -> sample table "
                    f"(e.g. {unlisted[0]}); {SAMPLES_CSV} leaves them out"
                )


def _from_map(status: str, attrs: Mapping[str, Any]) -> ScanOutcome:
    """A scan's outcome from its complete map's attributes (its row, sums and mask pixels)."""
    row = dict(attrs["summary_row"])
    return ScanOutcome(status, row, sums=dict(attrs["sums"]), count=int(attrs["mask_pixels"]))


def _sample_rows(table: SummaryTable, view: Sequence[ScanOutcome]) -> list[dict[str, Any]]:
    """Each sample's pixel-weighted mean over its scans with a map (sum over their masks / their pixels)."""
    assert table.sample_of is not None
    scored = {o.row["scan_id"]: o for o in view if o.sums is not None and o.row.get("status") == "ok"}
    scans_of: dict[str, list[str]] = {}
    for scan, sample in table.sample_of.items():
        scans_of.setdefault(sample, []).append(scan)
    rows = []
    for sample, scans in scans_of.items():
        done = [s for s in scans if s in scored]
        count = sum(scored[s].count for s in done)
        row: dict[str, Any] = {"sample_id": sample, "mask_pixels": count, "scans": len(done)}
        row |= {"scan_ids": ";".join(done), "missing": ";".join(s for s in scans if s not in scored)}
        for t in table.targets:
            sums = [scored[s].sums.get(t) for s in done]  # type: ignore[union-attr]
            ok = count > 0 and all(v is not None for v in sums)
            row[f"mean_{t}"] = round(sum(sums) / count, 6) if ok else None  # type: ignore[arg-type]
        rows.append(row)
    return rows


def _score_all(scorer: ScanScorer, table: SummaryTable, scans: Sequence[ScanFiles], progress: bool) -> None:
    """Every scan in turn; the tables are rewritten as the run goes."""
    with progress_bar(progress) as bar:
        task = bar.add_task("", total=len(scans))
        for i, files in enumerate(scans):
            bar.update(task, description=files.scan_id)
            table.add(scorer.score(files), write=i < len(scans) - 1)
            bar.advance(task)


def _closing_line(s: ScoreSummary) -> str:
    n = s.ok + s.skipped + s.errors + s.busy
    busy = f", {s.busy} busy (left to another scorer)" if s.busy else ""
    line = (
        f"score: {n} scans: {s.ok} scored, {s.skipped} skipped (done before), {s.errors} failed{busy} in "
        f"{s.seconds:.1f} s ({s.scans_per_second:.2f} scans/s, {s.megapixels_per_second:.3g} Mpx/s); "
        f"summary: {s.summary_csv}"
    )
    if s.failed:
        more = f" and {len(s.failed) - 5} more" if len(s.failed) > 5 else ""
        line += f"; failed: {', '.join(s.failed[:5])}{more}"
    return line


def check_score_inputs(
    input_dir: str | os.PathLike,
    *,
    samples_csv: str | os.PathLike | None,
    wavelength_tolerance_nm: float,
    stale_seconds: float,
) -> dict[str, str] | None:
    """Check a scoring run's arguments before any work; returns the scan -> sample table (or None).

    Raises:
        InputError: a negative tolerance, a stale time <= 0, an unreadable scan -> sample
            table, or no input folder.
    """
    if not wavelength_tolerance_nm >= 0:
        raise InputError(f"wavelength_tolerance_nm must be >= 0 nm, got {wavelength_tolerance_nm}")
    if not stale_seconds > 0:
        raise InputError(f"stale_seconds must be > 0 s, got {stale_seconds}")
    sample_of = read_sample_table(samples_csv) if samples_csv is not None else None
    if not Path(input_dir).is_dir():
        raise InputError(f"{input_dir}: input folder not found")
    return sample_of


def prepare_output(output_dir: Path, stale_seconds: float, log: Log) -> None:
    """Create the output folder and remove what interrupted scorers left there (not live ones' files)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if removed := remove_leftovers(output_dir, stale_seconds=stale_seconds):
        log(f"score: removed {len(removed)} unfinished files of an interrupted run from {output_dir}")


def finish_run(table: SummaryTable, seconds: float, log: Log) -> ScoreSummary:
    """The last write of the tables, the run's counts and its closing line."""
    table.close()
    remove_lock_dir(table.output_dir)
    outcomes = list(table.outcomes.values())
    failed = tuple(o.row["scan_id"] for o in outcomes if o.status == "error")
    per_s = 1.0 / seconds if seconds > 0 else 0.0
    summary = ScoreSummary(
        ok=sum(o.status == "ok" for o in outcomes),
        skipped=sum(o.status == "skipped" for o in outcomes),
        errors=len(failed),
        seconds=seconds,
        scans_per_second=len(table.scored) * per_s,
        megapixels_per_second=table.pixels / 1e6 * per_s,
        output_dir=table.output_dir,
        summary_csv=table.summary_csv,
        samples_csv=table.samples_csv,
        failed=failed,
        busy=sum(o.status == "busy" for o in outcomes),
        scored=tuple(table.scored),
    )
    log(_closing_line(summary))
    return summary


def score_folder(
    bundle: ModelBundle,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model_name: str,
    model_version: str,
    raw_pattern: str | None = None,
    white_pattern: str | None = None,
    dark_pattern: str | None = None,
    samples_csv: str | os.PathLike | None = None,
    wavelength_tolerance_nm: float = 1.0,
    stale_seconds: float = DEFAULT_STALE_SECONDS,
    engine: Engine = Engine(),
    progress: bool = True,
    log: Log = print,
) -> ScoreSummary:
    """Score every scan in a scanner's folder with a model (see the module's docstring).

    Other scorers may write into ``output_dir`` at the same time: each scan is scored by
    one of them (:func:`chemmap.inference.score_output.acquire_lock`). To keep scoring
    scans as they arrive, see :func:`chemmap.inference.watch.watch_folder`; to score on a
    Ray cluster, :func:`chemmap.inference.actors.score_on_ray`.

    Args:
        bundle: the model (:func:`chemmap.inference.bundle.read_bundle`).
        input_dir: the scanner's output folder, as the scanner wrote it.
        output_dir: where maps, pictures and tables go (created; a run into it resumes).
        model_name, model_version: the registered model's name and version, recorded with
            every map; a map by another name or version is made again.
        raw_pattern, white_pattern, dark_pattern: the folder's layout, globs relative to
            ``input_dir`` (:func:`chemmap.io.discover_scans`); None: Specim's recorder layout.
        samples_csv: a CSV with ``scan_id`` and ``sample_id`` columns; with it,
            ``samples.csv`` holds each sample's pixel-weighted mean over its scans.
        wavelength_tolerance_nm: scans whose band centres differ from the model's by more than
            0.05 nm and at most this are resampled to the model's bands; more is an error.
        stale_seconds: a scan's lock held by a scorer on another host whose heartbeat is
            older than this (s) is taken over (on this host: when its process is gone).
        engine: how each map is computed (mode, tile lines, device, bf16; :class:`Engine`).
        progress: show a progress bar over scans.
        log: where the error and busy lines and the closing line go.

    Returns:
        Counts, throughput and where the tables are.

    Raises:
        InputError: the input folder is missing or holds no scan, the tolerance is negative,
            or the scan -> sample table is unreadable. A bad scan is an error row instead.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    sample_of = check_score_inputs(
        input_dir,
        samples_csv=samples_csv,
        wavelength_tolerance_nm=wavelength_tolerance_nm,
        stale_seconds=stale_seconds,
    )
    scans = discover_scans(input_dir, raw_pattern, white_pattern, dark_pattern)
    prepare_output(output_dir, stale_seconds, log)
    scorer = ScanScorer(
        bundle,
        input_dir,
        output_dir,
        str(model_name),
        str(model_version),
        wavelength_tolerance_nm,
        stale_seconds=stale_seconds,
        engine=engine,
    )
    table = SummaryTable(scorer, sample_of, log)
    t0 = time.perf_counter()
    _score_all(scorer, table, scans, progress)
    return finish_run(table, time.perf_counter() - t0, log)
