// Host shim for the CUDA emulator of the test suite (tests/cuda_emu.py): lets a
// CUDA kernel source compile as C++20 for the CPU. Each CUDA thread of a launch is
// a real OS thread, __syncthreads() a real barrier among the threads of its block,
// and blocks run one after another, so block-shared memory is one host buffer.
//
// What this proves: the kernels' arithmetic and their launch contracts (argument
// count and C types, grid and block limits, dynamic shared memory size, writes
// inside the arrays passed). What it does not: timing, the GPU's memory model,
// warp scheduling, or device math functions' exact rounding (glibc's here).
#pragma once
#include <cmath>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace fv_emu {
struct ThreadCtx {
    dim3 thread, block, block_dim, grid_dim;
};
extern thread_local ThreadCtx ctx;
void syncthreads();
}  // namespace fv_emu

#define threadIdx (fv_emu::ctx.thread)
#define blockIdx (fv_emu::ctx.block)
#define blockDim (fv_emu::ctx.block_dim)
#define gridDim (fv_emu::ctx.grid_dim)
#define __syncthreads() fv_emu::syncthreads()
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Dynamic shared memory: `extern __shared__ unsigned char fv_smem[];` in a kernel
// names the launcher's per-block buffer (blocks run one at a time).
#define __shared__

using std::cos;
using std::exp;
using std::expm1;
using std::fabs;
using std::fmax;
using std::log;
using std::log1p;
using std::sin;
using std::sqrt;
using std::tanh;
