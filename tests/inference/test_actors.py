"""Scoring on Ray actors: the same maps, pictures and rows as local scoring, from a real local Ray.

The model is the seeded random bundle of ``test_score.py``; the scans are the tiny synthetic
dataset's raw folder; Ray is the session's local instance with 2 CPUs (``ray_local``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from chemmap.errors import InputError
from chemmap.inference.actors import score_on_ray
from chemmap.inference.bundle import read_bundle
from chemmap.inference.score import Engine, ScanScorer, read_map_zarr, score_folder
from chemmap.io import discover_scans
from chemmap.preprocess.store import Dataset
from tests.inference.test_score import MODEL, _random_bundle, _read_csv

TIMING = ("seconds", "scored_at")  # the columns that differ between two runs of the same scan


@pytest.fixture(scope="module")
def setup(tiny_dataset, tmp_path_factory):
    """(dataset, bundle, a folder with links to the dataset's raw scans, a work folder)."""
    _, pre = tiny_dataset
    data = Dataset(pre.path / "dataset.zarr")
    work = tmp_path_factory.mktemp("actors")
    scans_root = Path(data.scan_table[0]["raw"]).parents[2]  # <root>/<id>/capture/<id>.hdr
    return data, _random_bundle(work, data), scans_root, work


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


@pytest.mark.slow
def test_ray_actors_make_the_maps_and_rows_of_local_scoring(setup, ray_local, tmp_path):
    data, bundle, scans_root, _ = setup
    ids = sorted(data.scan_ids)
    table = [(scan, sid) for sid, info in data.samples.items() for scan in info.scans]
    samples_csv = tmp_path / "samples_in.csv"
    samples_csv.write_text("scan_id,sample_id\n" + "".join(f"{a},{b}\n" for a, b in table))
    local = score_folder(
        bundle,
        scans_root,
        tmp_path / "local",
        **MODEL,
        samples_csv=samples_csv,
        progress=False,
        log=lambda _: None,
    )
    lines: list[str] = []
    remote = score_on_ray(
        bundle.path,  # the path travels to the actors, which read the bundle themselves
        scans_root,
        tmp_path / "ray",
        **MODEL,
        num_actors=2,
        samples_csv=samples_csv,
        progress=False,
        log=lines.append,
    )
    assert (remote.ok, remote.skipped, remote.errors, remote.busy) == (len(ids), 0, 0, 0)
    assert sorted(remote.scored) == ids and local.ok == len(ids)
    assert "on 2 Ray actors (cpu)" in lines[0] and f"{len(ids)} scored" in lines[-1]
    for sid in ids:
        maps, mask, attrs = read_map_zarr(tmp_path / "ray" / f"{sid}.zarr")
        want_maps, want_mask, want_attrs = read_map_zarr(tmp_path / "local" / f"{sid}.zarr")
        assert np.array_equal(maps, want_maps, equal_nan=True) and np.array_equal(mask, want_mask)
        assert _untimed(attrs.pop("summary_row")) == _untimed(want_attrs.pop("summary_row"))
        assert attrs == want_attrs  # model, recipe, input files, sums, means...
        assert (tmp_path / "ray" / f"{sid}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows, want = _read_csv(tmp_path / "ray" / "summary.csv"), _read_csv(tmp_path / "local" / "summary.csv")
    assert [_untimed(r) for r in rows] == [_untimed(r) for r in want]
    assert _read_csv(tmp_path / "ray" / "samples.csv") == _read_csv(tmp_path / "local" / "samples.csv")
    assert sorted(p.name for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_actors_that_cannot_read_the_bundle_and_a_missing_gpu_are_one_line_errors(setup, ray_local, tmp_path):
    _, bundle, scans_root, _ = setup
    with pytest.raises(InputError, match="use_gpu: the Ray cluster has no GPU"):
        score_on_ray(bundle, scans_root, tmp_path / "out", **MODEL, use_gpu=True, progress=False)
    with pytest.raises(InputError, match="num_actors must be an integer >= 1, got 0"):
        score_on_ray(bundle, scans_root, tmp_path / "out", **MODEL, num_actors=0, progress=False)
    gone = read_bundle(shutil.copytree(bundle.path, tmp_path / "bundle"))  # read here, then gone
    shutil.rmtree(gone.path)
    with pytest.raises(InputError, match=r"could not load the model from .*bundle \(a path every worker"):
        score_on_ray(gone, scans_root, tmp_path / "out", **MODEL, num_actors=1, progress=False)


@pytest.mark.slow
def test_the_accelerator_path_gives_the_maps_of_the_plain_model(setup, tmp_path):
    """What a GPU actor runs (the model moved to a device by the streamed engine, windows'
    outputs brought back, the tiling geometry measured on the CPU first), run on ``cpu:0``
    here: the same maps bit for bit."""
    data, bundle, scans_root, _ = setup
    sid = sorted(data.scan_ids)[0]
    files = discover_scans(scans_root)[0]
    assert files.scan_id == sid
    outs = {}
    for device in ("cpu", "cpu:0"):
        scorer = ScanScorer(
            bundle, scans_root, tmp_path / device, "m", "1", 1.0, engine=Engine(device=device)
        )
        assert scorer.score(files).status == "ok"
        outs[device] = read_map_zarr(tmp_path / device / f"{sid}.zarr")
        assert next(scorer.model.parameters()).device.type == torch.device(device).type == "cpu"
    assert np.array_equal(outs["cpu"][0], outs["cpu:0"][0], equal_nan=True)
    assert np.array_equal(outs["cpu"][1], outs["cpu:0"][1])
