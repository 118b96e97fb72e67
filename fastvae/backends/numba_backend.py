"""Numba backend: BLAS for the GEMMs (NumPy's, or MKL: :mod:`fastvae.backends.cpu.gemm_library`), fused Numba kernels
(``fastvae.kernels.numba_cpu``, ``numba_conv``, ``numba_likelihood``) for everything around
them.

Shares the NumPy backend's memory model and random stream (PCG64), so a NumPy
run and a Numba run of one config draw the same shuffles and the same ``eps``
and follow the same trajectory within float32 rounding; checkpoints move
between the two freely.
"""

from __future__ import annotations

import math

import numpy as np

from fastvae.kernels import numba_conv as KC
from fastvae.kernels import numba_cpu as K
from fastvae.kernels import numba_likelihood as L
from fastvae.nn.opcodes import ACTIVATION_CODES
from fastvae.backends.cpu.worker import TwoThreads
from fastvae.backends.numpy_backend import NumpyBackend


class NumbaBackend(TwoThreads, NumpyBackend):
    name = "numba"
    #: the jitted Adam is one vectorised pass and stays on one thread (two gained nothing: ``bench/RESULTS.md``)
    MAX_ADAM_THREADS = 1
    #: bias gradients of fewer columns sum interleaved rows (:func:`kernels.numba_cpu.col_sum_narrow`)
    NARROW_COLUMNS = 16

    def __init__(self, dtype="float32"):
        super().__init__(dtype)
        self._s = self.dtype.type   # scalars in the array dtype keep float32 loops in float32

    def gather_rows(self, out, X, idx):
        K.gather_rows(out, X, idx)
        return out

    def bernoulli_(self, out, probs, rng):
        u = self.scratch("bern_u", out.shape)
        rng.uniform_(u)
        K.bernoulli_(out, probs, u)
        return out

    def bias_act(self, out, pre, bias, act, slope=0.01, alpha=1.0):
        K.bias_act(pre if out is None else out, pre, bias, ACTIVATION_CODES[act], self._s(slope), self._s(alpha))
        return out

    def act_backward(self, d, pre, out, act, slope=0.01, alpha=1.0):
        rows = (d, pre, out)
        if all(a.flags.c_contiguous for a in rows):
            # elementwise: one long row (a loop set-up for each short row costs more than its work: bench/RESULTS.md)
            rows = tuple(a.reshape(1, -1) for a in rows)
        K.act_backward(*rows, ACTIVATION_CODES[act], self._s(slope), self._s(alpha))
        return d

    def col_sum(self, out, a):
        H = a.shape[1]
        if H < self.NARROW_COLUMNS and a.flags.c_contiguous:
            K.col_sum_narrow(out, a.reshape(-1), self.scratch("col_sum", (max(1, 64 // H) * H,)))
        else:
            K.col_sum(out, a)
        return out

    def reparam_kl(self, z, kl, std, head, eps):
        K.reparam_kl(z, self.scratch("kl_dummy", (z.shape[0],)) if kl is None else kl, std, head, eps,
                     kl is not None)
        return z

    def reparam_kl_backward(self, dhead, dz, head, std, eps, kl_scale):
        K.reparam_kl_backward(dhead, dz, head, std, eps, self._s(kl_scale))
        return dhead

    def tc_pairwise_bytes(self, B, L):
        return 2 * B * self.dtype.itemsize            # one fused kernel: the (B,) results

    def tc_pairwise(self, z, mu, logvar, logw, coef, coef_dim, dz, dmu, dlogvar):
        B = z.shape[0]
        lse, lsed = np.empty(B, z.dtype), np.empty(B, z.dtype)
        K.tc_pairwise(np.ascontiguousarray(z), np.ascontiguousarray(mu), np.ascontiguousarray(logvar),
                      np.ascontiguousarray(logw, dtype=z.dtype), self._s(coef), self._s(coef_dim), dz, dmu, dlogvar,
                      lse, lsed)
        return lse, lsed

    def likelihood(self, dlogits, nll, logits, x, kind, sigma, grad_scale):
        B = logits.shape[0]
        need_grad, need_nll = dlogits is not None, nll is not None
        d = logits if dlogits is None else dlogits          # typed placeholder when unused
        n = self.scratch("nll_dummy", (B,)) if nll is None else nll
        if kind == "bernoulli" and logits.dtype == np.float32:
            D = logits.shape[1]
            bits = self.scratch("lik_bits", (D,), np.int32)
            L.bernoulli_f32(d, n, logits, x, self.scratch("lik_mant", (D,)), bits, bits.view(np.float32),
                            self._s(grad_scale), need_grad, need_nll)
        elif kind == "bernoulli":
            # row blocks of ~256 KiB keep the exp/log1p temporaries in L2 at large batch sizes
            rows = max(1, min(B, (1 << 16) // max(logits.shape[1], 1)))
            for s in range(0, B, rows):
                sl = slice(s, min(B, s + rows))
                lb = logits[sl]
                e = self.scratch("lik_e", lb.shape)
                L.neg_abs(e, lb)
                np.exp(e, out=e)
                lp = e
                if need_nll:
                    lp = self.scratch("lik_lp", lb.shape)
                    np.log1p(e, out=lp)
                L.bernoulli_finish(d[sl], n[sl], lb, x[sl], e, lp, self._s(grad_scale), need_grad, need_nll)
        elif kind in ("gaussian", "mse"):
            if kind == "gaussian":
                inv_var, half = 1.0 / (sigma * sigma), 0.5 / (sigma * sigma)
                const = logits.shape[1] * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
            else:
                inv_var, half, const = 2.0, 1.0, 0.0
            L.gaussian(d, n, logits, x, self._s(inv_var), half, const, self._s(grad_scale), need_grad, need_nll)
        else:
            raise ValueError(f"unknown likelihood {kind!r}")

    def adam_update(self, params, grads, m, v, *, beta1, beta2, eps, step_size,
                    bc2_sqrt, weight_decay, decay_factor):
        s = self._s
        K.adam_update(params, grads, m, v, s(beta1), s(1.0 - beta1), s(beta2), s(1.0 - beta2),
                      s(eps * bc2_sqrt), s(step_size * bc2_sqrt), s(weight_decay), s(decay_factor),
                      s(np.finfo(params.dtype).tiny))

    def im2col(self, cols, x, in_hwc, k, stride, padding, out_hw):
        if in_hwc[2] < 8:
            # NumPy's fill first claims the column lines without reading them, then the kernel writes
            # every entry (faster than the kernel alone beside the other core's GEMM: bench/RESULTS.md)
            def run(c, xs, tid):
                c.fill(0)
                KC.im2col_narrow(c, xs, xs.shape[0], *in_hwc, k, stride, padding, *out_hw)
        else:
            def run(c, xs, tid):
                KC.im2col(c, xs, xs.shape[0], *in_hwc, k, stride, padding, *out_hw)
        self._by_images(run, cols, x, x.shape[0])
        return cols

    conv_algorithms = ("im2col", "direct")

    def _weight_rows(self, name, W, order):
        """``W (F, C, k, k)`` as contiguous rows: ``order`` (2, 3, 1, 0) gives
        ``(k*k*C, F)`` (the forward's and dW's layout), (2, 3, 0, 1) ``(k*k*F, C)``."""
        t = W.transpose(order)
        out = self.scratch(name, (t.shape[0] * t.shape[1] * t.shape[2], t.shape[3]))
        out.reshape(t.shape)[...] = t
        return out

    def conv_direct(self, y, x, W, in_hwc, k, stride, padding, out_hw):
        F = W.shape[0]
        Wt = self._weight_rows("direct_Wt", W, (2, 3, 1, 0))
        self._by_images(lambda ys, xs, tid: KC.conv_direct(ys, xs, Wt, xs.shape[0], *in_hwc, k, stride, padding,
                                                           *out_hw, F), y, x, x.shape[0])
        return y

    def conv_direct_dx(self, dx, dy, W, in_hwc, k, stride, padding, out_hw):
        F = W.shape[0]
        Wd = self._weight_rows("direct_Wd", W, (2, 3, 0, 1))
        self._by_images(lambda dxs, dys, tid: KC.conv_direct_dx(dxs, dys, Wd, dys.shape[0], *in_hwc, k, stride,
                                                                padding, *out_hw, F), dx, dy, dy.shape[0])
        return dx

    def conv_direct_dw(self, dW, x, dy, in_hwc, k, stride, padding, out_hw):
        """Each thread's images into a partial sum of its own, added in a fixed order."""
        F, C = dW.shape[:2]
        parts = self.scratch("direct_dWt", (2, k * k * C, F))
        parts[1] = 0
        self._by_images(lambda xs, dys, tid: KC.conv_direct_dw(parts[tid], xs, dys, xs.shape[0], *in_hwc, k, stride,
                                                               padding, *out_hw, F), x, dy, x.shape[0])
        np.add(parts[0], parts[1], out=parts[0])
        dW[...] = parts[0].reshape(k, k, C, F).transpose(3, 2, 0, 1)
        return dW

    def conv_algorithm(self, signature, trials):
        from fastvae.backends.cpu import conv_choice
        return conv_choice.choose(self, signature, trials)

    def col2im(self, x, cols, in_hwc, k, stride, padding, out_hw):
        col2im = KC.col2im_narrow if in_hwc[2] < 8 else KC.col2im
        self._by_images(lambda xs, c, tid: col2im(xs, c, xs.shape[0], *in_hwc, k, stride, padding, *out_hw),
                        x, cols, x.shape[0])
        return x
