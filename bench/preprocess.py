"""Preprocessing throughput and peak memory: chemmap (Dask -> Zarr) against a plain NumPy pipeline.

The anchor is what a chemometrician writes first: ``spectral.envi.open(...).load()`` for the
raw cube and the white/dark references, NumPy calibration, the paper's band recipe (drop
< 750 nm, average band pairs), a threshold mask, and ``np.save`` of the cube. chemmap runs
its real dataset builder on the same scan. Each pipeline runs in a fresh subprocess that
reports its own wall time and peak RSS (``ru_maxrss``), so the two never share memory.

    python bench/preprocess.py                 # one paper-scale VNIR scan, > 2 GiB of raw counts
    python bench/preprocess.py --tiny          # a few seconds: smoke run for CI
    python bench/preprocess.py --lines 1200    # other sizes

Printed: MB/s of raw input (10^6 bytes of the raw file per second), peak RSS, and the
ratios chemmap / numpy.
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
    from chemmap.synth import SynthSpec, synthesize

    spec = SynthSpec(instrument="vnir", n_samples=1, lines=lines, samples=samples, seed=7)
    synthesize(root, spec, progress=True)
    scan_dir = sorted(p for p in root.iterdir() if (p / "capture").is_dir())[0]
    return scan_dir / "capture" / f"{scan_dir.name}.hdr"


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
    keep = keep[: keep.size // 2 * 2]
    refl = (raw[:, :, keep] - dark[:, keep]) / (white[:, keep] - dark[:, keep])
    cube = 0.5 * (refl[:, :, 0::2] + refl[:, :, 1::2])
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


def _worker(which: str, hdr: Path, out: Path) -> None:
    t0 = time.perf_counter()
    info = (run_numpy if which == "numpy" else run_chemmap)(hdr, out)
    info["seconds"] = time.perf_counter() - t0
    info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps(info))


def _measure(which: str, hdr: Path, work: Path) -> dict:
    out = work / which
    out.mkdir()
    res = subprocess.run(
        [sys.executable, __file__, "--worker", which, "--hdr", str(hdr), "--out", str(out)],
        check=True, capture_output=True, text=True,
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
        print(f"scan {hdr.name}: {lines} lines x {samples} samples x 300 bands uint16 = {raw_mb:.0f} MB "
              f"({raw_mb * 1e6 / 2**30:.2f} GiB)")
        res = {w: _measure(w, hdr, work) for w in ("numpy", "chemmap")}
        if res["numpy"]["mask_pixels"] != res["chemmap"]["mask_pixels"]:
            print(f"note: masks differ: numpy {res['numpy']['mask_pixels']} px, chemmap "
                  f"{res['chemmap']['mask_pixels']} px (chemmap also drops saturated/dead pixels)")
    print(f"{'pipeline':<10} {'seconds':>8} {'MB/s':>8} {'peak RSS MiB':>13}")
    for w, r in res.items():
        print(f"{w:<10} {r['seconds']:8.2f} {raw_mb / r['seconds']:8.1f} {r['peak_rss_mib']:13.0f}")
    speed = res["numpy"]["seconds"] / res["chemmap"]["seconds"]
    mem = res["chemmap"]["peak_rss_mib"] / res["numpy"]["peak_rss_mib"]
    print(f"chemmap / numpy: throughput x{speed:.2f}, peak memory x{mem:.3f} "
          f"(target: throughput >= x1.00, memory < x0.25)")


if __name__ == "__main__":
    main()
