"""Where fastvae keeps what it caches on a user's machine: never inside its
own install folder (files pip did not install outlive an uninstall and
shadow the next install).

:func:`cache_dir` is ``$FASTVAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastvae``,
else ``~/.cache/fastvae``; it holds ``blas.json`` (the measured GEMM library,
:mod:`fastvae.backends.cpu.gemm_library`) and ``numba/`` (Numba's compiled
kernels, unless ``NUMBA_CACHE_DIR`` names another folder). May import: the
standard library only.
"""

from __future__ import annotations

import os


def cache_dir() -> str:
    """The user cache folder (not created here)."""
    return os.environ.get("FASTVAE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastvae")


def use_numba_cache() -> str:
    """Point Numba's on-disk cache at ``<cache_dir>/numba`` unless
    ``NUMBA_CACHE_DIR`` is set (through the environment, which Numba re-reads,
    and its config, for a Numba imported already); returns the folder. Runs
    before any kernel is decorated (``fastvae.kernels`` calls it first)."""
    folder = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(cache_dir(), "numba")
    os.environ["NUMBA_CACHE_DIR"] = folder
    try:
        from numba.core import config
    except ImportError:                 # no Numba: nothing to point
        return folder
    config.CACHE_DIR = folder
    return folder
