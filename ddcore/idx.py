"""The IDX file format of MNIST-style data: read and check an images or labels file, gzipped or not."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ddcore.errors import DataError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, cols)
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)
_KINDS = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_images(path: Path) -> np.ndarray:
    """Read an IDX images file (magic 2051) as a read-only uint8 ``(N, rows, cols)`` array.

    Raises
    ------
    DataError
        If the file cannot be read or decompressed, is not an images file, or holds fewer or
        more bytes than its header says.
    """
    return _read(Path(path), IMAGES_MAGIC)


def read_labels(path: Path) -> np.ndarray:
    """Read an IDX labels file (magic 2049) as a read-only uint8 ``(N,)`` array (errors: `read_images`)."""
    return _read(Path(path), LABELS_MAGIC)


def _read(path: Path, magic: int) -> np.ndarray:
    """Parse the big-endian header and view the data that follows it, without copying."""
    data = _raw_bytes(path)
    kind = _KINDS[magic]
    ndim = magic & 0xFF
    header_bytes = 4 + 4 * ndim
    if len(data) < 4:
        raise DataError(f"{path} is truncated: {len(data)} bytes, too few for an IDX header; "
                        "download or copy the file again")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(f"{path} is not an IDX {kind} file: {_describe(found)}, expected magic "
                        f"{magic}; check that the file names match their contents")
    if len(data) < header_bytes:
        raise DataError(f"{path} is truncated: {len(data)} bytes, too few for its {header_bytes}-byte "
                        "header; download or copy the file again")
    shape = struct.unpack(f">{ndim}I", data[4:header_bytes])
    expected = header_bytes + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        problem = "is truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(f"{path} {problem}: its header says {shape[0]} {kind} of shape {shape[1:] or '()'} "
                        f"({expected} bytes) but the file holds {len(data)} bytes; download or copy it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(shape)


def _raw_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip (by its first bytes or a ``.gz`` name)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; check the path and its permissions"
                        ) from None
    if data[:2] != _GZIP_MAGIC and path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path} is not a valid gzip file ({exc}); download or copy it again, "
                        "or give the uncompressed file") from None


def _describe(magic: int) -> str:
    """Name what a 4-byte magic number says the file is."""
    if magic in _KINDS:
        return f"magic {magic} is an IDX {_KINDS[magic]} file"
    return f"first four bytes read {magic:#010x}, not an IDX magic number"
