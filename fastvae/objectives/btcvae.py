"""beta-TCVAE (Chen, Li, Grosse & Duvenaud 2018, "Isolating sources of
disentanglement in VAEs"): the loss with its total-correlation term weighted
by beta, the aggregate posterior estimated by minibatch-weighted (MWS) or
minibatch-stratified sampling (MSS), on one process or over the ranks of a
data-parallel run; and its terms for evaluation."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from fastvae.errors import ConfigError
from fastvae.nn.layers.base import Step

_LOG_2PI = math.log(2 * math.pi)

#: the estimators of log q(z) and log q(z_d) (Chen et al. 2018, Appendix C.1 and C.2)
ESTIMATORS = ("mss", "mws")


def log_weights(estimator: str, B: int, N: int) -> np.ndarray:
    """The estimator's log importance weights ``logw (B, B)`` float64 (nats):
    ``log q(z_i) ~ logsumexp_j (logw_ij + log q(z_i|x_j))`` over a batch of
    ``B`` images drawn from ``N`` (Chen et al. 2018, Appendix C).

    ``mws``, minibatch-weighted sampling (C.1): ``w_ij = 1 / (N B)``.
    ``mss``, minibatch-stratified sampling (C.2), with ``M = B - 1``: the
    image ``z_i`` came from weighs ``1 / N``, one other image of the batch
    (the next, cyclically: ``j = i + 1 mod B``) ``(N - M) / (N M)`` and the
    other ``B - 2`` weigh ``1 / M`` each, so that every row sums to 1. (The
    official code's ``_log_importance_weight_matrix`` writes these with the
    stride ``M + 1 = B``, which walks down columns 0 and 1 instead of the
    diagonal: its open pull request #1 says so. This is the paper's matrix.)

    Raises ConfigError for ``N < B`` or, for ``mss``, ``B < 2``."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown beta-TCVAE estimator {estimator!r}: use one of {', '.join(ESTIMATORS)}")
    if B < 1 or N < B:
        raise ConfigError(f"the beta-TCVAE estimator needs a batch of 1 to N images from a dataset of N, "
                          f"got a batch of {B} from N = {N}")
    if estimator == "mws":
        return np.full((B, B), -math.log(N * B))
    if B < 2:
        raise ConfigError("minibatch-stratified sampling needs a batch of 2 or more images")
    M = B - 1
    w = np.full((B, B), 1.0 / M)
    idx = np.arange(B)
    w[idx, (idx + 1) % B] = (N - M) / (N * M)
    w[idx, idx] = 1.0 / N
    with np.errstate(divide="ignore"):
        return np.log(w)


def _tc_direct(xp, d, z, eps, std, c, c_dw, dz, dmu, dlv):
    """beta-TCVAE: the direct gradient terms, all (B, L): ``dz`` = the
    decoder's plus ``c_dw z - c eps / std`` (from log q(z|x) and
    ``-gamma log p(z)``, ``c_dw = gamma c``), ``dmu = c eps / std``,
    ``dlv = c (eps^2 - 1) / 2``."""
    dz[...] = d + c_dw * z - c * eps / std
    dmu[...] = c * eps / std
    dlv[...] = c * 0.5 * (eps * eps - 1.0)


def _tc_densities(xp, z, mu, logvar, lse, lsed, out):
    """beta-TCVAE: ``out (4, B)`` rows log q(z|x), log q(z), sum_d log q(z_d),
    log p(z) (nats), the middle two the estimator's (``lse``, ``lsed`` (B,))."""
    out[0] = -0.5 * ((z - mu) ** 2 / xp.exp(logvar) + logvar + _LOG_2PI).sum(1)
    out[1] = lse
    out[2] = lsed
    out[3] = -0.5 * (z * z + _LOG_2PI).sum(1)


def _tc_dhead(xp, dz, dmu, dlv, eps, std, dhead):
    """beta-TCVAE: ``dhead = [dmu + dz | dlv + dz eps std / 2]`` (B, 2L), the reparameterization."""
    L = dz.shape[1]
    dhead[:, :L] = dmu + dz
    dhead[:, L:] = dlv + 0.5 * dz * eps * std


def _tc_combine(xp, dens, nll, beta, gamma, out):
    """beta-TCVAE: ``out (5, B)`` rows MI, TC, DWKL, the weighted loss
    ``nll + MI + beta TC + gamma DWKL`` and the sampled KL ``MI + TC + DWKL``."""
    qzx, qz, qzd, pz = dens
    mi, tc, dw = qzx - qz, qz - qzd, qzd - pz
    out[0], out[1], out[2] = mi, tc, dw
    out[3] = nll + mi + beta * tc + gamma * dw
    out[4] = mi + tc + dw


class BetaTCVAEObjective:
    """The beta-TCVAE loss (Chen, Li, Grosse & Duvenaud 2018, "Isolating
    sources of disentanglement in VAEs", eq. 4): per image, with one sample
    ``z_i = mu_i + std_i eps_i``,

        loss_i = nll_i + MI_i + beta TC_i + gamma DWKL_i
        MI_i   = log q(z_i|x_i) - log q(z_i)
        TC_i   = log q(z_i) - sum_d log q(z_id)
        DWKL_i = sum_d log q(z_id) - log p(z_i)

    ``gamma`` 1 but during the dimension-wise KL warm-up of ``dwkl_warmup``
    epochs (:meth:`set_time`).
    The aggregate-posterior densities are estimated over the batch's B
    posteriors and a training set of N images with the estimator's log
    weights ``logw`` (:func:`log_weights`; ibid., Appendix C):

        log q(z_i)    ~ logsumexp_j (logw_ij + sum_d lq_ijd)
        log q(z_id)   ~ logsumexp_j (logw_ij + lq_ijd)
        lq_ijd        = log N(z_id; mu_jd, exp(logvar_jd)).

    Gradient (c = 1/B): the losses' sum is nll + log q(z|x) - gamma log p(z)
    + (beta - 1) log q(z) + (gamma - beta) sum_d log q(z_d); with A_ij and
    A_ijd the softmaxes over j of the weighted joint and per-dimension terms,
    the coefficient of lq_ijd is G_ijd = c (beta - 1) A_ij + c (gamma - beta) A_ijd, and

        dz_id      += sum_j G_ijd (mu_jd - z_id) / var_jd
        dmu_jd     += sum_i G_ijd (z_id - mu_jd) / var_jd
        dlogvar_jd += sum_i G_ijd ((z_id - mu_jd)^2 / var_jd - 1) / 2

    plus the direct terms (log q(z_i|x_i): dz = -eps/std, dmu = eps/std,
    dlogvar = (eps^2 - 1)/2; -gamma log p(z_i): dz = gamma z) and the decoder's dz, then
    the reparameterization (dmu += dz, dlogvar += dz eps std / 2). All B x B x L
    terms are array operations on the backend (no Python loop over images).

    Data-parallel (``comm``, a :class:`fastvae.training.distributed.World` of more than
    one rank): the estimator needs every posterior of the GLOBAL batch, so the
    ranks gather ``(z, mu, logvar)`` of its n rows (one sum over ranks of a
    zero-padded ``(3, n, L)`` buffer, 12 n L bytes in float32) and each runs
    the pairwise terms over all n (n^2 L work on every rank, not divided) and
    keeps its rows: the same numbers one process computes, with no second
    exchange. Raises ConfigError for N < 1 or an unknown estimator.
    """

    name = "btcvae"

    def __init__(self, model, n_train: int, comm=None, estimator: str = "mss", dwkl_warmup: float = 0.0):
        if n_train < 1:
            raise ConfigError("beta-TCVAE needs the training set size N >= 1")
        if estimator not in ESTIMATORS:
            raise ConfigError(f"unknown beta-TCVAE estimator {estimator!r}: use one of {', '.join(ESTIMATORS)}")
        self.model, self.n_train, self.estimator = model, int(n_train), estimator
        self.comm = comm if comm is not None and comm.size > 1 else None
        self.dwkl_warmup = float(dwkl_warmup)
        self.gamma = 1.0
        self._logw = {}                       # batch size -> the estimator's log weights on the backend

    def set_time(self, epoch: float) -> None:
        """The dimension-wise KL weight ``gamma`` of the step at ``epoch``
        (epochs since the start): ``min(1, 0.05 + epoch / dwkl_warmup)``, the
        official code's ``1 - lamb`` with ``lamb = max(0, 0.95 - iteration /
        warmup_iter)`` (rtqichen/beta-tcvae, ``anneal_kl``, its
        ``--lambda-anneal``); 1 without a warm-up."""
        self.gamma = 1.0 if self.dwkl_warmup <= 0 else min(1.0, 0.05 + float(epoch) / self.dwkl_warmup)

    def log_weights(self, B: int):
        """:func:`log_weights` of this objective's estimator for a batch of
        ``B`` (N the training set size), on the backend (cached per B)."""
        if B not in self._logw:
            self._logw[B] = self.model.backend.asarray(log_weights(self.estimator, B, self.n_train))
        return self._logw[B]

    def terms(self, mu, logvar, z, coef: float = 0.0, coef_dim: float = 0.0, dz=None, dmu=None, dlogvar=None):
        """Per-image ``(log q(z|x), log q(z), sum_d log q(z_d), log p(z))`` (B,)
        by the objective's estimator (the backend's ``tc_pairwise``, which
        also adds the gradient of ``coef log q(z) + coef_dim sum_d log q(z_d)``
        to ``dz``, ``dmu``, ``dlogvar`` when a coefficient is non-zero): the
        rows of a (4, B) device array."""
        be = self.model.backend
        B = z.shape[0]
        if dz is None:
            dz = dmu = dlogvar = be.scratch(("btcvae", "unused_grad"), z.shape)
        lse, lsed = be.tc_pairwise(z, mu, logvar, self.log_weights(B), coef, coef_dim, dz, dmu, dlogvar)
        dens = be.scratch(("btcvae", "densities"), (4, B))
        be.array_op(_tc_densities, z, mu, logvar, lse, lsed, dens)
        return dens

    def loss_and_grad(self, x, eps, beta: float, grad_scale: Optional[float] = None, need_loss: bool = True,
                      rows=None):
        """Forward and backward for ``x (B, D)``, ``eps (B, L)``. Writes every
        gradient into ``model.grads``; returns device sums ``(recon, kl)``
        (nats; kl = MI + TC + DWKL, the sampled KL) and, in ``last_terms``,
        the sums of MI, TC and DWKL and of the weighted loss. The arithmetic
        between the layer walks runs as backend ``array_op`` calls on cached
        buffers, beta as a per-step scalar (so a CUDA graph can hold the step).
        rows: ``(lo, n)`` when ``x`` is rows ``lo .. lo + B - 1`` of a global
        batch of ``n`` split over the ranks of ``comm`` (None: all of it)."""
        m, be = self.model, self.model.backend
        s, n = m.sampler_at, len(m.layers)
        B, L = x.shape[0], m.config.latent_dim
        c = 1.0 / B if grad_scale is None else grad_scale
        buf = lambda name, *shape: be.scratch(("btcvae", name), shape)      # noqa: E731
        ws = m.workspace(B)
        step = Step(x, eps, beta=0.0, grad_scale=c, train=True, need_loss=True)
        head = m.walk(ws, 0, s, x, step)
        z = m.walk(ws, s, s + 1, head, step)                       # the sampler: z = mu + std eps
        nll = m.walk(ws, s + 1, n, z, step)
        # backward: decoder (scale c per image) down to dz
        d = ws.states[n - 1].dx
        for i in range(n - 2, s, -1):
            d = m.layers[i].backward(be, ws.states[i], d, step)
        dz, dmu, dlv = buf("dz", B, L), buf("dmu", B, L), buf("dlv", B, L)
        gamma = self.gamma
        be.array_op(_tc_direct, d, z, eps, ws.std, c, be.step_scalar(c * gamma), dz, dmu, dlv)
        coefs = (c * (beta - 1.0), c * (gamma - beta))
        if self.comm is None or rows is None:
            dens = self.terms(head[:, :L], head[:, L:], z, *coefs, dz, dmu, dlv)
        else:
            dens = self._global_terms(rows, z, head[:, :L], head[:, L:], coefs, dz, dmu, dlv)
        dhead = ws.states[s].dx
        be.array_op(_tc_dhead, dz, dmu, dlv, eps, ws.std, dhead)
        d = dhead
        for i in range(s - 1, -1, -1):
            d = m.layers[i].backward(be, ws.states[i], d, step)
        per = buf("per_image", 5, B)                                # mi, tc, dwkl, weighted loss, kl
        be.array_op(_tc_combine, dens, nll, be.step_scalar(beta), be.step_scalar(gamma), per)
        self.last_terms = {"mi": be.sum(per[0]), "tc": be.sum(per[1]), "dwkl": be.sum(per[2]),
                           "loss": be.sum(per[3])}
        if not need_loss:
            return None, None
        return be.sum(nll), be.sum(per[4])

    def _gather(self, n: int, lo: int, *parts):
        """The global batch's ``(n, L)`` rows of each part ``(B, L)`` (this
        rank's rows ``lo .. lo + B - 1``; none on an empty shard), from every
        rank: one sum over ranks of a zero-padded buffer."""
        be, L = self.model.backend, self.model.config.latent_dim
        g = be.scratch(("btcvae", "gathered"), (3, n, L))
        g[...] = 0
        for k, a in enumerate(parts):
            g[k, lo:lo + a.shape[0]] = a
        self.comm.allreduce_(g)
        return g[0], g[1], g[2]

    def _global_terms(self, rows, z, mu, logvar, coefs, dz, dmu, dlogvar):
        """:meth:`terms` of this rank's rows over the global batch (gathered):
        the pairwise gradients of the rows ``rows = (lo, n)`` are added to
        ``dz, dmu, dlogvar (B, L)`` as one process adds them."""
        be, (lo, n), B = self.model.backend, rows, z.shape[0]
        zg, mug, lvg = self._gather(n, lo, z, mu, logvar)
        grads = []
        for name, a in (("dz", dz), ("dmu", dmu), ("dlv", dlogvar)):
            g = be.scratch(("btcvae", "global_" + name), zg.shape)
            g[...] = 0
            g[lo:lo + B] = a
            grads.append(g)
        dens = self.terms(mug, lvg, zg, *coefs, *grads)
        for a, g in zip((dz, dmu, dlogvar), grads):
            a[...] = g[lo:lo + B]
        return dens[:, lo:lo + B]

    def train_step(self, ws, rng, beta: float, grad_scale: float, need_loss: bool):
        """One step's loss and gradient on the batch ``ws`` (a :class:`~fastvae.training.parts.Batch`) (its
        ``x`` and ``eps``, this rank's ``ws.rows`` of the global batch;
        ``rng`` is unused): :meth:`loss_and_grad`."""
        return self.loss_and_grad(ws.x, ws.eps, beta, grad_scale=grad_scale, need_loss=need_loss,
                                  rows=(ws.rows[0], ws.global_batch))

    def idle_step(self, rng, n: int) -> None:
        """A rank's step on an empty shard of a global batch of ``n`` images:
        it joins the gather of the batch's posteriors (the others wait for it)."""
        if self.comm is not None:
            self._gather(n, 0)

    def weighted_loss(self, recon, kl, beta):
        """The objective's sum for the metrics: nll + MI + beta TC + gamma DWKL."""
        return self.last_terms["loss"]

    def evaluate(self, X, batch_size: int = 128, seed: int = 0) -> dict:
        """Means over images ``X (n, D)`` (host) of MI, TC and dimension-wise
        KL (nats per image), estimated as in training (this estimator, one
        seeded z per image) over consecutive batches of ``batch_size`` (at most
        N; a last batch of one joins the one before)."""
        m, be = self.model, self.model.backend
        rng = np.random.Generator(np.random.PCG64([seed, 4]))
        sums = np.zeros(3)
        B = max(1, min(batch_size, self.n_train))
        starts = list(range(0, len(X), B))
        if len(starts) > 1 and len(X) - starts[-1] == 1 and B + 1 <= self.n_train:
            starts.pop()
        for i, lo in enumerate(starts):
            hi = starts[i + 1] if i + 1 < len(starts) else len(X)
            mu, logvar = (be.asarray(a) for a in m.encode(X[lo:hi]))
            eps = be.asarray(rng.standard_normal(mu.shape))
            z = mu + be.xp.exp(0.5 * logvar) * eps
            qzx, qz, qzd, pz = self.terms(mu, logvar, z)          # rows of the (4, B) densities
            sums += [be.to_float((qzx - qz).sum()), be.to_float((qz - qzd).sum()), be.to_float((qzd - pz).sum())]
        mi, tc, dw = sums / max(len(X), 1)
        return {"mi": mi, "tc": tc, "dwkl": dw}


def eval_terms(model, X, n_train: int, seed: int = 0) -> dict:
    """``{"btcvae_mi", "btcvae_tc", "btcvae_dwkl", "btcvae_estimator"}`` over
    ``X`` for a model trained with beta-TCVAE (read from ``model.checkpoint``),
    else ``{}``: the training estimator (``mws`` for files written before the
    choice existed), N the run's training set size (``data_rows`` in its
    checkpoint; ``n_train`` for older files), whatever splits were loaded."""
    ckpt = getattr(model, "checkpoint", None) or {}
    train = ckpt.get("train") or {}
    if train.get("objective") != "btcvae":
        return {}
    n_train = (ckpt.get("data_rows") or [0])[0] or n_train
    estimator = train.get("tc_estimator", "mws")
    terms = BetaTCVAEObjective(model, n_train, estimator=estimator).evaluate(
        X, batch_size=train.get("batch_size", 128), seed=seed)
    return {**{f"btcvae_{k}": v for k, v in terms.items()}, "btcvae_estimator": estimator}
