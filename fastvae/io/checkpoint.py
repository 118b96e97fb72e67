"""The HDF5 checkpoint format (one format for every backend).

Layout of a file (format ``fastvae-checkpoint``, version 2; version 1, the
first release's, is the same without ``layers`` in the model config, and is
read as the MLP its ``hidden``/``latent_dim`` describe)::

    /                     attrs: format, format_version, fastvae_version,
                                 backend, dtype, created (ISO 8601 UTC)
    /params               (P,) flat parameter buffer in the model dtype
    /adam/m, /adam/v      (P,) Adam moments;  /adam attrs: t (int)
    /layout               JSON text: [{"name", "shape", "offset"}, ...]
    /config               JSON text: {"model": {..., "layers": [specs]}, "train": {...}, "data": {...}}
    /state                JSON text: {"epoch", "step", "rng": {...}}
    /history              JSON text: list of per-epoch metric rows
    /arrays/epoch_perm    (N,) int64, only when saved inside an epoch (Ctrl-C)

Only numbers and JSON text are stored: nothing is ever unpickled. The first
512 bytes are an HDF5 user block (ignored by HDF5) holding the line
``fastvae-checkpoint <version> sha256 <hex digest of every later byte>``;
it is checked before anything parses the file, so a corrupted or truncated
file is refused with a clear error instead of loading wrong numbers. A
checksum proves the file intact, not benign (anyone can write a valid one):
the HDF5 structure is parsed only in a sandboxed child process
(:mod:`fastvae.io.untrusted_hdf5`), never by libhdf5 in the fastvae process.
Files are written from host copies and load into any backend. Saving is
atomic: the file is written to a temporary name in the same folder, flushed
and fsynced, then renamed over the target, so a crash leaves the previous
file intact.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from typing import Optional

import numpy as np

from fastvae.io import checkpoint_schema as schema
from fastvae.errors import CheckpointError
from fastvae.training.runfolder import atomic_write
from fastvae.io.safe_files import dump_json, open_regular, parse_json
from fastvae.io.untrusted_hdf5 import SandboxedH5

_TEXTS = ("layout", "config", "state", "history")
FORMAT_NAME = "fastvae-checkpoint"
FORMAT_VERSION = 2                 # written
READABLE_VERSIONS = (1, 2)         # read


HEADER_SIZE = 512      # an HDF5 "user block": bytes HDF5 itself ignores
CHILD_CPU_S = 120      # CPU seconds the sandboxed parse of one checkpoint may take


def _file_digest(fh) -> str:
    """SHA-256 of everything after the header."""
    h = hashlib.sha256()
    fh.seek(HEADER_SIZE)
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _header(version: int, digest: str) -> bytes:
    line = f"{FORMAT_NAME} {version} sha256 {digest}\n".encode("ascii")
    return line + b"\0" * (HEADER_SIZE - len(line))


def _check_version(path, ver: int) -> None:
    if ver not in READABLE_VERSIONS:
        hint = ("upgrade fastvae to read it" if ver > FORMAT_VERSION
                else "re-save it with the fastvae version that wrote it")
        raise CheckpointError(f"{path} has checkpoint format version {ver}, this fastvae reads versions "
                              f"{READABLE_VERSIONS[0]}-{READABLE_VERSIONS[-1]}; {hint}")


def _parse_header(raw: bytes):
    """``(version, digest)`` or None when the bytes are not a fastvae header."""
    try:
        words = raw.split(b"\n", 1)[0].decode("ascii").split()
        if len(words) == 4 and words[0] == FORMAT_NAME and words[2] == "sha256":
            return int(words[1]), words[3]
    except (UnicodeDecodeError, ValueError):
        pass
    return None


def _h5py():
    import h5py
    return h5py


def save_checkpoint(path, *, params, adam_state: Optional[dict], layout_table, config: dict,
                    state: dict, history: list, backend: str, dtype: str, arrays: Optional[dict] = None) -> None:
    """Write a checkpoint atomically.

    params: host (P,) array; adam_state: ``{"m", "v", "t"}`` or None;
    layout_table: ``ParamLayout.to_table()``; config: ``{"model", "train", "data"}``
    dicts; state: ``{"epoch", "step", "rng"}``; history: list of dicts.
    Raises CheckpointError when the folder is not writable or a write fails
    (disk full): the previous file is then intact and no temporary is left
    (:func:`fastvae.training.runfolder.atomic_write`).
    """
    from fastvae import __version__
    h5py = _h5py()
    path = os.fspath(path)

    def write(tmp):
        with h5py.File(tmp, "w", userblock_size=HEADER_SIZE) as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["fastvae_version"] = __version__
            f.attrs["backend"] = backend
            f.attrs["dtype"] = dtype
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            texts = [dump_json(t) for t in (layout_table, config, state, history)]
            f.create_dataset("params", data=np.asarray(params))
            if adam_state is not None:
                g = f.create_group("adam")
                g.create_dataset("m", data=np.asarray(adam_state["m"]))
                g.create_dataset("v", data=np.asarray(adam_state["v"]))
                g.attrs["t"] = int(adam_state["t"])
            for name, text in zip(_TEXTS, texts):
                f.create_dataset(name, data=text)
            if arrays:
                g = f.create_group("arrays")
                for k, v in arrays.items():
                    g.create_dataset(k, data=np.asarray(v))
        with open(tmp, "rb+") as fh:
            digest = _file_digest(fh)
            fh.seek(0)
            fh.write(_header(FORMAT_VERSION, digest))
    atomic_write(path, write, CheckpointError)


MAX_TEXT = 64 * 2 ** 20          # bytes of one JSON text (a history of a million epochs fits)
_FIX = "pass a checkpoint.h5 written by fastvae"


def _text(f, key, where) -> str:
    """The scalar JSON text ``key`` of sandboxed file ``f``."""
    info = f.dataset(key)
    if info["shape"] != () or info["dtype"] not in ("text",) and info["dtype"][1] not in "SU":
        raise CheckpointError(f"{where}: {key!r} is not a JSON text; {_FIX}")
    raw = f.read(key)
    if len(raw) > MAX_TEXT:
        raise CheckpointError(f"{where}: {key!r} is {len(raw):,} bytes, more than fastvae ever writes; {_FIX}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: {key!r} is not UTF-8 text; {_FIX}") from None


def _vector(f, key, where, n, kinds):
    """Dataset ``key`` as a host (n,) array after checking dtype and shape before reading."""
    info = f.dataset(key)
    dtype = None if info["dtype"] in ("text", "object") else np.dtype(info["dtype"])
    if dtype is None or dtype.kind not in kinds or dtype.itemsize not in (4, 8) or info["shape"] != (n,):
        raise CheckpointError(f"{where}: {key!r} holds {dtype or info['dtype']} {info['shape']}, expected a vector "
                              f"of {n} {'floats' if kinds == 'f' else 'integers'}; {_FIX}")
    out = f.read(key)
    if out.dtype != dtype or out.shape != (n,):
        raise CheckpointError(f"{where}: {key!r} did not read back as {n} values of {dtype}; {_FIX}")
    return out


def _verify_bytes(fh, path) -> None:
    """The header and SHA-256 of an open file (before anything parses it)."""
    head = _parse_header(fh.read(HEADER_SIZE))
    if head is None:
        fh.seek(0)
        is_hdf5 = fh.read(8) == b"\x89HDF\r\n\x1a\n"
        what = "an HDF5 file without the fastvae header" if is_hdf5 else "not an HDF5 file, or truncated"
        raise CheckpointError(f"{path} is not a fastvae checkpoint ({what}); {_FIX}")
    ver, digest = head
    _check_version(path, ver)
    if _file_digest(fh) != digest:
        raise CheckpointError(f"{path} is corrupt or truncated: its bytes do not match the SHA-256 "
                              "written with it; use an intact copy (a failed save always leaves the "
                              "previous checkpoint)")


def _only(f, group, allowed, where) -> dict:
    """Members of ``group``, refusing any not in ``allowed`` and any that is not a dataset or group."""
    members = f.members(group)
    extra = sorted(set(members) - set(allowed))
    if extra:
        raise CheckpointError(f"{where} holds unexpected members {extra[:4]}; use a file written by fastvae")
    return members


def _read_h5(f, path) -> dict:
    """Every part of a checkpoint opened in the sandbox (:class:`~fastvae.io.untrusted_hdf5.SandboxedH5`),
    each checked before it is read."""
    meta = f.attrs("/")
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a fastvae checkpoint (format attribute {str(fmt)[:40]!r}); {_FIX}")
    ver = meta.get("format_version", -1)
    if isinstance(ver, bool) or not isinstance(ver, (int, float)) or ver != int(ver):
        raise CheckpointError(f"{path} has an unreadable format_version; {_FIX}")
    _check_version(path, int(ver))
    members = _only(f, "/", ("params", "adam", "arrays") + _TEXTS, path)
    texts = {k: parse_json(_text(f, k, path), f"{path}: {k!r}", CheckpointError) for k in _TEXTS}
    n = schema.check_layout(texts["layout"], path)
    out = dict(texts, meta=meta, params=_vector(f, "params", path, n, "f"), adam=None, arrays={})
    if "adam" in members:
        where = f"{path}: 'adam'"
        if members["adam"] != "group":
            raise CheckpointError(f"{path}: 'adam' is not a group; {_FIX}")
        _only(f, "adam", ("m", "v"), where)
        t = f.attrs("adam").get("t")
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise CheckpointError(f"{path}: the Adam step count is not a non-negative integer; {_FIX}")
        out["adam"] = {"m": _vector(f, "adam/m", where, n, "f"), "v": _vector(f, "adam/v", where, n, "f"), "t": t}
    if "arrays" in members:
        where = f"{path}: 'arrays'"
        if members["arrays"] != "group":
            raise CheckpointError(f"{path}: 'arrays' is not a group; {_FIX}")
        if "epoch_perm" in _only(f, "arrays", ("epoch_perm",), where):
            shape = f.dataset("arrays/epoch_perm")["shape"]
            out["arrays"]["epoch_perm"] = _vector(f, "arrays/epoch_perm", where,
                                                  shape[0] if len(shape) == 1 else -1, "iu")
    return out


def read_checkpoint(path) -> dict:
    """Read and validate a checkpoint into host data.

    Returns ``{"params", "adam" (dict or None), "layout", "config", "state",
    "history", "arrays", "meta", "configs"}`` (``configs``: the model, train
    and data config objects). A checkpoint is untrusted input: the SHA-256
    header is checked first (it proves the file is intact, not that it is
    benign); the HDF5 structure is then parsed only in a resource-limited
    child process (:mod:`fastvae.io.untrusted_hdf5`), which receives the same
    open file and returns plain numbers and text; only the members, dtypes
    and ranks this format defines are accepted, nothing is read from outside
    the file (no external links, external storage, virtual datasets or
    filters), every declared size is checked against the layout and the file
    size before it is read, and the JSON texts pass
    :mod:`fastvae.io.checkpoint_schema`. Raises CheckpointError (one line: the
    problem and the fix) for a missing or special file, another format
    version, corruption, a file that crashes or stalls the HDF5 reader, or
    any of the above.
    """
    path = os.fspath(path)
    with open_regular(path, "checkpoint", _FIX, CheckpointError) as fh:
        try:
            _verify_bytes(fh, path)
            fh.seek(0)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
        with SandboxedH5(fh, path, CheckpointError, _FIX, compressed_ok=False, cpu_s=CHILD_CPU_S) as f:
            out = _read_h5(f, path)
    schema.check_all(out, path)
    return out


def load_params(model, data: dict, path) -> None:
    """Copy a checkpoint's parameters (``read_checkpoint`` output) into
    ``model``. Raises CheckpointError when the file's dtype or parameter
    layout differs from the model's (naming both and the fix)."""
    theirs = data["config"].get("model", {}) if isinstance(data["config"], dict) else {}
    dtype = theirs.get("dtype") if isinstance(theirs, dict) else None
    if dtype != model.config.dtype:
        raise CheckpointError(f"{path} holds {dtype} parameters but this model is {model.config.dtype}; "
                              f"build the model with dtype={dtype!r} or use fastvae.load")
    model.layout.check_table(data["layout"])
    model.set_flat_params(data["params"])
