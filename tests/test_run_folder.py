"""The run folder and signals (issue 12, parts 4 and 5): checked before data
loads, one trainer at a time, never replaced silently, every write atomic,
SIGTERM handled like Ctrl-C."""

import errno
import glob
import os
import signal
import stat
import subprocess
import time

import pytest

import fastvae
from fastvae.training import runfolder
from fastvae.errors import FastVAEError, RunFolderError

from conftest import PY, fv, tiny_trainer

TRAIN = ["train", "--n-sprites", "3000", "--hidden", "64", "--latent", "4", "--batch-size", "16", "--epochs", "50",
         "--no-progress"]


def _start(out, cwd, extra=()):
    return subprocess.Popen(PY + [str(x) for x in TRAIN + ["--out", out, *extra]], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, timeout=60):
    t0 = time.time()
    while not path.exists() and time.time() - t0 < timeout:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def _one_line(r):
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvae: error:"), r.stderr
    return lines[0]


def test_out_is_checked_before_any_data_loads(tmp_path):
    (tmp_path / "afile").write_text("x")
    # a dataset that would fail to load: the --out error must come first
    line = _one_line(fv("train", "--dataset", "mnist", "--data-dir", tmp_path / "nowhere", "--no-download",
                        "--out", tmp_path / "afile" / "run", cwd=tmp_path, check=False))
    assert "is a file, not a folder" in line
    line = _one_line(fv("train", "--out", tmp_path / "afile", cwd=tmp_path, check=False))
    assert "is a file" in line


def test_a_failed_start_leaves_no_empty_run_folder(tmp_path):
    r = fv("train", "--dataset", "mnist", "--data-dir", tmp_path / "nowhere", "--no-download",
           "--out", tmp_path / "run", cwd=tmp_path, check=False)
    assert "not found" in _one_line(r)
    assert not (tmp_path / "run").exists()


def test_second_trainer_on_the_same_folder_fails_at_once_naming_the_first(tmp_path):
    out = tmp_path / "run"
    p = _start(out, tmp_path)
    try:
        _wait_for(out / "metrics.csv")
        t0 = time.time()
        r = fv("train", "--resume", out, "--epochs", "60", "--no-progress", cwd=tmp_path, check=False)
        line = _one_line(r)
        assert time.time() - t0 < 30
        assert f"pid {p.pid}" in line and "in use" in line
        with pytest.raises(RunFolderError, match=f"pid {p.pid}"):
            tiny_trainer(out).fit()
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=120)
    # the lock dies with its process: the folder can be resumed now
    m = fastvae.load(out / "checkpoint.h5")
    fv("train", "--resume", out, "--epochs", m.checkpoint["epoch"] + 1, "--no-progress", cwd=tmp_path)


def test_a_second_thread_training_into_a_held_folder_is_refused(tmp_path):
    """The lock is re-entrant for the thread holding it (the CLI takes it,
    then Trainer.fit takes it again); another thread of the same process
    re-entered it too and trained into the same folder."""
    import threading
    out = str(tmp_path / "run")
    errors = []
    with runfolder.locked(out):
        def other():
            try:
                tiny_trainer(out, epochs=1).fit(pictures=False)
            except RunFolderError as exc:
                errors.append(str(exc))
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and "in use by another thread of this process" in errors[0], errors
        assert not os.path.exists(os.path.join(out, "checkpoint.h5"))
        tiny_trainer(out, epochs=1).fit(pictures=False)          # the holding thread re-enters
    assert os.path.exists(os.path.join(out, "checkpoint.h5"))


def test_a_file_system_without_locks_trains_unlocked_with_a_note(tmp_path, monkeypatch, capsys):
    """flock's ENOLCK (an NFS mount without a lock daemon) was reported as the
    folder being "in use by another process", which no process was."""
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    t = tiny_trainer(tmp_path / "run", epochs=1)
    t.fit(pictures=False)
    assert (tmp_path / "run" / "checkpoint.h5").exists()
    err = capsys.readouterr().err
    assert "cannot lock run folder" in err and "No locks available" in err, err

    def busy(fd, op):
        raise OSError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK))
    monkeypatch.setattr(fcntl, "flock", busy)
    with pytest.raises(RunFolderError, match="is in use by"):
        tiny_trainer(tmp_path / "run2", epochs=1).fit(pictures=False)


def test_sigterm_saves_prints_resume_and_exits_143(tmp_path):
    out = tmp_path / "run"
    p = _start(out, tmp_path)
    _wait_for(out / "metrics.csv")
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, (p.returncode, stderr)
    assert "Traceback" not in stderr and "resume with: fastvae train --resume" in stderr
    m = fastvae.load(out / "checkpoint.h5")
    assert m.checkpoint["step"] > 0


def test_signal_storm_never_damages_the_checkpoint(tmp_path):
    """SIGTERM then SIGINT/SIGTERM again within milliseconds (likely during the
    save): no traceback, a loadable checkpoint, no temporary files. The storm
    starts once the first epoch's checkpoint exists (a second signal before
    any save stops at once, with nothing on disk to damage; waiting a fixed
    time for it failed once on a slow machine)."""
    for i, second in enumerate((signal.SIGTERM, signal.SIGINT, signal.SIGTERM)):
        out = tmp_path / f"run{i}"
        p = _start(out, tmp_path)
        _wait_for(out / "checkpoint.h5")
        time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        time.sleep(0.002 * i)
        p.send_signal(second)
        _, stderr = p.communicate(timeout=120)
        assert p.returncode in (130, 143), (p.returncode, stderr)
        assert "Traceback" not in stderr
        fastvae.load(out / "checkpoint.h5")
        assert glob.glob(str(out / ".tmp-*")) == []


def test_sigterm_outside_training_is_one_line(tmp_path):
    fifo_free = tmp_path / "d"
    fifo_free.mkdir()
    p = subprocess.Popen(PY + ["bench", "--seconds", "30", "--backends", "numpy", "--no-torch"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 143 and "Traceback" not in stderr and "terminated" in stderr, stderr


@pytest.mark.parametrize("target", ["checkpoint.h5", "config.json", "metrics.csv", "samples.png"])
def test_disk_full_while_writing_any_run_file(tmp_path, monkeypatch, target):
    out = tmp_path / "run"
    t = tiny_trainer(out, epochs=1)
    t.fit()
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if (out / f).is_file()}
    real = os.replace

    def full(src, dst, *a, **k):
        if os.path.basename(dst) == target:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *a, **k)
    monkeypatch.setattr(runfolder.os, "replace", full)
    with pytest.raises(FastVAEError, match="No space left on device.*previous file is intact"):
        t.fit(epochs=2)
    monkeypatch.undo()
    assert (out / target).read_bytes() == before[target]
    assert glob.glob(str(out / ".tmp-*")) == []
    fastvae.load(out / "checkpoint.h5")


def test_run_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        tiny_trainer(out, epochs=1).fit()
        for f in ("checkpoint.h5", "config.json", "metrics.csv", "samples.png"):
            assert stat.S_IMODE(os.stat(out / f).st_mode) == 0o644, f
    finally:
        os.umask(old)


def test_temporary_names_are_unique_per_write(tmp_path, monkeypatch):
    seen = []
    real = runfolder.tempfile.mkstemp

    def spy(*a, **k):
        fd, name = real(*a, **k)
        seen.append(name)
        return fd, name
    monkeypatch.setattr(runfolder.tempfile, "mkstemp", spy)
    tiny_trainer(tmp_path / "run", epochs=2).fit()
    assert len(seen) == len(set(seen)) > 4


def test_resuming_into_another_runs_folder_is_refused(tmp_path, monkeypatch, capsys):
    """`--resume A --out B`, B holding another run, replaced B's checkpoint
    without a word; it is refused now (B intact) unless --force. Resuming into
    the run's own folder, or into an empty one, goes on as before."""
    from fastvae.cli import main
    monkeypatch.chdir(tmp_path)
    tiny = ["--n-sprites", "200", "--latent", "2", "--batch-size", "50", "--epochs", "1", "--no-progress"]
    assert main(["train", *tiny, "--hidden", "8", "--out", "a"]) == 0
    assert main(["train", *tiny, "--hidden", "16", "--out", "b"]) == 0
    before = (tmp_path / "b" / "checkpoint.h5").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", "a", "--epochs", "2", "--out", "b", "--no-progress"]) == 2
    assert "holds another run than the one resumed" in capsys.readouterr().err
    assert (tmp_path / "b" / "checkpoint.h5").read_bytes() == before
    assert main(["train", "--resume", "a", "--epochs", "2", "--out", "a", "--no-progress"]) == 0
    assert main(["train", "--resume", "a", "--epochs", "3", "--out", "c", "--no-progress"]) == 0
    assert main(["train", "--resume", "a", "--epochs", "3", "--out", "b", "--no-progress", "--force"]) == 0
    b = fastvae.load("b")                       # with --force: a's model, continued to epoch 3, replaced b's
    assert b.num_params == fastvae.load("a").num_params and b.checkpoint["epoch"] == 3


def test_a_library_resume_is_checked_as_the_command_line_checks_it(tmp_path):
    """Trainer.from_checkpoint wrote into the checkpoint's folder unchecked: a
    copy RUN/epoch1.h5 resumed from Python replaced RUN/checkpoint.h5, the run
    beside it (fastvae train --resume refused that). The resumed file no
    longer counts as a foreign file of its own folder either."""
    from fastvae import Trainer
    t = tiny_trainer(tmp_path / "run", epochs=2)
    t.fit(pictures=False)
    latest = (tmp_path / "run" / "checkpoint.h5").read_bytes()
    copy = t.save(str(tmp_path / "run" / "epoch2.h5"))
    with pytest.raises(RunFolderError, match=r"holds another run than the one resumed .*epoch2.h5\); choose an "
                                             r"empty out, or pass force=True"):
        Trainer.from_checkpoint(copy, epochs=3, dataset=t.data, progress=False)
    assert (tmp_path / "run" / "checkpoint.h5").read_bytes() == latest
    c = Trainer.from_checkpoint(copy, epochs=3, dataset=t.data, progress=False, out=str(tmp_path / "branch"))
    c.fit(pictures=False)
    assert fastvae.load(tmp_path / "branch").checkpoint["epoch"] == 3
    forced = Trainer.from_checkpoint(copy, epochs=3, dataset=t.data, progress=False, force=True)
    assert forced.out == str(tmp_path / "run")


def test_a_trainer_built_on_a_folder_holding_a_run_refuses_it(tmp_path):
    """Trainer(..., out=RUN) then fit() replaced the run in RUN without a
    word (the command line and fastvae.train checked; the class did not)."""
    a = tiny_trainer(tmp_path / "run", epochs=1)
    a.fit(pictures=False)
    before = (tmp_path / "run" / "checkpoint.h5").read_bytes()
    with pytest.raises(RunFolderError, match="already holds a run"):
        tiny_trainer(tmp_path / "run", epochs=1, seed=9)
    assert (tmp_path / "run" / "checkpoint.h5").read_bytes() == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"not from a fastvae run \(todo.txt\)"):
        tiny_trainer(tmp_path / "notes", epochs=1)
    from fastvae import DataConfig, TrainConfig, Trainer
    t = Trainer(a.model_config, TrainConfig(epochs=1, batch_size=16, seed=9), DataConfig(), dataset=a.data,
                out=str(tmp_path / "run"), progress=False, force=True)
    t.fit(pictures=False)
    assert (tmp_path / "run" / "checkpoint.h5").read_bytes() != before


def test_writing_into_a_folder_that_does_not_exist_names_the_folder(tmp_path):
    """`interpolate ... --png typo/x.png` said "No such file or directory; free
    disk space or fix the folder's permissions"; it names the missing folder."""
    from fastvae.training.runfolder import atomic_write
    with pytest.raises(FastVAEError, match=r"cannot write .*x.png: the folder .*typo does not exist; create it"):
        atomic_write(str(tmp_path / "typo" / "x.png"), lambda tmp: open(tmp, "w").close())


def test_runs_started_in_the_same_second_without_out_get_a_folder_each(tmp_path):
    """The default runs/<data>-<date>-<time> named the same folder for two
    runs started in one second: the second stopped ("in use by pid ...",
    or "already holds a run"), told to choose an --out it never chose."""
    import datetime
    now = datetime.datetime.now()
    taken = [(now + datetime.timedelta(seconds=s)).strftime("%Y%m%d-%H%M%S") for s in range(-1, 30)]
    for stamp in taken:                            # every name the run could pick already holds a run
        (tmp_path / "runs" / f"sprites-{stamp}").mkdir(parents=True)
        (tmp_path / "runs" / f"sprites-{stamp}" / "checkpoint.h5").write_bytes(b"x")
    r = fv("train", "--n-sprites", "200", "--hidden", "16", "--latent", "2", "--batch-size", "20", "--epochs", "1",
           "--no-progress", cwd=tmp_path)
    made = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name.endswith("-2"))
    assert len(made) == 1 and made[0][len("sprites-"):-2] in taken, made
    assert (tmp_path / "runs" / made[0] / "checkpoint.h5").stat().st_size > 1000 and made[0] in r.stdout


def test_a_default_folder_taken_meanwhile_by_another_run_is_passed_over(tmp_path, monkeypatch):
    """Two runs that both found the name free: the one that locks it second
    takes the next name (a process holding the lock stands for the first)."""
    base = str(tmp_path / "runs" / "sprites-20260101-000000")
    holder = subprocess.Popen(PY[:-2] + ["-c", "import sys, time; from fastvae.training import runfolder; "
                                         f"runfolder.acquire({base!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(runfolder.os.path, "lexists", lambda p: False)    # both saw the name free
        out = runfolder.claim_new(base)
        assert out == base + "-2" and os.path.isdir(out)
    finally:
        holder.kill()
        holder.wait()
    runfolder.release(out)
    assert not os.path.exists(out)             # nothing written: the claimed folder goes again


def test_a_write_to_a_folder_or_under_a_file_names_the_problem(tmp_path):
    """Trainer.save(FOLDER) said "Is a directory; free disk space", and a
    path under a file said its folder "does not exist; create it first"."""
    t = tiny_trainer(tmp_path / "run", epochs=1)
    t.fit(pictures=False)
    with pytest.raises(FastVAEError, match=r"cannot write .*run: it is a folder; name a file in it"):
        t.save(str(tmp_path / "run"))
    with pytest.raises(FastVAEError, match=r"checkpoint.h5 is a file, not a folder; fix the path"):
        t.save(str(tmp_path / "run" / "checkpoint.h5" / "x.h5"))
    with pytest.raises(RunFolderError, match=r"the folder .*nope does not exist; create it or fix the path"):
        runfolder.atomic_write(str(tmp_path / "nope" / "a.txt"), lambda tmp: open(tmp, "w").write("x"))
    assert fastvae.load(tmp_path / "run").checkpoint["epoch"] == 1        # the run's own file untouched


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_a_lock_file_that_is_not_a_regular_file_is_refused_and_nothing_is_written_through_it(tmp_path, kind):
    """A run folder's `.lock` planted as a symbolic link made fastvae write
    its holder's description through it: `train --resume RUN` truncated the
    file it pointed to (found when a link to /etc/passwd replaced that file
    with one line of JSON). A FIFO took the description too. The lock is
    refused, naming it, unless it is a regular file; the target is untouched."""
    run = tmp_path / "run"
    t = tiny_trainer(run, epochs=1)
    t.fit(pictures=False)
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    lock = run / runfolder.LOCK_NAME
    lock.unlink()
    {"symlink": lambda: lock.symlink_to(target), "fifo": lambda: os.mkfifo(lock),
     "folder": lambda: lock.mkdir()}[kind]()
    with pytest.raises(RunFolderError, match=r"\.lock is a (symbolic link|FIFO|folder), not a regular file; "
                                             r"remove it"):
        fastvae.Trainer.from_checkpoint(run / "checkpoint.h5", dataset=t.data, progress=False,
                                        epochs=2).fit(pictures=False)
    assert target.read_text() == "keep me\n"
    assert not runfolder._HELD                              # no lock left held


def test_a_link_planted_under_a_name_fastvae_writes_is_replaced_not_followed(tmp_path):
    """`fastvae bench --out DIR` opened DIR/<name>.jsonl and .md for writing
    (a link there was followed), and a dataset download wrote `<file>.part`
    by name; both now write a fresh file and rename it over the name."""
    import hashlib
    from fastvae.bench import harness as benchmark
    from fastvae.datasets import download_file
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    out = tmp_path / "bench"
    out.mkdir()
    for ext in (".jsonl", ".md"):
        (out / f"cpu{ext}").symlink_to(target)
    benchmark.save([], str(out), "cpu")
    assert target.read_text() == "keep me\n" and not (out / "cpu.md").is_symlink()
    src = tmp_path / "mirror"
    src.mkdir()
    (src / "f.gz").write_bytes(b"data")
    data = tmp_path / "data"
    data.mkdir()
    (data / "f.gz.part").symlink_to(target)
    download_file("f.gz", hashlib.md5(b"data").hexdigest(), [src.as_uri() + "/"], str(data))
    assert target.read_text() == "keep me\n" and (data / "f.gz").read_bytes() == b"data"
