"""Numba CPU kernels for the ``numba`` backend: each fuses what NumPy does in
several passes into one loop. Compute only, no model logic; the formulas and
their sources are documented on :class:`fastvae.backends.base.Backend`.

All kernels are serial (``parallel=False``): they run between BLAS calls that
already use every core, and Numba threads next to BLAS threads oversubscribe
the CPU. ``fastmath`` is limited to reassociation/contraction (so sums
vectorise) and never assumes finite values: NaN and inf still propagate, which
the trainer's divergence check relies on. ``cache=True`` keeps compiled code
on disk between runs.
"""

import math

import numpy as np

from numba import njit

from fastvae.nn.opcodes import ACTIVATION_CODES

_FM = {"reassoc", "contract", "nsz"}
_jit = njit(cache=True, fastmath=_FM, error_model="numpy", nogil=True)

# activation codes from the one table in fastvae.nn.opcodes (frozen into the kernels at compile time)
IDENTITY, RELU, TANH, SIGMOID = (ACTIVATION_CODES[k] for k in ("identity", "relu", "tanh", "sigmoid"))
LEAKY_RELU, ELU, SOFTPLUS = (ACTIVATION_CODES[k] for k in ("leaky_relu", "elu", "softplus"))


@_jit
def _sigmoid(v):
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


@_jit
def bias_act(out, pre, bias, act, slope, alpha):
    """pre += bias (kept); out = act(pre). (B, H), (B, H), (H,)."""
    B, H = pre.shape
    for i in range(B):
        p = pre[i]
        if act == IDENTITY:
            for j in range(H):
                p[j] += bias[j]
            continue
        o = out[i]
        if act == RELU:
            for j in range(H):
                v = p[j] + bias[j]
                p[j] = v
                o[j] = v if v > 0 else 0.0
        elif act == TANH:
            for j in range(H):
                v = p[j] + bias[j]
                p[j] = v
                o[j] = math.tanh(v)
        elif act == SIGMOID:
            for j in range(H):
                v = p[j] + bias[j]
                p[j] = v
                o[j] = 0.5 + 0.5 * math.tanh(0.5 * v)
        elif act == LEAKY_RELU:
            for j in range(H):
                v = p[j] + bias[j]
                p[j] = v
                o[j] = v if v > 0 else slope * v
        elif act == ELU:
            for j in range(H):
                v = p[j] + bias[j]
                p[j] = v
                o[j] = v if v > 0 else alpha * math.expm1(v)
        else:  # SOFTPLUS
            for j in range(H):
                v = p[j] + bias[j]
                p[j] = v
                o[j] = max(v, 0.0) + math.log1p(math.exp(-abs(v)))


@_jit
def act_backward(d, pre, out, act, slope, alpha):
    """d *= act'(pre), in place; ``out = act(pre)``."""
    B, H = d.shape
    if act == IDENTITY:
        return
    for i in range(B):
        di, p, o = d[i], pre[i], out[i]
        if act == RELU:
            for j in range(H):
                di[j] = di[j] if p[j] > 0 else 0.0
        elif act == TANH:
            for j in range(H):
                di[j] *= 1.0 - o[j] * o[j]
        elif act == SIGMOID:
            for j in range(H):
                di[j] *= o[j] * (1.0 - o[j])
        elif act == LEAKY_RELU:
            for j in range(H):
                di[j] = di[j] if p[j] > 0 else slope * di[j]
        elif act == ELU:
            for j in range(H):
                di[j] = di[j] if p[j] > 0 else di[j] * (o[j] + alpha)
        else:  # SOFTPLUS
            for j in range(H):
                di[j] *= 0.5 + 0.5 * math.tanh(0.5 * p[j])


@_jit
def col_sum(out, a):
    """out[j] = sum_i a[i, j], accumulated row by row (contiguous reads)."""
    B, H = a.shape
    for j in range(H):
        out[j] = 0.0
    for i in range(B):
        r = a[i]
        for j in range(H):
            out[j] += r[j]


@_jit
def col_sum_narrow(out, flat, part):
    """out[j] = sum_i a[i, j] for a C-contiguous ``a (B, H)`` of few columns
    given as ``flat (B H,)``: ``part (G H,)`` holds G interleaved partial
    sums of each column, so each block of G rows is one contiguous run that
    vectorises (a row loop of one column is a chain of dependent scalar
    adds: 0.71 ms for 262,144 rows); the rows past the last whole block go
    to the first group, then each column's G partial sums are added in
    order. Deterministic, but another summation order than :func:`col_sum`."""
    H = out.shape[0]
    GH = part.shape[0]
    n = flat.shape[0] // GH
    for m in range(GH):
        part[m] = 0.0
    for t in range(n):
        base = t * GH
        for m in range(GH):
            part[m] += flat[base + m]
    for m in range(n * GH, flat.shape[0]):
        part[m - n * GH] += flat[m]
    for j in range(H):
        acc = part[j]
        for g in range(1, GH // H):
            acc += part[g * H + j]
        out[j] = acc


@_jit
def reparam_kl(z, kl, std, head, eps, need_kl):
    """head = [mu | logvar] (B, 2L): std = exp(logvar/2), z = mu + std*eps,
    kl_i = 1/2 sum_j (mu^2 + std^2 - logvar - 1)."""
    B, L = z.shape
    for i in range(B):
        acc = 0.0
        for j in range(L):
            mu = head[i, j]
            lv = head[i, L + j]
            s = math.exp(0.5 * lv)
            std[i, j] = s
            z[i, j] = mu + s * eps[i, j]
            acc += mu * mu + s * s - lv - 1.0
        if need_kl:
            kl[i] = 0.5 * acc


@_jit
def reparam_kl_backward(dhead, dz, head, std, eps, kl_scale):
    """dhead = [dmu | dlogvar]: dmu = dz + c mu; dlogvar = (dz eps std + c (std^2 - 1)) / 2."""
    B, L = dz.shape
    for i in range(B):
        for j in range(L):
            s = std[i, j]
            dhead[i, j] = dz[i, j] + kl_scale * head[i, j]
            dhead[i, L + j] = 0.5 * (dz[i, j] * eps[i, j] * s + kl_scale * (s * s - 1.0))


@_jit
def adam_update(params, grads, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, e, a,
                weight_decay, decay_factor, tiny):
    """The whole Adam step over the flat buffers in one pass:
    g = grad + wd p; p *= decay; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= a m / (sqrt(v) + e), with a = lr/(1-b1^t) * sqrt(1-b2^t) and
    e = eps * sqrt(1-b2^t) (torch.optim.Adam's form, rearranged on the host).
    m and v below ``tiny`` (the dtype's smallest normal) are stored as 0: a
    weight that gets no gradient (an always-black pixel's) has m = b1^t m0,
    a denormal after a few hundred steps, and denormal arithmetic is slow on
    CPUs; the update such an m makes is below p's own rounding. NaN stays NaN.
    Scalars arrive in the buffers' dtype so float32 loops stay float32 (SIMD)."""
    n = params.shape[0]
    zero = tiny - tiny                       # in the buffers' dtype: a float64 0.0 would stop SIMD
    for k in range(n):
        p = params[k]
        g = grads[k] + weight_decay * p
        mk = beta1 * m[k] + one_minus_beta1 * g
        vk = beta2 * v[k] + one_minus_beta2 * (g * g)
        mk = zero if abs(mk) < tiny else mk
        vk = zero if vk < tiny else vk
        m[k] = mk
        v[k] = vk
        params[k] = p * decay_factor - a * mk / (math.sqrt(vk) + e)


@_jit
def gather_rows(out, X, idx):
    B, D = out.shape
    for i in range(B):
        src = X[idx[i]]
        dst = out[i]
        for j in range(D):
            dst[j] = src[j]


@_jit
def bernoulli_(out, probs, u):
    """out = 1 where u < probs else 0 (may alias probs)."""
    B, D = out.shape
    for i in range(B):
        for j in range(D):
            out[i, j] = 1.0 if u[i, j] < probs[i, j] else 0.0


@_jit
def tc_pairwise(z, mu, lv, logw, coef, coef_dim, dz, dmu, dlv, lse, lsed):
    """The beta-TCVAE pairwise terms in one pass per sample i (formulas on
    Backend.tc_pairwise): lq_ijd, the joint and per-dimension log-sum-exps
    over j under the log weights logw[i, j] into lse[i], lsed[i], and, when
    a coefficient is non-zero, the gradient of coef log q(z_i) + coef_dim
    sum_d log q(z_id) added to dz, dmu, dlv."""
    B, L = z.shape
    half_log_2pi = 0.5 * math.log(2.0 * math.pi)
    inv = np.exp(-lv)
    lq = np.empty((B, L), z.dtype)
    S = np.empty(B, z.dtype)
    top_d = np.empty(L, z.dtype)
    sum_d = np.empty(L, z.dtype)
    for i in range(B):
        for j in range(B):
            acc = 0.0
            for d in range(L):
                t = z[i, d] - mu[j, d]
                v = -0.5 * (t * t * inv[j, d] + lv[j, d]) - half_log_2pi
                lq[j, d] = v + logw[i, j]
                acc += v
            S[j] = acc + logw[i, j]
        top = S.max()
        s = 0.0
        for j in range(B):
            s += math.exp(S[j] - top)
        lse[i] = top + math.log(s)
        for d in range(L):
            top_d[d] = lq[0, d]
        for j in range(1, B):
            for d in range(L):
                if lq[j, d] > top_d[d]:
                    top_d[d] = lq[j, d]
        for d in range(L):
            sum_d[d] = 0.0
        for j in range(B):
            for d in range(L):
                e = math.exp(lq[j, d] - top_d[d])
                lq[j, d] = e                  # kept for the gradient: one exp per (i, j, d)
                sum_d[d] += e
        acc = 0.0
        for d in range(L):
            acc += top_d[d] + math.log(sum_d[d])
        lsed[i] = acc
        if coef != 0.0 or coef_dim != 0.0:
            for j in range(B):
                a = math.exp(S[j] - top) / s
                for d in range(L):
                    g = coef * a + coef_dim * (lq[j, d] / sum_d[d])
                    t = z[i, d] - mu[j, d]
                    gv = g * t * inv[j, d]
                    dz[i, d] -= gv
                    dmu[j, d] += gv
                    dlv[j, d] += 0.5 * g * (t * t * inv[j, d] - 1.0)
