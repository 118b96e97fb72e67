"""CPU thread control for BLAS and Numba together (via threadpoolctl).

The Numba kernels are serial and run between BLAS calls, so the BLAS thread
count is the one that matters. Measured on the 2-core development machine
(``fastvae bench``): BLAS on both cores is fastest for every workload, which
is also OpenBLAS's default, so fastvae changes nothing unless asked.
"""

from __future__ import annotations

from typing import Optional

from .errors import ConfigError

_limiter = None


def set_threads(n: Optional[int]) -> dict:
    """Limit BLAS (and Numba, when loaded) to ``n`` threads; ``None`` leaves
    the libraries' defaults. Returns ``{"blas": [...], "numba": int or None}``
    as in force afterwards. Raises ConfigError for ``n < 1``."""
    global _limiter
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"--threads must be a positive integer, got {n!r}")
        from threadpoolctl import threadpool_limits
        _limiter = threadpool_limits(limits=n, user_api="blas")
        import sys
        if "numba" in sys.modules:
            import numba
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return current()


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
