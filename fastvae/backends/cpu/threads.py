"""CPU thread control for BLAS and Numba together (via threadpoolctl).

The Numba kernels are serial and run between BLAS calls, so the BLAS thread
count is the one that matters. BLAS on every core is OpenBLAS's default,
and fastvae changes nothing unless asked, except for OpenBLAS's idle spin
when the NumPy backend runs its Adam, or a CPU backend its im2col/col2im, on
two threads (:func:`fit_backend`). With another process busy on a core, one
BLAS thread can beat two (``bench/RESULTS.md``): ``--threads auto``
(:func:`autotune`) measures the choice instead of assuming it.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from fastvae.errors import ConfigError
from fastvae.naming import option

_limiter = None
_limit: Optional[int] = None
#: OpenBLAS's idle threads spin 2^n cycles before they sleep (its THREAD_TIMEOUT,
#: 28 unless built otherwise: ~0.1 s); 4 is the least it takes: they sleep at once
SPIN_DEFAULT, SPIN_SHORT = 28, 4
_spin: Optional[int] = None                                 # what fastvae set last (None: never touched)
_USER_SPIN = os.environ.get("OPENBLAS_THREAD_TIMEOUT")      # the user's own setting is left alone
_NOTE = "; {} on 2 threads (OpenBLAS's idle threads sleep at once)"
ADAM_NOTE = _NOTE.format("Adam")


def set_threads(n: Optional[int]) -> dict:
    """Limit BLAS (and Numba, when loaded) to ``n`` threads; ``None`` leaves
    the libraries' defaults. Returns ``{"blas": [...], "numba": int or None}``
    as in force afterwards. Raises ConfigError for ``n < 1``; a note on
    stderr when ``n`` exceeds the cores this process may use (oversubscribed
    BLAS threads wait for each other)."""
    global _limiter, _limit
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{option('threads')} must be a positive integer, got {n!r}")
        import sys
        if n > usable_cores() and n != _limit:
            print(f"fastvae: note: {option('threads', n)} is more than the {usable_cores()} cores this process may "
                  "use; threads beyond them share cores and run slower", file=sys.stderr)
        _limit = n
        from threadpoolctl import threadpool_limits
        _limiter = threadpool_limits(limits=n, user_api="blas")
        if "numba" in sys.modules:
            import numba
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return current()


def reapply() -> None:
    """Set the last :func:`set_threads` limit again, so that it covers a
    library loaded since (``--blas mkl``); nothing when none was set."""
    if _limit is not None:
        set_threads(_limit)


def autotune(probe: Callable[[], None], candidates=None, repeats: int = 5) -> dict:
    """Set the thread count that runs ``probe()`` (a representative piece of
    work, e.g. a forward and backward pass; it must not change any state that
    matters) fastest: each candidate (default: the usable cores, half of
    them, 1) in ``repeats`` interleaved rounds of one untimed and one timed
    call (:func:`fastvae.backends.cpu.compare.compare`), the median kept. Returns
    ``{"threads": chosen, "ms": {candidate: median ms}}``."""
    from fastvae.backends.cpu.compare import compare
    cores = usable_cores()
    cands = list(candidates or sorted({cores, max(1, cores // 2), 1}, reverse=True))
    ms = compare({n: (lambda n=n: set_threads(n)) for n in cands}, probe, repeats)
    best = min(ms, key=ms.get)
    set_threads(best)
    return {"threads": best, "ms": ms}


def autotune_model(model, batch_size: int) -> str:
    """``--threads auto``: :func:`autotune` on :func:`fastvae.backends.cpu.compare.model_probe`;
    returns a note for the log."""
    from fastvae.backends.cpu.compare import model_probe
    res = autotune(model_probe(model, batch_size))
    return f"; threads auto: {res['threads']} (" + ", ".join(f"{n}: {v:.2f}" for n, v in res["ms"].items()) + " ms)"


def current() -> dict:
    """Thread settings in force: BLAS libraries and their thread counts, Numba's."""
    import sys
    from threadpoolctl import threadpool_info
    blas = [{"library": i.get("internal_api"), "threads": i.get("num_threads"),
             "architecture": i.get("architecture")} for i in threadpool_info() if i.get("user_api") == "blas"]
    nb = None
    if "numba" in sys.modules:
        import numba
        nb = numba.get_num_threads()
    return {"blas": blas, "numba": nb}


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def numpy_blas() -> Optional[dict]:
    """threadpoolctl's entry for the BLAS NumPy was built with (the one its
    wheels bundle under ``numpy.libs``), or None where it is not found."""
    from threadpoolctl import threadpool_info
    return next((i for i in threadpool_info() if i.get("user_api") == "blas"
                 and "numpy" in os.path.dirname(i.get("filepath", ""))), None)


def openblas_spin(log2_cycles: int) -> bool:
    """Make the idle threads of NumPy's OpenBLAS spin ``2**log2_cycles`` CPU
    cycles (4-30) after each call before they sleep, as its documented
    ``OPENBLAS_THREAD_TIMEOUT`` does at start-up: the variable is read again
    (``openblas_read_env``) and the thread pool restarted
    (``blas_thread_shutdown_``, ``blas_thread_init``; what OpenBLAS itself does
    around a fork). Thread counts are kept. Call it between BLAS calls, never
    while another thread may be in one. Returns False, changing nothing, where
    OpenBLAS is not NumPy's BLAS, is not a pthreads build exposing those three
    functions, or where the user set ``OPENBLAS_THREAD_TIMEOUT``."""
    global _spin
    if _USER_SPIN is not None:
        return False
    if _spin == log2_cycles:
        return True
    info = numpy_blas()
    if not info or info.get("internal_api") != "openblas" or info.get("threading_layer") != "pthreads":
        return False
    import ctypes
    try:
        lib = ctypes.CDLL(info["filepath"])
        fns = [getattr(lib, n) for n in ("openblas_read_env", "blas_thread_shutdown_", "blas_thread_init")]
    except (OSError, AttributeError):
        return False
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(int(log2_cycles))
    try:
        for fn in fns:
            fn()
    finally:
        del os.environ["OPENBLAS_THREAD_TIMEOUT"]           # read now; child processes get their own default
    _spin = log2_cycles
    return True


def fit_backend(be, model) -> str:
    """Fit the process's threads to CPU backend ``be`` before it trains
    ``model`` (anything with ``num_params`` and ``layers``; before each
    benchmark chunk too). Where two cores and two BLAS threads are there and
    NumPy's OpenBLAS is the GEMM library, and it can be told to let its idle
    threads sleep at once (spinning, they hold the second core): the NumPy
    backend runs its Adam update on two threads for a model of
    ``be.ADAM_SPLIT_MIN`` parameters or more (two Adam threads win only
    beside BLAS threads that sleep at once: ``bench/RESULTS.md``), and
    both CPU backends their im2col/col2im for a model with convolutions
    (``copy_threads``). Anything else (the Numba backend's MLPs, MKL, one
    core or BLAS thread) runs them on one thread and gets OpenBLAS's default
    spin back if fastvae changed it. Returns a note for the log."""
    cores = usable_cores()
    info = numpy_blas() if getattr(be, "device", None) == "cpu" else None
    two = (cores >= 2 and info is not None and (info.get("num_threads") or 1) >= 2
           and getattr(getattr(be, "blas", None), "name", None) == "numpy")
    adam = two and getattr(be, "MAX_ADAM_THREADS", 1) >= 2 and model.num_params >= be.ADAM_SPLIT_MIN
    copies = (two and getattr(be, "MAX_COPY_THREADS", 1) >= 2
              and any(getattr(layer, "cols_per_image", 0) for layer in model.layers))
    if (adam or copies) and openblas_spin(SPIN_SHORT):
        be.adam_threads, be.copy_threads = (2 if adam else 1), (2 if copies else 1)
        what = " and ".join(w for w, on in (("Adam", adam), ("im2col/col2im", copies)) if on)
        return _NOTE.format(what)
    for name in ("adam_threads", "copy_threads"):
        if hasattr(be, name):
            setattr(be, name, 1)
    if _spin not in (None, SPIN_DEFAULT) and info is not None:
        openblas_spin(SPIN_DEFAULT)
    return ""
