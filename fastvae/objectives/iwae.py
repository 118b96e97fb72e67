"""The importance-weighted bound (IWAE) as a training objective.

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

from fastvae.errors import ConfigError
from fastvae.nn.layers.base import Step


class IWAEObjective:
    """The K-sample importance-weighted bound as a loss on ``model`` (a
    :class:`fastvae.VAE` whose stack is encoder -> Gaussian sampler -> [IAF
    steps] -> decoder -> likelihood). Raises ConfigError for K < 1.

    With inverse autoregressive flow steps (Kingma et al. 2016) the K samples
    run through them too, and ``log q(z_T|x) - log p(z_T)`` gains each step's
    ``-sum log sig + (|z_t|^2 - |z_{t-1}|^2) / 2`` (:meth:`Backend.iaf_gate`):
    ``log w_k = -nll_k - kl_k``; the steps' backward weighs those terms by each
    row's ``c w~_k`` (``Step.row_scale``) as the decoder's rows are weighed."""

    name = "iwae"

    def __init__(self, model, k: int):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"iwae_k must be a positive integer, got {k!r}")
        self.model, self.k = model, int(k)

    def eps_shape(self, B: int):
        """The noise one step needs: ``(B K, L)`` standard normal rows, image-major."""
        return (B * self.k, self.model.config.latent_dim)

    def _forward(self, x, eps, train: bool):
        """The encoder on ``B`` rows, the ``B K`` samples, the flow steps and
        the decoder with its likelihood; ``log w (B, K)`` into a cached
        buffer. Returns what the backward needs."""
        m, be = self.model, self.model.backend
        s, n = m.sampler_at, len(m.layers)
        B, L = x.shape[0], m.config.latent_dim
        K = eps.shape[0] // B
        buf = lambda name, *shape: be.scratch(("iwae", name), shape)      # noqa: E731
        enc, dec = m.workspace(B), m.workspace(B * K)
        step_e = Step(x, None, train=train, need_loss=False)
        head = m.walk(enc, 0, s, x, step_e)
        std = buf("std", B, L)
        be.array_op(_sample, head, eps, x, std, dec.z, dec.x)
        step_d = Step(dec.x, None, grad_scale=1.0, train=train, need_loss=True)
        f = m.decoder_at                                    # s + 1 .. f - 1: the IAF steps, if any
        z, step_f = dec.z, None
        if f > s + 1:
            flow_kl = buf("flow_kl", B * K)
            be.array_op(_zero, flow_kl)
            step_f = Step(dec.x, None, train=train, need_loss=True, kl=flow_kl)
            C = head.shape[1] - 2 * L                       # the flow steps' context h, if any
            if C:
                step_f.context, step_f.dcontext = buf("context", B * K, C), buf("dcontext", B * K, C)
                be.array_op(_repeat_context, head, L, step_f.context)
                be.array_op(_zero, step_f.dcontext)
            z = m.walk(dec, s + 1, f, dec.z, step_f)
        nll = m.walk(dec, f, n, z, step_d)
        if step_f is not None:                              # log w = -(nll + the steps' terms) - ...
            nll_f = buf("nll_flows", B * K)
            be.array_op(_add, nll_f, nll, flow_kl)
            nll = nll_f
        logw = buf("logw", B, K)
        be.array_op(_log_weights, nll, dec.z, eps, head, logw)
        return enc, dec, head, std, logw, step_e, step_d, step_f

    def log_weights(self, x, eps):
        """Forward only: ``log w_ik = log p(x_i|z_ik) + log p(z_ik) - log
        q(z_ik|x_i)`` (nats, ``(B, K)`` device array in the model dtype, a
        cached buffer the next call overwrites) for ``x (B, D)`` and ``eps
        (B K, L)`` image-major, any K (flow steps included). The IWAE
        evaluation (:func:`fastvae.explore.metrics.iwae`) and the training
        loss share it."""
        return self._forward(x, eps, train=False)[4]

    def loss_and_grad(self, x, eps, grad_scale: Optional[float] = None, need_loss: bool = True):
        """Forward and backward of ``mean_i -L_K(x_i)`` for ``x (B, D)`` and
        ``eps (B K, L)`` (rows ``i K .. i K + K - 1`` belong to image i).
        Writes every gradient into ``model.grads``; returns the device sum over
        images of ``-L_K`` (nats) and 0.0, in the ``(recon, kl)`` slots the
        trainer reports (None, None when ``need_loss`` is False). The
        arithmetic between the layer walks runs as backend ``array_op`` calls
        on cached buffers (so a CUDA graph can hold the whole step)."""
        m, be = self.model, self.model.backend
        K, s, n, f = self.k, m.sampler_at, len(m.layers), m.decoder_at
        B, L = x.shape[0], m.config.latent_dim
        c = 1.0 / B if grad_scale is None else grad_scale
        buf = lambda name, *shape: be.scratch(("iwae", name), shape)      # noqa: E731
        enc, dec, head, std, logw, step_e, step_d, step_f = self._forward(x, eps, train=True)
        top, total, r = buf("top", B, 1), buf("total", B, 1), buf("r", B * K, 1)
        if step_f is not None:
            step_f.row_scale = r
        d = dec.states[n - 1].dx                            # dnll/dlogits rows, scale 1
        be.array_op(_normalise, logw, c, top, total, r, d)
        for i in range(n - 2, f - 1, -1):
            d = m.layers[i].backward(be, dec.states[i], d, step_d)
        for i in range(f - 1, s, -1):
            d = m.layers[i].backward(be, dec.states[i], d, step_f)
        dhead = enc.states[s].dx if enc.states[s].dx is not None else buf("dhead", B, head.shape[1])
        be.array_op(_dhead, d, r, dec.z, eps, std, c, dhead)
        if step_f is not None and step_f.context is not None:
            be.array_op(_dcontext, step_f.dcontext, L, dhead)
        d = dhead
        for i in range(s - 1, -1, -1):
            d = m.layers[i].backward(be, enc.states[i], d, step_e)
        if not need_loss:
            return None, None
        neg_bound = buf("neg_bound", B)
        be.array_op(_neg_bound, top, total, K, neg_bound)
        return be.sum(neg_bound), 0.0

    def train_step(self, ws, rng, beta: float, grad_scale: float, need_loss: bool):
        """One step's loss and gradient on the batch ``ws`` (a :class:`~fastvae.training.parts.Batch`): draws
        the global batch's ``(n K, L)`` noise from the training stream ``rng``
        (after the batch's own draws) and keeps the rows of this rank's images
        ``ws.rows`` (all of them on one process), then :meth:`loss_and_grad`;
        ``beta`` is unused."""
        eps = self._noise(rng, ws.global_batch)
        lo, hi = ws.rows
        if hi - lo != ws.global_batch:
            eps = eps[lo * self.k:hi * self.k]
        return self.loss_and_grad(ws.x, eps, grad_scale=grad_scale, need_loss=need_loss)

    def idle_step(self, rng, n: int) -> None:
        """A rank's step on an empty shard of a global batch of ``n`` images:
        the batch's noise is drawn all the same (every rank's stream stays
        where the others' are)."""
        self._noise(rng, n)

    def _noise(self, rng, n: int):
        eps = self.model.backend.scratch("iwae_eps", self.eps_shape(n))
        rng.normal_(eps)
        return eps

    def set_time(self, epoch: float) -> None:
        """No weights of its own to schedule."""

    def weighted_loss(self, recon, kl, beta):
        """The objective's sum for the metrics (``-L_K`` summed over images)."""
        return recon


def _zero(xp, a):
    a[...] = 0


def _add(xp, out, a, b):
    xp.add(a, b, out=out)


def _sample(xp, head, eps, x, std, z, xrep):
    """IWAE: ``std = exp(logvar / 2)`` (B, L), the K samples ``z (B K, L)`` and
    the images repeated K times ``xrep (B K, D)``, image-major."""
    B, L = std.shape
    K = eps.shape[0] // B
    xp.exp(0.5 * head[:, L:2 * L], out=std)
    z.reshape(B, K, L)[...] = head[:, None, :L] + std[:, None, :] * eps.reshape(B, K, L)
    xrep.reshape(B, K, -1)[...] = x[:, None, :]


def _log_weights(xp, nll, z, eps, head, logw):
    """IWAE: ``log w (B, K) = -nll - |z|^2 / 2 + |eps|^2 / 2 + sum_j logvar_j / 2``
    (Burda et al. 2016, eq. 8 with the Gaussian densities written out)."""
    B, K = logw.shape
    L = z.shape[1]
    logw[...] = (-nll - 0.5 * (z * z).sum(1) + 0.5 * (eps * eps).sum(1)).reshape(B, K) \
        + 0.5 * head[:, L:2 * L].sum(1)[:, None]


def _normalise(xp, logw, c, top, total, r, d):
    """IWAE: the row maxima ``top`` of ``log w`` and ``total = sum_k exp(log w
    - top)`` (B, 1), the rows' loss weights ``r = c w~ (B K, 1)`` (``w~`` the
    self-normalised weights), and the decoder's likelihood gradient rows ``d *= r``."""
    B, K = logw.shape
    logw.max(1, keepdims=True, out=top)
    w = xp.exp(logw - top)
    w.sum(1, keepdims=True, out=total)
    w /= total                                          # self-normalised weights w~
    r[...] = (c * w).reshape(B * K, 1)
    d *= r


def _dhead(xp, d, r, z, eps, std, c, dhead):
    """IWAE: ``dhead = [dmu | dlogvar] (B, 2L)`` from the decoder's ``dz`` rows
    ``d`` plus ``r z`` (from -log p(z)), summed over each image's K samples."""
    B, L = std.shape
    K = z.shape[0] // B
    dz3 = (d + r * z).reshape(B, K, L)
    dhead[:, :L] = dz3.sum(1)
    dhead[:, L:2 * L] = 0.5 * std * (dz3 * eps.reshape(B, K, L)).sum(1) - 0.5 * c


def _repeat_context(xp, head, L, ctx):
    """The context h of each image for its K sample rows: ``ctx (B K, C)``
    from ``head[:, 2L:]``, image-major."""
    B = head.shape[0]
    ctx.reshape(B, -1, ctx.shape[1])[...] = head[:, None, 2 * L:]


def _dcontext(xp, dctx, L, dhead):
    """``dhead[:, 2L:]``: the context's gradient summed over each image's K rows."""
    B = dhead.shape[0]
    dhead[:, 2 * L:] = dctx.reshape(B, -1, dctx.shape[1]).sum(1)


def _neg_bound(xp, top, total, K, out):
    """IWAE: ``out = -L_K (B,)`` nats, ``L_K = top + log(total) - log K``."""
    out[...] = -((top[:, 0] + xp.log(total[:, 0])) - math.log(K))
