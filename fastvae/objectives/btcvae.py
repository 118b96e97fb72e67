"""beta-TCVAE (Chen, Li, Grosse & Duvenaud 2018, "Isolating sources of
disentanglement in VAEs"): the loss with its total-correlation term weighted
by beta, estimated by minibatch-weighted sampling, on one process or over the
ranks of a data-parallel run; and its terms for evaluation."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from fastvae.errors import ConfigError
from fastvae.nn.layers.base import Step

_LOG_2PI = math.log(2 * math.pi)


def _tc_direct(xp, d, z, eps, std, c, dz, dmu, dlv):
    """beta-TCVAE: the direct gradient terms, all (B, L): ``dz`` = the
    decoder's plus ``c (z - eps / std)`` (from log q(z|x) and -log p(z)),
    ``dmu = c eps / std``, ``dlv = c (eps^2 - 1) / 2``."""
    dz[...] = d + c * (z - eps / std)
    dmu[...] = c * eps / std
    dlv[...] = c * 0.5 * (eps * eps - 1.0)


def _tc_densities(xp, z, mu, logvar, lse, lsed, logNB, out):
    """beta-TCVAE: ``out (4, B)`` rows log q(z|x), log q(z), sum_d log q(z_d),
    log p(z) (nats) from the pairwise log-sum-exps ``lse``, ``lsed`` (B,)."""
    L = z.shape[1]
    out[0] = -0.5 * ((z - mu) ** 2 / xp.exp(logvar) + logvar + _LOG_2PI).sum(1)
    out[1] = lse - logNB
    out[2] = lsed - L * logNB
    out[3] = -0.5 * (z * z + _LOG_2PI).sum(1)


def _tc_dhead(xp, dz, dmu, dlv, eps, std, dhead):
    """beta-TCVAE: ``dhead = [dmu + dz | dlv + dz eps std / 2]`` (B, 2L), the reparameterization."""
    L = dz.shape[1]
    dhead[:, :L] = dmu + dz
    dhead[:, L:] = dlv + 0.5 * dz * eps * std


def _tc_combine(xp, dens, nll, beta, out):
    """beta-TCVAE: ``out (5, B)`` rows MI, TC, DWKL, the weighted loss
    ``nll + MI + beta TC + DWKL`` and the sampled KL ``MI + TC + DWKL``."""
    qzx, qz, qzd, pz = dens
    mi, tc, dw = qzx - qz, qz - qzd, qzd - pz
    out[0], out[1], out[2] = mi, tc, dw
    out[3] = nll + mi + beta * tc + dw
    out[4] = mi + tc + dw


class BetaTCVAEObjective:
    """The beta-TCVAE loss (Chen, Li, Grosse & Duvenaud 2018, "Isolating
    sources of disentanglement in VAEs", eq. 4): per image, with one sample
    ``z_i = mu_i + std_i eps_i``,

        loss_i = nll_i + MI_i + beta TC_i + DWKL_i
        MI_i   = log q(z_i|x_i) - log q(z_i)
        TC_i   = log q(z_i) - sum_d log q(z_id)
        DWKL_i = sum_d log q(z_id) - log p(z_i)

    with the aggregate-posterior densities estimated by minibatch-weighted
    sampling (ibid., Sec. 4.1 and Appendix C.1), over the batch's B posteriors
    and a training set of N images:

        log q(z_i)    ~ logsumexp_j sum_d lq_ijd - log(N B)
        log q(z_id)   ~ logsumexp_j lq_ijd - log(N B)
        lq_ijd        = log N(z_id; mu_jd, exp(logvar_jd)).

    Gradient (c = 1/B): the losses' sum is nll + log q(z|x) - log p(z)
    + (beta - 1)(log q(z) - sum_d log q(z_d)); with A_ij = softmax_j(sum_d
    lq_ijd) and A_ijd = softmax_j(lq_ijd), the coefficient of lq_ijd is
    G_ijd = c (beta - 1)(A_ij - A_ijd), and

        dz_id      += sum_j G_ijd (mu_jd - z_id) / var_jd
        dmu_jd     += sum_i G_ijd (z_id - mu_jd) / var_jd
        dlogvar_jd += sum_i G_ijd ((z_id - mu_jd)^2 / var_jd - 1) / 2

    plus the direct terms (log q(z_i|x_i): dz = -eps/std, dmu = eps/std,
    dlogvar = (eps^2 - 1)/2; -log p(z_i): dz = z) and the decoder's dz, then
    the reparameterization (dmu += dz, dlogvar += dz eps std / 2). All B x B x L
    terms are array operations on the backend (no Python loop over images).

    Data-parallel (``comm``, a :class:`fastvae.training.distributed.World` of more than
    one rank): the estimator needs every posterior of the GLOBAL batch, so the
    ranks gather ``(z, mu, logvar)`` of its n rows (one sum over ranks of a
    zero-padded ``(3, n, L)`` buffer, 12 n L bytes in float32) and each runs
    the pairwise terms over all n (n^2 L work on every rank, not divided) and
    keeps its rows: the same numbers one process computes, with no second
    exchange. Raises ConfigError for N < 1.
    """

    name = "btcvae"

    def __init__(self, model, n_train: int, comm=None):
        if n_train < 1:
            raise ConfigError("beta-TCVAE needs the training set size N >= 1")
        self.model, self.n_train = model, int(n_train)
        self.comm = comm if comm is not None and comm.size > 1 else None

    def terms(self, mu, logvar, z, coef: float = 0.0, dz=None, dmu=None, dlogvar=None):
        """Per-image ``(log q(z|x), log q(z), sum_d log q(z_d), log p(z))`` (B,)
        by minibatch-weighted sampling (the backend's ``tc_pairwise``, which
        also adds ``coef`` times the gradient of ``log q(z) - sum_d log q(z_d)``
        to ``dz``, ``dmu``, ``dlogvar`` when ``coef`` is non-zero): the rows
        of a (4, B) device array."""
        be = self.model.backend
        B = z.shape[0]
        if dz is None:
            dz = dmu = dlogvar = be.scratch(("btcvae", "unused_grad"), z.shape)
        lse, lsed = be.tc_pairwise(z, mu, logvar, coef, dz, dmu, dlogvar)
        dens = be.scratch(("btcvae", "densities"), (4, B))
        be.array_op(_tc_densities, z, mu, logvar, lse, lsed, math.log(self.n_train * B), dens)
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
        be.array_op(_tc_direct, d, z, eps, ws.std, c, dz, dmu, dlv)
        if self.comm is None or rows is None:
            dens = self.terms(head[:, :L], head[:, L:], z, c * (beta - 1.0), dz, dmu, dlv)
        else:
            dens = self._global_terms(rows, z, head[:, :L], head[:, L:], c * (beta - 1.0), dz, dmu, dlv)
        dhead = ws.states[s].dx
        be.array_op(_tc_dhead, dz, dmu, dlv, eps, ws.std, dhead)
        d = dhead
        for i in range(s - 1, -1, -1):
            d = m.layers[i].backward(be, ws.states[i], d, step)
        per = buf("per_image", 5, B)                                # mi, tc, dwkl, weighted loss, kl
        be.array_op(_tc_combine, dens, nll, be.step_scalar(beta), per)
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

    def _global_terms(self, rows, z, mu, logvar, coef, dz, dmu, dlogvar):
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
        dens = self.terms(mug, lvg, zg, coef, *grads)
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
        """The objective's sum for the metrics: nll + MI + beta TC + DWKL."""
        return self.last_terms["loss"]

    def evaluate(self, X, batch_size: int = 128, seed: int = 0) -> dict:
        """Means over images ``X (N, D)`` (host) of MI, TC and dimension-wise
        KL (nats), each batch of ``batch_size`` estimated by minibatch-weighted
        sampling as in training (one seeded z per image)."""
        m, be = self.model, self.model.backend
        rng = np.random.Generator(np.random.PCG64([seed, 4]))
        sums = np.zeros(3)
        for i in range(0, len(X), batch_size):
            mu, logvar = (be.asarray(a) for a in m.encode(X[i:i + batch_size]))
            eps = be.asarray(rng.standard_normal(mu.shape))
            z = mu + be.xp.exp(0.5 * logvar) * eps
            qzx, qz, qzd, pz = self.terms(mu, logvar, z)          # rows of the (4, B) densities
            sums += [be.to_float((qzx - qz).sum()), be.to_float((qz - qzd).sum()), be.to_float((qzd - pz).sum())]
        mi, tc, dw = sums / max(len(X), 1)
        return {"mi": mi, "tc": tc, "dwkl": dw}


def eval_terms(model, X, n_train: int, seed: int = 0) -> dict:
    """``{"btcvae_mi", "btcvae_tc", "btcvae_dwkl"}`` over ``X`` for a model
    trained with beta-TCVAE (read from ``model.checkpoint``), else ``{}``:
    the training estimator, N the run's training set size (``data_rows`` in
    its checkpoint; ``n_train`` for older files). MNIST's eval reads its test
    files alone and took N from them: the same 24 test images scored MI 3.20
    as idx files and 4.12 as an .npz beside 60 training images (MI moves by
    log N, TC by L - 1 times that)."""
    ckpt = getattr(model, "checkpoint", None) or {}
    train = ckpt.get("train") or {}
    if train.get("objective") != "btcvae":
        return {}
    n_train = (ckpt.get("data_rows") or [0])[0] or n_train
    terms = BetaTCVAEObjective(model, n_train).evaluate(X, batch_size=train.get("batch_size", 128), seed=seed)
    return {f"btcvae_{k}": v for k, v in terms.items()}
