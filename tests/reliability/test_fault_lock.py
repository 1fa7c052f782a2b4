"""Two ``chemmap run`` processes on one workdir: a lock per stage folder.

The first holds the preprocess stage's lock (``fcntl.flock`` on ``workdir/.locks/``) and is
frozen (SIGSTOP) in the middle of it. The second finds the synth stage done, then waits for
the preprocess folder with one line naming the holder, and makes no progress meanwhile. The
first is then killed (SIGKILL): the kernel releases its lock, the second takes the folder
over, resumes what the first left, and ends with the dataset an uninterrupted run makes.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.reliability.faultkit import CI, Chemmap, complete, dataset_differences, sets


@pytest.mark.slow
def test_a_second_run_waits_for_the_stage_the_first_holds_and_takes_it_over_when_it_dies(
    tiny_dataset, tmp_path
):
    _, reference = tiny_dataset
    work = tmp_path / "w"
    args = ["run", CI, *sets(work), "--to", "preprocess", "--quiet"]
    with (
        Chemmap(args, tmp_path / "first.log") as first,
        Chemmap.later(args, tmp_path / "second.log") as second,
    ):
        first.wait_for(r"^preprocess: \d+ scans -> ")  # inside the stage, holding its lock
        first.send(signal.SIGSTOP)
        second.start()
        m = second.wait_for(
            rf"^preprocess: {re.escape(str(work))}/preprocess/\w+ is being made by another process: "
            rf"waiting for chemmap pid {first.pid} on \S+ since \S+ \(lock (\S+)\)$"
        )
        assert Path(m.group(1)).parent == work / ".locks"
        assert "synth: done already" in second.text()
        assert "preprocess: 12 scans" not in second.text()  # waiting, not writing
        first.send(signal.SIGKILL)
        first.send(signal.SIGCONT)
        assert first.wait() == -signal.SIGKILL
        assert second.wait() == 0, second.text()[-3000:]
    text = second.text()
    assert "preprocess: 12 scans -> " in text and "(resuming)" in text  # what the first left, taken over
    (stage,) = (work / "preprocess").glob("*/dataset.zarr")
    assert complete(stage.parent)
    assert dataset_differences(stage, reference.path / "dataset.zarr") == []
