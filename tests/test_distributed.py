"""Data-parallel training (issue 13): N ranks under mpiexec train the model
one process trains, up to summation order; rank 0 writes; checkpoints move
between world sizes; a signal stops every rank at the same step."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastvae
from fastvae.training import distributed
from fastvae.training.parts import BatchSource

from conftest import MNIST_DIR, PY, tiny_trainer, write_mnist_like


def _mpiexec():
    try:
        import mpi4py  # noqa: F401  (is it installed?)
    except ImportError:
        return None
    exe = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return exe if os.path.exists(exe) else None


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="mpi4py or mpiexec missing: pip install -e '.[mpi]'")


def mpirun(n, args, cwd, timeout=300, check=True, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([MPIEXEC, "-n", str(n)] + PY + [str(a) for a in args], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env=env, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def single(args, cwd):
    p = subprocess.run(PY + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p


def params(run):
    return fastvae.load(os.path.join(run, "checkpoint.h5")).get_flat_params()


# ------------------------------------------------------------- in-process
@pytest.mark.parametrize("n,size", [(128, 2), (7, 3), (2, 3), (1, 2)])
def test_shards_cover_the_batch_once(n, size):
    parts = [distributed.shard(n, r, size) for r in range(size)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


@pytest.mark.parametrize("binarize", [False, True])
def test_rank_batches_are_slices_of_the_one_process_batch(binarize):
    """Every rank draws the global batch's random numbers: the concatenated
    shards equal the one-process batch (images, binarization and eps)."""
    t = tiny_trainer(batch_size=25, binarize=binarize)
    be, x = t.backend, t.data.x_train

    def source(rank, size):
        return BatchSource(be, x, 25, be.new_rng([9, 1]), binarize, rank, size, latent_dim=3)
    one = source(0, 1)
    pos = one.new_epoch()
    for b in range(3):
        one.next_batch(pos, b)
    ref = one.next_batch(pos, 3)
    ref_x, ref_eps = ref.x.copy(), ref.eps.copy()
    for size in (2, 3):
        xs, es = [], []
        for r in range(size):
            s = source(r, size)
            p = s.new_epoch()
            for b in range(3):                      # consume earlier batches' draws
                s.next_batch(p, b)
            ws = s.next_batch(p, 3)
            assert ws.global_batch == 25
            xs.append(ws.x.copy())
            es.append(ws.eps.copy())
        np.testing.assert_array_equal(np.concatenate(xs), ref_x)
        np.testing.assert_array_equal(np.concatenate(es), ref_eps)


def test_one_process_world_changes_nothing():
    w = distributed.world()
    assert (w.rank, w.size) == (0, 1) and w.sum([1.5, 2]) == [1.5, 2.0] and w.any(False) is False


def test_the_launchers_environment_decides_the_world_size(monkeypatch):
    """mpiexec's and srun's task variables make a run data-parallel; the
    allocation's SLURM_NTASKS, which a batch script or an salloc shell also
    carries while being one process, does not (it refused to train without
    mpi4py, as "one of 4 ranks")."""
    for var in [v for pair in distributed._LAUNCHERS + (distributed._SLURM,) for v in pair] + ["SLURM_NTASKS"]:
        monkeypatch.delenv(var, raising=False)
    assert distributed.launched_size() == 1
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed.launched_size() == 1
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert distributed.launched_size() == 4
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("PMI_SIZE", "3")
    assert distributed.launched_size() == 3


def test_several_ranks_without_mpi4py_is_one_line(tmp_path, monkeypatch):
    env = dict(os.environ, PMI_SIZE="2", PMI_RANK="0")
    code = ("import sys, builtins\nreal = builtins.__import__\n"
            "def imp(name, *a, **k):\n    if name.startswith('mpi4py'):\n        raise ImportError(name)\n"
            "    return real(name, *a, **k)\nbuiltins.__import__ = imp\n"
            "from fastvae.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "train", "--n-sprites", "100", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "mpi4py is not installed" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------- under mpiexec
@needs_mpi
def test_two_ranks_train_the_one_process_model_float64(tmp_path):
    """The issue's command, against one process: float64 parameters within 1e-9."""
    data = MNIST_DIR if os.path.exists(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz")) else None
    if data is None:
        write_mnist_like(tmp_path / "mnist", n_train=2000, n_test=200)
        data = tmp_path / "mnist"
    args = ["train", "--dataset", "mnist", "--data-dir", data, "--hidden", "64", "--latent", "4", "--epochs", "1",
            "--batch-size", "128", "--seed", "3", "--dtype", "float64", "--no-progress"]
    r = mpirun(2, args + ["--out", tmp_path / "two"], tmp_path, timeout=600)
    assert "on 2 ranks (mpi)" in r.stdout and r.stdout.count("epoch 1/1") == 1      # rank 0 alone prints
    single(args + ["--out", tmp_path / "one"], tmp_path)
    a, b = params(tmp_path / "one"), params(tmp_path / "two")
    assert np.max(np.abs(a - b)) <= 1e-9 * np.max(np.abs(a))


@needs_mpi
def test_odd_batches_binarize_clip_and_float32(tmp_path):
    """3 ranks (shards of 11 and 12 rows, a last batch of 5), binarization and
    clipping; float32 agrees within summation-order tolerance."""
    args = ["train", "--n-sprites", "390", "--hidden", "16", "--latent", "3", "--epochs", "2", "--batch-size", "35",
            "--binarize", "--clip-grad-norm", "50", "--seed", "1", "--no-progress"]
    mpirun(3, args + ["--dtype", "float64", "--out", tmp_path / "three"], tmp_path)
    single(args + ["--dtype", "float64", "--out", tmp_path / "one"], tmp_path)
    a, b = params(tmp_path / "one"), params(tmp_path / "three")
    assert np.max(np.abs(a - b)) <= 1e-9 * np.max(np.abs(a))
    mpirun(2, args + ["--out", tmp_path / "two32"], tmp_path)
    single(args + ["--out", tmp_path / "one32"], tmp_path)
    a, b = params(tmp_path / "one32"), params(tmp_path / "two32")
    # float32, 22 Adam steps: reordered sums differ by ~1e-7 relative per step; Adam's normalised
    # steps of size lr = 1e-3 keep the parameter difference near lr * steps * 1e-3
    assert np.max(np.abs(a - b)) <= 1e-3 * np.max(np.abs(a))


@needs_mpi
@pytest.mark.parametrize("objective", [["--objective", "iwae", "--iwae-k", "3"],
                                       ["--objective", "btcvae", "--beta", "6"],
                                       ["--objective", "iwae", "--iwae-k", "3", "--posterior", "iaf", "--flows", "2"]])
def test_iwae_and_btcvae_on_three_ranks_train_the_one_process_model(tmp_path, objective):
    """IWAE draws the global batch's K samples per image on every rank and
    keeps its rows; beta-TCVAE's estimator gathers the global batch's
    posteriors. Batches of 89 of 180 images: shards of 29-30 rows, and a last
    batch of 2 that leaves rank 0 with none (it still draws and gathers:
    without that the job hangs or its stream falls behind). Both used to be
    refused on more than one process."""
    args = ["train", "--n-sprites", "200", "--hidden", "16", "--latent", "3", "--epochs", "2", "--batch-size", "89",
            "--seed", "1", "--dtype", "float64", "--no-progress", *objective]
    mpirun(3, args + ["--out", tmp_path / "three"], tmp_path)
    single(args + ["--out", tmp_path / "one"], tmp_path)
    a, b = params(tmp_path / "one"), params(tmp_path / "three")
    assert np.max(np.abs(a - b)) <= 1e-9 * np.max(np.abs(a))
    last = [list(csv.DictReader(open(tmp_path / r / "metrics.csv")))[-1] for r in ("one", "three")]
    for k in ("train_loss", "train_neg_elbo", "test_neg_elbo"):        # the metrics, summed over ranks
        assert float(last[1][k]) == pytest.approx(float(last[0][k]), rel=1e-9), k


@needs_mpi
def test_checkpoints_move_between_world_sizes(tmp_path):
    args = ["--n-sprites", "600", "--hidden", "16", "--latent", "3", "--batch-size", "40", "--seed", "2",
            "--dtype", "float64", "--no-progress"]
    single(["train", *args, "--epochs", "3", "--out", tmp_path / "straight"], tmp_path)
    mpirun(2, ["train", *args, "--epochs", "1", "--out", tmp_path / "moved"], tmp_path)
    single(["train", "--resume", tmp_path / "moved", "--epochs", "2", "--no-progress"], tmp_path)
    mpirun(3, ["train", "--resume", tmp_path / "moved", "--epochs", "3", "--no-progress"], tmp_path)
    a, b = params(tmp_path / "straight"), params(tmp_path / "moved")
    assert np.max(np.abs(a - b)) <= 1e-9 * np.max(np.abs(a))
    assert fastvae.load(tmp_path / "moved" / "checkpoint.h5").checkpoint["epoch"] == 3


@needs_mpi
def test_sigterm_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([MPIEXEC, "-n", "2"] + PY + ["train", "--n-sprites", "3000", "--hidden", "64", "--latent",
                                                      "4", "--batch-size", "16", "--epochs", "50", "--out", str(out),
                                                      "--no-progress"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.time()
    while not (out / "metrics.csv").exists() and time.time() - t0 < 120:
        time.sleep(0.05)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)            # mpiexec forwards it to every rank, each at its own step
    try:                                     # a rank that gets it stops within a step, and the ranks agree
        _, stderr = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:        # no rank got it: Hydra's mpiexec once dropped it (the job then ran
        p.send_signal(signal.SIGTERM)        # its 50 epochs, 27 s, to rc 0); not seen since in 20 runs
        _, stderr = p.communicate(timeout=120)
    assert p.returncode == 143 and "Traceback" not in stderr, (p.returncode, stderr)
    assert stderr.count("resume with:") == 1, stderr
    m = fastvae.load(out / "checkpoint.h5")
    assert 0 < m.checkpoint["step"] and m.checkpoint["epoch"] < 50
    mpirun(2, ["train", "--resume", out, "--epochs", m.checkpoint["epoch"] + 1, "--no-progress"], tmp_path)


@needs_mpi
def test_an_error_on_the_ranks_ends_the_job_with_one_line_each(tmp_path):
    r = mpirun(2, ["train", "--dataset", "mnist", "--data-dir", tmp_path / "none", "--no-download",
                   "--out", tmp_path / "r"], tmp_path, check=False, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert "not found" in r.stderr, r.stderr


@needs_mpi
def test_streamed_data_trains_the_same_model_on_two_ranks(tmp_path):
    x = ((np.random.default_rng(5).random((1200, 16, 16)) < 0.3) * 255).astype(np.uint8)
    np.save(tmp_path / "big.npy", x)
    args = ["train", "--dataset", tmp_path / "big.npy", "--memory-budget", "0.05", "--hidden", "16", "--latent", "3",
            "--epochs", "2", "--batch-size", "64", "--seed", "7", "--dtype", "float64", "--binarize", "--no-progress"]
    mpirun(2, args + ["--out", tmp_path / "two"], tmp_path)
    single(args + ["--out", tmp_path / "one"], tmp_path)
    a, b = params(tmp_path / "one"), params(tmp_path / "two")
    assert np.max(np.abs(a - b)) <= 1e-9 * np.max(np.abs(a))
