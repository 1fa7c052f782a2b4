"""Acceptance: the default pipeline on 5 reporting datasets, U-Net against PLS and every map baseline.

Each reporting dataset is a new draw of the built-in synthetic scanner: the scanner's seed
(``synth.seed``, and any other ``synth.*_seed`` key; it fixes the scenes, the noise and the
test split) is set to the dataset's seed, 100-104 by default. Those seeds are for reporting
only: develop and tune on others (the pipeline's own ``synth.seed`` is 0). Everything else is
the pipeline as configured, the training seed included, so the datasets differ in their data
alone. Each runs synth -> preprocess -> train -> evaluate (``chemmap run --to evaluate
--set synth.seed=<seed>``); finished stages are found in the work folder, so a rerun is instant.

From each evaluation's ``metrics.json`` (docs/evaluation.md): the test split's size, the
mean-fat RMSE of the U-Net and of PLS against the lab values, and the per-pixel RMSE against
the true maps of the U-Net and of every other map the evaluate stage reports (its baselines
and headroom rows, as it names them), with their share of pixels outside 0-100 %.

Across datasets, for the U-Net against PLS (mean-fat RMSE) and against each map (per-pixel
RMSE): wins (U-Net lower) out of N, and the mean of the paired per-dataset log-ratios
log(U-Net / other) with a 95 % t-interval on N - 1 degrees of freedom, also as a ratio.
The unit is the dataset: no interval here is over pixels or samples.

    .venv/bin/python bench/acceptance.py                      # pipelines/pork_belly.yaml, seeds 100-104
    .venv/bin/python bench/acceptance.py --seeds 100 101 102  # fewer datasets (2 at least)
    .venv/bin/python bench/acceptance.py --tiny               # configs/ci.yaml, 2 datasets: a smoke run

Writes ``acceptance.json`` (every figure, the config, seeds, git commit, scanner version) and
``acceptance.md`` (the tables, for the README) into ``--out`` and prints the tables. About
12 minutes per dataset on the 2-core development machine; ``--tiny`` about a minute.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

REPORTING_SEEDS = (100, 101, 102, 103, 104)
MIN_TEST = 30  # test samples per reporting dataset
LEVEL = 0.95


# ----------------------------------------------------------------------------- statistics


def paired_log_ratio(unet: Sequence[float], other: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """U-Net against another method over N datasets: wins and a t-interval on the log-ratios.

    Args:
        unet: the U-Net's error (an RMSE, > 0) on each dataset.
        other: the other method's error on the same datasets, in the same order.
        level: coverage of the interval.

    Returns:
        ``n``; ``wins`` (datasets where the U-Net's error is lower) and ``ties``; ``log_ratios``,
        ``log(unet / other)`` per dataset; their ``mean`` and t-interval ``ci_low``/``ci_high``
        on ``df = n - 1`` degrees of freedom (``mean ± t(level, df) · sd / sqrt(n)``);
        ``ratio``, ``ratio_low``, ``ratio_high``: the same as ratios U-Net / other
        (``exp``; the geometric mean ratio). Below 1 favours the U-Net.

    Raises:
        ValueError: fewer than 2 datasets, lengths that differ, or an error not finite and > 0.
    """
    from scipy import stats

    a, b = [float(x) for x in unet], [float(x) for x in other]
    if len(a) != len(b):
        raise ValueError(f"paired errors need equal lengths, got {len(a)} and {len(b)}.")
    if len(a) < 2:
        raise ValueError(f"a t-interval across datasets needs at least 2 datasets, got {len(a)}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be > 0 and < 1, got {level}.")
    bad = [x for x in a + b if not (math.isfinite(x) and x > 0)]
    if bad:
        raise ValueError(f"errors must be finite and > 0 for a log-ratio, got {bad[0]}.")
    logs = [math.log(x / y) for x, y in zip(a, b, strict=True)]
    n = len(logs)
    mean = sum(logs) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {
        "n": n,
        "wins": sum(x < y for x, y in zip(a, b, strict=True)),
        "ties": sum(x == y for x, y in zip(a, b, strict=True)),
        "log_ratios": logs,
        "mean": mean,
        "sd": sd,
        "df": n - 1,
        "level": level,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "ratio": math.exp(mean),
        "ratio_low": math.exp(mean - half),
        "ratio_high": math.exp(mean + half),
    }


# ----------------------------------------------------------------------------- one dataset


def seed_keys() -> list[str]:
    """The scanner's seed keys (``synth.seed`` and any ``synth.*_seed``): all set to the dataset's seed."""
    from chemmap.config import SynthConfig

    return [f"synth.{k}" for k in SynthConfig.model_fields if k == "seed" or k.endswith("_seed")]


def dataset_config(config: Path, seed: int, sets: list[str]):
    """The pipeline config of reporting dataset ``seed``: ``sets``, then the scanner's seeds."""
    from chemmap.config import load_config

    return load_config(config, [*sets, *(f"{k}={seed}" for k in seed_keys())])


def load_development_seed(config: Path, sets: list[str]) -> int:
    """The scanner seed the config itself uses: its development dataset."""
    from chemmap.config import load_config

    return load_config(config, sets).synth.seed


def planned_test_size(cfg) -> int:
    """Samples in the test split the scanner will draw (chemmap's one split rule), before any run."""
    from chemmap.io.references import shuffled_splits

    return int((shuffled_splits(cfg.synth.n_samples, seed=cfg.synth.seed) == 0).sum())


def _of(value: Any, target: str, targets: list[str]) -> Any:
    """One target's entry of a ``metrics.json`` value (keyed by target when there are several)."""
    return value if len(targets) == 1 else value.get(target, {})


def figures(metrics: dict[str, Any], target: str, targets: list[str]) -> dict[str, Any]:
    """What acceptance reads from one evaluation's ``metrics.json``, for one target.

    ``maps`` keeps the evaluate stage's map methods in its order, the fold models left out
    (roles ``model: ...`` other than ``unet``): the U-Net ensemble and every baseline and
    headroom row, each with its role, setting, ``pixel_rmse`` and ``out_of_range_fraction``.
    """
    models = {name: _of(m, target, targets) for name, m in metrics["models"].items()}
    maps = _of(metrics.get("maps", {}), target, targets)
    if maps.get("unet", {}).get("pixel_rmse") is None:
        raise SystemExit("the evaluation has no per-pixel RMSE of the U-Net: acceptance needs true maps")
    unet, pls = models["unet"]["rmse"], models["pls"]["rmse"]
    keep = ("role", "setting", "pixel_rmse", "out_of_range_fraction", "mean_rmse_lab")
    return {
        "n_test": int(metrics["n_test"]),
        "mean_fat": {
            "unet_rmse": unet,
            "pls_rmse": pls,
            "unet_minus_pls": unet - pls,
            "relative": unet / pls - 1,
            # a single split's interval over its test samples: in the JSON only
            "bootstrap_unet_minus_pls": metrics.get("bootstrap_rmse_unet_minus_pls"),
        },
        "maps": {
            name: {k: m.get(k) for k in keep}
            for name, m in maps.items()
            if name == "unet" or not str(m.get("role", "")).startswith("model")
        },
        "best_label_free": _of(metrics.get("protocol", {}), target, targets).get("best_label_free"),
        "dataset_key": metrics.get("dataset_key"),
        "training_key": metrics.get("training_key"),
    }


def run_dataset(config: Path, seed: int, sets: list[str], target: str | None) -> dict[str, Any]:
    """Run (or find) synth..evaluate for reporting dataset ``seed``; its figures."""
    import json

    from chemmap.pipeline import run

    cfg = dataset_config(config, seed, sets)
    t0 = time.perf_counter()
    out = run(cfg, until="evaluate", progress=False, log=lambda s: print(f"  {s}", flush=True))
    seconds = time.perf_counter() - t0
    metrics = json.loads((Path(out["evaluate"]) / "metrics.json").read_text())
    train = json.loads((Path(out["train"]) / "_COMPLETE.json").read_text())
    return {
        "seed": seed,
        "target": target or cfg.targets[0],
        **figures(metrics, target or cfg.targets[0], list(cfg.targets)),
        "evaluate": str(out["evaluate"]),
        "seconds": seconds,  # this invocation: ~0 when every stage was found finished
        "train_seconds": train.get("seconds"),
    }


# ----------------------------------------------------------------------------- across datasets


def map_names(results: list[dict[str, Any]]) -> list[str]:
    """Every map method of any dataset, in the evaluate stage's order (the U-Net first)."""
    names: list[str] = []
    for r in results:
        names += [k for k in r["maps"] if k not in names]
    return ["unet", *(k for k in names if k != "unet")]


def across(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The U-Net against PLS (mean-fat RMSE) and against every map (per-pixel RMSE), paired by dataset.

    A map missing on some dataset is compared over the datasets that have it (``n`` says how
    many), and left out below 2. ``best label-free`` is the baseline the evaluate stage's
    protocol chose on each dataset's training splits.
    """
    rows = [
        {
            "against": "pls",
            "role": "baseline: the paper's, PLS on mean spectra",
            "measure": "mean-fat RMSE",
            **paired_log_ratio(
                [r["mean_fat"]["unet_rmse"] for r in results], [r["mean_fat"]["pls_rmse"] for r in results]
            ),
        }
    ]

    def px(r: dict[str, Any], name: str | None) -> float | None:
        return r["maps"].get(name, {}).get("pixel_rmse") if name else None

    candidates = [(name, None) for name in map_names(results)[1:]] + [("best label-free", "protocol")]
    for name, how in candidates:
        pairs = [
            (px(r, "unet"), px(r, r["best_label_free"] if how else name))
            for r in results
            if px(r, r["best_label_free"] if how else name) is not None
        ]
        if len(pairs) < 2:
            continue
        role = "baseline chosen out of fold per dataset" if how else _role(results, name)
        rows.append(
            {
                "against": name,
                "role": role,
                "measure": "per-pixel RMSE",
                **paired_log_ratio([u for u, _ in pairs], [o for _, o in pairs]),
            }
        )
    return rows


def _role(results: list[dict[str, Any]], name: str) -> str:
    return next(r["maps"][name]["role"] for r in results if name in r["maps"]) or ""


# ----------------------------------------------------------------------------- tables


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def tables(results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """The Markdown tables: mean fat per dataset, maps per dataset, and the comparisons across them."""
    seeds = [str(r["seed"]) for r in results]
    n = len(results)
    out = [
        "Mean fat of each test sample, RMSE against the lab values (% fat), per dataset (synthetic "
        "scanner seed):",
        "",
        "| dataset | n test | U-Net | PLS | U-Net - PLS | U-Net / PLS - 1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["mean_fat"]
        out.append(
            f"| {r['seed']} | {r['n_test']} | {m['unet_rmse']:.3f} | {m['pls_rmse']:.3f} | "
            f"{m['unet_minus_pls']:+.3f} | {100 * m['relative']:+.1f} % |"
        )
    names = map_names(results)
    out += [
        "",
        "Per-pixel RMSE against the true maps of each test split (% fat; pooled over its mask pixels), "
        "and in brackets the share of pixels outside 0-100 %:",
        "",
        "| map | role | " + " | ".join(seeds) + " |",
        "|---|---|" + "---:|" * n,
    ]
    for name in names:
        cells = []
        for r in results:
            m = r["maps"].get(name)
            if m is None or m.get("pixel_rmse") is None:
                cells.append("")
                continue
            oor = m.get("out_of_range_fraction")
            cells.append(f"{m['pixel_rmse']:.2f}" + ("" if oor is None else f" ({100 * oor:.1f} %)"))
        out.append(f"| {name} | {_role(results, name)} | " + " | ".join(cells) + " |")
    chosen = ", ".join(f"{r['seed']}: {r['best_label_free']}" for r in results)
    out += [
        "",
        f"Across the {n} datasets, paired by dataset: wins are datasets where the U-Net's error is "
        f"lower; log-ratio is the mean of log(U-Net / other) with its 95 % t-interval on {n - 1} "
        f"degree{'s' if n > 2 else ''} of freedom (the unit is the dataset, not the pixel or the "
        "sample); ratio is its exp, U-Net / other (below 1 favours the U-Net). Best label-free is "
        f"the baseline the protocol chose on each dataset's training splits ({chosen}).",
        "",
        "| U-Net against | role | error | U-Net lower | log-ratio [95 % CI] | ratio [95 % CI] |",
        "|---|---|---|---:|---:|---:|",
    ]
    for c in rows:
        wins = f"{c['wins']} of {c['n']}" + (f" ({c['ties']} tied)" if c["ties"] else "")
        out.append(
            f"| {c['against']} | {c['role']} | {c['measure']} | {wins} | "
            f"{c['mean']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | "
            f"{c['ratio']:.3f} [{c['ratio_low']:.3f}, {c['ratio_high']:.3f}] |"
        )
    return "\n".join(out)


# ----------------------------------------------------------------------------- provenance


def git_state() -> dict[str, Any]:
    """The commit the code came from, and whether tracked files differed from it."""

    def git(*a: str) -> str:
        res = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=False)
        return res.stdout.strip() if res.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return {"commit": commit or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--config", type=Path, default=ROOT / "pipelines" / "pork_belly.yaml")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help=f"reporting datasets' scanner seeds (default {REPORTING_SEEDS})"
    )
    parser.add_argument(
        "--workdir", type=Path, help="stage outputs (default: the config's; --tiny: a temp folder)"
    )
    parser.add_argument("--out", type=Path, help="where acceptance.json/.md go (default bench/out/)")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="config override (repeatable)"
    )
    parser.add_argument("--target", help="reference column (default: the config's first target)")
    parser.add_argument("--tiny", action="store_true", help="configs/ci.yaml on 2 datasets: a smoke run")
    args = parser.parse_args()

    from chemmap.files import write_json_atomic, write_text_atomic
    from chemmap.synth.scanner import SYNTH_VERSION

    seeds = list(args.seeds or REPORTING_SEEDS)
    min_test = MIN_TEST
    tmp = None
    if args.tiny:
        args.config = ROOT / "configs" / "ci.yaml"
        seeds, min_test = seeds[:2], 1
        if args.workdir is None:
            tmp = tempfile.mkdtemp(prefix="chemmap-acceptance-")
            args.workdir = Path(tmp)
    out_dir = args.out or ROOT / "bench" / "out" / ("acceptance-tiny" if args.tiny else "")
    if len(seeds) < 2:
        raise SystemExit(f"--seeds: a t-interval across datasets needs at least 2 datasets, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds: each dataset once, got {seeds}")
    sets = [f"workdir={args.workdir.resolve()}"] if args.workdir else []
    sets += args.sets

    # Everything that can be checked before hours of training is checked first.
    cfgs = {s: dataset_config(args.config, s, sets) for s in seeds}
    first = cfgs[seeds[0]]
    if first.data.source != "synthetic":
        raise SystemExit(
            f"{args.config}: data.source is {first.data.source!r}: acceptance draws synthetic datasets"
        )
    if args.target and args.target not in first.targets:
        raise SystemExit(f"--target {args.target!r}: not one of the config's targets {first.targets}")
    dev = load_development_seed(args.config, args.sets)
    if dev in seeds:
        print(f"warning: seed {dev} is the config's own dataset ({args.config.name}), used for development")
    for s, cfg in cfgs.items():
        n = planned_test_size(cfg)
        if n < min_test:
            raise SystemExit(
                f"dataset {s}: its test split would hold {n} samples, fewer than {min_test} "
                f"(synth.n_samples={cfg.synth.n_samples})"
            )
    keys = seed_keys()
    print(
        f"{args.config.name}: {len(seeds)} reporting datasets ({', '.join(keys)} = {seeds}), "
        f"training seed {first.seed}, scanner version {SYNTH_VERSION}; work folder {first.workdir_path}",
        flush=True,
    )

    results = []
    t0 = time.perf_counter()
    try:
        for s in seeds:
            print(f"dataset {s}: synth -> evaluate", flush=True)
            r = run_dataset(args.config, s, sets, args.target)
            if r["n_test"] < min_test:
                raise SystemExit(
                    f"dataset {s}: the evaluation has {r['n_test']} test samples, fewer than {min_test}"
                )
            m = r["mean_fat"]
            print(
                f"dataset {s}: {r['n_test']} test samples; mean-fat RMSE U-Net {m['unet_rmse']:.3f}, "
                f"PLS {m['pls_rmse']:.3f}; px RMSE U-Net {r['maps']['unet']['pixel_rmse']:.2f} "
                f"({time.perf_counter() - t0:.0f} s so far)",
                flush=True,
            )
            results.append(r)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = across(results)
    text = tables(results, rows)
    print()
    print(text)
    record = {
        "config": str(args.config),
        "overrides": args.sets,
        "seed_keys": keys,
        "seeds": seeds,
        "training_seed": first.seed,
        "resolved_config": first.model_dump(
            mode="json"
        ),  # the first dataset's; the others differ in seed_keys
        "target": results[0]["target"],
        "synth_version": SYNTH_VERSION,
        "git": git_state(),
        "tiny": args.tiny,
        "min_test": min_test,
        "level": LEVEL,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "seconds": time.perf_counter() - t0,
        "datasets": results,
        "across": rows,
    }
    head = (
        f"<!-- made by: python bench/acceptance.py{' --tiny' if args.tiny else ''} "
        f"--seeds {' '.join(map(str, seeds))}, {args.config.name}, commit "
        f"{(record['git']['commit'] or 'unknown')[:12]}{' (dirty)' if record['git']['dirty'] else ''}, "
        f"scanner version {SYNTH_VERSION} -->\n"
    )
    write_json_atomic(out_dir / "acceptance.json", record)
    write_text_atomic(out_dir / "acceptance.md", head + text + "\n")
    if args.tiny:
        print("\n(--tiny: a smoke run on the CI preset; its figures mean nothing)")
    print(
        f"\nwritten: {out_dir / 'acceptance.md'}, {out_dir / 'acceptance.json'} ({record['seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
