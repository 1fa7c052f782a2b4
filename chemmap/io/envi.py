"""ENVI files: the format line-scan recorders write (a text header beside a flat binary).

Writing lives here; reading (``open_scan``) sits beside it so that both agree on the
header conventions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

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
    """Write an ENVI header atomically (temp file + rename)."""
    hdr_path = Path(hdr_path)
    lines = ["ENVI"]
    for key, value in fields.items():
        lines.append(f"{key} = {_format_value(value)}")
    tmp = hdr_path.with_name(hdr_path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, hdr_path)


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
    with open(raw_path, "wb") as fh:
        if header_offset:
            fh.write(b"\0" * header_offset)
        fh.truncate(header_offset + int(np.prod(shape)) * dt.itemsize)
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
    }
    if wavelengths is not None:
        fields["wavelength units"] = "Nanometers"
        fields["wavelength"] = [f"{float(w):.3f}" for w in wavelengths]
    if extra:
        fields.update(extra)
    write_header(hdr_path, fields)
    return mm
