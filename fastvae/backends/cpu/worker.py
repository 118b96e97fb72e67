"""Two threads for the CPU backends' copy- and bandwidth-bound passes.

:class:`TwoThreads` is a mixin over a :class:`fastvae.backends.numpy_backend.NumpyBackend`
(the reference or a subclass): with ``adam_threads`` 2 it splits the Adam update's flat
buffers in halves and with ``copy_threads`` 2 it splits im2col/col2im by images, the second
half on one worker thread (NumPy's ufuncs and Numba's kernels release the GIL). Each half runs
the same element-wise operations as one thread would, so the result is the same bit for bit.
:func:`fastvae.backends.cpu.threads.fit_backend` sets both counts per process (two threads win
only beside BLAS threads that sleep at once: ``bench/RESULTS.md``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fastvae.backends.numpy_backend import NumpyBackend


class TwoThreads:
    """Mixin: the Adam update and im2col/col2im on up to two threads."""

    #: threads the Adam update may use (a subclass whose Adam is not split sets 1)
    MAX_ADAM_THREADS = 2
    adam_threads = 1
    #: below this many parameters the handoff to the worker costs what it saves
    ADAM_SPLIT_MIN = 1 << 17
    #: threads im2col/col2im may use
    MAX_COPY_THREADS = 2
    copy_threads = 1
    #: column buffers of fewer values stay on one thread (the handoff then costs what it saves)
    COPY_SPLIT_MIN = 1 << 18

    def adam_update(self, params, grads, m, v, *, beta1, beta2, eps, step_size,
                    bc2_sqrt, weight_decay, decay_factor):
        args = (params, grads, m, v, beta1, beta2, eps, step_size, bc2_sqrt, weight_decay, decay_factor)
        N = params.shape[0]
        if self.adam_threads < 2 or N < self.ADAM_SPLIT_MIN:
            self._adam_range(0, 0, N, *args)
            return
        half = (N // 2) // 1024 * 1024
        job = self._worker().submit(self._adam_range, 1, half, N, *args, errstate=np.geterr())
        try:
            self._adam_range(0, 0, half, *args)
        finally:
            job.result()            # never return (or raise) while the worker still writes the buffers

    def im2col(self, cols, x, in_hwc, k, stride, padding, out_hw):
        self._by_images(lambda c, xs, tid: NumpyBackend.im2col(self, c, xs, in_hwc, k, stride, padding, out_hw, tid),
                        cols, x, x.shape[0])
        return cols

    def col2im(self, x, cols, in_hwc, k, stride, padding, out_hw):
        self._by_images(lambda xs, c, tid: NumpyBackend.col2im(self, xs, c, in_hwc, k, stride, padding, out_hw, tid),
                        x, cols, x.shape[0])
        return x

    def _by_images(self, run, a, b, B):
        """``run(a, b, tid)`` for a convolution copy whose arrays ``a`` and
        ``b`` hold ``B`` independent images' rows each (im2col: ``cols, x``;
        col2im: ``x, cols``): with ``copy_threads`` 2, on the first half of
        the images here (``tid`` 0) and the last half on the worker thread
        (``tid`` 1, under the caller's NumPy error state)."""
        if self.copy_threads < 2 or B < 2 or max(a.size, b.size) < self.COPY_SPLIT_MIN:
            run(a, b, 0)
            return
        h = B // 2
        ra, rb, err = a.shape[0] // B * h, b.shape[0] // B * h, np.geterr()

        def second():
            with np.errstate(**err):
                run(a[ra:], b[rb:], 1)
        job = self._worker().submit(second)
        try:
            run(a[:ra], b[:rb], 0)
        finally:
            job.result()            # never return (or raise) while the worker still writes

    def _worker(self) -> ThreadPoolExecutor:
        """This backend's worker thread in this process (a fork gets its own)."""
        pool = getattr(self, "_pool", None)
        if pool is None or pool[0] != os.getpid():
            pool = self._pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="fastvae-worker"))
        return pool[1]


class ThreadedNumpyBackend(TwoThreads, NumpyBackend):
    """The ``numpy`` backend as training runs it: the reference's arithmetic,
    its Adam update and convolution copies on up to two threads."""
