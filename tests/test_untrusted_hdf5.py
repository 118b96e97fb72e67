"""HDF5 files a user hands over are parsed only in a sandboxed child process
(:mod:`fastvae.io.untrusted_hdf5`): a crash, hang or limit there is one error
line in the parent, never a signal; the parent never loads libhdf5 to read
them; crafted files from ../shared/fixtures/hostile are refused cleanly."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import fastvae
from fastvae import CheckpointError, DataError
from fastvae.io import checkpoint as ckpt
from fastvae.io import untrusted_hdf5 as uh
from fastvae.io.safe_files import open_regular

from conftest import PY, tiny_trainer

HOSTILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "hostile")
FIXTURES = sorted(os.path.join(HOSTILE, f) for f in ("segv_attr_1.h5", "segv_attr_2.h5"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run folder (checkpoint.h5 inside)."""
    out = tmp_path_factory.mktemp("run")
    tiny_trainer(out, epochs=1).fit(pictures=False)
    return out


def _sandbox(path, error=CheckpointError, **kw):
    with open_regular(path, "file", "fix it", error) as fh:
        return uh.SandboxedH5(fh, path, error, "fix it", **kw)


# ------------------------------------------------ the hostile fixtures
@pytest.mark.parametrize("name", ["segv_attr_1.h5", "segv_attr_2.h5"])
@pytest.mark.parametrize("command", ["info", "eval"])
def test_fixtures_that_crashed_libhdf5_are_refused_in_one_line(name, command, tmp_path):
    path = os.path.join(HOSTILE, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (the hostile fixtures live in ../shared/fixtures/hostile)")
    r = subprocess.run(PY + [command, path], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)            # 139 (SIGSEGV) before
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvae: error: ") and name in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    with pytest.raises(CheckpointError, match=name):
        fastvae.load(path)


def test_fixtures_crash_libhdf5_when_read_without_the_sandbox():
    """The fixtures still crash h5py as the reader once used it (so the tests
    above test something): read in a throwaway process, it dies by a signal."""
    if not all(os.path.exists(p) for p in FIXTURES):
        pytest.skip(f"the hostile fixtures are absent from {HOSTILE}")
    code = ("import h5py, sys; f = h5py.File(open(sys.argv[1], 'rb'), 'r'); "
            "f.attrs.get('format'); int(f.attrs.get('format_version', -1)); [v for v in f.attrs.values()]")
    codes = [subprocess.run([sys.executable, "-c", code, p], capture_output=True, timeout=120).returncode
             for p in FIXTURES]
    assert any(c == -signal.SIGSEGV for c in codes), codes


# ------------------------------------------------ the parent survives what the child does
def _fake_child(monkeypatch, script):
    monkeypatch.setattr(uh, "_child_command", lambda module, config: [sys.executable, "-c", script])


def test_a_child_killed_by_a_signal_is_one_error_line(run, monkeypatch):
    _fake_child(monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(CheckpointError, match=r"checkpoint.h5: the HDF5 reader crashed \(SIGSEGV\) in its "
                                              r"sandboxed process: refusing the file") as e:
        ckpt.read_checkpoint(run / "checkpoint.h5")
    assert "\n" not in str(e.value)


def test_a_child_that_hangs_is_stopped_at_its_time_limit(run, monkeypatch):
    _fake_child(monkeypatch, "import time; time.sleep(120)")
    monkeypatch.setattr(uh, "BASE_TIMEOUT_S", 1.0)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="took longer than its time limit"):
        ckpt.read_checkpoint(run / "checkpoint.h5")
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("answer", [b"\xff" * 8, b"\x05\x00\x00\x00\x00\x00\x00\x00not j", b"\x01\x00"])
def test_a_garbled_or_short_answer_is_refused(run, monkeypatch, answer):
    _fake_child(monkeypatch, f"import os, sys; sys.stdin.buffer.read(1); os.write(1, {answer!r})")
    with pytest.raises(CheckpointError, match="HDF5 reader (stopped unexpectedly|crashed)"):
        ckpt.read_checkpoint(run / "checkpoint.h5")


def test_a_child_that_cannot_start_is_named(run, monkeypatch):
    monkeypatch.setattr(uh, "_child_command", lambda module, config: ["/nonexistent/python"])
    with pytest.raises(CheckpointError, match="the HDF5 reader process did not start"):
        ckpt.read_checkpoint(run / "checkpoint.h5")


# ------------------------------------------------ the child's confinement
def test_the_child_runs_under_resource_limits_with_only_the_file_inherited(run):
    path = run / "checkpoint.h5"
    with open_regular(path, "file", "fix", CheckpointError) as fh:
        with uh.SandboxedH5(fh, path, CheckpointError, "fix", cpu_s=7) as f:
            limits = f.limits()
            fds = sorted(int(n) for n in os.listdir(f"/proc/{f._proc.pid}/fd"))
            pid = f._proc.pid
            assert fds == sorted({0, 1, 2, fh.fileno()}), fds
            with open(f"/proc/{pid}/environ", "rb") as env:
                assert b"HDF5_PLUGIN_PRELOAD=::" in env.read().split(b"\0")
    assert limits["core"] == 0 and limits["cpu_s"] == 7 and limits["open_files"] == 64
    size = os.path.getsize(path)
    assert limits["address_space"] is not None
    assert limits["address_space"] < 8 * 2 ** 30 + uh.BASE_MEMORY + 2 * size      # imports + allowance, not unlimited


def test_a_streaming_child_that_dies_mid_run_is_a_data_error(tmp_path):
    from fastvae.datasets.streaming import open_streamed
    x = (np.random.default_rng(0).random((2000, 64)) * 255).astype(np.uint8)
    p = tmp_path / "d.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("images", data=x, chunks=(50, 64), compression="gzip")
    train, _ = open_streamed(str(p), 4096, 0.1, seed=0)
    first = train.rows(np.arange(10))
    np.testing.assert_allclose(first, x[np.setdiff1d(np.arange(2000), _held(2000))[:10]] / np.float32(255), rtol=1e-6)
    os.kill(train._reader.f._proc.pid, signal.SIGSEGV)
    with pytest.raises(DataError, match=r"d.h5: the HDF5 reader crashed \(SIGSEGV\)"):
        train.rows(np.arange(10))


def _held(n):
    from fastvae.datasets.arrayfiles import held_out_rows
    return held_out_rows(n, 0.1, 0)


def test_a_streamed_file_rewritten_mid_run_never_crashes_the_process(tmp_path):
    """The file changes on disk while a run streams it: rows read after that
    are the old file's (the child holds the file it vetted), a DataError, or
    the new bytes' rows, never a crash of the trainer's process."""
    from fastvae.datasets.streaming import open_streamed
    x = (np.random.default_rng(1).random((2000, 64)) * 255).astype(np.uint8)
    p = tmp_path / "d.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("images", data=x, chunks=(50, 64), compression="gzip")
    train, _ = open_streamed(str(p), 4096, 0.1, seed=0)
    train.rows(np.arange(5))
    raw = bytearray(p.read_bytes())
    rng = np.random.default_rng(2)
    for _ in range(3):                                    # in place: the same inode the child holds
        for pos in rng.integers(0, len(raw), 200):
            raw[pos] = int(rng.integers(0, 256))
        with open(p, "r+b") as fh:
            fh.write(raw)
        try:
            out = train.rows(np.arange(len(train)))
            assert out.shape == (len(train), 64) and np.isfinite(out).all()
        except DataError as exc:
            assert "\n" not in str(exc)


# ------------------------------------------------ the parent never parses
@pytest.mark.parametrize("what", ["checkpoint", "data"])
def test_the_fastvae_process_never_loads_libhdf5_to_read_a_users_file(run, tmp_path, what):
    p = tmp_path / "d.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("images", data=np.zeros((30, 16, 16), np.uint8))
    code = {"checkpoint": f"m = fastvae.load({str(run / 'checkpoint.h5')!r}); assert m.num_params > 0",
            "data": f"d = fastvae.datasets.load(fastvae.DataConfig(dataset={str(p)!r})); assert len(d.x_train)"}[what]
    r = subprocess.run([sys.executable, "-c", f"import sys, fastvae\n{code}\n"
                        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'h5py'))"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_structural_checks_still_refuse_links_and_filters(tmp_path):
    p = tmp_path / "d.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("real", data=np.zeros((4, 4), np.float32), compression="gzip")
        f["soft"] = h5py.SoftLink("/real")
        f["ext"] = h5py.ExternalLink("/etc/passwd", "/x")
    with _sandbox(p) as s:
        assert s.members("/") == {"real": "dataset", "soft": "soft link", "ext": "link to another file"}
        with pytest.raises(CheckpointError, match="'soft' is a soft link"):
            s.read("soft")
        with pytest.raises(CheckpointError, match="'ext' is a link to another file"):
            s.read("ext")
        with pytest.raises(CheckpointError, match="'real' uses an HDF5 filter"):
            s.read("real")
    with _sandbox(p, DataError, compressed_ok=True, max_compression=256) as s:
        np.testing.assert_array_equal(s.read("real"), np.zeros((4, 4), np.float32))
        np.testing.assert_array_equal(s.read("real", rows=[1, 3]), np.zeros((2, 4), np.float32))
        with pytest.raises(DataError, match="not increasing indices"):
            s.read("real", rows=[3, 1])


def test_attribute_text_that_is_not_utf8_prints(run, tmp_path):
    """A mutated attribute held invalid UTF-8, which h5py returns as lone
    surrogates; printed by `fastvae info` to a UTF-8 stdout that was a
    UnicodeEncodeError. The child hands text back as valid Unicode."""
    p = tmp_path / "checkpoint.h5"
    p.write_bytes((run / "checkpoint.h5").read_bytes())
    with h5py.File(p, "r+") as f:
        f.attrs.create("backend", b"nu\xff\xff", dtype=h5py.string_dtype("utf-8"))
    from test_hostile_checkpoints import seal
    seal(p)
    assert fastvae.load(p).checkpoint["meta"]["backend"] == "nu\ufffd\ufffd"
    r = subprocess.run(PY + ["info", str(p)], capture_output=True, timeout=120, cwd=tmp_path,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert r.returncode == 0 and "Traceback" not in r.stderr.decode(), r.stderr.decode()
