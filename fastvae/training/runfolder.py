"""The run folder: checked before any data loads, locked by one trainer,
never silently overwritten, and written only by atomic replacement.

* :func:`check_out` refuses a folder that cannot be created or written, a
  name under a file, a folder of foreign files, and a folder that already
  holds a run (unless resuming it, or ``--force``).
* :func:`locked` holds an exclusive ``fcntl.flock`` on ``<out>/.lock`` for as
  long as a trainer writes there; the OS frees it when the process dies, so a
  crash never leaves a stale lock. A second trainer fails at once, naming the
  process that holds it (recorded in the lock file).
* :func:`atomic_write` writes every run file (checkpoint, config, metrics,
  pictures) to a unique temporary name in the same folder, fsyncs it and
  renames it over the target: ENOSPC or any OS error leaves the previous file
  intact and no temporary file behind, and the result has the usual
  permissions (``0666 & ~umask``), like any other file the user creates.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import stat
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, Optional

from fastvae.errors import ConfigError, RunFolderError
from fastvae.naming import on_command_line, option

CHECKPOINT_NAME = "checkpoint.h5"
# what `fastvae plot` writes, here too when its --out is the run folder itself
PLOT_FILES = {"reconstructions.png", "samples.png", "latent_map.png", "latent_grid.png", "traversals.png",
              "best_worst.png", "loss_histogram.png", "kl_per_dim.png", "loss_curves.png", "interpolation.png",
              "interpolation.gif", "inpainting.png"}
RUN_FILES = {CHECKPOINT_NAME, "config.json", "metrics.csv", "reconstructions.png", "samples.png", "loss.png",
             "figures", ".lock"} | PLOT_FILES
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def holds_run(folder: str) -> bool:
    """Whether ``folder`` is a fastvae run folder (its checkpoint or lock file)."""
    return any(os.path.exists(os.path.join(folder, n)) for n in (CHECKPOINT_NAME, LOCK_NAME))


def checkpoint_path(path) -> str:
    """A checkpoint argument (str or path-like, ``~`` expanded): a checkpoint
    file, or the run folder holding one (then ``<folder>/checkpoint.h5``).
    ConfigError for anything else (None, a number)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"a checkpoint is given as its path or its run folder's (a str or path), not {path!r:.60}")
    path = os.path.expanduser(os.fspath(path))
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


class CheckedFolder(str):
    """The absolute path of a run folder that :func:`check_out` checked (or
    :func:`claim_new` created): the one token that says so. A Trainer given
    one uses it as it is; given a plain path it checks it itself."""


def check_out(out: str, *, resume=False, force: bool = False) -> CheckedFolder:
    """Validate ``out`` before anything is loaded; returns its absolute path
    as a :class:`CheckedFolder`.

    Raises RunFolderError when ``out`` (or a folder on the way) is a file,
    when it cannot be created or written, when it holds files that are not
    from a fastvae run (unless ``force``), and when it holds a run and this
    is a fresh start (``resume`` False) or resumes another checkpoint
    (``resume``: the resumed checkpoint's path) without ``force``.
    """
    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    probe = out
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise RunFolderError(f"{option('out', out)}: {probe} is a file, not a folder; choose another {option('out')}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunFolderError(f"{option('out', out)}: cannot write in {probe} (permission denied); choose a writable "
                             "folder")
    if probe != out:
        return CheckedFolder(out)                       # will be created
    names = os.listdir(out)
    resumed = isinstance(resume, (str, os.PathLike))
    other = sorted(f for f in names if f not in RUN_FILES and not f.startswith(TMP_PREFIX)
                   and not (resumed and _same_file(os.path.join(out, f), resume)))   # the resumed file itself
    if other and not force:
        raise RunFolderError(f"{option('out', out)} holds files that are not from a fastvae run "
                             f"({', '.join(other[:3])}{' ...' if len(other) > 3 else ''}); choose another folder or "
                             f"pass {option('force', True)}")
    here = os.path.join(out, CHECKPOINT_NAME)
    if CHECKPOINT_NAME in names and not resume and not force:
        resume_it = (f"fastvae train --resume {shlex.quote(here)}" if on_command_line()
                     else f"Trainer.from_checkpoint({here!r})")
        raise RunFolderError(f"{option('out', out)} already holds a run; continue it with {resume_it}, choose another "
                             f"{option('out')}, or pass {option('force', True)} to replace it")
    if CHECKPOINT_NAME in names and resumed and not force and not _same_file(here, resume):
        hint = (f"leave out {option('out')} to continue in the resumed run's folder, "
                if os.path.dirname(os.path.abspath(resume)) != out else "")
        raise RunFolderError(f"{option('out', out)} holds another run than the one resumed ({os.fspath(resume)}); "
                             f"{hint}choose an empty {option('out')}, or pass {option('force', True)} to replace "
                             "that run")
    return CheckedFolder(out)


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class _Lock:
    def __init__(self, out: str, fd: int, created: bool):
        self.out, self.fd, self.created, self.depth = out, fd, created, 1
        self.thread = threading.get_ident()     # re-entered by this thread only


_HELD: Dict[str, _Lock] = {}
_HELD_GUARD = threading.Lock()                  # threads of one process share _HELD
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)    # flock's "held by another" answers


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8", "replace") or "{}")
        return (f"pid {int(info['pid'])} on {str(info.get('host'))[:64]}, started "
                f"{str(info.get('started'))[:32]}: {str(info.get('command'))[:120]}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _open_lock(path: str) -> int:
    """The lock file's descriptor, created if missing. Raises RunFolderError
    when ``path`` is anything but a regular file: fastvae writes its holder's
    description into it, and a planted symbolic link had it write through
    the link (no link is followed; a FIFO or device would take the text)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666 & ~_umask())
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        fd = None
    mode = os.lstat(path).st_mode if fd is None else os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        if fd is not None:
            os.close(fd)
        kind = ("symbolic link" if stat.S_ISLNK(mode) else "folder" if stat.S_ISDIR(mode) else
                "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device")
        raise RunFolderError(f"{path} is a {kind}, not a regular file; remove it (fastvae keeps its run lock "
                             "there and follows no link)")
    return fd


def acquire(out: str) -> None:
    """Take (or re-enter, from the same thread) the run lock of ``out``,
    creating the folder. Raises RunFolderError naming the holder when another
    process or another thread of this one has it. On a file system without
    locks (some NFS mounts) it goes on unlocked with a note on stderr."""
    with _HELD_GUARD:
        _acquire(os.path.abspath(out))


def _acquire(out: str) -> None:
    import fcntl
    if out in _HELD:
        if _HELD[out].thread != threading.get_ident():
            raise RunFolderError(f"run folder {out} is in use by another thread of this process; wait for its "
                                 "training to finish or choose another out folder")
        _HELD[out].depth += 1
        return
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        fd = _open_lock(os.path.join(out, LOCK_NAME))
    except OSError as exc:
        raise RunFolderError(f"cannot use run folder {out}: {exc.strerror}; choose a writable "
                             f"{option('out')}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in _BUSY:              # ENOLCK, EOPNOTSUPP: this file system keeps no locks
            print(f"fastvae: note: cannot lock run folder {out} ({exc.strerror}); a second trainer started "
                  "in it would not be stopped", file=sys.stderr)
        else:
            who = _holder(fd)
            os.close(fd)
            raise RunFolderError(f"run folder {out} is in use by {who}; wait for it to finish, stop it, or "
                                 f"choose another {option('out')}") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:
        pass                                     # the lock holds; only the holder's description is lost
    _HELD[out] = _Lock(out, fd, created)


def release(out: str) -> None:
    """Leave the run lock (the lock file stays; the folder is removed again
    when this process created it and nothing else was written there)."""
    with _HELD_GUARD:
        _release(os.path.abspath(out))


def _release(out: str) -> None:
    lk = _HELD.get(out)
    if lk is None or lk.thread != threading.get_ident():
        return
    lk.depth -= 1
    if lk.depth:
        return
    del _HELD[out]
    if lk.created and os.listdir(out) == [LOCK_NAME]:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(out, LOCK_NAME))
            os.rmdir(out)
    os.close(lk.fd)


def claim_new(base: str) -> CheckedFolder:
    """A new run folder for a run given no ``--out``: ``base``, else
    ``base-2``, ``base-3``, ... (the first that does not exist), created and
    locked (:func:`acquire`; the caller releases it), so that runs started in
    the same second get a folder each (the second stopped: "in use by pid
    ..., choose another --out", which it never chose). Raises RunFolderError
    when the folder cannot be created."""
    for i in range(1, 1000):
        out = os.path.abspath(base if i == 1 else f"{base}-{i}")
        if os.path.lexists(out):
            continue
        try:
            acquire(out)
            return CheckedFolder(out)
        except RunFolderError:
            if not os.path.isdir(out):             # not taken by another run: it cannot be created
                raise
    raise RunFolderError(f"{base} and 998 numbered folders beside it exist already; pass {option('out')}")


@contextlib.contextmanager
def locked(out: Optional[str]):
    """``with locked(out):`` hold the run lock of ``out`` (re-entrant); a
    no-op for None (no run folder, or a rank that does not write)."""
    if out is None:
        yield
        return
    acquire(out)
    try:
        yield
    finally:
        release(out)


def atomic_write(path: str, write: Callable[[str], None], error=RunFolderError) -> str:
    """Write ``path`` by calling ``write(tmp)`` on a unique temporary name in
    the same folder, fsync, then rename over ``path``. Any OSError (ENOSPC,
    EACCES, ...) removes the temporary file, keeps the previous ``path`` and
    raises ``error`` with one line; other exceptions (including Ctrl-C)
    clean up and propagate."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    problem = ("it is a folder; name a file in it" if os.path.isdir(path) else None if os.path.isdir(folder) else
               f"{folder} is a file, not a folder; fix the path" if os.path.lexists(folder) else
               f"the folder {folder} does not exist; create it or fix the path")   # were called a full disk
    if problem:
        raise error(f"cannot write {path}: {problem}")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1], dir=folder)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        with contextlib.suppress(OSError):
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as exc:
        raise error(f"cannot write {path}: {exc.strerror or exc}; free disk space or fix the folder's "
                    "permissions (the previous file is intact)") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def atomic_write_text(path: str, text: str) -> str:
    """:func:`atomic_write` of a UTF-8 text file."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return atomic_write(path, write)


def clean_debris(out: str) -> None:
    """Remove temporary files of writes that were killed mid-way (only ever
    called while holding the folder's lock, so no live write is touched)."""
    for f in os.listdir(out):
        if f.startswith(TMP_PREFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, f))
