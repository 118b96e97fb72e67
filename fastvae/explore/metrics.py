"""Scores of a trained VAE: importance-weighted -log p(x), KL per latent
dimension, active units and the Mutual Information Gap.

  * :func:`iwae` -- importance-weighted estimate of -log p(x) (Burda, Grosse &
    Salakhutdinov 2016, eq. 8), batched, with a stable log-sum-exp; it lies at
    or below -ELBO and equals the single-sample ELBO at k = 1.
  * :func:`kl_per_dim`, :func:`active_units` (Burda et al. 2016, Sec. 5.2:
    Cov_x(E_q[z_j]) > 0.01).
  * :func:`mig` -- Mutual Information Gap (Chen et al. 2018, eq. 6) against
    known discrete factors (the sprites).

All take a :class:`fastvae.VAE` (any backend) and host arrays ``(N, D)``;
results are float64 host arrays. Also reachable as ``fastvae.explore.*``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from fastvae.checks import _finite_nonneg, as_numbers, check_count, check_images
from fastvae.errors import ConfigError
from fastvae.objectives.iwae import IWAEObjective


def iwae(model, X, k: int = 5000, seed: int = 0, batch_rows: Optional[int] = None,
         progress: bool = False) -> np.ndarray:
    """Per-image importance-weighted estimate of -log p(x) in nats, ``(N,)``.

    -log p(x) ~= log k - logsumexp_i [log p(x|z_i) + log p(z_i) - log q(z_i|x)],
    z_i ~ q(z|x), i = 1..k (Burda et al. 2016, eq. 8); with an IAF posterior
    z_i and log q(z_i|x) come through the flow steps (their log-determinants
    included). ``log w`` comes from :meth:`fastvae.objectives.IWAEObjective.log_weights`,
    the training objective's own forward. Decodes at most
    ``batch_rows`` rows at a time (many images x few samples, or one image's
    samples in chunks; None: up to 8192 within ``memory.WORK_BYTES`` of work buffers,
    :meth:`fastvae.VAE.rows_within`); a running max keeps the log-sum-exp
    stable (float64).
    ``progress`` shows a tqdm bar over the N k decoded samples on stderr when
    it is a terminal (as training's bar: none in a log file).
    Raises ConfigError for k < 1 or a negative seed.
    """
    X = check_images(X, model.config)               # a streamed split stays on disk, read block by block
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"iwae k must be a positive integer, got {k!r}")
    seed = check_count("seed", seed, minimum=0)
    batch_rows = model.rows_within(8192) if batch_rows is None else check_count("batch_rows", batch_rows)
    be, L = model.backend, model.config.latent_dim
    bound = IWAEObjective(model, k)                 # log w through the training objective's own forward
    rng = np.random.Generator(np.random.PCG64([seed, 3]))
    out = np.empty(len(X))
    per_block = max(1, batch_rows // k)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(X) * k, unit="sample", unit_scale=True, desc=f"IWAE k={k}",
               disable=None if progress else True, leave=False)      # None: shown on a terminal only
    for i0 in range(0, len(X), per_block):
        xb = X[i0:i0 + per_block]
        nb = len(xb)
        t = max(1, min(k, batch_rows // nb))
        m = np.full(nb, -np.inf)
        acc = np.zeros(nb)
        done = 0
        x_dev = be.asarray(np.asarray(xb))
        while done < k:
            tt = min(t, k - done)
            eps = rng.standard_normal((nb * tt, L))
            with model.lock:                        # the workspace is the model's, shared with other threads
                w = be.to_host(bound.log_weights(x_dev, be.asarray(eps))).astype(np.float64)
            new_m = np.maximum(m, w.max(1))
            acc = acc * np.exp(m - new_m) + np.exp(w - new_m[:, None]).sum(1)
            m = new_m
            done += tt
            bar.update(nb * tt)
        out[i0:i0 + nb] = math.log(k) - (m + np.log(acc))
    bar.close()
    return out


def kl_per_dim(model, X) -> np.ndarray:
    """Mean over images of each latent dimension's KL to N(0, 1), ``(L,)`` nats
    (Kingma & Welling 2014, App. B, not summed over j), in float64. With an
    IAF posterior (``model.config.flows > 0``) these are the Gaussian's before
    the flow steps, which mix the dimensions: they do not sum to the model's
    KL (``fastvae eval`` names them ``base_kl_per_dim``). DataError for no images."""
    X = check_images(X, model.config, min_rows=1)
    mu, lv = (a.astype(np.float64) for a in model.encode(X))
    return (0.5 * (mu * mu + np.exp(lv) - lv - 1.0)).mean(0)


def active_units(model, X, threshold: float = 0.01):
    """``(count, variances)``: dimensions whose Var_x(mu_j) exceeds ``threshold``
    (Burda et al. 2016, Sec. 5.2). DataError for no images, ConfigError for a
    threshold that is not a finite non-negative number."""
    _finite_nonneg("threshold", threshold)
    mu, _ = model.encode(check_images(X, model.config, min_rows=1))
    var = mu.astype(np.float64).var(0)
    return int((var > threshold).sum()), var


def _mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats of two discrete label arrays (plug-in estimate)."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def _entropy(a: np.ndarray) -> float:
    _, counts = np.unique(a, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mig(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> dict:
    """Mutual Information Gap (Chen et al. 2018, eq. 6).

    codes: ``(N, L)`` latent means; factors: ``(N, K)`` discrete ground-truth
    factor values. Each code dimension is discretised into ``bins`` equal-width
    bins (as in Locatello et al. 2019); for each factor v_k the gap between the
    two largest I(z_j; v_k), divided by H(v_k), is averaged over factors with
    more than one value. Returns ``{"mig", "per_factor"}`` (each in [0, 1]),
    NaN for fewer than two code dimensions: the gap needs a second latent
    (with one, the binned MI's upward bias was the whole score: 0.66 for
    random codes of 30 sprites, 0.05 of 1200, against 0.03 and 0.004 with 4 latents).
    ConfigError for codes or factors that are not finite ``(N, .)`` arrays of
    numbers with the same rows, or ``bins`` not a count from 2 to 10^6.
    """
    codes = as_numbers("codes", codes, 2)
    factors = as_numbers("factors", factors, 2, (len(codes),))
    bins = check_count("bins", bins, minimum=2)
    if bins > 10 ** 6:
        raise ConfigError(f"bins must be at most 10^6 (20 is usual), got {bins}")
    if codes.shape[1] < 2:
        return {"mig": float("nan"), "per_factor": [float("nan")] * factors.shape[1]}
    disc = np.empty(codes.shape, dtype=np.int64)
    for j in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, j], bins=bins)
        disc[:, j] = np.digitize(codes[:, j], edges[1:-1])
    gaps = []
    for k in range(factors.shape[1]):
        h = _entropy(factors[:, k])
        if h <= 0:
            gaps.append(float("nan"))
            continue
        mi = sorted((_mutual_info(disc[:, j], factors[:, k]) for j in range(codes.shape[1])), reverse=True)
        top2 = mi[1] if len(mi) > 1 else 0.0
        gaps.append((mi[0] - top2) / h)
    valid = [g for g in gaps if not math.isnan(g)]
    return {"mig": float(np.mean(valid)) if valid else float("nan"), "per_factor": gaps}
