"""Pictures of a run: reconstructions, prior samples, loss curves.

Each function returns a matplotlib ``Figure`` (object-oriented API, no global
pyplot state, Agg canvas) and writes a PNG when ``path`` is given.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Optional, Sequence

import numpy as np

from fastvae.checks import as_numbers, check_count, check_images
from fastvae.errors import ConfigError
from fastvae.training.memory import preflight
from fastvae.explore.evaluation import train_loss_name


#: pixels a figure may render to (4 bytes each in Agg's buffer), and Agg's limit per side
MAX_FIGURE_PIXELS, MAX_FIGURE_SIDE = 40_000_000, 60_000


def _figure(figsize):
    """A figure of ``figsize`` inches at 100 dpi, or at the dpi that keeps it
    within MAX_FIGURE_PIXELS and MAX_FIGURE_SIDE (a --grid 400 latent grid
    asked Agg for 24,000 x 24,000 pixels and was killed for memory)."""
    from matplotlib.figure import Figure
    w, h = figsize
    dpi = min(100.0, math.sqrt(MAX_FIGURE_PIXELS / (w * h)), MAX_FIGURE_SIDE / max(w, h))
    return Figure(figsize=figsize, dpi=dpi)


def _save(fig, path):
    """``fig`` written to ``path`` (atomically) in the format its extension
    names; ConfigError for a format matplotlib cannot write."""
    if path is not None:
        from fastvae.training.runfolder import atomic_write
        fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
        if fmt not in fig.canvas.get_supported_filetypes():
            raise ConfigError(f"cannot write a picture as .{fmt} ({path}); use one of "
                              f"{', '.join(sorted(fig.canvas.get_supported_filetypes()))}")
        atomic_write(path, lambda tmp: fig.savefig(tmp, bbox_inches="tight", format=fmt))
    return fig


def tile(images, image_shape: Sequence[int], ncol: int, pad: int = 1) -> np.ndarray:
    """Tile ``images (N, D)`` into one ``(rows*(H+pad), ncol*(W+pad)[, C])``
    array in [0, 1]; ``image_shape`` is ``(H, W)`` or ``(H, W, C)`` with
    ``H W C = D`` (ConfigError otherwise, and for ``ncol`` < 1 or ``pad`` < 0).
    Channels other than 1 (gray), 3 (RGB) or 4 (RGBA) are drawn side by side
    in gray, ``(H, C W)`` per image."""
    ncol, pad = check_count("ncol", ncol), check_count("pad", pad, minimum=0)
    images = np.clip(as_numbers("images", images, np.ndim(images), finite=False), 0, 1)
    given = image_shape
    try:
        image_shape = tuple(operator.index(s) for s in image_shape)
    except TypeError:
        image_shape = ()
    shape_ok = len(image_shape) in (2, 3) and all(s > 0 for s in image_shape)
    if not shape_ok or (images.ndim == 2 and int(np.prod(image_shape)) != images.shape[1]):
        raise ConfigError(f"image_shape {given!r:.40} does not fit images of {images.shape[-1]} values; "
                          "pass (H, W) or (H, W, C) with H W C equal to it (the dataset's image_shape)")
    if len(image_shape) == 3 and image_shape[2] not in (1, 3, 4):
        H, W, C = image_shape
        images = images.reshape(-1, H, W, C).transpose(0, 1, 3, 2).reshape(len(images), -1)
        image_shape = (H, C * W)
    H, W = image_shape[:2]
    C = image_shape[2] if len(image_shape) == 3 else None
    n = images.shape[0]
    rows = max(1, math.ceil(n / ncol))
    shape = (rows * (H + pad) - pad, ncol * (W + pad) - pad) + ((C,) if C else ())
    preflight(8 * math.prod(shape), None, f"a tiled picture of {shape[0]} x {shape[1]} pixels", "use a smaller pad "
              "or fewer images")
    grid = np.ones(shape)
    for i in range(n):
        r, c = divmod(i, ncol)
        img = images[i].reshape(image_shape)
        grid[r * (H + pad):r * (H + pad) + H, c * (W + pad):c * (W + pad) + W] = img
    return grid


def _show(ax, grid):
    ax.imshow(grid, cmap=None if grid.ndim == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()


def plot_reconstructions(model, X, image_shape, n: int = 16, path: Optional[str] = None):
    """First ``n`` images of ``X (N, D)`` (top row of each pair) above their
    reconstructions decoded from ``mu`` (bottom row)."""
    n = check_count("n", n)
    X = check_images(np.asarray(X[:n]), model.config, min_rows=1)
    R = model.reconstruct(X)
    ncol = min(n, 8)
    pairs = []
    for s in range(0, len(X), ncol):
        pairs += [X[s:s + ncol], R[s:s + ncol]]
    rows = np.concatenate([np.pad(p, ((0, ncol - len(p)), (0, 0)), constant_values=1) for p in pairs])
    fig = _figure((ncol * 0.9, len(pairs) * 0.9 + 0.4))
    ax = fig.add_subplot(1, 1, 1)
    _show(ax, tile(rows, image_shape, ncol))
    ax.set_title("inputs (odd rows) and reconstructions from mu (even rows)", fontsize=8)
    return _save(fig, path)


def plot_samples(model, image_shape, n: int = 64, seed: int = 0, path: Optional[str] = None):
    """``n`` images decoded from z ~ N(0, I) (pixel means)."""
    S = model.sample(check_count("n", n), seed)
    ncol = int(math.ceil(math.sqrt(n)))
    fig = _figure((ncol * 0.8, math.ceil(n / ncol) * 0.8 + 0.4))
    ax = fig.add_subplot(1, 1, 1)
    _show(ax, tile(S, image_shape, ncol))
    ax.set_title("samples from the prior", fontsize=8)
    return _save(fig, path)


def plot_loss(history, path: Optional[str] = None, units: str = "nats per image"):
    """-ELBO (train and test), reconstruction and KL per image (``units``, see
    :func:`fastvae.explore.evaluation.units`), and beta, against epochs; a log y-axis for
    the losses, symmetric-log (linear within 1 of 0) when one is 0 or negative
    (a Gaussian likelihood's -ELBO is a density's: it can be; on a log axis
    those curves vanished)."""
    from matplotlib.ticker import MaxNLocator
    if not isinstance(history, (list, tuple)) or not all(isinstance(h, dict) and "epoch" in h for h in history):
        raise ConfigError(f"history must be the per-epoch rows (dicts with an 'epoch') of Trainer.history or a "
                          f"checkpoint's, got {history!r:.40}")
    fig = _figure((7, 4))
    ax = fig.add_subplot(1, 1, 1)
    ep = [h["epoch"] for h in history]
    low = np.inf
    elbo = any(train_loss_name(h) == "-ELBO" for h in history)        # else the IWAE bound -L_K
    for key, label in (("train_neg_elbo", "train -ELBO" if elbo else "train loss (-L_K)"),
                       ("test_neg_elbo", "test -ELBO"),
                       ("train_recon", "train recon"), ("train_kl", "train KL")):
        ys = np.array([np.nan if h.get(key) is None else h[key] for h in history], float)
        if not np.isnan(ys).all():
            ax.plot(ep, ys, marker="o", ms=3, label=label)
            low = min(low, np.nanmin(ys))
    if low > 0:
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(units)
    ax2 = ax.twinx()
    ax2.plot(ep, [h.get("beta", np.nan) for h in history], color="gray", ls="--", label="beta")
    ax2.set_ylabel("beta (KL weight)")
    lines = ax.get_legend_handles_labels()
    l2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + l2[0], lines[1] + l2[1], fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)
