"""CUDA sources and the GPU backend.

Without a GPU: every kernel compiles to PTX with nvcc (when nvcc exists), and
the CUDA Philox generator, compiled for the host, reproduces the Random123
known-answer vectors and the NumPy reference stream. With CuPy and a device
(marker ``gpu``): the device RNG, cross-device checkpoints and MNIST quality.
"""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import fastvae
from fastvae import DataConfig, ModelConfig, TrainConfig, Trainer, backends, datasets
from fastvae.nn import opcodes as ops
from fastvae.backends import philox
from fastvae.nn.opcodes import cuda_defines

from conftest import MNIST_DIR, needs_mnist
from cuda_emu import emu_param, make_backend

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
_cupy = {b["name"]: b for b in backends.available()}["cupy"]
needs_gpu = pytest.mark.skipif(not _cupy["available"], reason=f"cupy: {_cupy['reason']}")

# Random123 kat_vectors for philox4x32_10: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def kernel_source(name="cuda_kernels.cu"):
    import importlib
    k = importlib.import_module("fastvae.kernels")
    return os.path.join(os.path.dirname(k.__file__), name)


def test_host_philox_matches_known_answers():
    for ctr, key, out in KAT:
        assert tuple(int(v) for v in philox.philox4x32_10([ctr], key)[0]) == out


def test_host_normals_are_standard_normal():
    z = philox.normals(200_000, counter=7, key=philox.key_from_seed([3, 1]))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01      # 5 sigma ~ 0.011 / 0.008
    a = philox.normals(10, 0, (1, 2))
    b = philox.normals(12, 0, (1, 2))
    np.testing.assert_array_equal(a, b[:10])                       # prefix-stable


def test_op_codes_come_from_the_one_table():
    """No hand-kept copy of the codes: the CUDA source only reads the defines
    that fastvae.nn.opcodes generates, and the Numba kernels' constants are the table's."""
    numba_cpu = pytest.importorskip("fastvae.kernels.numba_cpu", reason="numba is not installed")
    with open(kernel_source()) as f:
        src = f.read()
    assert re.search(r"#define\s+FV_(RELU|IDENTITY|BERNOULLI)", src) is None
    for name in list(ops.ACTIVATION_CODES) + list(ops.LIKELIHOOD_CODES):
        assert f"-DFV_{name.upper()}=" in " ".join(ops.cuda_defines())
    for name, code in ops.ACTIVATION_CODES.items():
        assert getattr(numba_cpu, name.upper()) == code


@needs_nvcc
def test_every_kernel_compiles_to_ptx(tmp_path):
    ptx = ""
    for src in ("cuda_kernels.cu", "cuda_gemm.cu"):
        out = tmp_path / (src + ".ptx")
        subprocess.run(["nvcc", "-ptx", "-DFASTVAE_INSTANTIATE", *cuda_defines(), "-o", str(out), kernel_source(src)],
                       check=True)
        ptx += out.read_text()
    for name in ("bias_act", "act_backward", "reparam_kl", "reparam_kl_backward", "likelihood", "adam_update",
                 "im2col", "col2im", "gemm", "gemm_sum",
                 "philox_normal", "philox_uniform", "philox_bernoulli", "philox_bits",
                 "tc_rows", "tc_grad_z", "tc_grad_params"):
        assert name in ptx, name
    assert ptx.count(".entry") == 33          # 16 templates x {float, double} + philox_bits


@needs_nvcc
def test_cuda_philox_on_the_host_matches_reference(tmp_path):
    harness = tmp_path / "h.cu"
    harness.write_text(f'#include "{kernel_source()}"\n#include <cstdio>\n' + r'''
int main() {
    unsigned long long blocks[3] = {0ull, 5ull, 0x100000003ull};
    for (int i = 0; i < 3; ++i) {
        fv_u4 r = fv_philox(blocks[i], 2u, 0x12345678u, 0x9abcdef0u);
        printf("%08x %08x %08x %08x\n", r.x, r.y, r.z, r.w);
    }
    return 0;
}
''')
    exe = tmp_path / "h"
    subprocess.run(["nvcc", *cuda_defines(), "-o", str(exe), str(harness)], check=True)
    got = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    for i, b in enumerate((0, 5, 0x100000003)):
        ref = philox.philox4x32_10([[b & 0xFFFFFFFF, b >> 32, 2, 0]], (0x12345678, 0x9ABCDEF0))[0]
        assert got[4 * i:4 * i + 4] == [f"{int(v):08x}" for v in ref]


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception as exc:  # CuPy or libnvrtc missing
        pytest.skip(f"NVRTC not available ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")


@pytest.mark.parametrize("ctype", ["float", "double"])
def test_kernels_compile_with_nvrtc_as_the_backend_names_them(ctype):
    """The exact RawModule compile the cupy backend does, minus the device:
    NVRTC with the backend's template name expressions (needs no GPU)."""
    nvrtc = _nvrtc()
    from fastvae.backends.cupy import backend as cb
    assert sorted(cb.name_expressions(ctype, "cuda_kernels.cu") + cb.name_expressions(ctype, "cuda_gemm.cu")) == \
        sorted(cb.name_expressions(ctype))                      # each kernel in one module
    for source in ("cuda_kernels.cu", "cuda_gemm.cu"):
        with open(kernel_source(source)) as f:
            src = f.read()
        names = cb.name_expressions(ctype, source)
        prog = nvrtc.createProgram(src, source, [], [])
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, [*cb.COMPILE_OPTIONS, "-arch=compute_80"])
        except Exception:
            pytest.fail(nvrtc.getProgramLog(prog))
        lowered = [nvrtc.getLoweredName(prog, n) for n in names]
        assert len(set(lowered)) == len(names)
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        assert all(name in ptx for name in lowered)


# ---------------------------------------------------------------- on a GPU (or the emulator)
GPU = pytest.param("cupy", marks=[pytest.mark.gpu, needs_gpu], id="cupy")


@pytest.mark.parametrize("name", [GPU, emu_param()])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_device_rng_matches_host_reference_and_resumes(name, dtype):
    be = make_backend(name, dtype)
    rng = be.new_rng([5, 1])
    a = be.zeros((37, 3))
    rng.normal_(a)
    ref = philox.normals(37 * 3, 0, philox.key_from_seed([5, 1])).reshape(37, 3)
    np.testing.assert_allclose(be.to_host(a), ref.astype(dtype), rtol=1e-6 if dtype == "float32" else 1e-13,
                               atol=1e-6 if dtype == "float32" else 1e-13)
    st = rng.state()
    assert st["counter"] == (37 * 3 + 3) // 4
    b1 = be.zeros((5, 4))
    rng.normal_(b1)
    rng2 = be.new_rng([0])
    rng2.set_state(st)
    b2 = be.zeros((5, 4))
    rng2.normal_(b2)
    np.testing.assert_array_equal(be.to_host(b1), be.to_host(b2))
    perm = be.to_host(rng.permutation(1000))
    assert sorted(perm.tolist()) == list(range(1000))
    p = be.asarray(np.full((200, 500), 0.3))
    out = be.zeros((200, 500))
    be.bernoulli_(out, p, rng)
    h = be.to_host(out)
    assert set(np.unique(h)) == {0.0, 1.0} and abs(h.mean() - 0.3) < 0.01


@pytest.mark.parametrize("name", [GPU, emu_param()])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_own_gemm_kernel_matches_the_product_for_every_layout(name, dtype):
    """fastvae's ``gemm`` kernel (the GEMM of CUDA-graph steps): out = op(a)
    op(b) for both transposes, sizes off the 64 x 64 x 16 tiles, K = 0, a row
    stride wider than the row (a column slice), one row or column, K split
    into 4 and 13 slices summed by ``gemm_sum``. Each
    element within K eps sum_k |a_ik b_kj| of the float64 product (the bound
    of a K-term sum in the dtype's rounding), the output poisoned first."""
    be = make_backend(name, dtype)
    be.own_gemm = True
    rng = np.random.default_rng(3)
    eps = np.finfo(dtype).eps
    from fastvae.backends.cupy.kernels import _gemm_grid
    shapes = [(1, 1, 1), (70, 50, 37), (130, 65, 17), (5, 3, 0), (64, 64, 16), (3, 200, 129), (1, 97, 2),
              (5, 3, 1000), (3, 200, 300)]
    assert [_gemm_grid(*mnk)[0][2] for mnk in shapes] == [1, 1, 1, 1, 1, 1, 1, 13, 4]
    for M, N, K in shapes:
        for ta in (False, True):
            for tb in (False, True):
                A = rng.standard_normal((K, M) if ta else (M, K)).astype(dtype)
                B = rng.standard_normal((N, K) if tb else (K, N)).astype(dtype)
                wide = np.zeros((B.shape[0], B.shape[1] + 5), dtype)      # B as a column slice: row stride + 5
                wide[:, 2:2 + B.shape[1]] = B
                b_dev = be.asarray(wide)[:, 2:2 + B.shape[1]]
                out = be.asarray(np.full((M, N), np.nan, dtype))
                be.gemm(out, be.asarray(A), b_dev, trans_a=ta, trans_b=tb)
                a64, b64 = (A.T if ta else A).astype(np.float64), (B.T if tb else B).astype(np.float64)
                bound = K * eps * (np.abs(a64) @ np.abs(b64))
                err = np.abs(be.to_host(out).astype(np.float64) - a64 @ b64)
                assert np.all(err <= bound), (M, N, K, ta, tb, float(np.max(err - bound)))
    # the same arrays again (their launch arguments kept), new contents, a strided operand copied anew
    a, out = be.asarray(rng.standard_normal((6, 4)).astype(dtype)), be.zeros((6, 3))
    wide = be.asarray(rng.standard_normal((4, 5)).astype(dtype))
    for _ in range(2):
        be.copy_(a, rng.standard_normal((6, 4)))
        be.copy_(wide, rng.standard_normal((4, 5)))
        be.gemm(out, a, wide[:, 1:4])
        ref = be.to_host(a).astype(np.float64) @ be.to_host(wide)[:, 1:4].astype(np.float64)
        np.testing.assert_allclose(be.to_host(out), ref, rtol=0, atol=8 * eps * np.abs(ref).max())


@pytest.fixture
def gpu_backend(request, monkeypatch):
    """``"cupy"`` in the registry: the real backend on a GPU, or for
    ``cupy-emu`` the emulated one, so Trainer, checkpoints and pictures run
    the GPU backend's code paths end to end."""
    if request.param == "cupy-emu":
        from cuda_emu import EmulatedCupyBackend
        monkeypatch.setitem(backends._REGISTRY, "cupy", (lambda: EmulatedCupyBackend, lambda: ""))
    return request.param


@pytest.mark.parametrize("gpu_backend", [GPU, emu_param()], indirect=True)
def test_gpu_and_cpu_checkpoints_resume_both_ways(tmp_path, gpu_backend):
    data = datasets.make_sprites(400, seed=2, size=16)
    mc = ModelConfig(input_dim=256, hidden=[32], latent_dim=4, image_shape=(16, 16))
    g = Trainer(mc, TrainConfig(epochs=2, batch_size=32), DataConfig(), dataset=data,
                out=str(tmp_path / "gpu"), progress=False, settings=fastvae.RunSettings(backend="cupy"))
    g.fit(pictures=False)
    assert fastvae.load(tmp_path / "gpu" / "checkpoint.h5", backend="numpy").backend.name == "numpy"
    c = Trainer.from_checkpoint(tmp_path / "gpu" / "checkpoint.h5", epochs=3, backend="numpy", dataset=data,
                                progress=False)
    np.testing.assert_array_equal(c.model.get_flat_params(), g.model.get_flat_params())
    c.fit(pictures=False)
    g2 = Trainer.from_checkpoint(tmp_path / "gpu" / "checkpoint.h5", epochs=4, backend="cupy", dataset=data,
                                 progress=False)
    assert g2.epoch == 3
    g2.fit(pictures=False)
    h = [r["train_neg_elbo"] for r in g2.history]
    assert h[3] < h[0]


@pytest.mark.gpu
@needs_gpu
@needs_mnist
def test_mnist_quality_on_the_gpu():
    """The core quality bar on the GPU: within 1 nat of the NumPy backend's
    10-epoch test -ELBO (itself within 1 nat of PyTorch), same initial weights."""
    ds = datasets.load(DataConfig(dataset="mnist", data_dir=MNIST_DIR, download=False))
    mc = ModelConfig(input_dim=784, hidden=[400], latent_dim=20)
    res = {}
    for b in ("cupy", "numpy"):
        t = Trainer(mc, TrainConfig(epochs=10, batch_size=128), DataConfig(), dataset=ds, progress=False,
                    settings=fastvae.RunSettings(backend=b))
        res[b] = t.fit(pictures=False)[-1]["test_neg_elbo"]
    print(f"\n10-epoch test -ELBO: cupy {res['cupy']:.2f}, numpy {res['numpy']:.2f}")
    assert abs(res["cupy"] - res["numpy"]) < 1.0
