"""The cupy backend without a GPU: its construction, its probe, its launch
contracts and the fixes of issue 16, on the CUDA kernels compiled for the CPU
(tests/cuda_emu.py) and on CuPy's device-free parts (RawModule, NVRTC).

Parity of every primitive and of whole training steps against the NumPy
backend runs in test_backend_parity.py, test_conv.py and test_objectives.py
(the ``cupy-emu`` parameter)."""

import importlib.util
import re
import types

import numpy as np
import pytest

from fastvae.backends import philox
from fastvae.backends.cupy import backend as cb

from conftest import ROOT
from cuda_emu import EmulatedCupyBackend, LaunchError, compiler_reason, emulator

pytestmark = pytest.mark.skipif(bool(compiler_reason()), reason=compiler_reason())
needs_cupy = pytest.mark.skipif(importlib.util.find_spec("cupy") is None,
                                reason="CuPy is not installed (pip install -e '.[nvrtc]')")


# ---------------------------------------------------------------- 1: construction
@needs_cupy
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_raw_modules_build_without_a_device(dtype):
    """CuPy builds RawModules with no device; the backend's used to crash here
    setting an attribute on the (Cython, __dict__-less) RawModule."""
    import cupy
    cb._MODULES.clear()
    mod = cb._module(dtype)
    assert isinstance(mod, cupy.RawModule) and cb._module(dtype) is mod
    assert cb._module("float32") is not cb._module("float64")
    gemm = cb._module(dtype, "cuda_gemm.cu")
    assert isinstance(gemm, cupy.RawModule) and gemm is not mod and cb._module(dtype, "cuda_gemm.cu") is gemm


def test_only_float32_and_float64_have_kernels():
    assert cb.ctype_of("float32") == "float" and cb.ctype_of(np.float64) == "double"
    for bad in ("float16", "int32"):
        with pytest.raises(ValueError, match="float32 and float64"):
            cb.ctype_of(bad)
        with pytest.raises(ValueError, match="float32 and float64"):
            EmulatedCupyBackend(bad)


def test_the_emulator_holds_exactly_the_kernels_the_backend_names():
    names = set(cb.name_expressions("float")) | set(cb.name_expressions("double"))
    assert set(emulator().signatures) == names


# ---------------------------------------------------------------- 2, 3: probe
def _runtime(count=1, drv=12020, rt=12090, fail=None):
    def count_fn():
        if fail:
            raise fail
        return count
    return types.SimpleNamespace(getDeviceCount=count_fn, driverGetVersion=lambda: drv,
                                 runtimeGetVersion=lambda: rt)


def test_probe_accepts_an_older_driver_of_the_same_major_version():
    """CUDA minor-version compatibility: a 12.2 driver runs CuPy built for 12.9."""
    assert cb.device_reason(_runtime(drv=12020, rt=12090)) == ""
    assert cb.device_reason(_runtime(drv=13000, rt=12090)) == ""
    msg = cb.device_reason(_runtime(drv=11080, rt=12090))
    assert "CUDA 11.8" in msg and "12.x" in msg and "update the driver" in msg and "fastvae[" not in msg
    msg = cb.device_reason(_runtime(drv=12080, rt=13000))        # CuPy for CUDA 13 on a CUDA 12 driver
    assert "CUDA 12.8" in msg and "13.x" in msg and "fastvae[cuda12]" in msg
    assert cb.device_reason(_runtime(count=0)).startswith("no NVIDIA GPU found")
    driver = lambda: True                                                      # noqa: E731
    assert "no usable CUDA device" in cb.device_reason(_runtime(fail=RuntimeError("cudaErrorNoDevice")), driver)


def test_probe_tells_no_gpu_from_an_old_driver():
    """The CUDA runtime says "driver version is insufficient" both without a
    driver and with an old one: only the second suggests a driver update."""
    insufficient = RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime "
                                "version")
    msg = cb.device_reason(_runtime(fail=insufficient), lambda: False)
    assert msg.startswith("no NVIDIA GPU found") and "driver version" not in msg and "backend='numba'" in msg
    msg = cb.device_reason(_runtime(fail=insufficient), lambda: True)
    assert "older than this CuPy" in msg and "update the driver" in msg


def test_probe_names_a_missing_nvrtc_or_cublas():
    def fake(nvrtc_error=None, cublas_error=None):
        def version():
            if nvrtc_error:
                raise nvrtc_error
            return (12, 9)

        class Cuda:
            nvrtc = types.SimpleNamespace(getVersion=version)

            @property
            def cublas(self):
                if cublas_error:
                    raise cublas_error
                return object()
        return types.SimpleNamespace(cuda=Cuda())

    assert cb.toolkit_reason(fake()) == ""
    msg = cb.toolkit_reason(fake(nvrtc_error=RuntimeError("CuPy failed to load libnvrtc.so.12: OSError")))
    assert "NVRTC" in msg and "libnvrtc" in msg and "fastvae[cuda12]" in msg and "\n" not in msg
    msg = cb.toolkit_reason(fake(cublas_error=ImportError('Failure finding "libcublasLt.so.12"')))
    assert "cuBLAS" in msg and "libcublasLt" in msg and "fastvae[cuda12]" in msg


@needs_cupy
def test_probe_with_the_installed_cupy_is_one_line():
    import cupy
    for reason in (cb.probe(), cb.toolkit_reason(cupy)):
        assert "\n" not in reason and len(reason) < 400


def test_cuda_extras_bring_the_toolkit_and_a_caching_cupy():
    """[ctk] pulls NVRTC and cuBLAS wheels; CuPy >= 14 caches the module on disk
    (13 recompiled it in every process: name expressions bypassed its cache)."""
    setup = open(f"{ROOT}/setup.py").read()
    for major in ("12", "13"):
        assert re.search(rf'"cuda{major}": \["cupy-cuda{major}x\[ctk\]>=14"\]', setup), major


# ---------------------------------------------------------------- 4: TF32
@needs_cupy
def test_every_float32_gemm_sets_its_own_tf32_mode(monkeypatch):
    """CuPy keeps the GEMM compute type per process (and device): each GEMM of
    a backend sets it from that backend's flag, so TF32 switched on by an
    earlier trainer or benchmark no longer leaks into a later one. (Setting it
    needs a device; the calls are recorded here.)"""
    from cupy._core import _routines_linalg as lin
    calls = []
    monkeypatch.setattr(lin, "set_compute_type", lambda dtype, mode: calls.append((np.dtype(dtype), mode)))
    x = np.ones((4, 3), np.float32)
    out = np.empty((4, 4), np.float32)
    off, on = EmulatedCupyBackend("float32"), EmulatedCupyBackend("float32", tf32=True)
    cb.set_tf32(True)
    off.gemm(out, x, x, trans_b=True)
    on.gemm(out, x, x, trans_b=True)
    off.gemm(out, x, x, trans_b=True)
    f32 = np.dtype(np.float32)
    assert calls == [(f32, lin.COMPUTE_TYPE_TF32), (f32, lin.COMPUTE_TYPE_DEFAULT), (f32, lin.COMPUTE_TYPE_TF32),
                     (f32, lin.COMPUTE_TYPE_DEFAULT)]
    np.testing.assert_array_equal(out, np.full((4, 4), 3.0, np.float32))


# ---------------------------------------------------------------- 5, 7: Philox
def test_float32_uniforms_stay_below_one():
    """Key of seed [7], block 754998: its fourth word is 0xffffffdb, one of the
    top 128 words that (u + 1/2) / 2^32 rounded to float32 turned into 1.0."""
    key = philox.key_from_seed([7])
    w = philox.words(4, 754998, key)
    assert w[3] >= 2 ** 32 - 128
    for dtype in ("float32", "float64"):
        be = EmulatedCupyBackend(dtype)
        rng = be.new_rng([7])
        rng.counter = 754998
        u = be.empty(4)
        rng.uniform_(u)
        assert np.all(u < 1.0) and np.all(u >= 0.0), u
        ref = (w >> 8) * 2.0 ** -24 if dtype == "float32" else (w + 0.5) * 2.0 ** -32
        np.testing.assert_array_equal(u, ref.astype(dtype))


def test_permutation_sorts_64_bit_keys():
    be = EmulatedCupyBackend("float32")
    rng = be.new_rng([3])
    for n in (1, 5, 1000):
        c = rng.counter
        perm = rng.permutation(n)
        keys = philox.words(2 * n, c, rng.key).view(np.uint64)
        np.testing.assert_array_equal(perm, np.argsort(keys, kind="stable"))
        assert rng.counter == c + (2 * n + 3) // 4
    # 32-bit keys tie about n^2 / 2^33 times per shuffle (0.42 at n = 60,000): 64-bit ones don't
    keys = philox.words(2 * 60_000, 0, rng.key).view(np.uint64)
    assert np.unique(keys).size == 60_000


# ---------------------------------------------------------------- 8: wrappers
def test_identity_bias_act_writes_a_separate_out():
    be = EmulatedCupyBackend("float64")
    pre, bias = np.arange(12.0).reshape(3, 4), np.full(4, 0.5)
    out = np.full((3, 4), np.nan)
    be.bias_act(out, pre, bias, "identity")
    np.testing.assert_array_equal(out, np.arange(12.0).reshape(3, 4) + 0.5)
    np.testing.assert_array_equal(pre, out)
    be.bias_act(None, pre, bias, "identity")          # in place, no out
    np.testing.assert_array_equal(pre, np.arange(12.0).reshape(3, 4) + 1.0)


def test_wrappers_refuse_views_and_wrong_dtypes():
    be = EmulatedCupyBackend("float32")
    a = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="non-contiguous"):
        be.bias_act(None, a[:, :3], np.zeros(3, np.float32), "identity")
    with pytest.raises(TypeError, match="float64 array but the backend computes in float32"):
        be.act_backward(np.zeros((4, 6)), a, a, "relu")
    with pytest.raises(TypeError, match="expected a numpy array, got list"):
        be.adam_update([0.0], a, a, a, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, bc2_sqrt=1.0,
                       weight_decay=0.0, decay_factor=1.0)


def test_empty_batches_launch_nothing():
    """A (0,) grid is an invalid launch on a GPU (the emulator refuses it too)."""
    be = EmulatedCupyBackend("float32")
    e = np.zeros((0, 5), np.float32)
    be.likelihood(e, np.zeros(0, np.float32), e, e, "bernoulli", 1.0, 1.0)
    be.bias_act(e, e, np.zeros(5, np.float32), "relu")
    be.reparam_kl(np.zeros((0, 2), np.float32), None, np.zeros((0, 2), np.float32), np.zeros((0, 4), np.float32),
                  np.zeros((0, 2), np.float32))
    with pytest.raises(LaunchError, match="dimension is 0"):
        emulator().kernel("likelihood<float>")((0,), (32,), (e, e, e, e, *(np.int32(0),) * 3,
                                                             *(np.float32(0),) * 4, np.int32(1), np.int32(1)))


# ---------------------------------------------------------------- the emulator's own checks
def _im2col_args(cols, x, dtype=np.int32):
    B, H, W, C = x.shape
    return (cols, x, *(dtype(v) for v in (B, H, W, C, 3, 1, 1, H, W)))


def test_emulator_checks_launch_contracts():
    k = emulator().kernel("im2col<float>")
    x = np.ones((2, 4, 4, 1), np.float32)
    cols = np.empty((2 * 16, 9), np.float32)
    k((1,), (64,), _im2col_args(cols, x))
    assert cols.sum() == 2 * (2 + 3 + 3 + 2) ** 2         # in-image taps of a 3x3 kernel, padding 1, on 4x4
    with pytest.raises(LaunchError, match="launched with 10 arguments, the kernel takes 11"):
        k((1,), (64,), _im2col_args(cols, x)[:-1])
    with pytest.raises(LaunchError, match="argument 2: passed as long long, the kernel takes int"):
        k((1,), (64,), _im2col_args(cols, x, np.int64))
    with pytest.raises(LaunchError, match="argument 2: passed as long long"):
        k((1,), (64,), (cols, x, 2, *(np.int32(v) for v in (4, 4, 1, 3, 1, 1, 4, 4))))   # a bare Python int
    with pytest.raises(LaunchError, match="a float64 array for float"):
        k((1,), (64,), _im2col_args(cols.astype(np.float64), x))
    with pytest.raises(LaunchError, match="non-contiguous"):
        k((1,), (64,), _im2col_args(np.empty((32, 18), np.float32)[:, ::2], x))
    with pytest.raises(LaunchError, match="1024 threads"):
        k((1,), (2048,), _im2col_args(cols, x))
    with pytest.raises(LaunchError, match="48 KiB"):
        k((1,), (64,), _im2col_args(cols, x), shared_mem=49 * 1024 + 1)


def test_emulator_catches_writes_outside_the_arrays():
    k = emulator().kernel("im2col<float>")
    x = np.ones((2, 4, 4, 1), np.float32)
    small = np.empty((2 * 16 - 1, 9), np.float32)                  # one row short
    with pytest.raises(LaunchError, match="wrote outside"):
        k((1,), (64,), _im2col_args(small, x))


def test_syncthreads_is_a_real_barrier():
    """The block reduction of the likelihood kernel only sums right if every
    thread's partial is in shared memory before the tree reads it: one block of
    1024 threads, 5000 pixels, against NumPy."""
    r = np.random.default_rng(0)
    logits, x = r.normal(size=(1, 5000)), r.random((1, 5000))
    nll = np.full(1, np.nan)
    k = emulator().kernel("likelihood<double>")
    k((1,), (1024,), (logits, nll, logits, x, np.int32(1), np.int32(5000), np.int32(0), *(np.float64(1),) * 4,
                      np.int32(0), np.int32(1)), shared_mem=1024 * 8)
    ref = (np.maximum(logits, 0) + np.log1p(np.exp(-np.abs(logits))) - x * logits).sum()
    np.testing.assert_allclose(nll[0], ref, rtol=1e-12)
