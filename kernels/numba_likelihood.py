"""Numba CPU kernels for the likelihoods of the ``numba`` backend (compute
only; the formulas are documented on ``Backend.likelihood``).

Float32 Bernoulli runs in one pass per row with its own ``exp`` and ``log1p``:
without Intel's SVML, Numba turns ``math.exp`` into one libm call per element,
so these are written as polynomials that LLVM vectorises (AVX-512: 16 lanes).
They are the Cephes single-precision routines (S. L. Moshier, Cephes Math
Library, ``expf.c`` and ``logf.c``: Cody-Waite range reduction by ln 2 split in
two parts, then a degree-5 minimax polynomial for ``exp``; for ``log`` the
argument in [sqrt(1/2), sqrt(2)] and a degree-8 polynomial), with the power of
two assembled from its exponent bits. Measured against float64 references
over logits in [-120, 120] (tests/test_numba_likelihood.py): sigmoid and
softplus within 2.5 float32 ulp (NumPy's float32 ufuncs: 2.2). Float64 keeps
NumPy's SIMD ufuncs (:func:`neg_abs` then ``np.exp``/``np.log1p``, then
:func:`bernoulli_finish`).
"""

import numpy as np

from fastvae.kernels.numba_cpu import _jit

_F = np.float32
# Cephes expf: log2(e); ln 2 = C1 + C2 (C1 exact in 9 bits, C2 < 0); the polynomial for e^r - 1 - r, |r| <= ln2/2
_LOG2E, _C1, _C2 = _F(1.44269504088896341), _F(0.693359375), _F(-2.12194440e-4)
_P0, _P1, _P2, _P3, _P4, _P5 = (_F(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                               4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
# Cephes logf: the polynomial for (log(1+f) - f + f^2/2) / f^3 on sqrt(1/2)-1 <= f <= sqrt(2)-1
_Q = tuple(_F(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                          1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))
_SQRT2_M1 = _F(0.41421356237)
# exp is clamped at float32's smallest normal: never a slow denormal, at most 1.2e-38 off
_X_MIN = _F(-87.33654)                  # log of float32's smallest normal, 2^-126


@_jit
def _log1p_unit(e):
    """log(1 + e) for 0 <= e <= 1 (float32): 1 + e = 2^k (1 + f), k in {0, 1}."""
    big = e > _SQRT2_M1
    f = (e - _F(1.0)) * _F(0.5) if big else e
    z = f * f
    q = _Q[0]
    for c in _Q[1:]:
        q = q * f + c
    k = _F(1.0) if big else _F(0.0)
    return f + (q * f * z + k * _C2 - _F(0.5) * z) + k * _C1


@_jit
def bernoulli_f32(dlogits, nll, logits, x, mant, bits, scale, grad_scale, need_grad, need_nll):
    """Float32 Bernoulli NLL and gradient on ``logits (B, D)`` against
    targets ``x (B, D)`` in [0, 1], into ``nll (B,)`` and ``dlogits (B, D)``
    (either skipped by its flag), one pass per row: e = exp(-|l|), nll_i = sum_j max(l, 0) + log1p(e) - x l (accumulated in
    float64), dlogits = grad_scale * (sigmoid(l) - x) with
    sigmoid(l) = (l >= 0 ? 1 : e) / (1 + e). ``mant (D,)`` float32 and
    ``bits (D,)`` int32 are scratch; ``scale`` is ``bits`` viewed as float32
    (2^n from its exponent field). NaN logits give NaN in both outputs."""
    B, D = logits.shape
    for i in range(B):
        li, xi = logits[i], x[i]
        for j in range(D):                          # e = 2^n * exp(r), x = n ln2 + r
            a = -abs(li[j])
            a = _X_MIN if a < _X_MIN else a         # NaN passes through
            n = np.floor(a * _LOG2E + _F(0.5))
            r = a - n * _C1 - n * _C2
            p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
            mant[j] = p * (r * r) + r + _F(1.0)
            bits[j] = (np.int32(n) + np.int32(127)) << np.int32(23)
        if need_grad:
            di = dlogits[i]
            for j in range(D):
                e = mant[j] * scale[j]
                num = _F(1.0) if li[j] >= 0 else e
                di[j] = (num / (_F(1.0) + e) - xi[j]) * grad_scale
        if need_nll:
            acc = 0.0
            for j in range(D):
                l = li[j]
                acc += max(l, _F(0.0)) + _log1p_unit(mant[j] * scale[j]) - xi[j] * l
            nll[i] = acc


@_jit
def neg_abs(out, a):
    """out = -|a| (the argument of exp in the stable Bernoulli terms)."""
    B, D = a.shape
    for i in range(B):
        for j in range(D):
            out[i, j] = -abs(a[i, j])


@_jit
def bernoulli_finish(dlogits, nll, logits, x, e, lp, grad_scale, need_grad, need_nll):
    """Bernoulli NLL on logits and its gradient from e = exp(-|l|) and
    lp = log1p(e) (computed by NumPy's SIMD ufuncs, which Numba cannot
    vectorise without SVML): nll_i = sum_j max(l, 0) + lp - x l;
    dlogits = grad_scale * (sigmoid(l) - x), sigmoid(l) = (l >= 0 ? 1 : e) / (1 + e)."""
    B, D = logits.shape
    for i in range(B):
        li, xi, ei = logits[i], x[i], e[i]
        if need_grad:
            di = dlogits[i]
            for j in range(D):
                num = 1.0 if li[j] >= 0 else ei[j]
                di[j] = (num / (1.0 + ei[j]) - xi[j]) * grad_scale
        if need_nll:
            pi = lp[i]
            acc = 0.0
            for j in range(D):
                l = li[j]
                acc += max(l, 0.0) + pi[j] - xi[j] * l
            nll[i] = acc


@_jit
def gaussian(dlogits, nll, logits, x, inv_var, half, const, grad_scale, need_grad, need_nll):
    """r = l - x; nll_i = half * sum_j r^2 + const; dlogits = grad_scale * inv_var * r
    (gaussian: inv_var = 1/sigma^2, half = 1/(2 sigma^2), const = D log(sigma sqrt(2 pi));
    mse: inv_var = 2, half = 1, const = 0)."""
    B, D = logits.shape
    g = inv_var * grad_scale
    for i in range(B):
        acc = 0.0
        for j in range(D):
            r = logits[i, j] - x[i, j]
            acc += r * r
            if need_grad:
                dlogits[i, j] = r * g
        if need_nll:
            nll[i] = acc * half + const


