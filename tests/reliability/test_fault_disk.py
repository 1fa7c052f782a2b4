"""The output disk full: one line naming the path, a non-zero exit, nothing left looking complete,
and a run after space is freed resumes.

``chemmap preprocess`` writes the dataset into ``workdir/preprocess``, which is made small:

- ``tmpfs``: a 1 MiB tmpfs mounted there, so writes fail with ENOSPC ("No space left on
  device"), as on a full disk. Needs root (``mount``); skipped otherwise.
- ``file_size_limit``: ``RLIMIT_FSIZE`` (``ulimit -f``) of 32 KiB on the process, so the first
  larger file fails with EFBIG ("File too large"; Python ignores SIGXFSZ). Runs anywhere.
"""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

import pytest

from tests.reliability.faultkit import CI, dataset_differences, run, sets

LIMIT = 32 * 1024


def _mount(path: Path, *options: str) -> bool:
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True
    )
    return res.returncode == 0


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tmpfs", "file_size_limit"])
def test_a_full_disk_is_one_line_naming_the_path_and_nothing_looks_complete(how, tiny_dataset, tmp_path):
    sets_, reference = tiny_dataset
    work = tmp_path / "w"
    out = work / "preprocess"
    out.mkdir(parents=True)
    (work / "synth").symlink_to(Path(sets_[0].split("=", 1)[1]) / "synth")  # the raw scans, elsewhere
    args = ["preprocess", CI, *sets(work), "--quiet"]
    if how == "tmpfs":
        if not _mount(out, "size=1m"):
            pytest.skip("cannot mount a tmpfs here (needs root)")
        preexec, error = None, "No space left on device"
    else:
        preexec, error = _limit_file_size, "File too large"
    try:
        rc, text = run(args, tmp_path / "full.log", preexec_fn=preexec)
        lines = text.strip().splitlines()
        assert rc == 2 and "Traceback" not in text, text[-3000:]
        assert lines[-1].startswith(f"error: {out}/") and f": {error} while writing {out}/" in lines[-1]
        assert "free space and run again to resume" in lines[-1]
        assert not list(out.rglob("_COMPLETE.json")) and not (out / "index.json").exists()
        if how == "tmpfs":  # space again
            assert subprocess.run(["mount", "-o", "remount,size=64m", str(out)]).returncode == 0
        rc, again = run(args, tmp_path / "again.log")
        assert rc == 0, again[-3000:]
        (stage,) = out.glob("*/_COMPLETE.json")
        assert dataset_differences(stage.parent / "dataset.zarr", reference.path / "dataset.zarr") == []
        print(f"\n{how}: {lines[-1]}")
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", "-l", str(out)], capture_output=True)
