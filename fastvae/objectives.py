"""Training objectives beyond the ELBO: the importance-weighted bound (IWAE).

Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders",
eq. 8: with ``z_k = mu + std * eps_k`` (k = 1..K) from q(z|x),

    log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x)
            = -nll_k - |z_k|^2 / 2 + |eps_k|^2 / 2 + sum_j logvar_j / 2
              (the 2 pi terms cancel),
    L_K(x)  = logsumexp_k log w_k - log K  <=  log p(x),

and the training loss is ``mean_i -L_K(x_i)``. Gradient (ibid., eq. 13): with
the self-normalised weights ``w~_k = softmax_k(log w_k)``,
``d(-L_K) = -sum_k w~_k d log w_k``; per sample row (loss scale c = 1/B):

    dL/dnll_k    = c w~_k                 (the decoder's rows, weighted)
    dL/dz_k      = c w~_k z_k + (decoder's dz_k)   (from -log p(z_k))
    dL/dmu       = sum_k dL/dz_k
    dL/dlogvar   = sum_k dL/dz_k eps_k std / 2 - c / 2      (sum_k w~_k = 1)

The K samples run as one batch of ``B K`` rows through the decoder; the
encoder runs once on ``B`` rows. K = 1 is the single-sample ELBO with the
KL estimated by sampling instead of in closed form (same expectation).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .errors import ConfigError
from .layers.base import Step


class IWAEObjective:
    """The K-sample importance-weighted bound as a loss on ``model`` (a
    :class:`fastvae.VAE` whose stack is encoder -> Gaussian sampler ->
    decoder -> likelihood). Raises ConfigError for K < 1."""

    def __init__(self, model, k: int):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"iwae_k must be a positive integer, got {k!r}")
        self.model, self.k = model, int(k)

    def eps_shape(self, B: int):
        """The noise one step needs: ``(B K, L)`` standard normal rows, image-major."""
        return (B * self.k, self.model.config.latent_dim)

    def loss_and_grad(self, x, eps, grad_scale: Optional[float] = None, need_loss: bool = True):
        """Forward and backward of ``mean_i -L_K(x_i)`` for ``x (B, D)`` and
        ``eps (B K, L)`` (rows ``i K .. i K + K - 1`` belong to image i).
        Writes every gradient into ``model.grads``; returns the device sum over
        images of ``-L_K`` (nats) and 0.0, in the ``(recon, kl)`` slots the
        trainer reports (None, None when ``need_loss`` is False)."""
        m, be = self.model, self.model.backend
        xp, K, s, n = be.xp, self.k, m.sampler_at, len(m.layers)
        B, L = x.shape[0], m.config.latent_dim
        c = 1.0 / B if grad_scale is None else grad_scale
        enc, dec = m.workspace(B), m.workspace(B * K)
        step_e = Step(x, None, train=True, need_loss=False)
        head = m._walk(enc, 0, s, x, step_e)
        mu, logvar = head[:, :L], head[:, L:]
        std = xp.exp(0.5 * logvar)
        e3 = eps.reshape(B, K, L)
        z = dec.z
        z.reshape(B, K, L)[...] = mu[:, None, :] + std[:, None, :] * e3
        dec.x.reshape(B, K, -1)[...] = x[:, None, :]
        step_d = Step(dec.x, None, grad_scale=1.0, train=True, need_loss=True)
        nll = m._walk(dec, s + 1, n, z, step_d)
        logw = (-nll - 0.5 * (z * z).sum(1) + 0.5 * (eps * eps).sum(1)).reshape(B, K) \
            + 0.5 * logvar.sum(1)[:, None]
        top = logw.max(1, keepdims=True)
        w = xp.exp(logw - top)
        total = w.sum(1, keepdims=True)
        w /= total                                          # self-normalised weights w~
        r = (c * w).reshape(B * K, 1)
        d = dec.states[n - 1].dx                            # dnll/dlogits rows, scale 1
        d *= r
        for i in range(n - 2, s, -1):
            d = m.layers[i].backward(be, dec.states[i], d, step_d)
        dz = d + r * z
        dz3 = dz.reshape(B, K, L)
        dhead = enc.states[s].dx if enc.states[s].dx is not None else xp.empty((B, 2 * L), head.dtype)
        dhead[:, :L] = dz3.sum(1)
        dhead[:, L:] = 0.5 * std * (dz3 * e3).sum(1) - 0.5 * c
        d = dhead
        for i in range(s - 1, -1, -1):
            d = m.layers[i].backward(be, enc.states[i], d, step_e)
        if not need_loss:
            return None, None
        bound = (top[:, 0] + xp.log(total[:, 0])) - math.log(K)
        return -bound.sum(), 0.0
