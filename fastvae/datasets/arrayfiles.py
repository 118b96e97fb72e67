"""Images from ``.npy``, ``.npz`` and HDF5 files, read as untrusted input.

Every declared shape is compared with the bytes present before an array is
allocated (rules in :mod:`fastvae.io.safe_files`): ``.npy`` headers against the
file size, ``.npz`` members against their stored (compressed) size, HDF5
datasets against their allocated storage (unwritten chunks and implausible
compression refused, no external storage, links or virtual datasets), HDF5
parsed only in a sandboxed child process (:mod:`fastvae.io.untrusted_hdf5`).
Memory stays within a small multiple of the data's real size. Never unpickles.
"""

from __future__ import annotations

import math
import os
import sys
import tokenize
import zipfile

import numpy as np

from fastvae.errors import DataError
from fastvae.io.safe_files import MAX_COMPRESSION, open_regular
from fastvae.io.untrusted_hdf5 import SandboxedH5

X_KEYS = ("images", "x", "X", "data", "x_train")
Y_KEYS = ("labels", "y", "subject", "targets", "y_train")
_FIX = "pass an existing .npy, .npz or .h5 file of images"


def held_out_rows(n: int, fraction: float, seed: int):
    """The rows of the seeded random test split of ``n`` images, sorted
    (int64), or None when ``round(n * fraction)`` is 0: the first ``n_test``
    of ``PCG64(seed).permutation(n)``, at most ``n - 1`` (one image is left
    to train on; a fraction that rounded to all of them gave no test split at
    all). The one rule for images loaded in memory and streamed from disk, so
    a run's test split does not depend on the memory there is (the training
    rows are the others)."""
    n_test = min(int(round(n * fraction)), n - 1)
    if n_test <= 0:
        return None
    return np.sort(np.random.Generator(np.random.PCG64(seed)).permutation(n)[:n_test])


def image_shape_of(shape, where: str) -> tuple:
    """The image shape of an array of images of shape ``shape``: ``(H, W)``
    for ``(N, H, W)``, ``(H, W, C)`` for ``(N, H, W, C)`` with C = 1, 3 or 4
    channels last, and for ``(N, D)`` a square ``(s, s)`` when D = s^2, else
    ``(1, D)``. Raises DataError for any other shape, naming the transpose
    a channels-first ``(N, C, H, W)`` array needs, and for images of no pixels."""
    shape = tuple(int(s) for s in shape)
    if len(shape) >= 2 and 0 in shape[1:]:
        raise DataError(f"{where}: images of shape {shape} hold no pixels; store images of at least one pixel")
    if len(shape) == 2:
        s = math.isqrt(shape[1])
        return (s, s) if s * s == shape[1] else (1, shape[1])
    if len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3, 4)):
        return shape[1:]
    if len(shape) == 4 and shape[1] in (1, 3, 4):
        raise DataError(f"{where}: images of shape {shape} look channels-first (N, C, H, W); fastvae reads "
                        "channels last: save x.transpose(0, 2, 3, 1)")
    raise DataError(f"{where}: expected images of shape (N, H, W), (N, H, W, C) with 1, 3 or 4 channels, "
                    f"or (N, D); got {shape}")


def same_image_shape(path, train_shape: tuple, test_shape: tuple) -> None:
    """DataError unless a file's own test images (``x_test``) have its
    training images' shape (both ``(H, W[, C])``)."""
    if tuple(train_shape) != tuple(test_shape):
        raise DataError(f"{path}: x_train holds {tuple(train_shape)} images but x_test {tuple(test_shape)}; "
                        "store test images of the training images' shape")


def unit_split(x, y, fraction, seed, chunk_rows: int = 4096):
    """A seeded random ``fraction`` of the rows of images ``x (N, ...)`` (and
    labels ``y``) as the test split, both as ``(n, D)`` float32 (uint8 / 255,
    other numbers kept). Each split is filled chunk by chunk from ``x``, so
    loading peaks at ``x`` plus the float32 result (a conversion, then a
    split, held three copies: 9 bytes a uint8 pixel); float32 ``x`` without a
    split is checked and returned as it is.
    Returns ``x_train, y_train, x_test, y_test`` (test None when the fraction
    rounds to no image or to all). Raises DataError for non-numbers, NaN or inf."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise DataError(f"images must be numbers, got dtype {x.dtype}")
    n = x.shape[0]
    flat = x.reshape(n, -1)
    test = held_out_rows(n, fraction, seed)
    if test is None:
        parts = [None]
    else:
        train = np.ones(n, bool)
        train[test] = False
        parts = [np.flatnonzero(train), test]

    def unit(rows):
        keep = rows is None and flat.dtype == np.float32 and flat.flags.c_contiguous   # checked, never copied
        out = flat if keep else np.empty((n if rows is None else len(rows), flat.shape[1]), np.float32)
        for i in range(0, len(out), chunk_rows):
            blk = out[i:i + chunk_rows]
            if not keep:
                blk[...] = flat[i:i + chunk_rows] if rows is None else flat[rows[i:i + chunk_rows]]
            if x.dtype == np.uint8:
                blk /= np.float32(255.0)              # checks.unit_pixels' rule, in place (one copy held)
            elif not np.isfinite(blk).all():
                raise DataError("images contain NaN or infinite values; clean the data first")
        return out
    pick = (lambda rows: None if y is None else (y if rows is None else y[rows]))
    xtr, ytr = unit(parts[0]), pick(parts[0])
    if len(parts) == 1:
        return xtr, ytr, None, None
    return xtr, ytr, unit(parts[1]), pick(parts[1])


def _npy_header(fp, where: str, text_ok: bool = False):
    """``(shape, fortran_order, dtype)`` from an ``.npy`` stream's header
    (numpy's parser); numbers only, or also fixed-size text (labels) with ``text_ok``."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read(fp)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError,
            tokenize.TokenError) as exc:        # the last from numpy's legacy-header retry (mismatched brackets)
        raise DataError(f"{where} is not a valid .npy array ({str(exc)[:80]}); {_FIX}") from None
    if dtype.hasobject or dtype.kind not in ("biufSU" if text_ok else "biuf"):
        raise DataError(f"{where} holds {dtype} values; " + ("labels must be numbers or text" if text_ok
                                                             else "images must be numbers (uint8 or float)"))
    return shape, fortran, dtype


def _read_npy(fp, where: str, available: int, ratio: int, text_ok: bool = False):
    """Read an ``.npy`` stream once the size its header declares fits in
    ``ratio`` times the ``available`` bytes (the file's size, or a zip
    member's stored size); filled in place, so memory is what the stream
    really yields."""
    shape, fortran, dtype = _npy_header(fp, where, text_ok)
    need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if need > available * ratio:
        raise DataError(f"{where} declares shape {shape} ({need:,} bytes) but the file stores only "
                        f"{available:,} bytes; the file is truncated, corrupt or crafted")
    arr = np.empty(int(np.prod(shape)), dtype)
    raw = memoryview(arr.view(np.uint8).reshape(-1))
    got = 0
    while got < need:
        n = fp.readinto(raw[got:got + (1 << 22)])
        if not n:
            raise DataError(f"{where} ends after {got:,} of its {need:,} bytes; the file is truncated")
        got += n
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def _keys(names, path, fallback: bool):
    """``(images key, labels key, test images key, test labels key)`` among
    ``names`` (None for each one absent); with ``fallback`` (.npz) the only
    array, or ``arr_0`` (numpy.savez's first unnamed one), stands in for
    unnamed images. A test split is read beside ``x_train``:
    ``x_test`` (labels ``y_test`` beside ``y_train``), as Keras's mnist.npz holds it."""
    names = list(names)
    # unnamed: the only array, or numpy.savez's first positional one (arr_0); two named others are a guess
    lone = names[0] if len(names) == 1 else ("arr_0" if "arr_0" in names else None)
    xk = next((k for k in X_KEYS if k in names), lone if fallback else None)
    if xk is None:
        kind = "array" if fallback else "dataset"
        raise DataError(f"{path} holds no arrays" if fallback and not names else
                        f"{path} has no {kind} named one of {', '.join(X_KEYS)} (it holds: "
                        f"{', '.join(names[:8]) or 'nothing'}); store the images under one of those names")
    yk = next((k for k in Y_KEYS if k in names), None)
    xtk = "x_test" if xk == "x_train" and "x_test" in names else None
    return xk, yk, xtk, "y_test" if xtk and yk == "y_train" and "y_test" in names else None


def _npz(fh, path):
    try:
        z = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"{path} is not a valid .npz (zip) file ({exc}); {_FIX}") from None

    def read(k, labels):
        info = names[k]
        ratio = 1 if info.compress_type == zipfile.ZIP_STORED else MAX_COMPRESSION
        try:
            with z.open(info) as fp:
                return _read_npy(fp, f"{path}[{k}]", info.compress_size, ratio, text_ok=labels)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
            raise DataError(f"{path}[{k}] cannot be read ({str(exc)[:80]}); the file is corrupt") from None
    with z:
        names = {os.path.splitext(i.filename)[0]: i for i in z.infolist() if i.filename.endswith(".npy")}
        return [read(k, i % 2 == 1) if k else None for i, k in enumerate(_keys(names, path, True))]


def _h5(fh, path):
    with SandboxedH5(fh, path, DataError, _FIX, compressed_ok=True, max_compression=MAX_COMPRESSION) as f:
        keys = _keys(list(f.members("/")), path, False)

        def read(k, labels):
            dtype = f.dataset(k)["dtype"]
            text = labels and (dtype == "text" or dtype[1] == "S")
            if dtype in ("text", "object") and not text or dtype not in ("text", "object") and \
                    np.dtype(dtype).kind not in "biuf" and not text:
                raise DataError(f"{path}: {k!r} holds {dtype} values; " + ("labels must be numbers or text" if labels
                                                                         else "images must be numbers"))
            return f.read(k)
        return [read(k, i % 2 == 1) if k else None for i, k in enumerate(keys)]


def class_labels(y, n: int, where: str, names=None):
    """``(labels, names)``: the class of each of ``n`` images as ``(n,)``
    int64, and the class names when the labels are text (``names``: the
    sorted set to number them by, e.g. over a training and a test split).
    Taken: integers, whole floats, text, one-hot rows ``(n, K)`` and
    ``(n, 1)``. Labels that are not one class per image (fractional values,
    several attributes per image) are not classes: dropped with a note
    (``(None, None)``; only the latent map uses them). Raises DataError when
    their count is not ``n``."""
    y = np.asarray(y)
    if y.ndim == 0 or y.shape[0] != n:
        raise DataError(f"{where}: {n} images but {y.size if y.ndim == 0 else y.shape[0]} labels; they must match")
    if y.dtype.kind in "OSU":
        y = (np.char.decode(y, "utf-8", "replace") if y.dtype.kind == "S" else y.astype(str)).reshape(n, -1)
        if y.shape[1] == 1:
            names = np.unique(y) if names is None else np.asarray(names)
            return np.searchsorted(names, y[:, 0]).astype(np.int64), [str(v) for v in names]
    elif y.ndim == 2 and y.shape[1] > 1 and np.isin(y, (0, 1)).all() and (y.sum(1) == 1).all():
        return y.argmax(1).astype(np.int64), None                  # one-hot rows
    y = y.reshape(n, -1)
    whole = (y.dtype.kind in "ib" or y.dtype.kind == "u" and (not y.size or y.max() < 2 ** 63) or
             y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all() and (abs(y) < 2 ** 53).all())
    if y.shape[1] == 1 and whole:               # (int64 holds them: 1e300 or 2^63 + 5 became garbage)
        return y[:, 0].astype(np.int64), None
    what = f"{y.shape[1]} values per image" if y.shape[1] > 1 else "values that are not class numbers"
    print(f"fastvae: note: {where}: the labels hold {what}, not one class per image; the images are used "
          "without labels (the latent map is drawn in one colour)", file=sys.stderr)
    return None, None


def read_arrays(path):
    """``(x, y, x_test, y_test)`` host arrays (None for those the file does
    not hold) of an ``.npy``, ``.npz`` or ``.h5``/``.hdf5`` file. Images under one of
    ``X_KEYS`` (else an .npz's only array, or ``arr_0``), labels under ``Y_KEYS``, a
    test split under ``x_test``/``y_test`` beside ``x_train``/``y_train``.
    Raises DataError for a missing or special file, a declared size the
    file cannot back, non-numeric data or any read error."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npy", ".npz", ".h5", ".hdf5"):
        raise DataError(f"unsupported file type {ext!r} for {path}; use .npy, .npz, .h5 or an image folder")
    with open_regular(path, "data file", _FIX, DataError) as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            if ext == ".npy":
                return _read_npy(fh, path, size, 1), None, None, None
            if ext == ".npz":
                return tuple(_npz(fh, path))
            return tuple(_h5(fh, path))
        except DataError:
            raise
        except MemoryError:
            raise DataError(f"{path} does not fit in memory; use a smaller file") from None
        except Exception as exc:  # numpy/h5py raise many types on corrupt files
            raise DataError(f"cannot read {path}: {type(exc).__name__}: {str(exc)[:120]}; check the file") from None
