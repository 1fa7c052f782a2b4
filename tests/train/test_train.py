"""Ray Train on a real local Ray instance (2 CPU workers, DDP over gloo), tracked in MLflow.

The stage is called as the pipeline calls it (:func:`chemmap.train.trainer.train_ensemble`) on
the CI preset's dataset; the CLI test goes through ``chemmap train``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chemmap.config import config_from_dict, load_config
from chemmap.errors import InputError
from chemmap.models.tiling import model_geometry
from chemmap.models.unet import UNet
from chemmap.pipeline import preprocess_stage
from chemmap.preprocess.store import Dataset
from chemmap.stages import StageDir, stable_hash
from chemmap.train.trainer import model_config, train_ensemble, training_dir, training_section

ROOT = Path(__file__).resolve().parents[2]
QUIET = {"progress": False, "log": lambda s: None}


def _cfg(tmp_path: Path, *extra: str):
    return load_config(
        ROOT / "configs" / "ci.yaml",
        [
            f"workdir={tmp_path}",
            f"cluster.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.epochs=2",
            "train.folds=[1]",
            "train.num_workers=2",
            *extra,
        ],
    )


def _digests(d: Path, epoch: int) -> set[str]:
    return {p.read_text() for p in d.glob(f"epoch{epoch}_rank*.txt")}


@pytest.mark.slow
def test_ddp_on_two_workers_against_a_real_mlflow_server(ray_local, mlflow_server, tiny_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    _, pre = tiny_dataset
    cfg = _cfg(tmp_path, f"cluster.tracking_uri={mlflow_server}")
    digests = tmp_path / "digests"
    digests.mkdir()
    stage = train_ensemble(cfg, pre, debug={"digest_dir": str(digests)}, **QUIET)
    for epoch in (0, 1):
        assert len(list(digests.glob(f"epoch{epoch}_rank*.txt"))) == 2
        assert len(_digests(digests, epoch)) == 1, "ranks hold different parameters after a DDP step"
    assert _digests(digests, 0) != _digests(digests, 1)  # and training did change them
    summary = stage.summary()
    assert Path(summary["checkpoints"]["1"]).is_dir()
    assert (stage.path / "fold1" / "best.pt").is_file() and (stage.path / "model.json").is_file()
    assert (stage.path / "learning_curve.png").stat().st_size > 5000
    # Read the runs back through the server.
    client = MlflowClient(mlflow_server)
    fold_run = summary["fold_run_ids"]["1"]
    hist = client.get_metric_history(fold_run, "val_rmse")
    assert sorted(m.step for m in hist) == [0, 1]
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.params["model.depth"] == "3"
    assert parent.data.metrics["rmsecv"] == pytest.approx(summary["rmsecv"])
    assert client.get_run(fold_run).data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]


@pytest.mark.slow
def test_stopped_run_resumes_from_its_checkpoint(ray_local, tiny_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    _, pre = tiny_dataset
    cfg = _cfg(tmp_path, "train.epochs=3", "train.max_failures=0", "train.early_stopping=10")
    with pytest.raises(RuntimeError, match="fold 1 failed"):
        train_ensemble(cfg, pre, debug={"stop_at_epoch": 2}, **QUIET)
    runs = json.loads(next(tmp_path.glob("train/*/mlflow_runs.json")).read_text())
    stage = train_ensemble(cfg, pre, **QUIET)  # the same run, started again
    result = json.loads((stage.path / "fold1" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]  # epochs 0-1 from the checkpoint
    summary = stage.summary()
    assert summary["fold_run_ids"]["1"] == runs["fold1"]  # the same MLflow run, continued
    client = MlflowClient(cfg.tracking_uri)
    assert sorted(m.step for m in client.get_metric_history(runs["fold1"], "val_rmse")) == [0, 1, 2]


def _weights(stage: StageDir, fold: int) -> tuple[dict, dict]:
    """A fold's best weights and the weights of the checkpoint it ended with."""
    import torch

    result = json.loads((stage.path / f"fold{fold}" / "result.json").read_text())
    best = torch.load(stage.path / f"fold{fold}" / "best.pt", weights_only=True)
    last = torch.load(Path(result["checkpoint"]) / "state.pt", weights_only=True)
    assert last["fold"] == fold
    return best, last["model"]


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_folds_share_one_worker_group_and_each_trains_as_it_would_alone(ray_local, tiny_dataset, tmp_path):
    """Folds 1 and 2 in one Ray Train run, stopped in fold 2 and run again, against fold 2 alone.

    Fold 1's results are written while fold 2 trains; the rerun skips fold 1 and resumes fold 2
    from its checkpoint; fold 2's weights equal, bit for bit, those of a run of fold 2 alone
    (each fold starts from its own seed; CPU training here is deterministic).
    """
    _, pre = tiny_dataset
    both = [f"workdir={tmp_path / 'both'}", "train.folds=[1, 2]", "train.epochs=3", "train.max_failures=0"]
    cfg = _cfg(tmp_path, *both, "train.early_stopping=10")
    with pytest.raises(RuntimeError, match="fold 2 failed"):
        train_ensemble(cfg, pre, debug={"stop_at_epoch": 1, "stop_in_fold": 2}, **QUIET)
    (stage_dir,) = (tmp_path / "both" / "train").iterdir()
    assert (stage_dir / "fold1" / "result.json").is_file() and not (stage_dir / "fold2").exists()
    lines: list[str] = []
    stage = train_ensemble(cfg, pre, progress=False, log=lines.append)
    assert any(line.startswith("train: fold 1 done already") for line in lines)
    assert not any(line.startswith("fold 2 epoch 1/3") for line in lines)  # resumed after epoch 0
    result = json.loads((stage.path / "fold2" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    checkpoints = stage.summary()["checkpoints"]
    assert Path(checkpoints["1"]).name == "fold1_epoch_0002" and Path(checkpoints["1"]).is_dir()

    alone = train_ensemble(
        _cfg(
            tmp_path,
            f"workdir={tmp_path / 'alone'}",
            "train.folds=[2]",
            "train.epochs=3",
            "train.early_stopping=10",
        ),
        pre,
        **QUIET,
    )
    for got, expected in zip(_weights(stage, 2), _weights(alone, 2), strict=True):
        assert _same(got, expected)


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_is_replaced(ray_local, tiny_dataset, tmp_path):
    _, pre = tiny_dataset
    marker = tmp_path / "killed.txt"
    cfg = _cfg(tmp_path, "train.max_failures=1", "train.early_stopping=10")
    stage = train_ensemble(
        cfg, pre, debug={"kill_once": {"epoch": 1, "rank": 1, "marker": str(marker)}}, **QUIET
    )
    assert marker.is_file()  # the worker did die
    result = json.loads((stage.path / "fold1" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [0, 1]


@pytest.mark.slow
def test_uneven_patch_counts_neither_hang_nor_diverge(ray_local, tiny_dataset, tmp_path):
    _, pre = tiny_dataset
    data = Dataset(pre.path / "dataset.zarr")
    index = data.patch_index()
    counts = {len(index.of_scan(i)) for i in range(len(data.scan_ids))}
    assert len(counts) > 1  # samples do differ in patch count
    digests = tmp_path / "digests"
    digests.mkdir()
    cfg = _cfg(tmp_path, "train.mode=patches", "train.batch_size=2", "train.augment.rot90=true")
    train_ensemble(cfg, pre, debug={"digest_dir": str(digests)}, **QUIET)
    for epoch in (0, 1):
        assert len(_digests(digests, epoch)) == 1


@pytest.mark.slow
def test_config_errors_come_before_any_worker(ray_local, tiny_dataset, tmp_path):
    _, pre = tiny_dataset
    with pytest.raises(InputError, match=r"model\.in_channels=99 but the dataset has \d+"):
        train_ensemble(_cfg(tmp_path, "model.in_channels=99"), pre, **QUIET)
    with pytest.raises(InputError, match=r"cannot reach MLflow server at http://127\.0\.0\.1:9"):
        train_ensemble(_cfg(tmp_path, "cluster.tracking_uri=http://127.0.0.1:9"), pre, **QUIET)
    unfinished = StageDir("preprocess", "0" * 16, tmp_path / "preprocess" / "unfinished", {}, ())
    with pytest.raises(InputError, match="dataset not found"):
        train_ensemble(_cfg(tmp_path), unfinished, **QUIET)
    assert not list(tmp_path.glob("train/*/ray"))  # nothing was started


def _refusal(cfg, dataset: StageDir) -> str:
    with pytest.raises(InputError) as err:
        train_ensemble(cfg, dataset, **QUIET)
    return str(err.value)


@pytest.mark.slow
def test_a_patch_index_that_does_not_fit_the_model_is_refused_before_any_worker(tiny_dataset, tmp_path):
    sets, pre = tiny_dataset
    cfg = _cfg(tmp_path, "train.mode=patches")
    data = Dataset(pre.path / "dataset.zarr")
    g = model_geometry(UNet(model_config(cfg, data.n_channels, len(cfg.targets))))
    assert g.stride < g.radius  # so a halo of one stride is too small

    # A dataset preprocessed with too small a halo for this model.
    small = preprocess_stage(
        load_config(ROOT / "configs" / "ci.yaml", [*sets, f"preprocess.patch_halo={g.stride}"]), **QUIET
    )
    msg = _refusal(cfg, small)
    assert "\n" not in msg and str(small.path / "dataset.zarr") in msg
    assert f"halo {g.stride} px, stride {g.stride} px" in msg
    assert f"receptive radius {g.radius} px, stride {g.stride} px" in msg

    # A different model on the tiny dataset: a coarser stride grid and a larger radius.
    deeper = _cfg(tmp_path, "train.mode=patches", "model.depth=4")
    d = model_geometry(UNet(model_config(deeper, data.n_channels, len(cfg.targets))))
    index = data.patch_index()
    assert index.stride % d.stride != 0
    msg = _refusal(deeper, pre)
    assert f"halo {index.halo} px, stride {index.stride} px" in msg
    assert f"receptive radius {d.radius} px, stride {d.stride} px" in msg
    assert not list(tmp_path.glob("train/*"))  # no stage folder, no MLflow run, no Ray

    # Whole-image training does not use the index.
    training_dir(_cfg(tmp_path, "model.depth=4"), pre)


def test_where_training_runs_never_enters_its_key_but_the_gpu_does():
    """``cluster:`` and robustness settings leave the key alone; ``train.use_gpu`` (bf16) changes it."""

    def key(cfg) -> str:
        return stable_hash(training_section(cfg, model_config(cfg, 62, len(cfg.targets))))

    default = config_from_dict({})
    where = {
        "cluster": {
            "ray_address": "ray://head:10001",
            "storage_path": "s3://bucket/ckpt",
            "resources_per_worker": {"GPU": 1},
            "tracking_uri": "http://mlflow:5000",
        },
        "train": {"max_failures": 5, "prefetch": 0, "torch_threads": 3, "checkpoints_to_keep": 4},
    }
    assert key(config_from_dict(where)) == key(default)
    assert key(config_from_dict({"train": {"use_gpu": True}})) != key(default)  # bf16 on GPU: numerics


@pytest.mark.slow
def test_unreachable_ray_address_is_one_line_from_the_cli(tiny_dataset, tmp_path):
    sets, _ = tiny_dataset
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "chemmap.cli",
            "train",
            str(ROOT / "configs" / "ci.yaml"),
            *[a for s in [*sets, "cluster.ray_address=127.0.0.1:9"] for a in ("--set", s)],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith("error: cluster.ray_address: cannot reach Ray at 127.0.0.1:9")
    )


@pytest.mark.slow
def test_with_ray_address_set_training_joins_that_cluster_not_a_local_one(tiny_dataset):
    """As a Ray job's driver does: RAY_ADDRESS is set there, and Ray refuses num_cpus when joining."""
    import os

    sets, _ = tiny_dataset
    res = subprocess.run(
        [sys.executable, "-m", "chemmap.cli", "train", str(ROOT / "configs" / "ci.yaml")]
        + [a for s in sets for a in ("--set", s)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": "127.0.0.1:9"},
    )
    assert res.returncode == 2, res.stderr
    assert (
        res.stderr.strip().splitlines()[-1].startswith("error: RAY_ADDRESS: cannot reach Ray at 127.0.0.1:9")
    )


def test_a_ridge_start_gives_each_training_sample_its_fit_as_its_map_mean(tiny_dataset, tmp_path):
    """Linear per pixel, so the map's masked mean is the fit on the sample's mean input."""
    import numpy as np
    import torch

    from chemmap.models.ridge import ridge_loo
    from chemmap.models.tiling import predict_full
    from chemmap.train.loop import _start_from_ridge

    _, pre = tiny_dataset
    cfg = _cfg(tmp_path, "model.spectral_path=true", "train.spectral_init=ridge")
    data = Dataset(pre.path / "dataset.zarr")
    net = UNet(model_config(cfg, data.n_channels, len(cfg.targets))).double().eval()
    train_ids = data.ids([1, 2, 3, 4])
    _start_from_ridge(net, data, train_ids)
    means, spectra = [], []
    for sid in train_ids:
        (scan,) = data.samples[sid].scans
        mask = data.mask(scan)
        x = torch.from_numpy(data.model_input(data.cube(scan)[...]).astype(np.float64))
        means.append(float(predict_full(net, x)[0][torch.from_numpy(mask)].mean()))
        spectra.append(data.recipe.normalize(data.cube(scan)[...][:, mask].mean(1, dtype=np.float64)))
    labels = np.array([data.samples[s].targets for s in train_ids])
    fit = ridge_loo(np.array(spectra), labels)
    assert np.allclose(means, (np.array(spectra) @ fit.coef + fit.intercept)[:, 0], atol=1e-3)
    assert np.corrcoef(means, labels[:, 0])[0, 1] > 0.5  # and it does fit the lab values


def test_a_pls_start_makes_the_model_map_the_evaluations_out_of_fold_pls_map(tiny_dataset, tmp_path):
    """``spectral_init: pls``: a held-out scan's map is, pixel by pixel, the map of the PLS
    baseline fitted on the fold's training samples (the out-of-fold PLS map), though the model
    reads standardised inputs and PLS the stored spectra."""
    import numpy as np
    import torch

    from chemmap.evaluate.stage import fit_pls, mean_spectra
    from chemmap.models.tiling import predict_full
    from chemmap.train.loop import _start_from_pls

    _, pre = tiny_dataset
    cfg = _cfg(tmp_path, "model.spectral_path=true", "train.spectral_init=pls")
    data = Dataset(pre.path / "dataset.zarr")
    net = UNet(model_config(cfg, data.n_channels, len(cfg.targets))).double().eval()
    train_ids = data.ids([2, 3, 4])
    _start_from_pls(net, data, train_ids)
    pls = fit_pls(data, mean_spectra(data), cfg.targets, train_ids)
    (scan,) = data.samples[data.ids([1])[0]].scans
    cube, mask = data.cube(scan)[...], data.mask(scan)
    x = torch.from_numpy(data.model_input(cube).astype(np.float64))
    got = predict_full(net, x)[0].numpy()[mask]
    want = pls.predict_cube(cube, mask)[0][mask]
    assert np.abs(want - want.mean()).max() > 1  # a map with detail, not a constant
    assert np.allclose(got, want, atol=1e-3)
    with pytest.raises(ValueError, match=r"spectral_init: pls: cross-validation needs at least 2"):
        _start_from_pls(net, data, data.ids([2]))  # one training fold: nothing to choose components on


def test_a_pixel_start_fits_an_mlp_path_and_the_map_starts_as_its_map(tiny_dataset, tmp_path):
    """``spectral_init: pixel``: the MLP path is fitted to the lab values from the samples'
    own pixels, every rank the same, and the model's map is the path's (the head at zero)."""
    import numpy as np
    import torch

    from chemmap.config import TrainSection
    from chemmap.models.tiling import predict_full
    from chemmap.train.loop import _start_from_pixels

    _, pre = tiny_dataset
    cfg = _cfg(
        tmp_path,
        "model.spectral_path=true",
        "model.spectral_hidden=16",
        "train.spectral_init=pixel",
        "train.path_fit.steps=150",
        "train.path_fit.lr=0.01",
    )
    data = Dataset(pre.path / "dataset.zarr")
    train_ids = data.ids([1, 2, 3, 4])
    nets, lines = [], []
    for _ in range(2):  # two ranks
        torch.manual_seed(7)
        net = UNet(model_config(cfg, data.n_channels, len(cfg.targets)))
        tcfg = TrainSection.model_validate(cfg.train.model_dump())
        _start_from_pixels(net, data, train_ids, tcfg, 11, lines.append)
        nets.append(net.double().eval())
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert len(lines) == 2 and f"spectral path fitted on {len(train_ids)} samples" in lines[0], lines
    means = []
    for sid in train_ids:
        (scan,) = data.samples[sid].scans
        mask = torch.from_numpy(data.mask(scan))
        x = torch.from_numpy(data.model_input(data.cube(scan)[...]).astype(np.float64))
        with torch.no_grad():
            got, path = predict_full(nets[0], x)[0], nets[0].spectral(x[None])[0, 0]
        assert torch.allclose(got, path, atol=1e-6)
        means.append(float(got[mask].mean()))
    labels = np.array([data.samples[s].targets[0] for s in train_ids])
    assert np.corrcoef(means, labels)[0, 1] > 0.8, (means, labels)


@pytest.mark.slow
def test_training_with_the_spectral_path_terms_moves_the_path(ray_local, tiny_dataset, tmp_path):
    """The path's terms (and the blind-spot term) reach the gradient: the path leaves its ridge
    start, and the fold finishes."""
    import torch

    _, pre = tiny_dataset
    sets = [
        "model.spectral_path=true",
        "train.spectral_init=ridge",
        "train.loss.spectral=1",
        "train.loss.residual=0.5",
        "train.loss.blindspot=1",
    ]
    stage = train_ensemble(_cfg(tmp_path, *sets, "train.num_workers=1"), pre, **QUIET)
    best = torch.load(stage.path / "fold1" / "best.pt", weights_only=True)
    state = best.get("model", best)
    assert float(state["head.weight"].abs().sum()) > 0  # the U-Net left its zero start
    assert float(state["spectral.weight"].abs().sum()) > 0


def test_the_cosine_schedule_anneals_to_zero_over_the_epochs_and_plateau_waits_for_the_loss():
    import torch

    from chemmap.config import TrainSection
    from chemmap.train.loop import _scheduler

    def lrs(schedule: str) -> list[float]:
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = _scheduler(opt, TrainSection(schedule=schedule, epochs=4, plateau_patience=1))
        out = []
        for _ in range(4):
            sched.step() if schedule == "cosine" else sched.step(1.0)  # a flat validation loss
            out.append(opt.param_groups[0]["lr"])
        return out

    cosine = lrs("cosine")
    assert cosine == sorted(cosine, reverse=True) and cosine[-1] == pytest.approx(0.0, abs=1e-12)
    assert cosine[1] == pytest.approx(0.5e-3)  # half-way: half the rate
    assert lrs("plateau") == [1e-3, 1e-3, 0.5e-3, 0.5e-3]  # patience 1: halved after two flat epochs


@pytest.mark.slow
def test_a_frozen_spectral_path_stays_at_its_ridge_start_while_the_denoiser_learns(
    ray_local, tiny_dataset, tmp_path
):
    """``train.spectral_freeze``: the blind-spot term trains the denoiser head on a fixed
    spectral map; the path's weights end where the ridge start put them."""
    import torch

    from chemmap.train.loop import _start_from_ridge

    _, pre = tiny_dataset
    sets = [
        "model.spectral_path=true",
        "model.pad=true",
        "model.denoiser=2",
        "model.denoiser_input=path",
        "train.spectral_init=ridge",
        "train.spectral_freeze=true",
        "train.loss.blindspot=1",
        "train.loss.blindspot_share=0.2",
        "train.keep_weights=last",
    ]
    cfg = _cfg(tmp_path, *sets, "train.num_workers=1")
    stage = train_ensemble(cfg, pre, **QUIET)
    _, last = _weights(stage, 1)
    data = Dataset(pre.path / "dataset.zarr")
    start = UNet(model_config(cfg, data.n_channels, len(cfg.targets)))
    _start_from_ridge(start, data, data.ids([s for s in data.splits if s not in (0, 1)]))
    assert torch.equal(last["spectral.weight"], start.spectral.weight.detach())
    assert torch.equal(last["spectral.bias"], start.spectral.bias.detach())
    out = [k for k in last if k.startswith("denoiser.") and k.endswith("weight")][-1]
    assert float(last[out].abs().sum()) > 0  # the head's zero-started output layer learned


@pytest.mark.slow
def test_keep_weights_last_trains_every_epoch_and_keeps_the_last(ray_local, tiny_dataset, tmp_path):
    """No early stopping, and the kept weights are the last epoch's, whatever its validation RMSE."""
    import torch

    _, pre = tiny_dataset
    sets = ["train.keep_weights=last", "train.epochs=3", "train.early_stopping=1", "train.num_workers=1"]
    stage = train_ensemble(_cfg(tmp_path, *sets), pre, **QUIET)
    result = json.loads((stage.path / "fold1" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2] and result["best_epoch"] == 2
    best, last = _weights(stage, 1)
    assert all(torch.equal(best[k], last[k]) for k in best)
