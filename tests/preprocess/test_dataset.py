from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from chemmap.errors import InputError
from chemmap.io import open_scan
from chemmap.models.geometry import unet_geometry
from chemmap.pipeline import preprocess_stage
from chemmap.preprocess.recipe import Recipe
from tests.preprocess.scanfolder import WL, folder_config, write_folder

QUIET = {"progress": False, "log": lambda s: None}


class Crash(Exception):
    pass


_cfg = folder_config


@pytest.fixture()
def folder(tmp_path):
    return write_folder(tmp_path / "scans")


def test_dataset_contents_match_the_recipe_on_the_raw_scan(tmp_path, folder):
    stage = preprocess_stage(_cfg(tmp_path), **QUIET)
    store = stage.path / "dataset.zarr"
    root = zarr.open_group(store, mode="r")
    recipe = Recipe.from_dict(root.attrs["recipe"])
    assert recipe.n_channels == 6  # 760-1000 nm: 13 of the 16 bands, binned by 2 (one dropped)
    scan = open_scan(folder / "S03" / "capture" / "S03.hdr")
    white = np.full((16, 20), 3000.0)
    dark = np.full((16, 20), 100.0)
    expect, _, _ = recipe.apply(scan.data.compute(), white, dark, 4095)
    np.testing.assert_allclose(root["scans/S03/cube"][...], expect, rtol=1e-6)
    mask = root["scans/S03/mask"][...]
    assert mask[12, 10] and not mask[0, 0] and not mask[4, 3]  # eroded edge
    # Statistics come from training samples only (splits 1-5): recompute them by hand.
    train = [s for s in root.attrs["samples"] if s["split"] != 0]
    assert {s["sample_id"] for s in root.attrs["samples"] if s["split"] == 0} == {"P00", "P01"}
    px = np.concatenate(
        [
            root[f"scans/{s['scans'][0]}/cube"][...][:, root[f"scans/{s['scans'][0]}/mask"][...]]
            for s in train
        ],
        axis=1,
    )
    np.testing.assert_allclose(recipe.mean, px.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(recipe.std, px.std(axis=1), rtol=1e-4)
    # The patch index covers every mask pixel with windows on the stride grid.
    summary = json.loads(stage.marker.read_text())
    patches = root[f"patches/{summary['patches']}"]
    stride = patches.attrs["stride"]
    idx = patches[...]
    radius = unet_geometry(_cfg(tmp_path).model).radius
    assert (idx[:, 1:3] % stride == 0).all() and patches.attrs["halo"] >= radius
    assert patches.attrs["halo"] % stride == 0 and patches.attrs["core"] % stride == 0
    cover = np.zeros_like(mask)
    for _, y0, x0, y1, x1 in idx[idx[:, 0] == [x["scan_id"] for x in root.attrs["scans"]].index("S03")]:
        cover[y0:y1, x0:x1] = True
    assert cover[mask].all()
    assert (stage.path / "config.yaml").is_file()


def test_brightness_is_kept_when_snv_takes_it_out_of_the_cube(tmp_path, folder):
    """SNV sets each pixel's channel mean to 0; the dataset keeps the mean reflectance beside it."""
    from chemmap.preprocess.store import Dataset

    cfg = _cfg(tmp_path, "preprocess.transform=absorbance", "preprocess.snv=true")
    data = Dataset(preprocess_stage(cfg, **QUIET).path / "dataset.zarr")
    recipe = data.recipe
    scan = open_scan(folder / "S03" / "capture" / "S03.hdr")
    white, dark = np.full((16, 20), 3000.0), np.full((16, 20), 100.0)
    cube, reflectance_mean, _ = recipe.apply(scan.data.compute(), white, dark, 4095)
    mask = data.mask("S03")
    assert np.abs(cube.mean(axis=0)[mask]).max() < 1e-5  # nothing left to scale in the cube
    b = data.brightness("S03")
    np.testing.assert_allclose(b, reflectance_mean, rtol=1e-6)
    assert b[mask].std() > 100 * np.abs(cube.mean(axis=0)[mask]).max()  # the pixel noise survives
    assert b.shape == mask.shape and b.dtype == np.float32


def test_a_dataset_without_brightness_is_one_clear_error(tmp_path, folder):
    from chemmap.preprocess.store import Dataset

    store = preprocess_stage(_cfg(tmp_path), **QUIET).path / "dataset.zarr"
    del zarr.open_group(store, mode="r+", use_consolidated=False)["scans/S02/brightness"]
    with warnings.catch_warnings():  # "not part of the v3 spec", as the pipeline says it
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(store)  # as a dataset of format 2 was written
    with pytest.raises(InputError, match=r"S02.*no brightness map; build the dataset again"):
        Dataset(store).brightness("S02")


def test_xarray_opens_named_dimensions_and_wavelengths(tmp_path, folder):
    store = preprocess_stage(_cfg(tmp_path), **QUIET).path / "dataset.zarr"
    ds = xr.open_zarr(store, group="scans/S02")
    assert ds.cube.dims == ("band", "y", "x")
    assert "wavelength" in ds.cube.coords
    np.testing.assert_allclose(ds.wavelength.values[0], WL[WL >= 750][:2].mean())


def test_second_run_does_nothing(tmp_path, folder):
    cfg = _cfg(tmp_path)
    stage = preprocess_stage(cfg, **QUIET)
    before = {p: p.stat().st_mtime_ns for p in stage.path.rglob("*") if p.is_file()}
    again = preprocess_stage(cfg, **QUIET)
    assert again.path == stage.path
    assert {p: p.stat().st_mtime_ns for p in stage.path.rglob("*") if p.is_file()} == before


def test_interrupted_build_resumes_finished_scans(tmp_path, folder, monkeypatch):
    from chemmap.preprocess import dataset

    cfg = _cfg(tmp_path)
    calls = []
    crashed = []
    real = dataset.DatasetBuilder.ingest_scan

    def flaky(self, root, recipe, scan_in, train):
        calls.append(scan_in.scan_id)
        if scan_in.scan_id == "S05" and not crashed:
            crashed.append(True)
            raise Crash("the machine went away mid-build")
        return real(self, root, recipe, scan_in, train)

    monkeypatch.setattr(dataset.DatasetBuilder, "ingest_scan", flaky)
    with pytest.raises(Crash):
        preprocess_stage(cfg, **QUIET)
    calls.clear()
    stage = preprocess_stage(cfg, **QUIET)
    assert stage.complete and calls == ["S05", "S06", "S07"]


@pytest.mark.parametrize("shard_lines", [None, 16, 24])
def test_zarr_round_trip_with_shards(tmp_path, shard_lines):
    """dask #12583: sharded stores written by Dask must equal the unsharded result."""
    write_folder(tmp_path / "scans", n=6, lines=40, samples=36)
    ref_stage = preprocess_stage(_cfg(tmp_path), **QUIET)
    ref = zarr.open_group(ref_stage.path / "dataset.zarr", mode="r")
    extra = [f"preprocess.shard_lines={shard_lines}"] if shard_lines else []
    st = preprocess_stage(_cfg(tmp_path, *extra, "workdir=" + str(tmp_path / "r2")), **QUIET)
    got = zarr.open_group(st.path / "dataset.zarr", mode="r")
    for s in ref.attrs["scans"]:
        a, b = ref[f"scans/{s['scan_id']}/cube"], got[f"scans/{s['scan_id']}/cube"]
        if shard_lines:
            assert b.shards is not None and b.shards[1] % b.chunks[1] == 0
        np.testing.assert_array_equal(a[...], b[...])
        assert np.isfinite(b[...]).all()


# ------------------------------------------------------------------ bad input
def _break(folder: Path, how: str) -> str:
    cap = folder / "S04" / "capture"
    if how == "truncated":
        raw = cap / "S04.raw"
        raw.write_bytes(raw.read_bytes()[:-100])
        return "S04.raw"
    if how == "header_size":
        hdr = cap / "S04.hdr"
        hdr.write_text(hdr.read_text().replace("lines = 24", "lines = 25"))
        return "S04"
    if how == "no_white":
        os.remove(cap / "WHITEREF_S04.hdr")
        return "S04"
    if how == "white_mismatch":
        hdr = cap / "WHITEREF_S04.hdr"
        text = hdr.read_text().replace("samples = 20", "samples = 10")
        hdr.write_text(text)
        (cap / "WHITEREF_S04.raw").write_bytes(b"\0" * (16 * 4 * 10 * 2))
        return "WHITEREF_S04"
    if how == "dtype":
        hdr = cap / "S04.hdr"
        hdr.write_text(hdr.read_text().replace("data type = 12", "data type = 7"))
        return "S04.hdr"
    if how == "wavelengths":
        hdr = cap / "S04.hdr"
        text = hdr.read_text()
        text = text.replace(f"{WL[3]:.3f}", f"{WL[1]:.3f}")
        hdr.write_text(text)
        return "S04.hdr"
    if how == "unknown_sample":
        with open(folder / "references.csv", "a") as fh:
            fh.write("S99,P99,20.0,1\n")
        return "S99"
    if how == "scan_without_reference":
        lines = (folder / "references.csv").read_text().splitlines()
        (folder / "references.csv").write_text("\n".join(x for x in lines if not x.startswith("S04")) + "\n")
        return "S04"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "header_size",
        "no_white",
        "white_mismatch",
        "dtype",
        "wavelengths",
        "unknown_sample",
        "scan_without_reference",
    ],
)
def test_bad_input_is_one_clear_error_and_no_complete_store(tmp_path, folder, how):
    needle = _break(folder, how)
    cfg = _cfg(tmp_path)
    with pytest.raises(InputError) as info:
        preprocess_stage(cfg, **QUIET)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg
    assert not list((tmp_path / "runs").rglob("_COMPLETE.json")) or all(
        "preprocess" not in str(p) for p in (tmp_path / "runs").rglob("_COMPLETE.json")
    )


def test_nan_in_float_scan_names_the_file(tmp_path):
    from tests.preprocess.scanfolder import write_scan

    folder = write_folder(tmp_path / "scans", n=6)
    hdr = write_scan(folder, "S03", 25.0, raw_dtype="float32")
    from chemmap.io.envi import find_data_file

    mm = np.memmap(find_data_file(hdr), dtype="<f4", mode="r+", shape=(24, 16, 20))
    mm[10, 5, 10] = np.nan
    mm.flush()
    with pytest.raises(InputError, match=r"S03\.hdr.*NaN or infinite"):
        preprocess_stage(_cfg(tmp_path), **QUIET)


def test_skip_reports_and_goes_on(tmp_path, folder):
    _break(folder, "truncated")
    messages = []
    stage = preprocess_stage(_cfg(tmp_path, "data.on_error=skip"), progress=False, log=messages.append)
    root = zarr.open_group(stage.path / "dataset.zarr", mode="r")
    assert "S04" not in {s["scan_id"] for s in root.attrs["scans"]}
    assert any("S04.raw" in m for m in messages)
    assert any("S04.raw" in m for m in json.loads(stage.marker.read_text())["skipped"])
