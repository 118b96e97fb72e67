"""GEMM libraries (fastvae.backends.cpu.gemm_library): the CBLAS binding against a real CBLAS
library (NumPy's own OpenBLAS, through its exported CBLAS symbols; Intel MKL
where the ``mkl`` extra is installed), the fallbacks to np.matmul, the
measured choice and its cache, and the wiring into the config, the Trainer,
resume and the benchmark."""

import ctypes
import glob
import json
import os

import numpy as np
import pytest

import fastvae
from fastvae.backends.cpu import gemm_library as blas
from fastvae.backends import get as get_backend
from fastvae.config import ModelConfig, TrainConfig
from fastvae.errors import ConfigError

EPS = {np.float32: np.finfo(np.float32).eps, np.float64: np.finfo(np.float64).eps}


def _numpy_openblas():
    """NumPy's bundled OpenBLAS (ILP64, symbols prefixed ``scipy_``) as a CblasGemm."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas64_*"))
    if not libs:
        pytest.skip("this NumPy has no bundled scipy-openblas64 library to bind to")
    return blas.CblasGemm("openblas-cblas", libs[0], "scipy_cblas_{}gemm64_", ctypes.c_int64)


def _mkl():
    try:
        return blas.load("mkl")
    except ConfigError as exc:
        pytest.skip(f"Intel MKL not installed ({exc})")


@pytest.fixture(params=["openblas-cblas", "mkl"])
def cblas(request):
    return _numpy_openblas() if request.param == "openblas-cblas" else _mkl()


def _bound(a, b, ta, tb):
    """Elementwise error bound of a summed product: K * eps * (|A| @ |B|) (Higham, Accuracy and
    Stability of Numerical Algorithms, 2002, eq. 3.5), computed in float64."""
    A = np.abs((a.T if ta else a).astype(np.float64))
    B = np.abs((b.T if tb else b).astype(np.float64))
    return A.shape[1] * EPS[a.dtype.type] * (A @ B)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_cblas_gemm_matches_the_exact_product_in_every_transpose(cblas, dtype, ta, tb):
    r = np.random.default_rng(0)
    m, n, k = 37, 53, 29
    a = r.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = r.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    out = np.full((m, n), np.nan, dtype)
    assert cblas.gemm(out, a, b, ta, tb) is out
    exact = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    assert np.all(np.abs(out - exact) <= _bound(a, b, ta, tb))


def test_cblas_gemm_reads_and_writes_row_slices_in_place(cblas):
    """Views with a leading dimension larger than the row (a column block of a
    wider array), as layers hand to the backends."""
    r = np.random.default_rng(1)
    A = r.standard_normal((20, 30)).astype(np.float32)
    B = r.standard_normal((40, 50)).astype(np.float32)
    big = np.zeros((20, 64), np.float32)
    a, b, out = A[:, 3:13], B[5:15, 7:47], big[:, 10:50]
    cblas.gemm(out, a, b)
    assert np.all(np.abs(out - a.astype(np.float64) @ b) <= _bound(a, b, False, False))
    assert not big[:, :10].any() and not big[:, 50:].any()          # nothing written outside the view


def test_cblas_gemm_falls_back_to_numpy_where_blas_cannot_go(cblas):
    r = np.random.default_rng(2)
    a = r.standard_normal((8, 6)).astype(np.float32)
    b = r.standard_normal((6, 5)).astype(np.float32)
    ref = a @ b
    cases = {
        "strided columns": (np.empty((8, 5), np.float32), a, np.repeat(b, 2, axis=1)[:, ::2]),
        "mixed dtypes": (np.empty((8, 5), np.float32), a, b.astype(np.float64)),
    }
    for why, (out, x, y) in cases.items():
        cblas.gemm(out, x, y)
        np.testing.assert_array_equal(out, np.matmul(x, y, out=np.empty_like(out)), err_msg=why)   # NumPy's own
        np.testing.assert_allclose(out, ref, rtol=1e-5, err_msg=why)
    sq = r.standard_normal((6, 6)).astype(np.float32)
    want = sq @ sq
    cblas.gemm(sq, sq.copy(), sq)                      # out is an input: NumPy copies, BLAS would not
    np.testing.assert_allclose(sq, want, rtol=1e-6)
    empty = np.empty((8, 5), np.float32)
    cblas.gemm(empty, np.empty((8, 0), np.float32), np.empty((0, 5), np.float32))
    assert not empty.any()
    with pytest.raises(ValueError):                    # NumPy's own error for a shape mismatch
        cblas.gemm(np.empty((8, 5), np.float32), a, b.T)


def test_a_step_through_cblas_gives_the_numpy_step_within_rounding():
    """The numba backend's exact GEMM calls of one MLP and one conv training step."""
    from fastvae.bench.harness import WORKLOADS, training_step
    from fastvae.bench.timing import GemmRecorder
    lib = _numpy_openblas()
    for w in ("784-400-20/b128", "conv28-20/b128"):
        be, model, step = training_step("numpy", WORKLOADS[w])
        with GemmRecorder(be) as rec:
            step()
        assert len(rec.calls) >= 10
        for out, a, b, ta, tb in rec.calls:
            want = np.matmul(a.T if ta else a, b.T if tb else b)
            got = np.full_like(want, np.nan)
            lib.gemm(got, a, b, ta, tb)
            assert np.all(np.abs(got - want) <= 2 * _bound(a, b, ta, tb)), (w, out.shape)


def test_load_names_the_fix_when_mkl_is_missing_or_broken(monkeypatch, tmp_path):
    monkeypatch.delitem(blas._loaded, "mkl", raising=False)
    monkeypatch.setattr(blas, "_mkl_path", lambda: None)
    with pytest.raises(ConfigError, match=r'pip install "fastvae\[mkl\]"'):
        blas.load("mkl")
    assert blas.available() == ["numpy"]
    fake = tmp_path / "libmkl_rt.so"
    fake.write_bytes(b"not a library")
    monkeypatch.setattr(blas, "_mkl_path", lambda: str(fake))
    with pytest.raises(ConfigError, match="does not load as a CBLAS library"):
        blas.load("mkl")
    with pytest.raises(ConfigError, match="unknown BLAS library 'openblas'"):
        blas.load("openblas")


def test_the_mkl_path_comes_from_the_environment_first(monkeypatch):
    monkeypatch.setenv("FASTVAE_MKL_LIB", "/opt/intel/libmkl_rt.so.2")
    assert blas._mkl_path() == "/opt/intel/libmkl_rt.so.2"


class _Slow(blas.NumpyGemm):
    """A second library for the choice: NumPy's GEMM, 2 ms slower per call."""
    name = "slow"

    def gemm(self, *args):
        import time
        time.sleep(0.002)
        return super().gemm(*args)

    def version(self):
        return "slow 1.0"


@pytest.fixture
def two_libraries(monkeypatch):
    slow = _Slow()
    monkeypatch.setitem(blas._loaded, "slow", slow)
    monkeypatch.setattr(blas, "LIBRARIES", ("numpy", "slow"))
    monkeypatch.setattr(blas, "SETTLE_S", 0.0)        # no MKL threads to wait for
    return slow


def _mlp_trainer_parts():
    model = fastvae.VAE(ModelConfig(input_dim=64, hidden=[32], latent_dim=4), "numpy", seed=0)
    x = model.backend.asarray(np.random.default_rng(0).random((16, 64)))
    eps = model.backend.zeros((16, 4))
    return model, (lambda: model.loss_and_grad(x, eps))


def test_auto_measures_once_then_reads_the_cache(two_libraries, tmp_path):
    model, work = _mlp_trainer_parts()
    be = model.backend
    cache = str(tmp_path / "c" / "blas.json")
    calls = []
    res = blas.choose(be, lambda: (calls.append(be.blas.name), work()), "sig", cache)
    assert res["blas"] == "numpy" and not res["cached"] and be.blas.name == "numpy"
    assert res["ms"]["slow"] > res["ms"]["numpy"] + 1.0       # 2 ms per GEMM call, 4 GEMMs
    assert sorted(set(calls)) == ["numpy", "slow"] and len(calls) == 20    # 5 rounds, untimed + timed
    calls.clear()
    again = blas.choose(be, lambda: calls.append(1), "sig", cache)
    assert again == {"blas": "numpy", "ms": None, "cached": True} and calls == []
    other = blas.choose(be, lambda: (calls.append(1), work()), "another model", cache)
    assert not other["cached"] and calls                       # another signature is measured
    assert len(json.load(open(cache))) == 2


@pytest.mark.parametrize("content", [b"\x00\xff garbage", b"[1, 2]", b'{"k": {"choice": "rm -rf"}}', b""])
def test_a_bad_cache_file_is_measured_over_and_replaced(two_libraries, tmp_path, content):
    model, work = _mlp_trainer_parts()
    cache = tmp_path / "blas.json"
    cache.write_bytes(content)
    res = blas.choose(model.backend, work, "sig", str(cache))
    assert not res["cached"] and res["blas"] == "numpy"
    data = json.loads(cache.read_text())
    assert [v["choice"] for v in data.values()] == ["numpy"]


def test_a_fifo_in_place_of_the_cache_never_blocks(two_libraries, tmp_path):
    model, work = _mlp_trainer_parts()
    cache = tmp_path / "blas.json"
    os.mkfifo(cache)
    res = blas.choose(model.backend, work, "sig", str(cache))        # would hang on a plain open()
    assert not res["cached"] and cache.is_file()                     # replaced by the written cache


def test_a_cache_that_cannot_be_written_costs_only_the_measurement(two_libraries, tmp_path):
    model, work = _mlp_trainer_parts()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = blas.choose(model.backend, work, "sig", str(blocker / "sub" / "blas.json"))
    assert res["blas"] == "numpy" and not res["cached"]


def test_the_cache_key_ignores_the_order_threadpoolctl_lists_libraries_in(monkeypatch):
    import fastvae.backends.cpu.threads as T
    libs = [{"library": "openblas", "threads": 2}, {"library": "mkl", "threads": 2}]
    monkeypatch.setattr(T, "current", lambda: {"blas": libs, "numba": None})
    key = blas.cache_key(["numpy"], "sig")
    monkeypatch.setattr(T, "current", lambda: {"blas": libs[::-1], "numba": None})
    assert blas.cache_key(["numpy"], "sig") == key
    monkeypatch.setattr(T, "current", lambda: {"blas": [dict(libs[0], threads=1), libs[1]], "numba": None})
    assert blas.cache_key(["numpy"], "sig") != key                   # another thread limit: measured again
    assert blas.cache_key(["numpy"], "other model") != blas.cache_key(["numpy"], "sig")


def test_measure_rotates_the_order_and_restores_the_library(two_libraries):
    model, work = _mlp_trainer_parts()
    be = model.backend
    seen = []
    ms = blas.measure(be, lambda: seen.append(be.blas.name), ["numpy", "slow"], rounds=2, settle=0)
    assert seen == ["numpy", "numpy", "slow", "slow", "slow", "slow", "numpy", "numpy"]
    assert set(ms) == {"numpy", "slow"} and be.blas.name == "numpy"


def test_blas_in_the_config_and_on_the_backends():
    with pytest.raises(ConfigError, match="unknown blas 'openblas'"):
        fastvae.RunSettings(blas="openblas")
    with pytest.raises(ConfigError, match="CPU backends only"):
        fastvae.RunSettings(blas="mkl", backend="cupy")

    class GPU:
        name, device = "cupy", "cuda:0"
    with pytest.raises(ConfigError, match="CPU backends"):
        blas.use(GPU(), "numpy")
    be = get_backend("numba")
    blas.use(be, "numpy")
    assert be.blas is blas.load("numpy") and get_backend("numpy").blas is be.blas


def test_trainer_applies_blas_and_resume_falls_back_when_mkl_is_gone(monkeypatch, tmp_path, two_libraries):
    monkeypatch.setenv("FASTVAE_CACHE_DIR", str(tmp_path / "cache"))
    common = dict(n_sprites=120, hidden=[16], latent_dim=2, epochs=1, batch_size=40, progress=False)
    plain = fastvae.train("sprites", **common)
    named = fastvae.train("sprites", blas="numpy", **common)
    auto = fastvae.train("sprites", blas="auto", out=str(tmp_path / "run"), **common)
    from fastvae.backends.cpu.threads import ADAM_NOTE       # the 4096-16-2 model's 135k parameters get two Adam threads
    assert named.threads_note.replace(ADAM_NOTE, "") == "; blas numpy"
    assert auto.threads_note.startswith("; blas auto: numpy (numpy: ")
    assert named.history[-1]["train_neg_elbo"] == plain.history[-1]["train_neg_elbo"]    # same library, same bits
    assert auto.history[-1]["train_neg_elbo"] == plain.history[-1]["train_neg_elbo"]
    assert os.path.exists(tmp_path / "cache" / "blas.json")
    # a checkpoint written with --blas mkl resumes on NumPy's BLAS where MKL does not load
    from fastvae.training.trainer import Trainer
    t = fastvae.train("sprites", out=str(tmp_path / "run2"), **common)
    t.settings = t.settings.replace(blas="mkl")                      # as a run with --blas mkl records it
    t.save()
    monkeypatch.delitem(blas._loaded, "mkl", raising=False)
    monkeypatch.setattr(blas, "LIBRARIES", ("numpy", "mkl"))
    monkeypatch.setattr(blas, "_mkl_path", lambda: None)
    r = Trainer.from_checkpoint(str(tmp_path / "run2" / "checkpoint.h5"), epochs=2, progress=False)
    assert r.settings.blas is None and r.backend.blas.name == "numpy"
    r = Trainer.from_checkpoint(str(tmp_path / "run2" / "checkpoint.h5"), epochs=2, progress=False, blas="auto")
    assert r.settings.blas == "auto"
    with pytest.raises(ConfigError, match=r'pip install "fastvae\[mkl\]"'):
        Trainer.from_checkpoint(str(tmp_path / "run2" / "checkpoint.h5"), epochs=2, progress=False, blas="mkl")


def test_the_benchmark_times_each_cpu_backend_with_each_library(monkeypatch):
    import fastvae.bench.harness as B
    from fastvae.bench.timing import Contender
    asked = []

    def ours(name, wl, dtype, tf32, graph, blas=None, own_gemm=False):
        asked.append((name, blas))
        return [Contender({"backend": name + (f"+{blas}" if blas not in (None, "numpy") else ""), "warmup_s": 0.0},
                          step=lambda: None, sync=lambda: None)]

    def fake_measure(cs, seconds, settle=0.15, probe=None):
        assert settle == 0.15
        for c in cs:
            c.row.update(ms_per_step=1.0, ms_p25=1.0, ms_p75=1.0)
    monkeypatch.setattr(B, "_ours", ours)
    monkeypatch.setattr(B, "measure", fake_measure)
    monkeypatch.setattr(B, "peak_gemm_gflops", lambda dtype: 100.0)
    monkeypatch.setitem(blas._loaded, "slow", _Slow())
    monkeypatch.setattr(blas, "LIBRARIES", ("numpy", "slow"))
    rows = B.run(["784-400-20/b128"], ["numpy", "numba"], torch_peer=False, log=lambda *a: None,
                 blas_names=["numpy", "slow"])
    assert asked == [("numpy", "numpy"), ("numpy", "slow"), ("numba", "numpy"), ("numba", "slow")]
    assert [r["backend"] for r in rows] == ["numpy", "numpy+slow", "numba", "numba+slow"]
    with pytest.raises(ConfigError, match="unknown BLAS library"):
        B.run(["784-400-20/b128"], ["numpy"], torch_peer=False, log=lambda *a: None, blas_names=["nope"])


def test_an_mkl_label_and_version_in_the_benchmark_rows():
    _mkl()
    from fastvae.bench.harness import WORKLOADS, _ours
    main, gemms = _ours("numba", WORKLOADS["784-1000-2/b32"], blas="mkl")
    assert main.row["backend"] == "numba+mkl" and "Math Kernel Library" in main.row["blas"]
    main.step()
    gemms.step()


def test_a_pin_to_narrower_openblas_kernels_on_an_avx512_cpu_is_named(monkeypatch):
    """This workplace's machines set OPENBLAS_CORETYPE=Haswell; on a Zen 5
    EPYC with AVX-512, OpenBLAS unpinned picks its SkylakeX kernels (2048^3
    SGEMM 474 against 261 GFLOP/s). `fastvae backends` says so, only then."""
    from fastvae.backends.cpu.gemm_library import pinned_kernels_note
    avx512 = "fpu avx2 avx512f avx512cd avx512bw avx512dq avx512vl".split()
    haswell = {"internal_api": "openblas", "architecture": "Haswell"}
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert "OPENBLAS_CORETYPE=Haswell pins these kernels on a CPU with AVX-512" in pinned_kernels_note(haswell, avx512)
    assert pinned_kernels_note(haswell, ["fpu", "avx2", "avx512f"]) == ""          # no full AVX-512: nothing to gain
    assert pinned_kernels_note({"internal_api": "openblas", "architecture": "SkylakeX"}, avx512) == ""
    assert pinned_kernels_note({"internal_api": "mkl", "architecture": None}, avx512) == ""
    assert pinned_kernels_note(None, avx512) == ""
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert pinned_kernels_note(haswell, avx512) == ""                              # OpenBLAS's own choice
