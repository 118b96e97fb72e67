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

from .errors import DataError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"file {path} does not exist; check the path or --data-dir") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: corrupt or truncated ({exc}); download it again") from None


def load_idx(path) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format), plain or ``.gz``.

    The header is validated: magic ``0x0000TTNN`` (TT the element type, NN the
    number of dimensions), big-endian uint32 sizes, and a payload of exactly
    the announced size (counts come from the header, never assumed).
    Returns an array of the announced shape. Raises DataError otherwise.
    """
    path = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path} is too short to be an idx file; download it again")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path} has a wrong idx magic number {raw[:4].hex()}; "
                        "it is not an idx file (expected 00000803 for images, 00000801 for labels)")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} has a truncated idx header; download it again")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    want = math.prod(dims) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != want:
        raise DataError(f"{path}: header announces {dims} ({want} bytes) but the file holds "
                        f"{len(body)} bytes; the file is truncated or corrupt, download it again")
    arr = np.frombuffer(body, dtype=dtype).reshape(dims)
    return arr.astype(arr.dtype.newbyteorder("="), copy=True)


def write_idx(path, arr) -> None:
    """Write ``arr`` (uint8) as an idx file, gzip-compressed if ``path`` ends in .gz."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    data = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
