"""Explore what a VAE learned: numbers and pictures of its latent space.

Every function takes a :class:`fastvae.VAE` (any backend) and host arrays,
returns NumPy arrays or a matplotlib ``Figure`` (and writes a file when given
``path``). Images are ``(N, D)`` in [0, 1]; codes ``(N, L)``.

Numbers:
  * :func:`iwae` -- importance-weighted estimate of -log p(x) (Burda, Grosse &
    Salakhutdinov 2016, eq. 8), batched, with a stable log-sum-exp; it lies at
    or below -ELBO and equals the single-sample ELBO at k = 1.
  * :func:`kl_per_dim`, :func:`active_units` (Burda et al. 2016, Sec. 5.2:
    Cov_x(E_q[z_j]) > 0.01).
  * :func:`mig` -- Mutual Information Gap (Chen et al. 2018, eq. 6) against
    known discrete factors (the sprites).

Package: this module is the public ``fastvae.explore`` API; ``evaluation``
(the -ELBO of a split), ``metrics`` (IWAE, KL per dimension, active units,
MIG), ``inpainting`` (masks, the three fill methods, their scores and
pictures), ``latent`` (codes to decode: grids, traversals, interpolation) and
``plots`` (reconstructions, samples, loss curves) live beside it. May
import: fastvae.nn, fastvae.objectives, fastvae.backends, fastvae.datasets, fastvae.io,
fastvae.training.memory, fastvae.errors/naming/checks; never fastvae.cli.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from fastvae.checks import _finite_nonneg, as_numbers, check_count, check_images
from fastvae.training.memory import preflight
from fastvae.naming import option
from fastvae.errors import ConfigError, DataError
from fastvae.explore.latent import (check_grid_dims, grid_values, interpolate_codes, latent_grid_codes, lerp,  # noqa: F401
                     pca_plane, slerp, traversal_codes)                                     # (re-exported)
from fastvae.explore.metrics import active_units, iwae, kl_per_dim, mig  # noqa: F401  (re-exported)
from fastvae.explore.inpainting import inpaint, make_mask, plot_inpainting  # noqa: F401  (re-exported)
from fastvae.explore.plots import _figure, _save, _show, tile, plot_loss, plot_reconstructions, plot_samples  # noqa: F401

_LOG_2PI = math.log(2 * math.pi)


# ------------------------------------------------------------------ numbers (the scores: fastvae.explore.metrics)
def per_image_elbo(model, X, batch_size=None, seed=0):
    """Per-image ``(recon, kl)`` (nats) with one z sample (see fastvae.evaluate)."""
    from fastvae.explore.evaluation import per_image_losses
    return per_image_losses(model, X, batch_size, seed)


def best_and_worst(losses: np.ndarray, n: int):
    """Indices of the ``n`` lowest-loss (best) and ``n`` highest-loss (worst)
    images, each sorted from most extreme inwards: ``best[0]`` has the lowest
    loss, ``worst[0]`` the highest. ``losses``: ``(N,)`` numbers (NaN sorts
    last); ConfigError for another shape or an ``n`` that is not a count >= 0."""
    order = np.argsort(as_numbers("losses", losses, 1, finite=False), kind="stable")
    n = min(check_count("n", n, minimum=0), len(order))
    return order[:n], order[::-1][:n]


# ------------------------------------------------------------------ pictures
def plot_latent_map(model, X, labels=None, label_names=None, path=None, max_points=5000):
    """Test images' codes (``mu``; through the flow steps with an IAF
    posterior, see :meth:`VAE.codes`) as a scatter coloured by label: the latent
    plane itself when L = 2, else the first two principal components (named on the axes).
    labels: one per image: integer classes (``label_names`` names them),
    text class names (numbered in sorted order, the names on the colour
    bar), or values (a continuous colour bar). DataError for fewer labels
    than images, ConfigError for a ``max_points`` that is not a count."""
    X = check_images(np.asarray(X[:check_count("max_points", max_points)]), model.config, min_rows=1)   # first rows
    if labels is not None and np.ndim(labels) != 1:
        raise ConfigError(f"labels must be one value per image (N,), got {np.shape(labels)}; pass the split's labels")
    if labels is not None and len(labels) < len(X):
        raise DataError(f"{len(labels)} labels for {len(X)} images; give one label per image")
    if labels is not None and np.asarray(labels).dtype.kind in "USO":       # class names: numbered in sorted order
        from fastvae.datasets.arrayfiles import class_labels
        labels, names = class_labels(np.asarray(labels)[:len(X)], len(X), "labels")
        label_names = names if label_names is None else label_names
    mu = model.codes(X)
    fig = _figure((6, 5))
    ax = fig.add_subplot(1, 1, 1)
    if mu.shape[1] == 2:
        P, xl, yl = mu, "z[0]", "z[1]"
    elif mu.shape[1] == 1:
        P, xl, yl = np.hstack([mu, np.zeros_like(mu)]), "z[0]", "(constant)"
    else:
        mean, axes, ratio = pca_plane(mu)
        P = (mu - mean) @ axes.T
        xl, yl = (f"PC1 of mu ({ratio[0]:.0%} of variance)", f"PC2 of mu ({ratio[1]:.0%} of variance)")
    c = None if labels is None else np.asarray(labels)[:len(X)]
    cmap, norm = _label_colours(c, label_names)
    size = float(np.clip(3000 / len(P), 3, 30))           # points a reader can see, 20 images or 5000
    sc = ax.scatter(P[:, 0], P[:, 1], c=c, s=size, cmap=cmap, norm=norm, alpha=0.7, linewidths=0)
    if c is not None:
        cb = fig.colorbar(sc, ax=ax, label="class" if c.dtype.kind in "iu" else "label")
        if label_names is not None and len(label_names) <= 20:
            cb.set_ticks(range(len(label_names)))
            cb.set_ticklabels(label_names)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title("latent means of the images" + ("" if mu.shape[1] <= 2 else f" (L = {mu.shape[1]}, PCA)"))
    return _save(fig, path)


def _label_colours(c, label_names):
    """``(cmap, norm)`` for integer labels ``c`` (None: one colour): up to 10
    classes one tab10 colour each, a colour bar of exactly those bands with
    each class's tick in its middle (a plain tab10 spread 3 classes over its
    10 bands, ticks on band edges); more classes, or other labels, viridis."""
    if c is None:
        return None, None
    k = max(int(c.max()) + 1, len(label_names) if label_names is not None else 0)
    if c.dtype.kind not in "iu" or c.min() < 0 or k > 10:
        return "viridis", None
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib import colormaps
    return ListedColormap(colormaps["tab10"].colors[:k]), BoundaryNorm(np.arange(k + 1) - 0.5, k)


def check_grid_memory(model, n) -> None:
    """ConfigError naming ``--grid`` when an ``n x n`` latent grid's figure
    would not fit in host memory (before its codes are built)."""
    n = check_count("n", n)
    # measured: 91 bytes of peak memory per decoded pixel at --grid 400 on MNIST (11.4 GB; matplotlib's
    # RGBA copies of the tiled image dominate); --grid 400 was killed for memory before the figure cap
    preflight(96 * n * n * model.config.input_dim, None, f"a {n} x {n} latent grid",
              f"use a smaller grid ({option('n', flag='grid')})")


def plot_latent_grid(model, image_shape, n=15, dims=(0, 1), spacing="quantile", center=None, pca_codes=None,
                     path=None):
    """Decode an ``n x n`` grid over latent dims ``dims`` (or the PCA plane of
    ``pca_codes``), spaced ``even`` or by Gaussian ``quantile``, centred on
    ``center`` (an image's code) or 0."""
    check_grid_memory(model, n)
    plane = None
    if pca_codes is not None:
        mean, axes, _ = pca_plane(pca_codes)
        std = np.sqrt(((np.asarray(pca_codes) - mean) @ axes.T).var(0)) + 1e-12
        plane = (mean, axes * std[:, None])
    Z = latent_grid_codes(model, n, dims, spacing, center, plane)
    imgs = model.decode(Z)
    fig = _figure((n * 0.6 + 0.5, n * 0.6 + 0.5))
    ax = fig.add_subplot(1, 1, 1)
    _show(ax, tile(imgs, image_shape, n))
    what = "PCA plane of the codes" if plane is not None else f"z[{dims[0]}] (right), z[{dims[1]}] (up)"
    ax.set_title(f"latent grid over {what}, {spacing} spacing", fontsize=8)
    return _save(fig, path)


def plot_traversals(model, image_shape, X=None, center=None, n_values=9, span=3.0, max_dims=None, path=None):
    """One row per latent dimension, sorted by its KL over ``X`` (largest first;
    with IAF steps, which mix the dimensions, by the variance of the codes
    they output), decoding -span..span with the other coordinates fixed at
    ``center`` (default: the code of X's first image, or 0 without X) -- the beta-VAE picture
    (Higgins et al. 2017). ``max_dims`` keeps that many rows (the title then
    says how many of L)."""
    L = model.config.latent_dim
    n_values = check_count("n_values", n_values)
    by = "Var" if model.config.flows else "KL"
    if X is not None:
        kl = model.codes(X).astype(np.float64).var(0) if model.config.flows else kl_per_dim(model, X)
        order = list(np.argsort(-kl))
        if center is None:
            center = model.codes(np.asarray(X[:1]))[0]
    else:
        kl, order = None, list(range(L))
    if center is None:
        center = np.zeros(L)
    if max_dims is not None:
        order = order[:check_count("max_dims", max_dims)]
    Z = traversal_codes(model, center, n_values, span, order)
    imgs = model.decode(Z)
    fig = _figure((n_values * 0.7 + 1.2, len(order) * 0.7 + 0.5))
    ax = fig.add_subplot(1, 1, 1)
    _show(ax, tile(imgs, image_shape, n_values))
    H = image_shape[0] + 1
    for r, j in enumerate(order):
        lab = f"z[{j}]" + ("" if kl is None else f" {by} {kl[j]:.2f}")
        ax.text(-2, r * H + H / 2, lab, ha="right", va="center", fontsize=6)
    shown = "" if len(order) == L else (f"; the {len(order)} of {L} dims with the highest {by}" if kl is not None
                                        else f"; the first {len(order)} of {L} dims")
    sort = "" if kl is None else ", rows sorted by " + ("the codes' variance" if model.config.flows else "KL")
    ax.set_title(f"traversals from {-span:g} to {span:g}{sort}{shown}", fontsize=8)
    return _save(fig, path)


def interpolation_frames(model, xa, xb, steps=24, mode="linear") -> np.ndarray:
    """``(steps, D)`` decoded images morphing from image xa to xb through their
    codes (:meth:`VAE.codes`); ConfigError when they would not fit in memory."""
    preflight(16 * check_count("steps", steps, minimum=2) * model.config.input_dim, None,
              f"{steps} interpolation frames", f"use fewer {option('steps')}")       # the frames and their float64 copy
    xa, xb = (check_images(np.asarray(v).reshape(1, -1), model.config, what) for v, what in ((xa, "image a"),
                                                                                            (xb, "image b")))
    mu = model.codes(np.concatenate([xa, xb]))
    return model.decode(interpolate_codes(mu[0], mu[1], steps, mode))


def plot_interpolation(model, xa, xb, image_shape, steps=10, path=None):
    """A strip: the two inputs at the ends, linear (top) and spherical (bottom)
    interpolations between their codes."""
    rows = []
    for mode in ("linear", "spherical"):
        rows.append(np.vstack([np.asarray(xa).reshape(1, -1), interpolation_frames(model, xa, xb, steps, mode),
                               np.asarray(xb).reshape(1, -1)]))
    fig = _figure(((steps + 2) * 0.7, 2 * 0.7 + 0.5))
    ax = fig.add_subplot(1, 1, 1)
    _show(ax, tile(np.vstack(rows), image_shape, steps + 2))
    ax.set_title("interpolation: linear (top), spherical (bottom); inputs at the ends", fontsize=8)
    return _save(fig, path)


def save_gif(frames, image_shape, path, duration_ms=80, scale=4, bounce=True) -> int:
    """Write ``frames (T, D)`` as an animated GIF (Pillow), ``duration_ms`` milliseconds a frame, upscaled
    ``scale``x, played forth and back when ``bounce``; returns the number of frames in the file (identical
    consecutive frames are one, shown for their sum of durations). ConfigError for a name not ending in .gif
    (it replaced a checkpoint.h5 given by mistake), a duration that is not finite and positive, a scale
    below 1, frames past GIF's 65,535 pixels a side, or frames that would not fit in memory (checked first)."""
    from PIL import Image
    _finite_nonneg("duration_ms", duration_ms, positive=True)
    if os.path.splitext(os.fspath(path))[1].lower() != ".gif":
        raise ConfigError(f"an animation is written as .gif, not to {path}; name the file OUT.gif")
    frames = np.clip(np.asarray(frames, dtype=np.float64), 0, 1)
    seq = list(frames) + (list(frames[-2:0:-1]) if bounce and len(frames) > 2 else [])
    scale, (H, W) = check_count("scale", scale), image_shape[:2]
    if max(H, W) * scale > 65535:
        raise ConfigError(f"{option('scale', scale)} makes {W * scale} x {H * scale}-pixel frames; a GIF holds at "
                          f"most 65535 a side: use {option('scale', 65535 // max(H, W))} or less")
    preflight(2 * len(seq) * int(np.prod(image_shape)) * scale * scale, None,
              f"{len(seq)} GIF frames of {W * scale} x {H * scale} pixels",
              f"use a smaller {option('scale')} or fewer {option('steps')}")
    from fastvae.io.safe_files import on_white
    imgs = []
    for f in seq:                  # L, RGB or RGBA (then on white, as the PNG figures show it): from the shape
        a = (f.reshape(image_shape) * 255 + 0.5).astype(np.uint8)
        im = on_white(Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a)).convert(
            "L" if a.ndim == 2 or a.shape[2] == 1 else "RGB")
        imgs.append(im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST))
    from fastvae.training.runfolder import atomic_write
    atomic_write(path, lambda tmp: imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:],
                                                duration=duration_ms, loop=0, optimize=False))
    with Image.open(path) as written:      # Pillow merges identical consecutive frames, adding their durations
        return written.n_frames


def plot_loss_histogram(losses, marks: Optional[dict] = None, path=None, xlabel="-ELBO (nats per image)"):
    """Histogram of per-image losses; ``marks = {label: loss}`` drawn as vertical lines. Losses (and
    marks) that are not finite are left out, counted in the title; DataError when none is finite,
    ConfigError for losses that are not numbers or marks that are not ``{label: number}``."""
    from matplotlib.ticker import MaxNLocator
    losses = as_numbers("losses", np.ravel(losses) if np.ndim(losses) > 1 else losses, 1, finite=False)
    if marks is not None and (not isinstance(marks, dict) or not all(
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in marks.values())):
        raise ConfigError(f"marks must be {{label: loss}}, e.g. {{'median': 98.5}}, got {marks!r:.40}")
    finite = np.isfinite(losses)
    if not finite.any():
        raise DataError(f"no finite loss to draw among {losses.size} images; a model whose every -ELBO is NaN "
                        "or infinite has diverged: use an earlier checkpoint")
    left, losses = losses.size - int(finite.sum()), losses[finite]
    fig = _figure((6, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(losses, bins=60, color="tab:blue", alpha=0.8)
    for i, (lab, v) in enumerate((marks or {}).items()):
        if math.isfinite(v):
            ax.axvline(v, color=f"C{(i % 9) + 1}", ls="--", label=f"{lab}: {v:.1f}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))           # counts
    ax.set_title(f"per-image loss over {len(losses)} images (mean {losses.mean():.2f})"
                 + (f"; {left} not finite, left out" if left else ""))
    return _save(fig, path)


def plot_best_worst(model, X, losses, image_shape, n=8, path=None):
    """The ``n`` best (lowest loss) and ``n`` worst (highest loss) images of X,
    truly sorted, each above its reconstruction, with the loss on top."""
    X = X if hasattr(X, "shape") else np.asarray(X)      # arrays and streamed splits: only X[idx] is read
    losses = as_numbers("losses", losses, 1, finite=False)
    if len(losses) != len(X):
        raise DataError(f"{len(losses)} losses for {len(X)} images; give one loss per image (per_image_elbo)")
    best, worst = best_and_worst(losses, check_count("n", n))
    fig = _figure((n * 0.9 + 0.4, 5.2))
    for k, (idx, name) in enumerate(((best, "best (lowest -ELBO)"), (worst, "worst (highest -ELBO)"))):
        R = model.reconstruct(X[idx])
        ax = fig.add_subplot(2, 1, k + 1)
        _show(ax, tile(np.vstack([X[idx], R]), image_shape, len(idx)))
        W = image_shape[1] + 1
        for c, i in enumerate(idx):
            ax.text(c * W + W / 2, -1, f"{losses[i]:.0f}", ha="center", va="bottom", fontsize=6)
        ax.set_title(f"{name}: inputs above reconstructions", fontsize=8, pad=10)
    return _save(fig, path)


def plot_kl_per_dim(kl, variances=None, threshold=0.01, path=None, flows: int = 0):
    """Bar chart of KL per latent dimension (nats); active units (Var_x(mu_j) >
    threshold) in colour, inactive in grey. ``flows``: the model's IAF steps,
    named in the title (the bars are then the Gaussian's before them). ``kl``
    and ``variances``: finite ``(L,)``; ConfigError otherwise, and for a
    threshold that is not a finite number >= 0 or ``flows`` not a count >= 0."""
    from matplotlib.ticker import MaxNLocator
    kl = as_numbers("kl", kl, 1)
    _finite_nonneg("threshold", threshold)
    flows = check_count("flows", flows, minimum=0)
    active = (np.ones(len(kl), bool) if variances is None
              else as_numbers("variances", variances, 1, (len(kl),)) > threshold)
    fig = _figure((max(4, 0.25 * len(kl) + 1), 3))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(kl)), kl, color=np.where(active, "tab:orange", "lightgray"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))           # dimensions 0, 1, ...
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats)")
    what = f"of the Gaussian before the {flows} IAF steps (they mix dimensions)" if flows else "per dimension"
    ax.set_title(f"KL {what}; {int(active.sum())} active units (Var(mu) > {threshold:g}) in colour", fontsize=8)
    return _save(fig, path)
