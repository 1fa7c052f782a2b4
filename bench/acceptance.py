"""Acceptance run: the whole pipeline with several training seeds, U-Net against PLS on the test split.

Each seed trains the 5-fold ensemble again and evaluates it (docs/evaluation.md); with
``--datasets`` each seed also draws a new synthetic dataset, so runs are replicates of the
whole experiment, not only of the training. The table gives every run, then the mean and a
95 % t-interval across runs of the mean-fat and per-pixel differences, beside the paper's
figures (VNIR camera, real pork bellies):

    python bench/acceptance.py                           # pipelines/pork_belly.yaml, seeds 0 1 2
    python bench/acceptance.py --datasets                # a new dataset per seed as well
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


def run_seed(config: Path, seed: int, sets: list[str], datasets: bool) -> dict:
    from chemmap.config import load_config
    from chemmap.pipeline import run

    extra = [f"seed={seed}"] + ([f"synth.seed={seed}"] if datasets else [])
    cfg = load_config(config, [*sets, *extra])
    t0 = time.perf_counter()
    out = run(cfg, until="evaluate", progress=False)
    m = json.loads((out["evaluate"] / "metrics.json").read_text())
    train = json.loads((out["train"] / "_COMPLETE.json").read_text())
    return {
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "train_seconds": train["seconds"],
        "metrics": m,
        "evaluate": str(out["evaluate"]),
    }


def _row(r: dict) -> list[str]:
    m = r["metrics"]
    u, p, b = m["models"]["unet"], m["models"]["pls"], m["bootstrap_rmse_unet_minus_pls"]
    maps, best = m["maps"], m["protocol"]["best_label_free"]
    nan = {"pixel_rmse": float("nan")}
    shares = [maps[k]["spatial_correlated_share"] for k in ("unet", "pls")]
    return [
        str(r["seed"]),
        str(m["n_test"]),
        f"{u['rmse']:.3f}",
        f"{p['rmse']:.3f}",
        f"{100 * (u['rmse'] / p['rmse'] - 1):+.1f} %",
        f"[{b['ci_low']:+.3f}, {b['ci_high']:+.3f}]",
        f"{m['rmsecv']['unet']:.3f} / {m['rmsecv']['pls']:.3f}",
        f"{maps['unet'].get('pixel_rmse', float('nan')):.2f}",
        f"{best} {maps.get(best, nan)['pixel_rmse']:.2f}",
        f"{maps['pls']['pixel_rmse']:.2f}" if "pixel_rmse" in maps["pls"] else "",
        f"{maps['flat_lab'].get('pixel_rmse', float('nan')):.2f}",
        f"{maps.get('pls_gauss_oracle', nan)['pixel_rmse']:.2f}",
        f"{100 * shares[0]:.1f} % / {100 * shares[1]:.1f} %",
        f"{r['train_seconds'] / 60:.1f}",
    ]


COLUMNS = [
    "seed",
    "n test",
    "RMSE U-Net",
    "RMSE PLS",
    "U-Net vs PLS",
    "95 % CI of diff",
    "RMSECV U-Net / PLS",
    "px RMSE U-Net",
    "best label-free baseline, px RMSE",
    "px RMSE PLS",
    "px RMSE flat at lab (headroom)",
    "px RMSE oracle (headroom)",
    "share U-Net / PLS (own grid)",
    "train min",
]


def _t_interval(x: list[float], unit: str = "") -> str:
    """Mean and 95 % t-interval across runs (not across pixels or samples)."""
    from scipy import stats

    a = np.asarray(x, dtype=float)
    if a.size < 2:
        return f"{a.mean():+.2f}{unit} (one run: no interval)"
    half = stats.t.ppf(0.975, a.size - 1) * a.std(ddof=1) / np.sqrt(a.size)
    return f"{a.mean():+.2f}{unit} [{a.mean() - half:+.2f}, {a.mean() + half:+.2f}]{unit}"


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    rel = [
        100 * (r["metrics"]["models"]["unet"]["rmse"] / r["metrics"]["models"]["pls"]["rmse"] - 1)
        for r in results
    ]
    px = [
        r["metrics"]["maps"]["unet"]["pixel_rmse"]
        - r["metrics"]["maps"][r["metrics"]["protocol"]["best_label_free"]]["pixel_rmse"]
        for r in results
        if r["metrics"]["protocol"]["best_label_free"]
    ]
    wins = sum(d < 0 for d in px)
    lines.append(
        f"\nOver {len(results)} runs: mean-fat RMSE(U-Net)/RMSE(PLS) - 1 = {_t_interval(rel, ' %')}; "
        f"per-pixel RMSE(U-Net) - RMSE(best label-free baseline) = {_t_interval(px) if px else 'n/a'} "
        f"(U-Net better in {wins} of {len(px)}); 95 % t-intervals across runs. "
        f"Paper (VNIR, real bellies, no true maps): {PAPER}."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "pipelines" / "pork_belly.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--tiny", action="store_true", help="configs/ci.yaml in a temp folder")
    ap.add_argument(
        "--datasets",
        action="store_true",
        help="a new synthetic dataset per seed (synth.seed = seed), not only a new training",
    )
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
        results.append(run_seed(config, seed, sets, args.datasets))
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
