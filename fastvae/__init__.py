"""fastvae: variational autoencoders with hand-derived gradients on NumPy,
Numba and CuPy backends, one Adam, one portable HDF5 checkpoint format.

Public API::

    fastvae.VAE            the model (forward, hand-derived backward)
    fastvae.Trainer        the training loop, run folders, resume
    fastvae.train(...)     train in one call
    fastvae.load(path)     a VAE from a checkpoint, on any backend
    fastvae.evaluate(...)  -ELBO, reconstruction and KL over a split
    fastvae.backends       the backend registry (available(), get())
    fastvae.datasets       loaders and the built-in sprites
    ModelConfig, TrainConfig, DataConfig   the experiment (saved in every checkpoint)
    RunSettings            where one run computes (backend, threads, GEMM library, TF32, CUDA graphs)
    Adam, ParamLayout, errors

Layout (each package's docstring says what lives there and what it may import)::

    errors, config, naming, checks, options, cache
                 the shared vocabulary: errors, the config dataclasses, option
                 spelling, value checks, the user cache folder
    nn/          the model: walk, flat layout, layers/ (one file per layer type),
                 architectures, op codes
    objectives/  the training objectives, one protocol (ELBO, IWAE, beta-TCVAE)
    optim/       Adam over the flat buffer, schedules
    backends/    the primitive contract, NumPy reference, Numba, cupy/, cpu/ tuning
    training/    the Trainer and its parts, run folder, signals, MPI, memory
    datasets/    loaders, sprites, idx, array files, streaming
    io/          untrusted files (HDF5 in a sandboxed child), the checkpoint format
    explore/     evaluation, metrics, latent arithmetic, inpainting, pictures
    bench/       the benchmark harness, timing, workloads, PyTorch twin
    cli/         the command line (the library never imports it)
    kernels/     compute kernels only (Numba, CUDA C): installed as fastvae.kernels
"""

__version__ = "0.2.0"

from typing import Optional  # noqa: E402

from fastvae import backends, datasets  # noqa: E402
from fastvae.config import DataConfig, ModelConfig, RunSettings, TrainConfig  # noqa: E402
from fastvae.errors import (BackendUnavailableError, CheckpointError, ConfigError,  # noqa: E402
                     DataError, FastVAEError, RunFolderError, TrainingDivergedError, TrainingInterrupted)
from fastvae.explore.evaluation import evaluate  # noqa: E402
from fastvae.nn.layout import ParamLayout  # noqa: E402
from fastvae.nn.model import VAE  # noqa: E402
from fastvae.optim.adam import Adam  # noqa: E402
from fastvae.training.trainer import Trainer  # noqa: E402


_SUBPACKAGES = ("explore", "nn", "objectives", "optim", "training", "io", "bench")


def __getattr__(name):
    """``fastvae.explore`` and the other packages, imported on first use
    (PEP 562) so that ``import fastvae`` stays light."""
    if name in _SUBPACKAGES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fastvae' has no attribute {name!r}")


def load(path, backend=None) -> VAE:
    """Load a checkpoint (``path``: the file, or the run folder holding
    ``checkpoint.h5``) into a :class:`VAE` on ``backend`` (default: the
    backend that wrote it, or ``numpy`` when that one cannot run here; see
    :mod:`fastvae.io.restore`).

    The returned model carries ``model.checkpoint``: ``{"train", "data",
    "history", "epoch", "step", "data_rows", "meta", "adam_t"}`` from the file
    (``data_rows``: training and test images of the run, None in older files). Raises
    CheckpointError for a missing, foreign, damaged or other-version file.
    """
    from fastvae.io.restore import load_model
    model, data = load_model(path, backend)
    model.checkpoint = {"train": data["config"].get("train"), "data": data["config"].get("data"),
                        "history": data["history"], "epoch": data["state"].get("epoch"),
                        "step": data["state"].get("step"), "data_rows": data["state"].get("data_rows"),
                        "meta": data["meta"],
                        "adam_t": None if data["adam"] is None else data["adam"]["t"]}
    return model


def train(dataset="sprites", out: Optional[str] = None, progress: bool = False, force: bool = False,
          extensions=None, **kwargs) -> Trainer:
    """Train a VAE in one call and return the finished :class:`Trainer`.

    ``dataset``: a name/path, a loaded :class:`~fastvae.datasets.Dataset`, or
    images as an array, tensor or list (:func:`fastvae.datasets.from_arrays`: ``(N, H, W[, C])``
    or ``(N, D)``, uint8 or float in [0, 1]; a seeded 10 % test split).
    Keyword arguments go to :class:`ModelConfig`, :class:`TrainConfig`,
    :class:`DataConfig` or :class:`RunSettings` by name (e.g. ``hidden=[400], latent_dim=20,
    epochs=10, batch_size=128, lr=1e-3, backend="numba", data_dir=...``); ``backend``
    defaults to ``"auto"`` (cupy with a usable GPU, else numba, else numpy), and the
    run's first line on stderr says which and why (:meth:`Trainer.start_line`).
    ``input_dim`` and ``image_shape`` default to the data's; ``layers`` (a
    stack of your own, :class:`ModelConfig`) sets ``latent_dim``, the likelihood
    and the flows unless given, and refuses ``hidden``, ``arch`` and the other
    fields that only shape the built-in stacks (ConfigError). ``out``: the
    run folder, checked as ``fastvae train --out`` checks it before any data
    loads (:func:`fastvae.training.runfolder.check_out`): a folder already holding a
    run or other files raises RunFolderError unless ``force``. ``extensions``:
    objects called every N epochs or steps, e.g. a
    :class:`~fastvae.training.extensions.TensorBoardWriter`
    (:mod:`fastvae.training.extensions`).
    """
    import dataclasses as dc
    import difflib
    from fastvae.config import check_data_dir, default_batch_size
    from fastvae.naming import FIELD_OF_FLAG
    from fastvae.options import idle_option
    import numpy as np
    fields = {c: {f.name for f in dc.fields(c)} for c in (ModelConfig, TrainConfig, DataConfig, RunSettings)}
    unknown = set(kwargs) - set().union(*fields.values())
    if unknown:
        known = sorted(set().union(*fields.values()))
        hints = []
        for name in sorted(unknown):
            near = [FIELD_OF_FLAG[name]] if name in FIELD_OF_FLAG else difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {near[0]}=?)" if near else ""))
        raise ConfigError(f"unknown option(s) {', '.join(hints)} for fastvae.train; it takes the fields of "
                          "ModelConfig, TrainConfig, DataConfig and RunSettings")
    pick = lambda c: {k: v for k, v in kwargs.items() if k in fields[c]}
    idle = idle_option(kwargs)
    if idle:
        raise ConfigError(idle)
    if kwargs.get("layers") is not None:            # the stack's latent_dim, likelihood and flows, unless given
        from fastvae.nn.architectures import fields_of_layers
        kwargs = {**fields_of_layers(kwargs["layers"]), **kwargs}
    if out is not None:
        from fastvae.training.runfolder import check_out
        out = check_out(out, force=force)
    datasets.check_folder_options(dataset, kwargs.get("image_size"), kwargs.get("color", "grayscale"), ConfigError)
    data, dcfg = datasets.given(dataset, DataConfig(**pick(DataConfig)))     # a path, a Dataset, arrays, lists
    check_data_dir(dcfg.dataset if data is None else data, dcfg.data_dir)
    if data is None:
        data = datasets.load(dcfg)
    else:
        dcfg = dcfg.replace(dataset=datasets.in_memory(data.name))
    batch_note = ""
    if "batch_size" not in kwargs:                  # the default, or every image of a small dataset
        kwargs["batch_size"], batch_note = default_batch_size(len(data.x_train))
    mk = pick(ModelConfig)
    mk.setdefault("input_dim", data.input_dim)
    mk.setdefault("image_shape", data.image_shape if np.prod(data.image_shape) == data.input_dim else None)
    trainer = Trainer(ModelConfig(**mk), TrainConfig(**pick(TrainConfig)), dcfg, dataset=data,
                      out=out, progress=progress, extensions=extensions, settings=RunSettings(**pick(RunSettings)))
    import sys
    print(f"fastvae: {trainer.start_line()}", file=sys.stderr)
    if batch_note:                                  # once the data passed its checks
        print(batch_note, file=sys.stderr)
    trainer.fit(pictures=out is not None)
    return trainer


__all__ = ["VAE", "Trainer", "train", "load", "evaluate", "backends", "datasets", "Adam",
           "ParamLayout", "ModelConfig", "TrainConfig", "DataConfig", "RunSettings", "FastVAEError",
           "ConfigError", "DataError", "CheckpointError", "BackendUnavailableError",
           "TrainingDivergedError", "TrainingInterrupted", "RunFolderError", "__version__"]
