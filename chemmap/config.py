"""Typed, layered configuration: YAML files validated into pydantic models.

A pipeline file (``pipelines/*.yaml``) may name a ``base:`` file it extends (a path
relative to itself); mappings merge key by key, the later file winning. Command-line
overrides (``--set preprocess.bin=2``) go on top. Every error names the file, the key,
the value received and what was expected.
"""

from __future__ import annotations

import copy
import os
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chemmap.errors import ConfigError


class _Section(BaseModel):
    # A typo in a key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        # Strings become paths, URIs and column names: a NUL in one fails deep inside os calls.
        if any(isinstance(s, str) and "\0" in s for s in (v if isinstance(v, (list, tuple)) else [v])):
            raise ValueError("must not contain a NUL character")
        return v


class SynthConfig(_Section):
    """The built-in synthetic scanner (used when ``data.source`` is ``synthetic``)."""

    instrument: Literal["vnir", "nir"] = "vnir"
    n_samples: int = Field(180, ge=6)
    lines: int = Field(128, ge=16)  # along the belt
    samples: int = Field(96, ge=16)  # across the belt (detector pixels)
    bands: int | None = Field(None, ge=8)  # None: the instrument preset
    wavelength_range: tuple[float, float] | None = None  # nm; None: the preset
    scans_per_sample: int = Field(1, ge=1, le=4)
    seed: int = 0


class DataConfig(_Section):
    """Where scans and lab values come from."""

    source: Literal["synthetic", "folder"] = "synthetic"
    # A scanner's output folder (source: folder); relative paths are relative to the config file.
    root: str | None = None
    references: str = "references.csv"  # relative to root
    # Glob patterns with {scan_id}, relative to root; None finds the Specim recorder layout.
    raw_pattern: str | None = None
    white_pattern: str | None = None
    dark_pattern: str | None = None
    # What to do with a scan that fails validation: stop, or report it and go on without it.
    on_error: Literal["fail", "skip"] = "fail"

    @model_validator(mode="after")
    def _root_for_folder(self) -> DataConfig:
        if self.source == "folder" and not self.root:
            raise ValueError("data.root is required when data.source is 'folder'")
        return self


class SavGolConfig(_Section):
    window: int = Field(7, ge=3)
    polyorder: int = Field(2, ge=0)
    deriv: int = Field(1, ge=0, le=2)

    @model_validator(mode="after")
    def _odd_window(self) -> SavGolConfig:
        if self.window % 2 == 0:
            raise ValueError(f"savgol.window must be odd, got {self.window}")
        if self.polyorder >= self.window:
            raise ValueError(f"savgol.polyorder must be < window ({self.window}), got {self.polyorder}")
        return self


class MaskConfig(_Section):
    """How the sample is told from the belt.

    ``threshold``: mean reflectance over ``band_range`` above ``threshold``, then a
    morphological opening, hole filling, dropping components under ``min_size`` pixels
    and an erosion of the edge (mixed meat/belt pixels). ``files``: a mask image per scan
    (``.npy`` or ``.png``, non-zero = sample) found by ``pattern`` relative to the data root.
    Saturated and dead pixels are removed from either.
    """

    method: Literal["threshold", "files"] = "threshold"
    band_range: tuple[float, float] | None = None  # nm; None: every selected band
    threshold: float = 0.15  # reflectance
    opening: int = Field(1, ge=0)  # px radius
    erode: int = Field(1, ge=0)  # px radius
    min_size: int = Field(64, ge=1)  # px
    fill_holes: bool = True
    pattern: str | None = None  # for method: files, e.g. "{scan_id}/capture/{scan_id}_mask.png"

    @model_validator(mode="after")
    def _pattern_for_files(self) -> MaskConfig:
        if self.method == "files" and not self.pattern:
            raise ValueError("mask.pattern is required when mask.method is 'files'")
        return self


class PreprocessConfig(_Section):
    """The preprocessing recipe: raw counts -> model input. Stored with the dataset and the model."""

    calibration: Literal["white_dark", "none"] = "white_dark"
    wavelength_min: float | None = None  # nm, inclusive
    wavelength_max: float | None = None  # nm, inclusive
    bin: int = Field(1, ge=1)  # average this many adjacent bands
    transform: Literal["reflectance", "absorbance"] = "reflectance"
    snv: bool = False
    savgol: SavGolConfig | None = None
    # Counts at or above this are saturated; None: the header's 'ceiling', else the dtype's maximum.
    saturation: int | None = None
    # A detector element whose white minus dark is below this many counts is dead.
    min_white_signal: float = 20.0
    mask: MaskConfig = MaskConfig()
    # Storage: zarr chunk of the calibrated cube (all bands, chunk_lines x chunk_samples).
    chunk_lines: int = Field(128, ge=8)
    chunk_samples: int = Field(256, ge=8)
    shard_lines: int | None = None  # zarr v3 shards (multiples of the chunk); None: unsharded
    # Patch index (core windows of patch-wise training), in px at the input's resolution, on
    # the model's stride grid. None: computed from the model: section (receptive radius and
    # stride) without building a network. The resolved values are part of the stage key.
    patch_core: int = Field(64, ge=8)  # rounded up to a multiple of the stride
    patch_halo: int | None = Field(None, ge=0)  # >= the model's receptive radius
    patch_stride: int | None = Field(None, ge=1)  # the model's stride grid


class LossSection(_Section):
    """Weights of the paper's loss terms (DESIGN.md, "Loss"); 0 switches a term off."""

    mean: float = Field(1.0, ge=0)  # (y - masked mean of the map)^2
    # Where the loss is computed. "input": on the map at the input's resolution, after the
    # model's x2 up-sampling, with the scan's mask (chemmap's default); "output": on the
    # model's own output grid (half resolution behind the spectral front-end), with the mask
    # brought to it (a pixel is in when at least half of its 2 x 2 input pixels are), as the
    # paper's code computes it. Needs model.front_end, no spectral path, train.mode: whole.
    grid: Literal["input", "output"] = "input"
    # Neighbour differences inside the mask / N. The paper used 20; on our synthetic line 1
    # kept far more detail at the same mean-fat RMSE (DESIGN.md), so it is exposed, not fixed.
    smooth: float = Field(20.0, ge=0)
    out_of_range: float = Field(1e-3, ge=0)  # sum of squared excursions below 0 / above 100 %
    # "sum": the excursions summed over the sample's mask pixels (the paper: the term's weight
    # then grows with the image's pixel count); "pixel": divided by N like the smoothness, so
    # a weight means the same at every image size and pitch (docs/loss.md, "Weights").
    out_of_range_norm: Literal["sum", "pixel"] = "sum"
    l2: float = Field(1e-3, ge=0)  # sum of squared conv weights, once per optimiser step
    # The smoothness term's form (chemmap.models.loss.Smoothness): the penalty of a neighbour
    # difference (quadratic: the paper's; huber and tv preserve edges) and which pairs count
    # (both pixels in the mask, or the paper's anchor pixel).
    smooth_penalty: Literal["quadratic", "huber", "tv"] = "quadratic"
    smooth_delta: float = Field(5.0, gt=0)  # percent: where huber turns linear (tv's scale)
    smooth_pairs: Literal["both", "anchor"] = "both"
    # With model.spectral_path (issue 15): the spectral path's own mean term, (y - its masked
    # mean)^2, and a penalty on the U-Net's residual over it (map - spectral map), summed over
    # the mask / N: the U-Net then departs from the per-pixel spectral map only where the
    # smoothness term pays for it (a learned, edge-aware denoiser of that map). 0: off.
    spectral: float = Field(0.0, ge=0)
    residual: float = Field(0.0, ge=0)
    residual_penalty: Literal["quadratic", "huber"] = "huber"
    residual_delta: float = Field(5.0, gt=0)  # percent: where huber turns linear
    # With model.spectral_path: a blind-spot (Noise2Void) term. At a share of each image's
    # mask pixels the input spectrum is replaced by a neighbour's (within 2 px), and the map
    # there is pulled towards the spectral path's value from the pixel's own spectrum, which
    # the network did not see: (map - S)^2 averaged over those pixels. The camera's noise is
    # independent from pixel to pixel, so the best such prediction is the noise-free map: a
    # denoiser learned from the scans themselves, without pixel truth. 0: off.
    blindspot: float = Field(0.0, ge=0)
    blindspot_share: float = Field(0.02, gt=0, le=0.5)


class AugmentSection(_Section):
    """Augmentations, drawn from a seed per (sample, epoch) so repeated passes agree."""

    flips: bool = True  # the paper's random flips
    rot90: bool = False
    # Spectral ones that mimic the scanner, in physical units of the stored cube:
    scatter_mult: float = Field(0.0, ge=0)  # sd of a per-sample gain around 1
    scatter_add: float = Field(0.0, ge=0)  # sd of a per-sample offset
    noise: float = Field(0.0, ge=0)  # sd of per-pixel, per-band noise


class PathFitSection(_Section):
    """The per-pixel path's own fit (``train.spectral_init: pixel``; :mod:`chemmap.train.pathfit`).

    Per step, for a batch of training samples: ``(y - mean of the path over the sample's
    drawn pixels)^2`` plus ``smooth`` times the mean Huber penalty of the path's difference
    between drawn pairs of neighbouring mask pixels. The path sees one pixel's spectrum at a
    time, so the smoothness cannot blur an edge: it is paid for only by reading the spectrum
    past what varies from pixel to pixel (scatter, shading, path length, noise).
    """

    steps: int = Field(1200, ge=1)
    batch: int = Field(16, ge=1)  # samples per step
    lr: float = Field(1e-3, gt=0)  # AdamW, annealed to 0 (cosine)
    weight_decay: float = Field(0.01, ge=0)
    smooth: float = Field(1.0, ge=0)
    delta: float = Field(5.0, gt=0)  # percent: where the Huber penalty turns linear
    pixels: int = Field(1024, ge=16)  # drawn per scan, once: as many pixels and as many pairs


class TrainSection(_Section):
    """Ray Train: workers, the paper's recipe and the storage of checkpoints."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False  # in the stage key: on GPU training runs in bf16 autocast (train.amp)
    # whole: one sample's images per forward (the paper); patches: exact patch-wise gradients.
    mode: Literal["whole", "patches"] = "whole"
    batch_size: int = Field(1, ge=1)  # samples per optimiser step per worker
    epochs: int = Field(40, ge=1)
    lr: float = Field(1e-3, gt=0)  # Adam
    # The learning rate's course: "plateau" halves it (plateau_factor) when the validation
    # loss stops improving; "cosine" anneals it to 0 over the epochs (for keep_weights: last,
    # whose last epoch then has settled weights instead of a step of a constant rate).
    schedule: Literal["plateau", "cosine"] = "plateau"
    plateau_patience: int = Field(4, ge=1)  # ReduceLROnPlateau on validation loss
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    early_stopping: int = Field(10, ge=1)  # epochs without improvement of validation RMSE
    # The weights a fold keeps: "best" validation RMSE of the sample means (with early
    # stopping), or "last" epoch's (no early stopping): for losses whose regularisers go on
    # shaping the maps after the means have stopped improving (issue 15's denoising prior).
    keep_weights: Literal["best", "last"] = "best"
    folds: list[int] | None = None  # which CV folds to train; None: all (1..5)
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    loss: LossSection = LossSection()
    augment: AugmentSection = AugmentSection()
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)  # dead workers replaced, training resumes from checkpoint
    prefetch: int = Field(2, ge=0)  # samples read ahead by a background thread
    torch_threads: int | None = None  # per worker on CPU; None: cores / workers
    # With model.spectral_path: "ridge" starts the path at a ridge regression of the lab values
    # on the fold's training mean spectra (penalty by leave-one-out), and the U-Net's head at
    # zero, so training starts from the per-pixel spectral map; "pls": at the PLS baseline the
    # evaluation fits for this fold (PLS1 on the same training samples, components by CV over
    # their folds), so the path's map is the out-of-fold PLS map; "pixel": the path (linear
    # or model.spectral_hidden's MLP) fitted alone before training, from each training
    # sample's lab value and its own pixels (train.path_fit, chemmap.train.pathfit); "zero":
    # the path starts at 0.
    spectral_init: Literal["zero", "ridge", "pls", "pixel"] = "zero"
    path_fit: PathFitSection = PathFitSection()
    # Hold the spectral path at its ridge, PLS or pixel start (no gradient reaches it): the blind-spot
    # term then trains the denoiser on a fixed map, as bench/blindspot.py does, and cannot
    # make the target itself easier to predict by smoothing the path.
    spectral_freeze: bool = False


class MlflowSection(_Section):
    """Tracking and registry (where the server is: ``cluster.tracking_uri``)."""

    experiment: str | None = None  # None: the pipeline's name
    registered_model: str | None = None  # None: the pipeline's name


class ModelSection(_Section):
    """The U-Net (:class:`chemmap.models.unet.UNetConfig`); input and output channels come from the dataset.

    Defaults are the U-Net's own, so a config that leaves a field out builds the same network.
    """

    depth: int = Field(5, ge=1)  # levels including the bottleneck
    features: int = Field(64, ge=1)  # width of the first level, doubled at each level down
    pad: bool = True  # same (True) or valid (False) 3x3 convolutions
    bilinear: bool = True  # bilinear x2 + 1x1 conv (True) or 2x2 transposed convolution
    normalization: Literal["bn", "ln"] | None = None
    align_corners: bool = False  # False keeps tiles exact (DESIGN.md, "Exact tiling")
    front_end: bool = False  # the paper's Conv3d(1, 1, (7, 2, 2), stride (1, 2, 2))
    encoder: Literal["plain", "resnet"] = "plain"
    checkpointing: bool = False  # recompute blocks in backward: less memory, more time
    spectral_path: bool = False  # add a per-pixel linear map of the spectra (a 1x1 conv at full resolution)
    # With spectral_path: H > 0 makes the path a per-pixel MLP (1x1 convolutions C -> H -> H
    # -> targets, GELU), fitted by train.spectral_init: pixel.
    spectral_hidden: int = Field(0, ge=0)
    # With spectral_path: a K x K kernel-predicting head that filters the path's map per
    # pixel, steered by the U-Net's features (chemmap.models.unet.UNetConfig); 0: none.
    kernel_head: int = Field(0, ge=0)
    kernel_guide: int = Field(0, ge=0)  # full-resolution guide channels for the kernel head (pad: true)
    # A full-resolution denoiser head of the spectral map: this many dilated 3x3 layers
    # (1, 2, 4, 8, 4, 2, 1; spectral_path and pad: true), for train.loss.blindspot to train.
    denoiser: int = Field(0, ge=0, le=7)
    denoiser_features: int = Field(32, ge=1)
    # "path+features": the spectral map and the U-Net's features, added to U-Net + S;
    # "path": the map alone, clipped to 0-100 %, standing in for S (map = U-Net + head(S));
    # "path+spectra": the same with 8 learned 1x1 projections of the spectra beside S.
    denoiser_input: Literal["path+features", "path", "path+spectra"] = "path+features"
    # The head's output in percent (added as it is) or "scaled" like its input: 50 + 25 x output.
    denoiser_output: Literal["percent", "scaled"] = "percent"
    # The fold models' mean map clamped to 0-100 % (a mass fraction's range) wherever it is
    # made: the evaluation, the registered model, chemmap score. Not a training setting (not
    # in the training's key; the members' own maps are not clamped): the evaluation also
    # reports the map before the clamp, as "unet_unbounded".
    bounded: bool = False
    # Given only to check them: they must equal the dataset's channels and the number of targets.
    in_channels: int | None = Field(None, ge=1)
    out_channels: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _kernel_head_filters_the_path(self) -> ModelSection:
        if self.kernel_head and (self.kernel_head < 3 or self.kernel_head % 2 == 0):
            raise ValueError(f"kernel_head must be 0 or an odd size >= 3, got {self.kernel_head}")
        if self.kernel_head and not self.spectral_path:
            raise ValueError("kernel_head filters the spectral path's map: it needs spectral_path: true")
        if self.kernel_guide and not (self.kernel_head and self.pad):
            raise ValueError("kernel_guide steers the kernel head: it needs kernel_head and pad: true")
        if self.spectral_hidden and not self.spectral_path:
            raise ValueError("spectral_hidden shapes the spectral path: it needs spectral_path: true")
        if self.denoiser and not (self.spectral_path and self.pad):
            raise ValueError("denoiser filters the spectral path's map: it needs spectral_path and pad: true")
        if self.denoiser_output == "scaled" and self.denoiser_input == "path+features":
            raise ValueError("denoiser_output: scaled needs denoiser_input: path or path+spectra")
        return self


class FlagsSection(_Section):
    """The limits behind ``summary.csv``'s ``flags`` column (:mod:`chemmap.inference.flags`).

    They are learnt from the training data by the register stage and stored with the
    registered model; scoring reads them and cannot change them. Every key here is part of
    the register stage's key: a change registers a new version.
    """

    # The percentile of the training scans' own values (T², Q and saturated share; T² and Q
    # out of fold) above which a scan is flagged; the sample area's lower limit is at
    # 100 - percentile. Lower: more scans flagged. Above 50 (below, most training scans would
    # be flagged) and below 100 (100 is the one most extreme training scan, not a percentile).
    percentile: float = Field(99.0, gt=50, lt=100)


class EvaluateSection(_Section):
    """Extra baselines of the evaluate stage (the protocol itself has no settings here)."""

    # A label-free map baseline, "pls_n2v": each target's PLS map denoised by a blind-spot
    # network (chemmap.evaluate.blindspot) trained for this many steps on the training
    # splits' out-of-fold PLS maps, without lab values or true maps (about 2-4 min on 2
    # cores at 1500). 0: off. Its figures hold every training scan's map in memory.
    blindspot_steps: int = Field(0, ge=0)


class ScoreSection(_Section):
    """The last stage of ``chemmap run``: maps from the model the run registered.

    ``input``: a scanner's output folder to score (laid out as ``data:`` says when
    ``data.source`` is ``folder``, else Specim's recorder layout); relative to the config
    file. None: the test split's scans of the run's own data.
    """

    input: str | None = None


class ClusterConfig(_Section):
    """Where things run. Never part of a stage key: the same work gives the same outputs anywhere.

    The defaults are embedded: local Dask threads, a local Ray, a SQLite MLflow store and
    checkpoints in the stage folder.
    """

    # Dask: "threads" (local, default), "synchronous", or a dask.distributed address.
    dask_scheduler: str = "threads"
    dask_workers: int | None = Field(None, ge=1)  # local threads; None: one per core
    ray_address: str | None = None  # None: a local Ray; "auto" or "ray://host:10001": a cluster
    resources_per_worker: dict[str, float] | None = None  # Ray Train; None: 1 CPU (or 1 GPU)
    storage_path: str | None = None  # Ray Train checkpoints; None: the stage folder. S3/NFS on a cluster
    tracking_uri: str | None = None  # MLflow; None: sqlite:///<workdir>/mlflow.db


# Keys that moved to the cluster: section (old place -> new place).
MOVED_KEYS = {
    ("preprocess", "scheduler"): "cluster.dask_scheduler",
    ("preprocess", "num_workers"): "cluster.dask_workers",
    ("train", "ray_address"): "cluster.ray_address",
    ("train", "resources_per_worker"): "cluster.resources_per_worker",
    ("train", "storage_path"): "cluster.storage_path",
    ("mlflow", "tracking_uri"): "cluster.tracking_uri",
}


class ChemmapConfig(_Section):
    """A whole pipeline."""

    name: str = "pork_belly"
    # Stage outputs go under workdir/<stage>/<key>/; relative to the config file's folder.
    workdir: str = "runs"
    seed: int = 0
    targets: list[str] = Field(default_factory=lambda: ["fat"])
    data: DataConfig = DataConfig()
    synth: SynthConfig = SynthConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    mlflow: MlflowSection = MlflowSection()
    flags: FlagsSection = FlagsSection()
    evaluate: EvaluateSection = EvaluateSection()
    score: ScoreSection = ScoreSection()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _spectral_terms_need_the_path(self) -> ChemmapConfig:
        loss, train = self.train.loss, self.train
        asked = {
            "train.loss.spectral": loss.spectral > 0,
            "train.loss.residual": loss.residual > 0,
            "train.loss.blindspot": loss.blindspot > 0,
            "train.spectral_init": train.spectral_init != "zero",
        }
        wants = [key for key, on in asked.items() if on]
        if wants and not self.model.spectral_path:
            raise ValueError(f"{wants[0]} needs model.spectral_path: true")
        _check_grid_and_freeze(self.model, train)
        if self.model.spectral_hidden and train.spectral_init in ("ridge", "pls"):
            raise ValueError(
                f"train.spectral_init: {train.spectral_init} starts a linear path: it needs "
                "model.spectral_hidden: 0 (an MLP path is fitted by spectral_init: pixel)"
            )
        if wants and train.mode != "whole":
            raise ValueError(f"{wants[0]} is implemented for train.mode: whole only, got {train.mode!r}")
        return self

    @field_validator("targets")
    @classmethod
    def _targets_nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("targets must name at least one reference column, e.g. [fat]")
        return v

    # Set by load_config: the file's folder, against which relative paths resolve.
    _base_dir: Path = Path(".")
    _source: str = "<defaults>"

    def resolve_path(self, p: str | os.PathLike) -> Path:
        """A path from the config, relative to the config file's folder unless absolute or a URL."""
        s = str(p)
        if "://" in s:
            return Path(s)
        path = Path(s).expanduser()
        return path if path.is_absolute() else (self._base_dir / path)

    @property
    def workdir_path(self) -> Path:
        return self.resolve_path(self.workdir).resolve()

    @property
    def tracking_uri(self) -> str:
        uri = self.cluster.tracking_uri
        if uri is None:
            return f"sqlite:///{(self.workdir_path / 'mlflow.db').resolve()}"
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return f"sqlite:///{self.resolve_path(uri[len('sqlite:///') :]).resolve()}"
        return uri

    @property
    def source(self) -> str:
        return self._source


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _show(x: object) -> str:
    """A key or path as text on one line: quoted when it holds a line break or another control character."""
    return str(x) if str(x).isprintable() else repr(str(x))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' files include each other: {' -> '.join(map(_show, seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"{path}: cannot read as UTF-8 text ({err})") from None
    except (RecursionError, ValueError) as err:  # nesting deeper than Python's stack; an int of 5000 digits
        raise ConfigError(f"{path}: not a config chemmap can read ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: key 'base' must be a path, got {base!r}")
        if not (path.parent / base).is_file():
            raise ConfigError(f"{path}: base: config file not found: {_show((path.parent / base).resolve())}")
        parent = _read_yaml((path.parent / base), (*seen, path))
        data = _deep_merge(parent, data)
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where, and what (a Python tag says it is refused)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    if "python/" in problem:
        problem += " (Python tags are refused: a config is data, never code)"
    return where + " ".join(problem.split())


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); the value is parsed as YAML (so lists and numbers work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError, ValueError):  # not YAML: the text itself
        value = raw
    return keys, value


# Values quoted in errors are shortened: a YAML alias can make a list of millions of items.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 6, 6, 80, 80


def _format_error(err: ValidationError, source: str, data: dict) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(_show(p) for p in e["loc"]) or "<top>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {_REPR.repr(got)})"
        parts.append(f"{loc}: {msg}{got_s}")
    return f"{source}: " + "; ".join(parts)


def _refuse_moved_keys(data: dict, source: str) -> None:
    """A setting under its old name gets one line saying where it went."""
    for (section, key), new in MOVED_KEYS.items():
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            raise ConfigError(
                f"{source}: {section}.{key} moved to {new} (where things run is the cluster: section)"
            )


def config_from_dict(data: dict, *, source: str = "<dict>", base_dir: Path | None = None) -> ChemmapConfig:
    """Validate a plain mapping into a :class:`ChemmapConfig`; errors name ``source`` and the key."""
    _refuse_moved_keys(data, source)
    try:
        cfg = ChemmapConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source, data)) from None
    cfg._base_dir = base_dir or Path(".").resolve()
    cfg._source = source
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``key.path=value`` items into a config mapping (in place; returned for chaining)."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(keys[:-1])} is not a mapping")
            node = nxt
        node[keys[-1]] = value
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> ChemmapConfig:
    """Read a pipeline YAML (following ``base:``), apply ``key=value`` overrides and validate.

    With ``path=None`` the embedded defaults are the base.
    """
    if path is None:
        data = apply_overrides({}, overrides or [])
        return config_from_dict(data, source="--set" if overrides else "<defaults>")
    path = Path(path)
    data = apply_overrides(_read_yaml(path), overrides or [])
    return config_from_dict(data, source=str(path), base_dir=path.resolve().parent)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what was actually run)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _check_grid_and_freeze(model: ModelSection, train: TrainSection) -> None:
    """``train.loss.grid: output`` and ``train.spectral_freeze`` against what they need."""
    if train.loss.grid == "output":
        if not model.front_end or model.spectral_path:
            raise ValueError(
                "train.loss.grid: output is the front-end's half-resolution grid: it needs "
                "model.front_end: true and model.spectral_path: false (the path's map is at full resolution)"
            )
        if train.mode != "whole":
            raise ValueError(
                f"train.loss.grid: output is implemented for train.mode: whole only, got {train.mode!r}"
            )
    if train.spectral_freeze and train.spectral_init == "zero":
        raise ValueError(
            "train.spectral_freeze holds the path at its fitted start: it needs train.spectral_init: "
            "ridge, pls or pixel"
        )
