"""The pipeline's stages, each a function of the resolved config, chained through stage keys.

``synth`` (when the data source is the built-in scanner) -> ``preprocess`` -> (``train`` ->
``evaluate`` -> ``register`` -> ``score``). Each stage computes its key from its own config
section and its inputs' keys, returns at once when that folder is complete, and otherwise
builds it and writes its completion marker last.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chemmap.config import ChemmapConfig, dump_config
from chemmap.errors import InputError
from chemmap.stages import StageDir, files_key, stable_hash, stage_dir

Log = Callable[[str], None]


@dataclass(frozen=True)
class DataSource:
    """What the preprocess stage reads: the scans, the per-sample references, and their key."""

    root: Path
    scans: list  # list[ScanInput]
    references: Any  # pandas.DataFrame, one row per sample: sample_id, targets..., split
    key: str
    skipped: list[str]


def synth_stage(cfg: ChemmapConfig, *, progress: bool = True, log: Log = print) -> StageDir:
    """Write the built-in scanner's output for ``cfg.synth`` (once per distinct config)."""
    from chemmap.synth import SynthSpec, synthesize

    section = cfg.synth.model_dump(mode="json")
    stage = stage_dir(cfg.workdir_path, "synth", section)
    if stage.complete:
        log(f"synth: done already ({stage.path})")
        return stage
    stage.begin()
    spec = SynthSpec(**{**cfg.synth.model_dump(), "wavelength_range": cfg.synth.wavelength_range})
    log(
        f"synth: {spec.n_samples} samples x {spec.scans_per_sample} scans, {spec.lines}x{spec.samples} px, "
        f"{spec.instrument} -> {stage.path / 'scans'}"
    )
    synthesize(stage.path / "scans", spec, progress=progress)
    stage.finish({"root": str(stage.path / "scans")}, dump_config(cfg.synth))
    return stage


def data_source(
    cfg: ChemmapConfig, *, progress: bool = True, log: Log = print, create: bool = True
) -> DataSource:
    """Find the scans and references the config names (synthesising them if it says so).

    With ``create=False`` a synthetic source that has not been written is an error.
    """
    from chemmap.io import discover_scans, read_references
    from chemmap.io.envi import find_data_file
    from chemmap.preprocess.dataset import ScanInput

    if cfg.data.source == "synthetic":
        if create:
            stage = synth_stage(cfg, progress=progress, log=log)
        else:
            stage = stage_dir(cfg.workdir_path, "synth", cfg.synth.model_dump(mode="json"))
            if not stage.complete:
                raise InputError(
                    f"dataset not found: no synthetic scans at {stage.path}; run `chemmap preprocess`"
                )
        root = stage.path / "scans"
        base_key = stage.key
    else:
        root = cfg.resolve_path(cfg.data.root)
        if not root.is_dir():
            raise InputError(f"{cfg.source}: data.root: folder not found: {root}")
        base_key = None
    files = discover_scans(root, cfg.data.raw_pattern, cfg.data.white_pattern, cfg.data.dark_pattern)
    refs, skipped = read_references(
        root / cfg.data.references,
        [f.scan_id for f in files],
        cfg.targets,
        on_error=cfg.data.on_error,
        root=root,
        seed=cfg.seed,
    )
    for msg in skipped:
        log(f"[skip] {msg}")
    sample_of = dict(zip(refs["scan_id"].astype(str), refs["sample_id"].astype(str), strict=True))
    mask_pattern = cfg.preprocess.mask.pattern if cfg.preprocess.mask.method == "files" else None
    scans = []
    for f in files:
        if f.scan_id not in sample_of:
            continue  # reported by read_references (on_error: skip)
        mask_file = root / mask_pattern.format(scan_id=f.scan_id) if mask_pattern else None
        scans.append(ScanInput(sample_of[f.scan_id], f, mask_file))
    columns = ["sample_id", *cfg.targets, "split"]
    per_sample = refs.drop_duplicates("sample_id")[columns].reset_index(drop=True)
    if base_key is None:
        paths = [root / cfg.data.references]
        for s in scans:
            headers = [p for p in (s.files.raw, s.files.white, s.files.dark) if p is not None]
            paths += headers + [find_data_file(h) for h in headers]
            if s.mask_file is not None and s.mask_file.exists():
                paths.append(s.mask_file)
        base_key = files_key(sorted(set(paths)), root)
    key = stable_hash({"files": base_key, "refs": per_sample.to_dict(orient="list")})
    return DataSource(root=root, scans=scans, references=per_sample, key=key, skipped=skipped)


def model_geometry(cfg: ChemmapConfig, n_channels: int) -> tuple[int, int]:
    """Receptive radius and stride grid of the configured U-Net, computed from the model."""
    from chemmap.models.tiling import model_geometry as geometry_of
    from chemmap.models.unet import UNet
    from chemmap.train.trainer import model_config

    g = geometry_of(UNet(model_config(cfg, n_channels, len(cfg.targets))))
    return int(g.radius), int(g.stride)


def _preprocess_dir(cfg: ChemmapConfig, src: DataSource) -> StageDir:
    section = {
        "preprocess": cfg.preprocess.model_dump(mode="json", exclude={"scheduler", "num_workers"}),
        "targets": cfg.targets,
        "on_error": cfg.data.on_error,
    }
    return stage_dir(cfg.workdir_path, "preprocess", section, [src.key])


def find_dataset(cfg: ChemmapConfig) -> StageDir:
    """The finished preprocess stage of this config; an error naming where it looked if none."""
    stage = _preprocess_dir(cfg, data_source(cfg, progress=False, log=lambda s: None, create=False))
    if not stage.complete:
        raise InputError(
            f"dataset not found: {stage.path / 'dataset.zarr'} is missing or unfinished; "
            "run `chemmap preprocess` first"
        )
    return stage


def preprocess_stage(cfg: ChemmapConfig, *, progress: bool = True, log: Log = print) -> StageDir:
    """Raw scans -> ``dataset.zarr`` (chunk-parallel with Dask), plus the model's patch index."""
    import zarr

    from chemmap.preprocess.dataset import DatasetBuilder, write_patch_index

    src = data_source(cfg, progress=progress, log=log)
    stage = _preprocess_dir(cfg, src)
    store = stage.path / "dataset.zarr"
    if stage.complete:
        log(f"preprocess: done already ({store})")
        return stage
    resumed = stage.path.exists()
    stage.begin()
    log(f"preprocess: {len(src.scans)} scans -> {store}" + (" (resuming)" if resumed else ""))
    builder = DatasetBuilder(
        store, cfg.preprocess, cfg.targets, on_error=cfg.data.on_error, progress=progress, log=log
    )
    summary = builder.build(src.scans, src.references, src.key)
    radius, stride = model_geometry(cfg, summary["n_channels"])
    summary["patches"] = write_patch_index(store, radius, stride, cfg.preprocess.patch_core)
    summary["skipped"] = src.skipped + summary["skipped"]
    with warnings.catch_warnings():  # "not part of the v3 spec": xarray and zarr-python read it
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(store)
    summary["store"] = str(store)
    stage.finish(summary, dump_config(cfg))
    log(
        f"preprocess: {summary['n_samples']} samples, {summary['n_channels']} channels, "
        f"{summary['mask_pixels']} sample pixels"
    )
    return stage


def train_stage(
    cfg: ChemmapConfig, dataset: StageDir | None = None, *, progress: bool = True, log: Log = print, **kw
) -> StageDir:
    """Train the fold ensemble with Ray Train (see :mod:`chemmap.train.trainer`)."""
    from chemmap.train.trainer import train_stage as _train

    return _train(cfg, dataset or find_dataset(cfg), progress=progress, log=log, **kw)


def find_training(cfg: ChemmapConfig, dataset: StageDir | None = None) -> StageDir:
    """The finished training stage of this config; an error naming where it looked if none."""
    from chemmap.train.trainer import training_dir

    stage = training_dir(cfg, dataset or find_dataset(cfg))[0]
    if not stage.complete:
        raise InputError(f"no finished training at {stage.path}; run `chemmap train` first")
    return stage


def evaluate_stage(
    cfg: ChemmapConfig,
    dataset: StageDir | None = None,
    training: StageDir | None = None,
    *,
    progress: bool = True,
    log: Log = print,
) -> StageDir:
    """The fold ensemble against PLS on the test split (see :mod:`chemmap.evaluate.stage`)."""
    from chemmap.evaluate.stage import evaluate_stage as _evaluate

    dataset = dataset or find_dataset(cfg)
    training = training or find_training(cfg, dataset)
    return _evaluate(cfg, dataset, training, progress=progress, log=log)


STAGES = ("synth", "preprocess", "train", "evaluate")


def run(cfg: ChemmapConfig, *, until: str = STAGES[-1], progress: bool = True, log: Log = print) -> dict:
    """Run the pipeline's stages in order up to ``until``; returns each stage's folder."""
    if until not in STAGES:
        raise InputError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    out: dict[str, Path] = {}
    if until == "synth":
        if cfg.data.source == "synthetic":
            out["synth"] = synth_stage(cfg, progress=progress, log=log).path
        return out
    pre = preprocess_stage(cfg, progress=progress, log=log)
    out["preprocess"] = pre.path
    if until == "preprocess":
        return out
    tr = train_stage(cfg, pre, progress=progress, log=log)
    out["train"] = tr.path
    if until == "train":
        return out
    out["evaluate"] = evaluate_stage(cfg, pre, tr, progress=progress, log=log).path
    return out
