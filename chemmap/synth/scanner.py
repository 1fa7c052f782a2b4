"""The built-in synthetic pushbroom scanner: chemmap's dataset (see DESIGN.md).

:func:`synthesize` writes what a Specim recorder on a meat line writes, for ``n_samples``
pork bellies:

    root/<scan_id>/capture/<scan_id>.hdr|.raw              uint16 counts, BIL, 12 bit
    root/<scan_id>/capture/WHITEREF_<scan_id>.hdr|.raw     white tile, REF_LINES lines
    root/<scan_id>/capture/DARKREF_<scan_id>.hdr|.raw      shutter closed, REF_LINES lines
    root/references.csv      scan_id,sample_id,fat,protein,water,split (lab values, %)
    root/truth/<scan_id>.npz fat, protein, water (float32 %, NaN off the sample), mask (bool)
    root/_SUCCESS.json       the spec and counts; written last

Scans are written block of lines by block of lines (a paper-size scan never sits in
memory), into a temporary folder beside ``root`` that is renamed at the end. Every random
draw comes from a generator seeded by ``(seed, sample, scan, purpose)``, so the same spec
gives byte-identical files whatever the number of worker threads.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from chemmap.errors import ConfigError, InputError
from chemmap.io.envi import create_envi
from chemmap.synth import physics as ph
from chemmap.synth.scene import Scene, make_scene, smooth_field

# Bumped whenever the physics or the layout changes: a finished folder of another version is stale.
SYNTH_VERSION = 1
SUCCESS_FILE = "_SUCCESS.json"
# Elements (pixels x bands) per block of lines: ~4 M float32 = 16 MB per temporary array.
BLOCK_ELEMENTS = 4_000_000

# Purposes of the random streams (the last word of each SeedSequence).
_CAMERA, _SAMPLE, _SCENE, _PIXELS, _REFS, _SPLIT, _LAB = range(7)


@dataclass(frozen=True)
class SynthSpec:
    """What to synthesize.

    Attributes:
        instrument: ``"vnir"`` (300 bands, 400-1000 nm) or ``"nir"`` (224 bands, 900-1700 nm).
        n_samples: pork bellies (samples with one lab value each).
        lines: image rows, along the belt (px).
        samples: image columns, across the belt (detector pixels).
        bands: number of bands; None: the instrument's preset.
        wavelength_range: ``(first, last)`` band centre in nm; None: the preset.
        scans_per_sample: scans of each sample (e.g. both sides of a belly).
        seed: everything random follows from it.
    """

    instrument: Literal["vnir", "nir"] = "vnir"
    n_samples: int = 180
    lines: int = 128
    samples: int = 96
    bands: int | None = None
    wavelength_range: tuple[float, float] | None = None
    scans_per_sample: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.wavelength_range is not None:
            wr = tuple(float(v) for v in self.wavelength_range)
            if len(wr) != 2 or not wr[0] < wr[1]:
                raise ConfigError(f"synth.wavelength_range must be (min, max) nm with min < max, got {wr}")
            object.__setattr__(self, "wavelength_range", wr)
        if self.instrument not in ("vnir", "nir"):
            raise ConfigError(f"synth.instrument must be 'vnir' or 'nir', got {self.instrument!r}")
        for name, least in (("n_samples", 6), ("lines", 16), ("samples", 16), ("scans_per_sample", 1)):
            if int(getattr(self, name)) < least:
                raise ConfigError(f"synth.{name} must be >= {least}, got {getattr(self, name)}")
        if self.bands is not None and self.bands < 8:
            raise ConfigError(f"synth.bands must be >= 8, got {self.bands}")

    def wavelengths(self) -> np.ndarray:
        """Band centres, nm, float64 ``(bands,)``."""
        return ph.wavelengths_for(self.instrument, self.bands, self.wavelength_range)

    def to_json(self) -> dict:
        d = asdict(self)
        d["wavelength_range"] = list(self.wavelength_range) if self.wavelength_range else None
        return d


def sample_id(i: int) -> str:
    return f"belly{i:04d}"


def scan_id(i: int, j: int) -> str:
    return f"{sample_id(i)}_{'abcdefgh'[j]}"


def _rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, words)])))


@dataclass
class _Camera:
    """Per-camera constants shared by all scans: wavelengths, white signal, dark level, defects."""

    wl: np.ndarray  # (bands,) nm
    white: np.ndarray  # (bands, samples) float32, expected white-tile signal above dark (counts)
    dark: np.ndarray  # (bands, samples) float32, dark level (counts)
    dead: np.ndarray  # (bands, samples) bool
    basis: np.ndarray  # (k, bands) float32: rows of the absorbance model (see _BASIS)


# Rows of the basis matrix; the per-pixel coefficient of each is given in _coefficients.
_BASIS = ("fat", "water", "protein", "myoglobin", "fat_shift", "water_shift", "log_m", "slope")


def _camera(spec: SynthSpec) -> _Camera:
    rng = _rng(spec.seed, _CAMERA)
    wl = spec.wavelengths()
    nb, ns = wl.size, spec.samples
    spectral = ph.illumination_spectrum(wl, spec.instrument)  # (bands,)
    xs = (np.arange(ns) + 0.5) / ns * 2.0 - 1.0  # -1 .. 1 across the line
    across = 1.0 - (1.0 - ph.ILLUMINATION_EDGE) * xs**2  # (samples,)
    prnu = 1.0 + ph.PRNU_SD * rng.standard_normal((nb, ns))
    white = (ph.WHITE_LEVEL_COUNTS * spectral[:, None] * across[None, :] * prnu).astype(np.float32)
    dark = (ph.DARK_LEVEL_COUNTS + ph.DARK_FPN_SD * rng.standard_normal((nb, ns))).astype(np.float32)
    dead = np.zeros((nb, ns), bool)
    if ns > 8:
        for c in rng.choice(np.arange(2, ns - 2), size=ph.DEAD_COLUMNS, replace=False):
            dead[:, c] = True
        dead.flat[rng.choice(nb * ns, size=ph.DEAD_ELEMENTS, replace=False)] = True
    basis = np.stack(
        [
            ph.band_spectrum(wl, ph.FAT_BANDS),
            ph.band_spectrum(wl, ph.WATER_BANDS),
            ph.band_spectrum(wl, ph.PROTEIN_BANDS),
            ph.band_spectrum(wl, ph.MYOGLOBIN_BANDS),
            ph.band_derivative(wl, ph.FAT_BANDS),
            ph.band_derivative(wl, ph.WATER_BANDS),
            np.ones_like(wl),
            np.log(wl / ph.SCATTER_REF_NM),
        ]
    ).astype(np.float32)
    return _Camera(wl=wl, white=white, dark=dark, dead=dead, basis=basis)


@dataclass
class _Sample:
    """Sample-level (animal-level) draws, shared by all scans of a sample."""

    fat_pct: float
    water_share: float
    myoglobin: float
    fat_shift: float
    water_shift: float
    m: float
    a: float
    b: float
    path: float
    side_fat: list[float] = field(default_factory=list)  # target fat per scan


def _sample(spec: SynthSpec, i: int) -> _Sample:
    rng = _rng(spec.seed, _SAMPLE, i)
    fat = rng.uniform(*ph.SAMPLE_FAT_RANGE_PCT)
    # The sides of a belly differ (skin vs flesh side); their mean is the sample's fat.
    sides = fat + rng.normal(0.0, 3.0, spec.scans_per_sample)
    sides = sides - sides.mean() + fat
    return _Sample(
        fat_pct=fat,
        water_share=float(rng.normal(ph.WATER_SHARE_OF_LEAN, ph.WATER_SHARE_SD)),
        myoglobin=float(np.exp(rng.normal(0.0, ph.MYOGLOBIN_SD))),
        fat_shift=float(rng.normal(0.0, ph.FAT_SHIFT_SD_NM)),
        water_shift=float(rng.normal(0.0, ph.WATER_SHIFT_SD_NM)),
        m=float(np.exp(rng.normal(0.0, ph.SCATTER_M_SAMPLE_SD))),
        a=float(rng.normal(0.0, ph.SCATTER_A_SAMPLE_SD)),
        b=float(rng.normal(ph.SCATTER_B_MEAN, ph.SCATTER_B_SAMPLE_SD)),
        path=float(np.exp(rng.normal(0.0, ph.PATH_SAMPLE_SD))),
        side_fat=[float(np.clip(s, 3.0, 80.0)) for s in sides],
    )


def _block_lines(spec: SynthSpec, nb: int) -> int:
    return int(max(1, min(spec.lines, BLOCK_ELEMENTS // max(1, spec.samples * nb))))


def _write_scan(
    spec: SynthSpec, cam: _Camera, smp: _Sample, i: int, j: int, out: Path, tick=None
) -> tuple[Scene, str]:
    """Simulate and write one scan (raw + white + dark); return its scene and id."""
    sid = scan_id(i, j)
    nl, ns, nb = spec.lines, spec.samples, cam.wl.size
    scene = make_scene(_rng(spec.seed, _SCENE, i, j), nl, ns, smp.side_fat[j], smp.water_share)
    rng_scene = _rng(spec.seed, _SCENE, i, j, 1)
    size = min(nl, ns)
    m_smooth = np.exp(ph.SCATTER_M_SMOOTH_SD * smooth_field(rng_scene, (nl, ns), size / 5.0))
    path_smooth = np.exp(ph.PATH_SMOOTH_SD * smooth_field(rng_scene, (nl, ns), size / 5.0))
    belt = ph.BELT_REFLECTANCE + ph.BELT_REFLECTANCE_SD * rng_scene.standard_normal((nl, ns))
    # Hot pixels: (line, sample) spikes that saturate every band (per scan).
    hot = np.zeros((nl, ns), bool)
    n_hot = 1 + rng_scene.poisson(ph.HOT_PIXELS_PER_MPX * nl * ns / 1e6)
    hot.flat[rng_scene.choice(nl * ns, size=min(n_hot, nl * ns), replace=False)] = True

    cap = out / sid / "capture"
    extra = {"ceiling": ph.CEILING, "sensor type": f"chemmap synthetic {spec.instrument}"}
    raw = create_envi(cap / f"{sid}.hdr", bands=nb, lines=nl, samples=ns, wavelengths=cam.wl, extra=extra)
    rng_px = _rng(spec.seed, _PIXELS, i, j)
    basis = cam.basis
    white_t = cam.white.T  # (samples, bands)
    dark_t = cam.dark.T
    dead_t = cam.dead.T
    step = _block_lines(spec, nb)
    for l0 in range(0, nl, step):
        l1 = min(nl, l0 + step)
        sl = slice(l0, l1)
        n_px = (l1 - l0) * ns
        ad = scene.adipose[sl].reshape(-1)
        fat = scene.fat[sl].reshape(-1) / 100.0
        water = scene.water[sl].reshape(-1) / 100.0
        protein = scene.protein[sl].reshape(-1) / 100.0
        g = rng_px.standard_normal((5, n_px), dtype=np.float32)
        path = (
            smp.path
            * path_smooth[sl].reshape(-1)
            * np.exp(ph.PATH_PIXEL_SD * g[0])
            * (1.0 - ph.PATH_EDGE_LOSS * scene.edge[sl].reshape(-1))
        )
        m = (
            (ph.SCATTER_M_LEAN + (ph.SCATTER_M_FAT - ph.SCATTER_M_LEAN) * ad)
            * smp.m
            * m_smooth[sl].reshape(-1)
            * np.exp(ph.SCATTER_M_PIXEL_SD * g[1])
        )
        a = (
            ph.SCATTER_A_LEAN
            + (ph.SCATTER_A_FAT - ph.SCATTER_A_LEAN) * ad
            + smp.a
            + ph.SCATTER_A_PIXEL_SD * g[2]
        )
        b = smp.b + ph.SCATTER_B_PIXEL_SD * g[3]
        coef = np.stack(
            [
                path * fat,
                path * water,
                path * protein,
                path * (1.0 - ad) * smp.myoglobin,
                -path * fat * smp.fat_shift,
                -path * water * smp.water_shift,
                -np.log(m),
                b,
            ],
            axis=1,
        ).astype(np.float32)  # (P, k)
        refl = coef @ basis  # (P, bands) absorbance incl. scatter terms
        np.negative(refl, out=refl)
        np.exp(refl, out=refl)
        refl += a[:, None]
        cov = scene.coverage[sl].reshape(-1)[:, None]
        refl *= cov
        refl += (1.0 - cov) * belt[sl].reshape(-1)[:, None]
        refl += scene.glare[sl].reshape(-1)[:, None]
        # Counts: signal above dark, then shot + read noise (EMVA 1288), then dark, quantise, clip.
        sig = refl.reshape(l1 - l0, ns, nb)
        sig *= white_t[None]
        np.maximum(sig, 0.0, out=sig)
        noise = rng_px.standard_normal(sig.shape, dtype=np.float32)
        noise *= np.sqrt(sig / ph.ELECTRONS_PER_COUNT + ph.READ_NOISE_COUNTS**2)
        sig += noise
        sig += dark_t[None]
        sig[:, dead_t] = dark_t[dead_t][None, :]
        sig[hot[sl]] = ph.CEILING
        np.rint(sig, out=sig)
        np.clip(sig, 0, ph.CEILING, out=sig)
        raw[l0:l1] = sig.astype(np.uint16).transpose(0, 2, 1)  # (lines, bands, samples): BIL
        if tick is not None:
            tick(l1 - l0)
    raw.flush()
    del raw

    rng_ref = _rng(spec.seed, _REFS, i, j)
    for prefix, level in (("WHITEREF", cam.white), ("DARKREF", None)):
        ref = create_envi(
            cap / f"{prefix}_{sid}.hdr",
            bands=nb,
            lines=ph.REF_LINES,
            samples=ns,
            wavelengths=cam.wl,
            extra=extra,
        )
        sig = (
            np.zeros((ph.REF_LINES, nb, ns), np.float32)
            if level is None
            else np.repeat(level[None], ph.REF_LINES, 0)
        )
        noise = rng_ref.standard_normal(sig.shape, dtype=np.float32)
        sig = sig + noise * np.sqrt(sig / ph.REF_ELECTRONS_PER_COUNT + ph.READ_NOISE_COUNTS**2)
        sig += cam.dark[None]
        sig[:, cam.dead] = np.broadcast_to(cam.dark[None], sig.shape)[:, cam.dead]
        ref[:] = np.clip(np.rint(sig), 0, ph.CEILING).astype(np.uint16)
        ref.flush()
        del ref
    return scene, sid


def _splits(spec: SynthSpec) -> np.ndarray:
    """Split per sample: 0 = test (~1/6 of samples), 1-5 = CV folds, by a seeded shuffle of samples."""
    n = spec.n_samples
    order = _rng(spec.seed, _SPLIT).permutation(n)
    n_test = max(1, round(n / 6))
    split = np.empty(n, np.int64)
    split[order[:n_test]] = 0
    split[order[n_test:]] = 1 + np.arange(n - n_test) % 5
    return split


def _write_truth(path: Path, scene: Scene) -> None:
    """``np.load``-able ``.npz`` of the true maps, byte-identical for identical maps.

    ``np.savez`` stamps each member with the current time; a fixed ``date_time`` keeps the
    file a pure function of its content.
    """
    arrays = {"mask": scene.mask}
    for k in ("fat", "protein", "water"):
        arrays[k] = np.where(scene.mask, getattr(scene, k), np.nan).astype(np.float32)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)


def _success_record(spec: SynthSpec, n_scans: int) -> dict:
    return {"version": SYNTH_VERSION, "spec": spec.to_json(), "samples": spec.n_samples, "scans": n_scans}


def is_complete(root: str | os.PathLike, spec: SynthSpec) -> bool:
    """Whether ``root`` holds a finished dataset made from ``spec`` (same version)."""
    f = Path(root) / SUCCESS_FILE
    if not f.is_file():
        return False
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return rec.get("version") == SYNTH_VERSION and rec.get("spec") == spec.to_json()


def _coerce(spec: SynthSpec | dict) -> SynthSpec:
    if isinstance(spec, SynthSpec):
        return spec
    return SynthSpec(**dict(spec))


def synthesize(
    root: str | os.PathLike,
    spec: SynthSpec,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write a synthetic dataset (scans, white/dark references, lab values, truth maps) to ``root``.

    Idempotent: if ``root/_SUCCESS.json`` records the same spec, nothing is done. Otherwise
    everything is written into ``<root>.synth-tmp`` beside ``root`` and moved into place at the
    end, ``_SUCCESS.json`` last, so an interrupted run never leaves a dataset that looks whole.

    Args:
        root: output folder (created).
        spec: what to make; a mapping of :class:`SynthSpec` fields is accepted too.
        progress: show a progress bar (rich) over lines written.
        workers: scans simulated in parallel threads; None: ``min(4, cpu count)``. The output
            does not depend on it.

    Returns:
        ``root`` as a Path.

    Raises:
        InputError: ``root`` holds a finished dataset of another spec.
    """
    spec = _coerce(spec)
    root = Path(root)
    if is_complete(root, spec):
        return root
    if (root / SUCCESS_FILE).is_file():
        raise InputError(
            f"{root} holds a synthetic dataset of another spec or version ({root / SUCCESS_FILE}); "
            "use another folder or delete it"
        )
    tmp = root.with_name(root.name + ".synth-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "truth").mkdir()

    cam = _camera(spec)
    samples = [_sample(spec, i) for i in range(spec.n_samples)]
    jobs = [(i, j) for i in range(spec.n_samples) for j in range(spec.scans_per_sample)]
    total_lines = len(jobs) * spec.lines
    n_workers = workers or min(4, os.cpu_count() or 1)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]synthesizing[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    )
    with bar:
        task = bar.add_task(f"{len(jobs)} scans, {spec.instrument}", total=total_lines)

        def tick(n: int) -> None:
            bar.advance(task, n)

        def run(job: tuple[int, int]) -> tuple[int, int, np.ndarray, np.ndarray]:
            i, j = job
            scene, sid = _write_scan(spec, cam, samples[i], i, j, tmp, tick)
            _write_truth(tmp / "truth" / f"{sid}.npz", scene)
            m = scene.mask
            sums = np.array([scene.fat[m].sum(), scene.protein[m].sum(), scene.water[m].sum()], np.float64)
            return i, j, sums, np.array(m.sum())

        if n_workers > 1:
            with ThreadPoolExecutor(n_workers) as pool:
                results = list(pool.map(run, jobs))
        else:
            results = [run(job) for job in jobs]

    # Lab values: the mean of the sample's true maps over all its scans' masked pixels + lab error.
    sums = np.zeros((spec.n_samples, 3))
    counts = np.zeros(spec.n_samples)
    for i, _j, s, n in results:
        sums[i] += s
        counts[i] += n
    truth_mean = sums / np.maximum(counts, 1)[:, None]
    lab_rng = _rng(spec.seed, _LAB)
    err = lab_rng.standard_normal((spec.n_samples, 3)) * np.array(
        [ph.LAB_SD_FAT_PCT, ph.LAB_SD_PROTEIN_PCT, ph.LAB_SD_WATER_PCT]
    )
    lab = np.clip(truth_mean + err, 0.0, 100.0)
    split = _splits(spec)
    rows = ["scan_id,sample_id,fat,protein,water,split"]
    for i, j in jobs:
        f, p, w = lab[i]
        rows.append(f"{scan_id(i, j)},{sample_id(i)},{f:.3f},{p:.3f},{w:.3f},{split[i]}")
    (tmp / "references.csv").write_text("\n".join(rows) + "\n")

    record = _success_record(spec, len(jobs))
    _finish(tmp, root, record)
    return root


def _finish(tmp: Path, root: Path, record: dict) -> None:
    """Move the finished dataset from ``tmp`` into ``root``; ``_SUCCESS.json`` last."""
    if not root.exists():
        os.replace(tmp, root)
    else:
        for entry in sorted(tmp.iterdir()):
            dest = root / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            os.replace(entry, dest)
        tmp.rmdir()
    payload = json.dumps(record, indent=2, sort_keys=True) + "\n"
    part = root / (SUCCESS_FILE + ".tmp")
    part.write_text(payload)
    os.replace(part, root / SUCCESS_FILE)


def spec_with(spec: SynthSpec, **changes: object) -> SynthSpec:
    """A copy of ``spec`` with fields changed (validated again)."""
    return replace(spec, **changes)


__all__: Sequence[str] = ("SUCCESS_FILE", "SYNTH_VERSION", "SynthSpec", "is_complete", "synthesize")
