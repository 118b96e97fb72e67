"""Evaluation: the ELBO of a trained model over a whole split.

-ELBO per image = recon + kl in nats (Kingma & Welling 2014, eq. 10 with one
sample of z and the analytic Gaussian KL of Appendix B). The single-sample
estimate uses seeded noise on the backend's own stream, so a result is
reproducible and never disturbs the training stream.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from fastvae.checks import check_count, check_images, check_model
from fastvae.errors import ConfigError


EVAL_ROWS = 1000      # images per evaluation batch at most (fewer when their work buffers pass 1 GiB)


def per_image_losses(model, X, batch_size: Optional[int] = None, seed: int = 0):
    """Per-image ``(recon, kl)`` host float64 arrays ``(N,)`` in nats for host
    images ``X (N, D)`` in [0, 1], one z sample per image drawn from a stream
    seeded by ``seed``; ``batch_size`` None: up to 1000 images in ``memory.WORK_BYTES`` of work
    buffers (:meth:`fastvae.VAE.rows_within`). Raises DataError for images the
    model cannot score (:func:`fastvae.checks.check_images`), ConfigError for
    ``batch_size`` < 1 or a ``model`` that is not a :class:`fastvae.VAE`."""
    check_model(model, "evaluate")
    batch_size = model.rows_within(EVAL_ROWS) if batch_size is None else check_count("batch_size", batch_size)
    seed = check_count("seed", seed, minimum=0)
    X = check_images(X, model.config)
    be = model.backend
    rng = be.new_rng([int(seed), 2])
    recon = np.empty(X.shape[0])
    kl = np.empty(X.shape[0])
    for i in range(0, X.shape[0], batch_size):
        xb = be.asarray(X[i:i + batch_size])
        with model.lock:                            # the workspace is the model's, shared with other threads
            ws = model.workspace(xb.shape[0])
            rng.normal_(ws.eps)
            model.forward(xb, ws.eps)
            recon[i:i + xb.shape[0]] = be.to_host(ws.nll)
            kl[i:i + xb.shape[0]] = be.to_host(ws.kl)
    return recon, kl


BINARIZE_SEED = 0x62696E    # the one draw of binary evaluation images, the same for every run


def binarize_rows(x, rows, seed: int = BINARIZE_SEED) -> np.ndarray:
    """Row ``rows[i]`` of a split, with pixel probabilities ``x[i]`` (host
    ``(n, D)`` in [0, 1]), as its fixed binary draw: float32 0/1, ``u < x``
    with ``u ~ U[0, 1)`` in float64 from ``Philox(key=seed)`` started at
    counter ``(0, row, 0, 0)``. A row's draw depends on its place in the split
    alone, so a split read whole, in chunks, or streamed from disk gets the
    same images, on every machine and backend."""
    out = np.empty(x.shape, np.float32)
    for i, r in enumerate(np.asarray(rows, np.int64).reshape(-1)):
        u = np.random.Generator(np.random.Philox(key=seed, counter=[0, int(r), 0, 0])).random(x.shape[1])
        out[i] = u < x[i]
    return out


def binarized(X, cfg, seed: int = BINARIZE_SEED):
    """A split's fixed draw of binary images (:func:`binarize_rows`) from its
    pixel probabilities ``X (N, D)`` in [0, 1]: a float32 0/1 array, or for a
    streamed split (:class:`~fastvae.datasets.streaming.StreamedImages`) one that draws
    each row as it is read. How a run trained with dynamic binarization
    (``--binarize``) is evaluated: its Bernoulli likelihood is a probability
    of binary images, and its encoder never saw grey ones (they were scored
    as given: neither the -ELBO of the binary data it models nor comparable
    with other runs'). ``cfg``: the model's config. Raises DataError as
    :func:`~fastvae.checks.check_images`."""
    X = check_images(X, cfg)
    if not isinstance(X, np.ndarray):
        return X.binarized(seed)
    return binarize_rows(X, np.arange(len(X)), seed)


def binarized_splits(data, cfg, splits=("train", "test")):
    """``data`` (a :class:`~fastvae.datasets.dataset.Dataset`) with its ``splits`` as
    :func:`binarized` draws them; ``cfg``: the model's config."""
    import dataclasses
    return dataclasses.replace(data, **{f"x_{k}": binarized(x, cfg) for k in splits
                                        if (x := getattr(data, f"x_{k}")) is not None and len(x)})


def train_loss_name(row: dict) -> str:
    """What a metrics row's ``train_neg_elbo`` holds: ``"-ELBO"``, or
    ``"loss"`` for the IWAE bound -L_K (which has no KL term: its
    ``train_kl`` is None)."""
    return "-ELBO" if row.get("train_kl") is not None else "loss"


def units(likelihood: str, short: bool = False) -> str:
    """The units of -ELBO, recon and IWAE numbers under ``likelihood``: nats
    per image, except for ``mse``, a sum of squared errors (no density);
    ``short``: the form for an axis label."""
    if likelihood == "mse":
        return ("per image (recon: sum of squared errors)" if short else
                "per image: recon a sum of squared errors, kl in nats (not a log-likelihood)")
    return "nats per image"


def evaluate(model, X, batch_size: Optional[int] = None, seed: Optional[int] = None) -> dict:
    """``{"neg_elbo", "recon", "kl", "n"}``: means over the ``n`` images of X,
    in nats per image (see :func:`per_image_losses`). ``seed`` None: the
    run's own seed for a model from :func:`fastvae.load` (so the last test
    -ELBO in its metrics is reproduced, as ``fastvae eval`` does), else 0.
    X is scored as given: a ``--binarize`` run's metrics were taken on
    :func:`binarized` test images."""
    if seed is None:                               # (per_image_losses checks the model)
        seed = ((getattr(model, "checkpoint", None) or {}).get("train") or {}).get("seed", 0)
    recon, kl = per_image_losses(model, X, batch_size, seed)
    n = int(len(recon))
    if n == 0:
        raise ConfigError("cannot evaluate an empty split")
    return {"neg_elbo": float(np.mean(recon + kl)), "recon": float(np.mean(recon)),
            "kl": float(np.mean(kl)), "n": n}
