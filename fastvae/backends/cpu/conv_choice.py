"""The convolution algorithm of each layer, by measurement: ``im2col`` (a
column buffer around one GEMM) or ``direct`` (the Numba kernels that read the
image in place, :mod:`fastvae.kernels.numba_conv`), timed on the layer's own
shapes the first time a layer of that geometry and batch size runs, and
cached in the GEMM-library choice's file under the same key parts (machine,
BLAS libraries and their versions, thread limit: :func:`gemm_library.cache_key`),
so a later run, a resume included, takes the same algorithm at once, and
with it the same bits.

``FASTVAE_CONV=im2col`` or ``direct`` in the environment, or the backend's
``conv_choice`` attribute, fixes the algorithm for every layer instead
(``auto``, the default, measures).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Optional

from fastvae.backends.cpu import gemm_library
from fastvae.backends.cpu.compare import compare

ALGORITHMS = ("im2col", "direct")
CHOICES = ALGORITHMS + ("auto",)


def forced(backend) -> str:
    """The algorithm fixed for every layer (``FASTVAE_CONV`` first, then the
    backend's ``conv_choice``), or ``auto``. ValueError for another value."""
    choice = os.environ.get("FASTVAE_CONV") or getattr(backend, "conv_choice", "auto")
    if choice not in CHOICES:
        raise ValueError(f"FASTVAE_CONV must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def choose(backend, signature: str, trials: Dict[str, Callable[[], None]],
           cache: Optional[str] = None) -> str:
    """The algorithm of ``trials`` (name -> a callable running the layer's
    forward and backward with it) that runs fastest, from the cache when it
    holds this ``signature`` on this machine, else measured (5 interleaved
    rounds, :func:`~fastvae.backends.cpu.compare.compare`) and stored
    (atomically; a cache that cannot be written costs a measurement next time)."""
    choice = forced(backend)
    if choice != "auto":
        return choice if choice in trials else "im2col"
    names = [n for n in ALGORITHMS if n in trials]
    if len(names) == 1:
        return names[0]
    path = cache or gemm_library.cache_path()
    key = gemm_library.cache_key([backend.blas.name], "conv " + signature)
    entries = gemm_library.read_entries(path)
    hit = entries.get(key)
    if hit and hit.get("choice") in names:
        return hit["choice"]
    state = {}
    ms = compare({n: (lambda n=n: state.__setitem__("algo", n)) for n in names},
                 lambda: (trials[state["algo"]](), backend.synchronize()), rounds=5)
    best = min(names, key=ms.get)
    entries[key] = {"choice": best, "ms": ms, "signature": "conv " + signature}
    try:
        from fastvae.training.runfolder import atomic_write_text
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps(entries, indent=1, sort_keys=True))
    except Exception:
        pass
    return best
