"""The pipeline's wiring: the preprocess index, no return to the raw scans, keys and the cluster section."""

from __future__ import annotations

import os

import pytest

from chemmap.errors import InputError
from chemmap.pipeline import find_dataset, patch_geometry, preprocess_stage
from chemmap.preprocess.store import open_dataset
from tests.preprocess.scanfolder import folder_config, write_folder

QUIET = {"progress": False, "log": lambda s: None}


_cfg = folder_config


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
