"""Preprocessing killed (SIGKILL) mid-write and started again: the store ends complete and equal
to an uninterrupted run's.

``chemmap preprocess`` on the tiny preset's synthetic scans is killed while one scan is
written and others are done (checked with the process stopped, so no race). The restart
keeps the finished scans (their files untouched) and rebuilds from the first unfinished one;
the finished store equals the session's uninterrupted dataset, array by array.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.reliability.faultkit import CI, Chemmap, complete, dataset_differences, run, sets, wait_until


def _scan_state(work: Path) -> tuple[list[str], list[str]]:
    """``(finished scans, scans being written)`` of the store under ``work``."""
    done, writing = [], []
    for group in work.glob("preprocess/*/dataset.zarr/scans/*/"):
        try:
            attrs = json.loads((group / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            attrs = {}
        (done if attrs.get("complete") else writing).append(group.name)
    return sorted(done), sorted(writing)


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_preprocess_killed_mid_write_resumes_to_the_uninterrupted_store(tiny_dataset, tmp_path):
    sets_, reference = tiny_dataset
    work = tmp_path / "w"
    work.mkdir()
    (work / "synth").symlink_to(Path(sets_[0].split("=", 1)[1]) / "synth")  # the same raw scans
    args = ["preprocess", CI, *sets(work), "--quiet"]
    with Chemmap(args, tmp_path / "killed.log") as c:
        caught: list[tuple[list[str], list[str]]] = []

        def killed_mid_write() -> bool:
            done, writing = _scan_state(work)
            if done and writing:
                c.send(signal.SIGSTOP)
                os.waitpid(c.pid, os.WUNTRACED)
                done, writing = _scan_state(work)
                if done and writing:
                    caught.append((done, writing))
                    c.send(signal.SIGKILL)
                else:
                    c.send(signal.SIGCONT)
            return bool(caught)

        wait_until(killed_mid_write, what="a scan being written after another was finished")
        assert c.wait() == -signal.SIGKILL
    done, writing = caught[0]
    (stage,) = (work / "preprocess").glob("*/dataset.zarr")
    stage = stage.parent
    assert stage.name == reference.key and not complete(stage)
    assert not (work / "preprocess" / "index.json").exists()  # training cannot find a half dataset
    before = {sid: _files(stage / "dataset.zarr" / "scans" / sid) for sid in done}

    rc, text = run(args, tmp_path / "again.log")
    assert rc == 0, text[-3000:]
    assert "(resuming)" in text
    assert complete(stage)
    for sid in done:  # finished scans were kept, not written again
        assert _files(stage / "dataset.zarr" / "scans" / sid) == before[sid], sid
    assert dataset_differences(stage / "dataset.zarr", reference.path / "dataset.zarr") == []
    partial = sorted(str(p.relative_to(stage)) for p in stage.rglob("*.partial"))
    print(
        f"\nkilled with {len(done)} scans done and {writing} being written; zarr temp files left: {partial}"
    )
