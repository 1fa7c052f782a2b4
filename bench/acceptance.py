"""Acceptance run: the whole pipeline with several training seeds, U-Net against PLS on the test split.

Each seed trains the 5-fold ensemble again (the data, splits and preprocessing stay the
same, so those stages are reused) and evaluates it; the table gives every seed and the
mean, beside the paper's figures (VNIR camera, real pork bellies):

    python bench/acceptance.py                           # pipelines/pork_belly.yaml, seeds 0 1 2
    python bench/acceptance.py --seeds 0 1 2 3 --set train.epochs=60
    python bench/acceptance.py --tiny                    # configs/ci.yaml, seconds per stage

Writes ``acceptance.json`` and ``acceptance.md`` into the work folder and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAPER = "U-Net RMSE 7-13 % below PLS; 99.91 % of U-Net map variance spatially correlated vs 2.4-2.5 % for PLS"


def run_seed(config: Path, seed: int, sets: list[str]) -> dict:
    from chemmap.config import load_config
    from chemmap.pipeline import run

    cfg = load_config(config, [*sets, f"seed={seed}"])
    t0 = time.perf_counter()
    out = run(cfg, until="evaluate", progress=False)
    m = json.loads((out["evaluate"] / "metrics.json").read_text())
    train = json.loads((out["train"] / "_COMPLETE.json").read_text())
    return {
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "train_seconds": train["seconds"],
        "rmsecv_unet": train["rmsecv"],
        "metrics": m,
        "evaluate": str(out["evaluate"]),
    }


def table(results: list[dict]) -> str:
    cols = [
        "seed",
        "n test",
        "RMSE U-Net",
        "RMSE PLS",
        "U-Net vs PLS",
        "95 % CI of diff",
        "R2 U-Net",
        "R2 PLS",
        "share U-Net",
        "share PLS",
        "out of 0-100 U-Net",
        "out PLS",
        "px RMSE U-Net",
        "px RMSE PLS",
        "train min",
    ]
    rows = []
    for r in results:
        m = r["metrics"]
        u, p, b = m["models"]["unet"], m["models"]["pls"], m["bootstrap_rmse_unet_minus_pls"]
        rows.append(
            [
                str(r["seed"]),
                str(m["n_test"]),
                f"{u['rmse']:.3f}",
                f"{p['rmse']:.3f}",
                f"{100 * (u['rmse'] / p['rmse'] - 1):+.1f} %",
                f"[{b['ci_low']:+.3f}, {b['ci_high']:+.3f}]",
                f"{u['r2']:.3f}",
                f"{p['r2']:.3f}",
                f"{100 * u['spatial_correlated_share']:.1f} %",
                f"{100 * p['spatial_correlated_share']:.1f} %",
                f"{100 * u['out_of_range_fraction']:.2f} %",
                f"{100 * p['out_of_range_fraction']:.1f} %",
                f"{u.get('pixel_rmse', float('nan')):.2f}",
                f"{p.get('pixel_rmse', float('nan')):.2f}",
                f"{r['train_seconds'] / 60:.1f}",
            ]
        )
    rel = [
        r["metrics"]["models"]["unet"]["rmse"] / r["metrics"]["models"]["pls"]["rmse"] - 1 for r in results
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append(
        f"\nMean U-Net vs PLS over {len(results)} seeds: {100 * np.mean(rel):+.1f} % "
        f"(sd {100 * np.std(rel, ddof=1) if len(rel) > 1 else 0:.1f} %). Paper (VNIR, real bellies): {PAPER}."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "pipelines" / "pork_belly.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--tiny", action="store_true", help="configs/ci.yaml in a temp folder")
    args = ap.parse_args()
    config, sets = args.config, list(args.sets)
    if args.tiny:
        import tempfile

        config = ROOT / "configs" / "ci.yaml"
        sets = [f"workdir={tempfile.mkdtemp(prefix='chemmap-acceptance-')}", *sets]
        args.seeds = args.seeds[:2]
    results = []
    for seed in args.seeds:
        print(f"seed {seed}: training and evaluating ...", flush=True)
        results.append(run_seed(config, seed, sets))
        print(table(results[-1:]).splitlines()[2], flush=True)
    text = table(results)
    print(text)
    from chemmap.config import load_config

    work = load_config(config, sets).workdir_path
    (work / "acceptance.json").write_text(json.dumps(results, indent=2, default=str))
    (work / "acceptance.md").write_text(text + "\n")
    print(f"written: {work / 'acceptance.md'}")


if __name__ == "__main__":
    main()
