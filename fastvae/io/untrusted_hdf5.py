"""HDF5 files a user hands over, parsed only in a resource-limited child process.

The HDF5 C library is native code that can crash (not raise) on a crafted file,
and a checksum only proves a file was not damaged, not that it is benign. So no
byte of a user-supplied HDF5 file (checkpoint, data file) is parsed by libhdf5
inside the fastvae process. :class:`SandboxedH5` starts a child Python process
that receives the already-opened file as its only inherited descriptor besides
its two pipes, applies resource limits to itself (address space, CPU time, no
core file, few descriptors, no HDF5 filter plugins), and only then opens the
file with h5py. The parent asks it for attributes, members, dataset
descriptions and values; every answer arrives as JSON and ``.npy`` bytes read
back with ``allow_pickle=False`` and within a size bound, so the parent only
ever handles plain numbers and text. A crash, limit or hang in the child
becomes one ``error`` line ("the file crashed the HDF5 reader: refusing it"),
never a signal in the parent.

Structural rules enforced in the child before any value is read (the same for
every caller): only hard links inside the file (no soft or external links),
no virtual datasets, no external raw storage, no null dataspaces, and a
declared size the stored bytes can back (uncompressed data no larger than the
file; with ``compressed_ok`` every chunk written and at most
``fastvae.io.safe_files.MAX_COMPRESSION`` times the stored bytes; without it no filter at all).

This module imports only the standard library and NumPy at its top: the child
loads it by file path, without the fastvae package. Parent side:
:class:`SandboxedH5`, :class:`ChildFailed`. Child side: ``_child_main`` and
the ``_op_*`` handlers (h5py is imported there only).
"""

from __future__ import annotations

import io
import json
import math
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref

import numpy as np

MAX_ATTR_TEXT = 200            # characters of one text attribute
BASE_TIMEOUT_S = 60.0          # a request's wall-clock limit, plus the time to read its bytes at ...
READ_RATE = 20 * 2 ** 20       # ... 20 MiB/s (a slow disk): a parse that takes longer is a hang
BASE_MEMORY = 512 * 2 ** 20    # address space the child may add to what its imports take, plus its data
_LEN = struct.Struct("<Q")


class ChildFailed(Exception):
    """Raised in the parent when the child died, hit a limit or timed out:
    the message says which (already one line, no fix appended)."""


# ---------------------------------------------------------------- parent side
def _child_command(module_file: str, config: dict) -> list:
    """argv of the child: this file loaded by path (the fastvae package and
    its heavy imports are not needed there), its config as JSON."""
    boot = ("import importlib.util as u, sys; s = u.spec_from_file_location('_fastvae_h5child', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m._child_main(sys.argv[2])")
    return [sys.executable, "-c", boot, module_file, json.dumps(config)]


def _child_env() -> dict:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"                      # one thread: no BLAS thread pools, a small address space
    env["HDF5_PLUGIN_PRELOAD"] = "::"       # libhdf5 loads no filter plugin a file asks for
    env["HDF5_USE_FILE_LOCKING"] = "FALSE"  # a read-only parse takes no lock a writer would meet
    return env


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


class SandboxedH5:
    """An untrusted HDF5 file, parsed in a child process (see the module docstring).

    fh: an open binary file object of a regular file (from
    :func:`fastvae.io.safe_files.open_regular`; the caller keeps it and closes it);
    path: the name used in messages; error: the fastvae error class raised
    (``CheckpointError``, ``DataError``); fix: the advice appended to a
    refusal that names none; compressed_ok: whether datasets may
    use HDF5 filters (data files: yes; checkpoints, which fastvae writes
    uncompressed: no); max_compression: the largest ratio of declared to
    stored bytes taken (``fastvae.io.safe_files.MAX_COMPRESSION``); cpu_s: the child's CPU-time limit in seconds (None for
    a long-lived reader, whose requests each have a wall-clock limit anyway).

    The child's address space is limited to what its imports take plus
    ``BASE_MEMORY`` plus twice the largest data the file may declare (its
    size, times ``max_compression`` when compressed), at most the machine's
    memory. Each request is limited to ``BASE_TIMEOUT_S`` plus the time to
    read its bytes at ``READ_RATE``. Thread-safe (one request at a time).
    Raises ``error`` (one line naming the file) when the child cannot start,
    dies (a crash in libhdf5), hits a limit, times out, or refuses the file;
    a refusal's exception carries ``detail``, the reason alone (no path, no fix).
    """

    def __init__(self, fh, path, error, fix: str, *, compressed_ok: bool = False, cpu_s=None,
                 max_compression: int = 256):
        self.path, self.error, self.fix, self.compressed_ok = os.fspath(path), error, fix, compressed_ok
        self.file_size = os.fstat(fh.fileno()).st_size
        self.max_data = self.file_size * (max_compression if compressed_ok else 1)
        memory = min(BASE_MEMORY + 2 * self.max_data, _physical_memory())
        fd = fh.fileno()
        config = {"fd": fd, "path": self.path, "memory": memory, "cpu_s": cpu_s,
                  "file_size": self.file_size, "compressed_ok": compressed_ok,
                  "max_compression": max_compression}
        if not sys.executable:
            raise error(f"cannot read {self.path}: HDF5 files are parsed in a child Python process and this "
                        "interpreter does not know its own executable (sys.executable is empty); run fastvae "
                        "from a regular Python installation")
        try:
            self._proc = subprocess.Popen(_child_command(os.path.abspath(__file__), config), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(fd,),
                                          close_fds=True, bufsize=0, env=_child_env())
        except OSError as exc:
            raise error(f"cannot read {self.path}: the HDF5 reader process did not start ({exc.strerror}); "
                        "check that the system allows new processes (ulimit -u) and retry") from None
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop, self._proc)
        try:
            self._call({"op": "open"})
        except BaseException:
            self.close()
            raise

    # -- protocol
    def _deadline(self, nbytes: int) -> float:
        return time.monotonic() + BASE_TIMEOUT_S + nbytes / READ_RATE

    def _read_exact(self, n: int, deadline: float) -> memoryview:
        buf = bytearray(n)
        view, got, out = memoryview(buf), 0, self._proc.stdout
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                raise ChildFailed("timed out")
            k = out.readinto(view[got:])
            if not k:
                raise ChildFailed("died")
            got += k
        return view

    def _failure(self, what: str):
        """The error for a child that died, hit a limit or timed out (it is stopped)."""
        _stop(self._proc)
        code = self._proc.returncode
        if what == "timed out":
            how = "took longer than its time limit (a crafted file can make the parser loop)"
        elif code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            how = {"SIGXCPU": "used up its CPU-time limit",
                   "SIGKILL": "was killed (out of memory or by the system)"}.get(name, f"crashed ({name})")
        else:
            how = f"stopped unexpectedly (exit status {code})"
        return self.error(f"{self.path}: the HDF5 reader {how} in its sandboxed process: refusing the file (it is "
                          f"damaged or crafted); {self.fix}")

    def _call(self, request: dict, max_bytes: int = 1 << 20):
        """Send ``request``; returns ``(value, blobs)``. ``max_bytes`` bounds the answer."""
        with self._lock:
            if self._proc.returncode is not None or self._proc.stdin is None:
                raise self.error(f"{self.path}: the HDF5 reader process has stopped; open the file again")
            deadline = self._deadline(max_bytes)
            try:
                body = json.dumps(request).encode()
                self._proc.stdin.write(_LEN.pack(len(body)) + body)
                (n,) = _LEN.unpack(self._read_exact(_LEN.size, deadline))
                if n > max_bytes + (1 << 20):
                    raise ChildFailed("died")       # no honest answer is this long
                head = json.loads(bytes(self._read_exact(n, deadline)))
                blobs = []
                for kind in head.get("blobs", []):
                    (n,) = _LEN.unpack(self._read_exact(_LEN.size, deadline))
                    if n > max_bytes + (1 << 20):
                        raise ChildFailed("died")
                    raw = self._read_exact(n, deadline)
                    blobs.append(np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
                                 if kind == "npy" else bytes(raw))
            except ChildFailed as exc:
                raise self._failure(str(exc)) from None
            except (BrokenPipeError, ConnectionError):
                raise self._failure("died") from None
            except (ValueError, KeyError, TypeError):    # a garbled answer: the child is not behaving
                raise self._failure("died") from None
        if "refused" in head:
            msg = head["refused"]
            sep = " " if msg.startswith(("is ", "has ")) else ": "       # "file.h5 is not ...", "file.h5: 'x' is ..."
            exc = self.error(f"{self.path}{sep}{msg}" + ("" if ";" in msg else f"; {self.fix}"))
            exc.detail = head.get("detail", msg)
            raise exc
        return head.get("value"), blobs

    # -- what callers use
    def limits(self) -> dict:
        """The child's resource limits as it applied them:
        ``{"address_space", "cpu_s", "core", "open_files"}`` (None: unlimited)."""
        return self._call({"op": "limits"})[0]

    def attrs(self, group: str = "/") -> dict:
        """Attributes of ``group``: each a text of at most ``MAX_ATTR_TEXT``
        characters or a single number (anything else is refused)."""
        return self._call({"op": "attrs", "group": group})[0]

    def members(self, group: str = "/") -> dict:
        """``{name: kind}`` of ``group``'s members; kind ``"group"``,
        ``"dataset"``, or the reason it is not followed (``"soft link"``,
        ``"link to another file"``, ``"other"``)."""
        return self._call({"op": "members", "group": group})[0]

    def dataset(self, name: str) -> dict:
        """``{"shape": tuple, "dtype": str}`` of dataset ``name`` after the
        structural checks; dtype is NumPy's ``dtype.str`` (``"<f4"``, ``"|S5"``),
        ``"text"`` for variable-length strings, ``"object"`` for other
        variable-length data."""
        value = self._call({"op": "dataset", "name": name})[0]
        return {"shape": tuple(value["shape"]), "dtype": value["dtype"]}

    def read(self, name: str, rows=None):
        """Values of dataset ``name`` (all, or with ``rows``, increasing unique
        indices of its first axis) as a NumPy array; variable-length text as a
        ``str`` array; a scalar text as ``bytes``."""
        info = self.dataset(name)
        shape = info["shape"]
        count = len(rows) if rows is not None else (shape[0] if shape else 1)
        itemsize = 64 if info["dtype"] in ("text", "object") else np.dtype(info["dtype"]).itemsize
        per_row = int(np.prod(shape[1:], dtype=np.float64)) if shape else 1
        bound = int(min(count * per_row * itemsize * 4 + 4096, 4 * self.max_data + 4096))
        request = {"op": "read", "name": name, "rows": None if rows is None else [int(i) for i in rows]}
        value, blobs = self._call(request, max_bytes=max(bound, 1 << 20))
        if value == "bytes":
            return blobs[0]
        if value == "text":
            return np.array(json.loads(blobs[0].decode("utf-8")), dtype=str).reshape(
                shape if rows is None else (len(rows),) + tuple(shape[1:]))
        return blobs[0]

    def close(self) -> None:
        """Stop the child (idempotent)."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stop(proc) -> None:
    if proc.returncode is None:
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except (OSError, AttributeError):
            pass


# ---------------------------------------------------------------- child side
class _Refused(Exception):
    """A structural check failed: the message goes back to the parent."""


def _limit(resource, which, value, slack: int = 0) -> None:
    """Set limit ``which`` to ``value``, its hard limit ``slack`` above it
    (within the inherited hard limit). A limit the system does not support (macOS refuses some
    address-space limits) is skipped: the crash isolation holds without it."""
    if value is None:
        return
    soft, hard = resource.getrlimit(which)
    value = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
    try:
        resource.setrlimit(which, (value, value + slack if hard == resource.RLIM_INFINITY else hard))
    except (ValueError, OSError):
        pass


def _address_space_now() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _child_main(config_json: str) -> None:
    config = json.loads(config_json)
    import h5py                                     # trusted imports first, then the limits, then the file
    import resource
    _limit(resource, resource.RLIMIT_CORE, 0)
    _limit(resource, resource.RLIMIT_AS, _address_space_now() + config["memory"])
    _limit(resource, resource.RLIMIT_CPU, config["cpu_s"] and math.ceil(config["cpu_s"]), slack=5)   # SIGXCPU first
    _limit(resource, resource.RLIMIT_NOFILE, 64)
    stdin, stdout = os.fdopen(0, "rb", buffering=0), os.fdopen(1, "wb", buffering=0)
    state = {"h5py": h5py, "config": config, "file": None, "resource": resource}
    while True:
        raw = stdin.read(_LEN.size)
        if len(raw) < _LEN.size:
            return
        (n,) = _LEN.unpack(raw)
        request = json.loads(stdin.read(n))
        try:
            value, blobs = _HANDLERS[request["op"]](state, request)
            head = {"value": value, "blobs": [b[0] for b in blobs]}
        except _Refused as exc:
            head, blobs = {"refused": str(exc)}, []
        except MemoryError:
            head, blobs = {"refused": "reading it needs more memory than its size can back (crafted or "
                                      "damaged)"}, []
        except Exception as exc:                    # h5py raises OSError, RuntimeError, KeyError, ... on damage
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            head, blobs = {"refused": f"the file is damaged or not HDF5 ({detail})", "detail": detail}, []
        body = json.dumps(head).encode()
        stdout.write(_LEN.pack(len(body)) + body)
        for kind, data in blobs:
            if kind == "npy":
                out = io.BytesIO()
                np.lib.format.write_array(out, data, allow_pickle=False)
                data = out.getbuffer()
            stdout.write(_LEN.pack(len(data)))
            stdout.write(data)


def _op_open(state, request):
    h5py, fd = state["h5py"], state["config"]["fd"]
    try:
        state["file"] = h5py.File(os.fdopen(fd, "rb"), "r")
    except Exception:
        raise _Refused("is not a readable HDF5 file (truncated, damaged or another format)") from None
    return None, []


def _op_limits(state, request):
    resource = state["resource"]

    def get(which):
        soft = resource.getrlimit(which)[0]
        return None if soft == resource.RLIM_INFINITY else soft
    return {"address_space": get(resource.RLIMIT_AS), "cpu_s": get(resource.RLIMIT_CPU),
            "core": get(resource.RLIMIT_CORE), "open_files": get(resource.RLIMIT_NOFILE)}, []


def _group(state, name):
    h5py, f = state["h5py"], state["file"]
    if name in ("/", ""):
        return f
    link = f.get(name, getlink=True)
    if link is None or not isinstance(link, h5py.HardLink) or not isinstance(f[name], h5py.Group):
        raise _Refused(f"{name!r} is not a group")
    return f[name]


def _op_attrs(state, request):
    out = {}
    for k, v in _group(state, request["group"]).attrs.items():
        v = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        v = v.item() if hasattr(v, "item") and getattr(v, "size", 1) == 1 else v
        v = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        if isinstance(v, str):          # h5py hands invalid UTF-8 back as lone surrogates: printing them fails
            v = v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if not isinstance(v, (str, int, float)) or (isinstance(v, str) and len(v) > MAX_ATTR_TEXT):
            raise _Refused(f"attribute {k[:40]!r} is not a short text or number")
        out[k] = v
    return out, []


def _op_members(state, request):
    h5py, g = state["h5py"], _group(state, request["group"])
    out = {}
    for k in g.keys():
        link = g.get(k, getlink=True)
        if isinstance(link, h5py.SoftLink):
            out[k] = "soft link"
        elif isinstance(link, h5py.ExternalLink):
            out[k] = "link to another file"
        elif isinstance(link, h5py.HardLink):
            obj = g.get(k)
            out[k] = "group" if isinstance(obj, h5py.Group) else "dataset" if isinstance(obj, h5py.Dataset) \
                else "other"
        else:
            out[k] = "other"
    return out, []


def _checked(state, name):
    """The dataset ``name`` after the structural checks of the module docstring."""
    h5py, f, config = state["h5py"], state["file"], state["config"]
    link = f.get(name, getlink=True)
    if link is None:
        raise _Refused(f"has no dataset {name!r}")
    if not isinstance(link, h5py.HardLink):
        kind = {"SoftLink": "soft link", "ExternalLink": "link to another file"}.get(type(link).__name__, "link")
        raise _Refused(f"{name!r} is a {kind}, which would read another object or file; fastvae reads only "
                       "data stored in the file itself")
    d = f[name]
    if not isinstance(d, h5py.Dataset):
        raise _Refused(f"{name!r} is a group, not a dataset")
    if d.shape is None:
        raise _Refused(f"{name!r} holds no values (an HDF5 dataset with a null dataspace); store the data in it")
    plist = d.id.get_create_plist()
    if d.is_virtual or plist.get_layout() == h5py.h5d.VIRTUAL:
        raise _Refused(f"{name!r} is a virtual dataset mapping other files; store the data in the file")
    if plist.get_external_count() > 0:
        raise _Refused(f"{name!r} keeps its bytes in an external file; store the data in the file")
    if d.dtype.kind == "O":
        return d                                    # variable-length strings: their bytes live in the file's heap
    declared = int(np.prod(d.shape, dtype=np.float64) * d.dtype.itemsize)
    stored = int(d.id.get_storage_size())
    filters, size, ratio = plist.get_nfilters(), config["file_size"], config["max_compression"]
    if filters > 0 and not config["compressed_ok"]:
        raise _Refused(f"{name!r} uses an HDF5 filter fastvae never writes; use a file written by fastvae")
    if plist.get_layout() == h5py.h5d.CHUNKED and declared:
        chunks = int(np.prod([-(-n // c) for n, c in zip(d.shape, d.chunks)], dtype=np.float64))
        if d.id.get_num_chunks() < chunks or (filters == 0 and stored < declared):
            raise _Refused(f"{name!r} declares {d.shape} but {chunks - d.id.get_num_chunks()} of its {chunks} "
                           "chunks were never written (they would read as zeros); write the whole dataset")
    if declared > size and filters == 0:
        raise _Refused(f"{name!r} declares {d.shape} ({declared:,} bytes), more than the whole file "
                       f"({size:,} bytes); the file is crafted or damaged")
    if declared and stored * ratio < declared:
        raise _Refused(f"{name!r} declares {d.shape} ({declared:,} bytes) but stores {stored:,} bytes "
                       "(unwritten chunks or implausible compression); the file is crafted or damaged")
    return d


def _op_dataset(state, request):
    h5py, d = state["h5py"], _checked(state, request["name"])
    if d.dtype.kind == "O":
        dtype = "text" if h5py.check_string_dtype(d.dtype) is not None else "object"
    else:
        dtype = d.dtype.str
    return {"shape": list(d.shape), "dtype": dtype}, []


def _op_read(state, request):
    h5py, d, rows = state["h5py"], _checked(state, request["name"]), request["rows"]
    if rows is not None and (d.ndim == 0 or any(not 0 <= r < d.shape[0] for r in rows) or
                             any(a >= b for a, b in zip(rows, rows[1:]))):
        raise _Refused(f"rows asked of {request['name']!r} are not increasing indices of its first axis")
    if d.dtype.kind == "O":
        if h5py.check_string_dtype(d.dtype) is None:
            raise _Refused(f"{request['name']!r} holds variable-length data that is not text")
        if d.shape == ():
            raw = d[()]
            return "bytes", [("bytes", raw if isinstance(raw, bytes) else str(raw).encode("utf-8"))]
        values = d.asstr(errors="replace")[()] if rows is None else d.asstr(errors="replace")[rows]
        return "text", [("bytes", json.dumps(np.asarray(values, dtype=object).reshape(-1).tolist()).encode())]
    if d.dtype.kind == "V" or d.dtype.fields is not None or d.dtype.subdtype is not None:
        raise _Refused(f"{request['name']!r} holds compound or opaque values ({d.dtype}); store plain numbers")
    if d.shape == () and d.dtype.kind == "S":
        return "bytes", [("bytes", bytes(d[()]))]
    value = d[()] if rows is None else (d[rows] if rows else np.empty((0,) + d.shape[1:], d.dtype))
    return "array", [("npy", np.ascontiguousarray(value))]


_HANDLERS = {"open": _op_open, "limits": _op_limits, "attrs": _op_attrs, "members": _op_members,
             "dataset": _op_dataset, "read": _op_read}
