"""Bad scans at scoring time: ``chemmap score`` gives each an error row and one log line, scores
the others, exits 1, and leaves no map or picture of a scan it refused.

One scoring run over a folder holding a good scan and one broken scan per case; each test
reads its case's row, line and files.
"""

from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest

from tests.reliability.relkit import WL, chemmap, random_bundle, write_scan_bands

pytestmark = pytest.mark.slow  # one scoring run for the module (about 5 s on 2 idle cores)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The folder, the run's output and what it printed, and summary.csv's rows by scan id."""
    tmp = tmp_path_factory.mktemp("scoring")
    root = tmp / "scans"
    write_scan_bands(root, "S00", WL)  # good: proves the model scores the scans it should
    write_scan_bands(root, "S01", WL[:14])  # two bands fewer
    write_scan_bands(root, "S02", WL + 3.0)  # every band 3 nm off; the tolerance is 1 nm
    write_scan_bands(root, "S03", WL, dtype="float32", value_at=(12, 10, np.nan))
    write_scan_bands(tmp / "outside", "S04", WL)
    (root / "S04").symlink_to(tmp / "outside" / "S04", target_is_directory=True)
    write_scan_bands(root, "S\\05", WL)  # an id with a separator ('\\' is one on Windows and in Zarr)
    write_scan_bands(root, "S..06", WL)
    bundle = random_bundle(tmp / "model")
    out = tmp / "maps"
    proc = chemmap("score", root, "--model", bundle, "--output", out, "-q")
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["scan_id"]: r for r in csv.DictReader(fh)}
    return SimpleNamespace(root=root, out=out, proc=proc, rows=rows, text=proc.stdout + proc.stderr)


def _failed(scored, scan_id: str, *needles: str) -> str:
    """The scan's error row: its one log line, the row's error naming ``needles``, no map, no picture."""
    assert scored.proc.returncode == 1, scored.text[-3000:]
    assert "Traceback" not in scored.text, scored.text[-3000:]
    row = scored.rows[scan_id]
    assert row["status"] == "error", row
    lines = [line for line in scored.text.splitlines() if line.startswith(f"score: {scan_id} failed: ")]
    assert len(lines) == 1, scored.text[-3000:]
    for needle in needles:
        assert needle in row["error"], (needle, row["error"])
    leftovers = [p.name for p in scored.out.iterdir() if p.name.startswith((scan_id, f".{scan_id}"))]
    assert not leftovers, leftovers
    return row["error"]


def test_the_good_scan_is_scored(scored):
    assert scored.rows["S00"]["status"] == "ok", scored.rows["S00"]
    assert (scored.out / "S00.zarr").is_dir() and (scored.out / "S00.png").is_file()
    assert "score: 7 scans: 1 scored, 0 skipped (done before), 6 failed" in scored.text


def test_a_band_count_the_model_does_not_expect(scored):
    hdr = scored.root / "S01" / "capture" / "S01.hdr"
    _failed(scored, "S01", f"{hdr}: 14 bands 700.00-960.00 nm, the model expects 16 bands 700.00-1000.00 nm")


def test_wavelengths_the_model_does_not_expect(scored):
    hdr = scored.root / "S02" / "capture" / "S02.hdr"
    _failed(
        scored, "S02", f"{hdr}: wavelengths differ from the model's by up to 3.00 nm", "tolerance is 1 nm"
    )


def test_nan_in_a_scan_at_scoring(scored):
    hdr = scored.root / "S03" / "capture" / "S03.hdr"
    _failed(scored, "S03", f"{hdr}: 1 sample pixels are NaN or infinite", "line 12, sample 10")


def test_a_symlink_leading_outside_the_input_folder_at_scoring(scored):
    link = scored.root / "S04" / "capture" / "S04.hdr"
    _failed(scored, "S04", f"{link}: a link that leads outside the input folder {scored.root}")


@pytest.mark.parametrize(("scan_id", "needle"), [("S\\05", "path separator"), ("S..06", "contains '..'")])
def test_scan_ids_that_would_escape_the_output_folder(scored, scan_id, needle):
    _failed(scored, scan_id, f"scan id {scan_id!r}", needle)
    assert sorted(p.name for p in scored.out.parent.iterdir()) == [
        "maps",
        "model",
        "model-training",
        "outside",
        "scans",
    ]
