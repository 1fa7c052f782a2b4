"""Scoring killed (SIGKILL) mid-scan and started again: every scan scored exactly once, no corrupt map.

``chemmap score`` over the tiny dataset's twelve raw scans is killed while a map is half
written (checked with the process stopped: no race with the rename that completes a map).
The half map is a hidden temporary folder that no reader takes for a map; the restart
removes it, skips the maps already made and scores the rest, and every map equals an
uninterrupted run's.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from chemmap.inference.score import score_folder
from chemmap.inference.score_output import read_map_attrs, read_map_zarr
from chemmap.preprocess.store import Dataset
from tests.inference.test_score import _random_bundle, _read_csv
from tests.reliability.faultkit import Chemmap, run, scanner_folder, wait_until


def _done(out) -> list[str]:
    return sorted(p.name[: -len(".zarr")] for p in out.glob("*.zarr") if not p.name.startswith("."))


def _half(out) -> list:
    """Half-written maps (temporary folders), once at least one map is done."""
    return sorted(out.glob(".*.zarr.*.tmp")) if out.is_dir() and _done(out) else []


@pytest.mark.slow
def test_scoring_killed_mid_scan_and_restarted_scores_each_scan_once_and_leaves_no_corrupt_map(
    tiny_dataset, tmp_path
):
    _, pre = tiny_dataset
    data = Dataset(pre.path / "dataset.zarr")
    bundle = _random_bundle(tmp_path / "model", data)
    ids = sorted(data.scan_ids)
    folder, out = scanner_folder(data, tmp_path / "scans"), tmp_path / "maps"
    args = ["score", folder, "--model", bundle.path, "--output", out, "--quiet"]
    with Chemmap(args, tmp_path / "killed.log") as c:
        caught: list = []

        def killed_mid_scan() -> bool:
            if _half(out):
                c.send(signal.SIGSTOP)
                os.waitpid(c.pid, os.WUNTRACED)
                if half := _half(out):
                    caught.append((half[0], _done(out)))
                    c.send(signal.SIGKILL)
                else:
                    c.send(signal.SIGCONT)
            return bool(caught)

        wait_until(killed_mid_scan, what="a map being written after another was done")
        assert c.wait() == -signal.SIGKILL
    half, done = caught[0]
    assert half.exists() and read_map_attrs(half) is None  # the half map does not pass for a map
    assert _done(out) == done and len(done) < len(ids)
    rows = {r["scan_id"] for r in _read_csv(out / "summary.csv")} if (out / "summary.csv").exists() else set()
    assert rows <= set(done)  # the table lists made maps only

    rc, text = run(args, tmp_path / "again.log")
    assert rc == 0, text[-3000:]
    assert "unfinished files of an interrupted run" in text
    assert f"score: {len(ids)} scans: {len(ids) - len(done)} scored, {len(done)} skipped" in text
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary map, no lock
    assert [(r["scan_id"], r["status"]) for r in _read_csv(out / "summary.csv")] == [(s, "ok") for s in ids]

    ref = tmp_path / "uninterrupted"
    score_folder(bundle, folder, ref, model_name="m", model_version="1", progress=False, log=lambda s: None)
    for sid in ids:
        got, mask, attrs = read_map_zarr(out / f"{sid}.zarr")
        want, want_mask, _ = read_map_zarr(ref / f"{sid}.zarr")
        assert attrs["complete"] is True and np.array_equal(mask, want_mask), sid
        np.testing.assert_array_equal(got, want, err_msg=sid)
