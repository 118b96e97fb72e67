// fastvae's own GEMM for the cupy backend (loaded with cupy.RawModule, a module of its own beside
// cuda_kernels.cu's): CUDA graphs need it, as CuPy refuses cuBLAS calls on a capturing stream
// (cupy_backends/cuda/libs/cublas.pyx, setStream). Templates over T = float or double, as in
// cuda_kernels.cu; the backend's wrapper is CupyBackend.gemm (fastvae/backends/cupy/backend.py).
//
// Compile check without a GPU:  nvcc -ptx -DFASTVAE_INSTANTIATE kernels/cuda_gemm.cu

#ifndef FV_GRID_STRIDE
#define FV_GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)
#endif

// out = op(a) op(b), row-major (numpy's matmul): op(a) (M, K) is a (M, K), or a (K, M) read transposed
// when ta; op(b) (K, N) likewise; lda, ldb, ldc: row strides in elements.
// A block computes a 64 x 64 tile of out (blockIdx.x: rows, blockIdx.y: columns) with 256 threads, each a
// 4 x 4 sub-tile, staging 16-deep slices of op(a) and op(b) in dynamic shared memory (2 * 16 * 64 values),
// over the products k in [z kslice, (z + 1) kslice) of its blockIdx.z = z, summed in order; with several
// slices (split K: more blocks for a small out and a long K), block z writes out + z M ldc, a (slices, M, N)
// buffer that gemm_sum adds up slice by slice. The slices follow from the shapes alone, so the rounding
// does not depend on the device or the launch.
#define FV_GEMM_TILE 64
#define FV_GEMM_DEPTH 16
template <typename T>
__global__ void gemm(T* out, const T* a, const T* b, int M, int N, int K, int lda, int ldb, int ldc, int ta, int tb,
                     int kslice) {
    extern __shared__ unsigned char fv_smem[];
    T* as = reinterpret_cast<T*>(fv_smem);           // as[k][m], k < 16, m < 64
    T* bs = as + FV_GEMM_DEPTH * FV_GEMM_TILE;        // bs[k][n]
    const int t = threadIdx.x, tr = t / 16, tc = t % 16;
    const long long m0 = (long long)blockIdx.x * FV_GEMM_TILE, n0 = (long long)blockIdx.y * FV_GEMM_TILE;
    const int kbeg = blockIdx.z * kslice, kend = K - kbeg < kslice ? K : kbeg + kslice;
    out += (long long)blockIdx.z * M * ldc;
    T acc[4][4];                                      // in registers: every loop over it is unrolled
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
    for (int k0 = kbeg; k0 < kend; k0 += FV_GEMM_DEPTH) {
        for (int e = t; e < FV_GEMM_DEPTH * FV_GEMM_TILE; e += 256) {
            // the index that is contiguous in memory varies fastest across the threads (coalesced reads)
            int kk = ta ? e / FV_GEMM_TILE : e % FV_GEMM_DEPTH, mm = ta ? e % FV_GEMM_TILE : e / FV_GEMM_DEPTH;
            long long m = m0 + mm;
            int k = k0 + kk;
            as[kk * FV_GEMM_TILE + mm] = (m < M && k < kend) ? (ta ? a[(long long)k * lda + m] : a[m * lda + k]) : T(0);
            int kb = tb ? e % FV_GEMM_DEPTH : e / FV_GEMM_TILE, nn = tb ? e / FV_GEMM_DEPTH : e % FV_GEMM_TILE;
            long long n = n0 + nn;
            k = k0 + kb;
            bs[kb * FV_GEMM_TILE + nn] = (n < N && k < kend) ? (tb ? b[n * ldb + k] : b[(long long)k * ldb + n]) : T(0);
        }
        __syncthreads();
        const int depth = kend - k0 < FV_GEMM_DEPTH ? kend - k0 : FV_GEMM_DEPTH;
        for (int kk = 0; kk < depth; ++kk) {
            T x[4], y[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) x[i] = as[kk * FV_GEMM_TILE + tr + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) y[j] = bs[kk * FV_GEMM_TILE + tc + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += x[i] * y[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        long long m = m0 + tr + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            long long n = n0 + tc + 16 * j;
            if (n < N) out[m * ldc + n] = acc[i][j];
        }
    }
}

// out[i] = part[0][i] + part[1][i] + ... + part[slices - 1][i], in that order: gemm's split-K slices.
template <typename T>
__global__ void gemm_sum(T* out, const T* part, long long n, int slices) {
    FV_GRID_STRIDE(i, n) {
        T v = part[i];
        for (int z = 1; z < slices; ++z) v += part[(long long)z * n + i];
        out[i] = v;
    }
}

#ifdef FASTVAE_INSTANTIATE
// explicit instantiations so that `nvcc -ptx` type-checks every template
#define FV_GEMM_INST(T) \
    template __global__ void gemm<T>(T*, const T*, const T*, int, int, int, int, int, int, int, int, int); \
    template __global__ void gemm_sum<T>(T*, const T*, long long, int);
FV_GEMM_INST(float)
FV_GEMM_INST(double)
#endif
