"""Bad scans, as a user meets them: ``chemmap preprocess`` on a scanner folder with one broken scan.

Each test breaks the second of three scans (S01) on disk, runs the real CLI and expects exit
status 2, exactly one ``error:`` line naming the file and the field or value, no traceback,
and no stage folder marked complete. The scans accepted by design (no ``byte order``, any
letter case of ``interleave``, micrometres) are read and compared with what was written.
Scoring-time cases (bands the model does not expect) are in ``test_rel_scoring.py``.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from chemmap.io import open_scan
from chemmap.io.envi import create_envi
from tests.reliability.relkit import (
    CHEMMAP,
    WL,
    chemmap,
    edit_header,
    folder_config,
    no_complete_stage,
    one_error_line,
    scanner_folder,
)

pytestmark = pytest.mark.slow  # each test runs the CLI once (about 2 s on 2 idle cores)


@pytest.fixture
def folder(tmp_path: Path):
    """(scanner folder, config, S01's header, S01's binary) with three good scans."""
    root = scanner_folder(tmp_path / "scans")
    cap = root / "S01" / "capture"
    return root, folder_config(tmp_path, root), cap / "S01.hdr", cap / "S01.raw"


def _refused(cfg: Path, *needles: str) -> str:
    line = one_error_line(chemmap("preprocess", cfg, "-q"), *needles)
    no_complete_stage(cfg.parent / "runs")
    return line


def test_truncated_raw(folder):
    _, cfg, _, raw = folder
    with open(raw, "r+b") as fh:
        fh.truncate(10_000)
    _refused(
        cfg, f"{raw}: header says 24 lines x 20 samples x 16 bands of uint16 = 15360 bytes", "has 10000 bytes"
    )


@pytest.mark.parametrize(("field", "value"), [("lines", 30), ("samples", 19)])
def test_header_sizes_that_disagree_with_the_file(folder, field, value):
    _, cfg, hdr, raw = folder
    edit_header(hdr, **{field: value})
    _refused(cfg, f"{raw}: header says", "file has 15360 bytes")


def test_sizes_so_large_they_would_exhaust_memory_are_refused_from_the_file_size(folder):
    """2**40 lines x 2**24 samples x 16 bands of uint16 = 2**69 bytes, which NumPy's int64 wraps to
    0: an empty binary passed the size check and Dask's chunk list alone exhausted memory."""
    _, cfg, hdr, raw = folder
    edit_header(hdr, lines=2**40, samples=2**24)
    raw.write_bytes(b"")
    limit = 4 << 30  # address space: any attempt to allocate the claimed cube fails loudly, at once

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(
        [str(CHEMMAP), "preprocess", str(cfg), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=cap_memory,
    )
    one_error_line(proc, f"{raw}: header says 1099511627776 lines x 16777216 samples", "file has 0 bytes")
    no_complete_stage(cfg.parent / "runs")


@pytest.mark.parametrize(("code", "needle"), [(7, "is not an ENVI data type"), (6, "is complex (complex64)")])
def test_unknown_or_complex_data_type(folder, code, needle):
    _, cfg, hdr, _ = folder
    edit_header(hdr, data_type=code)
    _refused(cfg, f"{hdr}: 'data type' {code}", needle)


@pytest.mark.parametrize("field", ["lines", "samples", "bands"])
def test_zero_lines_samples_or_bands(folder, field):
    _, cfg, hdr, _ = folder
    edit_header(hdr, **{field: 0})
    _refused(cfg, f"{hdr}: '{field}' must be >= 1, got 0")


def _poked(tmp_path: Path, value: float) -> tuple[Path, Path]:
    """A float32 folder whose S01 has ``value`` in one pixel in the middle of the meat, every band."""
    root = scanner_folder(tmp_path / "scans", raw_dtype="float32")
    cube = np.memmap(root / "S01" / "capture" / "S01.raw", dtype="<f4", mode="r+", shape=(24, 16, 20))
    cube[12, :, 10] = value  # BIL: (lines, bands, samples)
    cube.flush()
    del cube
    return root, folder_config(tmp_path, root)


@pytest.mark.parametrize("value", [np.nan, -np.inf])
def test_nan_or_minus_inf_in_the_sample(tmp_path, value):
    root, cfg = _poked(tmp_path, value)
    hdr = root / "S01" / "capture" / "S01.hdr"
    _refused(cfg, f"{hdr}: 1 sample pixels are NaN or infinite", "line 12, sample 10")


def test_plus_inf_counts_are_saturated(tmp_path):
    """Accepted by design: +inf is above any ceiling, so the pixel is flagged saturated and left out
    of the mask (as glare is), and counted in the scan's bad pixels; the rest of the scan is used."""
    import zarr

    _, cfg = _poked(tmp_path, np.inf)
    proc = chemmap("preprocess", cfg, "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = zarr.open_group(proc.stdout.strip().splitlines()[-1], mode="r")
    assert not store["scans/S01/mask"][12, 10]
    assert store["scans/S01"].attrs["bad_pixels_in_mask"] == 1
    assert store["scans/S00"].attrs["bad_pixels_in_mask"] == 0


def test_a_symlink_leading_outside_the_input_root(folder, tmp_path):
    root, cfg, _, _ = folder
    elsewhere = shutil.move(root / "S01", tmp_path / "elsewhere")
    (root / "S01").symlink_to(elsewhere, target_is_directory=True)
    line = _refused(
        cfg, f"{root / 'S01' / 'capture' / 'S01.hdr'}: a link that leads outside the input folder"
    )
    assert str(Path(elsewhere).resolve() / "capture" / "S01.hdr") in line


def test_a_link_inside_the_input_root_is_read(folder):
    """The other side of the rule: a link that stays in the folder is an ordinary scan."""
    root, _, _, _ = folder
    from chemmap.io import discover_scans

    shutil.move(root / "S01", root / "archive")
    (root / "S01").symlink_to(root / "archive", target_is_directory=True)
    scans = {f.scan_id: f for f in discover_scans(root)}
    assert scans["S01"].refused == "" and open_scan(scans["S01"].raw).shape == (16, 24, 20)


def test_the_score_stages_own_links_are_read_only_where_it_allows_them(folder, tmp_path):
    """``chemmap run``'s score stage scores the test split through a folder of links to the scanner
    folder's files: accepted around that stage only (links_may_lead_into), refused elsewhere."""
    from chemmap.io import discover_scans
    from chemmap.io.envi import find_data_file
    from chemmap.io.layout import links_may_lead_into
    from chemmap.pipeline import ScoreInput, _link_scans

    root, _, hdr, _ = folder
    headers = [hdr, hdr.with_name("WHITEREF_S01.hdr"), hdr.with_name("DARKREF_S01.hdr")]
    paths = headers + [find_data_file(h) for h in headers]
    links = _link_scans(ScoreInput("test split", root, paths, {"S01": "P01"}, "key"), tmp_path / "links")
    assert [f.refused.split(":")[0] for f in discover_scans(links)] == [
        str(links / "S01" / "capture" / "S01.hdr")
    ]
    with links_may_lead_into(root):
        assert [(f.scan_id, f.refused) for f in discover_scans(links)] == [("S01", "")]
    assert discover_scans(links)[0].refused  # the allowance ends with its block


# --------------------------------------------------------------------------- accepted by design


def _written(tmp_path: Path, **kw) -> tuple[Path, np.ndarray]:
    """A BIL float32 scan with random values; the header and the values as (bands, lines, samples)."""
    hdr = tmp_path / "s.hdr"
    mm = create_envi(hdr, bands=WL.size, lines=5, samples=4, dtype="float32", wavelengths=WL, **kw)
    mm[...] = np.random.default_rng(0).normal(size=mm.shape)
    mm.flush()
    return hdr, np.asarray(mm).transpose(1, 0, 2)


def test_a_header_without_byte_order_is_read_as_little_endian(tmp_path):
    hdr, values = _written(tmp_path, byte_order=0)
    edit_header(hdr, byte_order=None)
    assert "byte order" not in hdr.read_text()
    scan = open_scan(hdr)
    assert scan.byte_order == 0
    np.testing.assert_array_equal(scan.data.compute(), values)


@pytest.mark.parametrize("spelling", ["BIL", "Bil", "bIl"])
def test_interleave_in_any_letter_case(tmp_path, spelling):
    hdr, values = _written(tmp_path, interleave="bil")
    edit_header(hdr, interleave=spelling)
    scan = open_scan(hdr)
    assert scan.interleave == "bil"
    np.testing.assert_array_equal(scan.data.compute(), values)


def test_wavelengths_in_micrometres_are_converted_to_nm(tmp_path):
    hdr, _ = _written(tmp_path)
    edit_header(
        hdr, wavelength_units="Micrometers", wavelength="{ " + ", ".join(f"{w / 1000:.6f}" for w in WL) + " }"
    )
    np.testing.assert_allclose(open_scan(hdr).wavelengths, WL, rtol=0, atol=1e-6)
