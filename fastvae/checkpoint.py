"""The HDF5 checkpoint format (one format for every backend).

Layout of a file (format ``fastvae-checkpoint``, version 1)::

    /                     attrs: format, format_version, fastvae_version,
                                 backend, dtype, created (ISO 8601 UTC)
    /params               (P,) flat parameter buffer in the model dtype
    /adam/m, /adam/v      (P,) Adam moments;  /adam attrs: t (int)
    /layout               JSON text: [{"name", "shape", "offset"}, ...]
    /config               JSON text: {"model": {...}, "train": {...}, "data": {...}}
    /state                JSON text: {"epoch", "step", "rng": {...}}
    /history              JSON text: list of per-epoch metric rows
    /arrays/epoch_perm    (N,) int64, only when saved inside an epoch (Ctrl-C)

Only numbers and JSON text are stored: nothing is ever unpickled. Files are
written from host copies and load into any backend. Saving is atomic: the
file is written to a temporary name in the same folder, flushed and fsynced,
then renamed over the target, so a crash leaves the previous file intact.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from typing import Optional

import numpy as np

from .errors import CheckpointError

FORMAT_NAME = "fastvae-checkpoint"
FORMAT_VERSION = 1


def _h5py():
    import h5py
    return h5py


def save_checkpoint(path, *, params, adam_state: Optional[dict], layout_table, config: dict,
                    state: dict, history: list, backend: str, dtype: str, arrays: Optional[dict] = None) -> None:
    """Write a checkpoint atomically.

    params: host (P,) array; adam_state: ``{"m", "v", "t"}`` or None;
    layout_table: ``ParamLayout.to_table()``; config: ``{"model", "train", "data"}``
    dicts; state: ``{"epoch", "step", "rng"}``; history: list of dicts.
    Raises CheckpointError when the folder is not writable.
    """
    from . import __version__
    h5py = _h5py()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CheckpointError(f"cannot save checkpoint: folder {folder} does not exist; create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".h5", dir=folder)
    except OSError as exc:
        raise CheckpointError(f"cannot save checkpoint in {folder}: {exc.strerror}; choose a writable folder") from None
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["fastvae_version"] = __version__
            f.attrs["backend"] = backend
            f.attrs["dtype"] = dtype
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            f.create_dataset("params", data=np.asarray(params))
            if adam_state is not None:
                g = f.create_group("adam")
                g.create_dataset("m", data=np.asarray(adam_state["m"]))
                g.create_dataset("v", data=np.asarray(adam_state["v"]))
                g.attrs["t"] = int(adam_state["t"])
            f.create_dataset("layout", data=json.dumps(layout_table))
            f.create_dataset("config", data=json.dumps(config))
            f.create_dataset("state", data=json.dumps(state))
            f.create_dataset("history", data=json.dumps(history))
            if arrays:
                g = f.create_group("arrays")
                for k, v in arrays.items():
                    g.create_dataset(k, data=np.asarray(v))
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        try:
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _text(f, key):
    raw = f[key][()]
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return json.loads(raw)


def read_checkpoint(path) -> dict:
    """Read and validate a checkpoint into host data.

    Returns ``{"params", "adam" (dict or None), "layout", "config", "state",
    "history", "meta"}``. Raises CheckpointError for a missing file, a file
    that is not HDF5 or not a fastvae checkpoint, another format version, or
    missing/truncated contents.
    """
    h5py = _h5py()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a checkpoint.h5 written by fastvae")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise CheckpointError(
            f"{path} is not a readable HDF5 file (truncated or not a checkpoint); "
            "pass a checkpoint.h5 written by fastvae") from None
    with f:
        fmt = f.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT_NAME:
            raise CheckpointError(
                f"{path} is not a fastvae checkpoint (format attribute {fmt!r}); "
                "pass a checkpoint.h5 written by fastvae")
        ver = int(f.attrs.get("format_version", -1))
        if ver != FORMAT_VERSION:
            hint = ("upgrade fastvae to read it" if ver > FORMAT_VERSION
                    else "re-save it with the fastvae version that wrote it")
            raise CheckpointError(
                f"{path} has checkpoint format version {ver}, this fastvae reads version "
                f"{FORMAT_VERSION}; {hint}")
        try:
            meta = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            meta = {k: (v.item() if hasattr(v, "item") else v) for k, v in meta.items()}
            out = {
                "params": np.asarray(f["params"][()]),
                "adam": None,
                "layout": _text(f, "layout"),
                "config": _text(f, "config"),
                "state": _text(f, "state"),
                "history": _text(f, "history"),
                "meta": meta,
                "arrays": {k: np.asarray(v[()]) for k, v in f["arrays"].items()} if "arrays" in f else {},
            }
            if "adam" in f:
                g = f["adam"]
                out["adam"] = {"m": np.asarray(g["m"][()]), "v": np.asarray(g["v"][()]),
                               "t": int(g.attrs["t"])}
        except (KeyError, OSError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{path} is damaged or incomplete ({type(exc).__name__}: {exc}); "
                "use an intact checkpoint (the previous one is kept on a failed save)") from None
    P = out["params"].shape
    if len(P) != 1 or (out["adam"] is not None and
                       (out["adam"]["m"].shape != P or out["adam"]["v"].shape != P)):
        raise CheckpointError(f"{path} holds inconsistent array shapes; use an intact checkpoint")
    return out
