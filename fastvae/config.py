"""Validated configuration dataclasses.

``ModelConfig`` fixes the architecture (and so the parameter layout),
``TrainConfig`` the optimisation, ``DataConfig`` where the images come from.
All three round-trip through plain JSON (``to_dict`` / ``from_dict``) so that a
checkpoint holds them as text, never as pickled objects.

Every field is checked in ``__post_init__``; a bad value raises
:class:`fastvae.errors.ConfigError` naming the field and the accepted values.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from fastvae.nn.architectures import (ARCHS, DERIVING_FIELDS, POSTERIORS, check_layer_specs, conv_layer_specs,
                            mlp_layer_specs)
from fastvae.backends.cpu.gemm_library import CHOICES as BLAS_CHOICES
from fastvae.checks import _choice, _finite_nonneg, _positive_int, _seed, _sigma
from fastvae.errors import ConfigError
from fastvae.naming import option
from fastvae.nn.opcodes import ACTIVATIONS, LIKELIHOODS  # noqa: F401  (re-exported: the names users choose from)

DTYPES = ("float32", "float64")
INITS = ("pytorch", "xavier")
BETA_SCHEDULES = ("constant", "linear", "sigmoid", "cyclical")
LR_SCHEDULES = ("constant", "step", "cosine")


class _JSONMixin:
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ConfigError(f"a {cls.__name__} must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} field(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def _check_flags(self):
        """Every ``bool`` field must hold True or False: a config read from a
        file could say "no", which Python would take as true."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type not in ("bool", bool):
                continue
            if type(v).__name__ not in ("bool", "bool_"):       # Python's or NumPy's bool
                raise ConfigError(f"{f.name} must be true or false, got {v!r}")
            setattr(self, f.name, bool(v))


@dataclass
class ModelConfig(_JSONMixin):
    """Architecture of an MLP VAE.

    input_dim: pixels per image D (e.g. 784 for 28x28).
    hidden: encoder hidden widths, e.g. ``[400]``; ``[]`` gives linear heads.
    latent_dim: size L of ``z``.
    decoder_hidden: decoder hidden widths; ``None`` mirrors ``hidden``.
    activation: hidden-layer nonlinearity, one of ``ACTIVATIONS``.
    likelihood: ``bernoulli`` (decoder outputs logits, binary cross-entropy;
        continuous targets in [0, 1] allowed), ``gaussian`` (decoder outputs the
        mean, fixed ``sigma``, a true log-density in nats) or ``mse`` (sum of
        squared errors per image, the seeds' variant; not a normalised density).
    sigma: standard deviation of the Gaussian likelihood (pixel units).
    dtype: ``float32`` (default) or ``float64``.
    init: ``pytorch`` (``nn.Linear`` default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for weights and biases) or ``xavier`` (Glorot & Bengio 2010, uniform,
        zero biases).
    leaky_slope, elu_alpha: parameters of those activations.
    image_shape: ``(H, W)`` or ``(H, W, C)`` used only to draw pictures.
    arch: ``mlp`` (default) or ``conv``: which stack ``layers=None`` derives.
        ``conv`` needs ``image_shape``: on 28x28 it is the Hasktorch seed's
        ConvNet, on 64x64 the net of Burgess et al. 2018 (see
        :func:`conv_layer_specs`).
    posterior: ``gaussian`` (default) or ``iaf``: ``flows`` inverse
        autoregressive flow steps after the sampler (Kingma et al. 2016), each
        a MADE with one hidden layer of ``flow_hidden`` units; the KL is then
        the single-sample estimate (see :mod:`fastvae.nn.layers.flow`).
        ``flow_context`` (default true): the encoder also outputs a context
        ``h`` of ``latent_dim`` units that every step's MADE reads (Kingma et
        al. 2016, Sec. 4); false: the steps see z only (files written before
        the context existed read as false).
    layers: the architecture as data, a list of layer specs (JSON objects)
        walked in order from image to likelihood; ``None`` (default) derives
        the ``arch`` stack from ``hidden``, ``latent_dim``, ``decoder_hidden``,
        ``activation``, ``likelihood`` and ``sigma`` (see
        :func:`mlp_layer_specs`). Spec types, all with a unique ``name``:
        ``{"type": "dense", "units": N, "activation": A}`` (optionally
        ``"parts": [names]``: one GEMM stored as several named tensors, as the
        ``mu | logvar`` head is), ``{"type": "conv2d", "channels": F,
        "kernel": k, "stride": s, "padding": p, "activation": A}``,
        ``{"type": "conv_transpose2d", ..., "output_padding": op}`` (same keys
        plus output_padding), ``{"type": "reshape", "shape": [C, H, W]}``,
        ``{"type": "gaussian", "latent_dim": L}``
        (the reparameterized sampler and its KL; ``"context": C`` when the
        head after ``[mu | logvar]`` holds the IAF steps' context h of C units), ``{"type": "iaf", "hidden":
        H, "activation": A, "reverse": bool}`` (a flow step, right after the
        sampler) and ``{"type": "likelihood",
        "kind": K, "sigma": S}`` (sigma may be left out: the config's). Checked
        here for types and values, and against ``latent_dim``, ``likelihood``,
        ``sigma``, ``posterior`` and ``flows`` (``fastvae.train`` and ``fastvae
        train --layers FILE`` read those off the stack:
        :func:`~fastvae.nn.architectures.fields_of_layers`); shapes are checked
        when the layers are built (``fastvae.nn.layers.build``).
    """

    input_dim: int = 784
    hidden: List[int] = field(default_factory=lambda: [400])
    latent_dim: int = 20
    decoder_hidden: Optional[List[int]] = None
    activation: str = "relu"
    likelihood: str = "bernoulli"
    sigma: float = 0.1
    dtype: str = "float32"
    init: str = "pytorch"
    leaky_slope: float = 0.01
    elu_alpha: float = 1.0
    image_shape: Optional[Tuple[int, ...]] = None
    arch: str = "mlp"
    posterior: str = "gaussian"
    flows: int = 0
    flow_hidden: int = 200
    flow_context: bool = True
    layers: Optional[List[dict]] = None

    def __post_init__(self):
        _positive_int("input_dim", self.input_dim)
        _positive_int("latent_dim", self.latent_dim)
        for name in ("hidden",) + (("decoder_hidden",) if self.decoder_hidden is not None else ()):
            widths = getattr(self, name)          # a list of widths; a lone one was "'int' object is not iterable"
            if isinstance(widths, (str, bytes, bool)) or not hasattr(widths, "__iter__"):
                raise ConfigError(f"{name} is a list of layer widths, got {widths!r}; e.g. {name}=[400] (one "
                                  f"layer), [512, 256], or [] for none")
            setattr(self, name, [h.__index__() if hasattr(h, "__index__") and not isinstance(h, bool) else h
                                 for h in widths])            # NumPy integers as ints
            for h in getattr(self, name):
                _positive_int(f"each {name} width", h)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("likelihood", self.likelihood, LIKELIHOODS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("init", self.init, INITS)
        _sigma(self.sigma, self.dtype, self.input_dim)
        _finite_nonneg("leaky_slope", self.leaky_slope)
        _finite_nonneg("elu_alpha", self.elu_alpha, positive=True)
        if self.image_shape is not None:
            self.image_shape = tuple(int(s) for s in self.image_shape)
            if math.prod(self.image_shape) != self.input_dim:
                raise ConfigError(
                    f"image_shape {self.image_shape} has {math.prod(self.image_shape)} pixels "
                    f"but input_dim is {self.input_dim}")
        _choice("arch", self.arch, ARCHS)
        _choice("posterior", self.posterior, POSTERIORS)
        if isinstance(self.flows, bool) or not isinstance(self.flows, int) or self.flows < 0:
            raise ConfigError(f"flows must be a non-negative integer, got {self.flows!r}")
        _positive_int("flow_hidden", self.flow_hidden)
        if (self.posterior == "iaf") != (self.flows > 0):
            raise ConfigError(f"posterior {self.posterior!r} with flows {self.flows}: {option('posterior', 'iaf')} "
                              f"needs {option('flows')} of 1 or more, and {option('flows')} needs "
                              f"{option('posterior', 'iaf')}")
        if self.layers is None:
            self.layers = mlp_layer_specs(self) if self.arch == "mlp" else conv_layer_specs(self)
        else:
            self.layers = check_layer_specs(self, self.layers)

    @classmethod
    def from_dict(cls, d: dict):
        """As the other configs; a file written before ``flow_context``
        existed holds an IAF posterior without the context."""
        if isinstance(d, dict) and "flow_context" not in d and d.get("posterior") == "iaf":
            d = {**d, "flow_context": False}
        return super().from_dict(d)

    @property
    def decoder_widths(self) -> List[int]:
        """Decoder hidden widths (mirror of the encoder unless given)."""
        return list(reversed(self.hidden)) if self.decoder_hidden is None else list(self.decoder_hidden)

    def replace(self, **changes):
        """A copy with ``changes``; changing an MLP-form field re-derives ``layers``."""
        if set(changes) & set(DERIVING_FIELDS) and "layers" not in changes:
            changes["layers"] = None
        return dataclasses.replace(self, **changes)


OBJECTIVES = ("elbo", "iwae", "btcvae")
TC_ESTIMATORS = ("mss", "mws")


@dataclass
class TrainConfig(_JSONMixin):
    """Optimisation settings: the experiment, saved in every checkpoint. Where
    it runs (backend, threads, GEMM library, TF32, CUDA graphs) is a
    :class:`RunSettings`, chosen anew by each run, a resume included.

    epochs: number of passes over the training split (a total, also on resume).
    batch_size: images per step; the last partial batch is kept (as PyTorch's
        ``DataLoader`` does by default), unless beta-TCVAE would get one image.
    lr, betas, adam_eps, weight_decay: Adam (Kingma & Ba 2015, Algorithm 1);
        ``decoupled_weight_decay=True`` gives AdamW (Loshchilov & Hutter 2019).
    lr_schedule: ``constant``, ``step`` (multiply by ``lr_gamma`` every
        ``lr_step_epochs``) or ``cosine`` (to ``lr_min`` at the last step).
    beta_schedule: KL weight schedule, see :mod:`fastvae.optim.schedules`;
        ``beta_max`` the final/peak weight; ``beta_delay`` and ``beta_warmup``
        in epochs (fractions allowed); ``beta_cycles`` and ``beta_ratio`` for the
        cyclical schedule (Fu et al. 2019).
    binarize: dynamic binarization (resample x ~ Bernoulli(pixel) every step).
    seed: seeds initialisation, shuffling, ``eps`` and binarization.
    loss_every: compute the scalar loss every N steps only (and at each epoch's
        last step); the epoch's train metrics are means over those steps.
        1 (default) gives exact epoch means; larger values skip the loss
        reductions on the other steps (the gradient is the same).
    clip_grad_norm: rescale the whole gradient to this global L2 norm when it
        is larger (Pascanu et al. 2013); None (default) never clips.
    objective: ``elbo`` (the beta-weighted ELBO), ``iwae`` (the K-sample
        importance-weighted bound of Burda et al. 2016; beta does not apply) or
        ``btcvae`` (Chen et al. 2018: beta weighs only the total correlation);
        see :mod:`fastvae.objectives.iwae` and :mod:`fastvae.objectives.btcvae`.
    iwae_k: K, the samples per image of the ``iwae`` objective.
    tc_estimator: beta-TCVAE's estimator of the aggregate posterior,
        ``mss`` (minibatch-stratified sampling, the default) or ``mws``
        (minibatch-weighted; Chen et al. 2018, Appendix C).
    dwkl_warmup: beta-TCVAE's dimension-wise KL warm-up in epochs: its weight
        rises linearly from 0.05 to 1 (the official code's ``--lambda-anneal``);
        0 (default) keeps it at 1. With a linear beta warm-up over the same
        time it is the annealing of the paper's code.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    lr_schedule: str = "constant"
    lr_step_epochs: int = 10
    lr_gamma: float = 0.5
    lr_min: float = 0.0
    beta_schedule: str = "constant"
    beta_max: float = 1.0
    beta_delay: float = 0.0
    beta_warmup: float = 0.0
    beta_cycles: int = 4
    beta_ratio: float = 0.5
    binarize: bool = False
    seed: int = 0
    loss_every: int = 1
    clip_grad_norm: Optional[float] = None
    objective: str = "elbo"
    iwae_k: int = 5
    tc_estimator: str = "mss"
    dwkl_warmup: float = 0.0

    def __post_init__(self):
        self._check_flags()
        _choice("objective", self.objective, OBJECTIVES)
        _positive_int("iwae_k", self.iwae_k)
        _choice("tc_estimator", self.tc_estimator, TC_ESTIMATORS)
        _finite_nonneg("dwkl_warmup", self.dwkl_warmup)
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        _positive_int("batch_size", self.batch_size)
        _finite_nonneg("lr (learning rate)", self.lr, positive=True)
        try:                                      # one number was "'float' object is not iterable"
            betas = tuple(float(b) for b in self.betas)
        except (TypeError, ValueError):
            betas = ()
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"Adam betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = betas
        _finite_nonneg("adam_eps", self.adam_eps, positive=True)
        _finite_nonneg("weight_decay", self.weight_decay)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _positive_int("lr_step_epochs", self.lr_step_epochs)
        _finite_nonneg("lr_gamma", self.lr_gamma, positive=True)
        _finite_nonneg("lr_min", self.lr_min)
        _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _finite_nonneg("beta_max", self.beta_max)
        _finite_nonneg("beta_delay", self.beta_delay)
        _finite_nonneg("beta_warmup", self.beta_warmup)
        _positive_int("beta_cycles", self.beta_cycles)
        _finite_nonneg("beta_ratio", self.beta_ratio, positive=True)
        if self.beta_ratio > 1:
            raise ConfigError(f"beta_ratio must be in (0, 1], got {self.beta_ratio!r}")
        _seed("seed", self.seed)
        _positive_int("loss_every", self.loss_every)
        if self.clip_grad_norm is not None:
            _finite_nonneg("clip_grad_norm", self.clip_grad_norm, positive=True)


    @classmethod
    def from_dict(cls, d: dict):
        """As the other configs; the run settings that files written before
        :class:`RunSettings` hold among these fields are left out (they are
        read by :meth:`RunSettings.from_legacy`)."""
        if isinstance(d, dict):
            d = {k: v for k, v in d.items() if k not in RUN_SETTINGS}
            if d.get("objective") == "btcvae":            # written before the choice: trained with MWS
                d.setdefault("tc_estimator", "mws")
        return super().from_dict(d)


RUN_SETTINGS = ("backend", "threads", "blas", "tf32", "cuda_graph")


@dataclass
class RunSettings(_JSONMixin):
    """Where and how one run computes, apart from the experiment (:class:`TrainConfig`):
    chosen by each run (a resume too) and recorded beside the experiment in
    its checkpoint, never taken back from it.

    backend: compute backend name (see :func:`fastvae.backends.available`), or
        ``"auto"`` (the default): ``cupy`` with a usable GPU, else ``numba``, else
        ``numpy`` (:func:`fastvae.backends.resolve`); a Trainer records the backend it chose.
    threads: BLAS/Numba threads (None: the libraries' defaults, measured
        fastest on an idle 2-core machine; ``"auto"``: measured at the start
        of training on the model's own step, see :func:`fastvae.backends.cpu.threads.autotune`;
        OpenBLAS splits some GEMMs differently by thread count, so the float32
        rounding, and a bit-for-bit resume, then depend on the choice).
    blas: the CPU backends' GEMM library: None or ``numpy`` (NumPy's BLAS),
        ``mkl`` (Intel MKL, the ``mkl`` extra) or ``auto`` (the faster one on
        the model's own step, measured once per machine and cached); see
        :mod:`fastvae.backends.cpu.gemm_library`. Libraries round differently in the last bits.
    tf32: let cuBLAS use TF32 tensor cores for float32 GEMMs (cupy backend
        only; faster, ~1e-3 relative error per product instead of ~1e-7).
    cuda_graph: replay each training step as one CUDA graph (cupy backend,
        one process, not with ``tf32``: its GEMMs run on fastvae's own kernel
        in plain float32, as CuPy refuses cuBLAS inside a capture); see
        :mod:`fastvae.backends.cupy.cuda_graph`.
    """

    backend: str = "auto"
    threads: Optional[object] = None
    blas: Optional[str] = None
    tf32: bool = False
    cuda_graph: bool = False

    def __post_init__(self):
        self._check_flags()
        if self.tf32 and self.backend not in ("cupy", "auto"):
            raise ConfigError(f"tf32 applies to the cupy backend only; drop {option('tf32')} or use "
                              f"{option('backend', 'cupy')}")
        if self.cuda_graph and self.backend not in ("cupy", "auto"):
            raise ConfigError(f"cuda_graph applies to the cupy backend only; drop {option('cuda_graph')} or use "
                              f"{option('backend', 'cupy')}")
        if self.cuda_graph and self.tf32:
            raise ConfigError(f"tf32 applies to cuBLAS GEMMs, and the steps of {option('cuda_graph')} run on fastvae's "
                              f"own GEMM kernel in plain float32 (CuPy refuses cuBLAS inside a graph capture); drop "
                              f"{option('tf32')} or {option('cuda_graph')}")
        if self.threads is not None and self.threads != "auto":
            _positive_int("threads", self.threads)
        if self.blas is not None:
            _choice("blas", self.blas, BLAS_CHOICES)
            if self.backend == "cupy":
                raise ConfigError(f"blas applies to the CPU backends only (cupy uses cuBLAS); drop {option('blas')}")
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError(f"backend must be a backend name, got {self.backend!r}")


    @classmethod
    def from_legacy(cls, train: dict) -> "RunSettings":
        """The settings a checkpoint written before the split recorded in its
        train config; ConfigError for an invalid one."""
        return cls(**{k: train[k] for k in RUN_SETTINGS if k in train})


BUILTIN_DATASETS = ("sprites", "mnist", "fashion-mnist", "kmnist", "olivetti")
IN_MEMORY = "in-memory:"        # the recorded name of data handed over in memory: nothing to load it from


@dataclass
class DataConfig(_JSONMixin):
    """Where the images come from.

    dataset: a built-in name (``sprites``, ``mnist``, ``fashion-mnist``,
        ``kmnist``, ``olivetti``) or a path to a folder of images or an
        ``.npy`` / ``.npz`` / ``.h5`` file (made absolute when it exists, so a
        run's checkpoint finds it from any directory).
    data_dir: folder of the idx or Olivetti files (built-in real datasets; absolute).
    download: fetch missing idx files from the standard mirrors (md5-checked).
    image_size: ``(H, W)`` to resize folder images to; ``None`` keeps their size.
    color: ``grayscale`` or ``rgb`` for image folders.
    n_sprites: number of procedural sprites (train + test).
    data_seed: seed of the procedural sprites and of random splits.
    test_fraction: share held out as the test split where a dataset has none.
    skip_other_files: ignore non-image files in an image folder (else an error).
    memory_budget_mb: an ``.npy``/HDF5 file whose loading (the array and its
        float32 copy) takes more than this (MiB) is streamed from disk in chunks
        (:mod:`fastvae.datasets.streaming`); None: half the free memory.
    """

    dataset: str = "sprites"
    data_dir: Optional[str] = None
    download: bool = True
    image_size: Optional[Tuple[int, int]] = None
    color: str = "grayscale"
    n_sprites: int = 12000
    data_seed: int = 0
    test_fraction: float = 0.1
    skip_other_files: bool = False
    memory_budget_mb: Optional[float] = None

    def __post_init__(self):
        self._check_flags()
        if self.memory_budget_mb is not None:
            _finite_nonneg("memory_budget_mb", self.memory_budget_mb)
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError("dataset must be a built-in name or a path")
        path = os.path.expanduser(self.dataset)
        if self.dataset not in BUILTIN_DATASETS and not self.dataset.startswith(IN_MEMORY) and os.path.exists(path):
            self.dataset = os.path.abspath(path)     # a relative path recorded in a run broke eval from elsewhere
        if self.data_dir is not None:
            self.data_dir = os.path.abspath(os.path.expanduser(os.fspath(self.data_dir)))
        if self.image_size is not None:
            self.image_size = tuple(int(s) for s in self.image_size)
            if len(self.image_size) != 2 or min(self.image_size) <= 0:
                raise ConfigError(f"image_size must be two positive integers (H, W), got {self.image_size!r}")
        _choice("color", self.color, ("grayscale", "rgb"))
        _positive_int("n_sprites", self.n_sprites)
        _seed("data_seed", self.data_seed)            # a negative one reached NumPy's ValueError
        _finite_nonneg("test_fraction", self.test_fraction)
        if self.test_fraction >= 1:
            raise ConfigError(f"test_fraction must be below 1, got {self.test_fraction!r}")


def check_data_dir(dataset, data_dir) -> None:
    """ConfigError when ``data_dir`` is given beside data that never reads it:
    only the built-in datasets stored as files (MNIST family, Olivetti) are
    read from a data folder, not the generated sprites, a path or images in
    memory (``dataset`` not a string). Options named as
    :func:`fastvae.naming.option` spells them."""
    stored = [d for d in BUILTIN_DATASETS if d != "sprites"]
    if data_dir is not None and not (isinstance(dataset, str) and dataset in stored):
        what = dataset if isinstance(dataset, str) else "data given in memory"
        raise ConfigError(f"{option('data_dir')} is where a built-in dataset's files are ({', '.join(stored)}); "
                          f"{what} does not read it: drop it, or give the data's path in {option('dataset')}")


def default_batch_size(n_train: int):
    """``(batch_size, note)`` of a run that names none: TrainConfig's 128, or
    all ``n_train`` training images when there are fewer (one step an epoch;
    it refused a small dataset over a setting the user never gave), with a
    note to print once the data passed its checks ('' for the default)."""
    default = TrainConfig().batch_size
    if 0 < n_train < default:
        return n_train, (f"fastvae: note: batch_size {n_train}, every training image: the default {default} is "
                         f"more than the {n_train} there (set it with {option('batch_size')})")
    return default, ""
