"""Screen U-Net variants on development datasets, judged on out-of-fold truth only (issue 15 §3).

The evaluation protocol (docs/evaluation.md): settings are explored and chosen on the
out-of-fold maps of the training splits, never on the test split. This script runs the
default pipeline (synth -> preprocess -> train -> evaluate) for each variant on each
development dataset with a reduced fold set, and reads from each evaluation's
``metrics.json`` only what the training splits say:

- the U-Net's out-of-fold per-pixel RMSE against the true maps (``oof_pixel_rmse``);
- the out-of-fold per-pixel RMSE of the label-free baseline the protocol chose (the one a
  variant has to beat), and of PLS per pixel;
- the U-Net's RMSECV of the sample means (mean fat), beside PLS's.

The test split's figures are in those files too; this script does not read them.

    .venv/bin/python bench/screen.py                          # default variants, dev seeds 1 2, folds 1 2
    .venv/bin/python bench/screen.py --variant base= --variant tv=train.loss.smooth_penalty=tv
    .venv/bin/python bench/screen.py --variant kernel5_r2_mean10   # one of VARIANTS, by name
    .venv/bin/python bench/screen.py --tiny                   # configs/ci.yaml, 1 seed: a smoke run

Development seeds must not be the reporting seeds of ``bench/acceptance.py`` (100-104).
Writes ``screen.json`` and ``screen.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.acceptance import REPORTING_SEEDS, dataset_config  # noqa: E402

DEV_SEEDS = (1, 2)
_DENOISE = [
    "model.spectral_path=true",
    "train.spectral_init=ridge",
    "train.loss.spectral=1",
    "train.loss.residual=2",
]
# A denoiser head as bench/blindspot.py trains it, on a spectral path held at its ridge start.
_BLIND_DNP = [
    "model.spectral_path=true",
    "train.spectral_init=ridge",
    "train.spectral_freeze=true",
    "train.loss.residual=0",
    "train.loss.smooth=0",
    "train.loss.blindspot=1",
    "train.loss.blindspot_share=0.1",
    "train.keep_weights=last",
    "model.denoiser=7",
    "model.denoiser_input=path",
]
_HUBER = ["train.loss.residual_penalty=huber", "train.loss.smooth_penalty=huber"]
# name -> config overrides on top of the pipeline (and of the screening's fold set).
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "anchor_pairs": ["train.loss.smooth_pairs=anchor"],
    "huber": ["train.loss.smooth_penalty=huber", "train.loss.smooth_delta=5"],
    "tv": ["train.loss.smooth_penalty=tv", "train.loss.smooth_delta=5"],
    "spectral_path": ["model.spectral_path=true"],
    "spectral_path_huber": [
        "model.spectral_path=true",
        "train.loss.smooth_penalty=huber",
        "train.loss.smooth_delta=5",
    ],
    "paper_per_mm": ["train.loss.smooth=0.11"],
    # The spectral path as a prior the U-Net denoises (docs/loss.md): a ridge start, its own
    # mean term, and a penalty on the U-Net's residual over it; smoothness / residual = 0.5
    # is a low-pass of about 1 px (sqrt(2 * 0.5)), the width the protocol chose for the
    # Gaussian-smoothed PLS map on development seed 1.
    "denoise_quadratic": [*_DENOISE, "train.loss.residual_penalty=quadratic"],
    "denoise_huber": [*_DENOISE, "train.loss.residual_penalty=huber", "train.loss.smooth_penalty=huber"],
    # The same with the mean term 100x: the regularisers' energy (hundreds per sample at the
    # ridge start) no longer outweighs the mean's (a few %²), so the mean does not drift.
    "denoise_huber_mean100": [*_DENOISE, *_HUBER, "train.loss.mean=100"],
    "denoise_huber_mean100_s2": [*_DENOISE, *_HUBER, "train.loss.mean=100", "train.loss.smooth=2"],
    "denoise_huber_mean100_last": [*_DENOISE, *_HUBER, "train.loss.mean=100", "train.keep_weights=last"],
    # A kernel-predicting head filters the spectral map per pixel (the half-resolution
    # U-Net cannot): K x K, and full-resolution guide channels beside the features.
    **{
        f"kernel{k}_r{r}{tail}": [
            *_DENOISE[:3],
            f"train.loss.residual={r}",
            *_HUBER,
            "train.loss.mean=100",
            "train.keep_weights=last",
            f"model.kernel_head={k}",
            *extra,
        ]
        for k, r, tail, extra in [
            (5, 2, "", []),
            (5, 1, "", []),
            (5, 2, "_constlr", ["train.plateau_patience=100"]),
            (7, 2, "", []),
            (3, 2, "", []),
            (5, 2, "_guide16", ["model.kernel_guide=16"]),
        ]
    },
    # The kernel head with a weaker mean term (the regularisers' share of each step grows).
    **{
        f"kernel5_r2_mean{w}": [
            *_DENOISE,
            *_HUBER,
            f"train.loss.mean={w}",
            "train.keep_weights=last",
            "model.kernel_head=5",
        ]
        for w in (10, 3, 1)
    },
    # A blind-spot (Noise2Void) term instead of, or beside, the denoising energy: the map at
    # pixels whose spectra the model did not see is pulled to the spectral map from them
    # (bench/blindspot.py: such a denoiser of the ridge map, on its own, beat every median).
    "blind5_mean10": [
        *_DENOISE[:3],
        "train.loss.residual=0",
        "train.loss.smooth=0",
        "train.loss.blindspot=1",
        "train.loss.mean=10",
        "train.keep_weights=last",
        "model.kernel_head=5",
    ],
    # The same term training a full-resolution denoiser head (7 dilated layers over the
    # spectral map and the U-Net's features, bench/blindspot.py's architecture) instead of
    # the 5 x 5 kernel head, whose linear 5 x 5 filter the term could not make enough of.
    "blind_dn7_mean10": [
        *_DENOISE[:3],
        "train.loss.residual=0",
        "train.loss.smooth=0",
        "train.loss.blindspot=1",
        "train.loss.mean=10",
        "train.keep_weights=last",
        "model.denoiser=7",
    ],
    # 5x the blind-spot pixels per image and a constant learning rate: more of the term's signal.
    "blind_dn7_share10_constlr": [
        *_DENOISE[:3],
        "train.loss.residual=0",
        "train.loss.smooth=0",
        "train.loss.blindspot=1",
        "train.loss.blindspot_share=0.1",
        "train.loss.mean=10",
        "train.keep_weights=last",
        "model.denoiser=7",
        "train.plateau_patience=100",
    ],
    # The denoiser as bench/blindspot.py trains it alone (5.44 there on seed 1's ridge map
    # clipped, without the mask): reading the spectral map alone, clipped, and the path held
    # at its ridge start, so the term cannot smooth its own target; the U-Net's output beside.
    "blind_dnp_frozen": [*_BLIND_DNP, "train.plateau_patience=100", "train.loss.mean=10"],
    # blind_dnp_frozen (8.91 on seed 1) and blind_dnp_frozen_cos_mean10 (11.82) ran at
    # d294f73-dd07212, when the head's output was added to U-Net + S; since then
    # denoiser_input: path stands in for S (the variants below), as the standalone net does.
    # The same with the learning rate annealed to 0 (bench/blindspot.py's cosine): with a
    # constant rate the last epoch's weights were one noisy step (validation RMSE 2.0-3.1
    # from epoch to epoch); and with a weaker mean term, which pulls every pixel alike.
    **{
        f"blind_dnp_frozen_cos_mean{w}": [
            *_BLIND_DNP,
            "train.schedule=cosine",
            f"train.loss.mean={w}",
        ]
        for w in (10, 1, 0)
    },
    # The head also reads 8 learned 1x1 projections of the spectra (denoiser_input:
    # path+spectra): more of the neighbours' spectra than S's one direction, which a
    # blind-spot denoiser of the PLS map (pls_n2v) cannot see.
    "blind_dnps_frozen_cos_mean0": [
        *[s for s in _BLIND_DNP if s != "model.denoiser_input=path"],
        "model.denoiser_input=path+spectra",
        "train.schedule=cosine",
        "train.loss.mean=0",
    ],
    # The head predicting in its input's units (50 + 25 x output), as the standalone net
    # does, instead of in percent from a zero start.
    "blind_dnp_frozen_cos_mean0_scaled": [
        *_BLIND_DNP,
        "train.schedule=cosine",
        "train.loss.mean=0",
        "model.denoiser_output=scaled",
    ],
    # The same, with the path held at the fold's PLS baseline instead of a ridge fit: the
    # head then denoises the very map pls_n2v denoises, and the U-Net adds the spectra.
    "blind_dnp_frozen_cos_mean0_scaled_pls": [
        *[s for s in _BLIND_DNP if s != "train.spectral_init=ridge"],
        "train.spectral_init=pls",
        "train.schedule=cosine",
        "train.loss.mean=0",
        "model.denoiser_output=scaled",
    ],
    "blind5_r2_mean10": [
        *_DENOISE,
        *_HUBER,
        "train.loss.blindspot=1",
        "train.loss.mean=10",
        "train.keep_weights=last",
        "model.kernel_head=5",
    ],
}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name=key=value,key=value`` (or ``name=`` for none), or a name of :data:`VARIANTS`
    alone -> ``(name, overrides)``."""
    if "=" not in text:
        if text not in VARIANTS:
            raise SystemExit(f"--variant {text!r}: not a variant of bench/screen.py ({', '.join(VARIANTS)})")
        return text, list(VARIANTS[text])
    name, _, sets = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=key=value,key=value (or NAME=)")
    return name, [s for s in sets.split(",") if s]


def oof_figures(metrics: dict[str, Any], target: str) -> dict[str, Any]:
    """The out-of-fold figures of one evaluation (one target): nothing from the test split."""
    many = isinstance(metrics["maps"].get("unet", {}).get("oof_pixel_rmse"), dict)

    def of(value: Any) -> Any:
        return value.get(target) if many and isinstance(value, dict) else value

    maps = metrics["maps"]
    best = of(metrics.get("protocol", {})).get("best_label_free") if metrics.get("protocol") else None
    return {
        "unet_oof_pixel_rmse": of(maps["unet"]["oof_pixel_rmse"]),
        "best_label_free": best,
        "best_oof_pixel_rmse": of(maps[best]["oof_pixel_rmse"]) if best in maps else None,
        "pls_oof_pixel_rmse": of(maps.get("pls", {}).get("oof_pixel_rmse")),
        "unet_rmsecv": metrics.get("rmsecv_unet_training"),
        "pls_rmsecv": of(metrics.get("rmsecv", {})).get("pls")
        if isinstance(metrics.get("rmsecv"), dict)
        else None,
    }


def _log_without_test_figures(line: str) -> None:
    """The pipeline's lines, less the evaluate stage's test-split figures: screening never sees them."""
    if not line.startswith(("evaluate: test", "evaluate: per-pixel")):
        print(f"  {line}", flush=True)


def run_one(config: Path, seed: int, sets: list[str], target: str | None) -> dict[str, Any]:
    from chemmap.pipeline import run

    cfg = dataset_config(config, seed, sets)
    t0 = time.perf_counter()
    out = run(cfg, until="evaluate", progress=False, log=_log_without_test_figures)
    metrics = json.loads((Path(out["evaluate"]) / "metrics.json").read_text())
    return {
        "seed": seed,
        **oof_figures(metrics, target or cfg.targets[0]),
        "seconds": time.perf_counter() - t0,
        "evaluate": str(out["evaluate"]),
    }


def table(results: dict[str, list[dict[str, Any]]], seeds: list[int]) -> str:
    """Markdown: per variant, each dataset's U-Net and best-baseline OOF per-pixel RMSE, and the mean."""
    head = ["variant", *(f"seed {s}: U-Net / best baseline" for s in seeds), "mean U-Net", "U-Net RMSECV"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in results.items():
        cells = [
            f"{r['unet_oof_pixel_rmse']:.2f} / {r['best_oof_pixel_rmse']:.2f} ({r['best_label_free']})"
            for r in rows
        ]
        mean = sum(r["unet_oof_pixel_rmse"] for r in rows) / len(rows)
        cv = [r["unet_rmsecv"] for r in rows if r["unet_rmsecv"] is not None]
        lines.append(
            "| " + " | ".join([name, *cells, f"{mean:.2f}", " / ".join(f"{c:.2f}" for c in cv)]) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "pipelines" / "pork_belly.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(DEV_SEEDS))
    ap.add_argument("--folds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variant", action="append", default=[], help="NAME=key=value,... (repeatable)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value for every run")
    ap.add_argument("--target", default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "screen")
    ap.add_argument("--tiny", action="store_true", help="configs/ci.yaml, one seed, two variants")
    args = ap.parse_args()
    variants = dict(parse_variant(v) for v in args.variant) or dict(VARIANTS)
    seeds = list(args.seeds)
    if args.tiny:
        args.config = ROOT / "configs" / "ci.yaml"
        seeds, variants = seeds[:1], {k: variants[k] for k in list(variants)[:2]}
    if set(seeds) & set(REPORTING_SEEDS):
        raise SystemExit(
            f"seeds {sorted(set(seeds) & set(REPORTING_SEEDS))} are reporting seeds: develop on others"
        )
    common = [*args.sets, f"train.folds=[{','.join(map(str, args.folds))}]"]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    record = {"config": str(args.config), "seeds": seeds, "folds": args.folds, "variants": variants}
    args.out.mkdir(parents=True, exist_ok=True)
    from chemmap.files import write_json_atomic

    for seed in seeds:  # every variant on one dataset first: a partial screen is still a comparison
        for name, sets in variants.items():
            print(f"== {name}, seed {seed}: {' '.join(sets) or '(the pipeline as configured)'}", flush=True)
            results[name].append(run_one(args.config, seed, [*common, *sets], args.target))
            write_json_atomic(args.out / "screen.json", {**record, "results": results})
    md = table(results, seeds)
    print(md)
    (args.out / "screen.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
