"""The one way a checkpoint becomes a model: shared by :func:`fastvae.load`,
:meth:`fastvae.VAE.load_checkpoint` and ``fastvae train --resume``
(:meth:`fastvae.Trainer.from_checkpoint`).

Backend policy (one for every entry point): a backend the caller names is
used or refused with the reason; otherwise the backend that wrote the file
is used when it can run here, else ``numpy`` (with a one-line notice on
stderr), so a model trained on a GPU opens and resumes on a laptop.
"""

from __future__ import annotations

import sys
from typing import Optional

from fastvae import backends
from fastvae.io.checkpoint import load_params, read_checkpoint
from fastvae.config import ModelConfig
from fastvae.errors import CheckpointError, ConfigError
from fastvae.nn.model import VAE
from fastvae.naming import option
from fastvae.training.runfolder import checkpoint_path


def choose_backend(requested: Optional[str], written: Optional[str]) -> str:
    """The backend to restore on: ``requested`` when given (unavailability is
    raised later by ``backends.get`` with the reason), else ``written`` when it
    runs here, else ``numpy``."""
    if requested:
        return requested
    ok = {b["name"]: (b["available"], b["reason"]) for b in backends.available()}
    if written in ok and ok[written][0]:
        return written
    if written and written != "numpy":
        why = ok[written][1] if written in ok else "unknown here"
        print(f"fastvae: note: the checkpoint was written on backend {written!r}, which cannot run here "
              f"({why}); using numpy", file=sys.stderr)
    return "numpy"


def choose_blas(requested: Optional[str], written: Optional[str], backend: str) -> Optional[str]:
    """The GEMM library (``--blas``) to resume with: none on the GPU;
    ``requested`` when given; else ``written`` unless that was ``mkl`` and
    MKL does not load here (then NumPy's BLAS, with a note)."""
    if backend == "cupy":
        return None
    if requested:
        return requested
    if written == "mkl":
        from fastvae.backends.cpu.gemm_library import available
        if "mkl" not in available():
            print(f"fastvae: note: the checkpoint's run used {option('blas', 'mkl')}, which is not installed here; "
                  "using numpy's BLAS", file=sys.stderr)
            return None
    return written


def model_config(data: dict, path) -> ModelConfig:
    """The model config of a checkpoint (``read_checkpoint`` output), checked
    against the file before any model is built: it parses, its layers chain,
    and their parameter layout is the file's. A crafted config met the
    model's own checks only: a convolution wider than its input was called
    a user's mistake ("use a smaller kernel"), and layer sizes claiming 260
    billion parameters for a file of 165,000 were refused as too large for
    memory. CheckpointError for each."""
    from fastvae.nn import layers
    from fastvae.nn.layout import ParamLayout
    try:
        mc = ModelConfig.from_dict(data["config"]["model"])
        stack = layers.build(mc)
        layers.sampler_index(stack)                 # raise as VAE() would for a stack without them
        layers.decoder_index(stack)
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} holds an invalid model config ({exc}); use a checkpoint written "
                              "by fastvae") from None
    try:
        ParamLayout.for_layers(stack).check_table(data["layout"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: its model config and its parameters disagree ({exc}); use a checkpoint "
                              "written by fastvae") from None
    return mc


def load_model(path, backend: Optional[str] = None):
    """``(model, data)`` for ``path``, a checkpoint or the run folder holding
    one: a :class:`fastvae.VAE` built from the checkpoint's own
    config on the backend chosen by :func:`choose_backend`, its parameters
    loaded (:func:`fastvae.io.checkpoint.load_params`), and the checkpoint's host data. Raises CheckpointError for a bad
    file, BackendUnavailableError for a named backend that cannot run."""
    path = checkpoint_path(path)
    data = read_checkpoint(path)
    model = VAE(model_config(data, path), choose_backend(backend, data["meta"].get("backend")))
    load_params(model, data, path)
    return model, data


def data_rows(data) -> list:
    """``[training images, test images]`` of a Dataset (streamed splits included)."""
    return [0 if x is None else int(x.shape[0]) for x in (data.x_train, data.x_test)]


def data_change_note(state: dict, data) -> str:
    """'' when ``data`` has the training split size the run recorded
    (``state["data_rows"]``, absent in checkpoints before it was recorded),
    else a note: data that gained or lost images since training draws its
    random test split anew, so the split can hold images the model trained on
    (and the reverse). A test split alone of another size is no such change:
    a file's own ``x_test``, or the part of the held-out rows a streamed file
    once kept in memory (all are kept now). Nor is a training split that was not
    loaded (0 rows: ``fastvae eval`` of MNIST reads its test files alone)."""
    then, now = state.get("data_rows"), data_rows(data)
    if then is None or now[0] in (0, then[0]):
        return ""
    return (f"the data has changed since this run was trained: {then[0]} training and {then[1]} test images "
            f"then, {now[0]} and {now[1]} now; a random test split is drawn again from the images there are, "
            "so it may hold images the model trained on (evaluate on the data it was trained on, or on data "
            "it never saw)")
