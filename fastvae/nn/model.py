"""The VAE: a stack of layers walked forward, then backward in reverse.

Model (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"), as the
default MLP stack of :func:`fastvae.config.mlp_layer_specs`:

    encoder:  h = act(... act(x W1^T + b1) ...)
              [mu | logvar] = h Wh^T + bh                  (two heads, one GEMM)
    sampler:  z = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)       (Sec. 2.4)
    decoder:  logits = act(... z ...) Wo^T + bo
    per image i:  recon_i = -log p(x_i | z_i)  (summed over pixels)
                  kl_i = -1/2 sum_j (1 + logvar - mu^2 - exp(logvar))  (App. B)
    loss = mean_i (recon_i + beta * kl_i);  -ELBO = mean_i (recon_i + kl_i)

Every layer (``fastvae.nn.layers``) is a forward/backward pair; this module only
walks them. All parameters live in ``self.params`` (one flat buffer, see
:class:`fastvae.nn.layout.ParamLayout`, built by walking the layers);
``loss_and_grad`` writes every gradient into ``self.grads`` of the same
layout. Shapes: ``x (B, D)`` with pixel values in [0, 1], ``eps (B, L)``; all
arrays in the model's dtype on the backend's device. Work buffers are
allocated once per batch size and reused, so every call that uses them holds
``model.lock``: threads sharing a model take turns instead of overwriting
each other's buffers.
"""

from __future__ import annotations

import functools
import threading
from typing import Dict, Optional

import numpy as np

from fastvae import backends as _backends
from fastvae.nn import layers as _layers
from fastvae.training import memory as _memory
from fastvae.config import ModelConfig
from fastvae.checks import check_codes, check_count, check_images
from fastvae.errors import ConfigError
from fastvae.nn.layout import ParamLayout


def _exclusive(method):
    """Run ``method`` holding the model's lock (its workspaces and the
    backend's scratch buffers serve every call on the model)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return locked


class Workspace:
    """Buffers for one batch size ``B``: every layer's :class:`~fastvae.nn.layers.State`
    (``states[i]`` for ``layers[i]``), the batch ``x (B, D)`` and the noise
    ``eps (B, L)`` the trainer fills, and named views of the results of the
    last pass: ``head (B, 2L)``, ``mu``, ``logvar``, ``std``, ``z (B, L)``,
    ``kl (B,)``, ``logits (B, D)`` and ``nll (B,)`` (nats). ``head`` and
    ``logits`` are read from the layers' states when asked for: a reshape
    layer before the sampler or the likelihood has no buffer of its own and
    holds its input only once a pass has run (None before)."""

    def __init__(self, be, B, model):
        self.B = B
        layers, self._k = model.layers, model.sampler_at
        self.states = [layer.workspace(be, B, need_dx=i > 0) for i, layer in enumerate(layers)]
        L = model.config.latent_dim
        self.x = be.empty((B, model.config.input_dim))
        self.eps = be.empty((B, L))
        sampler = self.states[self._k]
        self.z, self.std, self.kl = sampler.y, sampler.std, sampler.kl
        self.nll = self.states[-1].y

    @property
    def head(self):
        return self.states[self._k - 1].y if self._k > 0 else None

    @property
    def logits(self):
        return self.states[-2].y

    @property
    def mu(self):
        return self.head[:, :self.z.shape[1]]

    @property
    def logvar(self):
        L = self.z.shape[1]
        return self.head[:, L:2 * L]


class VAE:
    """A variational autoencoder on a compute backend.

    Parameters
    ----------
    config : ModelConfig (its ``layers`` specs are the architecture)
    backend : str or Backend, default ``"numpy"`` (see :func:`fastvae.backends.available`).
    seed : int, initialisation seed (host-side NumPy PCG64, so every backend
        starts from identical weights).

    Raises ConfigError for a bad config or a layer stack whose sizes do not
    chain, BackendUnavailableError for a backend that cannot run here.
    """

    def __init__(self, config: ModelConfig, backend="numpy", seed: int = 0):
        if not isinstance(config, ModelConfig):
            raise ConfigError("VAE needs a fastvae.ModelConfig")
        self.config = config
        self.backend = _backends.get(backend, config.dtype)
        if self.backend.dtype != np.dtype(config.dtype):
            raise ConfigError(
                f"backend computes in {self.backend.dtype} but the model config says {config.dtype}")
        self.layers = _layers.build(config)
        self.sampler_at = _layers.sampler_index(self.layers)
        self.decoder_at = _layers.decoder_index(self.layers)       # after the flow steps, if any
        self.layout = ParamLayout.for_layers(self.layers)
        be = self.backend
        P = self.layout.size
        _memory.preflight(_memory.estimate(self.layers, P, be.dtype.itemsize, host=be.device == "cpu"), be,
                          f"a model of {P:,} parameters", _memory.smaller_model())
        try:
            self.params = be.zeros((P,))
            self.grads = be.zeros((P,))
        except MemoryError:
            raise ConfigError(f"out of memory allocating a model of {P:,} parameters; "
                              f"{_memory.smaller_model()}") from None
        self.p = self.layout.views(self.params)
        self.g = self.layout.views(self.grads)
        for layer in self.layers:
            layer.bind(self.layout, self.params, self.grads)
        self._ws: Dict[int, Workspace] = {}
        self.lock = threading.RLock()     # held while a call uses the workspaces (see the module docstring)
        self.init_params(seed)

    # ---- parameters ----------------------------------------------------------
    @property
    def num_params(self) -> int:
        return self.layout.size

    def init_params(self, seed: int = 0) -> None:
        """(Re)initialise every tensor on the host, layer by layer in order
        (``config.init``, see :meth:`fastvae.nn.layers.Dense.init_params`), then
        copy to the device."""
        rng = np.random.Generator(np.random.PCG64(seed))
        host = np.zeros(self.layout.size, dtype=np.float64)
        for layer in self.layers:
            layer.init_params(host, self.layout, rng, self.config.init)
        self.set_flat_params(host)

    def set_flat_params(self, host) -> None:
        """Copy a host vector of ``num_params`` values into the parameter buffer."""
        host = np.asarray(host)
        if host.shape != (self.layout.size,):
            raise ConfigError(f"expected {self.layout.size} parameters, got shape {host.shape}")
        self.backend.copy_(self.params, host.astype(self.backend.dtype, copy=False))

    def get_flat_params(self) -> np.ndarray:
        return self.backend.to_host(self.params).copy()

    def load_checkpoint(self, path) -> dict:
        """Load the parameters of a checkpoint into THIS model (see
        :func:`fastvae.io.checkpoint.load_params`). Raises CheckpointError when the
        file is not a valid fastvae checkpoint or was written for another
        architecture or dtype (the message names both); returns the
        checkpoint's host data."""
        from fastvae.io.checkpoint import load_params, read_checkpoint
        data = read_checkpoint(path)
        load_params(self, data, path)
        return data

    def state_dict(self) -> Dict[str, np.ndarray]:
        """``{name: host array}`` for every tensor (copies)."""
        host = self.get_flat_params()
        return {e.name: self.layout.view(host, e.name).copy() for e in self.layout}

    # ---- workspace -----------------------------------------------------------
    def workspace(self, B: int) -> Workspace:
        ws = self._ws.get(B)
        if ws is None:
            if len(self._ws) > 4:       # bounded: train batch, last batch, eval batch
                self._ws.clear()
            ws = self._ws[B] = Workspace(self.backend, B, self)
        return ws

    # ---- the walks -----------------------------------------------------------
    def walk(self, ws, start, stop, a, step):
        """Layers ``start .. stop - 1`` forward on workspace ``ws`` from input
        ``a`` with pass settings ``step`` (a :class:`~fastvae.nn.layers.Step`,
        or None outside training); returns the last layer's output. Objectives
        compose their passes from these spans (:attr:`sampler_at`,
        :attr:`decoder_at`, the likelihood last)."""
        be = self.backend
        for i in range(start, stop):
            a = self.layers[i].forward(be, ws.states[i], a, step)
        return a

    def encode_into(self, ws: Workspace, x) -> None:
        """Fill ``ws.head`` (so ``ws.mu`` and ``ws.logvar``) from ``x (B, D)``."""
        self.walk(ws, 0, self.sampler_at, x, None)

    def decode_into(self, ws: Workspace, z):
        """Fill ``ws.logits`` (decoder output before the likelihood's link)
        from ``z (B, L)`` (the code the decoder reads: after the flow steps); returns it."""
        return self.walk(ws, self.decoder_at, len(self.layers) - 1, z, None)

    def sample_posterior_into(self, ws: Workspace, head, eps, sampled_kl: bool = False):
        """``z (B, L)`` for the decoder from ``head = [mu | logvar] (B, 2L)``
        and noise ``eps (B, L)`` through the sampler and any flow steps;
        ``ws.kl`` then holds each image's KL: ``log q(z|x) - log p(z)`` of this
        z with flows or ``sampled_kl``, else the closed form."""
        return self.walk(ws, self.sampler_at, self.decoder_at, head,
                          _layers.Step(None, eps, sampled_kl=sampled_kl))

    def nll_into(self, ws: Workspace, x):
        """Per-image ``ws.nll (B,)`` (nats) of targets ``x (B, D)`` under ``ws.logits``."""
        n = len(self.layers) - 1
        return self.walk(ws, n, n + 1, ws.logits, _layers.Step(x, None))

    @_exclusive
    def forward(self, x, eps, need_nll: bool = True) -> Workspace:
        """Full forward pass for ``x (B, D)`` and noise ``eps (B, L)``.

        Returns the workspace holding ``mu, logvar, std, z, logits`` and the
        per-image ``nll (B,)`` (nats, summed over pixels) and ``kl (B,)`` (nats,
        summed over latent dims). Raises ConfigError unless ``x`` and ``eps``
        are the backend's arrays (``backend.asarray``) in the model dtype with
        those shapes: the kernels index them without bounds checks.
        """
        self._check_batch(x, eps)
        ws = self.workspace(x.shape[0])
        stop = len(self.layers) if need_nll else len(self.layers) - 1
        self.walk(ws, 0, stop, x, _layers.Step(x, eps))
        return ws

    def _check_batch(self, x, eps) -> None:
        be, c = self.backend, self.config
        shape = getattr(x, "shape", ())
        B = shape[0] if len(shape) else None
        for name, a, width in (("x", x, c.input_dim), ("eps", eps, c.latent_dim)):
            if not (isinstance(a, be.array_type) and a.dtype == be.dtype and a.shape == (B, width)):
                got = (f"a {a.dtype} array of shape {a.shape}" if isinstance(a, be.array_type)
                       else f"a {type(a).__name__}")
                raise ConfigError(f"{name} must be a ({B if name == 'eps' else 'B'}, {width}) {be.dtype} array on the "
                                  f"{be.name} backend, got {got}; convert it with model.backend.asarray")

    @_exclusive
    def loss_and_grad(self, x, eps, beta: float = 1.0, need_loss: bool = True, grad_scale: Optional[float] = None):
        """Forward walk then reversed backward walk of ``mean_i(recon_i + beta * kl_i)``.

        x: (B, D) device array in the model dtype, values in [0, 1] for bernoulli.
        eps: (B, L) device array of N(0, 1) noise (fixed noise makes the step
            deterministic, which the gradient checks rely on).
        grad_scale: dLoss/d(per-image term), default ``1 / B``; a data-parallel
            rank holding a shard passes ``1 / global batch`` (the all-reduce
            then sums the shards' gradients into the global mean's).
        Writes every gradient into ``self.grads`` and returns
        ``(recon_sum, kl_sum)`` as device scalars (nats, summed over the
        batch; ``None`` when ``need_loss`` is False). Raises ConfigError for
        ``x`` or ``eps`` of another shape, dtype or array type (see :meth:`forward`).
        """
        be = self.backend
        self._check_batch(x, eps)
        B = x.shape[0]
        ws = self.workspace(B)
        step = _layers.Step(x, eps, beta=beta, grad_scale=1.0 / B if grad_scale is None else grad_scale,
                            train=True, need_loss=need_loss)
        self.walk(ws, 0, len(self.layers), x, step)
        d = None
        for i in range(len(self.layers) - 1, -1, -1):
            d = self.layers[i].backward(be, ws.states[i], d, step)
        if not need_loss:
            return None, None
        return be.sum(ws.nll), be.sum(ws.kl)

    # ---- convenience (host in, host out) -------------------------------------
    def rows_within(self, cap: int) -> int:
        """The batch the host-in, host-out calls use when given none: up to
        ``cap`` images whose work buffers fit in ``fastvae.training.memory.WORK_BYTES`` (:func:`fastvae.training.memory.rows_within`)."""
        return _memory.rows_within(self.layers, self.backend.dtype.itemsize, cap)

    def _batch_size(self, batch_size: Optional[int]) -> int:
        """``batch_size``, checked; None: :meth:`rows_within` of 1024."""
        return self.rows_within(1024) if batch_size is None else check_count("batch_size", batch_size)

    def _batches(self, X, batch_size):
        """Device batches of host images ``X``, checked first (see :func:`fastvae.checks.check_images`)."""
        batch_size = self._batch_size(batch_size)
        X = check_images(X, self.config)
        for i in range(0, X.shape[0], batch_size):
            yield self.backend.asarray(X[i:i + batch_size])

    @_exclusive
    def encode(self, X, batch_size: Optional[int] = None):
        """``(mu, logvar)`` as host arrays ``(N, L)`` for host images ``X (N, D)``.

        Every method here taking images raises DataError for images that are
        not an (N, D) array of finite numbers (in [0, 1] for the bernoulli
        likelihood; :func:`fastvae.checks.check_images`) and ConfigError for
        a ``batch_size`` below 1 (None: up to 1024 images within
        ``memory.WORK_BYTES`` of buffers, :meth:`rows_within`)."""
        mus, lvs = [], []
        for xb in self._batches(X, batch_size):
            ws = self.workspace(xb.shape[0])
            self.encode_into(ws, xb)
            mus.append(self.backend.to_host(ws.mu).copy())
            lvs.append(self.backend.to_host(ws.logvar).copy())
        L = self.config.latent_dim
        if not mus:
            return np.zeros((0, L)), np.zeros((0, L))
        return np.concatenate(mus), np.concatenate(lvs)

    def mean_image(self, logits):
        """Pixel means from decoder outputs (host): sigmoid for bernoulli,
        clipped identity for gaussian/mse."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.config.likelihood == "bernoulli":
            return 0.5 * (1.0 + np.tanh(0.5 * logits))
        return np.clip(logits, 0.0, 1.0)

    @_exclusive
    def decode(self, Z, batch_size: Optional[int] = None):
        """Pixel means ``(N, D)`` (host, in the model dtype, in [0, 1]) for host
        codes ``Z (N, L)``; DataError for codes not of that shape or not finite."""
        batch_size = self._batch_size(batch_size)
        Z = check_codes(Z, self.config.latent_dim)
        _memory.preflight(2 * Z.shape[0] * self.config.input_dim * np.dtype(self.config.dtype).itemsize, None,
                          f"decoding {Z.shape[0]:,} images", "decode fewer codes at a time")   # blocks, concatenated
        outs = []
        for i in range(0, Z.shape[0], batch_size):
            zb = self.backend.asarray(Z[i:i + batch_size])
            ws = self.workspace(zb.shape[0])
            self.decode_into(ws, zb)
            outs.append(self.mean_image(self.backend.to_host(ws.logits)).astype(self.config.dtype, copy=False))
        return np.concatenate(outs) if outs else np.zeros((0, self.config.input_dim), self.config.dtype)

    @_exclusive
    def codes(self, X, batch_size: Optional[int] = None):
        """The codes the decoder reads for host images ``X (N, D)`` without
        noise (eps = 0): ``mu``, or with flow steps their image of ``mu``;
        host ``(N, L)``. (:meth:`encode` gives the base Gaussian's mu, logvar.)"""
        if self.decoder_at == self.sampler_at + 1:
            return self.encode(X, batch_size)[0]
        out = []
        for xb in self._batches(X, batch_size):
            ws = self.workspace(xb.shape[0])
            self.encode_into(ws, xb)
            ws.eps[...] = 0
            out.append(self.backend.to_host(self.sample_posterior_into(ws, ws.head, ws.eps)).copy())
        return np.concatenate(out) if out else np.zeros((0, self.config.latent_dim))

    def reconstruct(self, X, batch_size: Optional[int] = None):
        """Reconstructions decoded from :meth:`codes` (no sampling): host ``(N, D)``."""
        return self.decode(self.codes(X, batch_size), batch_size)

    def sample(self, n: int, seed: int = 0):
        """``n`` images decoded from z ~ N(0, I) (host ``(n, D)``, pixel means,
        model dtype). ConfigError for ``n`` or ``seed`` not a count, or ``n``
        images (with their codes) that would not fit in the free memory."""
        rng = np.random.Generator(np.random.PCG64(check_count("seed", seed, minimum=0)))
        n, c = check_count("n", n, minimum=0), self.config
        _memory.preflight(n * (8 * c.latent_dim + 2 * c.input_dim * np.dtype(c.dtype).itemsize), None,
                          f"sampling {n:,} images", "draw fewer at a time")     # it was numpy's MemoryError
        return self.decode(rng.standard_normal((n, c.latent_dim)))

    def __repr__(self):
        c = self.config
        return (f"VAE({_layers.describe(self.layers)}, {c.likelihood}, {c.dtype}, backend={self.backend.name}, "
                f"params={self.num_params})")
