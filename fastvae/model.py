"""The MLP VAE: forward and hand-derived backward, written once for every backend.

Model (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"):

    encoder:  h = act(... act(x W1^T + b1) ...)
              [mu | logvar] = h Wh^T + bh                  (two heads, one GEMM)
    sampler:  z = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)       (Sec. 2.4)
    decoder:  logits = act(... z ...) Wo^T + bo
    per image i:  recon_i = -log p(x_i | z_i)  (summed over pixels)
                  kl_i = -1/2 sum_j (1 + logvar - mu^2 - exp(logvar))  (App. B)
    loss = mean_i (recon_i + beta * kl_i);  -ELBO = mean_i (recon_i + kl_i)

All parameters live in ``self.params`` (one flat buffer, see
:class:`fastvae.layout.ParamLayout`); ``loss_and_grad`` writes every gradient
into ``self.grads`` of the same layout. Shapes: ``x (B, D)`` with pixel values
in [0, 1], ``eps (B, L)``; all arrays in the model's dtype on the backend's
device. Work buffers are allocated once per batch size and reused.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

from . import backends as _backends
from .config import ModelConfig
from .errors import ConfigError
from .layout import LinearSpec, ParamLayout


class _Workspace:
    """Activations and gradient buffers for one batch size."""

    def __init__(self, be, B, enc, head, dec, L):
        self.B = B
        self.enc_pre = [be.empty((B, s.fan_out)) for s in enc]
        self.enc_out = [be.empty((B, s.fan_out)) for s in enc]
        self.enc_d = [be.empty((B, s.fan_out)) for s in enc]
        self.head = be.empty((B, 2 * L))
        self.mu, self.logvar = self.head[:, :L], self.head[:, L:]
        self.std = be.empty((B, L))
        self.z = be.empty((B, L))
        self.eps = be.empty((B, L))
        self.kl = be.empty((B,))
        self.dhead = be.empty((B, 2 * L))
        self.dmu, self.dlogvar = self.dhead[:, :L], self.dhead[:, L:]
        self.dz = be.empty((B, L))
        self.dec_pre = [be.empty((B, s.fan_out)) for s in dec]   # last one: logits
        self.dec_out = [be.empty((B, s.fan_out)) for s in dec[:-1]]
        self.dec_d = [be.empty((B, s.fan_out)) for s in dec]     # last one: dlogits
        self.nll = be.empty((B,))
        self.x = be.empty((B, dec[-1].fan_out))

    @property
    def logits(self):
        return self.dec_pre[-1]


class VAE:
    """An MLP variational autoencoder on a compute backend.

    Parameters
    ----------
    config : ModelConfig
    backend : str or Backend, default ``"numpy"`` (see :func:`fastvae.backends.available`).
    seed : int, initialisation seed (host-side NumPy PCG64, so every backend
        starts from identical weights).

    Raises ConfigError for a bad config, BackendUnavailableError for a backend
    that cannot run here.
    """

    def __init__(self, config: ModelConfig, backend="numpy", seed: int = 0):
        if not isinstance(config, ModelConfig):
            raise ConfigError("VAE needs a fastvae.ModelConfig")
        self.config = config
        self.backend = _backends.get(backend, config.dtype)
        if self.backend.dtype != np.dtype(config.dtype):
            raise ConfigError(
                f"backend computes in {self.backend.dtype} but the model config says {config.dtype}")
        self.layout = ParamLayout.for_config(config)
        self.enc, self.head, self.dec = ParamLayout.linear_specs(config)
        be = self.backend
        self.params = be.zeros((self.layout.size,))
        self.grads = be.zeros((self.layout.size,))
        self.p = self.layout.views(self.params)
        self.g = self.layout.views(self.grads)
        self._ws: Dict[int, _Workspace] = {}
        self.init_params(seed)

    # ---- parameters ----------------------------------------------------------
    @property
    def num_params(self) -> int:
        return self.layout.size

    def init_params(self, seed: int = 0) -> None:
        """(Re)initialise every weight and bias on the host, then copy to the device.

        ``pytorch``: W, b ~ U(-k, k) with k = 1/sqrt(fan_in) (the ``nn.Linear``
        default, kaiming_uniform with a = sqrt(5)); ``xavier``: W ~ U(-a, a),
        a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010, eq. 16), b = 0.
        The two heads are initialised as separate layers.
        """
        rng = np.random.Generator(np.random.PCG64(seed))
        host = np.zeros(self.layout.size, dtype=np.float64)

        def fill(name, fan_in, fan_out):
            e = self.layout[name + ".W"]
            eb = self.layout[name + ".b"]
            if self.config.init == "xavier":
                a = math.sqrt(6.0 / (fan_in + fan_out))
                host[e.offset:e.offset + e.size] = rng.uniform(-a, a, e.size)
            else:
                k = 1.0 / math.sqrt(fan_in)
                host[e.offset:e.offset + e.size] = rng.uniform(-k, k, e.size)
                host[eb.offset:eb.offset + eb.size] = rng.uniform(-k, k, eb.size)

        for s in self.enc:
            fill(s.name, s.fan_in, s.fan_out)
        L = self.config.latent_dim
        fill("encoder.mu", self.head.fan_in, L)
        fill("encoder.logvar", self.head.fan_in, L)
        for s in self.dec:
            fill(s.name, s.fan_in, s.fan_out)
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
        """Load the parameters of a checkpoint into THIS model.

        Raises CheckpointError when the file is not a valid fastvae checkpoint
        or was written for another architecture or dtype (the message names
        both); returns the checkpoint's host data.
        """
        from .checkpoint import read_checkpoint
        from .errors import CheckpointError
        data = read_checkpoint(path)
        theirs = data["config"].get("model", {})
        if theirs.get("dtype") != self.config.dtype:
            raise CheckpointError(f"{path} holds {theirs.get('dtype')} parameters but this model is "
                                  f"{self.config.dtype}; build the model with dtype={theirs.get('dtype')!r} "
                                  "or use fastvae.load")
        self.layout.check_table(data["layout"])
        self.set_flat_params(data["params"])
        return data

    def state_dict(self) -> Dict[str, np.ndarray]:
        """``{name: host array}`` for every tensor (copies)."""
        host = self.get_flat_params()
        return {e.name: self.layout.view(host, e.name).copy() for e in self.layout}

    # ---- workspace -----------------------------------------------------------
    def workspace(self, B: int) -> _Workspace:
        ws = self._ws.get(B)
        if ws is None:
            if len(self._ws) > 4:       # bounded: train batch, last batch, eval batch
                self._ws.clear()
            ws = self._ws[B] = _Workspace(self.backend, B, self.enc, self.head, self.dec,
                                          self.config.latent_dim)
        return ws

    # ---- forward -------------------------------------------------------------
    def _dense(self, out_pre, out_act, x, spec: LinearSpec, W, b):
        be, c = self.backend, self.config
        be.gemm(out_pre, x, W, trans_b=True)
        be.bias_act(out_act, out_pre, b, spec.activation, c.leaky_slope, c.elu_alpha)

    def encode_into(self, ws: _Workspace, x) -> None:
        """Fill ``ws.mu`` and ``ws.logvar`` from ``x (B, D)``."""
        a = x
        for i, s in enumerate(self.enc):
            self._dense(ws.enc_pre[i], ws.enc_out[i], a, s, self.p[s.name + ".W"], self.p[s.name + ".b"])
            a = ws.enc_out[i]
        self._dense(ws.head, None, a, self.head, self.p["encoder.head.W"], self.p["encoder.head.b"])

    def decode_into(self, ws: _Workspace, z) -> None:
        """Fill ``ws.logits`` (decoder output before the likelihood's link) from ``z (B, L)``."""
        a = z
        last = len(self.dec) - 1
        for i, s in enumerate(self.dec):
            out = None if i == last else ws.dec_out[i]
            self._dense(ws.dec_pre[i], out, a, s, self.p[s.name + ".W"], self.p[s.name + ".b"])
            a = out

    def forward(self, x, eps, need_nll: bool = True) -> _Workspace:
        """Full forward pass for ``x (B, D)`` and noise ``eps (B, L)``.

        Returns the workspace holding ``mu, logvar, std, z, logits`` and the
        per-image ``nll (B,)`` (nats, summed over pixels) and ``kl (B,)`` (nats,
        summed over latent dims).
        """
        B = x.shape[0]
        ws = self.workspace(B)
        self.encode_into(ws, x)
        self.backend.reparam_kl(ws.z, ws.kl, ws.std, ws.mu, ws.logvar, eps)
        self.decode_into(ws, ws.z)
        if need_nll:
            c = self.config
            self.backend.likelihood(None, ws.nll, ws.logits, x, c.likelihood, c.sigma, 1.0)
        return ws

    # ---- forward + backward --------------------------------------------------
    def loss_and_grad(self, x, eps, beta: float = 1.0, need_loss: bool = True):
        """Forward and hand-derived backward of ``mean_i(recon_i + beta * kl_i)``.

        x: (B, D) device array in the model dtype, values in [0, 1] for bernoulli.
        eps: (B, L) device array of N(0, 1) noise (fixed noise makes the step
            deterministic, which the gradient checks rely on).
        Writes every gradient into ``self.grads`` and returns
        ``(recon_sum, kl_sum)`` as device scalars (nats, summed over the
        batch; ``None`` when ``need_loss`` is False).
        """
        be, c = self.backend, self.config
        B = x.shape[0]
        ws = self.workspace(B)
        inv_b = 1.0 / B
        # forward
        self.encode_into(ws, x)
        be.reparam_kl(ws.z, ws.kl if need_loss else None, ws.std, ws.mu, ws.logvar, eps)
        self.decode_into(ws, ws.z)
        be.likelihood(ws.dec_d[-1], ws.nll if need_loss else None, ws.logits, x,
                      c.likelihood, c.sigma, inv_b)
        # decoder backward: d holds dLoss/d(pre-activation) of layer i
        for i in range(len(self.dec) - 1, -1, -1):
            s = self.dec[i]
            d = ws.dec_d[i]
            inp = ws.z if i == 0 else ws.dec_out[i - 1]
            be.gemm(self.g[s.name + ".W"], d, inp, trans_a=True)
            be.col_sum(self.g[s.name + ".b"], d)
            dinp = ws.dz if i == 0 else ws.dec_d[i - 1]
            be.gemm(dinp, d, self.p[s.name + ".W"])
            if i > 0:
                be.act_backward(dinp, ws.dec_pre[i - 1], ws.dec_out[i - 1],
                                self.dec[i - 1].activation, c.leaky_slope, c.elu_alpha)
        # sampler + KL backward
        be.reparam_kl_backward(ws.dmu, ws.dlogvar, ws.dz, ws.mu, ws.std, eps, beta * inv_b)
        # head + encoder backward
        specs = self.enc + [self.head]
        grads_d = ws.enc_d + [ws.dhead]
        for i in range(len(specs) - 1, -1, -1):
            s = specs[i]
            d = grads_d[i]
            inp = x if i == 0 else ws.enc_out[i - 1]
            be.gemm(self.g[s.name + ".W"], d, inp, trans_a=True)
            be.col_sum(self.g[s.name + ".b"], d)
            if i > 0:
                dinp = ws.enc_d[i - 1]
                be.gemm(dinp, d, self.p[s.name + ".W"])
                be.act_backward(dinp, ws.enc_pre[i - 1], ws.enc_out[i - 1],
                                specs[i - 1].activation, c.leaky_slope, c.elu_alpha)
        if not need_loss:
            return None, None
        return be.sum(ws.nll), be.sum(ws.kl)

    # ---- convenience (host in, host out) -------------------------------------
    def _batches(self, X, batch_size):
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.config.input_dim:
            raise ConfigError(
                f"expected images of shape (N, {self.config.input_dim}), got {X.shape}; "
                "flatten each image to one row")
        for i in range(0, X.shape[0], batch_size):
            yield self.backend.asarray(X[i:i + batch_size])

    def encode(self, X, batch_size: int = 1024):
        """``(mu, logvar)`` as host arrays ``(N, L)`` for host images ``X (N, D)``."""
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

    def decode(self, Z, batch_size: int = 1024):
        """Pixel means ``(N, D)`` (host, float64 in [0, 1]) for host codes ``Z (N, L)``."""
        Z = np.asarray(Z)
        if Z.ndim != 2 or Z.shape[1] != self.config.latent_dim:
            raise ConfigError(f"expected codes of shape (N, {self.config.latent_dim}), got {Z.shape}")
        outs = []
        for i in range(0, Z.shape[0], batch_size):
            zb = self.backend.asarray(Z[i:i + batch_size])
            ws = self.workspace(zb.shape[0])
            self.decode_into(ws, zb)
            outs.append(self.mean_image(self.backend.to_host(ws.logits)))
        return np.concatenate(outs) if outs else np.zeros((0, self.config.input_dim))

    def reconstruct(self, X, batch_size: int = 1024):
        """Reconstructions decoded from ``mu`` (no sampling): host ``(N, D)``."""
        mu, _ = self.encode(X, batch_size)
        return self.decode(mu, batch_size)

    def sample(self, n: int, seed: int = 0):
        """``n`` images decoded from z ~ N(0, I) (host ``(n, D)``, pixel means)."""
        rng = np.random.Generator(np.random.PCG64(seed))
        return self.decode(rng.standard_normal((n, self.config.latent_dim)))

    def __repr__(self):
        c = self.config
        return (f"VAE({c.input_dim}-{'-'.join(map(str, c.hidden))}-{c.latent_dim}, "
                f"{c.activation}, {c.likelihood}, {c.dtype}, backend={self.backend.name}, "
                f"params={self.num_params})")
