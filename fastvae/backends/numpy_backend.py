"""NumPy backend: the reference implementation of every primitive.

float32 or float64, preallocated buffers and ``out=`` everywhere in the hot
path; temporaries come from the backend's scratch cache. Random numbers come
from ``numpy.random.Generator(PCG64)``.
"""

from __future__ import annotations

import math

import numpy as np

from fastvae.backends.cpu import gemm_library as _blas
from fastvae.backends.base import Backend, BackendRNG, ForeignRNGState

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _softplus(out, a, tmp):
    """out = log(1 + exp(a)) = max(a, 0) + log1p(exp(-|a|)), stable for any a.
    (``np.logaddexp(a, 0)`` is the same function, not vectorised: slower.)"""
    np.abs(a, out=tmp)
    np.negative(tmp, out=tmp)
    np.exp(tmp, out=tmp)
    np.log1p(tmp, out=tmp)
    np.maximum(a, 0, out=out)
    out += tmp
    return out


class NumpyRNG(BackendRNG):
    """PCG64 stream; state is the bit generator's JSON-able dict."""

    def __init__(self, seed):
        self.gen = np.random.Generator(np.random.PCG64(seed))

    def normal_(self, out):
        self.gen.standard_normal(out=out, dtype=out.dtype)
        return out

    def uniform_(self, out):
        self.gen.random(out=out, dtype=out.dtype)
        return out

    def permutation(self, n):
        return self.gen.permutation(n)

    def state(self):
        return self.gen.bit_generator.state

    def set_state(self, state):
        if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
            raise ForeignRNGState("not a PCG64 state")
        bits = np.random.PCG64()               # checked on a new generator: a refused state changes nothing
        try:
            bits.state = state
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"invalid PCG64 random-number state ({exc})") from None
        self.gen = np.random.Generator(bits)


class NumpyBackend(Backend):
    name = "numpy"
    xp = np
    device = "cpu"
    blas = _blas.load("numpy")     # the GEMM library; fastvae.backends.cpu.gemm_library.use() switches it per backend

    def new_rng(self, seed):
        return NumpyRNG(seed)

    # ---- data movement ------------------------------------------------------
    def gather_rows(self, out, X, idx):
        np.take(X, idx, axis=0, out=out)
        return out

    def bernoulli_(self, out, probs, rng):
        u = self.scratch("bern_u", out.shape)
        rng.uniform_(u)
        np.less(u, probs, out=out)  # bool -> float cast on store
        return out

    # ---- dense algebra ------------------------------------------------------
    def gemm(self, out, a, b, trans_a=False, trans_b=False):
        return self.blas.gemm(out, a, b, trans_a, trans_b)

    def bias_act(self, out, pre, bias, act, slope=0.01, alpha=1.0):
        np.add(pre, bias, out=pre)
        if act == "identity":
            if out is not None and out is not pre:
                out[...] = pre
            return out
        if act == "relu":
            np.maximum(pre, 0, out=out)
        elif act == "tanh":
            np.tanh(pre, out=out)
        elif act == "sigmoid":
            # sigmoid(x) = (1 + tanh(x/2)) / 2: stable for any x
            np.multiply(pre, 0.5, out=out)
            np.tanh(out, out=out)
            out *= 0.5
            out += 0.5
        elif act == "leaky_relu":
            np.multiply(pre, slope, out=out)
            if slope <= 1:
                np.maximum(pre, out, out=out)
            else:
                np.minimum(pre, out, out=out)
        elif act == "elu":
            t = self.scratch("elu", pre.shape)
            np.minimum(pre, 0, out=out)
            np.expm1(out, out=out)
            out *= alpha
            np.maximum(pre, 0, out=t)
            out += t
        elif act == "softplus":
            _softplus(out, pre, self.scratch("softplus", pre.shape))
        else:
            raise ValueError(f"unknown activation {act!r}")
        return out

    def act_backward(self, d, pre, out, act, slope=0.01, alpha=1.0):
        if act == "identity":
            return d
        t = self.scratch("act_bwd", d.shape)
        if act == "relu":
            np.greater(pre, 0, out=t)
        elif act == "tanh":
            np.multiply(out, out, out=t)
            np.subtract(1, t, out=t)
        elif act == "sigmoid":
            np.subtract(1, out, out=t)
            t *= out
        elif act == "leaky_relu":
            np.greater(pre, 0, out=t)          # 1 where pre > 0 else 0
            t *= (1.0 - slope)
            t += slope
        elif act == "elu":
            np.add(out, alpha, out=t)           # alpha*exp(pre) where pre <= 0
            np.copyto(t, 1, where=pre > 0)
        elif act == "softplus":
            np.multiply(pre, 0.5, out=t)
            np.tanh(t, out=t)
            t *= 0.5
            t += 0.5
        else:
            raise ValueError(f"unknown activation {act!r}")
        d *= t
        return d

    def col_sum(self, out, a):
        np.sum(a, axis=0, out=out)
        return out

    # ---- VAE-specific -------------------------------------------------------
    def reparam_kl(self, z, kl, std, head, eps):
        L = z.shape[1]
        mu, logvar = head[:, :L], head[:, L:]
        np.multiply(logvar, 0.5, out=std)
        np.exp(std, out=std)
        np.multiply(std, eps, out=z)
        z += mu
        if kl is not None:
            t = self.scratch("kl_t", mu.shape)
            t2 = self.scratch("kl_t2", mu.shape)
            np.multiply(mu, mu, out=t)
            np.multiply(std, std, out=t2)
            t += t2
            t -= logvar
            t -= 1.0
            np.sum(t, axis=1, out=kl)
            kl *= 0.5
        return z

    def reparam_kl_backward(self, dhead, dz, head, std, eps, kl_scale):
        L = dz.shape[1]
        mu, dmu, dlogvar = head[:, :L], dhead[:, :L], dhead[:, L:]
        np.multiply(mu, kl_scale, out=dmu)
        dmu += dz
        np.multiply(std, std, out=dlogvar)
        dlogvar -= 1.0
        dlogvar *= kl_scale
        t = self.scratch("rp_t", dz.shape)
        np.multiply(dz, eps, out=t)
        t *= std
        dlogvar += t
        dlogvar *= 0.5
        return dhead

    def likelihood(self, dlogits, nll, logits, x, kind, sigma, grad_scale):
        if kind == "bernoulli":
            if nll is not None:
                t = self.scratch("lik_t", logits.shape)
                _softplus(t, logits, self.scratch("lik_t2", logits.shape))
                np.sum(t, axis=1, out=nll)
                nll -= np.einsum("ij,ij->i", logits, x, out=self.scratch("lik_xl", nll.shape))
            if dlogits is not None:
                np.multiply(logits, 0.5, out=dlogits)
                np.tanh(dlogits, out=dlogits)
                dlogits *= 0.5
                dlogits += 0.5                      # sigmoid(l)
                dlogits -= x
                dlogits *= grad_scale
        elif kind in ("gaussian", "mse"):
            diff = dlogits if dlogits is not None else self.scratch("lik_diff", logits.shape)
            np.subtract(logits, x, out=diff)
            if nll is not None:
                t = self.scratch("lik_t", logits.shape)
                np.multiply(diff, diff, out=t)
                np.sum(t, axis=1, out=nll)
                if kind == "gaussian":
                    nll *= 0.5 / (sigma * sigma)
                    nll += logits.shape[1] * (math.log(sigma) + _HALF_LOG_2PI)
            if dlogits is not None:
                dlogits *= grad_scale * ((1.0 / (sigma * sigma)) if kind == "gaussian" else 2.0)
        else:
            raise ValueError(f"unknown likelihood {kind!r}")

    #: bytes of each buffer per Adam chunk: the chunk's p, g, m, v and temporaries
    #: (~5 MiB) stay in the last-level cache across the update's 11 array passes;
    #: one chunk of the 8.3M-parameter 4096-1000-50 model: 21.5 -> 15.0 ms per update
    ADAM_CHUNK_BYTES = 1 << 20
    #: threads the Adam update may use: 2 splits the buffer in halves, the second
    #: on a worker thread (NumPy's ufuncs release the GIL); set per process by
    #: :func:`fastvae.backends.cpu.threads.fit_backend`, which also puts OpenBLAS's idle
    #: threads to sleep at once, or they hold the second core
    MAX_ADAM_THREADS = 2
    adam_threads = 1
    #: below this many parameters the handoff to the worker costs what it saves
    ADAM_SPLIT_MIN = 1 << 17

    def adam_update(self, params, grads, m, v, *, beta1, beta2, eps, step_size,
                    bc2_sqrt, weight_decay, decay_factor):
        """The Adam update as NumPy array passes, chunk by chunk (the same
        operations on every element, so the result depends neither on the
        chunking nor on ``adam_threads``)."""
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

    #: threads im2col/col2im may use: 2 gives each of two threads half the batch's
    #: images (the same copies, bit for bit); set per process by
    #: :func:`fastvae.backends.cpu.threads.fit_backend` for a model with convolutions, with
    #: OpenBLAS's idle threads asleep at once. Burgess net at b64 (alternating
    #: blocks in one process, the short spin in both): 78.4 ms per step against
    #: 100.5, the Numba backend's 51.4 against 60.5; seed net at b128 113.3
    #: against 125.4 and 98.9 against 103.8
    MAX_COPY_THREADS = 2
    copy_threads = 1
    #: column buffers of fewer values stay on one thread (the handoff then costs what it saves)
    COPY_SPLIT_MIN = 1 << 18

    def im2col(self, cols, x, in_hwc, k, stride, padding, out_hw):
        self._by_images(lambda c, xs, tid: Backend.im2col(self, c, xs, in_hwc, k, stride, padding, out_hw, tid),
                        cols, x, x.shape[0])
        return cols

    def col2im(self, x, cols, in_hwc, k, stride, padding, out_hw):
        self._by_images(lambda xs, c, tid: Backend.col2im(self, xs, c, in_hwc, k, stride, padding, out_hw, tid),
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

    def _worker(self):
        """The worker thread of this backend in this process (a fork gets its
        own): the second half of a two-thread Adam update, and of both CPU
        backends' two-thread im2col/col2im."""
        import os
        pool = getattr(self, "_pool", None)
        if pool is None or pool[0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor
            pool = self._pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="fastvae-worker"))
        return pool[1]

    def _adam_range(self, tid, start, stop, params, grads, m, v, *hyper, errstate=None):
        """Adam over ``[start, stop)``; ``errstate``: the caller's ``np.geterr()``
        for the worker thread (NumPy's error state is per thread: the trainer's
        silenced overflow warnings showed up from the worker's half)."""
        n = max(1, self.ADAM_CHUNK_BYTES // params.dtype.itemsize)
        with np.errstate(**(errstate or {})):
            for s in range(start, stop, n):
                sl = slice(s, min(s + n, stop))
                self._adam_chunk(tid, params[sl], grads[sl], m[sl], v[sl], *hyper)

    def _adam_chunk(self, tid, params, grads, m, v, beta1, beta2, eps, step_size, bc2_sqrt, weight_decay,
                    decay_factor):
        g = grads
        t = self.scratch(f"adam_t{tid}", params.shape)     # each thread its own temporaries
        if weight_decay:
            g = self.scratch(f"adam_g{tid}", params.shape)
            np.multiply(params, weight_decay, out=g)
            g += grads
        if decay_factor != 1.0:
            params *= decay_factor
        m *= beta1
        np.multiply(g, 1.0 - beta1, out=t)
        m += t
        v *= beta2
        np.multiply(g, g, out=t)
        t *= 1.0 - beta2
        v += t
        # step_size * m / (sqrt(v)/bc2_sqrt + eps)
        #   == (step_size*bc2_sqrt) * m / (sqrt(v) + eps*bc2_sqrt): one pass fewer
        np.sqrt(v, out=t)
        t += eps * bc2_sqrt
        np.divide(m, t, out=t)
        t *= step_size * bc2_sqrt
        params -= t
