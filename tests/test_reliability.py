"""Bad input gets one clear line, training survives interruption, no data is lost."""

import gzip
import random
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

import fastvae
from fastvae import (CheckpointError, ConfigError, ModelConfig, TrainConfig, Trainer, TrainingDivergedError,
                     TrainingInterrupted)
from fastvae.datasets import write_idx

from conftest import PY, fv, tiny_trainer, write_mnist_like
TINY = ["--n-sprites", "300", "--hidden", "8", "--latent", "2", "--batch-size", "50", "--no-progress"]


def run(args, cwd, **kw):
    return fv(*args, cwd=cwd, check=False, **kw)


def one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvae: error:"), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def mnist_files(folder, n=40, ntest=10):
    write_mnist_like(folder, n_train=n, n_test=ntest)


def test_bad_data_gets_one_line(tmp_path):
    mn = ["--dataset", "mnist", "--no-download", "--no-progress", "--data-dir"]
    d = tmp_path / "trunc"
    mnist_files(d)
    raw = (d / "train-images-idx3-ubyte.gz").read_bytes()
    (d / "train-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    one_line_error(run(["train", *mn, d], tmp_path), "corrupt or truncated")
    d = tmp_path / "magic"
    mnist_files(d)
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x12\x34\x08\x03" + b"\0" * 64))
    one_line_error(run(["train", *mn, d], tmp_path), "wrong idx magic")
    d = tmp_path / "counts"
    mnist_files(d)
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(39, np.uint8))
    one_line_error(run(["train", *mn, d], tmp_path), "40 images", "39 labels")
    one_line_error(run(["train", *mn, tmp_path / "nowhere"], tmp_path), "not found in")
    np.save(tmp_path / "empty.npy", np.zeros((0, 16), np.uint8))
    one_line_error(run(["train", "--dataset", tmp_path / "empty.npy", "--no-progress"], tmp_path), "expected images")
    np.save(tmp_path / "nan.npy", np.full((20, 16), np.nan, np.float32))
    one_line_error(run(["train", "--dataset", tmp_path / "nan.npy", "--no-progress"], tmp_path), "NaN")
    np.save(tmp_path / "big.npy", np.full((20, 16), 3.0, np.float32))
    one_line_error(run(["train", "--dataset", tmp_path / "big.npy", "--no-progress"], tmp_path),
                   "bernoulli likelihood needs [0, 1]", "--likelihood gaussian")
    assert run(["train", "--dataset", tmp_path / "big.npy", "--likelihood", "gaussian", "--epochs", "1",
                "--batch-size", "8", "--no-progress", "--out", tmp_path / "g"], tmp_path).returncode == 0
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(folder / "b.png")
    one_line_error(run(["train", "--dataset", folder, "--no-progress"], tmp_path), "different sizes", "--image-size")
    (folder / "c.png").write_bytes(b"garbage")
    one_line_error(run(["train", "--dataset", folder, "--image-size", "8", "8", "--no-progress"], tmp_path),
                   "cannot read image")
    (folder / "c.png").unlink()
    (folder / "notes.txt").write_text("x")
    one_line_error(run(["train", "--dataset", folder, "--image-size", "8", "8", "--no-progress"], tmp_path),
                   "not images", "--skip-other-files")


@pytest.mark.parametrize("args,needle", [
    (["--hidden", "0"], "each hidden width must be a positive integer"),
    (["--latent", "-3"], "latent_dim must be a positive integer"),
    (["--likelihood", "poisson"], "unknown likelihood 'poisson'"),
    (["--beta-schedule", "exp"], "unknown beta_schedule 'exp'"),
    (["--lr", "-0.1"], "lr (learning rate)"),
    (["--backend", "gpu"], "unknown backend 'gpu'"),
    (["--epochs", "-1"], "epochs must be"),
    # 1/sigma^2 underflowed to 0 in float64: a ZeroDivisionError traceback; in float32 it overflowed
    (["--likelihood", "gaussian", "--sigma", "1e-200", "--dtype", "float64"], "outside what float64 arithmetic"),
    (["--likelihood", "gaussian", "--sigma", "1e-30", "--backend", "numba"], "outside what float32 arithmetic"),
    # 1/sigma^2 finite, but an error of one pixel unit over 4096 pixels overflowed the nll: a divergence at step 1
    (["--likelihood", "gaussian", "--sigma", "1e-19"], "outside what float32 arithmetic"),
])
def test_bad_config_gets_one_line(tmp_path, args, needle):
    one_line_error(run(["train", *TINY, *args], tmp_path), needle)


def test_bad_checkpoints(tmp_path):
    run(["train", *TINY, "--epochs", "1", "--out", tmp_path / "r"], tmp_path).check_returncode()
    ck = tmp_path / "r" / "checkpoint.h5"
    (tmp_path / "text.h5").write_text("hello")
    one_line_error(run(["eval", tmp_path / "text.h5"], tmp_path), "not a fastvae checkpoint")
    raw = ck.read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 3])
    # into a fresh folder: tmp_path holds other files, which the folder check names first
    one_line_error(run(["train", "--resume", tmp_path / "cut.h5", "--epochs", "2", "--out", tmp_path / "fresh"],
                       tmp_path), "cut.h5")
    from fastvae.io import checkpoint as ckpt
    newer = tmp_path / "newer.h5"
    head = ckpt._parse_header(raw[:ckpt.HEADER_SIZE])
    newer.write_bytes(ckpt._header(99, head[1]) + raw[ckpt.HEADER_SIZE:])
    one_line_error(run(["info", newer], tmp_path), "version 99", "upgrade fastvae")
    # a different architecture or dtype than the model it is loaded into
    other = fastvae.VAE(ModelConfig(input_dim=4096, hidden=[16], latent_dim=2))
    with pytest.raises(CheckpointError, match="layout differs"):
        other.load_checkpoint(ck)
    f64 = fastvae.VAE(ModelConfig(input_dim=4096, hidden=[8], latent_dim=2, dtype="float64"))
    with pytest.raises(CheckpointError, match="float32 parameters but this model is float64"):
        f64.load_checkpoint(ck)
    same = fastvae.VAE(ModelConfig(input_dim=4096, hidden=[8], latent_dim=2))
    same.load_checkpoint(ck)
    np.testing.assert_array_equal(same.get_flat_params(), fastvae.load(ck).get_flat_params())
    # resuming on data of another size
    np.save(tmp_path / "small.npy", np.zeros((30, 8, 8), np.uint8))
    one_line_error(run(["eval", ck, "--dataset", tmp_path / "small.npy"], tmp_path), "64 features", "expects 4096")


def test_out_refuses_foreign_folders(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    one_line_error(run(["train", *TINY, "--epochs", "1", "--out", out], tmp_path), "thesis.tex", "--force")
    assert (out / "thesis.tex").read_text() == "precious"
    assert run(["train", *TINY, "--epochs", "1", "--out", out, "--force"], tmp_path).returncode == 0
    # a folder holding a run is never replaced silently: --resume it or --force
    assert run(["train", *TINY, "--epochs", "1", "--out", tmp_path / "r"], tmp_path).returncode == 0
    before = (tmp_path / "r" / "checkpoint.h5").read_bytes()
    one_line_error(run(["train", *TINY, "--epochs", "1", "--out", tmp_path / "r"], tmp_path),
                   "already holds a run", "--resume", "--force")
    assert (tmp_path / "r" / "checkpoint.h5").read_bytes() == before
    assert run(["train", *TINY, "--epochs", "1", "--out", tmp_path / "r", "--force"], tmp_path).returncode == 0


def test_sigkill_during_saves_never_corrupts_the_checkpoint(tmp_path):
    """Kill a training process at random moments while it saves a checkpoint
    every few milliseconds: the file on disk always loads, and its epoch never
    goes back (it is the old or the new checkpoint)."""
    out = tmp_path / "run"
    args = ["train", "--n-sprites", "120", "--hidden", "4", "--latent", "2", "--batch-size", "100",
            "--epochs", "1000000", "--out", out, "--no-progress"]
    rnd = random.Random(0)
    last_epoch, kills = -1, 0
    for i in range(12):
        a = args if i == 0 else ["train", "--resume", out / "checkpoint.h5", "--epochs", "1000000", "--out", out,
                                 "--no-progress"]
        before = (out / "checkpoint.h5").stat().st_mtime_ns if i else None
        p = subprocess.Popen(PY + [str(x) for x in a], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        t0 = time.time()              # until this process saves (its start-up time is not what is tested)
        while time.time() - t0 < 60 and not ((out / "checkpoint.h5").exists() and
                                             (out / "checkpoint.h5").stat().st_mtime_ns != before):
            time.sleep(0.02)
        time.sleep(rnd.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        m = fastvae.load(out / "checkpoint.h5")              # never raises
        assert np.all(np.isfinite(m.get_flat_params()))
        epoch = m.checkpoint["epoch"]
        assert epoch >= last_epoch
        last_epoch = epoch
    assert kills == 12 and last_epoch > 12


def test_ctrl_c_saves_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen(PY + [str(x) for x in ["train", "--n-sprites", "3000", "--hidden", "64", "--latent", "4",
                                                 "--batch-size", "16", "--epochs", "50", "--out", out,
                                                 "--no-progress"]],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "metrics.csv").exists() and time.time() - t0 < 60:
        time.sleep(0.05)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, stderr)
    assert "interrupted at" in stderr and "resume with: fastvae train --resume" in stderr
    m = fastvae.load(out / "checkpoint.h5")
    assert m.checkpoint["step"] > 0 and m.checkpoint["epoch"] < 50
    r = run(["train", "--resume", out / "checkpoint.h5", "--epochs", str(m.checkpoint["epoch"] + 1), "--out", out,
             "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert fastvae.load(out / "checkpoint.h5").checkpoint["epoch"] == m.checkpoint["epoch"] + 1


_tiny = tiny_trainer


def _interrupt_after(trainer, n_steps):
    real = trainer.model.loss_and_grad
    count = {"n": 0}

    def wrapped(*a, **k):
        count["n"] += 1
        if count["n"] == n_steps:
            trainer.stop_requested = True
        return real(*a, **k)
    trainer.model.loss_and_grad = wrapped


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_mid_epoch_interrupt_resumes_bit_for_bit(tmp_path, backend):
    pytest.importorskip(backend)
    straight = _tiny(tmp_path / "a", backend, binarize=True)
    straight.fit(pictures=False)
    t = _tiny(tmp_path / "b", backend, binarize=True)
    _interrupt_after(t, 31)                     # 23 steps per epoch: stops inside epoch 2
    with pytest.raises(TrainingInterrupted) as ei:
        t.fit(pictures=False)
    assert ei.value.epoch == 1 and ei.value.batch == 8
    r = Trainer.from_checkpoint(tmp_path / "b" / "checkpoint.h5", dataset=straight.data, progress=False)
    assert r.step == 31 and r.position.batch == 8
    r.fit(pictures=False)
    np.testing.assert_array_equal(r.model.get_flat_params(), straight.model.get_flat_params())
    np.testing.assert_array_equal(r.optimizer.v, straight.optimizer.v)
    assert [h["train_neg_elbo"] for h in r.history] == [h["train_neg_elbo"] for h in straight.history]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_resume_at_epoch_boundaries_is_exact(tmp_path, backend):
    pytest.importorskip(backend)
    a = _tiny(tmp_path / "a", backend, epochs=4)
    a.fit(pictures=False)
    b = _tiny(tmp_path / "b", backend, epochs=1)
    b.fit(pictures=False)
    c = Trainer.from_checkpoint(tmp_path / "b" / "checkpoint.h5", epochs=4, dataset=a.data, progress=False)
    c.fit(pictures=False)
    np.testing.assert_array_equal(a.model.get_flat_params(), c.model.get_flat_params())


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    t = _tiny(tmp_path, epochs=1)
    t.fit(pictures=False)
    good = fastvae.load(tmp_path / "checkpoint.h5").get_flat_params()
    t2 = Trainer.from_checkpoint(tmp_path / "checkpoint.h5", epochs=3, dataset=t.data, progress=False)
    real = t2.model.loss_and_grad

    def poisoned(*a, **k):
        r = real(*a, **k)
        t2.model.grads[:] = np.nan
        return r
    t2.model.loss_and_grad = poisoned
    with pytest.raises(TrainingDivergedError,
                       match="last good checkpoint .* is kept; lower lr, add clip_grad_norm=100"):
        t2.fit(pictures=False)
    assert t2.step < t.step + 21                       # caught within one progress interval
    kept = fastvae.load(tmp_path / "checkpoint.h5")
    assert kept.checkpoint["epoch"] == 1
    np.testing.assert_array_equal(kept.get_flat_params(), good)


def test_a_gaussian_run_that_diverges_is_told_to_raise_sigma(tmp_path):
    """At sigma 1e-17 (float32, above the overflow bound of the nll) the
    gradient, 1e34 per unit of error, overflows within a few steps: the error
    names sigma first, then the usual fixes; a Bernoulli run's does not."""
    from fastvae.training.parts import diverged_fixes
    t = fastvae.Trainer(ModelConfig(input_dim=4096, hidden=[16], latent_dim=2, likelihood="gaussian", sigma=1e-17),
                        TrainConfig(epochs=2, batch_size=50), fastvae.DataConfig(n_sprites=300), out=str(tmp_path),
                        progress=False)
    with pytest.raises(TrainingDivergedError, match=r"became inf at step \d+ .* raise sigma \(here 1e-17: the "
                                                    r"gradient grows as 1/sigma\^2\), lower lr"):
        t.fit(pictures=False)
    assert "sigma" not in diverged_fixes(ModelConfig()) and "lower lr" in diverged_fixes(ModelConfig())


def test_a_divergence_between_loss_checks_never_replaces_the_good_checkpoint(tmp_path):
    """The loss is checked every 20 steps; Ctrl-C two steps after the weights
    turned NaN once saved them over the last good checkpoint (12,814 NaN
    parameters on disk). The save refuses non-finite parameters."""
    import os
    t = _tiny(tmp_path, epochs=1)
    t.fit(pictures=False)
    good = fastvae.load(tmp_path / "checkpoint.h5").get_flat_params()
    t2 = Trainer.from_checkpoint(tmp_path / "checkpoint.h5", epochs=3, dataset=t.data, progress=False)
    real, calls = t2.model.loss_and_grad, []

    def poisoned(*a, **k):
        r = real(*a, **k)
        calls.append(1)
        if len(calls) == 3:
            t2.model.grads[:] = np.nan
            os.kill(os.getpid(), signal.SIGINT)          # the trainer's handler: stop after this step, save
        return r
    t2.model.loss_and_grad = poisoned
    with pytest.raises(TrainingDivergedError, match=r"parameters are NaN or infinite .* not saved, so the last "
                                                   r"good checkpoint .*checkpoint.h5 is kept"):
        t2.fit(pictures=False)
    kept = fastvae.load(tmp_path / "checkpoint.h5")
    assert kept.checkpoint["epoch"] == 1
    np.testing.assert_array_equal(kept.get_flat_params(), good)
    with pytest.raises(TrainingDivergedError, match="not saved"):
        t2.save(str(tmp_path / "other.h5"))
    assert not (tmp_path / "other.h5").exists()


def test_an_epoch_whose_test_loss_overflows_is_a_divergence_and_nan_metrics_stay_loadable(tmp_path, capsys):
    """At --lr 10 the first epoch's weights stayed finite (train -ELBO 1.1e13)
    but the test split's KL overflowed (exp(logvar) past float32): the epoch
    was saved with test -ELBO NaN, as the "last good checkpoint", and written
    as JSON's non-standard NaN, which the checkpoint reader refuses: eval,
    info and --resume all failed on it ("'history' is not valid JSON"). Such an
    epoch is a divergence now (nothing saved); and a checkpoint writes a
    non-finite metric as null."""
    from fastvae.cli import main
    out = tmp_path / "r"
    assert main(["train", "--n-sprites", "300", "--epochs", "2", "--lr", "10", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the test -ELBO became nan" in err and "no checkpoint was written yet" in err, err
    assert not (out / "checkpoint.h5").exists()
    t = _tiny(tmp_path / "n", epochs=1)
    t.fit(pictures=False)
    t.history[-1]["test_kl"] = float("inf")
    t.save()
    assert fastvae.load(tmp_path / "n" / "checkpoint.h5").checkpoint["history"][-1]["test_kl"] is None


def test_a_divergence_before_the_first_checkpoint_says_none_was_written(tmp_path, capsys, recwarn):
    from fastvae.cli import main
    assert main(["train", *TINY, "--lr", "1e6", "--epochs", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint was written yet" in err and "last good checkpoint" not in err, err
    # the loss check speaks, not NumPy's overflow warnings (three of them before)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]
    assert not (tmp_path / "r" / "checkpoint.h5").exists()


def test_a_divergence_over_a_replaced_run_does_not_call_its_checkpoint_ours(tmp_path, capsys):
    """`--force` over another run, then a divergence before the first save:
    the error said "the last good checkpoint RUN/checkpoint.h5 is kept", which
    was the replaced run's file (another model), inviting a resume from it.
    It says that file still holds the run it was to replace."""
    from fastvae.cli import main
    out = str(tmp_path / "r")
    assert main(["train", *TINY, "--epochs", "1", "--out", out]) == 0
    before = (tmp_path / "r" / "checkpoint.h5").read_bytes()
    capsys.readouterr()
    assert main(["train", *TINY, "--lr", "1e6", "--epochs", "2", "--out", out, "--force"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint of this run was written yet" in err and "still holds the run it was to replace" in err
    assert "last good checkpoint" not in err, err
    assert (tmp_path / "r" / "checkpoint.h5").read_bytes() == before           # and it is intact
    # (a resumed run's own file: test_divergence_stops_and_keeps_the_last_good_checkpoint)


def test_gradient_clipping_bounds_the_global_norm(tmp_path):
    t = _tiny(None, epochs=1, clip_grad_norm=0.5)
    norms = []
    # a hook after the clipping hook sees the gradient the Adam kernel will use
    t.optimizer.hooks.append(lambda opt: norms.append(float(np.linalg.norm(opt.grads.astype(np.float64)))))
    t.fit(pictures=False)
    assert len(norms) == t.step
    assert max(norms) <= 0.5 * (1 + 1e-5) and max(norms) > 0.49      # clipped, and clipping was active
    u = _tiny(None, epochs=1)
    unclipped = []
    u.optimizer.hooks.append(lambda opt: unclipped.append(float(np.linalg.norm(opt.grads))))
    u.fit(pictures=False)
    assert max(unclipped) > 0.5
    with pytest.raises(ConfigError, match="clip_grad_norm"):
        TrainConfig(clip_grad_norm=0)


def test_every_numeric_option_of_the_exploring_commands_at_zero_and_below(tmp_path, capsys, monkeypatch):
    """eval / plot / interpolate / bench with each numeric option at 0 and -1:
    either it is a valid setting and the command succeeds, or one line names
    the option; never a traceback. The ones that once slipped through are
    named: a negative seed, --iwae-images 0 (all images) and -1 (all but the
    last), plot --n 0, bench --seconds 0, train --n-sprites 0 (the default)."""
    from fastvae.cli import main
    from fastvae.cli.args import parser
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--epochs", "1", "--out", "r"]) == 0
    capsys.readouterr()

    def call(argv):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:              # argparse's own refusals
            rc = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 0 or (rc == 2 and err and err[-1].startswith("fastvae")), (argv, rc, err)
        return rc, err[-1] if err else ""

    base = {"eval": ["r", "--iwae-k", "2"], "plot": ["r", "--out", "figs"],
            "interpolate": ["r", "0", "1", "--png", "m.png"], "bench": ["--workloads", "784-400-20/b128"]}
    subs = [a for a in parser()._actions if a.dest == "cmd"][0].choices
    for cmd, head in base.items():
        for act in subs[cmd]._actions:
            if act.type in (int, float):
                for v in ("0", "-1"):
                    call([cmd, *head, act.option_strings[0], *[v] * (act.nargs if isinstance(act.nargs, int) else 1)])
    for argv, needle in [(["eval", "r", "--seed", "-1"], "seed must be at least 0"),
                         (["eval", "r", "--iwae-k", "2", "--iwae-images", "0"], "--iwae-images must be a positive"),
                         (["eval", "r", "--iwae-k", "2", "--iwae-images", "-1"], "--iwae-images must be a positive"),
                         # the eval flags were named as the library's arguments ("iwae k", "batch_size")
                         (["eval", "r", "--iwae-k", "0"], "--iwae-k must be a positive integer"),
                         (["eval", "r", "--batch-size", "0"], "--batch-size must be a positive integer"),
                         (["plot", "r", "--n", "0"], "--n must be a positive integer"),
                         (["plot", "r", "--dims", "0", "5"], "dims (0, 5) must be two different latent dimensions"),
                         (["bench", "--seconds", "0"], "--seconds must be a finite positive number"),
                         (["train", *TINY, "--n-sprites", "0", "--out", "z"], "n_sprites must be a positive integer")]:
        rc, line = call(argv)
        assert rc == 2 and needle in line, (argv, line)


def test_a_second_signal_inside_a_step_stops_at_its_end(tmp_path):
    """A second Ctrl-C raised KeyboardInterrupt wherever the main thread was:
    inside the NumPy backend's wait for its Adam worker it left the worker
    writing and surfaced as "RuntimeError: cannot release un-acquired lock",
    a traceback (once in a signal storm test). Inside a step it now waits for
    the step's end; outside one it stops at once, and a save is never cut."""
    import os
    import signal as sig
    from fastvae.training.stopping import StopSignals

    class FakeTrainer:
        out, stop_requested, stop_signal = str(tmp_path), False, None

        class checkpointer:
            saving = False
    t = FakeTrainer()
    s = StopSignals(t).install()
    try:
        os.kill(os.getpid(), sig.SIGTERM)                   # the first: a request, no exception
        assert t.stop_requested and t.stop_signal == sig.SIGTERM
        done = []
        with pytest.raises(KeyboardInterrupt):
            with s.hold():
                os.kill(os.getpid(), sig.SIGINT)            # the second, inside a step
                done.append("the step went on")
        assert done == ["the step went on"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig.SIGINT)                # outside a step: at once
            time.sleep(1)
        t.checkpointer.saving = True                        # during a save: nothing is raised
        os.kill(os.getpid(), sig.SIGINT)
        t.checkpointer.saving = False
    finally:
        s.restore()
    assert sig.getsignal(sig.SIGINT) is sig.default_int_handler
