"""CUDA kernels on the CPU, for the tests: the arithmetic and launch contracts
of ``kernels/cuda_kernels.cu`` without a GPU.

``emulator()`` compiles the kernel source for the host through
``tests/emu/shim.h`` (g++, C++20; one OS thread per CUDA thread, a real
barrier for ``__syncthreads``, blocks one at a time) and loads it with
ctypes. ``Emulator.kernel(name)`` returns a callable with CuPy's RawKernel
calling convention, ``kernel(grid, block, args, shared_mem=0)``, which checks
each launch against the kernel's C signature as CuPy would pass it: the
argument count, every scalar's C type (numpy scalars by dtype; Python ints
as ``long long``, floats as ``double``, as CuPy does), every array's element
type and C-contiguity, CUDA's grid/block/shared-memory limits, and, after the
run, that no byte outside the arrays passed was written (guard bytes around
each array). :class:`EmulatedCupyBackend` is the real ``CupyBackend`` (its
wrappers, its RNG, its launch arguments) over NumPy arrays and these kernels.

What this proves and what it does not: see ``tests/emu/shim.h`` and the
README ("Testing the CUDA code without a GPU").
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile

import numpy as np

from fastvae.backends.cupy import backend as cb
from fastvae.nn.opcodes import cuda_defines

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emu")
_CTYPES = {"float": ctypes.c_float, "double": ctypes.c_double, "int": ctypes.c_int,
           "long long": ctypes.c_longlong, "unsigned int": ctypes.c_uint, "unsigned long long": ctypes.c_ulonglong}
_SCALAR_C = {np.dtype(np.float32): "float", np.dtype(np.float64): "double", np.dtype(np.int32): "int",
             np.dtype(np.int64): "long long", np.dtype(np.uint32): "unsigned int",
             np.dtype(np.uint64): "unsigned long long"}
_POINTEE = {"float": np.float32, "double": np.float64, "unsigned int": np.uint32,
            "unsigned long long": np.uint64}
GUARD = 256               # guard bytes on each side of every array
_GUARD_BYTE = 0xA5
_LIB = {}


class LaunchError(AssertionError):
    """A launch that a GPU would reject or that would compute garbage."""


def compiler_reason() -> str:
    """'' when a C++20 compiler is here, else why the emulator cannot run."""
    return "" if shutil.which("g++") else "g++ not found (the CUDA emulator compiles the kernels with it)"


def _build() -> str:
    sources = [cb._source_path(), cb._source_path("cuda_gemm.cu")]
    text = "".join(f'#include "{p}"\n' for p in sources)                # both, in one unit
    src = os.path.join(tempfile.gettempdir(),                          # named by the paths it includes
                       f"fastvae-cuda-emu-sources-{hashlib.sha256(text.encode()).hexdigest()[:12]}.cu")
    if not os.path.exists(src):
        tmp = src + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, src)
    templates = "".join(f"X({k})" for k in cb._TEMPLATED)
    flags = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare",
             "-Wl,--no-undefined", f"-I{HERE}", f'-DFV_EMU_SOURCE="{src}"',
             f"-DFV_EMU_TEMPLATES={templates}", "-DFV_EMU_PLAIN=X(philox_bits)", *cuda_defines()]
    h = hashlib.sha256(" ".join(flags).encode())
    for p in (*sources, os.path.join(HERE, "shim.h"), os.path.join(HERE, "launch.cpp")):
        with open(p, "rb") as f:
            h.update(f.read())
    out = os.path.join(tempfile.gettempdir(), f"fastvae-cuda-emu-{h.hexdigest()[:16]}.so")
    if not os.path.exists(out):
        tmp = out + f".{os.getpid()}.tmp"
        p = subprocess.run(["g++", *flags, "-o", tmp, os.path.join(HERE, "launch.cpp")],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"the CUDA emulator does not compile:\n{p.stderr[-4000:]}")
        os.replace(tmp, out)
    return out


def emulator() -> "Emulator":
    """The compiled emulator (built once per source version, cached in the temp folder)."""
    if "lib" not in _LIB:
        _LIB["lib"] = Emulator(ctypes.CDLL(_build()))
    return _LIB["lib"]


class Emulator:
    def __init__(self, lib):
        self.lib = lib
        lib.fv_emu_name.restype = lib.fv_emu_signature.restype = ctypes.c_char_p
        lib.fv_emu_smem_limit.restype = ctypes.c_size_t
        lib.fv_emu_launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                      ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                                      ctypes.c_size_t]
        self.signatures = {}
        self._index = {}
        for i in range(lib.fv_emu_count()):
            name = lib.fv_emu_name(i).decode()
            self._index[name] = i
            self.signatures[name] = lib.fv_emu_signature(i).decode().split(",")

    def kernel(self, name: str) -> "EmuKernel":
        if name not in self._index:
            raise KeyError(f"no kernel {name!r} in the emulated module")
        return EmuKernel(self, name)


def _dims(v, what):
    t = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    if not 1 <= len(t) <= 3 or not all(isinstance(d, (int, np.integer)) for d in t):
        raise LaunchError(f"{what} must be an int or a tuple of 1-3 ints, got {v!r}")
    return (ctypes.c_uint * 3)(*(int(d) for d in t), *([1] * (3 - len(t))))


class EmuKernel:
    """One kernel, called like ``cupy.RawKernel``."""

    def __init__(self, emu, name):
        self.emu, self.name = emu, name
        self.signature = emu.signatures[name]
        self.launches = 0

    def _c_type(self, a, want, k):
        if isinstance(a, np.ndarray):
            if not want.endswith("*"):
                raise LaunchError(f"{self.name} argument {k}: an array where the kernel takes {want}")
            pointee = want[:-1]
            if a.dtype != _POINTEE[pointee]:
                raise LaunchError(f"{self.name} argument {k}: a {a.dtype} array for {want}")
            if not a.flags.c_contiguous:
                raise LaunchError(f"{self.name} argument {k}: a non-contiguous array for {want}")
            return None
        if isinstance(a, (bool, np.bool_)):
            got = "bool"
        elif isinstance(a, np.generic):
            got = _SCALAR_C.get(a.dtype, str(a.dtype))
        elif isinstance(a, int):
            got = "long long"         # CuPy passes a Python int as int64
        elif isinstance(a, float):
            got = "double"
        else:
            raise LaunchError(f"{self.name} argument {k}: cannot pass a {type(a).__name__}")
        if got != want:
            raise LaunchError(f"{self.name} argument {k}: passed as {got}, the kernel takes {want}")
        return _CTYPES[want](a.item() if isinstance(a, np.generic) else a)

    def __call__(self, grid, block, args, shared_mem=0, **_):
        args = tuple(args)
        if len(args) != len(self.signature):
            raise LaunchError(f"{self.name}: launched with {len(args)} arguments, the kernel takes "
                              f"{len(self.signature)} ({', '.join(self.signature)})")
        scalars = [self._c_type(a, want, k) for k, (a, want) in enumerate(zip(args, self.signature))]
        g, b = _dims(grid, "grid"), _dims(block, "block")
        arrays = [a for a in args if isinstance(a, np.ndarray) and a.nbytes]
        spans = _guarded_copies(arrays)
        ptrs = (ctypes.c_void_p * len(args))()
        for k, a in enumerate(args):
            if scalars[k] is not None:
                ptrs[k] = ctypes.cast(ctypes.pointer(scalars[k]), ctypes.c_void_p)
            else:
                cell = ctypes.c_void_p(_address_in(spans, a))
                scalars[k] = cell
                ptrs[k] = ctypes.cast(ctypes.pointer(cell), ctypes.c_void_p)
        err = ctypes.create_string_buffer(256)
        i = self.emu._index[self.name]
        if self.emu.lib.fv_emu_launch(i, g, b, int(shared_mem), ptrs, err, 256):
            raise LaunchError(f"{self.name}: {err.value.decode()}")
        self.launches += 1
        _write_back(spans, self.name)


def _guarded_copies(arrays):
    """One guarded buffer per group of overlapping arrays (aliases share it):
    ``[(start, end, buffer)]`` with the original bytes at ``buffer[GUARD:-GUARD]``."""
    ranges = sorted((a.__array_interface__["data"][0], a.__array_interface__["data"][0] + a.nbytes)
                    for a in arrays)
    merged = []
    for s, e in ranges:
        if merged and s < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    spans = []
    for s, e in merged:
        buf = np.full(e - s + 2 * GUARD, _GUARD_BYTE, np.uint8)
        ctypes.memmove(buf.ctypes.data + GUARD, s, e - s)
        spans.append((s, e, buf))
    return spans


def _address_in(spans, a):
    if not a.nbytes:
        return 0
    p = a.__array_interface__["data"][0]
    s, _, buf = next(sp for sp in spans if sp[0] <= p < sp[1])
    return buf.ctypes.data + GUARD + (p - s)


def _write_back(spans, name):
    for s, e, buf in spans:
        if np.any(buf[:GUARD] != _GUARD_BYTE) or np.any(buf[GUARD + e - s:] != _GUARD_BYTE):
            raise LaunchError(f"{name}: wrote outside the arrays it was given")
        ctypes.memmove(s, buf.ctypes.data + GUARD, e - s)


class EmulatedCupyBackend(cb.CupyBackend):
    """``CupyBackend`` with NumPy arrays and the emulated kernels: every
    wrapper, launch geometry, argument list and the Philox RNG are the GPU
    backend's own code; only ``xp`` and the kernel lookup differ."""

    device = "cpu"          # host memory (the memory preflight reads the host)

    def __init__(self, dtype="float32", tf32=False):
        self._setup(np, dtype, tf32)
        self._emu = emulator()
        self._has_cupy = importlib.util.find_spec("cupy") is not None

    def _kernel(self, full_name):
        return self._emu.kernel(full_name)

    def gemm(self, out, a, b, trans_a=False, trans_b=False):
        if not self._has_cupy and not self.own_gemm:       # the GEMM mode is CuPy's setting
            self._op(cb._matmul, np, out, a, b, trans_a, trans_b)
            return out
        return super().gemm(out, a, b, trans_a, trans_b)

    def synchronize(self):
        pass

    # ---- CUDA graphs: capture records the launches without running them ----------
    def _ptr(self, a):
        return a.ctypes.data

    def _capture_op(self, f, args, kw):
        if f is cb._matmul:           # as CuPy does: cuBLAS's setStream refuses a capturing stream
            raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")
        self._captured.append((f, args, kw))

    @contextlib.contextmanager
    def _capturing(self, rec):
        self._captured = []
        try:
            yield
        finally:
            rec.graph, self._captured = EmulatedGraph(self._captured), None

    def _launch_graph(self, graph):
        graph.launch()

    def _pinned(self, n):
        return np.zeros(n, np.uint64)

    def _upload(self, dst, host):
        dst[...] = host


class EmulatedGraph:
    """A captured step: its launches with their arguments as captured (the
    same arrays, the same frozen scalars), run in order by ``launch``."""

    def __init__(self, ops):
        self.ops = ops
        self.launches = 0

    def launch(self):
        for f, args, kw in self.ops:
            f(*args, **kw)
        self.launches += 1


def emu_param():
    """The ``cupy-emu`` pytest parameter (skipped, with the reason, without g++)."""
    import pytest
    reason = compiler_reason()
    return pytest.param("cupy-emu", marks=pytest.mark.skipif(bool(reason), reason=reason), id="cupy-emu")


def make_backend(name, dtype):
    """``backends.get(name, dtype)``, or the emulated cupy backend for ``"cupy-emu"``."""
    from fastvae import backends
    return EmulatedCupyBackend(dtype) if name == "cupy-emu" else backends.get(name, dtype)
