"""Scoring a scanner's folder: real ENVI scans in, real Zarr maps, pictures and tables out.

The model is a bundle of seeded random U-Nets (what a finished training leaves, without the
training); the scans are the tiny synthetic dataset's raw folder and copies of its scans
written with :func:`chemmap.io.envi.create_envi` (drifted wavelengths, a truncated file...).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from chemmap.errors import InputError
from chemmap.files import write_json_atomic
from chemmap.inference.bundle import ModelBundle, read_bundle, write_bundle
from chemmap.inference.ensemble import predict_map
from chemmap.inference.flags import fit_spectral_model, scan_mean_spectrum
from chemmap.inference.score import (
    Engine,
    ScanScorer,
    check_scan_id,
    read_map_zarr,
    read_sample_table,
    resample_bands,
    resample_flags,
    score_folder,
    wavelength_drift,
    write_map_zarr,
)
from chemmap.inference.score_output import (
    HOST,
    LockBusy,
    acquire_lock,
    holder_alive,
    lock_path,
    read_lock,
    read_map_attrs,
)
from chemmap.io import discover_scans, open_scan
from chemmap.io.envi import create_envi, find_data_file
from chemmap.models.unet import UNet, UNetConfig
from chemmap.preprocess.recipe import Recipe
from chemmap.preprocess.store import Dataset

ROOT = Path(__file__).resolve().parents[2]
SEED = 11
MODEL = {"model_name": "pork-fat", "model_version": "3"}
# Tests marked slow use the shared tiny dataset (synthesised and preprocessed once, ~8 s on
# 2 cores); the whole file takes about 35 s.


# ---------------------------------------------------------------------------------------------
# Fixtures: a bundle of random U-Nets for the tiny dataset, and one scored run of its raw folder
# ---------------------------------------------------------------------------------------------


def _random_bundle(work: Path, data: Dataset) -> ModelBundle:
    """Two seeded random fold models, saved as training saves them, copied into a bundle."""
    training = work / "train"
    config = UNetConfig(
        in_channels=data.n_channels, out_channels=len(data.targets), depth=3, features=4, front_end=True
    )
    torch.manual_seed(SEED)
    weights = []
    for fold in (1, 2):
        (training / f"fold{fold}").mkdir(parents=True)
        torch.save(UNet(config).state_dict(), training / f"fold{fold}" / "best.pt")
        weights.append(f"fold{fold}/best.pt")
    card = {"unet": asdict(config), "targets": data.targets, "folds": [1, 2], "weights": weights}
    write_json_atomic(training / "model.json", card)
    saturation = {s["scan_id"]: s["saturation"] for s in data.scan_table}
    spectral = fit_spectral_model(data)
    return read_bundle(
        write_bundle(
            work / "bundle",
            training,
            data.recipe,
            provenance={"raw_saturation": saturation},
            spectral_model=spectral,
        )
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_samples_csv(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("scan_id,sample_id\n" + "".join(f"{scan},{sample}\n" for scan, sample in pairs))
    return path


@pytest.fixture(scope="module")
def setup(tiny_dataset, tmp_path_factory):
    """(dataset, bundle, the dataset's raw scan folder, a work folder)."""
    _, pre = tiny_dataset
    data = Dataset(pre.path / "dataset.zarr")
    work = tmp_path_factory.mktemp("score")
    scans_root = Path(data.scan_table[0]["raw"]).parents[2]  # <root>/<id>/capture/<id>.hdr
    return data, _random_bundle(work, data), scans_root, work


@pytest.fixture(scope="module")
def scored(setup):
    """One run over the whole raw folder, with the dataset's scan -> sample table; the tables as read then."""
    data, bundle, scans_root, work = setup
    table = [(scan, sid) for sid, info in data.samples.items() for scan in info.scans]
    samples_csv = _write_samples_csv(work / "scan_samples.csv", table)
    out = work / "out"
    lines: list[str] = []
    summary = score_folder(
        bundle, scans_root, out, **MODEL, samples_csv=samples_csv, progress=False, log=lines.append
    )
    return summary, out, lines, _read_csv(out / "summary.csv"), _read_csv(out / "samples.csv")


def test_a_bundle_keeps_its_bound_and_refuses_a_bad_one(setup, tmp_path):
    data, bundle, _, work = setup
    assert bundle.bound is None and "bound" not in bundle.manifest  # as bundles were before bounds
    bounded = read_bundle(write_bundle(tmp_path / "bounded", work / "train", data.recipe, bound=(0, 100)))
    assert bounded.bound == (0.0, 100.0) and bounded.ensemble().bound == (0.0, 100.0)
    manifest = json.loads((tmp_path / "bounded" / "chemmap.json").read_text())
    manifest["bound"] = [100, 0]
    (tmp_path / "bounded" / "chemmap.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"chemmap\.json: a map bound needs low < high"):
        read_bundle(tmp_path / "bounded")


# ---------------------------------------------------------------------------------------------
# A scored folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_scored_maps_are_the_evaluated_maps_of_the_stored_cubes(setup, scored):
    data, bundle, _, _ = setup
    summary, out, lines, _, _ = scored
    assert (summary.ok, summary.skipped, summary.errors) == (len(data.scan_ids), 0, 0)
    assert "12 scored, 0 skipped" in lines[-1] and str(out / "summary.csv") in lines[-1]
    ensemble = bundle.ensemble()
    for sid in data.scan_ids:
        maps, mask, attrs = read_map_zarr(out / f"{sid}.zarr")
        assert np.array_equal(mask, data.mask(sid))  # the dataset's mask, from the raw files
        expected = predict_map(ensemble, data.model_input(data.cube(sid)[...])).numpy()  # (T, H, W)
        assert maps.shape == expected.shape and maps.dtype == np.float32
        np.testing.assert_allclose(maps[:, mask], expected[:, mask], rtol=0, atol=1e-5)
        assert np.isnan(maps[:, ~mask]).all()
        assert attrs["complete"] is True and attrs["scan_id"] == sid and attrs["targets"] == data.targets
        assert (attrs["model_name"], attrs["model_version"]) == (MODEL["model_name"], MODEL["model_version"])
        assert Recipe.from_dict(attrs["recipe"]) == data.recipe
        assert attrs["means"]["fat"] == pytest.approx(float(maps[0][mask].mean(dtype=np.float64)), abs=1e-6)
        assert sorted(attrs["input_files"]) == sorted(  # raw, white and dark: header and data each
            f"{sid}/capture/{p}{sid}.{ext}" for p in ("", "WHITEREF_", "DARKREF_") for ext in ("hdr", "raw")
        )
        assert (out / f"{sid}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_blended_engine_maps_the_same_mask_and_is_recorded(setup, scored, tmp_path):
    """``--mode gaussian``: the same mask, finite maps inside it; the mode is recorded with the
    map, and a map of another mode is made again, not taken as done. (How blending blends:
    tests/inference/test_stream.py.)"""
    data, bundle, scans_root, _ = setup
    _, out, _, _, _ = scored
    sid = sorted(data.scan_ids)[0]
    files = next(f for f in discover_scans(scans_root) if f.scan_id == sid)
    blended = ScanScorer(
        bundle, scans_root, tmp_path, **MODEL, tolerance_nm=1.0, engine=Engine("gaussian", tile_lines=32)
    )
    assert blended.score(files).status == "ok"
    maps, mask, attrs = read_map_zarr(tmp_path / f"{sid}.zarr")
    exact, exact_mask, exact_attrs = read_map_zarr(out / f"{sid}.zarr")
    assert (
        np.array_equal(mask, exact_mask)
        and np.isfinite(maps[:, mask]).all()
        and np.isnan(maps[:, ~mask]).all()
    )
    assert attrs["engine"] == {"mode": "gaussian", "amp": False} and exact_attrs["engine"]["mode"] == "exact"
    # The tiny scan is smaller than one window with the model's halo: one window covers the
    # tissue, so the blend is that window's output, the exact map (to float rounding).
    np.testing.assert_allclose(maps[:, mask], exact[:, mask], rtol=0, atol=1e-5)
    # The exact scorer finds the gaussian map out of date, and makes its own.
    exact_scorer = ScanScorer(bundle, scans_root, tmp_path, **MODEL, tolerance_nm=1.0)
    assert exact_scorer.score(files).status == "ok"
    assert read_map_attrs(tmp_path / f"{sid}.zarr")["engine"]["mode"] == "exact"
    assert exact_scorer.score(files).status == "skipped"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "nearest"}, "scoring mode must be one of"),
        ({"amp": True}, "runs on a CUDA device only"),
        ({"tile_lines": 0}, "tile lines must be a positive integer"),
    ],
)
def test_a_bad_engine_setting_is_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Engine(**kwargs)


@pytest.mark.slow
def test_summary_and_sample_tables_agree_with_the_maps(setup, scored):
    data, _, _, _ = setup
    _, out, _, rows, sample_rows = scored
    assert [r["scan_id"] for r in rows] == sorted(data.scan_ids)
    maps = {sid: read_map_zarr(out / f"{sid}.zarr")[:2] for sid in data.scan_ids}
    for r in rows:
        m, mask = maps[r["scan_id"]]
        vals = m[0][mask]
        assert r["status"] == "ok" and r["error"] == "" and r["model_version"] == MODEL["model_version"]
        assert float(r["mean_fat"]) == pytest.approx(vals.mean(dtype=np.float64), abs=1e-5)
        assert int(r["mask_pixels"]) == mask.sum()
        assert float(r["out_of_range_pct"]) == pytest.approx(
            100 * ((vals < 0) | (vals > 100)).mean(), abs=1e-3
        )
        assert 0 < float(r["saturated_pct"]) < 100  # the synthetic scanner saturates some pixels
    assert {r["sample_id"] for r in sample_rows} == set(data.samples)
    for r in sample_rows:
        scans = data.samples[r["sample_id"]].scans
        assert r["scan_ids"].split(";") == list(scans) and r["missing"] == ""
        total = sum(float(maps[s][0][0][maps[s][1]].sum(dtype=np.float64)) for s in scans)
        pixels = sum(int(maps[s][1].sum()) for s in scans)
        assert int(r["mask_pixels"]) == pixels
        assert float(r["mean_fat"]) == pytest.approx(total / pixels, abs=1e-5)


@pytest.mark.slow
@pytest.mark.slow
def test_every_row_measures_the_scan_against_the_training_spectra(setup, scored):
    """T² and Q of each scored scan are the spectral model's for its stored cube; flags follow the limits."""
    data, bundle = setup[0], setup[1]
    model = bundle.spectral_model
    assert model is not None
    rows = {r["scan_id"]: r for r in scored[3]}
    for scan_id, row in rows.items():
        t2, q = model.score(scan_mean_spectrum(data.cube(scan_id), data.mask(scan_id)))
        assert float(row["t2"]) == pytest.approx(t2, rel=1e-4) and float(row["q"]) == pytest.approx(
            q, rel=1e-4
        )
        named = row["flags"].split(";") if row["flags"] else []
        assert any(f.startswith("t2>") for f in named) == (t2 > model.t2_limit)
        assert any(f.startswith("q>") for f in named) == (q > model.q_limit)


def test_xarray_opens_a_map(setup, scored):
    import xarray as xr

    data, _, _, _ = setup
    _, out, _, _, _ = scored
    sid = data.scan_ids[0]
    maps, mask, _ = read_map_zarr(out / f"{sid}.zarr")
    ds = xr.open_zarr(out / f"{sid}.zarr")
    assert ds["map"].dims == ("target", "y", "x") and list(ds["target"].values) == ["fat"]
    assert ds.attrs["complete"] is True and ds["map"].attrs["units"] == "%"
    np.testing.assert_array_equal(ds["map"].sel(target="fat").values, maps[0])
    np.testing.assert_array_equal(ds["mask"].values, mask)


def _tree_mtimes(out: Path) -> dict[str, int]:
    return {
        str(p.relative_to(out)): p.stat().st_mtime_ns
        for p in out.rglob("*")
        if p.is_file() and p.name not in ("summary.csv", "samples.csv")
    }


@pytest.mark.slow
def test_a_second_run_skips_every_scan_and_rewrites_nothing(setup, scored):
    data, bundle, scans_root, work = setup
    _, out, _, first_rows, _ = scored
    before = _tree_mtimes(out)
    # Pairs of scans as samples: the sample mean is weighted by each scan's mask pixels.
    ids = sorted(data.scan_ids)
    pairs = _write_samples_csv(work / "pairs.csv", [(s, f"pair{i // 2}") for i, s in enumerate(ids)])
    lines: list[str] = []
    again = score_folder(
        bundle, scans_root, out, **MODEL, samples_csv=pairs, progress=False, log=lines.append
    )
    assert (again.ok, again.skipped, again.errors) == (0, len(ids), 0)
    assert f"0 scored, {len(ids)} skipped" in lines[-1]
    assert _tree_mtimes(out) == before  # no map, mask or picture written again
    assert _read_csv(out / "summary.csv") == first_rows  # the earlier rows, status ok
    sample_rows = _read_csv(out / "samples.csv")
    assert len(sample_rows) == len(ids) // 2
    for r in sample_rows:
        a, b = (read_map_zarr(out / f"{s}.zarr")[:2] for s in r["scan_ids"].split(";"))
        weighted = (a[0][0][a[1]].sum(dtype=np.float64) + b[0][0][b[1]].sum(dtype=np.float64)) / (
            a[1].sum() + b[1].sum()
        )
        assert float(r["mean_fat"]) == pytest.approx(weighted, abs=1e-5)


@pytest.mark.slow
def test_a_new_model_version_or_a_changed_input_file_makes_the_map_again(setup, tmp_path):
    data, bundle, scans_root, _ = setup
    src_id = sorted(data.scan_ids)[0]
    folder = tmp_path / "scans"
    _copy_scan(scans_root / src_id / "capture" / f"{src_id}.hdr", folder, "s1")
    out = tmp_path / "out"

    def run(version: str) -> tuple[int, int]:
        s = score_folder(
            bundle,
            folder,
            out,
            model_name="pork-fat",
            model_version=version,
            progress=False,
            log=lambda _: None,
        )
        return s.ok, s.skipped

    assert run("3") == (1, 0) and run("3") == (0, 1)
    assert run("4") == (1, 0) and read_map_attrs(out / "s1.zarr")["model_version"] == "4"
    white = find_data_file(folder / "s1" / "capture" / "WHITEREF_s1.hdr")
    st = white.stat()
    os.utime(white, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new white reference, same size
    assert run("4") == (1, 0) and run("4") == (0, 1)
    (out / "s1.png").unlink()
    assert run("4") == (1, 0) and (out / "s1.png").is_file()


@pytest.mark.slow
def test_mask_files_are_used_and_part_of_what_makes_a_map_again(setup, tmp_path):
    from chemmap.config import MaskConfig

    data, _, scans_root, work = setup
    pattern = "{scan_id}/capture/{scan_id}_mask.npy"
    recipe = dataclasses.replace(
        data.recipe,
        config=data.recipe.config.model_copy(update={"mask": MaskConfig(method="files", pattern=pattern)}),
    )
    with_masks = read_bundle(write_bundle(tmp_path / "bundle", work / "train", recipe))
    src_id = sorted(data.scan_ids)[0]
    folder = tmp_path / "scans"
    _copy_scan(scans_root / src_id / "capture" / f"{src_id}.hdr", folder, "s1")
    drawn = data.mask(src_id) & (np.arange(data.shape(src_id)[1]) < 16)[None, :]  # the left half only
    mask_file = folder / pattern.replace("{scan_id}", "s1")
    np.save(mask_file, drawn)
    out = tmp_path / "out"
    first = score_folder(with_masks, folder, out, **MODEL, progress=False, log=lambda _: None)
    _, mask, attrs = read_map_zarr(out / "s1.zarr")
    assert first.ok == 1 and np.array_equal(mask, drawn) and "s1/capture/s1_mask.npy" in attrs["input_files"]
    np.save(mask_file, data.mask(src_id))  # a new mask: the map is made again
    second = score_folder(with_masks, folder, out, **MODEL, progress=False, log=lambda _: None)
    assert second.ok == 1 and np.array_equal(read_map_zarr(out / "s1.zarr")[1], data.mask(src_id))
    mask_file.unlink()
    third = score_folder(with_masks, folder, out, **MODEL, progress=False, log=lambda _: None)
    assert third.errors == 1 and "mask file not found" in _read_csv(out / "summary.csv")[0]["error"]


# ---------------------------------------------------------------------------------------------
# Interrupted runs
# ---------------------------------------------------------------------------------------------

_SCORE_SCRIPT = """
import sys
from chemmap.inference.bundle import read_bundle
from chemmap.inference.score import score_folder
score_folder(read_bundle(sys.argv[1]), sys.argv[2], sys.argv[3], model_name="m", model_version="1",
             progress=False, log=lambda s: None)
"""


def _complete_maps(out: Path) -> list[str]:
    return sorted(p.name[: -len(".zarr")] for p in out.glob("*.zarr") if not p.name.startswith("."))


def _writing(out: Path) -> bool:
    """At least one map done and another being written (its temporary folder exists)."""
    return out.is_dir() and bool(_complete_maps(out)) and bool(list(out.glob(".*.zarr.*.tmp")))


def _kill_mid_write(bundle: ModelBundle, folder: Path, out: Path) -> None:
    """Start scoring in a real process and SIGKILL it while a scan's temporary map exists.

    The process is stopped (SIGSTOP) before the check that decides, so what is checked is
    what the kill leaves: no race with a rename in between.
    """
    cmd = [sys.executable, "-c", _SCORE_SCRIPT, str(bundle.path), str(folder), str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if _writing(out):
                proc.send_signal(signal.SIGSTOP)
                os.waitpid(proc.pid, os.WUNTRACED)  # returns once every thread is stopped
                if _writing(out):
                    proc.send_signal(signal.SIGKILL)
                    break
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.002)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"scoring ended before it was killed: {err.decode()[-2000:]}"


@pytest.mark.slow
def test_a_killed_run_leaves_no_half_map_and_the_next_run_finishes_it(setup, tmp_path):
    data, bundle, scans_root, _ = setup
    folder = tmp_path / "scans"
    folder.mkdir()
    ids = sorted(data.scan_ids)[:4]
    for sid in ids:
        shutil.copytree(
            scans_root / sid, folder / sid, copy_function=os.link
        )  # hard links: inside the folder
    out = tmp_path / "out"
    _kill_mid_write(bundle, folder, out)
    done = _complete_maps(out)
    leftovers = sorted(p.name for p in out.glob(".*.zarr.*.tmp"))
    assert leftovers and 1 <= len(done) < len(ids)
    killed = leftovers[0][1:].split(".zarr.")[0]
    assert killed in ids and killed not in done  # the scan being written has no map that looks done
    for sid in done:
        assert read_map_zarr(out / f"{sid}.zarr")[2]["complete"] is True
    assert read_map_attrs(out / leftovers[0]) is None  # the half map says it is not complete
    rows = _read_csv(out / "summary.csv")
    assert {r["scan_id"] for r in rows} <= set(done)
    lines: list[str] = []
    summary = score_folder(
        bundle, folder, out, model_name="m", model_version="1", progress=False, log=lines.append
    )
    assert (summary.ok, summary.skipped, summary.errors) == (len(ids) - len(done), len(done), 0)
    assert "unfinished files of an interrupted run" in lines[0]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # leftovers removed
    assert _complete_maps(out) == ids
    assert [r["status"] for r in _read_csv(out / "summary.csv")] == ["ok"] * len(ids)


# ---------------------------------------------------------------------------------------------
# Several scorers on one output folder: a lock per scan
# ---------------------------------------------------------------------------------------------

_RACE_SCRIPT = """
import json, sys, time
from pathlib import Path
from chemmap.inference.bundle import read_bundle
from chemmap.inference.score import score_folder
bundle = read_bundle(sys.argv[1])
bundle.ensemble()  # both ready to score before either starts
Path(sys.argv[5]).touch()
while not Path(sys.argv[4]).exists():
    time.sleep(0.002)
s = score_folder(bundle, sys.argv[2], sys.argv[3], model_name="m", model_version="1", progress=False,
                 log=lambda line: print(line, file=sys.stderr))
print(json.dumps({"scored": s.scored, "skipped": s.skipped, "busy": s.busy, "errors": s.errors}))
"""


@pytest.mark.slow
def test_two_scoring_processes_score_each_scan_once_and_leave_a_complete_summary(setup, tmp_path):
    data, bundle, scans_root, _ = setup
    ids = sorted(data.scan_ids)
    folder = tmp_path / "scans"
    folder.mkdir()
    for sid in ids:
        shutil.copytree(
            scans_root / sid, folder / sid, copy_function=os.link
        )  # hard links: inside the folder
    out, go = tmp_path / "out", tmp_path / "go"
    args = [sys.executable, "-c", _RACE_SCRIPT, str(bundle.path), str(folder), str(out), str(go)]
    procs = [
        subprocess.Popen(
            [*args, str(tmp_path / f"ready{i}")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.01)
        go.touch()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    runs = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in results]
    scored = [set(r["scored"]) for r in runs]
    assert not scored[0] & scored[1]  # no scan scored by both
    assert scored[0] | scored[1] == set(ids)  # and every scan by one of them
    for r in runs:  # the other scans were done before this one looked, or held by the other
        assert len(r["scored"]) + r["skipped"] + r["busy"] == len(ids) and r["errors"] == 0
    rows = _read_csv(out / "summary.csv")  # the last writer's view: every map, status ok
    assert [(r["scan_id"], r["status"]) for r in rows] == [(sid, "ok") for sid in ids]
    for r in rows:
        assert r == {
            k: "" if v is None else str(v)  # the CSV writes None as an empty cell
            for k, v in read_map_attrs(out / f"{r['scan_id']}.zarr")["summary_row"].items()
        }
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files, no locks


def _lock_file(out: Path, scan_id: str, host: str, pid: int, age_s: float = 0.0) -> Path:
    path = lock_path(out, scan_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"host": host, "pid": pid, "started": "2020-01-01T00:00:00+00:00", "token": f"t-{scan_id}"}
    path.write_text(json.dumps(info))
    if age_s:
        old = time.time() - age_s
        os.utime(path, (old, old))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_a_dead_holders_lock_is_taken_over_and_a_live_ones_scan_is_left_busy(setup, tmp_path):
    data, bundle, scans_root, _ = setup
    a, b, c, d = ids = sorted(data.scan_ids)[:4]
    folder = tmp_path / "scans"
    folder.mkdir()
    for sid in ids:
        shutil.copytree(
            scans_root / sid, folder / sid, copy_function=os.link
        )  # hard links: inside the folder
    out = tmp_path / "out"
    _lock_file(out, a, HOST, _dead_pid())  # this host, its process gone
    held = acquire_lock(out, b)  # this host, a live process (this one)
    _lock_file(out, c, "elsewhere", 1)  # another host, a fresh heartbeat
    _lock_file(out, d, "elsewhere", 1, age_s=120)  # another host, silent for 2 minutes
    for sid in (a, b):  # what each holder left half written
        (out / f".{sid}.zarr.0123456789ab.tmp").mkdir()
    lines: list[str] = []
    first = score_folder(bundle, folder, out, **MODEL, stale_seconds=60, progress=False, log=lines.append)
    assert (first.ok, first.busy, first.skipped, first.errors) == (2, 2, 0, 0) and first.scored == (a, d)
    assert "removed 1 unfinished files" in lines[0]  # a's, not b's: b's holder is alive
    assert (out / f".{b}.zarr.0123456789ab.tmp").is_dir() and not (
        out / f".{a}.zarr.0123456789ab.tmp"
    ).exists()
    assert sum(f"score: {b} busy: held by {HOST} pid {os.getpid()}" in line for line in lines) == 1
    assert sum(f"score: {c} busy: held by elsewhere pid 1" in line for line in lines) == 1
    assert "2 busy (left to another scorer)" in lines[-1]
    rows = {r["scan_id"]: r for r in _read_csv(out / "summary.csv")}
    assert [rows[s]["status"] for s in ids] == ["ok", "busy", "busy", "ok"]
    assert "held by elsewhere pid 1" in rows[c]["note"] and rows[b]["mean_fat"] == ""
    assert sorted(p.name for p in (out / ".locks").iterdir()) == [f"{b}.lock", f"{c}.lock"]  # a, d released
    held.release()
    lock_path(out, c).unlink()  # the other host's scorer is done (without a map of c)
    second = score_folder(bundle, folder, out, **MODEL, stale_seconds=60, progress=False, log=lines.append)
    assert (second.ok, second.skipped, second.busy) == (2, 2, 0) and second.scored == (b, c)
    assert [r["status"] for r in _read_csv(out / "summary.csv")] == ["ok"] * 4
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_lock_rules(tmp_path):
    out = tmp_path / "out"
    lock = acquire_lock(out, "s1", stale_seconds=0.2)  # a heartbeat every 0.05 s
    info = json.loads(lock_path(out, "s1").read_text())
    assert (info["host"], info["pid"]) == (HOST, os.getpid()) and info["token"] == lock.info.token
    os.utime(lock_path(out, "s1"), (0, 0))
    time.sleep(0.3)
    assert time.time() - lock_path(out, "s1").stat().st_mtime < 0.2  # kept fresh while held
    with pytest.raises(LockBusy, match=f"held by {HOST} pid {os.getpid()}"):
        acquire_lock(out, "s1")
    lock.release()
    assert not lock_path(out, "s1").exists()
    with acquire_lock(out, "s1"):  # free again
        pass
    dead, here = _dead_pid(), read_lock(_lock_file(out, "s2", HOST, os.getpid()))
    assert holder_alive(here) and not holder_alive(read_lock(_lock_file(out, "s3", HOST, dead)))
    reused = json.loads(lock_path(out, "s2").read_text()) | {
        "pid_start": 1
    }  # pid now names a younger process
    lock_path(out, "s2").write_text(json.dumps(reused))
    assert not holder_alive(read_lock(lock_path(out, "s2")))
    assert holder_alive(read_lock(_lock_file(out, "s4", "elsewhere", 1, age_s=50)), stale_seconds=60)
    assert not holder_alive(read_lock(_lock_file(out, "s4", "elsewhere", 1, age_s=70)), stale_seconds=60)
    lock_path(out, "s5").write_text("")  # created, not yet written: held for a while
    assert holder_alive(read_lock(lock_path(out, "s5")))
    os.utime(lock_path(out, "s5"), (0, 0))
    assert not holder_alive(read_lock(lock_path(out, "s5")))
    taken = acquire_lock(out, "s3")  # a dead holder's lock is broken and taken over
    assert json.loads(lock_path(out, "s3").read_text())["token"] == taken.info.token
    taken.release()


# ---------------------------------------------------------------------------------------------
# Bad and drifted scans
# ---------------------------------------------------------------------------------------------


def _copy_envi(src_hdr: Path, dest_hdr: Path, shift_nm: float = 0.0) -> None:
    """Write a scan's values again as a new ENVI file, band centres shifted by ``shift_nm``."""
    scan = open_scan(src_hdr)
    extra = {"ceiling": scan.header["ceiling"]} if "ceiling" in scan.header else None
    mm = create_envi(
        dest_hdr,
        bands=scan.bands,
        lines=scan.lines,
        samples=scan.samples,
        dtype=scan.dtype,
        wavelengths=scan.wavelengths + shift_nm,
        extra=extra,
    )
    mm[...] = np.asarray(scan.data.compute()).transpose(1, 0, 2)  # BIL: (lines, bands, samples)
    mm.flush()


def _copy_scan(src_raw: Path, root: Path, scan_id: str, shift_nm: float = 0.0) -> Path:
    """A copy of a Specim scan folder (raw, white, dark) under a new id."""
    src_id = src_raw.stem
    for prefix in ("", "WHITEREF_", "DARKREF_"):
        src = src_raw.with_name(f"{prefix}{src_id}.hdr")
        _copy_envi(src, root / scan_id / "capture" / f"{prefix}{scan_id}.hdr", shift_nm)
    return root / scan_id / "capture" / f"{scan_id}.hdr"


@pytest.mark.slow
def test_drifted_bands_are_resampled_and_bad_scans_are_error_rows(setup, scored, tmp_path):
    data, bundle, scans_root, _ = setup
    _, first_out, _, _, _ = scored
    src_id = sorted(data.scan_ids)[0]
    src = scans_root / src_id / "capture" / f"{src_id}.hdr"
    folder = tmp_path / "scans"
    _copy_scan(src, folder, "a_same")
    _copy_scan(src, folder, "b_drift05", shift_nm=0.5)
    _copy_scan(src, folder, "c_drift5", shift_nm=5.0)
    data_file = find_data_file(_copy_scan(src, folder, "d_truncated"))
    os.truncate(data_file, data_file.stat().st_size - 1000)
    nodark = _copy_scan(src, folder, "e_no_dark")
    for p in nodark.parent.glob("DARKREF_*"):
        p.unlink()
    lines: list[str] = []
    summary = score_folder(bundle, folder, tmp_path / "out", **MODEL, progress=False, log=lines.append)
    rows = {r["scan_id"]: r for r in _read_csv(tmp_path / "out" / "summary.csv")}
    assert (summary.ok, summary.errors) == (2, 3) and summary.failed == (
        "c_drift5",
        "d_truncated",
        "e_no_dark",
    )
    assert "2 scored, 0 skipped (done before), 3 failed" in lines[-1] and "c_drift5" in lines[-1]
    assert sum(line.startswith("score: ") and "failed:" in line for line in lines[:-1]) == 3  # a line each
    # An exact copy gives the original's map bit for bit; a drift of 0.5 nm is resampled, with a note.
    same, _, _ = read_map_zarr(tmp_path / "out" / "a_same.zarr")
    assert np.array_equal(same, read_map_zarr(first_out / f"{src_id}.zarr")[0], equal_nan=True)
    assert rows["a_same"]["note"] == ""
    assert rows["b_drift05"]["status"] == "ok" and "resampled" in rows["b_drift05"]["note"]
    assert "0.50 nm" in rows["b_drift05"]["note"]
    drifted, mask, _ = read_map_zarr(tmp_path / "out" / "b_drift05.zarr")
    assert np.isfinite(drifted[:, mask]).all() and not np.array_equal(drifted, same, equal_nan=True)
    # Saturated pixels and dead detector elements stay flagged through the resampling.
    assert np.array_equal(mask, read_map_zarr(tmp_path / "out" / "a_same.zarr")[1])
    assert rows["b_drift05"]["saturated_pct"] == rows["a_same"]["saturated_pct"]
    # Beyond the tolerance, a truncated file, a missing reference: error rows naming the scan and why.
    assert rows["c_drift5"]["status"] == "error" and "c_drift5" in rows["c_drift5"]["error"]
    assert "5.00 nm" in rows["c_drift5"]["error"] and "tolerance is 1 nm" in rows["c_drift5"]["error"]
    assert rows["d_truncated"]["status"] == "error" and "d_truncated.raw" in rows["d_truncated"]["error"]
    assert "bytes" in rows["d_truncated"]["error"]
    assert rows["e_no_dark"]["status"] == "error" and "no DARKREF found" in rows["e_no_dark"]["error"]
    assert (
        not (tmp_path / "out" / "c_drift5.zarr").exists() and not (tmp_path / "out" / "c_drift5.png").exists()
    )
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_scan_ids_that_would_leave_the_output_folder_are_refused(setup, tmp_path):
    data, bundle, scans_root, _ = setup
    src_id = sorted(data.scan_ids)[0]
    src = scans_root / src_id / "capture"
    folder = tmp_path / "scans"
    # A flat layout where file names give the ids: scan_...hdr is the id '..', scan_.hidden.hdr '.hidden'.
    for sid in ("good", "..", ".hidden"):
        _copy_envi(src / f"{src_id}.hdr", folder / "scans" / f"scan_{sid}.hdr")
    _copy_envi(src / f"WHITEREF_{src_id}.hdr", folder / "refs" / "white.hdr")
    _copy_envi(src / f"DARKREF_{src_id}.hdr", folder / "refs" / "dark.hdr")
    out = tmp_path / "nested" / "out"
    lines: list[str] = []
    summary = score_folder(
        bundle,
        folder,
        out,
        **MODEL,
        raw_pattern="scans/scan_{scan_id}.hdr",
        white_pattern="refs/white.hdr",
        dark_pattern="refs/dark.hdr",
        progress=False,
        log=lines.append,
    )
    rows = {r["scan_id"]: r for r in _read_csv(out / "summary.csv")}
    assert set(rows) == {"good", "..", ".hidden"}
    assert (summary.ok, summary.errors) == (1, 2) and rows["good"]["status"] == "ok"
    for sid in ("..", ".hidden"):
        assert rows[sid]["status"] == "error" and "cannot name the scan's outputs" in rows[sid]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["good.png", "good.zarr", "summary.csv"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_check_scan_id(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for ok in ("belly0001_a", "scan 7", "x.y", "a-b_c"):
        check_scan_id(ok, out)
    for bad in ("../evil", "..", ".", "", ".hidden", "a/b", "a\\b", "a..b", "nul\0"):
        with pytest.raises(InputError, match="not a safe file name"):
            check_scan_id(bad, out)
    (out / "link.zarr").symlink_to(tmp_path)  # resolves outside the output folder
    with pytest.raises(InputError, match="'link'"):
        check_scan_id("link", out)


# ---------------------------------------------------------------------------------------------
# Small parts
# ---------------------------------------------------------------------------------------------


def test_resampling_is_linear_interpolation_and_flags_follow_what_it_mixes_in():
    wl = np.linspace(750.0, 1000.0, 26)  # 10 nm bands
    x = (3.0 + 0.5 * wl)[:, None, None] * np.ones((1, 2, 3))  # (bands, lines, samples), linear in nm
    target = wl + 0.4
    got = resample_bands(x, wl, target)
    assert got.shape == (26, 2, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got[:-1], (3.0 + 0.5 * target[:-1])[:, None, None] * np.ones((1, 2, 3)))
    np.testing.assert_allclose(got[-1], x[-1])  # beyond the last band: the last band
    assert np.array_equal(resample_bands(x, wl, wl, dtype=np.float64), x)
    flags = np.zeros((4, 1, 2), bool)
    flags[2, 0, 0] = True  # e.g. saturated in one band, one pixel
    out = resample_flags(flags, [1.0, 2.0, 3.0, 4.0], [1.1, 2.1, 3.1, 4.0])
    assert out[:, 0, 0].tolist() == [False, True, True, False]  # both bands that mix it in
    assert not out[:, 0, 1].any()


def test_wavelength_drift_is_measured_and_refused_beyond_the_tolerance():
    ref = np.linspace(400.0, 1000.0, 300)
    assert wavelength_drift(ref + 0.01, ref, 1.0, "s.hdr") == pytest.approx(0.01)
    assert wavelength_drift(ref - 0.7, ref, 1.0, "s.hdr") == pytest.approx(0.7)
    with pytest.raises(InputError, match=r"s.hdr: wavelengths differ .* by up to 1.50 nm"):
        wavelength_drift(ref + 1.5, ref, 1.0, "s.hdr")
    with pytest.raises(InputError, match=r"s.hdr: 299 bands .* expects 300 bands"):
        wavelength_drift(ref[:-1], ref, 1.0, "s.hdr")
    with pytest.raises(InputError, match="no 'wavelength' list"):
        wavelength_drift(None, ref, 1.0, "s.hdr")


def test_map_zarr_round_trip_and_an_incomplete_one_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 100, (2, 7, 5)).astype(np.float32)
    mask = rng.random((7, 5)) > 0.3
    maps[:, ~mask] = np.nan
    path = write_map_zarr(tmp_path / "m.zarr", maps, mask, targets=["fat", "water"], attrs={"scan_id": "s1"})
    got, got_mask, attrs = read_map_zarr(path)
    assert np.array_equal(got, maps, equal_nan=True) and np.array_equal(got_mask, mask)
    assert attrs["complete"] is True and attrs["targets"] == ["fat", "water"] and attrs["scan_id"] == "s1"
    write_map_zarr(path, maps[:1], mask, targets=["fat"], attrs={"scan_id": "s2"})  # replaces it
    assert read_map_zarr(path)[2]["scan_id"] == "s2" and [p.name for p in tmp_path.iterdir()] == ["m.zarr"]
    with pytest.raises(ValueError, match="2 target names for 1 maps"):
        write_map_zarr(path, maps[:1], mask, targets=["fat", "water"], attrs={})
    meta = (path / "zarr.json").read_text().replace('"complete": true', '"complete": false')
    (path / "zarr.json").write_text(meta)
    with pytest.raises(InputError, match="no complete chemmap map"):
        read_map_zarr(path)


@pytest.mark.slow
def test_bad_folders_and_tables_are_one_line_input_errors(setup, tmp_path):
    _, bundle, _, _ = setup
    with pytest.raises(InputError, match="input folder not found"):
        score_folder(bundle, tmp_path / "nowhere", tmp_path / "out", **MODEL, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no scan matches"):
        score_folder(bundle, tmp_path / "empty", tmp_path / "out", **MODEL, progress=False)
    (tmp_path / "t.csv").write_text("scan,sample\na,b\n")
    with pytest.raises(InputError, match=r"t\.csv: no scan_id or sample_id column"):
        read_sample_table(tmp_path / "t.csv")
    (tmp_path / "t.csv").write_text("scan_id,sample_id\na,b\na,c\n")
    with pytest.raises(InputError, match="line 3: scan 'a' is in samples 'b' and 'c'"):
        read_sample_table(tmp_path / "t.csv")
    with pytest.raises(InputError, match="wavelength_tolerance_nm must be >= 0"):
        score_folder(bundle, tmp_path / "empty", tmp_path / "out", **MODEL, wavelength_tolerance_nm=-1)
