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


from hypothesis import given, settings, strategies as st  # noqa: E402

_words = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(head=st.lists(_words, min_size=1, max_size=120).map(" ".join),
       fix=st.lists(_words, min_size=1, max_size=40).map(" ".join))
def test_a_long_message_keeps_its_fix_whole(head, fix):
    """Messages read '<problem>; <fix>': past the cap the problem is cut,
    never the fix (the text after the last '; ')."""
    fix = fix.replace(";", ",")
    msg = _one_line(f"{head}; {fix}")
    assert msg.endswith(fix)
    if len(head) + len(fix) + 2 > 400:
        assert len(msg) <= max(400, len(fix) + 86)


def test_the_offline_mnist_message_keeps_its_advice(tmp_path, monkeypatch, capsys):
    """The download failure quotes both mirrors' errors; the advice to copy
    the four idx files, at the end, survives the cap."""
    from fastvae import datasets
    from fastvae.cli import main
    from fastvae.errors import DataError

    def offline(name, md5, mirrors, folder):
        raise DataError("could not download " + name + " (" + "; ".join(
            f"{m}{name}: [Errno -2] Name or service not known" for m in mirrors) + ")")
    monkeypatch.setattr(datasets, "download_file", offline)
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nope"), "--epochs", "1",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "copy the four idx files" in err and err.endswith("or set --data-dir")


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


def test_numba_caches_its_kernels_in_the_user_cache_folder_never_in_the_install(tmp_path):
    """pip's uninstall leaves files it did not install: Numba's cache written
    into the package's kernels folder outlived it and shadowed the next
    (editable) install. The kernels compile into $FASTVAE_CACHE_DIR/numba."""
    import glob
    import fastvae.kernels as K
    kernels = os.path.dirname(K.__file__)
    before = set(glob.glob(os.path.join(kernels, "**", "*.nb[ic]"), recursive=True))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["FASTVAE_CACHE_DIR"] = str(tmp_path / "cache")
    code = ("import fastvae; t = fastvae.train('sprites', n_sprites=60, hidden=[8], latent_dim=2, epochs=1, "
            "batch_size=30, backend='numba'); import numba.core.config as c; print(c.CACHE_DIR)")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-1] == str(tmp_path / "cache" / "numba")
    assert glob.glob(str(tmp_path / "cache" / "numba" / "**" / "*.nbi"), recursive=True)
    assert set(glob.glob(os.path.join(kernels, "**", "*.nb[ic]"), recursive=True)) <= before
    assert "on numba (asked for)" in p.stderr.splitlines()[0]


def test_auto_picks_the_fastest_backend_that_runs_here_and_says_why(tmp_path, monkeypatch):
    from fastvae import backends
    monkeypatch.delenv("FASTVAE_BACKEND")
    ok = {b["name"]: b["available"] for b in backends.available()}
    name, why = backends.resolve("auto")
    assert name == ("cupy" if ok["cupy"] else "numba" if ok["numba"] else "numpy")
    assert why.startswith("auto") and (ok["cupy"] or "not cupy: " in why)
    assert backends.resolve("numpy") == ("numpy", "asked for")
    t = fastvae.train("sprites", n_sprites=60, hidden=[8], latent_dim=2, epochs=1, batch_size=30)
    assert t.settings.backend == name and t.backend.name == name              # the run records what it ran on
    assert fastvae.RunSettings().backend == "auto"
    monkeypatch.setenv("FASTVAE_BACKEND", "numpy")
    assert backends.resolve("auto") == ("numpy", "FASTVAE_BACKEND")
    monkeypatch.setenv("FASTVAE_BACKEND", "tpu")
    with pytest.raises(fastvae.BackendUnavailableError, match="FASTVAE_BACKEND='tpu' names no backend"):
        backends.resolve("auto")


def test_the_command_line_defaults_to_auto_and_says_so_first(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTVAE_BACKEND"}
    import subprocess as sp
    p = sp.run([sys.executable, "-m", "fastvae", "train", "--n-sprites", "60", "--hidden", "8", "--latent", "2",
                "--epochs", "1", "--batch-size", "30", "--no-progress", "--out", "run"], cwd=tmp_path, env=env,
               capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    from fastvae import backends
    gpu = {b["name"]: b["available"] for b in backends.available()}["cupy"]
    first = p.stdout.splitlines()[0]
    assert first.startswith("training VAE(") and first.split("; ")[-1].startswith(
        "on cupy (auto" if gpu else "on numba (auto: not cupy: "), first


def test_a_mistyped_flag_gets_the_subcommands_usage_and_the_closest_flag(tmp_path):
    p = fv("train", "--epcohs", "3", cwd=tmp_path, check=False)
    assert p.returncode == 2
    assert "usage: fastvae train" in p.stderr and "did you mean --epochs?" in p.stderr
    p = fv("eval", "RUN", "--jsn", cwd=tmp_path, check=False)
    assert "usage: fastvae eval" in p.stderr and "did you mean --json?" in p.stderr


def test_a_resumed_run_says_where_it_resumed_on_its_first_line(tmp_path):
    fv("train", "--n-sprites", "60", "--hidden", "8", "--latent", "2", "--epochs", "1", "--batch-size", "20",
       "--backend", "numpy", "--out", "run", cwd=tmp_path)
    p = fv("train", "--resume", "run", "--epochs", "2", cwd=tmp_path)
    first = (p.stdout + p.stderr).splitlines()[0]
    assert first == f"resuming {tmp_path / 'run'} at epoch 2, step 0/3 (of 2 epochs) on numpy (the backend that wrote it)"


def test_the_readme_names_every_file_a_finished_run_folder_holds(tmp_path):
    fv("train", "--n-sprites", "60", "--hidden", "8", "--latent", "2", "--epochs", "1", "--batch-size", "20",
       "--backend", "numpy", "--out", "run", cwd=tmp_path)
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert sorted(f for f in os.listdir(tmp_path / "run") if f"`{f}`" not in readme) == []


def test_fastvae_test_data_names_the_real_data_folder(tmp_path):
    code = "import conftest; print(conftest.MNIST_DIR)"
    env = dict(os.environ, FASTVAE_TEST_DATA=str(tmp_path / "data"))
    p = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(ROOT, "tests"), capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(tmp_path / "data" / "mnist")
