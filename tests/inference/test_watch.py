"""Watching a scanner's folder: scans written slowly are scored once, whole; the loop stops cleanly.

Real files written in pieces while a real watcher polls (in a thread, and in a subprocess
that gets a real SIGTERM). The model is the seeded random bundle of ``test_score.py``; the
scans are the tiny synthetic dataset's raw scans.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from chemmap.errors import InputError
from chemmap.inference.score import read_map_zarr, score_folder
from chemmap.inference.score_output import read_map_attrs
from chemmap.inference.watch import check_ready, watch_folder
from chemmap.io import ScanFiles, create_envi
from chemmap.preprocess.store import Dataset
from tests.inference.test_score import MODEL, ROOT, _random_bundle, _read_csv

QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def setup(tiny_dataset, tmp_path_factory):
    """(dataset, bundle, the dataset's raw scan folder, a work folder)."""
    _, pre = tiny_dataset
    data = Dataset(pre.path / "dataset.zarr")
    work = tmp_path_factory.mktemp("watch")
    scans_root = Path(data.scan_table[0]["raw"]).parents[2]  # <root>/<id>/capture/<id>.hdr
    return data, _random_bundle(work, data), scans_root, work


def _link_scans(scans_root: Path, ids: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for sid in ids:
        shutil.copytree(
            scans_root / sid, folder / sid, copy_function=os.link
        )  # hard links: inside the folder
    return folder


def _complete_maps(out: Path) -> list[str]:
    return sorted(p.name[: -len(".zarr")] for p in out.glob("*.zarr") if not p.name.startswith("."))


def _wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# A scan written in pieces
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_scan_written_in_pieces_is_scored_once_when_whole(setup, tmp_path):
    data, bundle, scans_root, _ = setup
    src_id = sorted(data.scan_ids)[0]
    src = scans_root / src_id / "capture"
    ref_folder = _link_scans(scans_root, [src_id], tmp_path / "ref")
    reference = score_folder(bundle, ref_folder, tmp_path / "ref_out", **MODEL, progress=False, **QUIET)
    assert reference.ok == 1  # the map the watched copy must give
    folder, out = tmp_path / "scans", tmp_path / "out"
    dest = folder / "slow" / "capture"
    dest.mkdir(parents=True)
    for prefix in ("WHITEREF_", "DARKREF_"):  # the references first, then the scan's header
        for ext in ("hdr", "raw"):
            shutil.copyfile(src / f"{prefix}{src_id}.{ext}", dest / f"{prefix}slow.{ext}")
    shutil.copyfile(src / f"{src_id}.hdr", dest / "slow.hdr")
    raw = (src / f"{src_id}.raw").read_bytes()
    lines: list[str] = []
    stop = threading.Event()
    result = {}

    def watch() -> None:
        result["summary"] = watch_folder(
            bundle, folder, out, **MODEL, poll_seconds=0.2, settle_seconds=1.0, stop=stop, log=lines.append
        )

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # Four pieces; the pause after the second is longer than the settle time: settled, not whole.
        cuts = np.linspace(0, len(raw), 5).astype(int)
        for piece, pause in enumerate((0.5, 1.8, 0.5, 0.0)):
            with open(dest / "slow.raw", "ab") as fh:
                fh.write(raw[cuts[piece] : cuts[piece + 1]])
            time.sleep(pause)
            assert not (out / "slow.zarr").exists(), f"scored after piece {piece + 1} of 4"
        _wait_for(lambda: read_map_attrs(out / "slow.zarr") is not None)
        time.sleep(1.0)  # a few more polls: the scan is not scored again
    finally:
        stop.set()
        watcher.join(60)
    summary = result["summary"]
    assert (summary.ok, summary.skipped, summary.errors, summary.busy) == (1, 0, 0, 0)
    assert summary.scored == ("slow",)
    waiting = [line for line in lines if line.startswith("score: waiting for slow")]
    assert waiting and all("bytes" in w for w in waiting)  # settled in the long pause, not whole
    maps, mask, attrs = read_map_zarr(out / "slow.zarr")
    assert attrs["input_files"]["slow/capture/slow.raw"][0] == len(raw)  # made from the whole file
    want_maps, want_mask, _ = read_map_zarr(tmp_path / "ref_out" / f"{src_id}.zarr")
    assert np.array_equal(maps, want_maps, equal_nan=True) and np.array_equal(mask, want_mask)
    assert [(r["scan_id"], r["status"]) for r in _read_csv(out / "summary.csv")] == [("slow", "ok")]
    assert "stopping (asked to)" in lines[-2] and "1 scored" in lines[-1]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def _copy_scan(src: Path, src_id: str, dest_root: Path, new_id: str, *, raw: bool = True) -> Path:
    """A scan's header and references copied under a new id (and its raw data file, if ``raw``)."""
    dest = dest_root / new_id / "capture"
    dest.mkdir(parents=True)
    for prefix in ("WHITEREF_", "DARKREF_"):
        for ext in ("hdr", "raw"):
            shutil.copyfile(src / f"{prefix}{src_id}.{ext}", dest / f"{prefix}{new_id}.{ext}")
    shutil.copyfile(src / f"{src_id}.hdr", dest / f"{new_id}.hdr")
    if raw:
        shutil.copyfile(src / f"{src_id}.raw", dest / f"{new_id}.raw")
    return dest


def _rows(out: Path) -> dict[str, dict[str, str]]:
    """``summary.csv`` by scan id ({} before its first write)."""
    table = out / "summary.csv"
    return {r["scan_id"]: r for r in _read_csv(table)} if table.is_file() else {}


@pytest.mark.slow
def test_a_scan_that_never_becomes_readable_gets_an_error_row_and_one_completed_later_is_scored(
    setup, tmp_path
):
    """Three scans written while the watcher runs: a header that never parses, a scan written
    slowly (pauses longer than the settle time, shorter than the give-up time) and a truncated
    scan left alone past the give-up time, then completed."""
    data, bundle, scans_root, _ = setup
    src_id = sorted(data.scan_ids)[0]
    src = scans_root / src_id / "capture"
    raw = (src / f"{src_id}.raw").read_bytes()
    folder, out = tmp_path / "scans", tmp_path / "out"
    folder.mkdir()
    settle, give_up = 0.3, 2.0
    lines: list[str] = []
    stop = threading.Event()
    result = {}

    def watch() -> None:
        result["summary"] = watch_folder(
            bundle,
            folder,
            out,
            **MODEL,
            poll_seconds=0.1,
            settle_seconds=settle,
            give_up_seconds=give_up,
            stop=stop,
            log=lines.append,
        )

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        broken = _copy_scan(src, src_id, folder, "broken")
        (broken / "broken.hdr").write_text("not an ENVI header\n")  # never fixed
        truncated = _copy_scan(src, src_id, folder, "truncated", raw=False)
        (truncated / "truncated.raw").write_bytes(raw[: len(raw) // 3])
        t_truncated = time.monotonic()  # its files are not touched again until given up on
        slow = _copy_scan(src, src_id, folder, "slow", raw=False)
        cuts = np.linspace(0, len(raw), 4).astype(int)
        for piece in range(3):  # the pauses: settled (waiting lines), never given up on
            with open(slow / "slow.raw", "ab") as fh:
                fh.write(raw[cuts[piece] : cuts[piece + 1]])
            time.sleep(0.8 if piece < 2 else 0.0)
        _wait_for(lambda: _rows(out).get("truncated", {}).get("status") == "error")
        waited = time.monotonic() - t_truncated
        assert waited >= give_up - 0.1, f"given up on after {waited:.2f} s"  # not before its time
        rows = _rows(out)
        assert rows["broken"]["status"] == "error"
        given_up = rows["truncated"]["error"]
        assert "gave up" in given_up and f"give-up time {give_up:g} s" in given_up
        assert str(truncated / "truncated.raw") in given_up and "bytes" in given_up  # the file and why
        error = rows["broken"]["error"]
        assert str(broken / "broken.hdr") in error and "not an ENVI header" in error
        with open(truncated / "truncated.raw", "ab") as fh:  # the rest arrives after all
            fh.write(raw[len(raw) // 3 :])
        _wait_for(lambda: _rows(out).get("truncated", {}).get("status") == "ok")
        time.sleep(give_up + 0.5)  # more polls: nothing is given up on or scored again
    finally:
        stop.set()
        watcher.join(60)
    summary = result["summary"]
    assert (summary.ok, summary.errors, summary.busy) == (2, 1, 0)
    assert summary.failed == ("broken",) and summary.scored == ("slow", "truncated")
    rows = _rows(out)
    assert {sid: r["status"] for sid, r in rows.items()} == {
        "broken": "error",
        "slow": "ok",
        "truncated": "ok",
    }
    assert [line for line in lines if "failed" in line and "gave up" in line] == [
        f"score: broken failed: {rows['broken']['error']}",
        f"score: truncated failed: {given_up}",
    ]  # one line each: a scan given up on is not given up on again while its files stay
    assert any(line.startswith("score: waiting for slow") for line in lines)
    assert not any("slow failed" in line for line in lines)
    for sid in ("slow", "truncated"):
        _, _, attrs = read_map_zarr(out / f"{sid}.zarr")
        assert attrs["input_files"][f"{sid}/capture/{sid}.raw"][0] == len(raw)  # the whole file


def test_the_give_up_time_must_cover_the_settle_time(setup, tmp_path):
    _, bundle, _, _ = setup
    with pytest.raises(InputError, match=r"give_up_seconds must be >= settle_seconds \(5 s\).*got 1"):
        watch_folder(bundle, tmp_path, tmp_path / "out", **MODEL, settle_seconds=5, give_up_seconds=1)


def test_ready_means_headers_parse_and_data_files_are_whole(tmp_path):
    def scan(name: str, prefix: str = "") -> Path:
        hdr = tmp_path / f"{prefix}{name}.hdr"
        create_envi(hdr, bands=3, lines=4, samples=5, dtype=np.uint16, wavelengths=[900.0, 910.0, 920.0])
        return hdr

    raw, white, dark = scan("s"), scan("s", "WHITEREF_"), scan("s", "DARKREF_")
    files = ScanFiles("s", raw, white, dark, str(white), str(dark))
    key = check_ready(files, tmp_path, calibrated=True)
    assert sorted(key) == sorted(f"{p}s.{e}" for p in ("", "WHITEREF_", "DARKREF_") for e in ("hdr", "raw"))
    os.truncate(tmp_path / "s.raw", 100)  # a data file still being written
    with pytest.raises(InputError, match=r"s\.raw: header says 4 lines .* file has 100 bytes"):
        check_ready(files, tmp_path, calibrated=True)
    os.truncate(tmp_path / "s.raw", 3 * 4 * 5 * 2)
    no_dark = ScanFiles("s", raw, white, None, str(white), str(tmp_path / "DARKREF_s.hdr"))
    with pytest.raises(InputError, match="no dark reference yet"):
        check_ready(no_dark, tmp_path, calibrated=True)
    assert check_ready(no_dark, tmp_path, calibrated=False)  # calibration none: no references needed
    (tmp_path / "s.raw").unlink()
    with pytest.raises(InputError, match="no data file beside the header"):
        check_ready(files, tmp_path, calibrated=True)


# ---------------------------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stop_callable_ends_the_watch_and_the_signal_handlers_come_back(setup, tmp_path):
    data, bundle, scans_root, _ = setup
    ids = sorted(data.scan_ids)[:2]
    folder, out = _link_scans(scans_root, ids, tmp_path / "scans"), tmp_path / "out"
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    during = []

    def stop() -> bool:  # called by the loop between scans and while it waits
        during.append(signal.getsignal(signal.SIGTERM))
        return len(_complete_maps(out)) == len(ids)

    summary = watch_folder(
        bundle, folder, out, **MODEL, poll_seconds=0.1, settle_seconds=0, stop=stop, **QUIET
    )
    assert summary.ok == len(ids) and _complete_maps(out) == ids
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert during and all(h is not before[1] for h in during)  # its own handler while it ran
    with pytest.raises(InputError, match="poll_seconds must be > 0 s, got 0"):
        watch_folder(bundle, folder, out, **MODEL, poll_seconds=0, stop=stop)
    with pytest.raises(InputError, match="input folder not found"):
        watch_folder(bundle, tmp_path / "nowhere", out, **MODEL, stop=stop)


_WATCH_SCRIPT = """
import sys
from chemmap.inference.bundle import read_bundle
from chemmap.inference.watch import watch_folder
s = watch_folder(read_bundle(sys.argv[1]), sys.argv[2], sys.argv[3], model_name="m", model_version="1",
                 poll_seconds=0.1, settle_seconds=0, log=lambda line: print(line, flush=True))
print("scored:", ",".join(s.scored), flush=True)
"""


def _writing(out: Path) -> list[str]:
    """The scans whose map is being written (temporary folders), once at least one map is done."""
    if not out.is_dir() or not _complete_maps(out):
        return []
    return [p.name[1:].split(".zarr.")[0] for p in out.glob(".*.zarr.*.tmp")]


@pytest.mark.slow
def test_sigterm_stops_a_watching_process_after_the_scan_in_progress(setup, tmp_path):
    data, bundle, scans_root, _ = setup
    ids = sorted(data.scan_ids)
    folder, out = _link_scans(scans_root, ids, tmp_path / "scans"), tmp_path / "out"
    cmd = [sys.executable, "-c", _WATCH_SCRIPT, str(bundle.path), str(folder), str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    in_progress, done = "", []
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not in_progress:
            if _writing(out):  # stopped while a map is half written: SIGTERM then arrives mid-scan
                proc.send_signal(signal.SIGSTOP)
                os.waitpid(proc.pid, os.WUNTRACED)
                if writing := _writing(out):
                    in_progress, done = writing[0], _complete_maps(out)
                    proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.002)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert in_progress, f"no scan was caught mid-write: {stderr[-2000:]}"
    assert proc.returncode == 0, stderr[-2000:]
    assert "score: stopping (SIGTERM)" in stdout
    # The scan in progress was finished, no other was started, nothing half written is left.
    assert in_progress not in done and _complete_maps(out) == sorted([*done, in_progress])
    assert len(done) + 1 < len(ids)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    scored = stdout.split("scored: ")[-1].strip().split(",")
    assert sorted(scored) == _complete_maps(out)
    rows = _read_csv(out / "summary.csv")
    assert [(r["scan_id"], r["status"]) for r in rows] == [(s, "ok") for s in _complete_maps(out)]
