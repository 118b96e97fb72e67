"""CPU thread control for BLAS and Numba together (via threadpoolctl).

The Numba kernels are serial and run between BLAS calls, so the BLAS thread
count is the one that matters. Measured on the 2-core development machines
(``fastvae bench``): BLAS on both cores is fastest for every workload on an
idle machine, which is also OpenBLAS's default, so fastvae changes nothing
unless asked. With another process busy on one of the two cores, OpenBLAS on
both cores took the 784-400-20/b128 step from 5.7 ms (one thread) to 10.0 ms
(``bench/results/cpu_busy_threads*.md``): ``--threads auto``
(:func:`autotune`) measures the choice instead of assuming it.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Optional

from .errors import ConfigError

_limiter = None
_limit: Optional[int] = None


def set_threads(n: Optional[int]) -> dict:
    """Limit BLAS (and Numba, when loaded) to ``n`` threads; ``None`` leaves
    the libraries' defaults. Returns ``{"blas": [...], "numba": int or None}``
    as in force afterwards. Raises ConfigError for ``n < 1``."""
    global _limiter, _limit
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"--threads must be a positive integer, got {n!r}")
        _limit = n
        from threadpoolctl import threadpool_limits
        _limiter = threadpool_limits(limits=n, user_api="blas")
        import sys
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
    matters) fastest: for each candidate (default: the usable cores, half of
    them, 1) one warm-up call, then the median of ``repeats`` timed calls.
    Returns ``{"threads": chosen, "ms": {candidate: median ms}}``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cands = list(candidates or sorted({cores, max(1, cores // 2), 1}, reverse=True))
    ms = {}
    for n in cands:
        set_threads(n)
        probe()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            probe()
            times.append(time.perf_counter() - t)
        ms[n] = 1e3 * statistics.median(times)
    best = min(ms, key=ms.get)
    set_threads(best)
    return {"threads": best, "ms": ms}


def model_probe(model, batch_size: int) -> Callable[[], None]:
    """Representative work for a measured choice: ``model``'s forward +
    backward (``loss_and_grad`` on a random batch of ``batch_size``; it writes
    only the gradient buffer, which the first training step overwrites)."""
    import numpy as np
    r = np.random.default_rng(0)
    x = model.backend.asarray(r.random((batch_size, model.config.input_dim)))
    eps = model.backend.zeros((batch_size, model.config.latent_dim))
    return lambda: (model.loss_and_grad(x, eps), model.backend.synchronize())


def autotune_model(model, batch_size: int) -> str:
    """``--threads auto``: :func:`autotune` on :func:`model_probe`; returns a
    note for the log."""
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
