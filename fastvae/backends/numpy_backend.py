"""NumPy backend: the reference implementation of every primitive, on one thread.

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
    """The reference backend: every primitive of :class:`Backend` as plain
    NumPy array expressions on one thread. The expressions that need no
    NumPy-only call (the beta-TCVAE pairwise terms, the sampled KL, the IAF
    gate, im2col/col2im) take ``self.xp``, so the cupy backend reuses them."""
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

    #: bytes of each buffer per Adam chunk: a chunk's p, g, m, v and temporaries
    #: stay in the last-level cache across the update's array passes (``bench/RESULTS.md``)
    ADAM_CHUNK_BYTES = 1 << 20

    def adam_update(self, params, grads, m, v, *, beta1, beta2, eps, step_size,
                    bc2_sqrt, weight_decay, decay_factor):
        """The Adam update as NumPy array passes, chunk by chunk (the same
        operations on every element, so the result does not depend on the
        chunking)."""
        self._adam_range(0, 0, params.shape[0], params, grads, m, v, beta1, beta2, eps, step_size, bc2_sqrt,
                         weight_decay, decay_factor)

    def _adam_range(self, tid, start, stop, params, grads, m, v, *hyper, errstate=None):
        """Adam over ``[start, stop)`` with thread ``tid``'s temporaries;
        ``errstate``: the calling thread's ``np.geterr()`` when this runs on
        another thread (NumPy's error state is per thread)."""
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

    def tc_pairwise(self, z, mu, logvar, logw, coef, coef_dim, dz, dmu, dlogvar):
        """Array expressions (NumPy here; the cupy backend reuses them): see :meth:`Backend.tc_pairwise`."""
        xp = self.xp
        var = xp.exp(logvar)
        diff = z[:, None, :] - mu[None, :, :]
        lq = -0.5 * (diff * diff / var[None] + logvar[None] + math.log(2 * math.pi))
        S = lq.sum(2) + logw
        lq += logw[:, :, None]
        top = S.max(1, keepdims=True)
        A = xp.exp(S - top)
        sA = A.sum(1, keepdims=True)
        A /= sA
        topd = lq.max(1, keepdims=True)
        Ad = xp.exp(lq - topd)
        sAd = Ad.sum(1, keepdims=True)
        Ad /= sAd
        if coef or coef_dim:
            G = coef * A[:, :, None] + coef_dim * Ad
            Gv = G * diff / var[None]
            dz -= Gv.sum(1)
            dmu += Gv.sum(0)
            dlogvar += 0.5 * (G * (diff * diff / var[None] - 1.0)).sum(0)
        return top[:, 0] + xp.log(sA[:, 0]), (topd[:, 0, :] + xp.log(sAd[:, 0, :])).sum(1)

    def tc_pairwise_bytes(self, B: int, L: int) -> int:
        """About six ``(B, B, L)`` arrays: the array expressions of :meth:`tc_pairwise`."""
        return 6 * B * B * L * self.dtype.itemsize

    def sampled_kl(self, kl, z, eps, head):
        """Array expressions (NumPy here; the cupy backend reuses them): see :meth:`Backend.sampled_kl`."""
        L = z.shape[1]
        kl[...] = 0.5 * (z * z - eps * eps - head[:, L:]).sum(1)
        return kl

    def sampled_kl_backward(self, dhead, dz, z, std, eps, kl_scale):
        """Array expressions (NumPy here; the cupy backend reuses them): see :meth:`Backend.sampled_kl_backward`."""
        L = dz.shape[1]
        g = dz + kl_scale * z
        dhead[:, :L] = g
        dhead[:, L:] = 0.5 * g * eps * std - 0.5 * kl_scale
        return dhead

    def iaf_gate(self, z, kl, z_in, head, bias):
        """Array expressions (NumPy here; the cupy backend reuses them): see :meth:`Backend.iaf_gate`."""
        xp, L = self.xp, z.shape[1]
        m, a = head[:, :L], head[:, L:] + bias
        sig = 0.5 + 0.5 * xp.tanh(0.5 * a)
        z[...] = sig * z_in + (1.0 - sig) * m
        if kl is not None:
            log_sig = -(xp.maximum(-a, 0.0) + xp.log1p(xp.exp(-xp.abs(a))))     # -softplus(-a)
            kl += (0.5 * (z * z - z_in * z_in) - log_sig).sum(1)
        return z

    def iaf_gate_backward(self, dz_in, dhead, dz, z, z_in, head, bias, kl_scale):
        """Array expressions (NumPy here; the cupy backend reuses them): see :meth:`Backend.iaf_gate_backward`."""
        xp, L = self.xp, z.shape[1]
        m, a = head[:, :L], head[:, L:] + bias
        sig = 0.5 + 0.5 * xp.tanh(0.5 * a)
        g = dz + kl_scale * z
        dhead[:, :L] = (1.0 - sig) * g
        dhead[:, L:] = (z_in - m) * sig * (1.0 - sig) * g - kl_scale * (1.0 - sig)
        dz_in[...] = sig * g - kl_scale * z_in
        return dz_in

    def mul_(self, out, a, b):
        """Array expressions (NumPy here; the cupy backend reuses them): see :meth:`Backend.mul_`."""
        self.xp.multiply(a, b, out=out)
        return out

    def add_(self, out, a):
        """Array expressions (NumPy here; the cupy backend reuses them): see :meth:`Backend.add_`."""
        self.xp.add(out, a, out=out)
        return out


    #: bytes of the (i, j, c)-ordered staging buffer one chunk of images uses (:meth:`_staged`)
    CONV_STAGE_BYTES = 1 << 21

    def im2col(self, cols, x, in_hwc, k, stride, padding, out_hw, tid=0):
        """Array slicing (see :meth:`Backend.im2col`); ``tid``: the calling
        thread's number, whose own work buffers it uses."""
        H, W, C = in_hwc
        Ho, Wo = out_hw
        B, s, p = x.shape[0], stride, padding
        src = x.reshape(B, H, W, C)
        if p:
            pad = self._zero_border(("im2col_pad", p, tid), (B, H + 2 * p, W + 2 * p, C))
            pad[:, p:p + H, p:p + W, :] = src
            src = pad
        win = lambda a, i, j: a[:, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s, :]
        if C < 8:
            c6 = cols.reshape(B, Ho, Wo, C, k, k)
            for i in range(k):
                for j in range(k):
                    c6[:, :, :, :, i, j] = win(src, i, j)
            return cols
        rows = cols.reshape(B, Ho * Wo, C, k * k)
        for b0, n, t6 in self._staged(B, (Ho, Wo, k, k, C), tid):
            sb = src[b0:b0 + n]
            for i in range(k):
                for j in range(k):
                    t6[:, :, :, i, j, :] = win(sb, i, j)
            rows[b0:b0 + n] = t6.reshape(n, Ho * Wo, k * k, C).transpose(0, 1, 3, 2)
        return cols

    def _direct_cols(self, x, in_hwc, k, stride, padding, out_hw):
        H, W, C = in_hwc
        cols = self.scratch("direct_cols", (x.shape[0] * out_hw[0] * out_hw[1], C * k * k))
        return NumpyBackend.im2col(self, cols, x, in_hwc, k, stride, padding, out_hw)

    def conv_direct(self, y, x, W, in_hwc, k, stride, padding, out_hw):
        """The reference: :meth:`im2col` into a buffer of its own, then one GEMM
        (see :meth:`Backend.conv_direct`)."""
        F = W.shape[0]
        cols = self._direct_cols(x, in_hwc, k, stride, padding, out_hw)
        np.matmul(cols, W.reshape(F, -1).T, out=y.reshape(-1, F))
        return y

    def conv_direct_dx(self, dx, dy, W, in_hwc, k, stride, padding, out_hw):
        """The reference: one GEMM into a column buffer, then :meth:`col2im` (see :meth:`Backend.conv_direct_dx`)."""
        F, C = W.shape[:2]
        cols = self.scratch("direct_cols", (dy.shape[0] * out_hw[0] * out_hw[1], C * k * k))
        np.matmul(dy.reshape(-1, F), W.reshape(F, -1), out=cols)
        return NumpyBackend.col2im(self, dx, cols, in_hwc, k, stride, padding, out_hw)

    def conv_direct_dw(self, dW, x, dy, in_hwc, k, stride, padding, out_hw):
        """The reference: :meth:`im2col`, then one GEMM (see :meth:`Backend.conv_direct_dw`)."""
        F = dW.shape[0]
        cols = self._direct_cols(x, in_hwc, k, stride, padding, out_hw)
        np.matmul(dy.reshape(-1, F).T, cols, out=dW.reshape(F, -1))
        return dW

    def col2im(self, x, cols, in_hwc, k, stride, padding, out_hw, tid=0):
        """Array slicing (see :meth:`Backend.col2im`); ``tid`` as :meth:`im2col`'s."""
        H, W, C = in_hwc
        Ho, Wo = out_hw
        B, s, p = x.shape[0], stride, padding
        acc = self.scratch(("col2im_acc", tid), (B, H + 2 * p, W + 2 * p, C))
        acc[...] = 0
        win = lambda a, i, j: a[:, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s, :]
        if C < 8:
            c6 = cols.reshape(B, Ho, Wo, C, k, k)
            for i in range(k):
                for j in range(k):
                    win(acc, i, j)[...] += c6[:, :, :, :, i, j]
        else:
            rows = cols.reshape(B, Ho * Wo, C, k * k)
            for b0, n, t6 in self._staged(B, (Ho, Wo, k, k, C), tid):
                t6.reshape(n, Ho * Wo, k * k, C)[...] = rows[b0:b0 + n].transpose(0, 1, 3, 2)
                ab = acc[b0:b0 + n]
                for i in range(k):
                    for j in range(k):
                        win(ab, i, j)[...] += t6[:, :, :, i, j, :]
        x.reshape(B, H, W, C)[...] = acc[:, p:p + H, p:p + W, :]
        return x

    def _staged(self, B, shape, tid=0):
        """``(first image, images, staging view)`` for chunks of the batch that
        fit :data:`CONV_STAGE_BYTES` in a ``(n, Ho, Wo, k, k, C)`` buffer: with
        8 channels or more, im2col and col2im go through it, where each
        window position is a run of C contiguous values, and one transposing
        copy per chunk converts to the columns' (C, k, k) order (direct slices
        would move C values k*k apart; with 1 or 3 channels they stay faster:
        ``bench/RESULTS.md``). Each ``tid`` gets a buffer of its own."""
        per = int(np.prod(shape)) * self.dtype.itemsize
        bc = max(1, min(B, self.CONV_STAGE_BYTES // per))
        stage = self.scratch(("conv_stage", tid), (bc,) + tuple(shape))
        for b0 in range(0, B, bc):
            n = min(bc, B - b0)
            yield b0, n, stage[:n]

    def _zero_border(self, key, shape):
        """A cached buffer whose border stays zero: callers write the interior only."""
        k = ("zero_border", key, tuple(shape))
        buf = self._scratch.get(k)
        if buf is None:
            buf = self._scratch[k] = self.xp.zeros(shape, dtype=self.dtype)
        return buf
