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
it is checked before HDF5 parses anything, so a corrupted or truncated file
is refused with a clear error instead of loading wrong numbers or crashing
the HDF5 library. Files are
written from host copies and load into any backend. Saving is atomic: the
file is written to a temporary name in the same folder, flushed and fsynced,
then renamed over the target, so a crash leaves the previous file intact.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from typing import Optional

import numpy as np

from .errors import CheckpointError

FORMAT_NAME = "fastvae-checkpoint"
FORMAT_VERSION = 2                 # written
READABLE_VERSIONS = (1, 2)         # read


HEADER_SIZE = 512      # an HDF5 "user block": bytes HDF5 itself ignores


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
        with h5py.File(tmp, "w", userblock_size=HEADER_SIZE) as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["fastvae_version"] = __version__
            f.attrs["backend"] = backend
            f.attrs["dtype"] = dtype
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            params = np.asarray(params)
            texts = [json.dumps(layout_table), json.dumps(config), json.dumps(state), json.dumps(history)]
            arrays = {k: np.asarray(v) for k, v in (arrays or {}).items()}
            f.create_dataset("params", data=params)
            if adam_state is not None:
                g = f.create_group("adam")
                g.create_dataset("m", data=np.asarray(adam_state["m"]))
                g.create_dataset("v", data=np.asarray(adam_state["v"]))
                g.attrs["t"] = int(adam_state["t"])
            for name, text in zip(("layout", "config", "state", "history"), texts):
                f.create_dataset(name, data=text)
            if arrays:
                g = f.create_group("arrays")
                for k, v in arrays.items():
                    g.create_dataset(k, data=v)
            f.flush()
        with open(tmp, "rb+") as fh:
            digest = _file_digest(fh)
            fh.seek(0)
            fh.write(_header(FORMAT_VERSION, digest))
            fh.flush()
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


def _raw_text(f, key) -> str:
    raw = f[key][()]
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)


def read_checkpoint(path) -> dict:
    """Read and validate a checkpoint into host data.

    Returns ``{"params", "adam" (dict or None), "layout", "config", "state",
    "history", "arrays", "meta"}``. Raises CheckpointError for a missing file,
    a file that is not HDF5 or not a fastvae checkpoint, another format
    version, missing or truncated contents, or contents that do not match
    their SHA-256 (corruption).
    """
    h5py = _h5py()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a checkpoint.h5 written by fastvae")
    # Verify the bytes before HDF5 parses them: the HDF5 library can crash
    # (not raise) on corrupted files, so corruption must be caught first.
    try:
        with open(path, "rb") as fh:
            head = _parse_header(fh.read(HEADER_SIZE))
            if head is None:
                fh.seek(0)
                is_hdf5 = fh.read(8) == b"\x89HDF\r\n\x1a\n"
                what = "an HDF5 file without the fastvae header" if is_hdf5 else "not an HDF5 file, or truncated"
                raise CheckpointError(f"{path} is not a fastvae checkpoint ({what}); "
                                      "pass a checkpoint.h5 written by fastvae")
            ver, digest = head
            _check_version(path, ver)
            if _file_digest(fh) != digest:
                raise CheckpointError(f"{path} is corrupt or truncated: its bytes do not match the SHA-256 "
                                      "written with it; use an intact copy (a failed save always leaves the "
                                      "previous checkpoint)")
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    try:
        f = h5py.File(path, "r")
    except Exception:
        raise CheckpointError(
            f"{path} is not a readable HDF5 file (truncated or not a checkpoint); "
            "pass a checkpoint.h5 written by fastvae") from None
    damaged = (f"{path} is damaged or incomplete; use an intact checkpoint "
               "(a failed save always leaves the previous one)")
    try:
        with f:
            try:
                fmt = f.attrs.get("format")
                if isinstance(fmt, bytes):
                    fmt = fmt.decode()
                ver = f.attrs.get("format_version", -1)
            except Exception:
                raise CheckpointError(damaged) from None
            if fmt != FORMAT_NAME:
                raise CheckpointError(
                    f"{path} is not a fastvae checkpoint (format attribute {fmt!r}); "
                    "pass a checkpoint.h5 written by fastvae")
            try:
                ver = int(ver)
            except (TypeError, ValueError):
                raise CheckpointError(damaged) from None
            _check_version(path, ver)
            try:
                meta = {}
                for k, v in f.attrs.items():
                    v = v.decode() if isinstance(v, bytes) else v
                    meta[k] = v.item() if hasattr(v, "item") else v
                texts = [_raw_text(f, k) for k in ("layout", "config", "state", "history")]
                params = np.asarray(f["params"][()])
                adam = None
                if "adam" in f:
                    g = f["adam"]
                    adam = {"m": np.asarray(g["m"][()]), "v": np.asarray(g["v"][()]), "t": int(g.attrs["t"])}
                arrays = {k: np.asarray(v[()]) for k, v in f["arrays"].items()} if "arrays" in f else {}
            except Exception as exc:  # h5py raises OSError, RuntimeError, KeyError, ... on damage
                raise CheckpointError(f"{damaged} ({type(exc).__name__})") from None
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{damaged} ({type(exc).__name__})") from None
    try:
        layout, config, state, history = (json.loads(t) for t in texts)
    except ValueError:
        raise CheckpointError(damaged) from None
    out = {"params": params, "adam": adam, "layout": layout, "config": config, "state": state,
           "history": history, "arrays": arrays, "meta": meta}
    P = out["params"].shape
    if len(P) != 1 or (out["adam"] is not None and
                       (out["adam"]["m"].shape != P or out["adam"]["v"].shape != P)):
        raise CheckpointError(f"{path} holds inconsistent array shapes; use an intact checkpoint")
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
