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
gives byte-identical files whatever the number of worker threads. The splits follow
chemmap's one split rule, :func:`chemmap.io.references.shuffled_splits`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from chemmap.errors import ConfigError, InputError
from chemmap.files import atomic_path, write_json_atomic
from chemmap.io.envi import create_envi
from chemmap.io.references import shuffled_splits
from chemmap.synth import physics as ph
from chemmap.synth.scene import Scene, Tissues, make_scene, smooth_field

if TYPE_CHECKING:
    from rich.progress import Progress

    from chemmap.config import SynthConfig

# Bumped whenever the physics or the layout changes: a finished folder of another version is stale,
# and the synth stage's key holds it (chemmap.pipeline.synth_dir), so no cached scan of another
# version is reused. 2: scanner v2 (issue 14; see chemmap.synth.physics).
SYNTH_VERSION = 2
SUCCESS_FILE = "_SUCCESS.json"
# Elements (pixels x bands) per block of lines: ~4 M float32 = 16 MB per temporary array.
BLOCK_ELEMENTS = 4_000_000

# Purposes of the random streams (the last word of each SeedSequence). Word 5 is the splits'
# stream, drawn by chemmap.io.references.shuffled_splits (its SPLIT_STREAM).
_CAMERA, _SAMPLE, _SCENE, _PIXELS, _REFS, _LAB, _BULK = 0, 1, 2, 3, 4, 6, 7

# Called with the number of lines just written (a progress bar's advance).
Tick = Callable[[int], None]


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

    @classmethod
    def from_config(cls, section: SynthConfig) -> SynthSpec:
        """The spec a config's ``synth:`` section (:class:`chemmap.config.SynthConfig`) describes.

        Every field of the spec is read from the section's field of the same name.
        """
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})

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


# ---------------------------------------------------------------------------------------------
# Camera and sample draws
# ---------------------------------------------------------------------------------------------


@dataclass
class _Camera:
    """Per-camera constants shared by all scans: wavelengths, white signal, dark level, defects."""

    wl: np.ndarray  # (bands,) nm
    white: np.ndarray  # (bands, samples) float32, expected white-tile signal above dark (counts)
    dark: np.ndarray  # (bands, samples) float32, dark level (counts)
    dead: np.ndarray  # (bands, samples) bool
    basis: np.ndarray  # (k, bands) float32: rows of the absorbance model (see _BASIS)
    electrons_per_count: float  # photo-electrons behind a count (the camera's shot noise)


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
    return _Camera(
        wl=wl,
        white=white,
        dark=dark,
        dead=dead,
        basis=basis,
        electrons_per_count=ph.electrons_per_count(spec.instrument),
    )


@dataclass
class _Sample:
    """Sample-level (animal-level) draws, shared by all scans of a sample."""

    tissues: Tissues
    lean_lightness: float  # multiplies lean's scatter (pale to dark pork)
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
    adipose_fat = rng.normal(ph.ADIPOSE_FAT_PCT, ph.ADIPOSE_FAT_BELLY_SD)
    lean_fat = ph.LEAN_FAT_PCT * np.exp(rng.normal(0.0, ph.LEAN_FAT_BELLY_LOG_SD))
    tissues = Tissues(
        adipose_fat=float(np.clip(adipose_fat, *ph.ADIPOSE_FAT_RANGE_PCT)),
        lean_fat=float(np.clip(lean_fat, *ph.LEAN_FAT_RANGE_PCT)),
        water_share=float(rng.normal(ph.WATER_SHARE_OF_LEAN, ph.WATER_SHARE_SD)),
    )
    return _Sample(
        tissues=tissues,
        lean_lightness=float(np.exp(rng.normal(0.0, ph.LEAN_LIGHTNESS_BELLY_SD))),
        myoglobin=float(np.exp(rng.normal(0.0, ph.MYOGLOBIN_SD))),
        fat_shift=float(rng.normal(0.0, ph.FAT_SHIFT_SD_NM)),
        water_shift=float(rng.normal(0.0, ph.WATER_SHIFT_SD_NM)),
        m=float(np.exp(rng.normal(0.0, ph.SCATTER_M_SAMPLE_SD))),
        a=float(rng.normal(0.0, ph.SCATTER_A_SAMPLE_SD)),
        b=float(rng.normal(ph.SCATTER_B_MEAN, ph.SCATTER_B_SAMPLE_SD)),
        path=float(np.exp(rng.normal(0.0, ph.PATH_SAMPLE_SD))),
        side_fat=[float(np.clip(s, 3.0, 80.0)) for s in sides],
    )


@dataclass(frozen=True)
class _ScanFields:
    """Per-scan smooth fields and defects, each ``(lines, samples)``."""

    m_smooth: np.ndarray  # multiplicative scatter factor, smooth over the scan
    lean_smooth: np.ndarray  # lean's lightness, smooth over the scan (muscle to muscle)
    path_smooth: np.ndarray  # optical path length factor, smooth over the scan
    belt: np.ndarray  # reflectance of the belt under the slab
    hot: np.ndarray  # bool, hot pixels: spikes that saturate every band


def _scan_fields(spec: SynthSpec, i: int, j: int) -> _ScanFields:
    nl, ns = spec.lines, spec.samples
    rng = _rng(spec.seed, _SCENE, i, j, 1)
    size = min(nl, ns)
    m_smooth = np.exp(ph.SCATTER_M_SMOOTH_SD * smooth_field(rng, (nl, ns), size / 5.0))
    path_smooth = np.exp(ph.PATH_SMOOTH_SD * smooth_field(rng, (nl, ns), size / 5.0))
    lean_smooth = np.exp(ph.LEAN_LIGHTNESS_WITHIN_SD * smooth_field(rng, (nl, ns), size / 4.0))
    belt = ph.BELT_REFLECTANCE + ph.BELT_REFLECTANCE_SD * rng.standard_normal((nl, ns))
    hot = np.zeros((nl, ns), bool)
    n_hot = 1 + rng.poisson(ph.HOT_PIXELS_PER_MPX * nl * ns / 1e6)
    hot.flat[rng.choice(nl * ns, size=min(n_hot, nl * ns), replace=False)] = True
    return _ScanFields(
        m_smooth=m_smooth, lean_smooth=lean_smooth, path_smooth=path_smooth, belt=belt, hot=hot
    )


# ---------------------------------------------------------------------------------------------
# One scan: reflectance, counts, files
# ---------------------------------------------------------------------------------------------


def _block_lines(spec: SynthSpec, nb: int) -> int:
    return int(max(1, min(spec.lines, BLOCK_ELEMENTS // max(1, spec.samples * nb))))


@dataclass(frozen=True)
class _PixelDraws:
    """Per-pixel random draws of a block, each ``(P,)`` float32, independent between pixels."""

    path: np.ndarray  # standard normal: optical path length
    texture: np.ndarray  # standard normal: multiplicative scatter (micro-texture)
    offset: np.ndarray  # standard normal: additive scatter
    slope: np.ndarray  # standard normal: wavelength slope of the scatter
    tilt: np.ndarray  # standard normal: facet tilt (shading)
    specular: np.ndarray  # standard exponential: share of facets mirroring the lights

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int) -> _PixelDraws:
        g = rng.standard_normal((5, n), dtype=np.float32)
        return cls(*g, rng.standard_exponential(n, dtype=np.float32))


def _shading(tilt: np.ndarray) -> np.ndarray:
    """Light received by a facet tilted ``TILT_SD_RAD * tilt`` against a flat one (cosine law)."""
    t0 = ph.LIGHT_INCIDENCE_RAD
    return np.maximum(np.cos(t0 + ph.TILT_SD_RAD * tilt) / np.cos(t0), 0.05)


def _coefficients(smp: _Sample, scene: Scene, fld: _ScanFields, sl: slice, d: _PixelDraws) -> np.ndarray:
    """Per-pixel weights of the rows of ``_BASIS``: float32 ``(P, k)``, absorbance = ``coef @ basis``.

    The ``log_m`` row carries the multiplicative terms: tissue scatter and shading.
    """
    lean = scene.lean[sl].reshape(-1)
    fat = scene.fat[sl].reshape(-1) / 100.0
    water = scene.water[sl].reshape(-1) / 100.0
    protein = scene.protein[sl].reshape(-1) / 100.0
    path = (
        smp.path
        * fld.path_smooth[sl].reshape(-1)
        * np.exp(ph.PATH_PIXEL_SD * d.path)
        * (1.0 - ph.PATH_EDGE_LOSS * scene.edge[sl].reshape(-1))
    )
    tissue_m = (
        lean * ph.SCATTER_M_LEAN * smp.lean_lightness * fld.lean_smooth[sl].reshape(-1)
        + scene.adipose[sl].reshape(-1) * ph.SCATTER_M_FAT
        + scene.rind[sl].reshape(-1) * ph.SCATTER_M_RIND
        + scene.membrane[sl].reshape(-1) * ph.SCATTER_M_MEMBRANE
    )
    m = tissue_m * smp.m * fld.m_smooth[sl].reshape(-1) * np.exp(ph.SCATTER_M_PIXEL_SD * d.texture)
    b = smp.b + ph.SCATTER_B_PIXEL_SD * d.slope
    return np.stack(
        [
            path * fat,
            path * water,
            path * protein,
            path * lean * smp.myoglobin,
            -path * fat * smp.fat_shift,
            -path * water * smp.water_shift,
            -np.log(m * _shading(d.tilt)),
            b,
        ],
        axis=1,
    ).astype(np.float32)  # (P, k)


def _additive_scatter(smp: _Sample, scene: Scene, sl: slice, d: _PixelDraws) -> np.ndarray:
    """Diffuse additive scatter per pixel ``(P,)`` (before shading): by tissue, sample, pixel."""
    collagen = scene.rind[sl].reshape(-1) + scene.membrane[sl].reshape(-1)
    return (
        scene.lean[sl].reshape(-1) * ph.SCATTER_A_LEAN
        + scene.adipose[sl].reshape(-1) * ph.SCATTER_A_FAT
        + collagen * ph.SCATTER_A_COLLAGEN
        + smp.a
        + ph.SCATTER_A_PIXEL_SD * d.offset
    )


def _reflectance(
    cam: _Camera, smp: _Sample, scene: Scene, fld: _ScanFields, sl: slice, d: _PixelDraws
) -> np.ndarray:
    """Reflectance of the block's pixels, float32 ``(P, bands)``: meat, belt at the rim, glare.

    Meat: ``shade * (m (λ/λ0)^-b exp(-L Σ c ε) + a) + specular``; the shading multiplies both
    diffuse terms (it is in the ``log_m`` row of the basis, and applied to ``a`` here).
    """
    a = _additive_scatter(smp, scene, sl, d) * _shading(d.tilt)
    a += ph.FRESNEL_WATER * ph.SPECULAR_MEAN_SHARE * d.specular
    refl = _coefficients(smp, scene, fld, sl, d) @ cam.basis  # (P, bands) absorbance incl. scatter
    np.negative(refl, out=refl)
    np.exp(refl, out=refl)
    refl += a[:, None]
    cov = scene.coverage[sl].reshape(-1)[:, None]
    refl *= cov
    refl += (1.0 - cov) * fld.belt[sl].reshape(-1)[:, None]
    refl += scene.glare[sl].reshape(-1)[:, None]
    return refl


def _counts(sig: np.ndarray, cam: _Camera, hot: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reflectance ``(lines, samples, bands)`` (overwritten) -> uint16 counts in BIL order.

    Signal above dark, then shot + read noise (EMVA 1288), then dark, dead and hot pixels,
    quantise, clip. Returns ``(lines, bands, samples)``.
    """
    white_t, dark_t, dead_t = cam.white.T, cam.dark.T, cam.dead.T  # (samples, bands)
    sig *= white_t[None]
    np.maximum(sig, 0.0, out=sig)
    noise = rng.standard_normal(sig.shape, dtype=np.float32)
    noise *= np.sqrt(sig / cam.electrons_per_count + ph.READ_NOISE_COUNTS**2)
    sig += noise
    sig += dark_t[None]
    sig[:, dead_t] = dark_t[dead_t][None, :]
    sig[hot] = ph.CEILING
    np.rint(sig, out=sig)
    np.clip(sig, 0, ph.CEILING, out=sig)
    return sig.astype(np.uint16).transpose(0, 2, 1)


def _write_raw(
    raw: np.ndarray,
    spec: SynthSpec,
    cam: _Camera,
    smp: _Sample,
    scene: Scene,
    fld: _ScanFields,
    rng: np.random.Generator,
    tick: Tick | None,
) -> None:
    """Fill the raw scan's memmap ``(lines, bands, samples)`` block of lines by block of lines."""
    nl, ns, nb = spec.lines, spec.samples, cam.wl.size
    step = _block_lines(spec, nb)
    for l0 in range(0, nl, step):
        l1 = min(nl, l0 + step)
        sl = slice(l0, l1)
        refl = _reflectance(cam, smp, scene, fld, sl, _PixelDraws.draw(rng, (l1 - l0) * ns))
        raw[l0:l1] = _counts(refl.reshape(l1 - l0, ns, nb), cam, fld.hot[sl], rng)
        if tick is not None:
            tick(l1 - l0)


def _reference_counts(cam: _Camera, level: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """uint16 ``(REF_LINES, bands, samples)`` of a white tile (``level`` above dark) or the dark."""
    shape = (ph.REF_LINES, *cam.dark.shape)
    sig = np.zeros(shape, np.float32) if level is None else np.repeat(level[None], ph.REF_LINES, 0)
    noise = rng.standard_normal(sig.shape, dtype=np.float32)
    sig = sig + noise * np.sqrt(sig / cam.electrons_per_count + ph.READ_NOISE_COUNTS**2)
    sig += cam.dark[None]
    sig[:, cam.dead] = np.broadcast_to(cam.dark[None], sig.shape)[:, cam.dead]
    return np.clip(np.rint(sig), 0, ph.CEILING).astype(np.uint16)


def _write_references(
    spec: SynthSpec, cam: _Camera, i: int, j: int, cap: Path, sid: str, extra: dict[str, object]
) -> None:
    """Write the scan's WHITEREF and DARKREF files."""
    rng = _rng(spec.seed, _REFS, i, j)
    for prefix, level in (("WHITEREF", cam.white), ("DARKREF", None)):
        ref = create_envi(
            cap / f"{prefix}_{sid}.hdr",
            bands=cam.wl.size,
            lines=ph.REF_LINES,
            samples=spec.samples,
            wavelengths=cam.wl,
            extra=extra,
        )
        ref[:] = _reference_counts(cam, level, rng)
        ref.flush()
        del ref


def _write_scan(
    spec: SynthSpec, cam: _Camera, smp: _Sample, i: int, j: int, out: Path, tick: Tick | None = None
) -> tuple[Scene, str]:
    """Simulate and write one scan (raw + white + dark); return its scene and id."""
    sid = scan_id(i, j)
    rng_scene = _rng(spec.seed, _SCENE, i, j)
    scene = make_scene(rng_scene, spec.lines, spec.samples, smp.side_fat[j], smp.tissues)
    cap = out / sid / "capture"
    extra = {"ceiling": ph.CEILING, "sensor type": f"chemmap synthetic {spec.instrument}"}
    raw = create_envi(
        cap / f"{sid}.hdr",
        bands=cam.wl.size,
        lines=spec.lines,
        samples=spec.samples,
        wavelengths=cam.wl,
        extra=extra,
    )
    _write_raw(raw, spec, cam, smp, scene, _scan_fields(spec, i, j), _rng(spec.seed, _PIXELS, i, j), tick)
    raw.flush()
    del raw
    _write_references(spec, cam, i, j, cap, sid, extra)
    return scene, sid


def _write_truth(path: Path, scene: Scene) -> None:
    """``np.load``-able ``.npz`` of the true maps, byte-identical for identical maps.

    ``np.savez`` stamps each member with the current time; a fixed ``date_time`` keeps the
    file a pure function of its content.
    """
    arrays = {"mask": scene.mask}
    for k in ("fat", "protein", "water"):
        arrays[k] = np.where(scene.mask, getattr(scene, k), np.nan).astype(np.float32)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ScanResult:
    """What the lab values need from one written scan."""

    sample: int  # i, the sample's index
    sums: np.ndarray  # float64 (3,): fat, protein, water (%) summed over the scan's masked pixels
    n_pixels: int  # masked pixels


def _simulate_scan(
    job: tuple[int, int], spec: SynthSpec, cam: _Camera, samples: Sequence[_Sample], out: Path, tick: Tick
) -> _ScanResult:
    """Write scan ``job = (i, j)`` and its truth map under ``out``."""
    i, j = job
    scene, sid = _write_scan(spec, cam, samples[i], i, j, out, tick)
    _write_truth(out / "truth" / f"{sid}.npz", scene)
    m = scene.mask
    sums = np.array([scene.fat[m].sum(), scene.protein[m].sum(), scene.water[m].sum()], np.float64)
    return _ScanResult(sample=i, sums=sums, n_pixels=int(m.sum()))


def _progress_bar(progress: bool) -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]synthesizing[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    )


def _simulate_scans(
    spec: SynthSpec, jobs: Sequence[tuple[int, int]], out: Path, progress: bool, workers: int
) -> list[_ScanResult]:
    """Write every scan (in ``workers`` threads) and truth map; results in the order of ``jobs``."""
    cam = _camera(spec)
    samples = [_sample(spec, i) for i in range(spec.n_samples)]
    with _progress_bar(progress) as bar:
        task = bar.add_task(f"{len(jobs)} scans, {spec.instrument}", total=len(jobs) * spec.lines)
        tick = partial(bar.advance, task)
        run = partial(_simulate_scan, spec=spec, cam=cam, samples=samples, out=out, tick=tick)
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                return list(pool.map(run, jobs))
        return [run(job) for job in jobs]


def surface_composition(spec: SynthSpec, results: Sequence[_ScanResult]) -> np.ndarray:
    """Mean fat, protein, water (%) of each sample's scanned surfaces, ``(n_samples, 3)``."""
    sums = np.zeros((spec.n_samples, 3))
    counts = np.zeros(spec.n_samples)
    for r in results:
        sums[r.sample] += r.sums
        counts[r.sample] += r.n_pixels
    return sums / np.maximum(counts, 1)[:, None]


def bulk_composition(spec: SynthSpec, results: Sequence[_ScanResult]) -> np.ndarray:
    """What the lab would find without error: fat, protein, water (%) of each whole sample.

    The surfaces' fat plus a per-sample difference (``SURFACE_TO_BULK_SD_FAT_PCT``); water and
    protein share the rest of the fat-free, ash-free mass as on the surfaces.
    """
    surface = surface_composition(spec, results)
    diff = _rng(spec.seed, _BULK).standard_normal(spec.n_samples) * ph.SURFACE_TO_BULK_SD_FAT_PCT
    fat = np.clip(surface[:, 0] + diff, 0.5, 95.0)
    rest = 100.0 - ph.ASH_PCT
    scale = (rest - fat) / np.maximum(rest - surface[:, 0], 1e-6)
    return np.stack([fat, surface[:, 1] * scale, surface[:, 2] * scale], axis=1)


def _lab_values(spec: SynthSpec, results: Sequence[_ScanResult]) -> np.ndarray:
    """Lab values ``(n_samples, 3)``: fat, protein, water (%) per sample.

    The whole ground sample (:func:`bulk_composition`: the mean of its true maps over all its
    scans' masked pixels, plus its surface-to-bulk difference), plus lab error, clipped to 0-100 %.
    """
    truth_mean = bulk_composition(spec, results)
    lab_rng = _rng(spec.seed, _LAB)
    err = lab_rng.standard_normal((spec.n_samples, 3)) * np.array(
        [ph.LAB_SD_FAT_PCT, ph.LAB_SD_PROTEIN_PCT, ph.LAB_SD_WATER_PCT]
    )
    return np.clip(truth_mean + err, 0.0, 100.0)


def _write_references_csv(
    path: Path, jobs: Sequence[tuple[int, int]], lab: np.ndarray, split: np.ndarray
) -> None:
    """One row per scan: its sample's lab values (``lab[i]``) and split (``split[i]``)."""
    rows = ["scan_id,sample_id,fat,protein,water,split"]
    for i, j in jobs:
        f, p, w = lab[i]
        rows.append(f"{scan_id(i, j)},{sample_id(i)},{f:.3f},{p:.3f},{w:.3f},{split[i]}")
    path.write_text("\n".join(rows) + "\n")


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


def _fresh_tmp(root: Path) -> Path:
    """An empty ``<root>.synth-tmp`` beside ``root`` (with ``truth/``); a leftover one is removed."""
    tmp = root.with_name(root.name + ".synth-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "truth").mkdir()
    return tmp


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
    tmp = _fresh_tmp(root)
    jobs = [(i, j) for i in range(spec.n_samples) for j in range(spec.scans_per_sample)]
    results = _simulate_scans(spec, jobs, tmp, progress, workers or min(4, os.cpu_count() or 1))
    split = shuffled_splits(spec.n_samples, seed=spec.seed)
    _write_references_csv(tmp / "references.csv", jobs, _lab_values(spec, results), split)
    _finish(tmp, root, _success_record(spec, len(jobs)))
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
    write_json_atomic(root / SUCCESS_FILE, record)


__all__: Sequence[str] = ("SUCCESS_FILE", "SYNTH_VERSION", "SynthSpec", "is_complete", "synthesize")
