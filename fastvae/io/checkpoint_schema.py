"""What the JSON parts of a checkpoint may hold (types, ranges, nesting, sizes).

A checkpoint is untrusted input (:mod:`fastvae.io.safe_files`): after its bytes
pass the SHA-256 header, every JSON text is checked here before any of it
is used, so a crafted file ends in one :class:`~fastvae.errors.CheckpointError`
line instead of a traceback deep in the trainer.

``layout``  list of ``{"name": str, "shape": [int >= 0, ...], "offset": int >= 0}``
            (at most 4 dimensions), contiguous and in order;
``config``  ``{"model": {...}, "train": {...}, "data": {...}}``, each built
            through its dataclass (which checks every field's range);
``state``   ``{"epoch": int >= 0, "step": int >= 0, "rng": {...}?, "partial": {...}?,
            "data_rows": [int >= 1, int >= 0]?}``;
``history`` list of flat objects whose values are numbers or null, each with
            an ``"epoch"`` int >= 0 (what fastvae writes: the plots and
            metrics.csv read every row so).
"""

from __future__ import annotations

import numpy as np

from fastvae.errors import CheckpointError
from fastvae.io.safe_files import check_type

MAX_TENSORS = 10_000
MAX_HISTORY = 1_000_000


def _error(path):
    """The exception factory every check of ``path`` raises through (one message form)."""
    return lambda msg: CheckpointError(f"{path}: {msg}; use a checkpoint written by fastvae")


def _fail(path, msg):
    raise _error(path)(msg)


def check_layout(layout, path) -> int:
    """Validate the layout table; returns the parameter count it describes."""
    err = _error(path)
    check_type(layout, list, "the layout", err)
    if len(layout) > MAX_TENSORS:
        _fail(path, f"the layout lists {len(layout)} tensors")
    offset = 0
    for i, row in enumerate(layout):
        check_type(row, dict, f"layout entry {i}", err)
        if set(row) != {"name", "shape", "offset"}:
            _fail(path, f"layout entry {i} has keys {sorted(row)[:5]}, not name/shape/offset")
        check_type(row["name"], str, f"layout entry {i} name", err)
        check_type(row["shape"], list, f"layout entry {i} shape", err)
        if len(row["shape"]) > 4:
            _fail(path, f"layout entry {i} has {len(row['shape'])} dimensions")
        size = 1
        for s in row["shape"]:
            size *= check_type(s, int, f"layout entry {i} shape", err, minimum=0)
        if check_type(row["offset"], int, f"layout entry {i} offset", err, minimum=0) != offset:
            _fail(path, f"layout entry {i} starts at {row['offset']}, expected {offset}")
        offset += size
    return offset


def check_state(state, path) -> None:
    err = _error(path)
    check_type(state, dict, "the training state", err)
    for key in ("epoch", "step"):
        if key not in state:
            _fail(path, f"the training state has no {key!r}")
        check_type(state[key], int, f"state {key!r}", err, minimum=0)
    if "rng" in state:              # absent: training continues from a stream derived from the step
        check_type(state["rng"], dict, "state 'rng'", err)
        from fastvae.backends import check_rng_state
        try:                        # as a resume's set_state would take it: a file load accepts, resume accepts
            check_rng_state(state["rng"])
        except ValueError as exc:
            _fail(path, str(exc))
    if "partial" in state:
        part = check_type(state["partial"], dict, "state 'partial'", err)
        for key, types in (("batch", int), ("counted", int), ("recon", (int, float)), ("kl", (int, float)),
                           ("loss", (int, float)), ("seconds", (int, float))):
            check_type(part.get(key), types, f"state 'partial.{key}'", err, minimum=0 if types is int else None)
        if set(part) - {"batch", "counted", "recon", "kl", "loss", "seconds"}:
            _fail(path, f"state 'partial' has unknown keys {sorted(part)[:6]}")
    if "data_rows" in state:        # [training images, test images] the run was trained on
        rows = check_type(state["data_rows"], list, "state 'data_rows'", err)
        if len(rows) != 2:
            _fail(path, f"state 'data_rows' holds {len(rows)} numbers, not 2")
        for n, least in zip(rows, (1, 0)):     # a run trained on at least one image
            check_type(n, int, "state 'data_rows'", err, minimum=least)


def check_history(history, path) -> None:
    err = _error(path)
    check_type(history, list, "the history", err)
    if len(history) > MAX_HISTORY:
        _fail(path, f"the history has {len(history)} rows")
    for i, row in enumerate(history):
        check_type(row, dict, f"history row {i}", err)
        check_type(row.get("epoch"), int, f"history row {i} 'epoch'", err, minimum=0)
        for k, v in row.items():       # the loss plot and metrics.csv read them as numbers
            check_type(v, (int, float, type(None)), f"history row {i} field {k[:30]!r}", err)


def check_config(config, path):
    """``(ModelConfig, TrainConfig, DataConfig)`` built from the config JSON."""
    from fastvae.config import DataConfig, ModelConfig, TrainConfig
    err = _error(path)
    check_type(config, dict, "the config", err)
    out = []
    for key, cls in (("model", ModelConfig), ("train", TrainConfig), ("data", DataConfig)):
        part = config.get(key, {} if key != "model" else None)
        check_type(part, dict, f"config {key!r}", err)
        try:
            out.append(cls.from_dict(part))
        except Exception as exc:   # the dataclasses raise ConfigError; odd types give TypeError etc.
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            _fail(path, f"invalid {key} config ({msg[:160]})")
    return tuple(out)


def check_run_settings(config, path):
    """The :class:`~fastvae.config.RunSettings` the file records (``"run"``;
    in files written before the split, inside the train config): what the
    run computed on, read for a resume's notes and choices, never applied."""
    from fastvae.config import RunSettings
    run = config.get("run")
    for key, read in (("train", lambda: RunSettings.from_legacy(config.get("train") or {})),
                      ("run", lambda: RunSettings.from_dict(run))):
        if key == "run" and run is None:
            break
        if key == "run":
            check_type(run, dict, "config 'run'", _error(path))
        try:
            settings = read()
        except Exception as exc:       # ConfigError from the dataclass; odd types give TypeError etc.
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            _fail(path, f"invalid {key} config ({msg[:160]})")
    return settings


def check_numbers(params, adam, path) -> None:
    """Parameters and Adam first moments finite, second moments >= 0: what
    every save writes (a diverged run is not saved). An infinite second
    moment is kept: one gradient past sqrt(max) makes it, finite weights
    with it, and its parameter only stops moving."""
    if not np.isfinite(params).all():
        _fail(path, "the parameters hold NaN or infinite values (a run is saved only while they are finite)")
    if adam is not None and not np.isfinite(adam["m"]).all():
        _fail(path, "the Adam first moments hold NaN or infinite values")
    if adam is not None and not (adam["v"] >= 0).all():
        _fail(path, "the Adam second moments hold negative or NaN values")


def check_all(data: dict, path) -> None:
    """Validate a ``read_checkpoint`` result in place (raises CheckpointError)."""
    n = check_layout(data["layout"], path)
    if data["params"].shape != (n,):
        _fail(path, f"the params hold {data['params'].shape} values but the layout describes {n}")
    check_numbers(data["params"], data["adam"], path)
    check_state(data["state"], path)
    check_history(data["history"], path)
    data["configs"] = check_config(data["config"], path)
    data["run_settings"] = check_run_settings(data["config"], path)
