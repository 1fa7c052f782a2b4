"""The pipeline's wiring: the preprocess index, no return to the raw scans, keys and the cluster section."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chemmap.config import load_config
from chemmap.errors import InputError
from chemmap.pipeline import find_dataset, patch_geometry, preprocess_stage
from chemmap.preprocess.store import open_dataset
from tests.preprocess.scanfolder import write_folder

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "log": lambda s: None}


def _cfg(tmp_path: Path, *extra: str):
    sets = [
        f"workdir={tmp_path / 'runs'}",
        "data.source=folder",
        f"data.root={tmp_path / 'scans'}",
        "preprocess.wavelength_min=750",
        "preprocess.bin=2",
        "preprocess.chunk_lines=8",
        "preprocess.chunk_samples=8",
        "preprocess.patch_core=8",
        "preprocess.mask.min_size=8",
        "model.depth=2",
        "model.features=2",
        "model.front_end=false",
        *extra,
    ]
    return load_config(ROOT / "configs" / "ci.yaml", sets)


@pytest.fixture()
def folder(tmp_path):
    return write_folder(tmp_path / "scans", n=7)


def test_training_finds_its_dataset_after_the_raw_scans_are_archived(tmp_path, folder):
    stage = preprocess_stage(_cfg(tmp_path), **QUIET)
    folder.rename(tmp_path / "archived")
    lines: list[str] = []
    found = find_dataset(_cfg(tmp_path), log=lines.append)
    assert found.path == stage.path and found.key == stage.key
    assert lines == []  # nothing to compare with: no warning
    ds = open_dataset(found.path / "dataset.zarr")
    assert len(ds.samples) == 7 and ds.patch_index().windows.shape[1] == 5


def test_a_changed_raw_file_makes_one_stale_warning(tmp_path, folder):
    preprocess_stage(_cfg(tmp_path), **QUIET)
    raw = folder / "S03" / "capture" / "S03.raw"
    st = raw.stat()
    os.utime(raw, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the scanner rewrote it
    lines: list[str] = []
    find_dataset(_cfg(tmp_path), log=lines.append)
    assert len(lines) == 1
    assert "stale" in lines[0] and "S03/capture/S03.raw" in lines[0] and "chemmap preprocess" in lines[0]


def test_no_dataset_yet_is_one_line_naming_the_index(tmp_path, folder):
    with pytest.raises(InputError, match=r"dataset not found: .*index\.json.*chemmap preprocess"):
        find_dataset(_cfg(tmp_path), log=lambda s: None)


def test_where_things_run_never_enters_the_key_but_the_model_geometry_does(tmp_path, folder):
    a = preprocess_stage(_cfg(tmp_path), **QUIET)
    b = preprocess_stage(
        _cfg(tmp_path, "cluster.dask_workers=1", "cluster.dask_scheduler=synchronous"), **QUIET
    )
    assert a.path == b.path
    deeper = _cfg(tmp_path, "model.depth=3")
    assert patch_geometry(deeper) != patch_geometry(_cfg(tmp_path))
    c = preprocess_stage(deeper, **QUIET)
    assert c.key != a.key
    idx = open_dataset(c.path / "dataset.zarr").patch_index()
    assert (idx.core, idx.halo, idx.stride) == tuple(vars(patch_geometry(deeper)).values())


def test_patch_geometry_given_explicitly_must_lie_on_the_stride_grid(tmp_path):
    g = patch_geometry(_cfg(tmp_path, "preprocess.patch_halo=16", "preprocess.patch_stride=4"))
    assert (g.core, g.halo, g.stride) == (8, 16, 4)
    with pytest.raises(
        InputError, match=r"preprocess\.patch_halo=10 is not on the stride grid \(4 px\); use 12"
    ):
        patch_geometry(_cfg(tmp_path, "preprocess.patch_halo=10", "preprocess.patch_stride=4"))
