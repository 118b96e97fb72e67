"""Odd values, messages, and what a new user tripped on (issue 12, parts 3,
6 and 7): each a one-line error or the behaviour a user expects."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

import fastvae
from fastvae import ConfigError
from fastvae.cli.args import _finite, _one_line

from conftest import ROOT, fv, tiny_trainer, write_mnist_like

TINY = ["--n-sprites", "200", "--hidden", "8", "--latent", "2", "--batch-size", "50", "--no-progress"]


def one_line(r, *needles):
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvae: error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny MNIST-like run trained with a RELATIVE --data-dir."""
    base = tmp_path_factory.mktemp("u")
    write_mnist_like(base / "data", n_train=60, n_test=20)
    fv("train", "--dataset", "mnist", "--data-dir", "data", "--hidden", "8", "--latent", "3", "--epochs", "1",
       "--batch-size", "20", "--out", "run", "--no-progress", cwd=base)
    return base / "run"


@pytest.mark.parametrize("args,needles", [
    (["--latent", "0"], ["latent_dim must be a positive integer"]),
    (["--epochs", "0"], ["--epochs must be a positive integer"]),
    (["--hidden"], ["--hidden needs at least one width"]),
    # options that need a setting not chosen were taken and did nothing
    (["--likelihood", "mse", "--sigma", "0.5"], ["--sigma does something only with --likelihood gaussian",
                                                 "(here mse)", "drop it, or set --likelihood"]),
    (["--sigma", "0.5"], ["(here bernoulli)"]),
    (["--iwae-k", "7"], ["--iwae-k does something only with --objective iwae"]),
    (["--objective", "iwae", "--beta", "4"], ["--beta does something only with --objective elbo or btcvae",
                                              "(here iwae)"]),
    (["--beta-warmup", "3"], ["--beta-warmup does something only with --beta-schedule linear or sigmoid"]),
    (["--beta-schedule", "linear", "--beta-cycles", "2"], ["--beta-cycles does something only with "
                                                           "--beta-schedule cyclical (here linear)"]),
    (["--lr-gamma", "0.3"], ["--lr-gamma does something only with --lr-schedule step"]),
    (["--lr-schedule", "step", "--lr-min", "0"], ["--lr-min does something only with --lr-schedule cosine"]),
    (["--flow-hidden", "30"], ["--flow-hidden does something only with --posterior iaf"]),
    (["--adamw"], ["--adamw decouples --weight-decay, which is 0 here"]),
    (["--memory-budget", "100"], ["--memory-budget decides whether an .npy/.h5 file streams", "drop it"]),
    (["--lr-schedule", "cosine", "--lr-min", "0.01"], ["--lr-min 0.01 is above --lr 0.001",
                                                      "would raise the learning rate"]),
])
def test_odd_values_are_errors(tmp_path, args, needles):
    r = fv("train", *TINY, *args, "--out", tmp_path / "r", cwd=tmp_path, check=False)
    one_line(r, *needles)
    assert not (tmp_path / "r").exists()


def test_memory_preflight_refuses_a_model_that_cannot_fit(tmp_path):
    r = fv("train", "--hidden", "100000", "--latent", "50000", "--epochs", "1", "--out", tmp_path / "r",
           cwd=tmp_path, check=False, timeout=120)
    one_line(r, "needs about", "GiB", "free", "smaller")
    assert not (tmp_path / "r").exists()


def test_memory_preflight_counts_the_batch(monkeypatch):
    """A model that fits but whose batch buffers do not: refused by the trainer."""
    from fastvae.training import memory
    monkeypatch.setattr(memory, "host_available", lambda: 40 * 2 ** 20)       # pretend 40 MiB free
    tiny_trainer(batch_size=16)                                               # small: fine
    with pytest.raises(ConfigError, match="batch 4096 buffers"):
        tiny_trainer(hidden=(2000,), n=5000, batch_size=4096)


def test_memory_preflight_counts_the_built_in_sprites(monkeypatch):
    """--n-sprites 100000000 drew 4.7 GB of images before running out of
    memory; the sprites' 5 bytes a pixel are checked against free memory first."""
    from fastvae import datasets
    from fastvae.training import memory
    monkeypatch.setattr(memory, "host_available", lambda: 20 * 2 ** 20)       # pretend 20 MiB free
    assert datasets.make_sprites(500, size=32).x_train.shape == (450, 1024)  # 2.4 MiB: fine
    with pytest.raises(ConfigError, match="5,000 sprites of 32x32 pixels needs about .* use a smaller n_sprites$"):
        datasets.make_sprites(5000, size=32)                                  # 24 MiB: refused before drawing


def test_training_reads_the_data_in_place_on_the_cpu():
    """On the CPU backends, float32 training images in the model dtype are
    gathered from where they lie (they were copied whole first: 75 MB more
    peak memory for 24,000 MNIST images); a float64 model gets its own copy."""
    t = tiny_trainer(epochs=1)
    t.fit(pictures=False)
    assert t.batches._x is t.data.x_train
    from fastvae import DataConfig, ModelConfig, TrainConfig, Trainer, datasets
    data = datasets.make_sprites(100, seed=1, size=16)
    mc = ModelConfig(input_dim=256, hidden=[8], latent_dim=2, dtype="float64")
    t64 = Trainer(mc, TrainConfig(epochs=1, batch_size=20), DataConfig(), dataset=data, progress=False)
    t64.fit(pictures=False)
    assert t64.batches._x is not data.x_train and t64.batches._x.dtype == np.float64
    np.testing.assert_array_equal(t64.batches._x, data.x_train)


def test_relative_data_dir_is_stored_absolute(run_dir, tmp_path):
    cfg = json.loads((run_dir / "config.json").read_text())
    assert os.path.isabs(cfg["data"]["data_dir"])
    # plot / eval from another directory find the data
    fv("eval", run_dir / "checkpoint.h5", "--json", cwd=tmp_path)
    fv("plot", run_dir, "--grid", "3", "--n", "2", cwd=tmp_path)


def test_every_command_accepts_the_run_folder(run_dir, tmp_path):
    assert "parameters" in fv("info", run_dir, cwd=tmp_path).stdout
    assert json.loads(fv("eval", run_dir, "--json", cwd=tmp_path).stdout)["n"] == 20
    fv("interpolate", run_dir, "0", "-1", "--png", tmp_path / "i.png", cwd=tmp_path)
    assert (tmp_path / "i.png").stat().st_size > 1000
    fv("train", "--resume", run_dir, "--epochs", "2", "--no-progress", cwd=tmp_path)


def test_negative_interpolate_indices_count_from_the_end(run_dir, tmp_path):
    assert "-1 is the last image" in fv("interpolate", "--help", cwd=tmp_path).stdout
    r = fv("interpolate", run_dir, "0", "-21", "--png", tmp_path / "x.png", cwd=tmp_path, check=False)
    one_line(r, "index -21 is outside")


def _stderr_on_a_terminal(*args, cwd):
    """``fastvae ARGS`` with its stderr on a 100-column pseudo-terminal: what it wrote there."""
    import fcntl
    import pty
    import struct
    import termios
    import threading
    from conftest import PY
    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # a bar takes the terminal's width
    chunks = []

    def read():                                  # while it runs: a full terminal would block the writer
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:                      # EIO: the terminal's other end is closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        p = subprocess.run(PY + [str(a) for a in args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=sub, timeout=600)
    finally:
        os.close(sub)
        reader.join(10)
        os.close(main)
    assert p.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_iwae_shows_progress_on_a_terminal_only(run_dir, tmp_path):
    """The IWAE bar filled a log file (stderr to a file or pipe) with its
    carriage-return updates; training's bar shows on a terminal only, and so
    does this one now."""
    assert "IWAE k=50" in _stderr_on_a_terminal("eval", run_dir, "--iwae-k", "50", cwd=tmp_path)
    assert "IWAE k=50" not in _stderr_on_a_terminal("eval", run_dir, "--iwae-k", "50", "--no-progress", cwd=tmp_path)
    r = fv("eval", run_dir, "--iwae-k", "50", cwd=tmp_path)
    assert "IWAE -log p(x), k=50" in r.stdout and "IWAE k=50" not in r.stderr, r.stderr


def test_traversals_dims_is_an_option_and_said(run_dir, tmp_path):
    fv("plot", run_dir, "--max-dims", "2", "--grid", "3", "--n", "2", "--out", tmp_path / "f", cwd=tmp_path)
    assert (tmp_path / "f" / "traversals.png").exists()
    one_line(fv("plot", run_dir, "--max-dims", "0", cwd=tmp_path, check=False), "--max-dims")


def test_eval_json_never_emits_nan():
    res = _finite({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "e": 2})
    assert res == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 2}
    json.dumps(res, allow_nan=False)


def test_messages_are_bounded():
    assert len(_one_line("x" * 10_000)) <= 400
    assert _one_line("a\nb") == "a b"


def test_bench_gpu_without_cupy_is_one_line(tmp_path):
    """As on a machine without CuPy (hidden from this process when installed)."""
    code = ("import sys; sys.modules['cupy'] = None; from fastvae.cli import main; "
            "sys.exit(main(['bench', '--gpu', '--seconds', '0.1']))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    one_line(p, "cupy", "CuPy is not installed")


def test_default_data_folder_is_documented(tmp_path):
    assert "~/.cache/fastvae/<name>" in fv("train", "--help", cwd=tmp_path).stdout
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "~/.cache/fastvae/<name>" in readme


def test_explore_is_reachable_after_import_fastvae():
    code = "import fastvae; print(fastvae.explore.iwae.__name__, fastvae.explore.metrics.mig.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["iwae", "mig"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_decode_and_sample_return_the_model_dtype(dtype):
    m = fastvae.VAE(fastvae.ModelConfig(input_dim=16, hidden=[8], latent_dim=2, dtype=dtype))
    assert m.sample(3).dtype == np.dtype(dtype)
    assert m.decode(np.zeros((2, 2))).dtype == np.dtype(dtype)
    assert m.reconstruct(np.full((2, 16), 0.5)).dtype == np.dtype(dtype)


def test_checkpoint_has_the_same_permissions_as_other_run_files(run_dir):
    modes = {f: stat.S_IMODE(os.stat(run_dir / f).st_mode) for f in ("checkpoint.h5", "config.json", "metrics.csv")}
    assert len(set(modes.values())) == 1, modes


def test_n_sprites_beside_another_dataset_is_refused(tmp_path):
    """`--dataset mnist --n-sprites 500` trained on all of MNIST: the count
    sizes only the built-in sprites."""
    write_mnist_like(tmp_path / "data", n_train=60, n_test=20)
    r = fv("train", "--dataset", "mnist", "--data-dir", "data", "--n-sprites", "500", "--out", "r", cwd=tmp_path,
           check=False)
    one_line(r, "--n-sprites sizes the built-in sprites, not mnist; drop it")
    assert not (tmp_path / "r").exists()


def test_a_dataset_smaller_than_the_default_batch_trains_on_all_its_images_a_step(tmp_path, capsys):
    """`fastvae train --dataset x.npy` on 100 images (90 for training) stopped
    with "batch_size 128 is larger than the 90 training images": a setting
    the user never gave. Without --batch-size (batch_size= in Python) a step
    now takes every training image, said in a note; a batch size the user
    names is still checked."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((100, 8, 8)).astype(np.float32))
    r = fv("train", "--dataset", "x.npy", "--hidden", "8", "--latent", "2", "--epochs", "2", "--no-progress",
           "--out", "run", cwd=tmp_path)
    assert "note: batch_size 90, every training image: the default 128 is more than the 90 there" in r.stderr
    ckpt = fastvae.load(tmp_path / "run").checkpoint
    assert ckpt["train"]["batch_size"] == 90 and ckpt["step"] == 2          # one step an epoch
    one_line(fv("train", "--dataset", "x.npy", "--batch-size", "128", "--out", "run2", cwd=tmp_path, check=False),
             "batch_size 128 is larger than the 90 training images")
    capsys.readouterr()
    t = fastvae.train(np.random.default_rng(1).random((50, 16)), hidden=[4], latent_dim=2, epochs=1)
    assert t.train_config.batch_size == 45 and t.step == 1
    assert "batch_size 45, every training image" in capsys.readouterr().err
    assert fastvae.train(np.random.default_rng(1).random((500, 16)), hidden=[4], latent_dim=2,
                         epochs=1).train_config.batch_size == 128
