"""Numba kernels where they deliberately differ from the NumPy reference.

The float32 Bernoulli kernel computes exp and log1p with its
own polynomials (kernels/numba_likelihood.py, Cephes expf/logf): checked
element by element against float64 references over the whole float32 range of
logits, not only against the NumPy backend on random logits.

Tolerances from the arithmetic: Cephes' expf and logf are within 1-2 ulp; the
sigmoid adds a division and a rounded 1 + e, softplus adds a rounded sum, so 8
float32 ulp (2^-23 each) bound both; measured: 2.5 ulp, and NumPy's own
float32 path 2.2 ulp on the same grid.

Adam stores m and v below the dtype's smallest normal as 0 (denormal
arithmetic is slow): its results may differ from NumPy's only there."""

import numpy as np
import pytest

pytest.importorskip("numba", reason="numba is not installed")

from fastvae.backends.numba_backend import NumbaBackend  # noqa: E402
from fastvae.kernels import numba_likelihood as L  # noqa: E402

ULP = 2.0 ** -23


def _sigmoid64(l):
    e = np.exp(-np.abs(l))
    return np.where(l >= 0, 1.0, e) / (1.0 + e)


def _per_element(logits, x):
    """The kernel on one logit per row: nll_i is that element's term."""
    lg = np.ascontiguousarray(logits, np.float32).reshape(-1, 1)
    xx = np.ascontiguousarray(x, np.float32).reshape(-1, 1)
    d, n = np.empty_like(lg), np.empty(lg.shape[0], np.float32)
    bits = np.empty(1, np.int32)
    L.bernoulli_f32(d, n, lg, xx, np.empty(1, np.float32), bits, bits.view(np.float32), np.float32(1.0), True, True)
    return d[:, 0].astype(np.float64), n.astype(np.float64)


def test_sigmoid_and_softplus_within_8_ulp_over_the_float32_range():
    r = np.random.default_rng(0)
    l32 = np.concatenate([np.linspace(-120, 120, 400_001), r.normal(size=100_000) * 4,
                          np.ldexp(r.random(20_000), -r.integers(0, 120, 20_000))]).astype(np.float32)
    l = l32.astype(np.float64)                         # the exact float32 inputs
    grad, nll = _per_element(l32, np.zeros_like(l32))  # x = 0: grad = sigmoid(l), nll = softplus(l)
    sig = _sigmoid64(l)
    soft = np.logaddexp(0.0, l)
    normal = sig > np.finfo(np.float32).tiny           # below: the kernel clamps e at ~1.6e-38
    assert np.all(np.abs(grad[normal] - sig[normal]) <= 8 * ULP * sig[normal])
    assert np.all(np.abs(grad[~normal] - sig[~normal]) <= 2e-38)
    ok = soft > np.finfo(np.float32).tiny
    assert np.all(np.abs(nll[ok] - soft[ok]) <= 8 * ULP * soft[ok])
    assert np.all(np.abs(nll[~ok] - soft[~ok]) <= 2e-38)


def test_rows_match_a_float64_reference_and_the_three_modes_agree():
    be = NumbaBackend("float32")
    r = np.random.default_rng(1)
    logits = (r.normal(size=(33, 784)) * 6).astype(np.float32)
    x = r.random((33, 784)).astype(np.float32)
    d, n = np.empty_like(logits), np.empty(33, np.float32)
    be.likelihood(d, n, logits, x, "bernoulli", 1.0, 0.25)
    l, xx = logits.astype(np.float64), x.astype(np.float64)
    want_n = (np.logaddexp(0.0, l) - xx * l).sum(1)
    want_d = 0.25 * (_sigmoid64(l) - xx)
    # the row sum accumulates in float64: only the terms' 8 ulp remain
    assert np.all(np.abs(n - want_n) <= 8 * ULP * (np.logaddexp(0.0, l) + np.abs(xx * l)).sum(1))
    assert np.all(np.abs(d - want_d) <= 0.25 * 8 * ULP + 1e-12)
    d2, n2 = np.full_like(d, np.nan), np.full_like(n, np.nan)
    be.likelihood(d2, None, logits, x, "bernoulli", 1.0, 0.25)
    be.likelihood(None, n2, logits, x, "bernoulli", 1.0, 0.25)
    assert np.array_equal(d2, d) and np.array_equal(n2, n)


def test_nan_and_inf_logits_propagate_as_in_numpy():
    be = NumbaBackend("float32")
    logits = np.zeros((3, 20), np.float32)
    logits[1, 4], logits[2, 5], logits[2, 6] = np.nan, np.inf, -np.inf
    x = np.full((3, 20), 0.5, np.float32)
    d, n = np.empty_like(logits), np.empty(3, np.float32)
    be.likelihood(d, n, logits, x, "bernoulli", 1.0, 1.0)
    assert np.isnan(n[1]) and np.isnan(d[1, 4]) and np.isfinite(n[0]) and np.all(np.isfinite(d[0]))
    assert np.isnan(n[2])                         # inf - inf, as the float64 formula gives
    assert d[2, 5] == 0.5 and d[2, 6] == -0.5      # sigmoid's limits minus x


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_flushes_denormal_moments_to_zero_and_keeps_nan(dtype):
    be = NumbaBackend(dtype)
    tiny = np.finfo(dtype).tiny
    n = 64
    p = np.linspace(-1, 1, n).astype(dtype)
    g = np.zeros(n, dtype)
    g[:8] = 1e-3                                   # live weights
    g[8] = np.nan
    m = np.full(n, 3 * tiny, dtype)                # 0.9 * 3 tiny: still normal; 0.9^11 * 3 tiny: denormal
    m[:8] = 0.1
    v = np.full(n, 0.5, dtype)
    v[20:] = 1.001 * tiny                          # 0.999 * 1.001 tiny < tiny
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, bc2_sqrt=1.0, weight_decay=0.0, decay_factor=1.0)
    be.adam_update(p, g, m, v, **kw)
    np.testing.assert_allclose(m[9:], 0.9 * 3 * tiny, rtol=1e-6)      # normal: kept
    assert np.all(v[20:] == 0) and np.all(v[9:20] > 0)
    for _ in range(10):
        be.adam_update(p, g, m, v, **kw)
    assert np.all(m[9:] == 0) and np.all(v[20:] == 0)            # never a denormal
    assert np.isnan(m[8]) and np.isnan(v[8]) and np.isnan(p[8])
    assert np.all(m[:8] > 0.1 * 0.9 ** 11) and np.all(np.isfinite(p[9:]))
