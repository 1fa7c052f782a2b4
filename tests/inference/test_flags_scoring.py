"""Flags end to end: ``flags.percentile`` through the register stage into the registered model,
and the flags in ``summary.csv`` of scans scored with that model the way ``chemmap score`` does.

The register stage runs for real (a SQLite MLflow store, the tiny dataset's spectra) on a
training of seeded random fold U-Nets and an evaluation made up for them (registering needs
test predictions, not good ones). The scans are the tiny dataset's held-out scans as recorded,
and the same bellies recorded *frozen* by the same scanner (``test_flags.py``: the O-H bands of
ice instead of liquid water): physically plausible spectra the training never showed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from chemmap import tracking
from chemmap.config import load_config
from chemmap.errors import ConfigError
from chemmap.inference.bundle import read_bundle
from chemmap.inference.flags import fit_spectral_model
from chemmap.pipeline import score_scans
from chemmap.preprocess.store import Dataset
from chemmap.registry.stage import register_model
from chemmap.stages import stage_dir
from tests.inference.test_flags import _frozen_scans
from tests.inference.test_score import _read_csv
from tests.registry import helpers

ROOT = Path(__file__).resolve().parents[2]
STRICT = 60.0  # a second registration's flags.percentile; the default is 99


def _copy_scan(capture: Path, scan_id: str, dest_root: Path, new_id: str) -> None:
    """A Specim-layout scan (raw, white and dark: header and data) copied under a new id."""
    dest = dest_root / new_id / "capture"
    dest.mkdir(parents=True)
    for prefix in ("", "WHITEREF_", "DARKREF_"):
        for ext in ("hdr", "raw"):
            shutil.copyfile(capture / f"{prefix}{scan_id}.{ext}", dest / f"{prefix}{new_id}.{ext}")


@pytest.fixture(scope="module")
def registered(tiny_dataset, tmp_path_factory):
    """The register stage run with the default ``flags.percentile``, with ``STRICT``, and with
    ``STRICT`` again; the configs, stages, lines logged, dataset and a folder of scans."""
    sets, pre = tiny_dataset
    work = tmp_path_factory.mktemp("flags_register")
    data = Dataset(pre.path / "dataset.zarr")

    def config(*more: str):
        return load_config(ROOT / "configs" / "ci.yaml", [*sets, f"workdir={work}", *more])

    default, strict = config(), config(f"flags.percentile={STRICT}")
    # What the training and evaluate stages leave, made without training.
    training = stage_dir(work, "train", {"random_weights": 0}, [pre.key])
    helpers.random_training(training.path, data, seed=0)
    training.finish({"mlflow_run_id": ""})
    evaluation = stage_dir(work, "evaluate", {"made_up": 0}, [training.key])
    metrics = helpers.evaluation(pre.key, helpers.BASE_ERRORS, training_key=training.key)
    metrics["models"]["unet"]["r2"] = 0.9
    metrics["models"]["pls"] = {"rmse": 3.0}
    (evaluation.begin() / "metrics.json").write_text(json.dumps(metrics))
    run = helpers.new_run(tracking.client(default.tracking_uri), "flags-test", work / "artifacts")
    evaluation.finish({"mlflow_run_id": run})
    lines: list[str] = []
    stages = [
        register_model(cfg, pre, training, evaluation, log=lines.append) for cfg in (default, strict, strict)
    ]
    # Scans: the held-out bellies as recorded, and the same bellies frozen.
    held_out = data.ids([0])
    scans = work / "scans"
    for sid in held_out:
        scan = data.samples[sid].scans[0]
        raw = Path(next(r["raw"] for r in data.scan_table if r["scan_id"] == scan))
        _copy_scan(raw.parent, scan, scans, scan)
    with pytest.MonkeyPatch.context() as mp:
        frozen = _frozen_scans(tiny_dataset, held_out, work / "frozen", mp)
    for hdr in frozen.values():
        _copy_scan(hdr.parent, hdr.stem, scans, f"frozen_{hdr.stem}")
    return SimpleNamespace(
        default=default, strict=strict, stages=stages, lines=lines, data=data, scans=scans, work=work
    )


def _score(registered, cfg, version: str, out: Path) -> dict[str, dict[str, str]]:
    """The scans scored with ``models:/<name>/<version>`` as ``chemmap score`` does: summary.csv by scan."""
    name = cfg.mlflow.registered_model or cfg.name
    summary = score_scans(
        f"models:/{name}/{version}", registered.scans, out, cfg=cfg, progress=False, log=lambda _: None
    )
    assert summary.ok == 4 and summary.errors == 0
    return {r["scan_id"]: r for r in _read_csv(out / "summary.csv")}


@pytest.mark.slow
def test_flags_percentile_keys_the_register_stage_and_sets_the_registered_limits(registered):
    default, strict, again = registered.stages
    assert strict.key != default.key  # another percentile, another registered model
    assert again.path == strict.path and registered.lines[-1].startswith("register: done already")
    assert [default.summary()["version"], strict.summary()["version"]] == ["1", "2"]
    for stage, percentile in ((default, 99.0), (strict, STRICT)):
        model = read_bundle(stage.path / "bundle").spectral_model
        assert model is not None and model.percentile == percentile
        assert model == fit_spectral_model(registered.data, percentile=percentile)
    loose = read_bundle(default.path / "bundle").spectral_model
    tight = read_bundle(strict.path / "bundle").spectral_model
    # measured (scanner v2): T² limits 0.95 < 4.74
    assert tight.t2_limit < loose.t2_limit and tight.q_limit < loose.q_limit


@pytest.fixture(scope="module")
def scored(registered) -> dict[str, dict[str, dict[str, str]]]:
    """summary.csv of the scans scored with each registered version: {version: {scan: row}}."""
    return {
        "1": _score(registered, registered.default, "1", registered.work / "maps-1"),
        "2": _score(registered, registered.strict, "2", registered.work / "maps-2"),
    }


@pytest.mark.slow
def test_chemmap_score_flags_a_frozen_scan_and_not_the_same_belly_as_recorded(registered, scored):
    rows = scored["1"]
    model = read_bundle(registered.stages[0].path / "bundle").spectral_model
    normal = [sid for sid in rows if not sid.startswith("frozen_")]
    assert len(normal) == 2 and sorted(rows) == sorted([*normal, *(f"frozen_{s}" for s in normal)])
    for sid in normal:
        assert rows[sid]["status"] == "ok" and rows[sid]["flags"] == "", rows[sid]
        # measured (scanner v2): Q 0.0176 frozen (belly0006_a), 0.0018 and 0.0003 as recorded; limit 0.0087
        frozen = rows[f"frozen_{sid}"]
        assert frozen["status"] == "ok" and f"q>{model.q_limit:.4g}" in frozen["flags"].split(";"), frozen
        assert float(frozen["q"]) > 2.0 * float(rows[sid]["q"])


@pytest.mark.slow
def test_a_lower_flags_percentile_flags_more_of_the_same_scans(registered, scored):
    loose, tight = scored["1"], scored["2"]
    model = read_bundle(registered.stages[1].path / "bundle").spectral_model
    for sid, row in tight.items():
        assert (float(row["t2"]), float(row["q"])) == (float(loose[sid]["t2"]), float(loose[sid]["q"]))
        named = row["flags"].split(";") if row["flags"] else []
        assert (f"t2>{model.t2_limit:.4g}" in named) == (float(row["t2"]) > model.t2_limit)
        assert (f"q>{model.q_limit:.4g}" in named) == (float(row["q"]) > model.q_limit)
    flagged_loose = {sid for sid, row in loose.items() if row["flags"]}
    flagged_tight = {sid for sid, row in tight.items() if row["flags"]}
    assert flagged_loose <= flagged_tight
    # measured (scanner v2): both bellies as recorded, T² 2.45 and 3.23 above the 60th percentile's 0.95
    assert flagged_tight - flagged_loose == {"belly0005_a", "belly0006_a"}


def test_flags_percentile_is_checked_where_it_is_read():
    with pytest.raises(ConfigError, match=r"flags\.percentile: Input should be less than 100 \(got 100\)"):
        load_config(ROOT / "configs" / "ci.yaml", ["flags.percentile=100"])
    with pytest.raises(ConfigError, match=r"flags\.percentile: Input should be greater than 50 \(got 20\)"):
        load_config(ROOT / "configs" / "ci.yaml", ["flags.percentile=20"])
    assert load_config(ROOT / "configs" / "ci.yaml").flags.percentile == 99.0
