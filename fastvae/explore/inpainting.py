"""Inpainting: fill the missing pixels of an image from a trained VAE.

Images ``x (N, D)`` in [0, 1] and a mask ``(D,)`` or ``(N, D)`` of booleans,
True where a pixel is missing; every method returns fills ``(N, D)`` whose
observed pixels are ``x``'s exactly. ``E[x | z]`` is the decoder's pixel mean
(:meth:`fastvae.VAE.mean_image`), ``p(x_obs | z)`` the model's likelihood
over the observed pixels only.

* ``iw`` (default): importance-weighted single imputation (Mattei & Frellsen
  2019, "MIWAE", eqs. 9-10): ``z_k ~ q(z | x~)`` with ``x~`` the image whose
  missing pixels hold their starting value, ``k = 1..K``; self-normalised
  weights ``w_k ∝ p(x_obs | z_k) p(z_k) / q(z_k | x~)``; the fill is
  ``sum_k w_k E[x_mis | z_k]``. The log-weights come from the IWAE objective's
  own forward (:meth:`fastvae.objectives.IWAEObjective.log_weights`, inverse
  autoregressive flow steps included), with the missing pixels' likelihood
  terms added back.
* ``gibbs``: pseudo-Gibbs sampling (Rezende, Mohamed & Wierstra 2014, sec.
  5.2): start the missing pixels at their starting value, then ``steps``
  times ``z ~ q(z | x_obs, x_mis)``, ``x_mis = E[x_mis | z]``.
* ``mwg``: Metropolis-within-Gibbs (Mattei & Frellsen 2018, "Leveraging the
  exact likelihood of deep latent variable models", Algorithm 1), whose chain
  targets ``p(x_mis | x_obs)`` exactly: propose ``z' ~ q(z | x)``, accept with
  probability ``min(1, [p(x_obs|z') p(z') q(z|x)] / [p(x_obs|z) p(z) q(z'|x)])``,
  then draw ``x_mis ~ p(x_mis | z)``; the fill is the mean of ``E[x_mis | z]``
  over the chain's second half. It needs ``q(z | x)`` at a given ``z``, which a
  Gaussian posterior has in closed form (an IAF posterior would need its flow
  inverted: refused with ConfigError).

The starting value of the missing pixels is ``init``: an image ``(D,)`` (the
training set's mean image, as the command line passes it) or, when None, each
image's mean observed pixel. Masks (:func:`make_mask`): ``top``, ``bottom``,
``left``, ``right`` (half the image), ``center`` or ``center:F`` (a square of
side fraction F, default 0.5), ``random:P`` (a fraction P of the pixels,
seeded), ``box:r0,c0,r1,c1`` (rows r0..r1-1, columns c0..c1-1), or an image
file whose white pixels are missing.

May import: fastvae.objectives, fastvae.checks, fastvae.errors, fastvae.naming,
fastvae.io.safe_files.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

from fastvae.checks import check_count, check_images
from fastvae.errors import ConfigError, DataError
from fastvae.naming import option
from fastvae.objectives.iwae import IWAEObjective

METHODS = ("iw", "gibbs", "mwg")
HALVES = ("top", "bottom", "left", "right")
_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------- masks
def make_mask(spec, image_shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """The mask ``(D,)`` (True: missing) that ``spec`` names for images of
    ``image_shape`` ``(H, W[, C])``; a channel's pixels share their mask.
    ``spec`` may also be a boolean array of ``D`` or ``H x W`` values.
    Raises ConfigError for an unknown spec, a fraction outside (0, 1), a box
    outside the image, a mask image of another size, and a mask that hides
    every pixel or none; DataError for a mask file that is not an image."""
    H, W = int(image_shape[0]), int(image_shape[1])
    C = int(image_shape[2]) if len(image_shape) > 2 else 1
    if not isinstance(spec, str):
        m = np.asarray(spec)
        if m.dtype != bool or m.size not in (H * W, H * W * C):
            raise ConfigError(f"a mask array must hold {H * W} booleans (H x W) or {H * W * C} (one per value), "
                              f"got {m.dtype} of size {m.size}")
        return _checked(np.repeat(m.reshape(H * W), C) if m.size == H * W else m.reshape(-1))
    grid = np.zeros((H, W), dtype=bool)
    name, _, arg = spec.partition(":")
    if name in HALVES and not arg:
        if name == "top":
            grid[:H // 2] = True
        elif name == "bottom":
            grid[H - H // 2:] = True
        elif name == "left":
            grid[:, :W // 2] = True
        else:
            grid[:, W - W // 2:] = True
    elif name == "center":
        f = _fraction(arg or "0.5", spec)
        h, w = max(1, round(H * f)), max(1, round(W * f))
        r, c = (H - h) // 2, (W - w) // 2
        grid[r:r + h, c:c + w] = True
    elif name == "random":
        if not arg:
            raise ConfigError(f"mask {spec!r}: say the fraction of missing pixels, e.g. random:0.5")
        f = _fraction(arg, spec)
        grid.reshape(-1)[np.random.Generator(np.random.PCG64([seed, 41])).random(H * W) < f] = True
    elif name == "box":
        try:
            r0, c0, r1, c1 = (int(v) for v in arg.split(","))
        except ValueError:
            raise ConfigError(f"mask {spec!r}: a box is box:r0,c0,r1,c1 (four whole numbers)") from None
        if not (0 <= r0 < r1 <= H and 0 <= c0 < c1 <= W):
            raise ConfigError(f"mask {spec!r}: the box must lie inside the {H} x {W} image with r0 < r1 and "
                              f"c0 < c1 (rows 0..{H}, columns 0..{W})")
        grid[r0:r1, c0:c1] = True
    elif os.path.exists(spec):
        grid = _mask_file(spec, H, W)
    else:
        raise ConfigError(f"unknown mask {spec!r}; use top, bottom, left, right, center[:F], random:P, "
                          "box:r0,c0,r1,c1 or a mask image file (white = missing)")
    return _checked(np.repeat(grid.reshape(-1), C))


def _fraction(text: str, spec: str) -> float:
    try:
        f = float(text)
    except ValueError:
        f = float("nan")
    if not 0.0 < f < 1.0:
        raise ConfigError(f"mask {spec!r}: the fraction must be a number between 0 and 1 (exclusive), got {text!r}")
    return f


def _mask_file(path: str, H: int, W: int) -> np.ndarray:
    """A mask image, read as untrusted input (:func:`fastvae.io.safe_files.read_image`:
    a regular file, its declared size checked before decoding): white (>= 128
    in gray) = missing. A mask of another size is refused, not resized."""
    from fastvae.io.safe_files import read_image
    fix = "pass a mask image (PNG, JPEG, ...) or a mask name such as bottom"
    try:
        a = read_image(path, "L", None, fix, DataError)
    except DataError as exc:                          # the reader's problem, without its own fix
        raise DataError(f"mask file {path} is not an image ({str(exc).split('; ')[0]}); {fix}") from None
    if a.shape != (H, W):
        raise ConfigError(f"mask file {path} is {a.shape[1]} x {a.shape[0]} pixels but the images are {W} x {H}; "
                          f"draw the mask at {W} x {H}")
    return a >= 128


def _checked(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        raise ConfigError("the mask hides no pixel: there is nothing to fill; choose a larger mask")
    if mask.all():
        raise ConfigError("the mask hides every pixel: there is nothing to condition on; choose a smaller mask")
    return mask


def _masks_for(mask, N: int, D: int) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype != bool or m.shape not in ((D,), (N, D)):
        raise ConfigError(f"the mask must be booleans of shape ({D},) or ({N}, {D}) for these images, got "
                          f"{m.dtype} {m.shape}; build one with fastvae.explore.inpainting.make_mask")
    m = np.broadcast_to(m, (N, D))
    if not m.any(axis=1).all() or m.all(axis=1).any():
        raise ConfigError("each image's mask must hide some pixels and keep some")
    return m


# ---------------------------------------------------------------- the likelihood, pixel by pixel
def pixel_nll(model, logits, x) -> np.ndarray:
    """Per-pixel negative log-likelihood (nats, float64, the shape of
    ``logits``) of ``x`` under the decoder outputs ``logits``, as the model's
    likelihood layer sums it: bernoulli ``softplus(l) - x l``; gaussian
    ``(l - x)^2 / (2 sigma^2) + log sigma + log(2 pi) / 2``; mse ``(l - x)^2``."""
    c = model.config
    l, x = np.asarray(logits, dtype=np.float64), np.asarray(x, dtype=np.float64)
    if c.likelihood == "bernoulli":
        return np.maximum(l, 0.0) + np.log1p(np.exp(-np.abs(l))) - x * l
    if c.likelihood == "gaussian":
        return (l - x) ** 2 / (2.0 * c.sigma ** 2) + math.log(c.sigma) + 0.5 * _LOG_2PI
    return (l - x) ** 2


def fill_nll(model, fill, x, mask) -> np.ndarray:
    """Per-image negative log-likelihood (nats) of the true missing pixels
    ``x`` given a fill taken as the likelihood's mean (bernoulli: the fill as
    probabilities, clipped to [1e-6, 1 - 1e-6]; gaussian and mse: as the
    mean), summed over each image's missing pixels: ``(N,)`` float64."""
    f = np.asarray(fill, dtype=np.float64)
    if model.config.likelihood == "bernoulli":
        p = np.clip(f, 1e-6, 1.0 - 1e-6)
        logits = np.log(p) - np.log1p(-p)
    else:
        logits = f
    return (pixel_nll(model, logits, x) * mask).sum(1)


# ---------------------------------------------------------------- the methods
def inpaint(model, x, mask, method: str = "iw", steps: int = 50, samples: int = 100, seed: int = 0,
            init=None, snapshots: Optional[Sequence[int]] = None, batch_size: int = 64):
    """Fill the missing pixels of ``x (N, D)`` (host, in [0, 1]) where ``mask``
    ``(D,)`` or ``(N, D)`` is True, with ``method`` ``iw`` (``samples`` = K),
    ``gibbs`` or ``mwg`` (``steps`` iterations); see the module docstring for
    each method's math and source. ``init``: the missing pixels' starting
    value, an image ``(D,)`` (None: each image's mean observed pixel).
    ``seed`` seeds every draw. Returns the fills ``(N, D)`` float64, the
    observed pixels exactly ``x``'s; with ``snapshots`` (iteration numbers for
    gibbs and mwg, sample counts for iw) also the list of fills at each.
    Raises ConfigError for an unknown method, counts below 1, a mask of
    another shape or hiding every pixel or none; DataError for bad images."""
    if method not in METHODS:
        raise ConfigError(f"unknown inpainting method {method!r}; choose one of {', '.join(METHODS)}")
    steps, samples = check_count("steps", steps), check_count("samples", samples)
    batch_size = check_count("batch_size", batch_size)
    x = np.asarray(check_images(x, model.config), dtype=np.float64)
    N, D = x.shape
    m = _masks_for(mask, N, D)
    start = _start(x, m, init, D)
    if method == "mwg" and model.decoder_at > model.sampler_at + 1:
        raise ConfigError("mwg needs q(z | x) at a given z, which an inverse autoregressive flow posterior gives "
                          f"only by inverting the flow; use {option('method', 'iw')} or {option('method', 'gibbs')} "
                          "for this model")
    marks = sorted(set(int(s) for s in (snapshots or ())))
    fills, shots = np.empty((N, D)), [np.empty((N, D)) for _ in marks]
    run = {"iw": _iw, "gibbs": _gibbs, "mwg": _mwg}[method]
    for i0 in range(0, N, batch_size):
        sl = slice(i0, i0 + batch_size)
        rng = np.random.Generator(np.random.PCG64([seed, 42, i0]))
        f, s = run(model, x[sl], m[sl], start[sl], steps=steps, samples=samples, rng=rng, marks=marks)
        fills[sl] = np.where(m[sl], f, x[sl])
        for out, shot in zip(shots, s):
            out[sl] = np.where(m[sl], shot, x[sl])
    return (fills, shots) if snapshots is not None else fills


def _start(x, m, init, D):
    if init is None:
        obs_mean = (x * ~m).sum(1) / np.maximum((~m).sum(1), 1)
        return np.where(m, obs_mean[:, None], x)
    init = np.asarray(init, dtype=np.float64).reshape(-1)
    if init.shape != (D,) or not np.isfinite(init).all():
        raise ConfigError(f"init must be a finite image of {D} values (the training mean image), got shape "
                          f"{init.shape}")
    return np.where(m, init[None, :], x)


def _iw(model, x, m, start, *, samples, rng, marks, **_):
    """MIWAE single imputation for one batch (see the module docstring)."""
    be, L = model.backend, model.config.latent_dim
    B, D = x.shape
    K = samples
    bound = IWAEObjective(model, K)
    chunk = max(1, model.rows_within(8192) // K)            # images per decode within the work-buffer budget
    num, shots = np.empty((B, D)), [np.empty((B, D)) for _ in marks]
    for b0 in range(0, B, chunk):
        xs, ms = start[b0:b0 + chunk], m[b0:b0 + chunk]
        n = len(xs)
        eps = rng.standard_normal((n * K, L))
        with model.lock:
            logw = be.to_host(bound.log_weights(be.asarray(xs), be.asarray(eps))).astype(np.float64)   # (n, K)
            # the decoder outputs of the samples just weighed: log_weights ran them on the model's B K-row workspace
            logits = be.to_host(model.workspace(n * K).logits).astype(np.float64).reshape(n, K, D)
        rep = np.repeat(xs, K, axis=0).reshape(n, K, D)
        logw = logw + (pixel_nll(model, logits, rep) * ms[:, None, :]).sum(2)      # drop the missing pixels' terms
        means = model.mean_image(logits)
        num[b0:b0 + n] = _weighted(logw, means)
        for j, k in enumerate(marks):
            kk = min(max(k, 1), K)
            shots[j][b0:b0 + n] = _weighted(logw[:, :kk], means[:, :kk])
    return num, shots


def _weighted(logw, means):
    w = np.exp(logw - logw.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    return np.einsum("nk,nkd->nd", w, means)


def _posterior_sample(model, xcur, rng):
    """``z ~ q(z | xcur)`` through the sampler and any flow steps, and the
    decoder's logits at it (host float64)."""
    be, L = model.backend, model.config.latent_dim
    B = xcur.shape[0]
    with model.lock:
        ws = model.workspace(B)
        xd = be.asarray(xcur)
        model.encode_into(ws, xd)
        z = model.sample_posterior_into(ws, ws.head, be.asarray(rng.standard_normal((B, L))))
        model.decode_into(ws, z)
        return be.to_host(ws.logits).astype(np.float64)


def _gibbs(model, x, m, start, *, steps, rng, marks, **_):
    """Pseudo-Gibbs for one batch (see the module docstring)."""
    cur, shots = start.copy(), []
    for t in range(1, steps + 1):
        mean = model.mean_image(_posterior_sample(model, cur, rng))
        cur = np.where(m, mean, x)
        if t in marks:
            shots.append(cur.copy())
    shots += [cur.copy() for k in marks if k > steps]
    return cur, shots


def _gauss_logq(z, mu, logvar):
    return -0.5 * (((z - mu) ** 2) * np.exp(-logvar) + logvar + _LOG_2PI).sum(1)


def _decode_logits(model, z):
    be = model.backend
    with model.lock:
        ws = model.workspace(z.shape[0])
        model.decode_into(ws, be.asarray(z))
        return be.to_host(ws.logits).astype(np.float64)


def _draw(model, logits, rng):
    """``x ~ p(x | z)`` from decoder outputs: Bernoulli draws, Gaussian with the
    model's sigma (clipped to [0, 1]), the mean for mse."""
    mean = model.mean_image(logits)
    c = model.config
    if c.likelihood == "bernoulli":
        return (rng.random(mean.shape) < mean).astype(np.float64)
    if c.likelihood == "gaussian":
        return np.clip(mean + c.sigma * rng.standard_normal(mean.shape), 0.0, 1.0)
    return mean


def _mwg(model, x, m, start, *, steps, rng, marks, **_):
    """Metropolis-within-Gibbs for one batch (see the module docstring)."""
    B, L = x.shape[0], model.config.latent_dim
    cur = start.copy()
    mu, logvar = model.encode(cur)
    z = mu + np.exp(0.5 * logvar) * rng.standard_normal((B, L))
    logits = _decode_logits(model, z)
    obs = ~m

    def log_target(zz, ll):                               # log p(x_obs | z) + log p(z)
        return -(pixel_nll(model, ll, x) * obs).sum(1) - 0.5 * (zz * zz).sum(1) - 0.5 * L * _LOG_2PI

    acc, total, shots = np.zeros(B), np.zeros((B, x.shape[1])), []
    burn = steps // 2
    for t in range(1, steps + 1):
        mu, logvar = model.encode(cur)
        prop = mu + np.exp(0.5 * logvar) * rng.standard_normal((B, L))
        prop_logits = _decode_logits(model, prop)
        log_ratio = (log_target(prop, prop_logits) + _gauss_logq(z, mu, logvar)
                     - log_target(z, logits) - _gauss_logq(prop, mu, logvar))
        take = np.log(rng.random(B)) < log_ratio
        z[take], logits[take] = prop[take], prop_logits[take]
        acc += take
        cur = np.where(m, _draw(model, logits, rng), x)
        if t > burn:
            total += model.mean_image(logits)
        if t in marks:
            shots.append(np.where(m, total / max(t - burn, 1) if t > burn else model.mean_image(logits), x))
    shots += [np.where(m, total / (steps - burn), x) for k in marks if k > steps]
    return total / (steps - burn), shots


# ---------------------------------------------------------------- scores
def scores(model, x, mask, fill, x_train=None, batch_size: int = 1024) -> dict:
    """The masked-pixel scores of ``fill`` against the truth ``x`` (both
    ``(N, D)``), with the baselines "the training mean image" and "the
    nearest training image on the observed pixels" (one GEMM against
    ``x_train (M, D)``, in blocks) when ``x_train`` is given: per method
    ``{"nll": nats per image (:func:`fill_nll`, mean over images), "mse": mean
    squared error over the missing pixels (mean over images)}``, and ``"n"``."""
    x = np.asarray(check_images(x, model.config), dtype=np.float64)
    N, D = x.shape
    m = _masks_for(mask, N, D)
    out = {"n": int(N), "fill": _score(model, x, m, fill)}
    if x_train is not None:
        xt = np.asarray(check_images(x_train, model.config, "training images"), dtype=np.float64)
        out["mean_image"] = _score(model, x, m, np.broadcast_to(xt.mean(0), (N, D)))
        out["nearest_image"] = _score(model, x, m, nearest_fill(x, m, xt, batch_size))
    return out


def _score(model, x, m, fill):
    fill = np.asarray(fill, dtype=np.float64)
    se = ((fill - x) ** 2 * m).sum(1) / m.sum(1)
    return {"nll": float(fill_nll(model, fill, x, m).mean()), "mse": float(se.mean())}


def nearest_fill(x, m, x_train, batch_size: int = 1024) -> np.ndarray:
    """Each image's missing pixels from the training image nearest to it on
    its observed pixels (squared distance ``|a|^2 - 2 a.t + |t|^2`` over the
    observed pixels: one GEMM per block of training images)."""
    obs = (~m).astype(np.float64)
    xo = x * obs
    best, arg = np.full(len(x), np.inf), np.zeros(len(x), dtype=np.int64)
    for t0 in range(0, len(x_train), batch_size):
        t = x_train[t0:t0 + batch_size]
        d = (xo * xo).sum(1)[:, None] - 2.0 * xo @ t.T + obs @ (t * t).T
        j = d.argmin(1)
        v = d[np.arange(len(x)), j]
        better = v < best
        best[better], arg[better] = v[better], j[better] + t0
    return np.where(m, x_train[arg], x)


# ---------------------------------------------------------------- pictures
def shown_masked(x, mask, gray: float = 0.5) -> np.ndarray:
    """``x (N, D)`` with its missing pixels drawn mid-gray (what the methods see)."""
    return np.where(np.broadcast_to(mask, np.shape(x)), gray, x)


def plot_inpainting(model, x, mask, image_shape, method: str = "iw", snapshots=None, path=None, **kw):
    """A grid, one row per image of ``x (N, D)``: the masked input, the fill
    after each of ``snapshots`` (iterations for gibbs and mwg, sample counts
    for iw; default four spread over ``steps``/``samples``), and the truth.
    ``kw`` go to :func:`inpaint`. Returns the matplotlib figure (and writes
    ``path`` when given)."""
    from fastvae.explore.plots import _figure, _save, _show, tile
    x = np.asarray(check_images(x, model.config), dtype=np.float64)
    last = kw.get("samples", 100) if method == "iw" else kw.get("steps", 50)
    marks = sorted(set(snapshots or [max(1, last // 8), max(1, last // 4), max(1, last // 2), last]))
    _, shots = inpaint(model, x, mask, method=method, snapshots=marks, **kw)
    rows = [np.vstack([shown_masked(x[i:i + 1], mask if np.ndim(mask) == 1 else mask[i])]
                      + [s[i:i + 1] for s in shots] + [x[i:i + 1]]) for i in range(len(x))]
    ncol = len(marks) + 2
    fig = _figure((ncol * 0.8 + 0.4, len(x) * 0.8 + 0.5))
    ax = fig.add_subplot(1, 1, 1)
    _show(ax, tile(np.vstack(rows), image_shape, ncol))
    unit = "samples" if method == "iw" else "steps"
    ax.set_title(f"inpainting ({method}): masked input, fills after {', '.join(map(str, marks))} {unit}, truth",
                 fontsize=7)
    return _save(fig, path)


def chain_frames(model, x, mask, steps: int = 50, **kw) -> np.ndarray:
    """The pseudo-Gibbs chain of one image ``x (D,)``: ``(steps + 1, D)``
    frames, the masked input first, then the fill after each step."""
    x = np.asarray(x, dtype=np.float64).reshape(1, -1)
    _, shots = inpaint(model, x, mask, method="gibbs", steps=steps, snapshots=range(1, steps + 1), **kw)
    return np.vstack([shown_masked(x, mask)] + [s for s in shots])
