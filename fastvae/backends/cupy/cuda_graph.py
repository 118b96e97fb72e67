"""CUDA graphs for the CuPy backend: a training step captured once and replayed.

A step launches ~30-100 kernels and GEMMs; eagerly each costs the host
microseconds of Python and driver time, which dominates small models on a
GPU. :func:`capture` records one call of a step function with CuPy's stream
capture (``cudaStreamBeginCapture``, CUDA Programming Guide, "CUDA Graphs");
:meth:`Recording.replay` runs the step again as one ``cudaGraphLaunch``.

What makes a replay equal to an eager step, bit for bit:

* Per-step values are not frozen into the graph: the kernels read Adam's
  bias-corrected step, the KL weight and the Philox counters from device
  slots (see ``kernels/cuda_kernels.cu``). A replay runs the step function
  with launches suppressed: the host code (Adam's step count, the RNG
  counters, the schedules) runs as usual and every per-step value lands in a
  pinned staging buffer, copied to the slots right before the launch.
* Every suppressed launch is checked against the captured one: the same
  kernel or CuPy function, the same arrays (device pointer, shape, strides,
  dtype) and the same frozen scalars. At the first difference (another batch
  size, a changed constant, a direct array operation that bypasses the
  backend) the replay turns eager: the staged values are uploaded, the launches
  suppressed so far run in order, and the rest of the step runs eagerly. The
  step is then exactly the eager step; the caller drops the graph.
* Buffers allocated during capture come from a private memory pool that
  lives as long as the backend, so no later allocation reuses memory a graph
  writes.

Direct array operations (``backend.xp``) are refused during capture
(:class:`GraphUnsafeError`): only the backend's own primitives are captured
(:mod:`fastvae.backends.cupy.graph_support`; the primitives that ``Backend``
writes as array expressions count as one operation each).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import numpy as np

from fastvae.errors import FastVAEError
from fastvae.naming import option

#: 64-bit words of per-step values one graph may carry (float slots first, then counters)
SLOT_WORDS = 64
_COUNTER_AT = 32          # word offset of the Philox counter slots
_RING = 4                 # staging buffers in flight (host waits when the device is this far behind)


class GraphUnsafeError(FastVAEError, RuntimeError):
    """The step did something a CUDA graph cannot capture (a direct array
    operation, a host synchronisation, too many per-step values), or the
    backend has no graphs."""


def _same(a: tuple, b: tuple, array, ptr) -> bool:
    """Whether a replay's arguments ``a`` are the captured ``b`` (tuples):
    arrays (type ``array``) by pointer, shape, strides and dtype, scalars by
    type and value, nested tuples element-wise."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is y:
            continue
        t = type(x)
        if t is not type(y):
            return False
        if t is array:
            if x.shape != y.shape or x.strides != y.strides or x.dtype != y.dtype or ptr(x) != ptr(y):
                return False
        elif t is tuple:
            if not _same(x, y, array, ptr):
                return False
        elif x != y:
            return False
    return True


def _same_kw(a: dict, b: dict, array, ptr) -> bool:
    """:func:`_same` for keyword arguments (dicts): the same keys, each value the same."""
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if x is not y and not _same((x,), (y,), array, ptr):
            return False
    return True


class Recording:
    """One captured step: its launch list (what replays are checked against),
    the arrays it allocated, and its per-step value slots."""

    def __init__(self, backend):
        be = self.be = backend
        self._array = be._xp.ndarray
        self.ops: List[Tuple[Any, tuple, tuple]] = []     # (function, args, keyword items) as captured
        self.allocs: list = []
        self.graph = None
        self.slots = be._xp.zeros(SLOT_WORDS, np.uint64)
        self._views: dict = {}
        self.ring = [be._pinned(SLOT_WORDS) for _ in range(_RING)]
        self.events: list = [None] * _RING
        self.replays = 0
        self._mode = "capture"
        self._reset(self.ring[0])

    def _reset(self, staging):
        self.staging = staging
        self._float = staging[:_COUNTER_AT].view(self.be.dtype)
        self._pos = self._alloc_pos = 0
        self._nfloat = self._ncounter = 0
        self._pending: list = []

    # ---- called by the backend's wrappers ------------------------------------------
    def op(self, f, args, kw):
        """Device work ``f(*args, **kw)``: captured (and recorded), or in a
        replay checked against the captured one and suppressed (or, at the
        first difference, run eagerly after what was suppressed before it)."""
        if self._mode == "capture":
            self.ops.append((f, args, kw))      # keeps the captured arrays alive
            self.be._capture_op(f, args, kw)
            return
        i = self._pos
        self._pos += 1
        if i < len(self.ops):
            cf, cargs, ckw = self.ops[i]
            if (cf is f and _same(args, cargs, self._array, self.be._ptr)
                    and ((not kw and not ckw) or _same_kw(kw, ckw, self._array, self.be._ptr))):
                self._pending.append((f, args, kw))
                return
        self._diverge()
        f(*args, **kw)

    def alloc(self, shape, dtype):
        """A new device array the step returns: allocated at capture (private
        pool) and the same array on every replay."""
        if self._mode == "capture":
            a = self.be._xp.empty(shape, dtype)
            self.allocs.append(a)
            return a
        i = self._alloc_pos
        self._alloc_pos += 1
        if i < len(self.allocs) and self.allocs[i].shape == tuple(shape) and self.allocs[i].dtype == dtype:
            return self.allocs[i]
        self._diverge()
        return self.be._xp.empty(shape, dtype)

    def floats(self, values):
        """The device slot holding ``values`` (backend dtype) for this step;
        None when a replay ran out of slots and turned eager."""
        k, n = self._nfloat, len(values)
        if k + n > self._float.size:
            return self._refuse(f"more than {self._float.size} per-step values")
        self._float[k:k + n] = values
        self._nfloat += n
        return self._slot_view(True, k, n)

    def counter(self, c):
        """The device slot holding Philox counter ``c`` for this step (None as for :meth:`floats`)."""
        k = _COUNTER_AT + self._ncounter
        if k >= SLOT_WORDS:
            return self._refuse(f"more than {SLOT_WORDS - _COUNTER_AT} random draws")
        self.staging[k] = c
        self._ncounter += 1
        return self._slot_view(False, k, 1)

    def _slot_view(self, floats, k, n):
        """Slots ``k:k+n``: of the float slots (the backend's dtype) or of the
        64-bit words; one view object per place, so a replay's check of the
        launch passes at its identity test."""
        v = self._views.get((floats, k, n))
        if v is None:
            v = self._views[(floats, k, n)] = (self.slots[:_COUNTER_AT].view(self.be.dtype) if floats
                                               else self.slots)[k:k + n]
        return v

    def unsafe(self, what):
        """A direct array operation or a host synchronisation inside the step."""
        if self._mode == "capture":
            raise GraphUnsafeError(f"{what} inside a captured step; a CUDA graph captures only the backend's "
                                   f"primitives (train without {option('cuda_graph')})")
        self._diverge()

    def _refuse(self, why):
        if self._mode == "capture":
            raise GraphUnsafeError(f"the step needs {why}; train without {option('cuda_graph')}")
        self._diverge()
        return None

    # ---- replay ----------------------------------------------------------------------
    def _upload(self):
        k = self.replays % _RING
        self.events[k] = self.be._upload(self.slots, self.staging)

    def _diverge(self):
        """Run what was suppressed, eagerly and in order; the rest of the step too."""
        if self._mode != "replay":
            return
        self._mode = "diverged"
        self.be._graph = None
        self._upload()
        for f, args, kw in self._pending:
            f(*args, **kw)
        self._pending = []

    def replay(self, fn: Callable, *args, **kw) -> Tuple[Any, bool]:
        """``fn(*args, **kw)`` through the graph: ``(result, True)``, or
        ``(result, False)`` when the step differed from the captured one and ran
        eagerly instead (same result either way)."""
        self.replays += 1
        k = self.replays % _RING
        if self.events[k] is not None:
            self.events[k].synchronize()          # that staging buffer's copy is done
        self._reset(self.ring[k])
        self._mode = "replay"
        self.be._graph = self
        try:
            out = fn(*args, **kw)
        finally:
            self.be._graph = None
        if self._mode == "replay" and (self._pos, self._alloc_pos) != (len(self.ops), len(self.allocs)):
            self._diverge()                        # a shorter step than the captured one
        if self._mode == "diverged":
            return out, False
        self._upload()
        self.be._launch_graph(self.graph)
        return out, True


def capture(backend, fn: Callable, *args, **kw) -> Tuple[Recording, Any]:
    """Capture ``fn(*args, **kw)`` (one training step) and run it once through
    the graph; returns ``(recording, result)``. Raises GraphUnsafeError when
    the step does something a graph cannot hold (then nothing ran on the
    device, but host state the step changed, such as Adam's step count, has
    changed: stop training)."""
    rec = Recording(backend)
    backend._graph = rec
    try:
        with backend._capturing(rec):
            out = fn(*args, **kw)
    finally:
        backend._graph = None
    rec._mode = "replay"
    rec._upload()
    backend._launch_graph(rec.graph)
    return rec, out


class StepGraphs:
    """A step function replayed as CUDA graphs, one per ``key`` (batch size,
    whether the loss is computed, ...): the first ``warmup`` calls of a key run
    eagerly (kernel compilation, workspace allocation), the next one is
    captured, later ones replay. A key whose replays differ from its capture
    ``max_divergent`` times runs eagerly from then on. ``stats`` counts
    ``eager``, ``captured``, ``replayed`` and ``diverged`` calls. The
    backend's GEMMs run on its own ``gemm`` kernel from here on (``own_gemm``),
    eager steps too, so that they equal the replays bit for bit: CuPy refuses
    cuBLAS calls while a stream is captured."""

    def __init__(self, backend, warmup: int = 1, max_divergent: int = 3):
        if not getattr(backend, "supports_graphs", False):
            raise GraphUnsafeError(f"backend {backend.name!r} has no CUDA graphs; use {option('backend', 'cupy')}")
        backend.own_gemm = True
        self.be, self.warmup, self.max_divergent = backend, int(warmup), int(max_divergent)
        self.stats: Counter = Counter()
        self._graphs: Dict[Hashable, Recording] = {}
        self._calls: Counter = Counter()
        self._divergent: Counter = Counter()

    def __call__(self, key: Hashable, fn: Callable, *args, **kw):
        rec: Optional[Recording] = self._graphs.get(key)
        if rec is None:
            self._calls[key] += 1
            if self._calls[key] <= self.warmup or self._divergent[key] >= self.max_divergent:
                self.stats["eager"] += 1
                return fn(*args, **kw)
            self._graphs[key], out = capture(self.be, fn, *args, **kw)
            self.stats["captured"] += 1
            return out
        out, ok = rec.replay(fn, *args, **kw)
        if ok:
            self.stats["replayed"] += 1
        else:
            self.stats["diverged"] += 1
            self._divergent[key] += 1
            del self._graphs[key]           # captured again on the next call (or eager after max_divergent)
        return out

    def summary(self) -> str:
        s = self.stats
        return (f"CUDA graphs: {s['captured']} captured, {s['replayed']} replays, "
                f"{s['diverged']} ran eagerly after a difference, {s['eager']} eager warm-up steps")
