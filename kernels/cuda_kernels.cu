// fastvae CUDA kernels for the cupy backend (loaded with cupy.RawModule).
// Compute only, no model logic; they mirror kernels/numba_cpu.py one for one.
// Every kernel is a template over T = float or double; the backend asks NVRTC
// for the instantiations it needs through RawModule(name_expressions=...).
// The formulas and their sources are documented on fastvae.backends.base.Backend.
//
// Per-step values (Adam's bias-corrected step, the KL weight, the Philox counter) also
// arrive through device pointers (dyn, scale, base) combined with the scalar argument:
// eager launches pass the value and a neutral 1 (0 for counters); a CUDA graph, whose
// scalar arguments are frozen at capture, passes the neutral scalar and a slot that the
// host rewrites before each replay (fastvae/backends/cupy/cuda_graph.py). Both give the same bits.
//
// The activation and likelihood codes (FV_RELU, FV_BERNOULLI, ...) come from the
// one table in fastvae/nn/opcodes.py as compiler defines (fastvae.nn.opcodes.cuda_defines()).
//
// Compile check without a GPU:
//   nvcc -ptx -DFASTVAE_INSTANTIATE $(python -c "from fastvae.nn.opcodes import cuda_defines; print(*cuda_defines())")
//       kernels/cuda_kernels.cu      (kernels/cuda_gemm.cu, fastvae's own GEMM, is a module of its own)

#if !defined(FV_IDENTITY) || !defined(FV_SOFTPLUS) || !defined(FV_BERNOULLI) || !defined(FV_MSE)
#error "compile with the op-code defines of fastvae.nn.opcodes.cuda_defines()"
#endif

#define FV_GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

template <typename T>
__device__ __forceinline__ T fv_act(T v, int act, T slope, T alpha) {
    switch (act) {
        case FV_RELU: return v > T(0) ? v : T(0);
        case FV_TANH: return tanh(v);
        case FV_SIGMOID: return T(0.5) + T(0.5) * tanh(T(0.5) * v);
        case FV_LEAKY_RELU: return v > T(0) ? v : slope * v;
        case FV_ELU: return v > T(0) ? v : alpha * expm1(v);
        case FV_SOFTPLUS: return fmax(v, T(0)) + log1p(exp(-fabs(v)));
        default: return v;
    }
}

// pre += bias (kept for backward); out = act(pre), a copy for identity unless out is pre.
// pre, out: (B, H); bias: (H,)
template <typename T>
__global__ void bias_act(T* pre, const T* bias, T* out, long long n, int H, int act, T slope, T alpha) {
    FV_GRID_STRIDE(i, n) {
        T v = pre[i] + bias[i % H];
        pre[i] = v;
        if (act != FV_IDENTITY) out[i] = fv_act(v, act, slope, alpha);
        else if (out != pre) out[i] = v;
    }
}

// d *= act'(pre), in place; out = act(pre)
template <typename T>
__global__ void act_backward(T* d, const T* pre, const T* out, long long n, int act, T slope, T alpha) {
    FV_GRID_STRIDE(i, n) {
        T p = pre[i], g;
        switch (act) {
            case FV_RELU: g = p > T(0) ? T(1) : T(0); break;
            case FV_TANH: g = T(1) - out[i] * out[i]; break;
            case FV_SIGMOID: g = out[i] * (T(1) - out[i]); break;
            case FV_LEAKY_RELU: g = p > T(0) ? T(1) : slope; break;
            case FV_ELU: g = p > T(0) ? T(1) : out[i] + alpha; break;
            case FV_SOFTPLUS: g = T(0.5) + T(0.5) * tanh(T(0.5) * p); break;
            default: g = T(1);
        }
        d[i] *= g;
    }
}

// head = [mu | logvar] (B, 2L): std = exp(logvar/2), z = mu + std*eps,
// kl_i = 1/2 sum_j (mu^2 + std^2 - logvar - 1). One thread per image.
template <typename T>
__global__ void reparam_kl(T* z, T* kl, T* std_, const T* head, const T* eps, int B, int L, int need_kl) {
    FV_GRID_STRIDE(i, B) {
        T acc = T(0);
        for (int j = 0; j < L; ++j) {
            T mu = head[i * 2 * L + j], lv = head[i * 2 * L + L + j];
            T s = exp(T(0.5) * lv);
            std_[i * L + j] = s;
            z[i * L + j] = mu + s * eps[i * L + j];
            acc += mu * mu + s * s - lv - T(1);
        }
        if (need_kl) kl[i] = T(0.5) * acc;
    }
}

// dhead = [dmu | dlogvar]: dmu = dz + c mu; dlogvar = (dz eps std + c (std^2 - 1)) / 2
template <typename T>
__global__ void reparam_kl_backward(T* dhead, const T* dz, const T* head, const T* std_, const T* eps,
                                    int B, int L, T kl_scale, const T* scale) {
    kl_scale *= scale[0];
    FV_GRID_STRIDE(k, (long long)B * L) {
        long long i = k / L, j = k % L;
        T s = std_[k];
        dhead[i * 2 * L + j] = dz[k] + kl_scale * head[i * 2 * L + j];
        dhead[i * 2 * L + L + j] = T(0.5) * (dz[k] * eps[k] * s + kl_scale * (s * s - T(1)));
    }
}

// Likelihood and its gradient, one block per image, block-wide sum for nll.
// FV_BERNOULLI on logits:     nll = sum softplus(l) - x l, grad = sigmoid(l) - x
// FV_GAUSSIAN / FV_MSE:       r = l - x, nll = half * sum r^2 + cnst, grad = inv_var * r
// dlogits = grad_scale * grad. blockDim.x must be a power of two <= 1024.
template <typename T>
__global__ void likelihood(T* dlogits, T* nll, const T* logits, const T* x, int B, int D, int kind,
                           T inv_var, T half, T cnst, T grad_scale, int need_grad, int need_nll) {
    extern __shared__ unsigned char fv_smem[];
    T* red = reinterpret_cast<T*>(fv_smem);
    int i = blockIdx.x;
    if (i >= B) return;
    const T* l = logits + (long long)i * D;
    const T* xi = x + (long long)i * D;
    T acc = T(0);
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        T v = l[j], t = xi[j];
        if (kind == FV_BERNOULLI) {
            T e = exp(-fabs(v));
            if (need_nll) acc += fmax(v, T(0)) + log1p(e) - t * v;
            if (need_grad) {
                T s = (v >= T(0) ? T(1) : e) / (T(1) + e);
                dlogits[(long long)i * D + j] = (s - t) * grad_scale;
            }
        } else {
            T r = v - t;
            acc += r * r;
            if (need_grad) dlogits[(long long)i * D + j] = r * (inv_var * grad_scale);
        }
    }
    if (!need_nll) return;
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) nll[i] = (kind == FV_BERNOULLI) ? red[0] : red[0] * half + cnst;
}

// The whole Adam step over the flat buffers (torch.optim.Adam's form, with
// a = lr/(1-b1^t) * sqrt(1-b2^t) and e = eps * sqrt(1-b2^t) folded on the host;
// e, a and decay are each multiplied by dyn[0..2], the per-step slots of a CUDA graph).
template <typename T>
__global__ void adam_update(T* p, const T* g, T* m, T* v, long long n, T b1, T omb1, T b2, T omb2,
                            T e, T a, T wd, T decay, const T* dyn) {
    e *= dyn[0];
    a *= dyn[1];
    decay *= dyn[2];
    FV_GRID_STRIDE(k, n) {
        T pk = p[k];
        T gk = g[k] + wd * pk;
        T mk = b1 * m[k] + omb1 * gk;
        T vk = b2 * v[k] + omb2 * (gk * gk);
        m[k] = mk;
        v[k] = vk;
        p[k] = pk * decay - a * mk / (sqrt(vk) + e);
    }
}

// ---- convolution: im2col / col2im on channels-last images (B, H, W, C) ----
// cols[(b, oh, ow), (c, i, j)] = x[b, oh*s - p + i, ow*s - p + j, c], 0 in the padding.
// One thread per column entry. Mirrors Backend.im2col.
template <typename T>
__global__ void im2col(T* cols, const T* x, int B, int H, int W, int C, int k, int s, int p, int Ho, int Wo) {
    FV_GRID_STRIDE(t, (long long)B * Ho * Wo * C * k * k) {
        long long r = t;
        int j = (int)(r % k); r /= k;
        int i = (int)(r % k); r /= k;
        int c = (int)(r % C); r /= C;
        int ow = (int)(r % Wo); r /= Wo;
        int oh = (int)(r % Ho);
        long long b = r / Ho;
        int h = oh * s - p + i, w = ow * s - p + j;
        cols[t] = (h >= 0 && h < H && w >= 0 && w < W) ? x[((b * H + h) * W + w) * C + c] : T(0);
    }
}

// The adjoint: x[b, h, w, c] = sum of the column entries read from that pixel.
// One thread per pixel gathers them (no atomics, deterministic), in the same
// (i, j) order as Backend.col2im, so the sums round alike.
template <typename T>
__global__ void col2im(T* x, const T* cols, int B, int H, int W, int C, int k, int s, int p, int Ho, int Wo) {
    FV_GRID_STRIDE(t, (long long)B * H * W * C) {
        long long r = t;
        int c = (int)(r % C); r /= C;
        int w = (int)(r % W); r /= W;
        int h = (int)(r % H);
        long long b = r / H;
        T acc = T(0);
        for (int i = 0; i < k; ++i) {
            int hh = h + p - i;
            if (hh < 0 || hh % s) continue;
            int oh = hh / s;
            if (oh >= Ho) continue;
            for (int j = 0; j < k; ++j) {
                int ww = w + p - j;
                if (ww < 0 || ww % s) continue;
                int ow = ww / s;
                if (ow >= Wo) continue;
                acc += cols[(((b * Ho + oh) * Wo + ow) * C + c) * k * k + i * k + j];
            }
        }
        x[t] = acc;
    }
}

// ---- Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") ----
// Counter-based: output block b is philox(key, (b_lo + ctr_lo, b_hi + ctr_hi, stream, 0)),
// so the whole RNG state is (key, counter) and every block is independent of launch shape.
struct fv_u4 { unsigned int x, y, z, w; };

__host__ __device__ __forceinline__ unsigned int fv_mulhi(unsigned int a, unsigned int b) {
#ifdef __CUDA_ARCH__
    return __umulhi(a, b);
#else
    return (unsigned int)(((unsigned long long)a * b) >> 32);
#endif
}

// also compiled for the host, so a CPU-only test can check it against the Random123 vectors
__host__ __device__ __forceinline__ fv_u4 fv_philox(unsigned long long block, unsigned int stream,
                                                    unsigned int k0, unsigned int k1) {
    unsigned int c0 = (unsigned int)block, c1 = (unsigned int)(block >> 32), c2 = stream, c3 = 0u;
    #pragma unroll
    for (int r = 0; r < 10; ++r) {
        unsigned int hi0 = fv_mulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        unsigned int hi1 = fv_mulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        unsigned int n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    fv_u4 out = {c0, c1, c2, c3};
    return out;
}

// (u + 1/2) / 2^32 in (0, 1), exact in double; the sampling kernels compute in double.
__device__ __forceinline__ double fv_u01(unsigned int u) { return ((double)u + 0.5) * 2.3283064365386963e-10; }

// U[0, 1) in T: float keeps the top 24 bits (u >> 8) / 2^24, at most 1 - 2^-24 (rounding
// fv_u01 to float gave exactly 1.0 for the top 128 of the 2^32 words); double is fv_u01.
template <typename T> __device__ __forceinline__ T fv_uniform(unsigned int u) { return (T)fv_u01(u); }
template <> __device__ __forceinline__ float fv_uniform<float>(unsigned int u) {
    return (float)(u >> 8) * 5.9604644775390625e-8f;
}

// out[n] ~ N(0, 1): Box-Muller on pairs of 32-bit uniforms in (0, 1), four per Philox block.
template <typename T>
__global__ void philox_normal(T* out, long long n, unsigned long long counter,
                              const unsigned long long* base, unsigned int stream, unsigned int k0, unsigned int k1) {
    counter += base[0];
    FV_GRID_STRIDE(b, (n + 3) / 4) {
        fv_u4 r = fv_philox(counter + (unsigned long long)b, stream, k0, k1);
        double rad0 = sqrt(-2.0 * log(fv_u01(r.x))), th0 = 6.283185307179586 * fv_u01(r.y);
        double rad1 = sqrt(-2.0 * log(fv_u01(r.z))), th1 = 6.283185307179586 * fv_u01(r.w);
        double v[4] = {rad0 * cos(th0), rad0 * sin(th0), rad1 * cos(th1), rad1 * sin(th1)};
        for (int q = 0; q < 4; ++q) if (4 * b + q < n) out[4 * b + q] = (T)v[q];
    }
}

// out[n] ~ U[0, 1) (fv_uniform: 24-bit resolution in float, 32-bit in double)
template <typename T>
__global__ void philox_uniform(T* out, long long n, unsigned long long counter,
                               const unsigned long long* base, unsigned int stream, unsigned int k0,
                               unsigned int k1) {
    counter += base[0];
    FV_GRID_STRIDE(b, (n + 3) / 4) {
        fv_u4 r = fv_philox(counter + (unsigned long long)b, stream, k0, k1);
        unsigned int v[4] = {r.x, r.y, r.z, r.w};
        for (int q = 0; q < 4; ++q) if (4 * b + q < n) out[4 * b + q] = fv_uniform<T>(v[q]);
    }
}

// out = (u < probs) with u from Philox; out may alias probs (dynamic binarization)
template <typename T>
__global__ void philox_bernoulli(T* out, const T* probs, long long n, unsigned long long counter,
                                 const unsigned long long* base, unsigned int stream, unsigned int k0,
                                 unsigned int k1) {
    counter += base[0];
    FV_GRID_STRIDE(b, (n + 3) / 4) {
        fv_u4 r = fv_philox(counter + (unsigned long long)b, stream, k0, k1);
        unsigned int v[4] = {r.x, r.y, r.z, r.w};
        for (int q = 0; q < 4; ++q) {
            long long k = 4 * b + q;
            if (k < n) out[k] = fv_u01(v[q]) < (double)probs[k] ? T(1) : T(0);
        }
    }
}

// raw 32-bit words (sort keys for permutations)
__global__ void philox_bits(unsigned int* out, long long n, unsigned long long counter,
                            const unsigned long long* base, unsigned int stream, unsigned int k0, unsigned int k1) {
    counter += base[0];
    FV_GRID_STRIDE(b, (n + 3) / 4) {
        fv_u4 r = fv_philox(counter + (unsigned long long)b, stream, k0, k1);
        unsigned int v[4] = {r.x, r.y, r.z, r.w};
        for (int q = 0; q < 4; ++q) if (4 * b + q < n) out[4 * b + q] = v[q];
    }
}

// ---- beta-TCVAE pairwise terms (Chen et al. 2018, Sec. 4.1 and Appendix C) under the estimator's
// log weights lw (B, B); formulas on Backend.tc_pairwise. Three gather kernels, no atomics: rows (one thread per sample i: the joint
// log-sum-exp and its terms, the per-dimension maxima and sums), then dz (one thread per (i, d)) and
// dmu / dlogvar (one thread per (j, d)), both reading the row statistics.
template <typename T>
__device__ __forceinline__ T fv_lq(const T* z, const T* mu, const T* lv, int i, int j, int d, int L) {
    T t = z[i * L + d] - mu[j * L + d];
    return (T)-0.5 * (t * t * exp(-lv[j * L + d]) + lv[j * L + d]) - (T)0.91893853320467274178;
}

template <typename T>
__global__ void tc_rows(T* S, T* top, T* sum, T* topd, T* sumd, T* lse, T* lsed,
                        const T* z, const T* mu, const T* lv, const T* lw, int B, int L) {
    FV_GRID_STRIDE(i, B) {
        T m = 0;
        for (int j = 0; j < B; ++j) {
            T acc = 0;
            for (int d = 0; d < L; ++d) acc += fv_lq(z, mu, lv, (int)i, j, d, L);
            acc += lw[i * B + j];
            S[i * B + j] = acc;
            m = (j == 0 || acc > m) ? acc : m;
        }
        T s = 0;
        for (int j = 0; j < B; ++j) s += exp(S[i * B + j] - m);
        top[i] = m; sum[i] = s; lse[i] = m + log(s);
        T total = 0;
        for (int d = 0; d < L; ++d) {
            T md = fv_lq(z, mu, lv, (int)i, 0, d, L) + lw[i * B];
            for (int j = 1; j < B; ++j) {
                T v = fv_lq(z, mu, lv, (int)i, j, d, L) + lw[i * B + j];
                md = v > md ? v : md;
            }
            T sd = 0;
            for (int j = 0; j < B; ++j) sd += exp(fv_lq(z, mu, lv, (int)i, j, d, L) + lw[i * B + j] - md);
            topd[i * L + d] = md; sumd[i * L + d] = sd;
            total += md + log(sd);
        }
        lsed[i] = total;
    }
}

template <typename T>
__device__ __forceinline__ T fv_tc_g(const T* S, const T* top, const T* sum, const T* topd, const T* sumd,
                                     const T* lw, T lq, T coef, T coef_dim, int i, int j, int d, int B, int L) {
    return coef * exp(S[i * B + j] - top[i]) / sum[i]
        + coef_dim * exp(lq + lw[i * B + j] - topd[i * L + d]) / sumd[i * L + d];
}

template <typename T>
__global__ void tc_grad_z(T* dz, const T* S, const T* top, const T* sum, const T* topd, const T* sumd,
                          const T* z, const T* mu, const T* lv, const T* lw, T coef, T coef_dim, int B, int L,
                          const T* scale) {
    coef *= scale[0];
    coef_dim *= scale[1];
    FV_GRID_STRIDE(q, (long long)B * L) {
        int i = (int)(q / L), d = (int)(q % L);
        T acc = 0;
        for (int j = 0; j < B; ++j) {
            T g = fv_tc_g(S, top, sum, topd, sumd, lw, fv_lq(z, mu, lv, i, j, d, L), coef, coef_dim, i, j, d, B, L);
            acc += g * (z[i * L + d] - mu[j * L + d]) * exp(-lv[j * L + d]);
        }
        dz[q] -= acc;
    }
}

template <typename T>
__global__ void tc_grad_params(T* dmu, T* dlv, const T* S, const T* top, const T* sum, const T* topd,
                               const T* sumd, const T* z, const T* mu, const T* lv, const T* lw, T coef,
                               T coef_dim, int B, int L, const T* scale) {
    coef *= scale[0];
    coef_dim *= scale[1];
    FV_GRID_STRIDE(q, (long long)B * L) {
        int j = (int)(q / L), d = (int)(q % L);
        T inv = exp(-lv[q]), am = 0, al = 0;
        for (int i = 0; i < B; ++i) {
            T t = z[i * L + d] - mu[q];
            T g = fv_tc_g(S, top, sum, topd, sumd, lw, fv_lq(z, mu, lv, i, j, d, L), coef, coef_dim, i, j, d, B, L);
            am += g * t * inv;
            al += (T)0.5 * g * (t * t * inv - (T)1);
        }
        dmu[q] += am;
        dlv[q] += al;
    }
}

#ifdef FASTVAE_INSTANTIATE
// explicit instantiations so that `nvcc -ptx` type-checks every template
#define FV_INST(T) \
    template __global__ void bias_act<T>(T*, const T*, T*, long long, int, int, T, T); \
    template __global__ void act_backward<T>(T*, const T*, const T*, long long, int, T, T); \
    template __global__ void reparam_kl<T>(T*, T*, T*, const T*, const T*, int, int, int); \
    template __global__ void reparam_kl_backward<T>(T*, const T*, const T*, const T*, const T*, int, int, T, const T*); \
    template __global__ void likelihood<T>(T*, T*, const T*, const T*, int, int, int, T, T, T, T, int, int); \
    template __global__ void adam_update<T>(T*, const T*, T*, T*, long long, T, T, T, T, T, T, T, T, const T*); \
    template __global__ void im2col<T>(T*, const T*, int, int, int, int, int, int, int, int, int); \
    template __global__ void col2im<T>(T*, const T*, int, int, int, int, int, int, int, int, int); \
    template __global__ void philox_normal<T>(T*, long long, unsigned long long, const unsigned long long*, unsigned int, unsigned int, unsigned int); \
    template __global__ void philox_uniform<T>(T*, long long, unsigned long long, const unsigned long long*, unsigned int, unsigned int, unsigned int); \
    template __global__ void philox_bernoulli<T>(T*, const T*, long long, unsigned long long, const unsigned long long*, unsigned int, unsigned int, unsigned int); \
    template __global__ void tc_rows<T>(T*, T*, T*, T*, T*, T*, T*, const T*, const T*, const T*, const T*, int, int); \
    template __global__ void tc_grad_z<T>(T*, const T*, const T*, const T*, const T*, const T*, const T*, const T*, const T*, const T*, T, T, int, int, const T*); \
    template __global__ void tc_grad_params<T>(T*, T*, const T*, const T*, const T*, const T*, const T*, const T*, const T*, const T*, const T*, T, T, int, int, const T*);
FV_INST(float)
FV_INST(double)
#endif
