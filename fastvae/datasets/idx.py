"""The idx file format of the MNIST family (LeCun et al., "THE MNIST
DATABASE of handwritten digits", file formats section), plain or gzipped:
a magic ``0 0 <dtype> <ndim>``, ``ndim`` big-endian uint32 sizes, then the data."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from fastvae.errors import DataError
from fastvae.io.safe_files import open_regular

_FIX = "check the path or --data-dir"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


MAX_DIMS = 4
GZIP_MAX_RATIO = 1100        # deflate cannot expand beyond ~1032:1


def _opener(path: str, fh):
    return gzip.GzipFile(fileobj=fh, mode="rb") if path.endswith(".gz") else fh


def _header(path: str, f) -> tuple:
    """``(dtype, dims)`` from the first bytes of an open (decompressing) stream."""
    head = f.read(4)
    if len(head) < 4:
        raise DataError(f"{path} is too short to be an idx file; download it again")
    zero, code, ndim = struct.unpack(">HBB", head)
    if zero != 0 or code not in _IDX_DTYPES or not 1 <= ndim <= MAX_DIMS:
        raise DataError(f"{path} has a wrong idx magic number {head.hex()}; "
                        "it is not an idx file (expected 00000803 for images, 00000801 for labels)")
    raw = f.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise DataError(f"{path} has a truncated idx header; download it again")
    return np.dtype(_IDX_DTYPES[code]), struct.unpack(">" + "I" * ndim, raw)


def _declared(path, dtype, dims, fh) -> int:
    """Bytes the header promises, checked against the bytes on disk before any
    decompression: a plain file must hold exactly that, a gzip file cannot
    expand beyond deflate's limit."""
    want = math.prod(dims) * dtype.itemsize
    size = os.fstat(fh.fileno()).st_size
    if path.endswith(".gz"):
        if want > GZIP_MAX_RATIO * size + 1024:
            raise DataError(f"{path}: header announces shape {dims} ({want:,} bytes) but the {size:,}-byte "
                            "gzip file cannot hold that much; the file is corrupt or crafted, download it again")
    elif size - 4 - 4 * len(dims) != want:
        raise DataError(f"{path}: header announces shape {dims} ({want:,} bytes) but the file holds "
                        f"{max(size - 4 - 4 * len(dims), 0):,}; the file is truncated or corrupt, download it again")
    return want


def read_idx_header(path) -> tuple:
    """``(dtype, dims)`` of an idx file (plain or ``.gz``) from its header
    alone (a few bytes decompressed), after checking that the file can hold
    what the header announces. Raises DataError."""
    path = os.fspath(path)
    with open_regular(path, "idx file", _FIX, DataError) as fh:
        try:
            f = _opener(path, fh)
            dtype, dims = _header(path, f)
            _declared(path, dtype, dims, fh)
            return dtype, dims
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"cannot read {path}: corrupt or truncated ({exc}); download it again") from None


def load_idx(path) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format), plain or ``.gz``.

    The header is validated: magic ``0x0000TTNN`` (TT the element type, NN the
    number of dimensions, 1 to 4), big-endian uint32 sizes; the announced size
    is checked against the file's bytes before anything is allocated, and
    decompression stops one byte past what the header promises (bounded
    memory whatever the stream holds). Returns an array of the announced
    shape. Raises DataError for a missing, special, truncated or oversized file.
    """
    path = os.fspath(path)
    with open_regular(path, "idx file", _FIX, DataError) as fh:
        try:
            f = _opener(path, fh)
            dtype, dims = _header(path, f)
            want = _declared(path, dtype, dims, fh)
            body = f.read(want + 1)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"cannot read {path}: corrupt or truncated ({exc}); download it again") from None
    if len(body) != want:
        more = "more than" if len(body) > want else f"only {len(body):,} of"
        raise DataError(f"{path}: header announces shape {dims} ({want:,} bytes) but the file holds "
                        f"{more} those bytes; the file is truncated or corrupt, download it again")
    arr = np.frombuffer(body, dtype=dtype).reshape(dims)
    return arr.astype(arr.dtype.newbyteorder("="), copy=True)


def write_idx(path, arr) -> None:
    """Write ``arr`` (uint8) as an idx file, gzip-compressed if ``path`` ends in .gz."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    data = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
