"""open_scan reads every interleave x data type x byte order x header offset exactly as spectral does."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import spectral

from chemmap.errors import InputError
from chemmap.io import Scan, open_scan
from chemmap.io.envi import create_envi, file_shape, write_header

BANDS, LINES, SAMPLES = 7, 11, 5
DTYPES = ["uint8", "int16", "int32", "float32", "float64", "uint16", "uint32", "int64", "uint64"]
WAVELENGTHS = np.linspace(900.0, 1700.0, BANDS)


def _random_values(dtype: np.dtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype.kind == "f":
        return rng.normal(0.0, 1e3, size=shape).astype(dtype)
    info = np.iinfo(dtype)
    # The full range: sign bits and high bytes are where byte order and signedness go wrong.
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def _write(
    hdr: Path,
    *,
    dtype: str = "uint16",
    interleave: str = "bil",
    byte_order: int = 0,
    header_offset: int = 0,
    seed: int = 0,
    **kwargs,
) -> np.ndarray:
    """Write a scan with random values; return it as ``(bands, lines, samples)``."""
    dt = np.dtype(dtype)
    mm = create_envi(
        hdr,
        bands=kwargs.pop("bands", BANDS),
        lines=kwargs.pop("lines", LINES),
        samples=kwargs.pop("samples", SAMPLES),
        dtype=dt,
        interleave=interleave,
        byte_order=byte_order,
        header_offset=header_offset,
        **kwargs,
    )
    mm[...] = _random_values(dt, mm.shape, np.random.default_rng(seed))
    mm.flush()
    arr = np.array(mm)
    del mm
    if interleave == "bil":
        return arr.transpose(1, 0, 2)
    if interleave == "bip":
        return arr.transpose(2, 0, 1)
    return arr


def _spectral_cube(hdr: Path) -> np.ndarray:
    """spectral's reading, as ``(bands, lines, samples)``."""
    img = spectral.envi.open(str(hdr), str(hdr.with_suffix(".raw")))
    return np.asarray(img.open_memmap()).transpose(2, 0, 1)


def _edit_header(hdr: Path, **changes: str | None) -> None:
    """Replace (value) or drop (None) header fields; keys use '_' for spaces."""
    changes = {k.replace("_", " "): v for k, v in changes.items()}
    out = []
    for line in hdr.read_text().splitlines():
        key = line.partition("=")[0].strip().lower()
        if key in changes:
            if changes[key] is not None:
                out.append(f"{line.partition('=')[0].strip()} = {changes.pop(key)}")
            else:
                changes.pop(key)
            continue
        out.append(line)
    out += [f"{k} = {v}" for k, v in changes.items() if v is not None]
    hdr.write_text("\n".join(out) + "\n")


@pytest.mark.parametrize("header_offset", [0, 37])
@pytest.mark.parametrize("byte_order", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleave", ["bil", "bip", "bsq"])
def test_equals_spectral(tmp_path: Path, interleave: str, dtype: str, byte_order: int, header_offset: int):
    hdr = tmp_path / "scan.hdr"
    written = _write(
        hdr,
        dtype=dtype,
        interleave=interleave,
        byte_order=byte_order,
        header_offset=header_offset,
        wavelengths=WAVELENGTHS,
    )
    scan = open_scan(hdr, chunk_lines=4)  # several blocks, the last one short
    got = scan.data.compute()
    expected = _spectral_cube(hdr)

    assert got.shape == (BANDS, LINES, SAMPLES) == scan.shape
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    assert scan.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, written)
    assert scan.interleave == interleave
    assert scan.byte_order == byte_order and scan.header_offset == header_offset
    assert scan.data.chunks[1] == (4, 4, 3)
    # The header holds the band centres with 3 decimals.
    np.testing.assert_array_equal(scan.wavelengths, [float(f"{w:.3f}") for w in WAVELENGTHS])


def test_blocks_slice_lazily_and_pickle(tmp_path: Path):
    hdr = tmp_path / "scan.hdr"
    written = _write(hdr, dtype="uint16", interleave="bil", byte_order=1, header_offset=5)
    scan = open_scan(hdr, chunk_lines=3)
    assert scan.data.numblocks == (1, 4, 1)
    np.testing.assert_array_equal(scan.data[2:5, 4:9, 1:4].compute(), written[2:5, 4:9, 1:4])
    # Blocks travel to other processes as a file name, not as the mapped bytes.
    blob = pickle.dumps(scan.data)
    assert len(blob) < 10_000
    np.testing.assert_array_equal(pickle.loads(blob).compute(), written)
    # Opening the same unchanged file twice gives the same graph keys.
    assert open_scan(hdr, chunk_lines=3).data.name == scan.data.name


def test_default_chunks_split_big_scans(tmp_path: Path):
    hdr = tmp_path / "scan.hdr"
    create_envi(hdr, bands=256, lines=300, samples=256, dtype="uint16", interleave="bil")
    scan = open_scan(hdr)
    bytes_per_line = 256 * 256 * 2
    assert max(scan.data.chunks[1]) * bytes_per_line <= 32 * 2**20
    assert len(scan.data.chunks[1]) > 1
    assert scan.data.chunks[0] == (256,) and scan.data.chunks[2] == (256,)


@pytest.mark.parametrize("spelling", ["Bil", "BiL", "bIp", "Bsq", "BSQ", " bil "])
def test_interleave_in_any_case(tmp_path: Path, spelling: str):
    interleave = spelling.strip().lower()
    hdr = tmp_path / "scan.hdr"
    written = _write(hdr, interleave=interleave, dtype="int16")
    _edit_header(hdr, interleave=spelling)
    scan = open_scan(hdr)
    assert scan.interleave == interleave and scan.header["interleave"] == interleave
    np.testing.assert_array_equal(scan.data.compute(), written)


def test_spectral_alone_misreads_mixed_case_bil(tmp_path: Path):
    """The trap we guard against: spectral takes 'Bil' for BSQ."""
    hdr = tmp_path / "scan.hdr"
    written = _write(hdr, interleave="bil", dtype="uint16")
    _edit_header(hdr, interleave="Bil")
    assert not np.array_equal(_spectral_cube(hdr), written)
    np.testing.assert_array_equal(open_scan(hdr).data.compute(), written)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_missing_byte_order_is_little_endian(tmp_path: Path, dtype: str):
    hdr = tmp_path / "scan.hdr"
    written = _write(hdr, dtype=dtype, byte_order=0, interleave="bip")
    _edit_header(hdr, byte_order=None)
    assert "byte order" not in hdr.read_text()
    scan = open_scan(hdr)
    assert scan.byte_order == 0 and scan.header["byte order"] == "0"
    np.testing.assert_array_equal(scan.data.compute(), written)


def test_mixed_case_keys_and_no_wavelengths(tmp_path: Path):
    hdr = tmp_path / "scan.hdr"
    written = _write(hdr, interleave="bsq", dtype="uint8")
    text = hdr.read_text().replace("interleave", "Interleave").replace("data type", "Data Type")
    hdr.write_text(text)
    scan = open_scan(hdr)
    assert scan.wavelengths is None
    np.testing.assert_array_equal(scan.data.compute(), written)


@pytest.mark.parametrize("suffix", [".img", ".dat", ".bin", "", ".RAW"])
def test_finds_binary_beside_header(tmp_path: Path, suffix: str):
    hdr = tmp_path / "scan.hdr"
    written = _write(hdr, raw_suffix=".raw")
    target = tmp_path / ("scan" + suffix)
    (tmp_path / "scan.raw").rename(target)
    scan = open_scan(hdr)
    assert scan.data_path == target
    np.testing.assert_array_equal(scan.data.compute(), written)


def test_header_fields_exposed(tmp_path: Path):
    hdr = tmp_path / "scan.hdr"
    _write(hdr, extra={"reflectance scale factor": 10000, "ceiling": 4095})
    scan = open_scan(hdr)
    assert isinstance(scan, Scan)
    assert scan.scale_factor == 10000.0 and scan.ceiling == 4095.0
    assert (scan.bands, scan.lines, scan.samples) == (BANDS, LINES, SAMPLES)
    assert "7 bands" in repr(scan)
    plain = tmp_path / "plain.hdr"
    _write(plain)
    assert open_scan(plain).scale_factor is None and open_scan(plain).ceiling is None


def test_raw_values_not_scaled(tmp_path: Path):
    hdr = tmp_path / "scan.hdr"
    written = _write(hdr, dtype="uint16", extra={"reflectance scale factor": 10000})
    np.testing.assert_array_equal(open_scan(hdr).data.compute(), written)


@pytest.mark.parametrize(
    ("units", "values", "expected"),
    [
        ("Micrometers", [0.9, 1.0, 1.1], [900.0, 1000.0, 1100.0]),
        ("um", [0.9, 1.0, 1.1], [900.0, 1000.0, 1100.0]),
        ("Nanometers", [900, 1000, 1100], [900.0, 1000.0, 1100.0]),
        (None, [900, 1000, 1100], [900.0, 1000.0, 1100.0]),
        ("Unknown", [900, 1000, 1100], [900.0, 1000.0, 1100.0]),
    ],
)
def test_wavelength_units(tmp_path: Path, units: str | None, values: list[float], expected: list[float]):
    hdr = tmp_path / "scan.hdr"
    _write(hdr, bands=3)
    _edit_header(hdr, wavelength="{ " + ", ".join(str(v) for v in values) + " }", wavelength_units=units)
    wl = open_scan(hdr).wavelengths
    assert wl.dtype == np.float64
    np.testing.assert_allclose(wl, expected)


# --- bad input: one InputError naming the file --------------------------------------------------


def _raises(path: Path, *fragments: str) -> InputError:
    with pytest.raises(InputError) as info:
        open_scan(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert path.name in msg or path.with_suffix(".raw").name in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return info.value


@pytest.mark.parametrize("code", ["7", "8", "99", "0"])
def test_unknown_data_type(tmp_path: Path, code: str):
    hdr = tmp_path / "scan.hdr"
    _write(hdr)
    _edit_header(hdr, data_type=code)
    _raises(hdr, f"'data type' {code}", "not an ENVI data type")


@pytest.mark.parametrize("code", ["6", "9"])
def test_complex_refused(tmp_path: Path, code: str):
    hdr = tmp_path / "scan.hdr"
    _write(hdr, dtype="float64")  # 8 bytes per value: the size fits complex64
    _edit_header(hdr, data_type=code)
    _raises(hdr, "complex", "real-valued")


def test_truncated_binary(tmp_path: Path):
    hdr = tmp_path / "scan.hdr"
    _write(hdr, dtype="uint16", lines=30, samples=20, bands=8)
    raw = tmp_path / "scan.raw"
    with open(raw, "r+b") as fh:
        fh.truncate(9000)
    err = _raises(raw.with_suffix(".hdr"), "scan.raw")
    assert str(err).endswith(
        "header says 30 lines x 20 samples x 8 bands of uint16 = 9600 bytes after a 0-byte offset, "
        "file has 9000 bytes"
    )


def test_binary_too_long(tmp_path: Path):
    hdr = tmp_path / "scan.hdr"
    _write(hdr, header_offset=37)
    with open(tmp_path / "scan.raw", "ab") as fh:
        fh.write(b"\0" * 3)
    _raises(hdr, "after a 37-byte offset", "file has")


def test_offset_not_counted_is_caught(tmp_path: Path):
    hdr = tmp_path / "scan.hdr"
    _write(hdr, header_offset=37)
    _edit_header(hdr, header_offset="0")
    _raises(hdr, "file has")


def test_missing_binary(tmp_path: Path):
    hdr = tmp_path / "scan.hdr"
    _write(hdr)
    (tmp_path / "scan.raw").unlink()
    _raises(hdr, "no data file", "scan.raw")


def test_missing_header(tmp_path: Path):
    _raises(tmp_path / "nothing.hdr", "not found")


def test_not_an_envi_header(tmp_path: Path):
    hdr = tmp_path / "scan.hdr"
    hdr.write_text("samples = 3\n")
    _raises(hdr, "not an ENVI header")


@pytest.mark.parametrize("field", ["samples", "lines", "bands", "data type", "interleave"])
def test_missing_required_field(tmp_path: Path, field: str):
    hdr = tmp_path / "scan.hdr"
    _write(hdr)
    _edit_header(hdr, **{field.replace(" ", "_"): None})
    _raises(hdr, f"'{field}'")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("interleave", "bsx", "'interleave' must be"),
        ("byte_order", "2", "'byte order' must be 0 or 1"),
        ("lines", "eleven", "'lines' must be an integer"),
        ("samples", "0", "'samples' must be >= 1"),
        ("header_offset", "-4", "'header offset' must be >= 0"),
    ],
)
def test_bad_field_values(tmp_path: Path, field: str, value: str, fragment: str):
    hdr = tmp_path / "scan.hdr"
    _write(hdr)
    _edit_header(hdr, **{field: value})
    _raises(hdr, fragment)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ([900, 1000, 1000], "increase strictly"),
        ([900, 1100, 1000], "band 3 is 1000 nm after 1100 nm"),
        ([1100, 1000, 900], "increase strictly"),
        ([900, 1000], "2 wavelengths for 3 bands"),
        ([900, 1000, 1100, 1200], "4 wavelengths for 3 bands"),
        (["900", "abc", "1100"], "not a number"),
    ],
)
def test_bad_wavelengths(tmp_path: Path, values: list, fragment: str):
    hdr = tmp_path / "scan.hdr"
    _write(hdr, bands=3)
    _edit_header(hdr, wavelength="{ " + ", ".join(str(v) for v in values) + " }")
    _raises(hdr, fragment)


def test_wavelength_units_not_a_length(tmp_path: Path):
    hdr = tmp_path / "scan.hdr"
    _write(hdr, bands=3, wavelengths=[1, 2, 3])
    _edit_header(hdr, wavelength_units="Wavenumber")
    _raises(hdr, "'wavelength units'")


def test_header_written_by_write_header_round_trips(tmp_path: Path):
    """A hand-made header (write_header + raw bytes) with big-endian BIP and an offset."""
    hdr = tmp_path / "hand.hdr"
    values = np.arange(3 * 4 * 2, dtype=">i4").reshape(file_shape("bip", 3, 4, 2))
    (tmp_path / "hand.img").write_bytes(b"x" * 16 + values.tobytes())
    write_header(
        hdr,
        {
            "samples": 2,
            "lines": 4,
            "bands": 3,
            "header offset": 16,
            "data type": 3,
            "interleave": "BIP",
            "byte order": 1,
        },
    )
    got = open_scan(hdr).data.compute()
    np.testing.assert_array_equal(got, values.transpose(2, 0, 1))
