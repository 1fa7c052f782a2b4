"""The pipeline's stages, each a function of the resolved config, chained through stage keys.

``synth`` (when the data source is the built-in scanner) -> ``preprocess`` -> ``train`` ->
``evaluate`` -> ``register``; then ``score`` turns a scanner's folder into maps with a
registered model. Each stage computes its key from its own config section and its inputs'
keys, returns at once when that folder is complete, and otherwise builds it and writes
its completion marker last.

Only preprocessing reads raw scans. It records, in ``workdir/preprocess/index.json``,
which dataset a data config produced; training and evaluation look their dataset up
there, so archiving the raw scans afterwards breaks nothing.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chemmap import tracking
from chemmap.config import ChemmapConfig, dump_config
from chemmap.errors import InputError
from chemmap.files import write_json_atomic
from chemmap.io import discover_scans, read_references
from chemmap.io.envi import find_data_file
from chemmap.preprocess.dataset import (
    DATASET_FORMAT,
    DatasetBuilder,
    PatchGeometry,
    ScanInput,
    write_patch_index,
)
from chemmap.stages import StageDir, file_entries, stable_hash, stage_dir

Log = Callable[[str], None]
STAGES = ("synth", "preprocess", "train", "evaluate", "register")
INDEX_FILE = "index.json"  # under workdir/preprocess/


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class DataSource:
    """What the preprocess stage reads: the scans, the per-sample references, and their key."""

    root: Path
    scans: list[ScanInput]
    references: Any  # pandas.DataFrame, one row per sample: sample_id, targets..., split
    key: str
    skipped: list[str]
    files: list[list[Any]]  # (path relative to root, size, mtime_ns) of every input file; [] if synthetic


def synth_stage(cfg: ChemmapConfig, *, progress: bool = True, log: Log = print) -> StageDir:
    """Write the built-in scanner's output for ``cfg.synth`` (once per distinct config)."""
    from chemmap.synth import SynthSpec, synthesize

    stage = stage_dir(cfg.workdir_path, "synth", cfg.synth.model_dump(mode="json"))
    if stage.complete:
        log(f"synth: done already ({stage.path})")
        return stage
    stage.begin()
    spec = SynthSpec.from_config(cfg.synth)
    log(
        f"synth: {spec.n_samples} samples x {spec.scans_per_sample} scans, {spec.lines}x{spec.samples} px, "
        f"{spec.instrument} -> {stage.path / 'scans'}"
    )
    synthesize(stage.path / "scans", spec, progress=progress)
    stage.finish({"root": str(stage.path / "scans")}, dump_config(cfg.synth))
    return stage


def _scan_inputs(cfg: ChemmapConfig, root: Path, files, sample_of: dict[str, str]) -> list[ScanInput]:
    """The scans that have references, with their mask files and (synthetic) true maps."""
    mask_pattern = cfg.preprocess.mask.pattern if cfg.preprocess.mask.method == "files" else None
    scans = []
    for f in files:
        if f.scan_id not in sample_of:
            continue  # reported by read_references (on_error: skip)
        mask_file = root / mask_pattern.format(scan_id=f.scan_id) if mask_pattern else None
        truth = root / "truth" / f"{f.scan_id}.npz"  # where the built-in scanner writes true maps
        scans.append(ScanInput(sample_of[f.scan_id], f, mask_file, truth if truth.is_file() else None))
    return scans


def _input_paths(cfg: ChemmapConfig, root: Path, scans: list[ScanInput]) -> list[Path]:
    """Every file the dataset is made from: references, headers, data files, masks."""
    paths = [root / cfg.data.references]
    for s in scans:
        headers = [p for p in (s.files.raw, s.files.white, s.files.dark) if p is not None]
        paths += headers + [find_data_file(h) for h in headers]
        if s.mask_file is not None and s.mask_file.exists():
            paths.append(s.mask_file)
    return sorted(set(paths))


def _data_root(cfg: ChemmapConfig, *, progress: bool, log: Log) -> tuple[Path, str | None]:
    """The scanner folder (synthesised first if the source is the built-in scanner) and its key, if any."""
    if cfg.data.source == "synthetic":
        stage = synth_stage(cfg, progress=progress, log=log)
        return stage.path / "scans", stage.key
    root = cfg.resolve_path(cfg.data.root)
    if not root.is_dir():
        raise InputError(f"{cfg.source}: data.root: folder not found: {root}")
    return root, None


def data_source(cfg: ChemmapConfig, *, progress: bool = True, log: Log = print) -> DataSource:
    """Find the scans and references the config names (synthesising them if it says so)."""
    root, synth_key = _data_root(cfg, progress=progress, log=log)
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
    scans = _scan_inputs(cfg, root, files, sample_of)
    per_sample = refs.drop_duplicates("sample_id")[["sample_id", *cfg.targets, "split"]].reset_index(
        drop=True
    )
    entries = [] if synth_key else file_entries(_input_paths(cfg, root, scans), root)
    base_key = synth_key or stable_hash(entries)
    key = stable_hash({"files": base_key, "refs": per_sample.to_dict(orient="list")})
    return DataSource(root, scans, per_sample, key, skipped, entries)


def patch_geometry(cfg: ChemmapConfig) -> PatchGeometry:
    """The patch index's core, halo and stride: given in ``preprocess:``, else from ``model:``.

    The model's receptive radius and stride come from its config alone
    (:func:`chemmap.models.geometry.unet_geometry`): no network is built.
    """
    from chemmap.models.geometry import unet_geometry

    pre = cfg.preprocess
    if pre.patch_halo is not None and pre.patch_stride is not None:
        radius, stride = pre.patch_halo, pre.patch_stride
    else:
        g = unet_geometry(cfg.model)
        radius = g.radius if pre.patch_halo is None else pre.patch_halo
        stride = g.stride if pre.patch_stride is None else pre.patch_stride
    geometry = PatchGeometry.on_grid(pre.patch_core, radius, stride)
    if pre.patch_halo is not None and geometry.halo != pre.patch_halo:
        raise InputError(
            f"{cfg.source}: preprocess.patch_halo={pre.patch_halo} is not on the stride grid ({stride} px); "
            f"use {geometry.halo}"
        )
    return geometry


def _dataset_config(cfg: ChemmapConfig, geometry: PatchGeometry) -> dict[str, Any]:
    """What decides a dataset besides its input files: the preprocess stage's config section."""
    pre = cfg.preprocess.model_dump(mode="json", exclude={"patch_core", "patch_halo", "patch_stride"})
    patches = {"core": geometry.core, "halo": geometry.halo, "stride": geometry.stride}
    return {
        "preprocess": pre,
        "patches": patches,
        "targets": cfg.targets,
        "on_error": cfg.data.on_error,
        "format": DATASET_FORMAT,  # what the builder writes, and the split rule it applies, changed
    }


def _lookup_key(cfg: ChemmapConfig, section: dict[str, Any]) -> str:
    """The index entry of a data config: where the data come from and how they are preprocessed."""
    if cfg.data.source == "synthetic":
        where: dict[str, Any] = {"synth": cfg.synth.model_dump(mode="json")}
    else:
        where = {
            "data": cfg.data.model_dump(mode="json"),
            "root": str(cfg.resolve_path(cfg.data.root).resolve()),
        }
    return stable_hash({**where, **section})


def _index_path(cfg: ChemmapConfig) -> Path:
    return cfg.workdir_path / "preprocess" / INDEX_FILE


def _read_index(cfg: ChemmapConfig) -> dict[str, Any]:
    path = _index_path(cfg)
    return json.loads(path.read_text()) if path.is_file() else {}


def _record_dataset(cfg: ChemmapConfig, stage: StageDir, src: DataSource) -> None:
    """Remember which dataset this data config produced (read by :func:`find_dataset`)."""
    index = _read_index(cfg)
    index[_lookup_key(cfg, dict(stage.config))] = {
        "key": stage.key,
        "path": str(stage.path),
        "config": stage.config,
        "input_key": src.key,
        "root": str(src.root),
        "files": src.files,
    }
    write_json_atomic(_index_path(cfg), index)


def _warn_if_stale(entry: dict[str, Any], log: Log) -> None:
    """One line when the raw folder is still there and its files changed since preprocessing."""
    root = Path(entry["root"])
    if not entry.get("files") or not root.is_dir():
        return  # synthetic (keyed by content) or archived: nothing to compare
    changed = []
    for rel, size, mtime in entry["files"]:
        try:
            st = (root / rel).stat()
        except FileNotFoundError:
            changed.append(rel)
            continue
        if st.st_size != size or st.st_mtime_ns != mtime:
            changed.append(rel)
    if changed:
        log(
            f"warning: dataset {entry['path']} is stale: {len(changed)} of its input files under {root} "
            f"changed since preprocessing (first: {changed[0]}); run `chemmap preprocess` to refresh it"
        )


def find_dataset(cfg: ChemmapConfig, *, log: Log = print) -> StageDir:
    """The finished dataset this config produced, found through the preprocess index.

    Never reads the raw scans; warns (one line) if they are still there and changed.
    """
    entry = _read_index(cfg).get(_lookup_key(cfg, _dataset_config(cfg, patch_geometry(cfg))))
    if entry is None:
        raise InputError(
            f"dataset not found: no dataset for this data and preprocess config in {_index_path(cfg)}; "
            "run `chemmap preprocess` first"
        )
    stage = StageDir("preprocess", entry["key"], Path(entry["path"]), entry["config"], (entry["input_key"],))
    if not stage.complete:
        raise InputError(
            f"dataset not found: {stage.path / 'dataset.zarr'} is unfinished; run `chemmap preprocess`"
        )
    _warn_if_stale(entry, log)
    return stage


def _consolidate(store: Path) -> None:
    import zarr

    with warnings.catch_warnings():  # "not part of the v3 spec": xarray and zarr-python read it
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(store)


def preprocess_stage(
    cfg: ChemmapConfig, *, progress: bool = True, log: Log = print, runs: tracking.PipelineRuns | None = None
) -> StageDir:
    """Raw scans -> ``dataset.zarr`` (chunk-parallel with Dask), with its patch index.

    Under ``chemmap run`` (``runs``), a dataset built now gets a run nested under the
    pipeline's run with its size; a cached one is linked to the run that built it.
    """
    geometry = patch_geometry(cfg)  # a bad model: section fails here, before any scan is read
    src = data_source(cfg, progress=progress, log=log)
    stage = stage_dir(cfg.workdir_path, "preprocess", _dataset_config(cfg, geometry), [src.key])
    store = stage.path / "dataset.zarr"
    if stage.complete:
        _record_dataset(cfg, stage, src)
        log(f"preprocess: done already ({store})")
        if runs is not None:
            runs.cached("preprocess", stage.summary().get("mlflow_run_id"))
        return stage
    resumed = stage.path.exists()
    stage.begin()
    log(f"preprocess: {len(src.scans)} scans -> {store}" + (" (resuming)" if resumed else ""))
    builder = DatasetBuilder(
        store,
        cfg.preprocess,
        cfg.targets,
        cluster=cfg.cluster,
        on_error=cfg.data.on_error,
        progress=progress,
        log=log,
    )
    summary = builder.build(src.scans, src.references, src.key)
    summary["patches"] = write_patch_index(store, geometry)
    summary["skipped"] = src.skipped + summary["skipped"]
    _consolidate(store)
    summary["store"] = str(store)
    if runs is not None:
        summary["mlflow_run_id"] = _log_dataset_run(runs, stage, summary)
    stage.finish(summary, dump_config(cfg))
    _record_dataset(cfg, stage, src)
    log(
        f"preprocess: {summary['n_samples']} samples, {summary['n_channels']} channels, "
        f"{summary['mask_pixels']} sample pixels"
    )
    return stage


def _log_dataset_run(runs: tracking.PipelineRuns, stage: StageDir, summary: dict[str, Any]) -> str:
    """The preprocess stage's run: what the dataset holds, nested under the pipeline run."""
    rid = runs.stage("preprocess", stage.key)
    numbers = {k: summary[k] for k in ("n_samples", "n_channels", "mask_pixels") if k in summary}
    c = tracking.client(runs.uri)
    tracking.log_metrics(c, rid, {k: float(v) for k, v in numbers.items()}, step=0)
    c.set_tag(rid, "chemmap.dataset", summary["store"])
    c.set_terminated(rid)
    return rid


def train_stage(
    cfg: ChemmapConfig, dataset: StageDir | None = None, *, progress: bool = True, log: Log = print, **kw
) -> StageDir:
    """Train the fold ensemble with Ray Train (see :func:`chemmap.train.trainer.train_ensemble`)."""
    from chemmap.train.trainer import train_ensemble

    return train_ensemble(cfg, dataset or find_dataset(cfg, log=log), progress=progress, log=log, **kw)


def find_training(cfg: ChemmapConfig, dataset: StageDir | None = None, *, log: Log = print) -> StageDir:
    """The finished training stage of this config; an error naming where it looked if none."""
    from chemmap.train.trainer import training_dir

    stage = training_dir(cfg, dataset or find_dataset(cfg, log=log))
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
    runs: tracking.PipelineRuns | None = None,
) -> StageDir:
    """The fold ensemble against PLS and map baselines on the test split (:mod:`chemmap.evaluate.stage`)."""
    from chemmap.evaluate.stage import evaluate_ensemble

    dataset = dataset or find_dataset(cfg, log=log)
    training = training or find_training(cfg, dataset, log=log)
    return evaluate_ensemble(cfg, dataset, training, progress=progress, log=log, runs=runs)


def find_evaluation(cfg: ChemmapConfig, dataset: StageDir, training: StageDir) -> StageDir:
    """The finished evaluation of this training; an error naming where it looked if none."""
    from chemmap.evaluate.stage import evaluation_dir

    stage = evaluation_dir(cfg, dataset, training)
    if not stage.complete:
        raise InputError(f"no finished evaluation at {stage.path}; run `chemmap evaluate` first")
    return stage


def register_stage(
    cfg: ChemmapConfig,
    dataset: StageDir | None = None,
    training: StageDir | None = None,
    evaluation: StageDir | None = None,
    *,
    log: Log = print,
    runs: tracking.PipelineRuns | None = None,
) -> StageDir:
    """The evaluated ensemble into the MLflow registry, with its alias (:mod:`chemmap.registry.stage`)."""
    from chemmap.registry.stage import register_model

    dataset = dataset or find_dataset(cfg, log=log)
    training = training or find_training(cfg, dataset, log=log)
    evaluation = evaluation or find_evaluation(cfg, dataset, training)
    return register_model(cfg, dataset, training, evaluation, runs=runs, log=log)


def run(cfg: ChemmapConfig, *, until: str = STAGES[-1], progress: bool = True, log: Log = print) -> dict:
    """Run the pipeline's stages in order up to ``until``; returns each stage's folder.

    One MLflow run stands for this invocation; every stage that does work logs a run nested
    under it, and a cached stage is linked to the run that made it (``chemmap.cached.<stage>``).
    """
    if until not in STAGES:
        raise InputError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    out: dict[str, Path] = {}
    if until == "synth":
        if cfg.data.source == "synthetic":
            out["synth"] = synth_stage(cfg, progress=progress, log=log).path
        return out
    tracking.check_tracking_uri(cfg.tracking_uri)
    runs = tracking.PipelineRuns.start(
        cfg.tracking_uri, cfg.mlflow.experiment or cfg.name, cfg.name, dump_config(cfg)
    )
    try:
        _run_stages(cfg, until, out, runs, progress=progress, log=log)
    except BaseException:
        runs.finish("FAILED")
        raise
    runs.finish()
    out["mlflow_run_id"] = runs.parent
    return out


def _run_stages(
    cfg: ChemmapConfig, until: str, out: dict, runs: tracking.PipelineRuns, *, progress: bool, log: Log
) -> None:
    pre = preprocess_stage(cfg, progress=progress, log=log, runs=runs)
    out["preprocess"] = pre.path
    if until == "preprocess":
        return
    tr = train_stage(cfg, pre, progress=progress, log=log, runs=runs)
    out["train"] = tr.path
    if until == "train":
        return
    ev = evaluate_stage(cfg, pre, tr, progress=progress, log=log, runs=runs)
    out["evaluate"] = ev.path
    if until == "evaluate":
        return
    out["register"] = register_stage(cfg, pre, tr, ev, log=log, runs=runs).path


# ----------------------------------------------------------------------------- after the pipeline


def resolve_tracking_uri(tracking_uri: str | None, cfg: ChemmapConfig | None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the pipeline config's; checked once."""
    import os

    uri = (
        tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or (cfg.tracking_uri if cfg is not None else None)
    )
    if not uri:
        raise InputError(
            "no MLflow tracking URI: pass --tracking-uri, set MLFLOW_TRACKING_URI, or give --config"
        )
    tracking.check_tracking_uri(uri)
    return uri


def _model_cache(cfg: ChemmapConfig | None) -> Path:
    if cfg is not None:
        return cfg.workdir_path / "models"
    return Path.home() / ".cache" / "chemmap" / "models"


@dataclass(frozen=True)
class ScoreOptions:
    """How ``chemmap score`` runs: once or watching, locally or on Ray actors.

    Attributes:
        watch: keep scoring new scans as they arrive (until SIGINT/SIGTERM).
        poll_seconds, settle_seconds: how often the folder is looked at, and how long a scan's
            files must stay unchanged before it counts as written.
        ray_address: score on Ray actors (``auto``, ``ray://head:10001``); None: here, or the
            config's ``cluster.ray_address`` when one is set.
        num_actors: actors on Ray (default: one per CPU, or per GPU with ``use_gpu``).
        use_gpu: one GPU per actor.
    """

    watch: bool = False
    poll_seconds: float = 2.0
    settle_seconds: float = 5.0
    ray_address: str | None = None
    num_actors: int | None = None
    use_gpu: bool = False


def _score_model(model: str, tracking_uri: str | None, cfg: ChemmapConfig | None):
    """``(bundle, name, version)`` of a ``models:/`` URI (downloaded, checked) or a model folder."""
    from chemmap.inference.bundle import read_bundle

    if model.startswith("models:/"):
        from chemmap.registry.registry import fetch_bundle

        return fetch_bundle(resolve_tracking_uri(tracking_uri, cfg), model, _model_cache(cfg))
    bundle = read_bundle(Path(model))
    return bundle, bundle.path.name, f"local-{bundle.manifest['sha256'][bundle.manifest['weights'][0]][:12]}"


def score_scans(
    model: str,
    input_dir: Path,
    output: Path,
    *,
    tracking_uri: str | None = None,
    cfg: ChemmapConfig | None = None,
    samples: Path | None = None,
    wavelength_tolerance_nm: float = 1.0,
    options: ScoreOptions = ScoreOptions(),
    progress: bool = True,
    log: Log = print,
):
    """Every scan of a scanner's folder -> maps, with a registered model (or a model folder).

    ``models:/NAME@alias`` is resolved once and its files downloaded (and checked: nothing
    stored with the model is run); the version used is recorded with every map. With
    ``cfg``, its ``data:`` patterns describe the folder's layout and its ``cluster:`` section
    where to run. See :class:`ScoreOptions` for watching a folder and Ray actors.
    """
    from chemmap.inference.score import score_folder

    ray_address = options.ray_address or (cfg.cluster.ray_address if cfg is not None else None)
    if options.watch and ray_address:
        raise InputError("score: --watch runs here; it cannot be combined with a Ray address")
    bundle, name, version = _score_model(model, tracking_uri, cfg)
    data = cfg.data if cfg is not None and cfg.data.source == "folder" else None
    common = {
        "model_name": name,
        "model_version": version,
        "raw_pattern": data.raw_pattern if data else None,
        "white_pattern": data.white_pattern if data else None,
        "dark_pattern": data.dark_pattern if data else None,
        "samples_csv": samples,
        "wavelength_tolerance_nm": wavelength_tolerance_nm,
        "log": log,
    }
    if options.watch:
        from chemmap.inference.watch import watch_folder

        poll = {"poll_seconds": options.poll_seconds, "settle_seconds": options.settle_seconds}
        return watch_folder(bundle, input_dir, output, **poll, **common)
    if ray_address:
        from chemmap.inference.actors import score_on_ray

        actors = {"ray_address": ray_address, "num_actors": options.num_actors, "use_gpu": options.use_gpu}
        return score_on_ray(bundle.path, input_dir, output, **actors, progress=progress, **common)
    return score_folder(bundle, input_dir, output, progress=progress, **common)


def promote_version(
    name: str,
    version: str,
    alias: str = "champion",
    *,
    tracking_uri: str | None = None,
    cfg: ChemmapConfig | None = None,
) -> None:
    """Move ``alias`` to ``version`` of ``name`` by hand (the old champion becomes ``previous``)."""
    from chemmap.registry.registry import promote

    promote(resolve_tracking_uri(tracking_uri, cfg), name, version, alias)
