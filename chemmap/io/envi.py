"""ENVI files: the format line-scan recorders write (a text header beside a flat binary).

Writing lives here; reading (``open_scan``) sits beside it so that both agree on the
header conventions.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chemmap.errors import InputError
from chemmap.files import write_text_atomic

if TYPE_CHECKING:
    import dask.array as da

# ENVI 'data type' codes and the numpy kinds they mean (ENVI header format reference).
ENVI_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("uint8"),
    2: np.dtype("int16"),
    3: np.dtype("int32"),
    4: np.dtype("float32"),
    5: np.dtype("float64"),
    6: np.dtype("complex64"),
    9: np.dtype("complex128"),
    12: np.dtype("uint16"),
    13: np.dtype("uint32"),
    14: np.dtype("int64"),
    15: np.dtype("uint64"),
}
DTYPE_CODES: dict[np.dtype, int] = {v: k for k, v in ENVI_DTYPES.items()}

INTERLEAVES = ("bil", "bip", "bsq")


def file_shape(interleave: str, bands: int, lines: int, samples: int) -> tuple[int, int, int]:
    """Shape of the binary's array in file order for an interleave.

    Returns:
        ``(lines, bands, samples)`` for BIL, ``(lines, samples, bands)`` for BIP,
        ``(bands, lines, samples)`` for BSQ.
    """
    il = interleave.lower()
    if il == "bil":
        return (lines, bands, samples)
    if il == "bip":
        return (lines, samples, bands)
    if il == "bsq":
        return (bands, lines, samples)
    raise ValueError(f"interleave must be one of {INTERLEAVES}, got {interleave!r}.")


def _format_value(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (Sequence, np.ndarray)):
        items = ", ".join(_format_value(v) for v in value)
        return "{ " + items + " }"
    if isinstance(value, float):
        return repr(float(value))
    return str(value)


def write_header(hdr_path: str | os.PathLike, fields: Mapping[str, object]) -> None:
    """Write an ENVI header atomically (see :func:`chemmap.files.atomic_path`)."""
    lines = ["ENVI"]
    for key, value in fields.items():
        lines.append(f"{key} = {_format_value(value)}")
    write_text_atomic(hdr_path, "\n".join(lines) + "\n")


def create_envi(
    hdr_path: str | os.PathLike,
    *,
    bands: int,
    lines: int,
    samples: int,
    dtype: str | np.dtype = "uint16",
    interleave: str = "bil",
    byte_order: int = 0,
    header_offset: int = 0,
    wavelengths: Sequence[float] | np.ndarray | None = None,
    raw_suffix: str = ".raw",
    extra: Mapping[str, object] | None = None,
) -> np.memmap:
    """Create an ENVI header and a zero-filled binary, and return the binary as a writable memmap.

    The memmap is in file order (see :func:`file_shape`), so a line-scan writer fills it
    line by line without holding the cube in memory. The file is complete only once the
    caller has filled and flushed it: callers write into a temporary folder and rename it
    when done (the synthetic scanner does), so a crash never leaves a scan that looks whole.

    Args:
        hdr_path: path of the ``.hdr`` file; the binary is ``hdr_path`` with ``raw_suffix``.
        bands, lines, samples: cube size.
        dtype: any numpy dtype ENVI can describe (``ENVI_DTYPES``).
        interleave: ``"bil"``, ``"bip"`` or ``"bsq"``.
        byte_order: 0 little endian, 1 big endian.
        header_offset: bytes of (zero) padding before the data in the binary.
        wavelengths: band centres in nm, one per band.
        extra: further header fields (e.g. ``{"ceiling": 4095}``).

    Returns:
        ``np.memmap`` of shape ``file_shape(interleave, bands, lines, samples)``.
    """
    hdr_path = Path(hdr_path)
    dt = np.dtype(dtype)
    if dt.newbyteorder("=") not in DTYPE_CODES:
        raise ValueError(f"dtype {dt} has no ENVI data type code.")
    code = DTYPE_CODES[dt.newbyteorder("=")]
    if byte_order not in (0, 1):
        raise ValueError(f"byte_order must be 0 or 1, got {byte_order}.")
    dt = dt.newbyteorder(">" if byte_order == 1 else "<")
    shape = file_shape(interleave, bands, lines, samples)
    if wavelengths is not None and len(wavelengths) != bands:
        raise ValueError(f"got {len(wavelengths)} wavelengths for {bands} bands.")

    raw_path = hdr_path.with_suffix(raw_suffix)
    hdr_path.parent.mkdir(parents=True, exist_ok=True)
    size = header_offset + int(np.prod(shape)) * dt.itemsize
    with open(raw_path, "wb") as fh:
        if header_offset:
            fh.write(b"\0" * header_offset)
        fh.truncate(size)
        if size:
            # Blocks reserved now: a write through the memmap into a sparse file on a full disk
            # would kill the process with SIGBUS; here a full disk is an error naming the file.
            try:
                os.posix_fallocate(fh.fileno(), 0, size)
            except OSError as err:
                raise OSError(err.errno, err.strerror, str(raw_path)) from None
    mm = np.memmap(raw_path, dtype=dt, mode="r+", offset=header_offset, shape=shape)
    fields: dict[str, object] = {
        "description": "{chemmap}",
        "samples": samples,
        "lines": lines,
        "bands": bands,
        "header offset": header_offset,
        "file type": "ENVI Standard",
        "data type": code,
        "interleave": interleave.lower(),
        "byte order": byte_order,
        **_wavelength_fields(wavelengths),
        **(extra or {}),
    }
    write_header(hdr_path, fields)
    return mm


def _wavelength_fields(wavelengths: Sequence[float] | np.ndarray | None) -> dict[str, object]:
    """Header fields of the band centres (nm, 3 decimals); none without wavelengths."""
    if wavelengths is None:
        return {}
    return {"wavelength units": "Nanometers", "wavelength": [f"{float(w):.3f}" for w in wavelengths]}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

# Where the binary may sit beside ``<stem>.hdr``: the suffixes recorders and ENVI use, tried in
# this order (Specim writes .raw; ENVI .img/.dat; GDAL-style ``x.raw.hdr`` is the empty suffix).
DATA_SUFFIXES = ("", ".raw", ".img", ".dat", ".bin", ".bil", ".bip", ".bsq")

# 'wavelength units' that are lengths, and the factor that turns them into nm. Missing or
# 'Unknown' units are taken as nm (what VNIR/NIR recorders write); others are refused.
_UNIT_TO_NM: dict[str, float] = {
    "nanometers": 1.0,
    "nanometer": 1.0,
    "nm": 1.0,
    "micrometers": 1e3,
    "micrometer": 1e3,
    "microns": 1e3,
    "micron": 1e3,
    "um": 1e3,
    "µm": 1e3,
    "millimeters": 1e6,
    "mm": 1e6,
    "centimeters": 1e7,
    "cm": 1e7,
    "meters": 1e9,
    "m": 1e9,
    "angstroms": 0.1,
    "unknown": 1.0,
}

# Bytes per dask block when the caller does not choose the lines per chunk.
DEFAULT_CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True, eq=False)
class Scan:
    """An ENVI scan opened lazily: nothing is read until ``data`` is computed.

    Attributes:
        path: the ``.hdr`` file.
        data_path: the binary beside it.
        data: dask array ``(bands, lines, samples)`` of raw, unscaled values in the native byte
            order of ``dtype``; blocks span all bands and samples and a run of lines.
        wavelengths: band centres in nm, float64 ``(bands,)``, strictly increasing; None when
            the header has no ``wavelength`` list.
        header: the parsed header (lowercase keys, string values as spectral gives them), with
            ``interleave`` lowercased and ``byte order`` / ``header offset`` filled in.
        dtype: the values' dtype in native byte order.
        interleave: ``"bil"``, ``"bip"`` or ``"bsq"`` (file order; ``data`` is always BSQ-shaped).
        shape: ``(bands, lines, samples)``.
        byte_order: 0 little endian, 1 big endian (in the file).
        header_offset: bytes before the data in the binary.
    """

    path: Path
    data_path: Path
    data: da.Array
    wavelengths: np.ndarray | None
    header: dict[str, Any]
    dtype: np.dtype
    interleave: str
    shape: tuple[int, int, int]
    byte_order: int = 0
    header_offset: int = 0

    @property
    def bands(self) -> int:
        return self.shape[0]

    @property
    def lines(self) -> int:
        return self.shape[1]

    @property
    def samples(self) -> int:
        return self.shape[2]

    @property
    def ceiling(self) -> float | None:
        """The header's ``ceiling`` (counts at or above it are saturated), or None if absent."""
        return _optional_float(self.header.get("ceiling"))

    @property
    def scale_factor(self) -> float | None:
        """The header's ``reflectance scale factor`` (not applied to ``data``), or None if absent."""
        return _optional_float(self.header.get("reflectance scale factor"))

    def __repr__(self) -> str:
        size = " x ".join(
            f"{n} {name}" for n, name in zip(self.shape, ("bands", "lines", "samples"), strict=True)
        )
        return f"Scan({str(self.path)!r}, {size}, {self.dtype}, {self.interleave})"


def _optional_float(value: object) -> float | None:
    if value is None:
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


class _EnviSource:
    """Array-like view of an ENVI binary as ``(bands, lines, samples)`` in native byte order.

    ``dask.array.from_array`` slices it once per block. It pickles as its file name and
    layout (never the mapped bytes), so blocks can be read by any worker that sees the file,
    and each process maps the file once.
    """

    ndim = 3

    def __init__(
        self,
        path: Path,
        file_dtype: np.dtype,
        offset: int,
        interleave: str,
        shape: tuple[int, int, int],
    ) -> None:
        self.path = path
        self.file_dtype = file_dtype
        self.dtype = file_dtype.newbyteorder("=")
        self.offset = offset
        self.interleave = interleave
        self.shape = shape
        self._mm: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mm"] = None
        return state

    def _view(self) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(
                self.path,
                dtype=self.file_dtype,
                mode="r",
                offset=self.offset,
                shape=file_shape(self.interleave, *self.shape),
            )
        mm = self._mm
        if self.interleave == "bil":  # (lines, bands, samples)
            return mm.transpose(1, 0, 2)
        if self.interleave == "bip":  # (lines, samples, bands)
            return mm.transpose(2, 0, 1)
        return mm

    def __getitem__(self, key: Any) -> np.ndarray:
        lines = key[1] if isinstance(key, tuple) and len(key) == 3 else None
        if isinstance(lines, slice) and lines.step in (None, 1):
            l0, l1, _ = lines.indices(self.shape[1])
            block = self._read_lines(l0, max(l0, l1))  # (bands, l1 - l0, samples), native order
            return np.ascontiguousarray(block[key[0], :, key[2]])
        # np.array(..., dtype=native) copies only the block and swaps bytes on the way.
        return np.array(self._view()[key], dtype=self.dtype, order="C")

    def _read_lines(self, l0: int, l1: int) -> np.ndarray:
        """Lines ``l0:l1`` read with plain file reads, not a memory map.

        Pages of a mapped file count in the process's resident memory until unmapped, so a
        scan read through a map looks (and, under memory pressure, behaves) as large as the
        file; reads into a block-sized buffer keep the resident set at the block size.
        """
        bands, _, samples = self.shape
        n, item = l1 - l0, self.file_dtype.itemsize
        if self.interleave in ("bil", "bip"):
            per_line = bands * samples
            raw = np.fromfile(
                self.path,
                dtype=self.file_dtype,
                count=n * per_line,
                offset=self.offset + l0 * per_line * item,
            )
            if self.interleave == "bil":
                block = raw.reshape(n, bands, samples).transpose(1, 0, 2)
            else:
                block = raw.reshape(n, samples, bands).transpose(2, 0, 1)
        else:  # bsq: one contiguous run per band
            lines_total = self.shape[1]
            block = np.empty((bands, n, samples), dtype=self.file_dtype)
            with open(self.path, "rb") as fh:
                for b in range(bands):
                    fh.seek(self.offset + (b * lines_total + l0) * samples * item)
                    block[b] = np.fromfile(fh, dtype=self.file_dtype, count=n * samples).reshape(n, samples)
        return block.astype(self.dtype, copy=False)


def _lines_per_chunk(bands: int, lines: int, samples: int, itemsize: int, chunk_lines: int | None) -> int:
    if chunk_lines is not None:
        if chunk_lines < 1:
            raise ValueError(f"chunk_lines must be >= 1, got {chunk_lines}.")
        return min(chunk_lines, lines)
    per_line = bands * samples * itemsize
    return max(1, min(lines, DEFAULT_CHUNK_BYTES // per_line))


def find_data_file(hdr_path: Path) -> Path:
    """The binary beside a header: same stem with one of ``DATA_SUFFIXES`` (either case).

    Raises:
        InputError: no such file exists.
    """
    stem = hdr_path.with_suffix("")
    tried: list[Path] = []
    for suffix in DATA_SUFFIXES:
        for s in dict.fromkeys((suffix, suffix.upper())):
            candidate = stem.with_name(stem.name + s)
            if candidate == hdr_path or candidate in tried:
                continue
            tried.append(candidate)
            if candidate.is_file():
                return candidate
    names = ", ".join(p.name for p in tried[:6])
    raise InputError(f"{hdr_path}: no data file beside the header (looked for {names}, ...)")


def _read_header(hdr_path: Path) -> dict[str, Any]:
    from spectral.io import envi as spy_envi

    if not hdr_path.is_file():
        raise InputError(f"{hdr_path}: header file not found")
    try:
        with warnings.catch_warnings():
            # spectral warns when it lowercases keys such as 'Interleave'; we lowercase anyway.
            warnings.simplefilter("ignore")
            header = spy_envi.read_envi_header(str(hdr_path))
    except spy_envi.FileNotAnEnviHeader:
        raise InputError(f"{hdr_path}: not an ENVI header (first line is not 'ENVI')") from None
    except (spy_envi.EnviException, UnicodeDecodeError, OSError) as err:
        raise InputError(f"{hdr_path}: cannot parse the ENVI header ({err})") from None
    return {str(k).strip().lower(): v for k, v in header.items()}


def _int_field(header: Mapping[str, Any], key: str, hdr_path: Path, default: int | None = None) -> int:
    value = header.get(key)
    if value is None:
        if default is None:
            raise InputError(f"{hdr_path}: header has no '{key}'")
        return default
    try:
        return int(str(value).strip())
    except ValueError:
        raise InputError(f"{hdr_path}: '{key}' must be an integer, got {value!r}") from None


def _wavelengths(header: Mapping[str, Any], bands: int, hdr_path: Path) -> np.ndarray | None:
    raw = header.get("wavelength")
    if raw is None:
        return None
    values = raw if isinstance(raw, list) else [raw]
    try:
        wl = np.array([float(str(v).strip()) for v in values], dtype=np.float64)
    except ValueError:
        raise InputError(f"{hdr_path}: 'wavelength' holds a value that is not a number") from None
    if wl.size != bands:
        raise InputError(f"{hdr_path}: header lists {wl.size} wavelengths for {bands} bands")
    units = str(header.get("wavelength units", "nanometers")).strip().lower()
    if units not in _UNIT_TO_NM:
        raise InputError(
            f"{hdr_path}: 'wavelength units' is {units!r}; expected a length (Nanometers, Micrometers, ...)"
        )
    wl = wl * _UNIT_TO_NM[units]
    if not np.all(np.isfinite(wl)):
        raise InputError(f"{hdr_path}: 'wavelength' holds a value that is not finite")
    steps = np.diff(wl)
    if np.any(steps <= 0):
        i = int(np.argmax(steps <= 0))
        raise InputError(
            f"{hdr_path}: wavelengths must increase strictly, but band {i + 2} is {wl[i + 1]:g} nm "
            f"after {wl[i]:g} nm"
        )
    return wl


@dataclass(frozen=True)
class _Layout:
    """How a header says the binary is laid out.

    Attributes:
        shape: ``(bands, lines, samples)``.
        dtype: the values' dtype in native byte order.
        interleave: ``"bil"``, ``"bip"`` or ``"bsq"``, lowercase.
        byte_order: 0 little endian, 1 big endian.
        offset: bytes before the data in the binary.
    """

    shape: tuple[int, int, int]
    dtype: np.dtype
    interleave: str
    byte_order: int
    offset: int

    @property
    def file_dtype(self) -> np.dtype:
        """``dtype`` in the file's byte order."""
        return self.dtype.newbyteorder(">" if self.byte_order == 1 else "<")

    @property
    def nbytes(self) -> int:
        """Size the binary must have: the offset and the values.

        Python integers, never NumPy's int64: a header claiming 2**32 x 2**32 values would
        wrap to 0 there, pass for an empty file, and size arrays that exhaust memory.
        """
        return self.offset + math.prod(self.shape) * self.dtype.itemsize


def _cube_shape(header: Mapping[str, Any], hdr_path: Path) -> tuple[int, int, int]:
    """``(bands, lines, samples)`` from the header, each >= 1."""
    bands = _int_field(header, "bands", hdr_path)
    lines = _int_field(header, "lines", hdr_path)
    samples = _int_field(header, "samples", hdr_path)
    for key, n in (("bands", bands), ("lines", lines), ("samples", samples)):
        if n < 1:
            raise InputError(f"{hdr_path}: '{key}' must be >= 1, got {n}")
    return bands, lines, samples


def _data_type(header: Mapping[str, Any], hdr_path: Path) -> np.dtype:
    """The real-valued numpy dtype of the header's ``data type`` code (native byte order)."""
    code = _int_field(header, "data type", hdr_path)
    if code not in ENVI_DTYPES:
        known = ", ".join(str(c) for c in ENVI_DTYPES if ENVI_DTYPES[c].kind != "c")
        raise InputError(f"{hdr_path}: 'data type' {code} is not an ENVI data type (known: {known})")
    dtype = ENVI_DTYPES[code]
    if dtype.kind == "c":
        raise InputError(f"{hdr_path}: 'data type' {code} is complex ({dtype}); a scan must be real-valued")
    return dtype


def _interleave(header: Mapping[str, Any], hdr_path: Path) -> str:
    """The header's interleave, lowercased (recorders write ``Bil``, ``BIL``, ...)."""
    if "interleave" not in header:
        raise InputError(f"{hdr_path}: header has no 'interleave' (bil, bip or bsq)")
    interleave = str(header["interleave"]).strip().lower()
    if interleave not in INTERLEAVES:
        raise InputError(f"{hdr_path}: 'interleave' must be bil, bip or bsq, got {header['interleave']!r}")
    return interleave


def _byte_order_and_offset(header: Mapping[str, Any], hdr_path: Path) -> tuple[int, int]:
    """``(byte order, header offset)``, ENVI's defaults (0, 0) where absent; no frame offsets."""
    byte_order = _int_field(header, "byte order", hdr_path, default=0)
    if byte_order not in (0, 1):
        raise InputError(f"{hdr_path}: 'byte order' must be 0 or 1, got {byte_order}")
    offset = _int_field(header, "header offset", hdr_path, default=0)
    if offset < 0:
        raise InputError(f"{hdr_path}: 'header offset' must be >= 0, got {offset}")
    for key in ("major frame offsets", "minor frame offsets"):
        value = header.get(key)
        values = value if isinstance(value, list) else [value] if value is not None else []
        if any(str(v).strip() not in ("", "0") for v in values):
            raise InputError(f"{hdr_path}: '{key}' is not supported")
    return byte_order, offset


def _layout(header: Mapping[str, Any], hdr_path: Path) -> _Layout:
    """The binary's layout as the header describes it, each field checked."""
    shape = _cube_shape(header, hdr_path)
    dtype = _data_type(header, hdr_path)
    interleave = _interleave(header, hdr_path)
    byte_order, offset = _byte_order_and_offset(header, hdr_path)
    return _Layout(shape=shape, dtype=dtype, interleave=interleave, byte_order=byte_order, offset=offset)


def _check_file_size(data_path: Path, layout: _Layout) -> None:
    """The binary must hold exactly the offset and the values the header announces."""
    actual = data_path.stat().st_size
    if actual != layout.nbytes:
        bands, lines, samples = layout.shape
        raise InputError(
            f"{data_path}: header says {lines} lines x {samples} samples x {bands} bands of {layout.dtype} = "
            f"{layout.nbytes - layout.offset} bytes after a {layout.offset}-byte offset, "
            f"file has {actual} bytes"
        )


def _lazy_cube(data_path: Path, layout: _Layout, chunk_lines: int | None) -> da.Array:
    """A dask array ``(bands, lines, samples)`` over the binary, blocks of whole lines.

    The graph name hashes the file's path, modification time, size and layout, so opening
    the same unchanged file twice gives the same keys.
    """
    import dask.array as da
    from dask.base import tokenize

    bands, lines, samples = layout.shape
    source = _EnviSource(data_path, layout.file_dtype, layout.offset, layout.interleave, layout.shape)
    step = _lines_per_chunk(bands, lines, samples, layout.dtype.itemsize, chunk_lines)
    stat = data_path.stat()
    name = "envi-" + tokenize(
        str(data_path.resolve()),
        stat.st_mtime_ns,
        stat.st_size,
        layout.file_dtype.str,
        layout.offset,
        layout.interleave,
        layout.shape,
        step,
    )
    return da.from_array(
        source,
        chunks=(bands, step, samples),
        name=name,
        asarray=False,
        fancy=False,
        meta=np.empty((0, 0, 0), dtype=layout.dtype),
    )


def open_scan(hdr_path: str | os.PathLike, *, chunk_lines: int | None = None) -> Scan:
    """Open an ENVI scan lazily and check that header and binary agree.

    Any interleave (in any letter case), any real ENVI data type, either byte order and a
    header offset are read. A header without ``byte order`` is little endian (ENVI's
    default). Values stay raw: the ``reflectance scale factor`` is not applied (see
    ``Scan.scale_factor``), as with spectral's ``open_memmap``.

    Args:
        hdr_path: the ``.hdr`` file; the binary is found beside it (``find_data_file``).
        chunk_lines: lines per dask block; None picks about 32 MiB per block.

    Returns:
        A :class:`Scan` whose ``data`` is ``(bands, lines, samples)``.

    Raises:
        InputError: missing or unreadable header, missing binary, unknown or complex data
            type, a file size that disagrees with the header, or bad wavelengths. The message
            is one line starting with the file's path.
    """
    hdr_path = Path(hdr_path)
    header = _read_header(hdr_path)
    layout = _layout(header, hdr_path)
    wavelengths = _wavelengths(header, layout.shape[0], hdr_path)
    data_path = find_data_file(hdr_path)
    _check_file_size(data_path, layout)
    # The normalised values, so that users of ``header`` need not know ENVI's defaults.
    header["interleave"] = layout.interleave
    header["byte order"] = str(layout.byte_order)
    header["header offset"] = str(layout.offset)
    return Scan(
        path=hdr_path,
        data_path=data_path,
        data=_lazy_cube(data_path, layout, chunk_lines),
        wavelengths=wavelengths,
        header=header,
        dtype=layout.dtype,
        interleave=layout.interleave,
        shape=layout.shape,
        byte_order=layout.byte_order,
        header_offset=layout.offset,
    )
