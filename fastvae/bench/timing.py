"""How ``fastvae bench`` times things: interleaved chunks of steps
(:func:`measure`), the GEMM calls of a step recorded for replay
(:class:`GemmRecorder`, :func:`gemm_flops`) and the measured peak GEMM rates
that the FLOP floor divides by."""

from __future__ import annotations

import statistics
import time
from typing import List

import numpy as np


class Contender:
    """One timed thing: ``step()`` (a training step, or the replay of its
    GEMMs) and ``sync()`` waiting for it; ``row``: what is reported with it
    (``step`` None: a row that only reports an error); ``enter()``, when
    given, runs untimed before each of its chunks (settings of its own, such
    as :func:`fastvae.backends.cpu.threads.fit_backend`)."""

    def __init__(self, row: dict, step=None, sync=None, enter=None):
        self.row, self.step, self.sync, self.enter, self.per, self.k = row, step, sync, enter, [], 1


def measure(contenders: List[Contender], seconds: float, min_chunks: int = 5, settle: float = 0.15,
            probe=None, warm: float = 0.1) -> None:
    """Time ``contenders`` interleaved, so that the machine's drift (other
    load, clocks) reaches each of them in as many chunks: rounds in which each one, in an
    order rotated every round, sleeps ``settle`` seconds (the previous one's
    spinning BLAS/OpenMP threads go idle), runs untimed steps for ``warm``
    seconds, at least one (wakes its own threads, which come back to their
    back-to-back speed only after several steps: ``bench/RESULTS.md``) and
    times a chunk of ``k`` steps (about ``seconds / 10``, at least 0.025 s)
    synchronised at its end. Rounds go on until each has had about
    ``seconds`` and at least ``min_chunks`` chunks.

    ``probe`` (a :class:`CoreProbe`) runs before the first round and after
    each; a round with a reading on either side under 0.9 of the typical best
    of all the probe's readings so far (this call's and earlier ones') or
    under the probe's ``floor`` (:func:`clean_intervals`) ran while the
    machine was not all ours, and its chunks are left out when
    ``min_chunks`` others remain (rounds go on, up to 3 times the time, to
    find them). Sets ``ms_per_step`` (the median kept chunk), ``ms_p25`` /
    ``ms_p75`` (their quartiles), ``chunks``, ``chunks_kept``,
    ``steps_timed`` and, with a probe, ``probe_range`` (min, median, max
    reading of this call) and ``taken_core`` (too few clean chunks were
    found: all are kept, and the time is not to be trusted) in each row (the
    2-core VMs read 1.82-2.00 normally, 1.08-1.58 in such phases)."""
    live = [c for c in contenders if c.step is not None]
    if not live:
        return
    chunk = min(max(seconds / 10, 0.025), 0.5)
    for c in live:
        if c.enter:
            c.enter()
        t = time.perf_counter()
        c.step()
        c.sync()
        c.k = max(1, int(chunk / max(time.perf_counter() - t, 1e-6)))
    probes = [probe()] if probe else []
    start, r = time.perf_counter(), 0

    def kept():
        return (clean_intervals(probes, ref=getattr(probe, "readings", None), floor=getattr(probe, "floor", 0.0))
                if probe else [True] * r)
    while (r < min_chunks or time.perf_counter() - start < seconds * len(live)
           or (sum(kept()) < min_chunks and time.perf_counter() - start < 3 * seconds * len(live))):
        for c in live[r % len(live):] + live[:r % len(live)]:
            if c.enter:
                c.enter()
            if settle:
                time.sleep(settle)
            t = time.perf_counter()
            c.step()
            c.sync()
            while time.perf_counter() - t < warm:
                c.step()
                c.sync()
            t = time.perf_counter()
            for _ in range(c.k):
                c.step()
            c.sync()
            c.per.append((time.perf_counter() - t) / c.k * 1e3)
        if probe:
            probes.append(probe())
        r += 1
    ok = kept()
    for c in live:
        per = [x for x, good in zip(c.per, ok) if good]
        taken = len(per) < min_chunks
        per = c.per if taken else per
        q = statistics.quantiles(per, n=4, method="inclusive") if len(per) > 1 else per * 3
        c.row.update(ms_per_step=statistics.median(per), ms_p25=q[0], ms_p75=q[2], chunks=len(c.per),
                     chunks_kept=len(per), steps_timed=len(c.per) * c.k)
        if probe:
            c.row.update(probe_range=[min(probes), statistics.median(probes), max(probes)], taken_core=taken)


class CoreProbe:
    """:func:`blas_parallel_speedup` as a callable that keeps every reading
    (``readings``), so that one bar serves a whole benchmark run; ``floor``:
    the lowest reading taken to mean all cores are ours: 1.7 with two or more
    BLAS threads (the 2-core VMs here read 1.82-2.00 then; a machine whose
    512^3 GEMM scales worse gets every round flagged, and the benchmark falls
    back to all chunks and marks them), 0.9 with one thread."""

    def __init__(self, fn=None, floor=None):
        self.fn, self.readings = fn or blas_parallel_speedup, []
        if floor is None:
            from fastvae.backends.cpu.threads import current
            threads = max([b["threads"] or 1 for b in current()["blas"]] or [1])
            floor = 1.7 if threads >= 2 else 0.9
        self.floor = floor

    def __call__(self) -> float:
        self.readings.append(self.fn())
        return self.readings[-1]


def clean_intervals(probes, share=0.9, ref=None, floor=0.0) -> List[bool]:
    """For each interval between consecutive ``probes`` (readings of
    :func:`blas_parallel_speedup`): whether both ends read at least ``share``
    of the median of the top half of the readings in ``ref`` (default:
    ``probes``; one lucky reading does not set the bar) and at least ``floor``
    (a run spent wholly on a taken core has no good readings to compare with)."""
    top = sorted(ref or probes)[len(ref or probes) // 2:]
    low = max(share * statistics.median(top), floor)
    return [a >= low and b >= low for a, b in zip(probes, probes[1:])]


def gpu_peak_gemm_gflops(dtype="float32", tf32=False, n=8192) -> float:
    """Measured cuBLAS GEMM rate (GFLOP/s) of an n^3 CuPy matmul (TF32 when
    ``tf32`` and float32, set explicitly: CuPy's GEMM mode is process-wide)."""
    import cupy
    from fastvae.backends.cupy.backend import set_tf32
    set_tf32(tf32)
    a = cupy.random.random((n, n)).astype(dtype)
    c = cupy.empty_like(a)
    cupy.matmul(a, a, out=c)
    cupy.cuda.get_current_stream().synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        cupy.matmul(a, a, out=c)
        cupy.cuda.get_current_stream().synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def peak_gemm_gflops(dtype="float32", n=2048) -> float:
    """Measured GEMM rate (GFLOP/s) of an n x n x n NumPy/BLAS matmul."""
    a = np.random.default_rng(0).random((n, n)).astype(dtype)
    c = np.empty_like(a)
    np.matmul(a, a, out=c)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.matmul(a, a, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def blas_parallel_speedup(n=512, repeats=5) -> float:
    """How much faster an n^3 float32 GEMM runs on all BLAS threads than on
    one (best of ``repeats`` each): a probe of whether every core is really
    ours right now (a shared host can take part of a core away, unseen in the
    steal counter; readings per machine in ``bench/RESULTS.md``). 1.0 when
    BLAS has one thread."""
    from threadpoolctl import ThreadpoolController
    r = np.random.default_rng(0)
    a, b = r.random((n, n), np.float32), r.random((n, n), np.float32)

    def best():
        t_min = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            np.matmul(a, b)
            t_min = min(t_min, time.perf_counter() - t)
        return t_min
    many = best()
    with ThreadpoolController().limit(limits=1, user_api="blas"):
        one = best()
    return one / many


class GemmRecorder:
    """Records ``(out, a, b, trans_a, trans_b)`` of every ``backend.gemm`` call while active."""

    def __init__(self, be):
        self.be, self.calls, self._orig = be, [], be.gemm

    def __enter__(self):
        def rec(out, a, b, trans_a=False, trans_b=False):
            self.calls.append((out, a, b, trans_a, trans_b))
            return self._orig(out, a, b, trans_a, trans_b)
        self.be.gemm = rec
        return self

    def __exit__(self, *exc):
        del self.be.gemm           # back to the class method


def gemm_flops(calls) -> int:
    """Exact FLOPs (2 m n k each) of recorded GEMM calls."""
    tot = 0
    for out, a, b, ta, tb in calls:
        k = a.shape[0] if ta else a.shape[1]
        tot += 2 * out.shape[0] * out.shape[1] * k
    return tot
