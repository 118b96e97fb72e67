"""Threads that do not fight (fastvae/backends/cpu/threads.py fit_backend, openblas_spin):
the NumPy backend's Adam on two threads, bit for bit the one-thread update,
and OpenBLAS's idle threads made to sleep at once while it runs so."""

import os
import time

import numpy as np
import pytest

from fastvae import RunSettings, backends
from fastvae.backends.cpu import threads as T
from fastvae.backends.numpy_backend import NumpyBackend
from fastvae.backends.cpu.worker import TwoThreads


def _model(num_params, conv=False):
    """What fit_backend reads of a model: its size and whether a layer has an im2col buffer."""
    from types import SimpleNamespace
    return SimpleNamespace(num_params=num_params, layers=[SimpleNamespace(cols_per_image=512 if conv else 0)])


def _openblas_pthreads():
    info = T.numpy_blas()
    return (info is not None and info.get("internal_api") == "openblas"
            and info.get("threading_layer") == "pthreads" and (info.get("num_threads") or 1) >= 2
            and len(os.sched_getaffinity(0)) >= 2)


needs_openblas = pytest.mark.skipif(not _openblas_pthreads(), reason="needs NumPy's OpenBLAS (pthreads build) "
                                    "with 2 or more threads on 2 or more cores")


@pytest.fixture
def restore_spin():
    yield
    if T._spin not in (None, T.SPIN_DEFAULT):
        T.openblas_spin(T.SPIN_DEFAULT)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("wd,decay", [(0.0, 1.0), (0.01, 0.999)])
def test_two_thread_adam_is_the_one_thread_update_bit_for_bit(dtype, wd, decay, monkeypatch):
    """The buffer split in halves (the second on the worker thread), each in
    its own chunks, a ragged last chunk on both sides: the same operations on
    every element, so the same bits, over several steps."""
    monkeypatch.setattr(NumpyBackend, "ADAM_CHUNK_BYTES", 4096 * np.dtype(dtype).itemsize)
    r = np.random.default_rng(0)
    n = TwoThreads.ADAM_SPLIT_MIN + 12_345
    init = [r.normal(size=n).astype(dtype) for _ in range(4)]
    init[3] = np.abs(init[3])
    out = []
    for threads in (1, 2):
        be = backends.get("numpy", dtype)
        be.adam_threads = threads
        p, m, v = init[0].copy(), init[2].copy(), init[3].copy()
        for k in range(3):
            g = init[1] * (k + 1)
            be.adam_update(p, g, m, v, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, bc2_sqrt=0.7,
                           weight_decay=wd, decay_factor=decay)
        out.append((p, m, v))
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(out[1][0], init[0])
    # the two halves really ran on two threads: each left its own temporaries
    assert {k[0] for k in be._scratch if k[0].startswith("adam_t")} == {"adam_t0", "adam_t1"}


def test_the_worker_half_of_adam_keeps_the_callers_numpy_error_state():
    """NumPy's error state is per thread: the trainer silences overflow
    warnings (its loss check reports a divergence with the fixes), but the
    worker thread's half of a two-thread Adam warned all the same ("overflow
    encountered in multiply" before the divergence message). The worker runs
    under the caller's state now, and the caller's own settings still hold."""
    import warnings
    be = backends.get("numpy", "float32")
    be.adam_threads = 2
    n = TwoThreads.ADAM_SPLIT_MIN * 2
    p, m, v = (np.ones(n, np.float32) for _ in range(3))
    g = np.full(n, 3e30, np.float32)                      # g * g overflows float32 in both halves
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, bc2_sqrt=1.0, weight_decay=0.0, decay_factor=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="ignore", invalid="ignore"):
            be.adam_update(p, g, m, v, **kw)
        assert np.isinf(v).all()                           # the overflow happened, in both halves
        with np.errstate(over="raise"), pytest.raises(FloatingPointError):
            be.adam_update(p, g, m, v, **kw)


def test_small_buffers_stay_on_one_thread():
    be = backends.get("numpy", "float32")
    be.adam_threads = 2
    n = TwoThreads.ADAM_SPLIT_MIN - 1
    p, g, m, v = (np.ones(n, np.float32) for _ in range(4))
    be.adam_update(p, g, m, v, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, bc2_sqrt=1.0,
                   weight_decay=0.0, decay_factor=1.0)
    assert {k[0] for k in be._scratch if k[0].startswith("adam_t")} == {"adam_t0"}


@needs_openblas
def test_fit_backend_gives_numpy_two_adam_threads_and_numba_one(restore_spin):
    """NumPy's backend: two Adam threads, OpenBLAS's spin short; the Numba
    backend (its jitted Adam measured faster serial) gets one and OpenBLAS's
    default spin back; thread counts never change; MKL as the GEMM library,
    or the user's own OPENBLAS_THREAD_TIMEOUT, keep Adam on one thread."""
    before = T.current()["blas"]
    be = backends.get("numpy", "float32")
    assert "Adam on 2 threads" in T.fit_backend(be, _model(10 ** 6))
    assert be.adam_threads == 2 and T._spin == T.SPIN_SHORT
    assert T.current()["blas"] == before
    nb = backends.get("numba", "float32")
    assert T.fit_backend(nb, _model(10 ** 6)) == "" and nb.adam_threads == 1 and T._spin == T.SPIN_DEFAULT
    assert T.current()["blas"] == before
    a = np.random.default_rng(0).random((300, 200)).astype(np.float32)
    np.testing.assert_allclose(a @ a.T, (a.astype(np.float64) @ a.T.astype(np.float64)), rtol=1e-5)

    class OtherGemm:
        name = "mkl"
    assert T.fit_backend(be, _model(TwoThreads.ADAM_SPLIT_MIN - 1)) == "" and be.adam_threads == 1   # too small
    be.blas = OtherGemm()
    assert T.fit_backend(be, _model(10 ** 6)) == "" and be.adam_threads == 1


@needs_openblas
def test_fit_backend_gives_the_cpu_backends_two_copy_threads_for_a_model_with_convolutions(restore_spin):
    """A model with im2col buffers: the Numba backend's im2col/col2im on two
    threads and OpenBLAS's spin short (the log says so); an MLP, or MKL as
    the GEMM library, keeps them on one and the default spin. Thread counts
    never change; the NumPy backend gets two copy threads beside its two Adam threads."""
    pytest.importorskip("numba", reason="numba is not installed")
    before = T.current()["blas"]
    nb = backends.get("numba", "float32")
    assert "im2col/col2im on 2 threads" in T.fit_backend(nb, _model(1000, conv=True))
    assert nb.copy_threads == 2 and nb.adam_threads == 1 and T._spin == T.SPIN_SHORT
    assert T.fit_backend(nb, _model(10 ** 6)) == "" and nb.copy_threads == 1 and T._spin == T.SPIN_DEFAULT
    assert T.current()["blas"] == before

    class OtherGemm:
        name = "mkl"
    nb.blas = OtherGemm()
    assert T.fit_backend(nb, _model(1000, conv=True)) == "" and nb.copy_threads == 1
    be = backends.get("numpy", "float32")
    assert "Adam and im2col/col2im on 2 threads" in T.fit_backend(be, _model(10 ** 6, conv=True))
    assert be.adam_threads == 2 and be.copy_threads == 2


# (in (H, W, C), kernel, stride, padding, batch): few channels and many, odd batches, padding
COPY_GEOMS = [((16, 16, 1), 4, 2, 1, 5), ((8, 8, 32), 4, 2, 1, 4), ((9, 7, 3), 3, 1, 1, 3), ((6, 5, 9), 4, 3, 2, 7)]


def _cpu_backend(name):
    if name == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    return backends.get(name, "float32")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("hwc, k, s, p, B", COPY_GEOMS)
def test_two_thread_im2col_and_col2im_are_the_serial_kernels_bit_for_bit(backend, hwc, k, s, p, B, monkeypatch):
    """Each thread takes half the batch's images (and the NumPy backend's
    worker its own staging buffers): every row of the column buffer and
    every image is written as the serial copy writes it (both outputs start
    as NaN, so a row left out or written twice shows)."""
    monkeypatch.setattr(TwoThreads, "COPY_SPLIT_MIN", 0)
    H, W, C = hwc
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    r = np.random.default_rng(3)
    x = r.normal(size=(B, H * W * C)).astype(np.float32)
    c = r.normal(size=(B * Ho * Wo, C * k * k)).astype(np.float32)
    out = {}
    for n in (1, 2):
        be = _cpu_backend(backend)
        be.copy_threads = n
        cols = be.im2col(np.full_like(c, np.nan), x, hwc, k, s, p, (Ho, Wo))
        img = be.col2im(np.full_like(x, np.nan), c, hwc, k, s, p, (Ho, Wo))
        out[n] = cols, img
        assert (getattr(be, "_pool", None) is not None) == (n == 2)      # the worker took its half
    assert not np.isnan(out[2][0]).any() and not np.isnan(out[2][1]).any()
    assert np.array_equal(out[2][0], out[1][0]) and np.array_equal(out[2][1], out[1][1])


@needs_openblas
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_conv_training_run_on_two_copy_threads_is_the_one_thread_run(backend, tmp_path, monkeypatch, restore_spin):
    """The trainer gives a ConvNet's copies two threads (its log says so) and
    the run ends on the same bits as with them on one."""
    from fastvae import DataConfig, ModelConfig, TrainConfig, Trainer, datasets
    _cpu_backend(backend)
    monkeypatch.setattr(TwoThreads, "COPY_SPLIT_MIN", 0)
    data = datasets.make_sprites(48, seed=6, size=16)
    runs = []
    for most in (2, 1):
        monkeypatch.setattr(TwoThreads, "MAX_COPY_THREADS", most)
        t = Trainer(ModelConfig(input_dim=256, image_shape=(16, 16), arch="conv", latent_dim=3),
                    TrainConfig(epochs=1, batch_size=16, seed=2), DataConfig(), dataset=data,
                    out=str(tmp_path / f"run{most}"), progress=False, settings=RunSettings(backend=backend))
        assert ("im2col/col2im on 2 threads" in t.threads_note) == (most == 2) and t.backend.copy_threads == most
        t.fit()
        runs.append(t.backend.to_host(t.model.params).copy())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_the_users_own_openblas_timeout_is_left_alone(monkeypatch):
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "10")
    monkeypatch.setattr(T, "_USER_SPIN", "10")
    monkeypatch.setattr(T, "_spin", None)
    be = backends.get("numpy", "float32")
    assert T.openblas_spin(T.SPIN_SHORT) is False
    assert T.fit_backend(be, _model(10 ** 6)) == "" and be.adam_threads == 1 and T._spin is None
    assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == "10"    # neither overwritten nor removed


def _running_others():
    """Threads of this process other than the caller in state R (running or
    runnable: OpenBLAS's idle threads spin with sched_yield and show as R)."""
    me = str(__import__("threading").get_native_id())
    states = []
    for tid in os.listdir("/proc/self/task"):
        if tid == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            pass
    return states.count("R")


@needs_openblas
def test_openblas_idle_threads_spin_by_default_and_sleep_at_once_when_short(restore_spin):
    """What the setting changes, observed in /proc: right after a
    multi-threaded GEMM, OpenBLAS's worker spins (state R) under its default
    (2^28 cycles, ~0.1 s); with the short spin (2^4 cycles) it is asleep
    (state S) 20 ms after the GEMM. Nothing is timed: states are read."""
    a = np.random.default_rng(0).random((512, 512)).astype(np.float32)
    assert T.openblas_spin(T.SPIN_DEFAULT)
    seen = 0
    for _ in range(20):
        a @ a
        seen += _running_others() > 0
    assert seen >= 10, "OpenBLAS's idle thread was not seen spinning after its GEMMs"
    assert T.openblas_spin(T.SPIN_SHORT)
    asleep = 0
    for _ in range(20):
        a @ a
        time.sleep(0.02)
        asleep += _running_others() == 0
    assert asleep >= 15, "OpenBLAS's idle threads kept running with the short spin"


@needs_openblas
def test_a_numpy_training_run_on_two_adam_threads_is_the_one_thread_run(tmp_path, monkeypatch, restore_spin):
    """The trainer fits the threads (its log note says so) and a run whose
    parameters span both halves ends on the same bits as on one thread."""
    from conftest import tiny_trainer
    runs = []
    for most in (2, 1):
        monkeypatch.setattr(TwoThreads, "MAX_ADAM_THREADS", most)
        t = tiny_trainer(tmp_path / f"run{most}", hidden=(512,), epochs=1, n=96, batch_size=32)
        assert t.model.num_params >= TwoThreads.ADAM_SPLIT_MIN     # the split happens
        assert ("Adam on 2 threads" in t.threads_note) == (most == 2) and t.backend.adam_threads == most
        t.fit()
        runs.append(t.backend.to_host(t.model.params).copy())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_a_forked_child_gets_its_own_adam_worker():
    """A fork copies the backend but not its worker thread: the child starts
    its own (keyed by process id) instead of waiting on a thread that is not
    there, and computes the same update."""
    import multiprocessing as mp
    be = backends.get("numpy", "float32")
    be.adam_threads = 2
    n = TwoThreads.ADAM_SPLIT_MIN + 7
    r = np.random.default_rng(1)
    p, g = r.normal(size=n).astype(np.float32), r.normal(size=n).astype(np.float32)
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, bc2_sqrt=1.0, weight_decay=0.0,
              decay_factor=1.0)
    ref = p.copy()
    be.adam_update(ref, g, np.zeros(n, np.float32), np.zeros(n, np.float32), **kw)   # the parent's worker runs
    parent_pool = be._pool

    def child(q):
        out = p.copy()
        be.adam_update(out, g, np.zeros(n, np.float32), np.zeros(n, np.float32), **kw)
        q.put((np.array_equal(out, ref), be._pool[0] == os.getpid(), be._pool is not parent_pool))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=child, args=(q,))
    proc.start()
    res = q.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0 and res == (True, True, True)
