"""The command line end to end, in subprocesses, on tiny runs."""

import csv
import json
import os

import numpy as np
import pytest

import fastvae

from conftest import fv

TINY = ["--n-sprites", "400", "--hidden", "32", "--latent", "4", "--batch-size", "64", "--no-progress"]


def test_train_resume_eval_info(tmp_path):
    run = tmp_path / "RUN"
    fv("train", *TINY, "--epochs", "2", "--out", run, cwd=tmp_path)
    for f in ("checkpoint.h5", "config.json", "metrics.csv", "reconstructions.png", "samples.png", "loss.png"):
        assert (run / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for key in ("train_neg_elbo", "train_recon", "train_kl", "beta", "test_neg_elbo", "images_per_s", "seconds"):
        assert float(rows[-1][key]) > 0, key
    assert float(rows[-1]["train_neg_elbo"]) == pytest.approx(
        float(rows[-1]["train_recon"]) + float(rows[-1]["train_kl"]))
    cfg = json.load(open(run / "config.json"))
    assert cfg["model"]["latent_dim"] == 4 and cfg["data"]["dataset"] == "sprites"

    p = fv("train", "--resume", run / "checkpoint.h5", "--epochs", "3", "--out", run, "--no-progress", cwd=tmp_path)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]

    p = fv("eval", run / "checkpoint.h5", "--split", "test", "--json", cwd=tmp_path)
    res = json.loads(p.stdout)
    assert res["n"] == 40
    assert res["neg_elbo"] == pytest.approx(res["recon"] + res["kl"])
    assert res["kl"] > 0 and res["recon"] > 0
    # the same seed gives the same estimate; the test -ELBO in metrics used seed 0 too
    assert res["neg_elbo"] == pytest.approx(float(rows[-1]["test_neg_elbo"]), rel=1e-6)

    p = fv("info", run / "checkpoint.h5", cwd=tmp_path)
    assert "4096-32(relu)-8-z4-32(relu)-4096" in p.stdout and "epoch 3" in p.stdout and "encoder.mu.W" in p.stdout
    # how it was trained (info named neither the objective nor the batch, lr or seed)
    assert "settings: elbo (beta 1.0, constant), batch 64, lr 0.001 (constant), seed 0" in p.stdout, p.stdout
    info = json.loads(fv("info", run / "checkpoint.h5", "--json", cwd=tmp_path).stdout)
    assert info["format"] == "fastvae-checkpoint" and info["epoch"] == 3


@pytest.mark.parametrize("args,message", [
    (["train", "--lr", "-1"], "lr (learning rate) must be a finite positive number"),
    (["train", "--activation", "swish"], "unknown activation 'swish'"),
    (["train", "--backend", "tpu"], "unknown backend 'tpu'"),
    (["train", "--dataset", "/no/such/folder"], "no such file or folder"),
    (["train", "--dataset", "mnist", "--data-dir", "EMPTY", "--no-download"], "not found in"),
    (["train", "--dataset", "x.npy", "--data-dir", "EMPTY"], "x.npy does not read it: drop it, or give the data's"),
    (["train", "--data-dir", "EMPTY"], "--data-dir is where a built-in dataset's files are (mnist, fashion-mnist"),
    (["train", "--batch-size", "100000", "--n-sprites", "100"], "larger than the 90 training images"),
    (["eval", "missing.h5"], "does not exist"),
    (["train", "--resume", "missing.h5", "--hidden", "8"], "cannot change --hidden when resuming"),
    (["train", "--cuda-graph"], "cuda_graph applies to the cupy backend only"),
    (["train", "--blas", "mkl", "--backend", "cupy"], "blas applies to the CPU backends only"),
    (["bench", "--blas", "mkl", "--workloads", "784-1000-2/b32"], "libmkl_rt.so does not load as a CBLAS library"),
    # it timed every contender for minutes first (one failure per row)
    (["bench", "--dtype", "float16", "--workloads", "784-1000-2/b32"], "unknown --dtype 'float16'; choose one of"),
    # timed the CPU without a word about the option it ignored
    (["bench", "--tf32", "--workloads", "784-1000-2/b32"], "--tf32 does something only with --gpu"),
    (["bench", "--gpu", "--blas", "numpy", "--workloads", "784-1000-2/b32"], "--blas does something only without --gpu"),
    # wrote beside --out, or failed after the timing with "No such file or directory"
    (["bench", "--name", "../x", "--out", "EMPTY", "--workloads", "784-1000-2/b32"], "--name '../x' is a file name"),
    (["bench", "--name", "a/b", "--out", "EMPTY", "--workloads", "784-1000-2/b32"], "--name 'a/b' is a file name"),
])
def test_bad_input_gives_one_line_error(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "libmkl_rt.so").write_text("not a library")
    env = dict(os.environ, FASTVAE_MKL_LIB=str(tmp_path / "libmkl_rt.so"))
    extra = {"train": ["--no-progress"], "bench": []}.get(args[0], ["--json"])
    p = fv(*args, *extra, cwd=tmp_path, check=False, env=env)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvae: error:"), p.stderr
    assert message in lines[0]


def test_backends_listing(tmp_path):
    p = fv("backends", cwd=tmp_path)
    lines = p.stdout.strip().splitlines()
    from fastvae.naming import command_line
    with command_line():                                  # the reasons as the command line spells them
        want = fastvae.backends.available()
    from fastvae.backends.cpu.gemm_library import libraries
    libs = libraries()
    lines, lib_lines = lines[:len(want)], lines[len(want):]
    assert [ln.split()[:2] for ln in lib_lines] == [["--blas", lib["name"]] for lib in libs]
    assert lib_lines[0].startswith("--blas numpy  available: numpy ")              # NumPy's BLAS always loads
    assert [ln.split()[0] for ln in lines] == [b["name"] for b in want]
    for ln, b in zip(lines, want):
        status = ln.split(None, 1)[1]
        assert status == ("available" if b["available"] else "unavailable: " + b["reason"]), ln
    assert lines[0].split(None, 1)[1] == "available"                  # numpy always runs


def test_blas_auto_is_measured_logged_and_cached_and_resume_may_change_it(tmp_path):
    env = dict(os.environ, FASTVAE_CACHE_DIR=str(tmp_path / "cache"))
    run = tmp_path / "RUN"
    p = fv("train", *TINY, "--epochs", "1", "--blas", "auto", "--out", run, cwd=tmp_path, env=env)
    from fastvae.backends.cpu.gemm_library import available
    if len(available()) > 1:                 # measured: each library's ms in the note
        assert "; blas auto: numpy (numpy: " in p.stdout or "; blas auto: mkl (numpy: " in p.stdout, p.stdout
    else:                                    # NumPy's BLAS alone: nothing to measure
        assert "; blas auto: numpy (numpy)" in p.stdout, p.stdout
    assert json.load(open(run / "config.json"))["run"]["blas"] == "auto"
    p = fv("train", *TINY, "--epochs", "1", "--blas", "auto", "--out", tmp_path / "RUN2", cwd=tmp_path, env=env)
    assert "(cached in " in p.stdout, p.stdout
    fv("train", "--resume", run, "--epochs", "2", "--blas", "numpy", "--no-progress", cwd=tmp_path, env=env)
    assert json.load(open(run / "config.json"))["run"]["blas"] == "numpy"


def test_every_schedule_setting_has_a_flag(tmp_path, monkeypatch):
    """--lr-step-epochs, --lr-gamma, --lr-min and --beta-ratio reach the run's
    config (the step, cosine and cyclical schedules could not be shaped from
    the command line), and every TrainConfig field that shapes a run has a
    flag; they are fixed on --resume like the other training settings."""
    import dataclasses
    from fastvae.cli import main
    from fastvae.cli.args import FIELD_OF_FLAG, TRAIN_ARGS
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--epochs", "3", "--out", "r", "--lr-schedule", "step", "--lr-step-epochs", "1",
                 "--lr-gamma", "0.1", "--beta-schedule", "cyclical", "--beta-ratio", "0.25"]) == 0
    train = json.load(open("r/config.json"))["train"]
    assert (train["lr_step_epochs"], train["lr_gamma"], train["beta_ratio"]) == (1, 0.1, 0.25)
    assert main(["train", *TINY, "--epochs", "1", "--out", "r2", "--lr-schedule", "cosine", "--lr-min", "1e-5"]) == 0
    assert json.load(open("r2/config.json"))["train"]["lr_min"] == 1e-5
    lrs = [float(r["lr"]) for r in csv.DictReader(open("r/metrics.csv"))]
    assert lrs == pytest.approx([1e-3, 1e-4, 1e-5], rel=1e-12)
    assert main(["train", "--resume", "r", "--epochs", "4", "--lr-gamma", "0.5"]) == 2
    flags = {FIELD_OF_FLAG.get(n, n) for n in TRAIN_ARGS} | {"epochs", "backend", "threads", "blas"}
    fields = {f.name for f in dataclasses.fields(fastvae.TrainConfig)}
    assert fields - flags <= {"betas", "adam_eps"}, fields - flags          # Adam's own constants: library only


def test_eval_of_an_mse_run_does_not_call_its_numbers_nats(tmp_path, monkeypatch, capsys):
    """--likelihood mse sums squared errors, not a log-density: eval printed
    its -ELBO and IWAE as "nats per image"."""
    from fastvae.cli import main
    monkeypatch.chdir(tmp_path)
    for lik in ("mse", "bernoulli"):
        assert main(["train", *TINY, "--epochs", "1", "--likelihood", lik, "--out", lik]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 1/1")][0]
        assert ("nats per image" in line) == (lik == "bernoulli") and "per image" in line, line  # was "nats/image"
        assert main(["eval", lik, "--json"]) == 0
        units = json.loads(capsys.readouterr().out)["units"]
        assert (units == "nats per image") == (lik == "bernoulli"), units
        assert main(["eval", lik, "--iwae-k", "2", "--no-progress"]) == 0
        text = capsys.readouterr().out
        assert ("nats per image" in text) == (lik == "bernoulli") and text.count(units) == 2, text
        iwae_line = "IWAE -log p(x), k=2" if lik == "bernoulli" else "IWAE bound (mse: no density), k=2"
        assert iwae_line in text and text.count("-log p(x)") == (lik == "bernoulli"), text   # mse has no p(x)


def test_a_run_folder_holding_plot_figures_still_resumes(tmp_path, monkeypatch, capsys):
    """`fastvae plot RUN --out RUN` put its figures beside the checkpoint, and
    `fastvae train --resume RUN` then refused the folder as holding "files
    that are not from a fastvae run"."""
    from fastvae.cli import main
    from fastvae.training.runfolder import PLOT_FILES
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--epochs", "1", "--out", "r"]) == 0
    assert main(["plot", "r", "--out", "r"]) == 0
    written = capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1].split(", ")
    assert set(written) == PLOT_FILES                            # every figure plot writes is known as a run file
    assert main(["train", "--resume", "r", "--epochs", "2"]) == 0
    assert fastvae.load("r").checkpoint["epoch"] == 2
    capsys.readouterr()
    assert main(["plot", "r", "--out", "r/checkpoint.h5"]) == 2        # was "File exists (...)": name the problem
    assert "--out r/checkpoint.h5 is a file" in capsys.readouterr().err


def test_a_closed_output_pipe_ends_quietly(tmp_path):
    """`fastvae backends | head -0`: the reader is gone before fastvae writes;
    it printed "Broken pipe (BrokenPipeError); check the paths, permissions
    and free disk space" and exited 2. Now it stops quietly with SIGPIPE's 141."""
    import subprocess
    from conftest import PY
    p = subprocess.Popen(PY + ["backends"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                                   # before the interpreter has started: the first print fails
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


def test_data_that_changed_since_training_is_noted_on_eval_and_resume(tmp_path):
    """A run on an .npy of 50 images split 45/5 at random; 20 images added
    later: `fastvae eval RUN` drew the split again from 70 rows and scored a
    "test" split holding images the model trained on, silently, and a resume
    trained on former test images. The checkpoint records the split sizes
    now and both say so; unchanged data, or another --dataset, says nothing."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.random((50, 8, 8)).astype(np.float32))
    fv("train", "--dataset", "x.npy", "--hidden", "4", "--latent", "2", "--epochs", "1", "--batch-size", "9",
       "--no-progress", "--out", "run", cwd=tmp_path)
    assert fastvae.load(tmp_path / "run").checkpoint["data_rows"] == [45, 5]
    info = fv("info", "run", cwd=tmp_path).stdout
    assert "dataset " + str(tmp_path / "x.npy") + " (45 training, 5 test images)" in info
    same = fv("eval", "run", cwd=tmp_path)
    assert "changed" not in same.stderr
    np.save(tmp_path / "x.npy", rng.random((70, 8, 8)).astype(np.float32))
    note = ("the data has changed since this run was trained: 45 training and 5 test images then, 63 and 7 now; "
            "a random test split is drawn again")
    assert note in fv("eval", "run", cwd=tmp_path).stderr
    resumed = fv("train", "--resume", "run/checkpoint.h5", "--epochs", "2", "--out", "run", "--no-progress",
                 cwd=tmp_path)
    assert note in resumed.stderr
    np.save(tmp_path / "other.npy", rng.random((30, 8, 8)).astype(np.float32))
    assert "changed" not in fv("eval", "run", "--dataset", "other.npy", cwd=tmp_path).stderr


def test_bench_help_lists_every_workload(tmp_path):
    """`fastvae bench --help` named four workloads from a list of its own;
    the ConvNet's, timed by default, was missing. It reads the table now."""
    from fastvae.bench.harness import WORKLOADS
    text = " ".join(fv("bench", "--help", cwd=tmp_path).stdout.split())
    assert "default: all of " + ", ".join(WORKLOADS) in text and "conv28-20/b128" in WORKLOADS


def test_resuming_a_run_already_at_its_epochs_is_refused_before_writing(tmp_path):
    """`train --resume RUN --epochs 1` on a 2-epoch run printed "already at
    epoch 2", exited 0 and rewrote the folder (config.json saying epochs 1,
    pictures redrawn). It is an error now, and nothing in RUN changes."""
    fv("train", "--n-sprites", "100", "--hidden", "4", "--latent", "2", "--batch-size", "10", "--epochs", "2",
       "--no-progress", "--out", "run", cwd=tmp_path)
    files = lambda: {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != ".lock"}  # who ran
    before = files()
    for extra in (["--epochs", "1"], ["--epochs", "2"], []):
        r = fv("train", "--resume", "run", *extra, "--no-progress", cwd=tmp_path, check=False)
        assert r.returncode == 2 and "already at epoch 2; pass --epochs N with N > 2" in r.stderr, r.stderr
    assert files() == before and len(before) >= 6


def test_bench_out_is_checked_before_the_timing(tmp_path, monkeypatch, capsys):
    """`fastvae bench --out FILE` timed every workload (minutes; on a lent GPU
    its budget) and then failed with "File exists". --out is checked first."""
    from fastvae.bench import harness as benchmark
    from fastvae.cli import main
    monkeypatch.setattr(benchmark, "run", lambda *a, **k: pytest.fail("timed before --out was checked"))
    (tmp_path / "file").write_text("x")
    assert main(["bench", "--workloads", "784-400-20/b128", "--backends", "numpy", "--no-torch",
                 "--out", str(tmp_path / "file")]) == 2
    assert "--out " + str(tmp_path / "file") + " is a file; bench writes <name>.jsonl and .md into a folder" in \
        capsys.readouterr().err


def test_printed_commands_paste_into_a_shell_when_paths_have_spaces_and_quotes(tmp_path):
    """"resume with: ..." and the refusal of a used --out printed paths bare:
    pasted into a shell, a folder named "it's a run" broke the command."""
    import shlex
    run = tmp_path / "it's a run"
    out = fv("train", *TINY, "--epochs", "1", "--out", run, cwd=tmp_path).stdout
    line = next(x for x in out.splitlines() if x.startswith("resume with: "))
    argv = shlex.split(line[len("resume with: "):])
    assert argv[:3] == ["fastvae", "train", "--resume"] and argv[3] == str(run / "checkpoint.h5")
    argv[argv.index("--epochs") + 1] = "2"
    fv(*argv[1:], cwd=tmp_path)
    assert fastvae.load(run).checkpoint["epoch"] == 2
    err = fv("train", *TINY, "--epochs", "1", "--out", run, cwd=tmp_path, check=False).stderr
    suggested = shlex.split(err.split("continue it with ")[1].split(", choose")[0])
    assert suggested == ["fastvae", "train", "--resume", str(run / "checkpoint.h5")]


def test_eval_of_a_dataset_with_its_own_test_files_notes_no_change(tmp_path):
    """`fastvae eval` of an MNIST run reads the test files alone; the note on
    changed data then compared the recorded 50 training images with the 0
    loaded and told every MNIST evaluation that its data had changed."""
    from conftest import write_mnist_like
    write_mnist_like(tmp_path / "m", n_train=50, n_test=20)
    fv("train", "--dataset", "mnist", "--data-dir", "m", "--no-download", "--hidden", "4", "--latent", "2",
       "--epochs", "1", "--batch-size", "10", "--no-progress", "--out", "run", cwd=tmp_path)
    assert fastvae.load(tmp_path / "run").checkpoint["data_rows"] == [50, 20]
    r = fv("eval", "run", "--json", cwd=tmp_path)
    assert json.loads(r.stdout)["n"] == 20 and "note" not in r.stderr, r.stderr
    for cmd in (["plot", "run"], ["interpolate", "run", "0", "1", "--png", "i.png"]):
        assert "note" not in fv(*cmd, cwd=tmp_path).stderr


def test_eval_reproduces_the_recorded_test_elbo_of_a_run_with_another_seed(tmp_path):
    """The per-epoch test -ELBO draws its z samples from the run's --seed;
    `fastvae eval RUN` drew them from seed 0, so a --seed 3 run's checkpoint
    scored 2517.4 where its metrics said 2508.8. The run's seed is the default."""
    fv("train", *TINY, "--epochs", "1", "--seed", "3", "--out", "run", cwd=tmp_path)
    recorded = fastvae.load(tmp_path / "run").checkpoint["history"][-1]["test_neg_elbo"]
    res = json.loads(fv("eval", "run", "--json", cwd=tmp_path).stdout)
    assert res["neg_elbo"] == pytest.approx(recorded, rel=1e-9)
    other = json.loads(fv("eval", "run", "--json", "--seed", "0", cwd=tmp_path).stdout)
    assert other["neg_elbo"] != pytest.approx(recorded, rel=1e-6) and other["kl"] == pytest.approx(res["kl"])


def test_plot_scores_the_images_with_the_runs_seed_as_eval_does(tmp_path, monkeypatch):
    """The loss histogram and best/worst of `plot` drew z from seed 0: their
    mean was not the run's recorded test -ELBO for a run of another --seed."""
    from fastvae import explore
    from fastvae.cli import main
    fv("train", *TINY, "--epochs", "1", "--seed", "3", "--out", "run", cwd=tmp_path)
    recorded = fastvae.load(tmp_path / "run").checkpoint["history"][-1]["test_neg_elbo"]
    seen = []
    real = explore.per_image_elbo

    def spy(model, X, *args, **kw):
        recon, kl = real(model, X, *args, **kw)
        seen.append(float((recon + kl).mean()))
        return recon, kl
    monkeypatch.setattr(explore, "per_image_elbo", spy)
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "run"]) == 0
    assert seen and seen[0] == pytest.approx(recorded, rel=1e-9)


def test_eval_of_a_one_latent_run_gives_no_mig(tmp_path, monkeypatch, capsys):
    """A latent_dim 1 sprites run printed "MIG 0.640" after one epoch: with
    no second latent, the score was the binned MI's bias (random codes of 30
    images score 0.66). MIG needs two latents; eval says so (JSON: null)."""
    from fastvae.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--epochs", "1", "--latent", "1", "--out", "one"]) == 0
    capsys.readouterr()
    assert main(["eval", "one"]) == 0
    said = capsys.readouterr().out
    assert "MIG (Chen et al. 2018): none, the gap between two latents needs latent_dim 2 or more" in said, said
    assert main(["eval", "one", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mig"] is None


def test_bench_keeps_each_workload_it_finished_when_cut_short(tmp_path, monkeypatch):
    """`fastvae bench --out` wrote its files once every workload was timed: a
    run stopped by a time limit (a lent GPU's command is killed at 10
    minutes) or Ctrl-C left nothing. The rows of each finished workload are
    saved as it ends now."""
    import json
    from fastvae.bench import harness as benchmark
    from fastvae.cli import main
    from fastvae.bench.timing import CoreProbe
    real = benchmark._ours

    def ours(name, wl, *args, **kw):
        if wl["hidden"] == [8]:
            raise KeyboardInterrupt                           # the second workload never finishes
        return real(name, wl, *args, **kw)
    monkeypatch.setattr(benchmark, "_ours", ours)
    # every chunk clean: a workload timed while the host held a core is re-queued behind the next one
    monkeypatch.setattr(benchmark, "CoreProbe", lambda: CoreProbe(lambda: 2.0, floor=0.0))
    from fastvae.cli import EXIT_INTERRUPTED
    assert main(["bench", "--workloads", "40-12-3/b8", "40-8-3/b8", "--backends", "numpy", "--no-torch", "--blas",
                 "numpy", "--seconds", "0.05", "--out", str(tmp_path / "o")]) == EXIT_INTERRUPTED
    rows = [json.loads(line) for line in open(tmp_path / "o" / "cpu.jsonl")]
    assert [(r["workload"], r["backend"]) for r in rows] == [("40-12-3/b8", "numpy")]
    assert rows[0]["ms_per_step"] > 0 and "40-12-3/b8" in (tmp_path / "o" / "cpu.md").read_text()


def test_bench_times_a_workload_written_as_a_name(tmp_path):
    """`fastvae bench` timed five fixed workloads and refused any other
    ("unknown workload(s)"): a model of your own could not be compared with
    PyTorch. An MLP ``D-H-...-L/bB`` or a ConvNet ``convS-L/bB`` is built
    from its name now; a name it cannot read or a model that cannot be built
    or would not fit is refused before anything is timed."""
    import json
    from fastvae.bench.workloads import workload
    fv("bench", "--workloads", "100-24-12-5/b16", "conv16-4/b8", "100-24-12-5/b16", "--backends", "numpy",
       "--no-torch", "--blas", "numpy", "--seconds", "0.1", "--out", "o", cwd=tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "cpu.jsonl")]
    got = [(r["workload"], r["backend"]) for r in rows if r.get("ms_per_step")]
    assert got == [("100-24-12-5/b16", "numpy"), ("conv16-4/b8", "numpy")], rows     # a name given twice: once
    assert workload("100-24-12-5/b16")["hidden"] == [24, 12] and workload("conv16-4/b8")["image_shape"] == (16, 16)
    for name, why in [("nonsense", "write your own as D-H-...-L/bB"), ("784-0-20/b8", "hidden width"),
                      ("conv30-10/b4", "got 30x30"), ("784-400-20/b0", "at least 1"),
                      ("200000-200000-10/b100000", "free; make the layers or the batch (/bB) smaller")]:
        r = fv("bench", "--workloads", name, "--no-torch", cwd=tmp_path, check=False)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
