"""Preprocessing throughput and peak memory: chemmap (Dask -> Zarr) against a plain NumPy pipeline.

The anchor is what a chemometrician writes first: ``spectral.envi.open(...).load()`` for the
raw cube and the white/dark references, NumPy calibration, the paper's band recipe (drop
< 750 nm, average band pairs), a threshold mask, and ``np.save`` of the cube. chemmap runs
its real dataset builder on the same scan. Each pipeline runs in a fresh subprocess that
reports its own wall time and peak RSS (``ru_maxrss``), so the two never share memory.

    python bench/preprocess.py                 # one paper-scale VNIR scan, > 2 GiB of raw counts
    python bench/preprocess.py --tiny          # a few seconds: smoke run for CI
    python bench/preprocess.py --lines 1200    # other sizes

Printed: MB/s of raw input (10^6 bytes of the raw file per second), peak RSS (VmHWM), and
the ratios chemmap / numpy.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RECIPE = {"wavelength_min": 750.0, "bin": 2}


def _synth(root: Path, lines: int, samples: int) -> Path:
    """One scan of ``lines`` x ``samples`` x 300 bands: a synthetic belly repeated along the belt.

    The built-in scanner writes a few bellies of the paper's width; the benchmark scan
    repeats the first one's lines (a belt of bellies) up to ``lines``, written block by block.
    """
    import shutil

    from chemmap.io import open_scan
    from chemmap.io.envi import create_envi
    from chemmap.synth import SynthSpec, synthesize

    block = min(lines, 192)
    spec = SynthSpec(instrument="vnir", n_samples=6, lines=block, samples=samples, seed=7)
    synthesize(root / "synth", spec, progress=True)
    src_dir = sorted(p for p in (root / "synth").iterdir() if (p / "capture").is_dir())[0]
    src = open_scan(src_dir / "capture" / f"{src_dir.name}.hdr")
    cap = root / "bench_scan" / "capture"
    cap.mkdir(parents=True)
    for name in ("WHITEREF", "DARKREF"):
        for ext in (".hdr", ".raw"):
            shutil.copy(src_dir / "capture" / f"{name}_{src_dir.name}{ext}", cap / f"{name}_bench_scan{ext}")
    mm = create_envi(
        cap / "bench_scan.hdr",
        bands=src.bands,
        lines=lines,
        samples=samples,
        wavelengths=src.wavelengths,
        extra={"ceiling": src.ceiling or 4095},
    )
    tile = np.asarray(src.data.compute()).transpose(1, 0, 2)  # (block, bands, samples): BIL order
    for y0 in range(0, lines, block):
        n = min(block, lines - y0)
        mm[y0 : y0 + n] = tile[:n]
    mm.flush()
    del mm
    shutil.rmtree(root / "synth")
    return cap / "bench_scan.hdr"


def run_numpy(hdr: Path, out: Path) -> dict:
    import spectral.io.envi as envi

    from chemmap.config import MaskConfig
    from chemmap.preprocess.mask import threshold_mask

    def load(h: Path) -> np.ndarray:
        return envi.open(str(h), str(h.with_suffix(".raw"))).load()  # (lines, samples, bands) float32

    cap = hdr.parent
    raw = load(hdr)
    white = load(cap / f"WHITEREF_{hdr.stem}.hdr").mean(axis=0)  # (samples, bands)
    dark = load(cap / f"DARKREF_{hdr.stem}.hdr").mean(axis=0)
    wl = np.asarray(envi.read_envi_header(str(hdr))["wavelength"], float)
    keep = np.flatnonzero(wl >= RECIPE["wavelength_min"])
    refl = (raw[:, :, keep] - dark[:, keep]) / (white[:, keep] - dark[:, keep])
    n = keep.size // 2 * 2
    cube = 0.5 * (refl[:, :, 0:n:2] + refl[:, :, 1:n:2])
    mask = threshold_mask(refl.mean(axis=2), MaskConfig())
    np.save(out / "cube.npy", np.ascontiguousarray(cube.transpose(2, 0, 1), dtype=np.float32))
    np.save(out / "mask.npy", mask)
    return {"mask_pixels": int(mask.sum())}


def run_chemmap(hdr: Path, out: Path) -> dict:
    import pandas as pd

    from chemmap.config import PreprocessConfig
    from chemmap.io.layout import ScanFiles
    from chemmap.preprocess.dataset import DatasetBuilder, ScanInput

    cap = hdr.parent
    files = ScanFiles(hdr.stem, hdr, cap / f"WHITEREF_{hdr.stem}.hdr", cap / f"DARKREF_{hdr.stem}.hdr")
    scan = ScanInput("s0", files)
    refs = pd.DataFrame({"sample_id": ["s0"], "fat": [30.0], "split": [1]})
    builder = DatasetBuilder(out / "dataset.zarr", PreprocessConfig(**RECIPE), ["fat"], progress=False)
    summary = builder.build([scan], refs, input_key="bench")
    return {"mask_pixels": summary["mask_pixels"]}


def _peak_rss_mib() -> float:
    """This process's resident-set high-water mark.

    ``VmHWM`` belongs to the process's own address space. ``getrusage().ru_maxrss`` would
    not do: Linux carries it across ``execve``, so a child would report its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def _worker(which: str, hdr: Path, out: Path) -> None:
    t0 = time.perf_counter()
    info = (run_numpy if which == "numpy" else run_chemmap)(hdr, out)
    info["seconds"] = time.perf_counter() - t0
    info["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(info))


def _measure(which: str, hdr: Path, work: Path) -> dict:
    out = work / which
    out.mkdir()
    res = subprocess.run(
        [sys.executable, __file__, "--worker", which, "--hdr", str(hdr), "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small scan, seconds (CI smoke run)")
    ap.add_argument("--lines", type=int, default=2900, help="lines of the scan (2900 x 1300 x 300 = 2.1 GiB)")
    ap.add_argument("--samples", type=int, default=1300)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp folder)")
    ap.add_argument("--worker", choices=["numpy", "chemmap"], help=argparse.SUPPRESS)
    ap.add_argument("--hdr", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args.hdr, args.out)
        return
    lines, samples = (160, 96) if args.tiny else (args.lines, args.samples)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        hdr = _synth(work / "scans", lines, samples)
        raw_mb = hdr.with_suffix(".raw").stat().st_size / 1e6
        print(
            f"scan {hdr.name}: {lines} lines x {samples} samples x 300 bands uint16 = {raw_mb:.0f} MB "
            f"({raw_mb * 1e6 / 2**30:.2f} GiB)"
        )
        res = {w: _measure(w, hdr, work) for w in ("numpy", "chemmap")}
        if res["numpy"]["mask_pixels"] != res["chemmap"]["mask_pixels"]:
            print(
                f"note: masks differ: numpy {res['numpy']['mask_pixels']} px, chemmap "
                f"{res['chemmap']['mask_pixels']} px (chemmap also drops saturated/dead pixels)"
            )
    print(f"{'pipeline':<10} {'seconds':>8} {'MB/s':>8} {'peak RSS MiB':>13}")
    for w, r in res.items():
        print(f"{w:<10} {r['seconds']:8.2f} {raw_mb / r['seconds']:8.1f} {r['peak_rss_mib']:13.0f}")
    speed = res["numpy"]["seconds"] / res["chemmap"]["seconds"]
    mem = res["chemmap"]["peak_rss_mib"] / res["numpy"]["peak_rss_mib"]
    if args.tiny:
        print("(--tiny is a smoke run: start-up dominates, the ratios below mean nothing)")
    print(
        f"chemmap / numpy: throughput x{speed:.2f}, peak memory x{mem:.3f} "
        f"(target: throughput >= x1.00, memory < x0.25)"
    )


if __name__ == "__main__":
    main()
