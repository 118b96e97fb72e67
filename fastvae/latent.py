"""Latent arithmetic: codes to decode, no pictures. Interpolation (linear,
and spherical after Shoemake 1985 / White 2016), the grid over two latent
dimensions or a PCA plane (Kingma & Welling 2014, Fig. 4), and traversals
(one coordinate swept at a time). Codes are float64 ``(N, L)`` host arrays;
every function checks its arguments and the memory its result takes, raising
ConfigError naming the argument. :mod:`fastvae.explore` draws them and
re-exports these names."""

from __future__ import annotations

import math
import operator
import statistics

import numpy as np

from .checks import _finite_nonneg, check_count
from .errors import ConfigError
from .memory import preflight


def pca_plane(codes: np.ndarray):
    """``(mean (L,), axes (2, L), explained variance ratio (2,))`` of the first
    two principal components of ``codes``."""
    codes = np.asarray(codes, dtype=np.float64)
    mean = codes.mean(0)
    _, s, vt = np.linalg.svd(codes - mean, full_matrices=False)
    var = s ** 2
    axes = vt[:2] if vt.shape[0] >= 2 else np.vstack([vt, np.zeros_like(vt)])
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    return mean, axes, np.pad(ratio, (0, 2 - len(ratio)))


def lerp(a, b, t):
    return (1 - t) * a + t * b


def slerp(a, b, t):
    """Spherical interpolation (Shoemake 1985; White 2016 for VAE latents);
    falls back to lerp when a and b are (anti)parallel."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return lerp(a, b, t)
    cos = np.clip(np.dot(a / na, b / nb), -1.0, 1.0)
    om = math.acos(cos)
    if abs(math.sin(om)) < 1e-8:
        return lerp(a, b, t)
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


def interpolate_codes(za, zb, steps: int, mode: str = "linear") -> np.ndarray:
    """``(steps, L)`` codes from za to zb inclusive, ``linear`` or ``spherical``;
    ConfigError for fewer than 2 steps or another mode."""
    steps = check_count("steps", steps, minimum=2)
    f = {"linear": lerp, "spherical": slerp, "slerp": slerp}.get(mode)
    if f is None:
        raise ConfigError(f"unknown interpolation {mode!r}; use linear or spherical")
    return np.stack([f(np.asarray(za, float), np.asarray(zb, float), t) for t in np.linspace(0, 1, steps)])


def grid_values(n: int, spacing: str = "quantile", span: float = 3.0) -> np.ndarray:
    """``(n,)`` float64 values along one latent axis: ``even`` in [-span, span], or ``quantile``:
    N(0, 1) quantiles at (i + 1/2)/n (Kingma & Welling 2014, Fig. 4). ConfigError for an ``n``
    that is not a count >= 1 or whose values would not fit in host memory."""
    n = check_count("n", n)
    preflight(40 * n, None, f"a grid of {n} values", "use a smaller n")     # quantiles: a Python float each, then 8 B
    if spacing == "even":
        return np.linspace(-span, span, n)
    if spacing == "quantile":
        nd = statistics.NormalDist()
        return np.array([nd.inv_cdf((i + 0.5) / n) for i in range(n)])
    raise ConfigError(f"unknown grid spacing {spacing!r}; use even or quantile")


def check_grid_dims(dims, L):
    """``dims`` as two different latent dimensions in 0..L-1 (the second one unused when L = 1);
    ConfigError naming the range otherwise."""
    try:
        i, j = (operator.index(d) for d in dims)
    except (TypeError, ValueError):
        raise ConfigError(f"dims must be two latent dimensions (I, J), got {dims!r}") from None
    if not 0 <= i < L or (L > 1 and (not 0 <= j < L or i == j)):
        raise ConfigError(f"dims ({i}, {j}) must be two different latent dimensions in 0..{L - 1} "
                          f"(the model has latent_dim {L}); pick them from that range (--dims I J)")
    return i, j


def latent_grid_codes(model, n: int = 15, dims=(0, 1), spacing="quantile", center=None, plane=None):
    """``(n*n, L)`` float64 codes on a grid over latent dims ``dims`` (or a PCA ``plane = (mean,
    axes)``), other coordinates at ``center`` (default 0). ConfigError for ``n`` < 1 or codes that
    would not fit in host memory, ``dims`` not two different dimensions in 0..L-1, or a ``center``
    not of length L."""
    L, n = model.config.latent_dim, check_count("n", n)
    preflight(8 * n * n * L, None, f"a {n} x {n} grid of codes", "use a smaller grid (n)")
    vals = grid_values(n, spacing)
    if center is not None and np.shape(center) != (L,):
        raise ConfigError(f"center must be one code of length {L}, got shape {np.shape(center)}")
    if plane is None:
        dims = check_grid_dims(dims, L)
    if plane is not None:
        mean, axes = plane
        origin = mean if center is None else np.asarray(center, dtype=np.float64)
        u, v = axes[0], axes[1]
    else:
        origin = np.zeros(L) if center is None else np.asarray(center, dtype=np.float64)
        u, v = np.zeros(L), np.zeros(L)
        u[dims[0]] = 1.0
        if L > 1:
            v[dims[1]] = 1.0
    # rows from top (largest second coordinate) to bottom
    return np.array([origin + vx * u + vy * v for vy in vals[::-1] for vx in vals])


def traversal_codes(model, center, n_values=9, span=3.0, order=None):
    """``(L * n_values, L)``: for each latent dim (in ``order``) the center code
    with that coordinate swept over [-span, span]."""
    L = model.config.latent_dim
    order = list(range(L)) if order is None else list(order)
    _finite_nonneg("span", span, positive=True)
    vals = np.linspace(-span, span, check_count("n_values", n_values))
    Z = np.repeat(np.asarray(center, float)[None], len(order) * n_values, axis=0)
    for r, j in enumerate(order):
        Z[r * n_values:(r + 1) * n_values, j] = vals
    return Z
