"""Training on array files larger than memory: rows streamed in chunks.

An ``.npy`` file (memory-mapped) or an HDF5 dataset whose images exceed the
memory budget (``DataConfig.memory_budget_mb``; by default half the free
memory) is not loaded: :class:`StreamedImages` stands in for ``x_train`` and
:class:`StreamBatchSource` reads each step's rows from disk, the next step's
rows read by a prefetch thread while the current step computes. RSS stays
flat as the file grows (about two batches plus one chunk's index).

Order: the rows form chunks of ``chunk_rows`` consecutive rows (a function
of the file's row count and row size alone, :func:`chunk_rows_for`, so a
seed draws the same batches on any machine and a run stopped inside an epoch
resumes where the free memory differs); each epoch draws a chunk order and
one seed per chunk from the training stream and visits the chunks in that
order, ``MIX`` at a time: the rows of a window of ``MIX`` chunks, which lie
far apart in the file, in the order of a seeded permutation (a batch mixes
rows from ``MIX`` places of the file: a file sorted by class or by factor, as
3dshapes is, gave batches of one region; never an N-long index).
Data-parallel ranks read only their rows of each global batch. The test split
is the one the file would have loaded in memory (:func:`fastvae.datasets.arrayfiles.held_out_rows`:
the seeded random ``test_fraction`` of the rows), so a run's split does not
depend on whether its file streamed; the training split skips those rows, and
the test rows are kept in memory when they fit in half the budget, else
streamed as well (all of them: a subset that fitted was kept, so a run's test
split depended on the free memory; before that it was the last rows of the
file, at most 10,000, which a run loaded in memory had partly trained on).
"""

from __future__ import annotations

import concurrent.futures
import copy
import math
import operator
import os
from typing import Optional

import numpy as np

from fastvae.datasets.arrayfiles import _FIX, _keys, _npy_header, held_out_rows, image_shape_of, same_image_shape
from fastvae.checks import unit_pixels
from fastvae.training.distributed import shard
from fastvae.errors import DataError
from fastvae.naming import option
from fastvae.io.safe_files import MAX_COMPRESSION, open_regular
from fastvae.io.untrusted_hdf5 import SandboxedH5
from fastvae.explore.evaluation import binarize_rows
from fastvae.training.parts import EpochPosition, epoch_steps


class StreamedImages:
    """``n`` rows of an on-disk image array as ``(n, D)`` float32 in [0, 1]:
    the file's rows ``[0, n)``, or with ``index`` (sorted) those rows, or with
    ``holes`` (sorted) every row but those, in file order.

    path: ``.npy`` or ``.h5``/``.hdf5`` (images under one of the usual keys,
    checked as in :mod:`fastvae.datasets.arrayfiles`); ``rows(idx)`` reads any rows.
    """

    def __init__(self, path, n: int, D: int, image_shape, reader, chunk_rows: int, index=None, holes=None):
        self.path, self.n, self.D, self.image_shape = path, n, D, tuple(image_shape)
        self._reader, self.chunk_rows = reader, chunk_rows
        self.shape, self.ndim, self.dtype = (n, D), 2, np.dtype(np.float32)
        self._index, self._binarize_seed = index, None
        # row p of a split with holes t_0 < t_1 < ... is file row p + #{j: t_j - j <= p}
        # (t_j - j rows of the split come before hole j): no N-long index is held
        self._gaps = None if holes is None else np.asarray(holes, np.int64) - np.arange(len(holes))

    def _file_rows(self, idx):
        """File rows of split rows ``idx`` (increasing in, increasing out)."""
        if self._index is not None:
            return self._index[idx]
        return idx if self._gaps is None else idx + np.searchsorted(self._gaps, idx, side="right")

    def __len__(self):
        return self.n

    def rows(self, idx) -> np.ndarray:
        """Host float32 ``(len(idx), D)`` of rows ``idx`` (any order, each in
        ``[0, n)``: the file's later rows are another split; IndexError otherwise)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"rows {idx.min()}..{idx.max()} of {self.path}: this split has rows 0..{self.n - 1}")
        order = np.argsort(idx, kind="stable")
        try:
            raw = np.asarray(self._reader(self._file_rows(idx[order]))).reshape(len(idx), -1)
        except DataError as exc:    # the HDF5 reader refused a damaged chunk
            if not hasattr(exc, "detail"):
                raise
            raise DataError(f"{self.path}: rows {idx.min()}..{idx.max()} cannot be read ({exc.detail}); the file is "
                            "damaged or changed since training started") from None
        out = np.empty((len(idx), self.D), np.float32)
        out[order] = unit_pixels(raw)
        if not np.all(np.isfinite(out)):
            raise DataError(f"{self.path}: rows hold NaN or infinite values; clean the data first")
        return out if self._binarize_seed is None else binarize_rows(out, idx, self._binarize_seed)

    def binarized(self, seed: int):
        """This split with every row read as its fixed binary draw
        (:func:`fastvae.explore.evaluation.binarize_rows`; the file is not touched)."""
        out = copy.copy(self)
        out._binarize_seed = seed
        return out

    def __getitem__(self, key):
        """``x[a:b]``, ``x[idx]`` (rows, ``(len, D)``) or ``x[i]`` (one row, ``(D,)``;
        negative counts from the end, as for arrays)."""
        if isinstance(key, slice):
            return self.rows(np.arange(*key.indices(self.n)))
        if np.ndim(key) == 0:
            i = operator.index(key)
            return self.rows([i + self.n if i < 0 else i])[0]
        return self.rows(key)

    def __array__(self, dtype=None, copy=None):
        """Every row, read into memory: ``(n, D)`` (``np.asarray`` of a streamed split)."""
        out = self.rows(np.arange(self.n))
        return out if dtype is None else out.astype(dtype, copy=False)


def open_streamed(path, budget_bytes: Optional[int], test_fraction: float, seed: int = 0):
    """``(StreamedImages train, x_test or None)`` (x_test a host array when it
    fits in half the budget, else streamed too) when loading the
    images in ``path`` would take more than ``budget_bytes`` (None: half the
    free memory): the array as stored plus its float32 copy, 5 bytes a uint8
    pixel, 8 a float32 one (comparing the file's size let a uint8 file at a
    quarter of the budget load to 1.25 times it); else None (load it in
    memory as usual). The split is the loaded one's (``test_fraction``,
    ``seed``; see the module docstring); drawing it holds an N-long
    permutation for a moment (8 bytes a row), as loading does."""
    from fastvae.training.memory import host_available
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npy", ".h5", ".hdf5"):
        return None
    if budget_bytes is None:
        free = host_available()
        budget_bytes = free // 2 if free else None
    if budget_bytes is None:
        return None
    header = _open_rows(path, ext)
    if header is None or int(np.prod(header[0])) * (header[1].itemsize + 4) <= budget_bytes:
        return None
    shape, dtype, reader = header
    if reader is None:
        raise DataError(f"{path} is Fortran-ordered and too large to load ({_mb(shape, dtype)} loaded, over the "
                        f"{budget_bytes / 2 ** 20:.0f} MB budget); write it C-ordered with numpy.save to stream it")
    if len(shape) < 2 or dtype.kind not in "buif":            # bool too, as when it loads
        raise DataError(f"{path}: expected images (N, H, W[, C]) or (N, D) of numbers, got {shape} {dtype}")
    N, D = int(shape[0]), int(np.prod(shape[1:]))
    image_shape = image_shape_of(shape, path)
    row_bytes = D * 4
    chunk_rows = chunk_rows_for(N, row_bytes)
    fits = (budget_bytes // 2) // row_bytes          # test rows held in memory; more are streamed too
    try:
        given = _given_test(path, ext, image_shape, fits, chunk_rows)
    except (DataError, MemoryError):
        raise
    except Exception as exc:        # damaged HDF5 metadata around x_test
        raise DataError(f"cannot read {path}'s test images: {type(exc).__name__}: {str(exc)[:120]}; check the "
                        "file") from None
    if given is not None:           # an HDF5 file's own x_test beside x_train, as when it loads
        return StreamedImages(path, N, D, image_shape, reader, chunk_rows), given
    test = held_out_rows(N, test_fraction, seed)
    train = StreamedImages(path, N - (0 if test is None else len(test)), D, image_shape, reader, chunk_rows,
                           holes=test)
    if test is None:
        return train, None
    x_test = StreamedImages(path, len(test), D, image_shape, reader, chunk_rows, index=test)
    return train, x_test.rows(np.arange(len(test))) if len(test) <= fits else x_test


CHUNK_BYTES = 16 * 2 ** 20     # a chunk's float32 rows at most (a window of MIX: the epoch's working set on disk)
MIX = 16                       # chunks whose rows one window interleaves


def chunk_rows_for(n: int, row_bytes: int) -> int:
    """Rows per chunk of a streamed file of ``n`` rows of ``row_bytes``
    (float32): about 1/64 of the rows, at most ``CHUNK_BYTES`` and 65,536
    rows (a window's index stays small), at least 1. The file alone decides
    it, never the free memory (a chunk is read from disk, not held)."""
    return max(1, min(-(-n // 64), CHUNK_BYTES // max(row_bytes, 1), 65536))


def _mb(shape, dtype) -> str:
    return f"{int(np.prod(shape)) * (dtype.itemsize + 4) / 2 ** 20:.0f} MB"


def _open_rows(path: str, ext: str):
    """``(shape, dtype, reader)`` of the images in an ``.npy`` or HDF5 file,
    from its header; ``reader(idx)`` reads rows ``idx`` (increasing). None
    for a file that is not valid or whose header does not fit its bytes (the
    loader then names the problem); reader None for a Fortran-ordered ``.npy``."""
    try:
        size = os.path.getsize(path)
    except OSError:                 # missing or unreadable: the loader names it ("does not exist; ...")
        return None
    if ext == ".npy":
        try:
            with open_regular(path, "data file", "pass an .npy of images", DataError) as fh:
                shape, fortran, dtype = _npy_header(fh, path)
                offset = fh.tell()
        except DataError:
            return None
        if offset + int(np.prod(shape)) * dtype.itemsize > size:
            return None
        return shape, dtype, None if fortran else _NpyRows(path, offset, dtype, shape)   # closes its file when unused
    try:
        with open_regular(path, "data file", _FIX, DataError) as fh:
            f = SandboxedH5(fh, path, DataError, _FIX, compressed_ok=True, max_compression=MAX_COMPRESSION)
    except DataError:               # the loader names the problem ("does not exist; ...", a crash in the reader)
        return None
    try:
        key = _keys(list(f.members("/")), path, False)[0]
        info = f.dataset(key)
        shape, dtype = info["shape"], np.dtype(info["dtype"])
    except (DataError, TypeError):  # damaged metadata, or text/object values: the loader names it
        f.close()
        return None
    return shape, dtype, _H5Rows(f, key)


class _H5Rows:
    """Rows of one dataset of a sandboxed HDF5 file (the child process stays
    open while the rows are used, and stops when this object is dropped)."""

    def __init__(self, f, key):
        self.f, self.key = f, key

    def __call__(self, idx):
        return self.f.read(self.key, rows=idx)      # increasing, unique indices (rows() sorts them)


def _given_test(path: str, ext: str, image_shape, max_rows: int, chunk_rows: int):
    """The test images of an HDF5 file holding ``x_test`` beside ``x_train``
    (:func:`fastvae.datasets.arrayfiles._keys`): ``(n, D)`` float32 in memory when
    they are ``max_rows`` or fewer, else streamed (:class:`StreamedImages`);
    None for other files. DataError for test images of another shape."""
    if ext == ".npy":
        return None
    with open_regular(path, "data file", _FIX, DataError) as fh:
        f = SandboxedH5(fh, path, DataError, _FIX, compressed_ok=True, max_compression=MAX_COMPRESSION)
    key = _keys(list(f.members("/")), path, False)[2]
    if key is None:
        f.close()
        return None
    shape = f.dataset(key)["shape"]
    same_image_shape(path, tuple(image_shape), image_shape_of(shape, f"{path}[{key}]"))
    if len(shape) and shape[0] > max_rows:          # read as it is used (the child stays open for it)
        return StreamedImages(path, shape[0], int(np.prod(shape[1:])), image_shape, _H5Rows(f, key), chunk_rows)
    with f:
        out = unit_pixels(f.read(key).reshape(shape[0] if shape else 1, -1))
    if not np.all(np.isfinite(out)):
        raise DataError(f"{path}[{key}] holds NaN or infinite values; clean the data first")
    return out


class _NpyRows:
    """Rows of a C-ordered ``.npy`` read with ``pread`` (one call per run of
    consecutive rows). Not a memory map: mapped file pages would count in
    the process's RSS as the epoch touches them all."""

    def __init__(self, path, offset, dtype, shape):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.offset, self.dtype, self.row_shape = offset, dtype, tuple(shape[1:])
        self.row_bytes = int(np.prod(self.row_shape)) * dtype.itemsize

    def __call__(self, idx):
        out = np.empty((len(idx), self.row_bytes), np.uint8)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(idx)]])):
            want = (hi - lo) * self.row_bytes
            raw = os.pread(self.fd, want, self.offset + int(idx[lo]) * self.row_bytes)
            if len(raw) != want:
                raise DataError(f"the data file ends before row {int(idx[hi - 1])}; it was truncated")
            out[lo:hi] = np.frombuffer(raw, np.uint8).reshape(hi - lo, self.row_bytes)
        return out.view(self.dtype).reshape((len(idx),) + self.row_shape)

    def __del__(self):
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


class StreamBatchSource:
    """The :class:`~fastvae.training.parts.BatchSource` interface over
    :class:`StreamedImages`: chunk-shuffled order in windows of ``MIX``
    chunks, rank shards, a prefetch thread. ``pos.perm`` holds the epoch's
    chunk order then one seed per chunk (``2 n_chunks`` int64; a window's
    permutation is seeded by its first chunk's), all a mid-epoch checkpoint needs."""

    def __init__(self, backend, x: StreamedImages, batch_size: int, rng, binarize: bool, rank=0, world_size=1,
                 latent_dim: int = 1, likelihood: str = "bernoulli"):
        self.backend, self.x_host, self.batch_size = backend, x, batch_size
        self.latent_dim, self.likelihood = latent_dim, likelihood
        self.rng, self.binarize, self.rank, self.world_size = rng, binarize, rank, world_size
        self.n_chunks = math.ceil(x.n / x.chunk_rows)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastvae-prefetch")
        self._next, self._last_window = None, None

    min_last = 1           #: as :attr:`fastvae.training.parts.BatchSource.min_last`

    @property
    def steps_per_epoch(self) -> int:
        return epoch_steps(self.x_host.n, self.batch_size, self.min_last)

    def new_epoch(self) -> EpochPosition:
        order = self.backend.to_host(self.rng.permutation(self.n_chunks)).astype(np.int64)
        u = self.backend.scratch("chunk_seeds", (self.n_chunks,))
        self.rng.uniform_(u)
        seeds = (self.backend.to_host(u).astype(np.float64) * 2 ** 31).astype(np.int64)
        self._next = None
        return EpochPosition(perm=np.concatenate([order, seeds]))

    def restore_perm(self, perm):
        """A checkpoint's ``epoch_perm`` as this source keeps it (host int64)."""
        return np.asarray(perm, dtype=np.int64)

    def check_perm(self, perm) -> bool:
        """Whether a checkpoint's ``epoch_perm`` fits this source."""
        k = self.n_chunks
        return perm.shape == (2 * k,) and np.array_equal(np.sort(perm[:k]), np.arange(k))

    def _row_ids(self, perm, lo: int, hi: int) -> np.ndarray:
        """Row numbers at stream positions ``[lo, hi)`` of the epoch."""
        k, C, n = self.n_chunks, self.x_host.chunk_rows, self.x_host.n
        order, seeds = perm[:k], perm[k:]
        sizes = np.minimum(C, n - order * C)
        first = np.arange(0, k, MIX)                             # each window's first place in the order
        starts = np.concatenate([[0], np.cumsum(np.add.reduceat(sizes, first))])
        out = []
        for w in range(np.searchsorted(starts, lo, "right") - 1, len(first)):
            if starts[w] >= hi:
                break
            rows = self._window(order, seeds, sizes, int(first[w]), C)
            a, b = max(lo, starts[w]) - starts[w], min(hi, starts[w + 1]) - starts[w]
            out.append(rows[a:b])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _window(self, order, seeds, sizes, j: int, C: int) -> np.ndarray:
        """The rows of the window starting at place ``j`` of the chunk order,
        in their seeded order (the last one kept: a batch and the prefetched
        next one mostly fall in the same window)."""
        key = (j, int(seeds[j]), tuple(order[j:j + MIX].tolist()))
        cached = self._last_window
        if cached is not None and cached[0] == key:
            return cached[1]
        rows = np.concatenate([int(c) * C + np.arange(int(m)) for c, m in zip(order[j:j + MIX], sizes[j:j + MIX])])
        rows = rows[np.random.Generator(np.random.PCG64([int(seeds[j]), int(order[j])])).permutation(len(rows))]
        self._last_window = (key, rows)
        return rows

    def _shard_rows(self, perm, b: int):
        n = min(self.batch_size, self.x_host.n - b * self.batch_size)
        lo, hi = shard(n, self.rank, self.world_size)
        ids = self._row_ids(perm, b * self.batch_size + lo, b * self.batch_size + hi)
        return n, lo, hi, (self.x_host.rows(ids) if len(ids) else None)

    def next_batch(self, pos: EpochPosition, b: int):
        """This rank's rows of batch ``b`` as a :class:`~fastvae.training.parts.Batch` in this
        source's own buffers; None for an empty shard."""
        be, perm = self.backend, np.asarray(pos.perm)
        fut = self._next if self._next is not None and self._next[0] == b else None
        n, lo, hi, host = fut[1].result() if fut else self._shard_rows(perm, b)
        self._next = None
        if b + 1 < self.steps_per_epoch:
            self._next = (b + 1, self._pool.submit(self._shard_rows, perm, b + 1))
        if self.binarize:
            u = be.scratch("stream_u", (n, self.x_host.D))
            self.rng.uniform_(u)
        epsg = be.scratch("global_eps", (n, self.latent_dim))
        self.rng.normal_(epsg)
        self.last_global_batch = n
        if hi == lo:
            return None
        if self.likelihood == "bernoulli" and (host.min() < 0 or host.max() > 1):
            raise DataError(f"{self.x_host.path}: values outside [0, 1] but the bernoulli likelihood needs "
                            f"[0, 1]; rescale the data or use {option('likelihood', 'gaussian')}")
        from fastvae.training.parts import Batch
        x = be.scratch(("batch_x",), (hi - lo, self.x_host.D))
        eps = be.scratch(("batch_eps",), (hi - lo, self.latent_dim))
        x[...] = be.asarray(host)
        if self.binarize:
            x[...] = (u[lo:hi] < x).astype(x.dtype)
        eps[...] = epsg[lo:hi]
        return Batch(x, eps, n, (lo, hi))
