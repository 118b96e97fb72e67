"""The CuPy backend's CUDA module and launch arguments: the kernel source,
its NVRTC options and template names, the compiled module per dtype, and the
launch grids and scalar arguments every wrapper passes (one object per value,
so a CUDA-graph replay's check of a launch passes at its identity test)."""

from __future__ import annotations

import functools
import os

import numpy as np

from fastvae.nn.opcodes import cuda_defines


def _source_path(source: str = "cuda_kernels.cu") -> str:
    """Where a CUDA source of the package is (``cuda_kernels.cu`` or ``cuda_gemm.cu``)."""
    from fastvae import kernels
    return os.path.join(os.path.dirname(kernels.__file__), source)


#: NVRTC options: C++14 and the op codes of the one table in fastvae.nn.opcodes
COMPILE_OPTIONS = ("-std=c++14", *cuda_defines())
_TEMPLATED = ("bias_act", "act_backward", "reparam_kl", "reparam_kl_backward", "likelihood", "adam_update",
              "im2col", "col2im", "gemm", "gemm_sum",
              "philox_normal", "philox_uniform", "philox_bernoulli", "tc_rows", "tc_grad_z", "tc_grad_params")
_GEMM_KERNELS = ("gemm", "gemm_sum")        # in cuda_gemm.cu, a module of its own; the rest in cuda_kernels.cu
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_THREADS = 256
_GEMM_TILE, _GEMM_DEPTH = 64, 16            # the gemm kernel's tile (rows and columns) and depth (FV_GEMM_*)
_GEMM_SPLIT_BLOCKS = 256                    # blocks a split-K GEMM aims at (an H100 has 132 SMs)
_MODULES = {}
# Kernel arguments as CuPy passes them (numpy scalars give the C type), one object per value: a CUDA-graph
# replay checks every launch against the captured one, and the same object passes at its first test (`is`)
_i32, _i64, _u32 = (functools.lru_cache(maxsize=4096)(t) for t in (np.int32, np.int64, np.uint32))


def ctype_of(dtype) -> str:
    """The kernels' C type for ``dtype``: ``"float"`` or ``"double"``.
    Raises ValueError for any other dtype (the kernels exist for these two)."""
    dt = np.dtype(dtype)
    if dt not in _CTYPES:
        raise ValueError(f"the CUDA kernels are built for float32 and float64, not {dt}; "
                         "use dtype 'float32' or 'float64'")
    return _CTYPES[dt]


def name_expressions(ctype: str, source=None) -> list:
    """Every kernel the backend launches, as NVRTC name expressions for
    ``ctype``; those of one CUDA source when ``source`` names it."""
    names = [f"{k}<{ctype}>" for k in _TEMPLATED] + ["philox_bits"]
    return [n for n in names if source is None or source_of(n) == source]


def source_of(name: str) -> str:
    """The CUDA source that holds kernel ``name`` (``"gemm"`` or ``"gemm<float>"``)."""
    return "cuda_gemm.cu" if name.split("<")[0] in _GEMM_KERNELS else "cuda_kernels.cu"


def _module(dtype, source: str = "cuda_kernels.cu"):
    """The RawModule of CUDA source ``source`` for ``dtype``, built once per
    process. NVRTC compiles it on the first kernel lookup; CuPy >= 14 caches
    the binary on disk keyed by source, options and name expressions, so later
    processes load it (CuPy 13 did not cache modules built with name
    expressions: 0.5-0.65 s per process). Building it needs no device; compiling does."""
    ctype = ctype_of(dtype)
    mod = _MODULES.get((ctype, source))
    if mod is None:
        import cupy
        with open(_source_path(source)) as f:
            code = f.read()
        mod = _MODULES[(ctype, source)] = cupy.RawModule(code=code, options=COMPILE_OPTIONS,
                                                         name_expressions=name_expressions(ctype, source))
    return mod


@functools.lru_cache(maxsize=4096)     # the same tuple for the same size (see _i32)
def _blocks(n):
    return (max(1, min((int(n) + _THREADS - 1) // _THREADS, 65535)),)


@functools.lru_cache(maxsize=4096)
def _gemm_grid(M, N, K):
    """``(grid, kslice)`` of the ``gemm`` kernel for an (M, N) output and K
    products each: 64 x 64 tiles (rows on x, up to 2^31 - 1 blocks), and on z
    the K slices of ``kslice`` products (a multiple of 16) that give a small
    output about :data:`_GEMM_SPLIT_BLOCKS` blocks, each slice 64 products or
    more, for K of 256 or more (a block's 16-deep steps run one after another,
    each waiting on its loads). From the shapes alone, so the rounding does
    not depend on the device."""
    tiles = -(-M // _GEMM_TILE) * -(-N // _GEMM_TILE)
    depth = -(-K // _GEMM_DEPTH)
    want = max(1, min(_GEMM_SPLIT_BLOCKS // tiles, depth // 4)) if depth >= 16 else 1
    kslice = max(1, -(-depth // want)) * _GEMM_DEPTH
    return (-(-M // _GEMM_TILE), -(-N // _GEMM_TILE), max(1, -(-K // kslice))), kslice
