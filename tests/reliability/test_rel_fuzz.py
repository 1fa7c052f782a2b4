"""Fuzzing the three readers of user files: nothing but chemmap's own one-line errors, ever.

- the ENVI header parser (:func:`chemmap.io.open_scan`): headers built from the fields it
  reads, each value valid, odd or junk, beside a binary of the size they imply (or not); and
  raw bytes;
- the references reader (:func:`chemmap.io.read_references`): CSV text from the columns it
  knows and odd cells, comma or semicolon, quoted or not, with or without a byte order mark;
  and raw bytes;
- the config loader (:func:`chemmap.config.load_config`): YAML of the config's own keys and
  junk keys with values of any YAML type, ``base:`` chains, overrides, and mutated YAML text.

A reader either returns (and what it returns then holds its promises: a scan reads, a table's
values are in range) or raises :class:`chemmap.errors.ChemmapError` with one line naming the
file. In CI each fuzzer runs ``CHEMMAP_FUZZ_EXAMPLES`` examples (default 200, derandomised, so a
run is repeatable); set it (e.g. 20000) for a long, random run (docs/reliability.md records one).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import typing
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chemmap.config import ChemmapConfig, _Section, load_config
from chemmap.errors import ChemmapError, ConfigError, InputError
from chemmap.io import open_scan, read_references
from chemmap.io.envi import ENVI_DTYPES, file_shape

LONG = "CHEMMAP_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(
    max_examples=int(os.environ.get("CHEMMAP_FUZZ_EXAMPLES", "200")),
    deadline=None,
    database=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def _one_line(err: ChemmapError, *starts: str) -> None:
    msg = str(err)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    assert msg.startswith(starts), (msg, starts)


# A bit of everything a field may hold: numbers as text, odd numbers, separators, braces, junk.
JUNK = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["", " ", "{", "}", "{ }", "{1,2}", ",", ";", "=", "nan", "inf", "1e400", "0x10", "1_0", "٣"]
    ),
    st.text(max_size=12),
)
UNITS = st.sampled_from(["Nanometers", "micrometers", "µm", "mm", "Unknown", "wavenumber", "", "index"])


@st.composite
def envi_files(draw) -> tuple[bytes, int]:
    """``(header bytes, size of the binary)``: a header of the fields the reader uses, each valid or not."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=300)), draw(st.integers(0, 4096))
    bands, lines, samples = (draw(st.integers(1, 5)) for _ in range(3))
    code = draw(st.sampled_from([*ENVI_DTYPES, 0, 7, 8, 99]))
    interleave = draw(st.sampled_from(["bil", "bip", "bsq"]))
    offset = draw(st.sampled_from([0, 0, 0, 7, 128]))
    itemsize = ENVI_DTYPES[code].itemsize if code in ENVI_DTYPES else 2
    size = offset + bands * lines * samples * itemsize
    fields: dict[str, str] = {
        "samples": str(samples),
        "lines": str(lines),
        "bands": str(bands),
        "data type": str(code),
        "interleave": draw(st.sampled_from([interleave, interleave.upper(), interleave.title()])),
        "byte order": draw(st.sampled_from(["0", "1"])),
        "header offset": str(offset),
    }
    if draw(st.booleans()):
        start = draw(st.floats(0.1, 2000))
        step = draw(st.sampled_from([1.0, 0.5, 0.0, -1.0]))
        fields["wavelength"] = "{ " + ", ".join(f"{start + i * step:g}" for i in range(bands)) + " }"
        fields["wavelength units"] = draw(UNITS)
    for key in draw(
        st.lists(st.sampled_from([*fields, "ceiling", "major frame offsets", "description"]), max_size=3)
    ):
        fields[key] = draw(JUNK)  # one field made odd or junk
    for key in draw(st.lists(st.sampled_from(list(fields)), max_size=2)):
        fields.pop(key, None)
    lines_out = [draw(st.sampled_from(["ENVI", "ENVI", "envi", "ENVI ", "NOT ENVI"]))]
    for key, value in fields.items():
        spelled = draw(st.sampled_from([key, key.upper(), key.title(), f" {key} "]))
        lines_out.append(f"{spelled} = {value}")
        if draw(st.integers(0, 9)) == 0:
            lines_out.append(draw(st.sampled_from(["; a comment", "junk", "{", "}", "= =", ""])))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    size += draw(st.sampled_from([0, 0, 0, 0, -1, 1, -size]))
    return eol.join(lines_out).encode("utf-8", "surrogatepass") + eol.encode(), max(size, 0)


@FUZZ
@given(envi_files())
def test_fuzz_envi_header(case):
    header, size = case
    with tempfile.TemporaryDirectory() as tmp:
        hdr = Path(tmp) / "scan.hdr"
        hdr.write_bytes(header)
        (Path(tmp) / "scan.raw").write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
        try:
            scan = open_scan(hdr)
        except InputError as err:
            _one_line(err, tmp)
            return
        cube = scan.data.compute()  # what opens must read: the header and the file agree
        assert cube.shape == scan.shape == (scan.bands, scan.lines, scan.samples)
        assert cube.dtype == scan.dtype and scan.dtype.kind in "uif"
        assert scan.interleave in ("bil", "bip", "bsq")
        assert (
            size
            == scan.header_offset
            + int(np.prod(file_shape(scan.interleave, *scan.shape))) * scan.dtype.itemsize
        )
        if scan.wavelengths is not None:
            assert scan.wavelengths.shape == (scan.bands,) and np.all(np.diff(scan.wavelengths) > 0)


IDS = st.sampled_from(["S00", "S01", "S02", "S03", "P0", "P1", "", " S01 ", "s00", "../S01", "S0\n1"])
NUMBERS = st.one_of(
    st.floats(-10, 110).map(lambda v: f"{v:.3g}"),
    st.sampled_from(["", "nan", "inf", "-inf", "1e3", "12,5", "abc", "0", "100", "-0", "1e-400", "0x1A"]),
)
CELLS = {"scan_id": IDS, "sample_id": IDS, "fat": NUMBERS, "protein": NUMBERS, "split": NUMBERS}


@st.composite
def reference_files(draw) -> bytes:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=300))
    columns = draw(
        st.lists(st.sampled_from(["scan_id", "sample_id", "fat", "protein", "split", "note", ""]), max_size=6)
    )
    rows = [
        [draw(CELLS.get(c, st.text(max_size=6))) for c in columns] for _ in range(draw(st.integers(0, 8)))
    ]
    sep = draw(st.sampled_from([",", ",", ";", "\t"]))
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=sep, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])))
    writer.writerows([columns, *rows])
    text = buf.getvalue()
    if draw(st.integers(0, 9)) == 0:  # a stray quote, separator or line cut anywhere
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.sampled_from(['"', sep, "\n", "\x00", ""])) + text[i:]
    bom = draw(st.sampled_from([b"", b"", b"\xef\xbb\xbf"]))
    return bom + text.encode("utf-8", "surrogatepass")


@FUZZ
@given(
    reference_files(),
    st.lists(st.sampled_from(["S00", "S01", "S02", "S03"]), unique=True),
    st.sampled_from([["fat"], ["fat", "protein"]]),
    st.sampled_from(["fail", "skip"]),
)
def test_fuzz_references(data, scan_ids, targets, on_error):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "references.csv"
        path.write_bytes(data)
        try:
            table, skipped = read_references(path, scan_ids, targets, on_error, n_folds=1, test_fraction=0.0)
        except InputError as err:
            _one_line(err, str(path))
            return
    assert list(table.columns) == ["scan_id", "sample_id", *targets, "split"]
    assert table["scan_id"].is_unique and set(table["scan_id"]) <= set(scan_ids) and len(table) > 0
    values = table[targets].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= 100).all()
    assert table["split"].isin([0, 1]).all() and (table["sample_id"] != "").all()
    assert on_error == "skip" or not skipped


def _config_keys(model: type[_Section] = ChemmapConfig) -> dict[str, object]:
    """The config's own keys, nested: a section is a dict, a field None."""
    out: dict[str, object] = {}
    for name, field in model.model_fields.items():
        sub = [t for t in (field.annotation, *typing.get_args(field.annotation)) if isinstance(t, type)]
        section = next((t for t in sub if issubclass(t, _Section)), None)
        out[name] = _config_keys(section) if section is not None else None
    return out


KEYS = _config_keys()
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**66), 2**66),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(
        ["vnir", "nir", "folder", "synthetic", "threshold", "files", "bn", "auto", "fail", "skip"]
    ),
    st.sampled_from(
        ["a\x00b", "~nobody/x", "/", "..", "sqlite:///", "sqlite:///x\x00.db", "file:///x", "http://"]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def config_mapping(draw, keys: dict[str, object] = KEYS, depth: int = 0) -> dict:
    out = {}
    for name in draw(st.lists(st.sampled_from(sorted(keys)), unique=True, max_size=4)):
        sub = keys[name]
        if isinstance(sub, dict) and depth < 3 and draw(st.integers(0, 3)) > 0:
            out[name] = draw(config_mapping(sub, depth + 1))
        else:
            out[name] = draw(VALUES)
    if draw(st.integers(0, 5)) == 0:
        out[draw(st.text(min_size=1, max_size=6))] = draw(VALUES)  # a junk key
    return out


MUTATIONS = st.sampled_from(
    [
        "",
        "",
        "",
        "!!python/object/apply:os.system ['true'] ",
        "!!binary ",
        "!!set ",
        "&a ",
        "*a ",
        "{",
        "]",
        ": ",
        "\t",
        "- ",
        '"',
    ]
)


@FUZZ
@given(
    config_mapping(),
    st.sampled_from([None, "base.yaml", "p.yaml", "missing.yaml", "sub/"]),
    MUTATIONS,
    st.integers(0, 10_000),
    st.lists(
        st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(["seed", "train.epochs", "model", "x.y", "", "targets.0"]),
            st.text(max_size=8),
        ),
        max_size=2,
    ),
)
def test_fuzz_config(mapping, base, mutation, where, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        (Path(tmp) / "base.yaml").write_text("seed: 3\nbase: base2.yaml\n")
        (Path(tmp) / "base2.yaml").write_text("train: {epochs: 2}\n")
        if base is not None:
            mapping = {"base": base, **mapping}
        text = yaml.safe_dump(mapping, allow_unicode=True)
        i = where % (len(text) + 1)
        path.write_text(text[:i] + mutation + text[i:])
        try:
            cfg = load_config(path, overrides)
            cfg.workdir_path, cfg.tracking_uri  # what every stage resolves first  # noqa: B018
        except ConfigError as err:
            _one_line(err, str(path), "config file not found", "override", "--set")
