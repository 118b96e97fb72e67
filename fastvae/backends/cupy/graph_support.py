"""The CuPy backend's side of CUDA graphs (:mod:`fastvae.backends.cupy.cuda_graph`):
every device operation through one method that a capture records and a
replay checks, per-step values through device slots, and the CuPy calls that
capture, upload and launch."""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np

from fastvae.backends.numpy_backend import NumpyBackend as Reference
from fastvae.backends.cupy.cuda_graph import Recording


def _composite(backend, method, *args):
    """``method(backend, *args)``, a Backend primitive written as array
    expressions, run as one device operation: under a capture its CuPy calls
    are captured (temporaries from the capture's pool); a replay checks and
    suppresses it as a whole."""
    graph, backend._graph = backend._graph, None
    try:
        method(backend, *args)
    finally:
        backend._graph = graph


def _call_xp(backend, fn, *args):
    """``fn(xp, *args)`` for :meth:`GraphSupport.array_op` (run through :func:`_composite`)."""
    fn(backend.xp, *args)


class GraphSupport:
    """What the CuPy backend needs for graphs: every launch through :meth:`_op`,
    per-step values through :meth:`_dynamic` / :meth:`_counter`, returned
    arrays through :meth:`_out`, and the CuPy calls that capture, upload and
    launch (the CPU emulator of the tests replaces those)."""

    _graph: Optional[Recording] = None

    def _graph_setup(self):
        xp = self._xp
        self._graph = None                        # the Recording being captured or replayed
        self._graph_pools = []
        self._ones = xp.ones(4, self.dtype)       # neutral per-step slots of eager launches
        self._zero_counter = xp.zeros(1, np.uint64)

    @property
    def xp(self):
        """The array module; a direct use inside a CUDA graph turns the replay
        eager (or refuses the capture): only the primitives below are captured."""
        if self._graph is not None:
            self._graph.unsafe("a direct array operation (backend.xp)")
        return self._xp

    # ---- device work: every launch goes through _op (CUDA graphs record and check it) ----
    def _op(self, f, *args, **kw):
        if self._graph is None:
            f(*args, **kw)
        else:
            self._graph.op(f, args, kw)

    def _new_buffer(self, shape, dtype):
        """A scratch buffer first needed inside a capture is allocated there
        (from the graph's pool; the cache keeps it), not refused as an array operation."""
        return self._xp.empty(shape, dtype=dtype)

    def _out(self, shape, dtype):
        """A new array a primitive returns (the same one on every replay of a graph)."""
        return self._xp.empty(shape, dtype) if self._graph is None else self._graph.alloc(shape, dtype)

    def _slot(self, values):
        """The graph slot now holding ``values``; None when no graph is
        recording or replaying, or a replay ran out of slots (it is eager then)."""
        return None if self._graph is None else self._graph.floats([self._s(v) for v in values])

    def _dynamic(self, *values):
        """``(scalars, slot)`` for per-step values that kernels read as
        ``scalar * slot[k]``: the values and ones eagerly, ones and a graph slot
        holding the values under a CUDA graph (same product, same bits)."""
        slot = self._slot(values)
        if slot is not None:
            return (self._s(1),) * len(values), slot
        return tuple(self._s(v) for v in values), self._ones[:len(values)]

    def _counter(self, c):
        """``(counter, base)`` for a Philox launch at counter ``c`` (kernels add them)."""
        if self._graph is not None:
            slot = self._graph.counter(c)
            if slot is not None:
                return np.uint64(0), slot
        return np.uint64(c), self._zero_counter

    def step_scalar(self, value):
        """A per-step float for array expressions (the primitives below,
        :meth:`array_op`): the value eagerly, a (1,) device slot holding it
        under a CUDA graph (the expressions broadcast it; Python floats enter
        them in the array's dtype, so both give the same bits)."""
        slot = self._slot((value,))
        return value if slot is None else slot

    # ---- the reference backend's array expressions on CuPy arrays: one recorded op each ----
    def sampled_kl(self, kl, z, eps, head):
        self._op(_composite, self, Reference.sampled_kl, kl, z, eps, head)
        return kl

    def sampled_kl_backward(self, dhead, dz, z, std, eps, kl_scale):
        self._op(_composite, self, Reference.sampled_kl_backward, dhead, dz, z, std, eps, self.step_scalar(kl_scale))
        return dhead

    def iaf_gate(self, z, kl, z_in, head, bias):
        self._op(_composite, self, Reference.iaf_gate, z, kl, z_in, head, bias)
        return z

    def iaf_gate_backward(self, dz_in, dhead, dz, z, z_in, head, bias, kl_scale):
        self._op(_composite, self, Reference.iaf_gate_backward, dz_in, dhead, dz, z, z_in, head, bias,
                 kl_scale if getattr(kl_scale, "ndim", 0) else self.step_scalar(kl_scale))   # IWAE: per-row weights
        return dz_in

    def array_op(self, fn, *args):
        self._op(_composite, self, _call_xp, fn, *args)

    def mul_(self, out, a, b):
        self._op(self._xp.multiply, a, b, out=out)
        return out

    def add_(self, out, a):
        self._op(self._xp.add, out, a, out=out)
        return out

    def _ptr(self, a):
        return a.data.ptr

    def _capture_op(self, f, args, kw):
        f(*args, **kw)                          # recorded by the stream capture, not run

    @contextlib.contextmanager
    def _capturing(self, rec):
        """Stream capture on a side stream, allocating from a private pool kept
        for the backend's lifetime; sets ``rec.graph``."""
        cupy = self._xp
        pool = cupy.cuda.MemoryPool()
        self._graph_pools.append(pool)
        stream = cupy.cuda.Stream(non_blocking=True)
        with cupy.cuda.using_allocator(pool.malloc), stream:
            stream.begin_capture()
            try:
                yield
            except BaseException:
                try:
                    stream.end_capture()            # leave the stream usable; the step's own error wins
                except Exception:
                    pass
                raise
            rec.graph = stream.end_capture()

    def _launch_graph(self, graph):
        graph.launch(self._xp.cuda.get_current_stream())

    def _pinned(self, n):
        import cupyx
        return cupyx.empty_pinned(n, np.uint64)

    def _upload(self, dst, host):
        stream = self._xp.cuda.get_current_stream()
        dst.set(host, stream=stream)
        event = self._xp.cuda.Event(disable_timing=True)
        event.record(stream)
        return event
