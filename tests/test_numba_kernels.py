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


# ---- convolution and bias-gradient kernels for few channels --------------------
# (in (H, W, C), kernel, stride, padding): interior windows and windows in the padding, odd sizes
NARROW_GEOMS = [((64, 64, 1), 4, 2, 1), ((9, 7, 3), 3, 1, 1), ((6, 5, 7), 4, 3, 2), ((5, 5, 2), 5, 1, 0),
                ((28, 28, 1), 6, 2, 2), ((7, 6, 1), 2, 3, 1), ((4, 4, 3), 3, 1, 3)]    # stride > kernel; padding >= kernel


@pytest.mark.parametrize("hwc, k, s, p", NARROW_GEOMS)
def test_narrow_im2col_and_col2im_are_the_general_kernels_bit_for_bit(hwc, k, s, p):
    """With fewer than 8 channels the backend skips the bounds checks of
    windows inside the image: the same copies and the same additions in the
    same order as the general kernels, so equal bit for bit, and every entry
    is the one im2col's definition names."""
    from fastvae.kernels import numba_conv as K
    from tests.test_conv import _assert_is_the_definition
    H, W, C = hwc
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    r = np.random.default_rng(7)
    B = 3
    x = r.normal(size=(B, H * W * C)).astype(np.float32)
    general = np.full((B * Ho * Wo, C * k * k), np.nan, np.float32)
    K.im2col(general, x, B, H, W, C, k, s, p, Ho, Wo)
    cols = NumbaBackend("float32").im2col(np.full_like(general, np.nan), x, hwc, k, s, p, (Ho, Wo))
    assert np.array_equal(cols, general)
    if H * W <= 100:
        _assert_is_the_definition(cols, x, hwc, k, s, p, (Ho, Wo))
    c = r.normal(size=general.shape).astype(np.float32)
    want = np.full_like(x, np.nan)
    K.col2im(want, c, B, H, W, C, k, s, p, Ho, Wo)
    got = NumbaBackend("float32").col2im(np.full_like(x, np.nan), c, hwc, k, s, p, (Ho, Wo))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("shape", [(262144, 1), (1000, 3), (67, 5), (3, 1), (129, 15), (50, 16)])
def test_bias_gradient_of_few_columns(shape):
    """Fewer than 16 columns: interleaved partial sums (another order than
    the row loop). Integer values sum exactly in float32 in any order, so
    the result must equal the exact sum; on random values it is within the
    float32 rounding of a sum of n terms (n * 2^-24 of the sum of |a|; the
    row loop's bound too)."""
    be = NumbaBackend("float32")
    r = np.random.default_rng(shape[0])
    ints = r.integers(-8, 9, size=shape).astype(np.float32)
    out = np.full(shape[1], np.nan, np.float32)
    assert np.array_equal(be.col_sum(out, ints), ints.astype(np.int64).sum(0).astype(np.float32))
    a = r.normal(size=shape).astype(np.float32)
    got = be.col_sum(np.full(shape[1], np.nan, np.float32), a).astype(np.float64)
    bound = shape[0] * 2.0 ** -24 * np.abs(a.astype(np.float64)).sum(0)
    assert np.all(np.abs(got - a.astype(np.float64).sum(0)) <= bound)
    assert np.array_equal(be.col_sum(out, a[:, :1].copy()), be.col_sum(out.copy(), a[:, :1].copy()))


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "leaky_relu", "elu", "softplus"])
def test_activation_backward_on_one_long_row_is_the_row_loop(act):
    """Contiguous (B, H) arrays go to the kernel as one row: elementwise, so
    bit for bit the row loop, which a non-contiguous view still takes."""
    from fastvae.kernels import numba_cpu as K
    from fastvae.nn.opcodes import ACTIVATION_CODES
    be = NumbaBackend("float32")
    r = np.random.default_rng(1)
    pre = r.normal(size=(65, 32)).astype(np.float32)
    out = np.empty_like(pre)
    be.bias_act(out, pre, np.zeros(32, np.float32), act)
    d = r.normal(size=pre.shape).astype(np.float32)
    want = d.copy()
    K.act_backward(want, pre, out, ACTIVATION_CODES[act], np.float32(0.01), np.float32(1.0))
    assert np.array_equal(be.act_backward(d.copy(), pre, out, act), want)
    wide = np.zeros((65, 64), np.float32)
    wide[:, ::2] = d                                      # a strided view: the row loop
    assert np.array_equal(be.act_backward(wide[:, ::2], pre, out, act), want)
