"""GEMM libraries for the CPU backends, by name or by measurement.

``numpy`` (the default) is NumPy's own BLAS through ``np.matmul``: OpenBLAS in
NumPy's PyPI wheels, whatever NumPy was built with elsewhere. ``mkl`` is Intel
MKL through its CBLAS interface (``cblas_sgemm`` / ``cblas_dgemm``, row-major,
LP64), loaded from the ``mkl`` wheel (``pip install "fastvae[mkl]"``), from
``$FASTVAE_MKL_LIB`` or from the system's ``libmkl_rt``; it is never a hard
dependency. ``auto`` times the model's own forward + backward pass with each
library that loads, interleaved (:func:`measure`), keeps the fastest and
caches the choice per machine, library versions, thread count and model
shape (:func:`choose`), so later runs start at once.

Why measure: which library is faster depends on the CPU (figures per machine
in ``bench/RESULTS.md``). Results differ between libraries in the last
float32 bits (another summation order), so a bit-for-bit resume needs the
same library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import platform
from typing import Callable, Dict, List, Optional

import numpy as np

from fastvae.errors import ConfigError
from fastvae.naming import option

CHOICES = ("numpy", "mkl", "auto")
LIBRARIES = ("numpy", "mkl")
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


class NumpyGemm:
    """``out = op(a) @ op(b)`` through ``np.matmul`` (NumPy's BLAS): ``op(a)
    (m, k)``, ``op(b) (k, n)``, ``out (m, n)``; NumPy's dtype rules and errors."""

    name = "numpy"

    def gemm(self, out, a, b, trans_a=False, trans_b=False):
        np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)
        return out

    def version(self) -> str:
        from fastvae.backends.cpu.threads import numpy_blas
        i = numpy_blas()
        lib = f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}" if i else "its BLAS"
        return f"numpy {np.__version__} ({lib})" + pinned_kernels_note(i)


#: the AVX-512 subsets OpenBLAS's SkylakeX kernels need, and its kernels that use none of them
_AVX512 = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
_NARROW = ("haswell", "zen", "sandybridge", "nehalem", "prescott", "core2")


def pinned_kernels_note(info: Optional[dict], flags=None) -> str:
    """'' unless ``OPENBLAS_CORETYPE`` pins NumPy's OpenBLAS (threadpoolctl's
    ``info``) to kernels without AVX-512 on a CPU that has it (``flags``:
    ``/proc/cpuinfo``'s): then a note that unpinned, OpenBLAS picks its
    AVX-512 kernels, faster and rounding differently (``bench/RESULTS.md``)."""
    pinned = os.environ.get("OPENBLAS_CORETYPE")
    arch = str((info or {}).get("architecture", "")).lower()
    if not pinned or (info or {}).get("internal_api") != "openblas" or arch not in _NARROW:
        return ""
    if flags is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
                flags = next((line.partition(":")[2].split() for line in fh if line.startswith("flags")), ())
        except OSError:
            flags = ()
    if not _AVX512 <= frozenset(flags):
        return ""
    return (f"; OPENBLAS_CORETYPE={pinned} pins these kernels on a CPU with AVX-512: unset, OpenBLAS picks its "
            "AVX-512 ones (up to 1.9x faster GEMMs, other last bits)")


def _ld(x) -> Optional[int]:
    """Leading dimension (in elements) of a 2-D array BLAS can read in place,
    or None: rows must be unit-stride and their distance a whole, non-negative
    number of elements no smaller than a row."""
    if x.ndim != 2:
        return None
    s0, s1 = x.strides
    item = x.itemsize
    if x.shape[1] > 1 and s1 != item:
        return None
    if x.shape[0] <= 1:
        return max(x.shape[1], 1)
    if s0 % item or s0 // item < max(x.shape[1], 1):
        return None
    return s0 // item


class CblasGemm:
    """``out = op(a) @ op(b)`` through a CBLAS library's ``cblas_?gemm``
    (row-major). Shapes: ``op(a) (m, k)``, ``op(b) (k, n)``, ``out (m, n)``,
    all float32 or all float64. Anything BLAS cannot take in place (mixed
    dtypes, non-unit strides, ``out`` overlapping an input, sizes past the
    library's integers, empty sizes, shape mismatches) goes through
    ``np.matmul`` instead, so the result and the errors are NumPy's.

    ``symbol``: the function names with ``{}`` for ``s``/``d`` (MKL's
    ``cblas_{}gemm``); ``int_type``: the library's integer (``c_int`` for
    LP64, ``c_int64`` for ILP64 builds). Raises OSError or AttributeError
    when ``path`` is not such a library."""

    def __init__(self, name: str, path: str, symbol: str = "cblas_{}gemm", int_type=ctypes.c_int):
        self.name, self.path = name, path
        self.lib = ctypes.CDLL(path)
        e, i, p = ctypes.c_int, int_type, ctypes.c_void_p
        self._max = 2 ** (8 * ctypes.sizeof(int_type) - 1) - 1
        self._fn = {}
        for dt, letter, scalar in ((np.float32, "s", ctypes.c_float), (np.float64, "d", ctypes.c_double)):
            f = getattr(self.lib, symbol.format(letter))
            f.argtypes = [e, e, e, i, i, i, scalar, p, i, p, i, scalar, p, i]
            f.restype = None
            self._fn[np.dtype(dt)] = f

    def gemm(self, out, a, b, trans_a=False, trans_b=False):
        f = self._fn.get(out.dtype)
        lda, ldb, ldc = _ld(a), _ld(b), _ld(out)
        m, n = out.shape if out.ndim == 2 else (0, 0)
        k = (a.shape[0] if trans_a else a.shape[1]) if a.ndim == 2 else 0
        if (f is None or a.dtype != out.dtype or b.dtype != out.dtype or None in (lda, ldb, ldc)
                or 0 in (m, n, k) or max(m, n, k, lda, ldb, ldc) > self._max
                or (a.shape[1] if trans_a else a.shape[0]) != m or b.shape != ((n, k) if trans_b else (k, n))
                or not out.flags.writeable or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
            np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)
            return out
        f(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n, k,
          1.0, a.ctypes.data, lda, b.ctypes.data, ldb, 0.0, out.ctypes.data, ldc)
        return out

    def version(self) -> str:
        buf = ctypes.create_string_buffer(256)
        try:
            self.lib.MKL_Get_Version_String(buf, len(buf))
            return buf.value.decode(errors="replace").strip()
        except AttributeError:
            return self.path


def _mkl_path() -> Optional[str]:
    """libmkl_rt: ``$FASTVAE_MKL_LIB``, else the ``mkl`` wheel's, else the system's."""
    env = os.environ.get("FASTVAE_MKL_LIB")
    if env:
        return env
    try:
        import importlib.metadata as md
        dist = md.distribution("mkl")
        for f in dist.files or []:
            if os.path.basename(str(f)).startswith("libmkl_rt.so"):
                return str(dist.locate_file(f))
    except Exception:             # no wheel, or a broken record: look on the system
        pass
    return ctypes.util.find_library("mkl_rt")


_loaded: Dict[str, object] = {"numpy": NumpyGemm()}


def load(name: str):
    """The GEMM library ``name`` (one of :data:`LIBRARIES`), loaded once.
    Raises ConfigError naming the fix when it is unknown or not installed."""
    if name not in LIBRARIES:
        raise ConfigError(f"unknown BLAS library {name!r}; choose from {', '.join(LIBRARIES)}")
    if name not in _loaded:
        path = _mkl_path()
        if not path:
            raise ConfigError(f'{option("blas", "mkl")}: Intel MKL is not installed; pip install "fastvae[mkl]" '
                              f"(or set FASTVAE_MKL_LIB to a libmkl_rt), or use {option('blas', 'numpy')}")
        try:
            _loaded[name] = CblasGemm(name, path)
        except (OSError, AttributeError) as exc:
            raise ConfigError(f"{option('blas', 'mkl')}: {path} does not load as a CBLAS library ({exc}); "
                              f'reinstall it (pip install "fastvae[mkl]") or use {option("blas", "numpy")}') from None
        from fastvae.backends.cpu.threads import reapply
        reapply()                  # a thread limit set earlier covers the new library too
    return _loaded[name]


def libraries() -> List[dict]:
    """Each library: ``{"name", "available", "detail"}`` (its version, or why it does not load)."""
    out = []
    for name in LIBRARIES:
        try:
            out.append({"name": name, "available": True, "detail": load(name).version()})
        except ConfigError as exc:
            out.append({"name": name, "available": False, "detail": str(exc)})
    return out


def available() -> List[str]:
    """The libraries that load here, ``numpy`` first."""
    return [lib["name"] for lib in libraries() if lib["available"]]


def use(backend, name: str) -> None:
    """Route ``backend``'s GEMMs through library ``name``. Raises ConfigError
    for a backend that does not run on the CPU (cupy uses cuBLAS)."""
    if not hasattr(backend, "blas"):
        raise ConfigError(f"{option('blas')} applies to the CPU backends (numpy, numba), not {backend.name}; "
                          f"drop {option('blas')}")
    backend.blas = load(name)


SETTLE_S = 0.3
"""Seconds to wait before timing another library: Intel OpenMP's threads
spin 200 ms after each parallel region (``KMP_BLOCKTIME``), holding a core
that the next library's threads need."""


def measure(backend, work: Callable[[], None], names: List[str], rounds: int = 5,
            settle: Optional[float] = None) -> Dict[str, float]:
    """Median ms of ``work()`` with each library in ``names``
    (:func:`fastvae.backends.cpu.compare.compare`: ``rounds`` interleaved rounds, the order
    rotated, ``settle`` seconds of idle before each, default
    :data:`SETTLE_S`); the backend keeps its library afterwards."""
    from fastvae.backends.cpu.compare import compare
    before = backend.blas
    try:
        return compare({n: (lambda n=n: setattr(backend, "blas", load(n))) for n in names}, work, rounds,
                       SETTLE_S if settle is None else settle)
    finally:
        backend.blas = before


def cache_path() -> str:
    """``blas.json`` in the user cache folder (:func:`fastvae.cache.cache_dir`)."""
    from fastvae.cache import cache_dir
    return os.path.join(cache_dir(), "blas.json")


def read_entries(path: str) -> dict:
    """Every well-formed entry of the choice cache (GEMM libraries and the
    convolution algorithms of :mod:`fastvae.backends.cpu.conv_choice`); a
    missing, unreadable or malformed file is an empty cache."""
    from fastvae.io.safe_files import open_regular, parse_json
    try:
        with open_regular(path, "BLAS choice cache", "") as fh:      # never blocks on a FIFO
            raw = fh.read(1 << 20)
        data = parse_json(raw.decode("utf-8"), path, ValueError)
    except (OSError, ValueError):                                     # UnicodeDecodeError is a ValueError
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and v.get("choice") in LIBRARIES + ("im2col", "direct")}


def cache_key(names: List[str], signature: str) -> str:
    """What a cached choice depends on: the machine, the libraries and their
    versions, the thread limit in force, and ``signature`` (the model shape)."""
    from fastvae.backends.cpu.threads import current
    libs = sorted(json.dumps(b, sort_keys=True) for b in current()["blas"])    # threadpoolctl's order varies
    parts = [platform.machine(), platform.processor() or "", str(os.cpu_count()), *libs, signature,
             *(load(n).version() for n in names)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def choose(backend, work: Callable[[], None], signature: str, cache: Optional[str] = None) -> dict:
    """``--blas auto``: the library that runs ``work()`` fastest, from the
    cache when it holds this key, else measured (:func:`measure`) and stored
    (written atomically; a bad cache file is replaced). Sets it on
    ``backend``. Returns ``{"blas", "ms" (None when cached), "cached"}``."""
    names = available()
    path = cache or cache_path()
    key = cache_key(names, signature)
    entries = read_entries(path)
    hit = entries.get(key)
    if hit and hit["choice"] in names:
        backend.blas = load(hit["choice"])
        return {"blas": hit["choice"], "ms": None, "cached": True}
    ms = measure(backend, work, names) if len(names) > 1 else {names[0]: None}
    best = min(names, key=lambda n: ms[n] if ms[n] is not None else 0.0)
    backend.blas = load(best)
    entries[key] = {"choice": best, "ms": ms, "signature": signature}
    try:
        from fastvae.training.runfolder import atomic_write_text
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps(entries, indent=1, sort_keys=True))
    except Exception:            # a cache that cannot be written only costs a measurement next time
        pass
    return {"blas": best, "ms": ms, "cached": False}


def configure(model, choice: Optional[str], batch_size: int) -> str:
    """Apply ``--blas`` to ``model``'s backend (None: leave NumPy's); for
    ``auto`` the work measured is :func:`fastvae.backends.cpu.compare.model_probe`.
    Returns a note for the training log. Raises ConfigError for an unknown
    choice, a backend off the CPU, or MKL asked for and not loadable."""
    if choice is None:
        return ""
    if choice not in CHOICES:
        raise ConfigError(f"{option('blas')} must be one of {', '.join(CHOICES)}, got {choice!r}")
    be = model.backend
    if choice != "auto":
        use(be, choice)
        return f"; blas {choice}"
    from fastvae.backends.cpu.compare import model_probe
    use(be, "numpy")
    sig = json.dumps([model.config.to_dict(), batch_size, str(be.dtype), be.name], sort_keys=True, default=str)
    res = choose(be, model_probe(model, batch_size), sig)
    if res["cached"]:
        return f"; blas auto: {res['blas']} (cached in {cache_path()})"
    return f"; blas auto: {res['blas']} (" + ", ".join(
        f"{n}: {v:.2f} ms" if v is not None else n for n, v in res["ms"].items()) + ")"
