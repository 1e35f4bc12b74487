"""Reading a safetensors header by hand: 8-byte little-endian length, then that many bytes of JSON.

The store checks weights *without* loading them (and without torch), so a tampered or truncated file is
refused before any framework parses it. The format is at https://github.com/huggingface/safetensors.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

__all__ = ["DTYPE_BYTES", "HeaderError", "parse_header", "read_header", "tensor_specs"]

# Bytes per element of the dtypes safetensors defines; unknown (newer) dtypes skip the size check.
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# The reference implementation allows 100 MB; a OneRec model has ~100 tensors (a header of ~10 kB), and
# parsing a 100 MB JSON header would cost ~1 GB before anything is refused, so the store allows 16 MiB.
MAX_HEADER_BYTES = 16 * 1024 * 1024


class HeaderError(ValueError):
    """The bytes are not a well-formed safetensors file; the message says what is wrong."""


def _check_entry(tensor: str, entry: Any, data_bytes: int) -> None:
    """One tensor's dtype, shape and offsets must be well-typed and consistent with the data section."""
    if not isinstance(entry, dict):
        raise HeaderError(f"tensor {tensor!r}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise HeaderError(f"tensor {tensor!r}: dtype missing or not a string")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise HeaderError(f"tensor {tensor!r}: shape {shape!r} is not a list of non-negative ints")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets):
        raise HeaderError(f"tensor {tensor!r}: data_offsets {offsets!r} is not a pair of ints")
    if not 0 <= offsets[0] <= offsets[1] <= data_bytes:
        raise HeaderError(f"tensor {tensor!r}: data_offsets {offsets!r} outside the {data_bytes}-byte data")
    if dtype in DTYPE_BYTES:
        elements = 1
        for dim in shape:
            elements *= dim
        need, span = elements * DTYPE_BYTES[dtype], offsets[1] - offsets[0]
        if need != span:
            raise HeaderError(f"tensor {tensor!r}: {dtype}{shape} needs {need} bytes, offsets span {span}")


def parse_header(prefix: bytes, file_size: int) -> dict[str, Any]:
    """Parse the header from the file's first bytes (at least 8 + header length) and validate it.

    `file_size` is the whole file's size, so tensor offsets can be checked against the data section.
    Returns the header dict (tensor name -> {dtype, shape, data_offsets}, plus optional __metadata__).
    """
    if len(prefix) < 8:
        raise HeaderError(f"file too short for a safetensors header ({len(prefix)} bytes)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise HeaderError(f"header length {length} does not fit a {file_size}-byte file")
    if len(prefix) < 8 + length:
        raise HeaderError("header truncated")
    try:
        header = json.loads(prefix[8 : 8 + length].decode("utf-8"))
    except RecursionError:
        raise HeaderError("header is nested too deeply to parse") from None
    except ValueError as exc:  # not UTF-8, not JSON, or an integer too long to convert
        raise HeaderError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    data_bytes = file_size - 8 - length
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            if not isinstance(entry, dict):
                raise HeaderError("__metadata__ is not an object")
            continue
        _check_entry(tensor, entry, data_bytes)
    return header


def read_header(path: Path) -> dict[str, Any]:
    """Read and validate the header of a safetensors file on disk (reads only the header bytes)."""
    with path.open("rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise HeaderError("not a regular file")
        size = info.st_size
        first = handle.read(8)
        if len(first) < 8:
            raise HeaderError(f"file too short for a safetensors header ({len(first)} bytes)")
        (length,) = struct.unpack("<Q", first)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise HeaderError(f"header length {length} does not fit a {size}-byte file")
        return parse_header(first + handle.read(length), size)


def tensor_specs(header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{tensor name: {dtype, shape}}: what the manifest records and verification compares."""
    return {
        name: {"dtype": entry["dtype"], "shape": list(entry["shape"])}
        for name, entry in sorted(header.items())
        if name != "__metadata__"
    }
