"""The real CLI, as a user runs it (subprocesses, tiny data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _chemmap(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chemmap.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_imports_nothing_heavy():
    res = _chemmap("--help")
    assert res.returncode == 0 and "preprocess" in res.stdout and "train" in res.stdout
    # Instant = none of the heavy libraries is imported to parse the command line.
    heavy = "('torch', 'ray', 'dask', 'zarr', 'mlflow', 'pandas')"
    probe = f"import sys, chemmap.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_config_error_is_one_line_with_exit_status_2(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(f"base: {ROOT / 'configs' / 'ci.yaml'}\npreprocess:\n  bin: zero\n")
    res = _chemmap("preprocess", str(bad))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "preprocess.bin" in lines[0] and "'zero'" in lines[0] and str(bad) in lines[0]


def test_synth_then_run_until_preprocess(tmp_path):
    res = _chemmap(
        "synth",
        str(tmp_path / "scans"),
        "--set",
        "synth.n_samples=6",
        "--set",
        "synth.lines=24",
        "--set",
        "synth.samples=20",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "scans" / "_SUCCESS.json").is_file() and (
        tmp_path / "scans" / "references.csv"
    ).is_file()
    sets = [
        f"workdir={tmp_path / 'runs'}",
        "data.source=folder",
        f"data.root={tmp_path / 'scans'}",
        "preprocess.mask.min_size=8",
    ]
    args = [a for s in sets for a in ("--set", s)]
    res = _chemmap("run", str(ROOT / "configs" / "ci.yaml"), *args, "--until", "preprocess", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "preprocess:" in res.stdout
    marker = next((tmp_path / "runs" / "preprocess").glob("*/_COMPLETE.json"))
    again = _chemmap("run", str(ROOT / "configs" / "ci.yaml"), *args, "--until", "preprocess", "--quiet")
    assert again.returncode == 0 and "done already" in again.stdout
    assert (
        marker.stat().st_mtime_ns
        == next((tmp_path / "runs" / "preprocess").glob("*/_COMPLETE.json")).stat().st_mtime_ns
    )


def test_score_with_an_unreachable_tracking_server_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "scans").mkdir()
    res = _chemmap(
        "score",
        str(tmp_path / "scans"),
        "--model",
        "models:/pork_belly@champion",
        "--tracking-uri",
        "http://127.0.0.1:9",
        "--output",
        str(tmp_path / "maps"),
    )
    assert res.returncode == 2 and "cannot reach MLflow server" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "maps").exists()
