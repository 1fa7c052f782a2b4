"""The pipeline's stages, each a function of the resolved config, chained through stage keys.

``synth`` (when the data source is the built-in scanner) -> ``preprocess`` -> ``train`` ->
``evaluate`` -> ``register`` -> ``score`` (the test split's scans, or ``score.input``, with
the model just registered). Each stage computes its key from its own config section and
its inputs' keys, returns at once when that folder is complete, and otherwise builds it
(resuming what an interrupted run left) and writes its completion marker last.
:func:`run` chains them (``--from``, ``--to``, ``--force``) and :func:`run_summary` says
what came out; ``chemmap score`` (:func:`score_scans`) scores any folder with any model.

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
from chemmap.io.layout import links_may_lead_into
from chemmap.preprocess.dataset import (
    DATASET_FORMAT,
    DatasetBuilder,
    PatchGeometry,
    ScanInput,
    write_patch_index,
)
from chemmap.stages import LOCKS, StageDir, file_entries, file_lock, stable_hash, stage_dir

Log = Callable[[str], None]
STAGES = ("synth", "preprocess", "train", "evaluate", "register", "score")
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


def synth_dir(cfg: ChemmapConfig) -> StageDir:
    """The synth stage's folder for ``cfg.synth`` (its scans are under ``scans/``).

    The key holds the scanner's version: scans of another version's physics are never reused.
    """
    return stage_dir(cfg.workdir_path, "synth", cfg.synth.model_dump(mode="json"), scanner_inputs())


def scanner_inputs(version: int | None = None) -> list[str]:
    """The synth stage's inputs: the built-in scanner's version (``SYNTH_VERSION`` by default)."""
    from chemmap.synth.scanner import SYNTH_VERSION

    return [f"scanner-v{SYNTH_VERSION if version is None else version}"]


def synth_stage(
    cfg: ChemmapConfig, *, progress: bool = True, log: Log = print, force: bool = False
) -> StageDir:
    """Write the built-in scanner's output for ``cfg.synth`` (once per config; ``force``: again)."""
    from chemmap.synth import SynthSpec, synthesize

    stage = synth_dir(cfg)
    with stage.lock(log):
        if force:
            stage.clear()
        if stage.complete:
            log(f"synth: done already ({stage.path})")
            return stage
        stage.begin()
        spec = SynthSpec.from_config(cfg.synth)
        log(
            f"synth: {spec.n_samples} samples x {spec.scans_per_sample} scans, "
            f"{spec.lines}x{spec.samples} px, {spec.instrument} -> {stage.path / 'scans'}"
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


def _data_root(
    cfg: ChemmapConfig, *, progress: bool, log: Log, synth: StageDir | None = None
) -> tuple[Path, str | None]:
    """The scanner folder (synthesised first if the source is the built-in scanner) and its key, if any.

    ``synth``: the finished synth stage, when the caller already has it.
    """
    if cfg.data.source == "synthetic":
        stage = synth or synth_stage(cfg, progress=progress, log=log)
        return stage.path / "scans", stage.key
    root = cfg.resolve_path(cfg.data.root)
    if not root.is_dir():
        raise InputError(f"{cfg.source}: data.root: folder not found: {root}")
    return root, None


def data_source(
    cfg: ChemmapConfig, *, progress: bool = True, log: Log = print, synth: StageDir | None = None
) -> DataSource:
    """Find the scans and references the config names (synthesising them if it says so)."""
    root, synth_key = _data_root(cfg, progress=progress, log=log, synth=synth)
    files = discover_scans(root, cfg.data.raw_pattern, cfg.data.white_pattern, cfg.data.dark_pattern)
    for f in files:
        if f.refused:  # an id that cannot name outputs, a link out of the root: whatever on_error says
            raise InputError(f.refused)
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
    """Remember which dataset this data config produced (read by :func:`find_dataset`).

    Under a lock: processes preprocessing other datasets of the workdir update the index too.
    """
    with file_lock(cfg.workdir_path / LOCKS / "preprocess-index.lock", f"preprocess: {_index_path(cfg)}"):
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
    cfg: ChemmapConfig,
    *,
    progress: bool = True,
    log: Log = print,
    runs: tracking.PipelineRuns | None = None,
    force: bool = False,
    synth: StageDir | None = None,
) -> StageDir:
    """Raw scans -> ``dataset.zarr`` (chunk-parallel with Dask), with its patch index.

    Under ``chemmap run`` (``runs``), a dataset built now gets a run nested under the
    pipeline's run with its size; a cached one is linked to the run that built it.
    ``force``: build it again even if it is finished; ``synth``: the finished synth stage.
    """
    geometry = patch_geometry(cfg)  # a bad model: section fails here, before any scan is read
    src = data_source(cfg, progress=progress, log=log, synth=synth)
    stage = stage_dir(cfg.workdir_path, "preprocess", _dataset_config(cfg, geometry), [src.key])
    store = stage.path / "dataset.zarr"
    with stage.lock(log):
        if force:
            stage.clear()
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
    cfg: ChemmapConfig,
    dataset: StageDir | None = None,
    *,
    progress: bool = True,
    log: Log = print,
    force: bool = False,
    **kw,
) -> StageDir:
    """Train the fold ensemble with Ray Train (see :func:`chemmap.train.trainer.train_ensemble`).

    ``force``: train again from scratch, even if finished (its checkpoints are removed too).
    """
    from chemmap.train.trainer import clear_training, train_ensemble, training_dir

    dataset = dataset or find_dataset(cfg, log=log)
    stage = training_dir(cfg, dataset)
    with stage.lock(log):
        if force:
            clear_training(cfg, stage)
        return train_ensemble(cfg, dataset, progress=progress, log=log, **kw)


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
    force: bool = False,
) -> StageDir:
    """The fold ensemble against PLS and map baselines on the test split (:mod:`chemmap.evaluate.stage`)."""
    from chemmap.evaluate.stage import evaluate_ensemble, evaluation_dir

    dataset = dataset or find_dataset(cfg, log=log)
    training = training or find_training(cfg, dataset, log=log)
    stage = evaluation_dir(cfg, dataset, training)
    with stage.lock(log):
        if force:
            stage.clear()
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
    force: bool = False,
) -> StageDir:
    """The evaluated ensemble into the MLflow registry, with its alias (:mod:`chemmap.registry.stage`).

    ``force``: register it again (a new version), even if this stage finished before.
    """
    from chemmap.registry.stage import register_model, registration_dir

    dataset = dataset or find_dataset(cfg, log=log)
    training = training or find_training(cfg, dataset, log=log)
    evaluation = evaluation or find_evaluation(cfg, dataset, training)
    stage = registration_dir(cfg, dataset, training, evaluation)
    with stage.lock(log):
        if force:
            stage.clear()
        return register_model(cfg, dataset, training, evaluation, runs=runs, log=log)


def find_registration(
    cfg: ChemmapConfig, dataset: StageDir, training: StageDir, evaluation: StageDir
) -> StageDir:
    """The finished registration of this evaluation; an error naming where it looked if none."""
    from chemmap.registry.stage import registration_dir

    stage = registration_dir(cfg, dataset, training, evaluation)
    if not stage.complete:
        raise InputError(f"no finished registration at {stage.path}; run `chemmap register` first")
    return stage


# ----------------------------------------------------------------------------- the score stage

SCORE_FORMAT = 1  # what the score stage writes (bump when that changes)


@dataclass(frozen=True)
class ScoreInput:
    """What the score stage scores: the test split's scans, or the folder ``score.input`` names.

    Attributes:
        label: ``test split``, or the folder's absolute path (in the stage key).
        root: the scanner folder the scans are in.
        paths: every file of those scans (headers, data files, mask images).
        sample_of: scan id -> sample id (the test split), None for a folder.
        key: the dataset's key (the test split) or the files' key (names, sizes, times).
    """

    label: str
    root: Path
    paths: list[Path]
    sample_of: dict[str, str] | None
    key: str


def _layout(cfg: ChemmapConfig) -> tuple[str | None, str | None, str | None]:
    """The scanner folder's patterns, as :func:`score_scans` reads them (Specim's without ``data:``)."""
    d = cfg.data
    return (d.raw_pattern, d.white_pattern, d.dark_pattern) if d.source == "folder" else (None, None, None)


def _scan_file_paths(cfg: ChemmapConfig, root: Path, files) -> list[Path]:
    """Headers and data files of these scans and their references, and their mask images."""
    mask = cfg.preprocess.mask
    paths: list[Path] = []
    for f in files:
        headers = [p for p in (f.raw, f.white, f.dark) if p is not None]
        paths += headers + [find_data_file(h) for h in headers]
        if mask.method == "files" and mask.pattern:
            image = root / mask.pattern.replace("{scan_id}", f.scan_id)
            paths += [image] if image.is_file() else []
    return sorted(set(paths))


def _test_split_input(cfg: ChemmapConfig, dataset: StageDir) -> ScoreInput:
    """The test split's scans (split 0 of the dataset), found in the scanner folder they came from."""
    from chemmap.preprocess.store import Dataset

    data = Dataset(dataset.path / "dataset.zarr")
    sample_of = {scan: sid for sid in data.ids([0]) for scan in data.samples[sid].scans}
    synthetic = cfg.data.source == "synthetic"
    root = synth_dir(cfg).path / "scans" if synthetic else cfg.resolve_path(cfg.data.root)
    if not root.is_dir():
        raise InputError(
            f"score: the test split's raw scans are gone ({root} is not a folder); "
            "name a folder to score with score.input, or stop before scoring with --to register"
        )
    files = [f for f in discover_scans(root, *_layout(cfg)) if f.scan_id in sample_of]
    missing = sorted(set(sample_of) - {f.scan_id for f in files})
    if missing:
        raise InputError(f"score: test scans not found under {root}: {', '.join(missing[:5])}")
    return ScoreInput("test split", root, _scan_file_paths(cfg, root, files), sample_of, dataset.key)


def score_input(cfg: ChemmapConfig, dataset: StageDir) -> ScoreInput:
    """What the score stage of this config scores (``score.input``, else the test split)."""
    from chemmap.stages import files_key

    if not cfg.score.input:
        return _test_split_input(cfg, dataset)
    root = cfg.resolve_path(cfg.score.input)
    if not root.is_dir():
        raise InputError(f"{cfg.source}: score.input: folder not found: {root}")
    paths = _scan_file_paths(cfg, root, discover_scans(root, *_layout(cfg)))
    return ScoreInput(str(root.resolve()), root, paths, None, files_key(paths, root))


def scoring_dir(cfg: ChemmapConfig, registration: StageDir, src: ScoreInput) -> StageDir:
    """The score stage's folder: keyed by the model's version, what is scored and the inputs' keys."""
    reg = registration.summary()
    section = {"input": src.label, "model": f"models:/{reg['name']}/{reg['version']}", "format": SCORE_FORMAT}
    return stage_dir(cfg.workdir_path, "score", section, [registration.key, src.key])


def _link_scans(src: ScoreInput, dest: Path) -> Path:
    """``dest`` laid out like the scanner folder, with links to the scans' files only."""
    for path in src.paths:
        try:
            link = dest / path.relative_to(src.root)
        except ValueError:
            raise InputError(
                f"score: {path} lies outside the scanner folder {src.root}; name a folder with score.input"
            ) from None
        if link.is_symlink():
            link.unlink()  # an interrupted run's link: made again
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    return dest


def _score_test_table(src: ScoreInput, path: Path) -> Path:
    """``scan_id,sample_id`` of the test scans, so that scoring writes each sample's mean too."""
    import csv

    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["scan_id", "sample_id"])
        w.writerows(sorted((src.sample_of or {}).items()))
    return path


def _log_score_run(cfg: ChemmapConfig, stage: StageDir, result, runs: tracking.PipelineRuns | None) -> str:
    """The score stage's run: the model, what it scored, how fast, and ``summary.csv``."""
    tags = {"chemmap.model": stage.config["model"], "chemmap.score_input": stage.config["input"]}
    if runs is not None:
        rid = runs.stage("score", stage.key, tags=tags)
    else:
        experiment = cfg.mlflow.experiment or cfg.name
        rid = tracking.stage_run(cfg.tracking_uri, experiment, "score", stage.key, tags=tags)
    c = tracking.client(cfg.tracking_uri)
    numbers = {
        "scans_scored": result.ok,
        "scans_skipped": result.skipped,
        "seconds": result.seconds,
        "scans_per_second": result.scans_per_second,
    }
    tracking.log_metrics(c, rid, {k: float(v) for k, v in numbers.items()}, step=0)
    for table in (result.summary_csv, result.samples_csv):
        if table is not None and Path(table).is_file():
            c.log_artifact(rid, str(table))
    c.set_terminated(rid)
    return rid


def score_stage(
    cfg: ChemmapConfig,
    dataset: StageDir,
    registration: StageDir,
    *,
    progress: bool = True,
    log: Log = print,
    runs: tracking.PipelineRuns | None = None,
    force: bool = False,
) -> StageDir:
    """Maps of the test split (or ``score.input``) with the model the register stage registered.

    The scans go through :func:`score_scans`, as with ``chemmap score``, from the registry
    (``models:/NAME/VERSION``). Writes ``maps/`` (maps, pictures, ``summary.csv``, and for the
    test split ``samples.csv``), ``scans/`` (links to the test scans' files) and ``scans.csv``.
    A scan that fails leaves the stage unfinished: the next run scores what is left.
    """
    src = score_input(cfg, dataset)
    stage = scoring_dir(cfg, registration, src)
    with stage.lock(log):
        if force:
            stage.clear()
        if stage.complete:
            log(f"score: done already ({stage.path / 'maps'})")
            if runs is not None:
                runs.cached("score", stage.summary().get("mlflow_run_id"))
            return stage
        out = stage.begin()
        model = stage.config["model"]
        input_dir, samples = src.root, None
        if src.sample_of is not None:
            input_dir = _link_scans(src, out / "scans")
            samples = _score_test_table(src, out / "scans.csv")
        what = f"{len(src.sample_of)} test-split scans" if src.sample_of is not None else str(src.root)
        log(f"score: {what} with {model} -> {out / 'maps'}")
        with links_may_lead_into(src.root):  # the links in out/scans lead into the scanner folder
            result = score_scans(
                model,
                input_dir,
                out / "maps",
                tracking_uri=cfg.tracking_uri,
                cfg=cfg,
                samples=samples,
                progress=progress,
                log=log,
            )
        if result.errors or result.busy:
            raise InputError(
                f"score: {result.errors} scans failed and {result.busy} were busy; {result.summary_csv} says "
                "why; run again to score what is left, or stop before scoring with --to register"
            )
        reg = registration.summary()
        summary = {
            "model_uri": model,
            "alias": reg.get("alias"),
            "input": str(src.root),
            "maps": str(out / "maps"),
            "summary_csv": str(result.summary_csv),
            "samples_csv": str(result.samples_csv) if result.samples_csv else None,
            "scans": result.ok + result.skipped,
            "seconds": result.seconds,
            "mlflow_run_id": _log_score_run(cfg, stage, result, runs),
            "tracking_uri": cfg.tracking_uri,
        }
        stage.finish(summary, dump_config(cfg))
        return stage


# ----------------------------------------------------------------------------- chemmap run


@dataclass(frozen=True)
class RunPlan:
    """Which stages ``chemmap run`` runs (``--from``, ``--to``) and which it runs again (``--force``).

    Stages before ``start`` are not run: their finished outputs are found (an error names
    the first one missing). From ``force`` on (``start`` with a bare ``--force``), finished
    stages are made again; other finished stages are skipped.
    """

    start: str = STAGES[0]
    until: str = STAGES[-1]
    force: str | None = None

    def __post_init__(self) -> None:
        for flag, name in (("--from", self.start), ("--to", self.until), ("--force", self.force)):
            if name is not None and name not in STAGES:
                raise InputError(f"{flag}: unknown stage {name!r}; stages: {', '.join(STAGES)}")
        i = STAGES.index
        if i(self.start) > i(self.until):
            raise InputError(f"--from {self.start} comes after --to {self.until}: nothing to run")
        if self.force is not None and not i(self.start) <= i(self.force) <= i(self.until):
            raise InputError(
                f"--force {self.force}: not a stage this run runs (--from {self.start} --to {self.until})"
            )

    def runs(self, stage: str) -> bool:
        """Whether ``stage`` is run (rather than found or left out)."""
        return STAGES.index(self.start) <= STAGES.index(stage) <= STAGES.index(self.until)

    def forced(self, stage: str) -> bool:
        """Whether ``stage`` is made again even if it finished before."""
        return self.force is not None and self.runs(stage) and STAGES.index(stage) >= STAGES.index(self.force)


def run(
    cfg: ChemmapConfig,
    *,
    until: str = STAGES[-1],
    start: str = STAGES[0],
    force: str | None = None,
    progress: bool = True,
    log: Log = print,
) -> dict:
    """Run the pipeline's stages in order from ``start`` to ``until``; returns each stage's folder.

    Finished stages are skipped, unfinished ones resume, ``force`` and the stages after it
    are made again (:class:`RunPlan`). One MLflow run stands for this invocation; every
    stage that does work logs a run nested under it, and a cached or found stage is linked
    to the run that made it (``chemmap.cached.<stage>``).
    """
    plan = RunPlan(start, until, force)
    _check_named_paths(cfg, plan)
    out: dict[str, Any] = {}
    if plan.until == "synth":
        if cfg.data.source == "synthetic":
            out["synth"] = synth_stage(cfg, progress=progress, log=log, force=plan.forced("synth")).path
        return out
    tracking.check_tracking_uri(cfg.tracking_uri)
    runs = tracking.PipelineRuns.start(
        cfg.tracking_uri, cfg.mlflow.experiment or cfg.name, cfg.name, dump_config(cfg)
    )
    try:
        _run_stages(cfg, plan, out, runs, progress=progress, log=log)
    except BaseException as err:
        runs.end_after_error("KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED")
        raise
    runs.finish()
    out["mlflow_run_id"] = runs.parent
    return out


def _check_named_paths(cfg: ChemmapConfig, plan: RunPlan) -> None:
    """The folders and files the config names for the stages that run must be there before any
    stage starts or any MLflow run is made: a typo fails now, not after hours of training."""
    if cfg.data.source == "folder" and plan.runs("preprocess"):
        root = cfg.resolve_path(cfg.data.root)
        if not root.is_dir():
            raise InputError(f"{cfg.source}: data.root: folder not found: {root}")
        if not (root / cfg.data.references).is_file():
            raise InputError(f"{cfg.source}: data.references: file not found: {root / cfg.data.references}")
    if cfg.score.input and plan.runs("score") and not cfg.resolve_path(cfg.score.input).is_dir():
        raise InputError(f"{cfg.source}: score.input: folder not found: {cfg.resolve_path(cfg.score.input)}")


def _found(name: str, stage: StageDir, runs: tracking.PipelineRuns, log: Log) -> StageDir:
    """A stage before ``--from``: linked to this invocation's run, not run."""
    log(f"{name}: done already ({stage.path})")
    runs.cached(name, stage.summary().get("mlflow_run_id"))
    return stage


def _synth_for_run(cfg: ChemmapConfig, plan: RunPlan, out: dict, *, progress: bool, log: Log):
    """The synth stage, run (``--from synth``) or found (``--from preprocess``); None when not needed."""
    if cfg.data.source != "synthetic" or not (plan.runs("synth") or plan.start == "preprocess"):
        return None
    if plan.runs("synth"):
        stage = synth_stage(cfg, progress=progress, log=log, force=plan.forced("synth"))
    else:
        stage = synth_dir(cfg)
        if not stage.complete:
            raise InputError(f"no finished synthetic scans at {stage.path}; run without --from first")
        log(f"synth: done already ({stage.path / 'scans'})")
    out["synth"] = stage.path
    return stage


def _run_stages(
    cfg: ChemmapConfig, plan: RunPlan, out: dict, runs: tracking.PipelineRuns, *, progress: bool, log: Log
) -> None:
    kw = {"progress": progress, "log": log}
    synth = _synth_for_run(cfg, plan, out, **kw)
    if plan.runs("preprocess"):
        pre = preprocess_stage(cfg, runs=runs, force=plan.forced("preprocess"), synth=synth, **kw)
    else:
        pre = _found("preprocess", find_dataset(cfg, log=log), runs, log)
    out["preprocess"] = pre.path
    if plan.until == "preprocess":
        return
    if plan.runs("train"):
        tr = train_stage(cfg, pre, runs=runs, force=plan.forced("train"), **kw)
    else:
        tr = _found("train", find_training(cfg, pre, log=log), runs, log)
    out["train"] = tr.path
    if plan.until == "train":
        return
    if plan.runs("evaluate"):
        ev = evaluate_stage(cfg, pre, tr, runs=runs, force=plan.forced("evaluate"), **kw)
    else:
        ev = _found("evaluate", find_evaluation(cfg, pre, tr), runs, log)
    out["evaluate"] = ev.path
    if plan.until == "evaluate":
        return
    if plan.runs("register"):
        reg = register_stage(cfg, pre, tr, ev, log=log, runs=runs, force=plan.forced("register"))
    else:
        reg = _found("register", find_registration(cfg, pre, tr, ev), runs, log)
    out["register"] = reg.path
    if plan.until == "register":
        return
    out["score"] = score_stage(cfg, pre, reg, runs=runs, force=plan.forced("score"), **kw).path


# ----------------------------------------------------------------------------- the closing summary


def _marker(path: Path | None) -> dict[str, Any]:
    return json.loads((Path(path) / "_COMPLETE.json").read_text()) if path else {}


def _of(value: Any, target: str, targets: list[str]) -> Any:
    """One target's entry of a ``metrics.json`` value (keyed by target when there are several)."""
    return value if len(targets) == 1 else value.get(target, {})


def _figure_lines(metrics: dict[str, Any], targets: list[str]) -> list[str]:
    """The test figures of the evaluate stage's ``metrics.json``: two lines per target."""
    lines = []
    for t in targets:
        models = {name: _of(m, t, targets) for name, m in metrics["models"].items()}
        unet, pls = models["unet"]["rmse"], models["pls"]["rmse"]
        line = f"    {t}, sample means vs the lab: U-Net {unet:.2f} | PLS {pls:.2f}"
        boot = metrics.get("bootstrap_rmse_unet_minus_pls")
        if boot and t == targets[0]:  # the bootstrap is of the first target
            ci = f"95 % CI [{boot['ci_low']:+.2f}, {boot['ci_high']:+.2f}]"
            line += f" (U-Net - PLS {boot['estimate']:+.2f}, {ci})"
        lines.append(line)
        maps = _of(metrics.get("maps", {}), t, targets)
        best = _of(metrics.get("protocol", {}), t, targets).get("best_label_free")
        if maps.get("unet", {}).get("pixel_rmse") is None:
            lines.append(f"    {t}, per pixel: no true maps to compare with")
            continue
        parts = [f"U-Net {maps['unet']['pixel_rmse']:.2f}"]
        if best in maps:
            parts.append(f"best label-free baseline {best} {maps[best]['pixel_rmse']:.2f}")
        if best != "pls" and "pls" in maps:
            parts.append(f"PLS {maps['pls']['pixel_rmse']:.2f}")
        if "flat_lab" in maps:
            parts.append(f"flat map at the lab value (uses the label) {maps['flat_lab']['pixel_rmse']:.2f}")
        lines.append(f"    {t}, per pixel vs the true maps: " + " | ".join(parts))
    return lines


def run_summary(out: dict[str, Any]) -> list[str]:
    """What ``chemmap run`` made, for the console: the test figures, where things are, the model.

    ``out``: what :func:`run` returned. Reads the stages' completion records and the evaluate
    stage's ``metrics.json``.
    """
    lines = ["", "summary"]
    if "evaluate" in out:
        ev = _marker(out["evaluate"])
        metrics = json.loads(Path(ev["metrics"]).read_text())
        targets = list(ev["config"]["targets"])
        lines.append(f"  test split, {metrics['n_test']} samples: RMSE, %")
        lines += _figure_lines(metrics, targets)
        lines.append(f"  report       {ev['report']}")
    else:
        where = {
            "scans": ("synth", "scans"),
            "dataset": ("preprocess", "dataset.zarr"),
            "training": ("train", ""),
        }
        lines += [f"  {name:<12} {Path(out[k]) / sub}" for name, (k, sub) in where.items() if k in out]
    if "score" in out:
        sc = _marker(out["score"])
        lines.append(f"  maps         {sc['maps']} ({sc['scans']} scans)")
        lines.append(f"  summary.csv  {sc['summary_csv']}")
    if "register" in out:
        reg = _marker(out["register"])
        name, version, alias = reg["name"], reg["version"], reg["alias"]
        lines.append(f"  model        models:/{name}/{version}, alias {alias} (models:/{name}@{alias})")
        lines.append(f"  tracking     {reg['tracking_uri']}")
    return lines


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
        use_gpu: the model on a GPU: here (``cuda``), or one GPU per Ray actor.
        give_up_seconds: with ``watch``, how long a scan's files may stay unchanged while it
            is still unreadable before it gets an error row (default 300 s).
        mode: ``exact``, ``gaussian`` or ``constant`` (:class:`chemmap.inference.score.Engine`).
        amp: bf16 autocast, with ``use_gpu``.
    """

    watch: bool = False
    poll_seconds: float = 2.0
    settle_seconds: float = 5.0
    ray_address: str | None = None
    num_actors: int | None = None
    use_gpu: bool = False
    give_up_seconds: float = 300.0
    mode: str = "exact"
    amp: bool = False


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
    from chemmap.inference.score import Engine, score_folder

    engine = Engine(options.mode, device="cuda" if options.use_gpu else "cpu", amp=options.amp)
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
        "engine": engine,
        "log": log,
    }
    if options.watch:
        from chemmap.inference.watch import watch_folder

        poll = {
            "poll_seconds": options.poll_seconds,
            "settle_seconds": options.settle_seconds,
            "give_up_seconds": options.give_up_seconds,
        }
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
