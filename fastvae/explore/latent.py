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

from fastvae.checks import _finite_nonneg, as_numbers, check_count
from fastvae.errors import ConfigError
from fastvae.training.memory import preflight
from fastvae.naming import option


def pca_plane(codes: np.ndarray):
    """``(mean (L,), axes (2, L), explained variance ratio (2,))`` of the first
    two principal components of ``codes`` (N, L), N >= 1 finite rows
    (ConfigError otherwise)."""
    codes = as_numbers("codes", codes, 2)
    if not len(codes):
        raise ConfigError("codes holds no rows; pass at least one code (N, L)")
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
    """``(steps, L)`` float64 codes from ``za`` to ``zb`` (finite ``(L,)``)
    inclusive, ``linear`` or ``spherical``; ConfigError for codes of other
    shapes, fewer than 2 steps, steps that would not fit in host memory, or
    another mode."""
    steps = check_count("steps", steps, minimum=2)
    f = {"linear": lerp, "spherical": slerp, "slerp": slerp}.get(mode) if isinstance(mode, str) else None
    if f is None:
        raise ConfigError(f"unknown interpolation {mode!r}; use linear or spherical")
    za = as_numbers("za", za, 1)
    zb = as_numbers("zb", zb, 1, (len(za),))
    preflight(8 * steps * len(za), None, f"{steps} interpolated codes", "use fewer steps")
    return np.stack([f(za, zb, t) for t in np.linspace(0, 1, steps)])


def grid_values(n: int, spacing: str = "quantile", span: float = 3.0) -> np.ndarray:
    """``(n,)`` float64 values along one latent axis: ``even`` in [-span, span], or ``quantile``:
    N(0, 1) quantiles at (i + 1/2)/n (Kingma & Welling 2014, Fig. 4). ConfigError for an ``n``
    that is not a count >= 1 or whose values would not fit in host memory, a ``span`` that is not
    a finite positive number, or another spacing."""
    n = check_count("n", n)
    _finite_nonneg("span", span, positive=True)
    preflight(40 * n, None, f"a grid of {n} values", "use a smaller n")     # quantiles: a Python float each, then 8 B
    spacing = spacing if isinstance(spacing, str) else repr(spacing)
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
                          f"(the model has latent_dim {L}); pick them from that range ({option('dims')})")
    return i, j


def latent_grid_codes(model, n: int = 15, dims=(0, 1), spacing="quantile", center=None, plane=None):
    """``(n*n, L)`` float64 codes on a grid over latent dims ``dims`` (or a PCA ``plane = (mean,
    axes)``), other coordinates at ``center`` (default 0). ConfigError for ``n`` < 1 or codes that
    would not fit in host memory, ``dims`` not two different dimensions in 0..L-1, a ``center``
    not a finite code of length L, or a ``plane`` not ``(mean (L,), axes (2, L))`` as
    :func:`pca_plane` gives."""
    L, n = model.config.latent_dim, check_count("n", n)
    preflight(8 * n * n * L, None, f"a {n} x {n} grid of codes", "use a smaller grid (n)")
    vals = grid_values(n, spacing)
    center = None if center is None else as_numbers("center", center, 1, (L,), want=f"one code of length {L}")
    if plane is None:
        dims = check_grid_dims(dims, L)
    if plane is not None:
        if not isinstance(plane, (tuple, list)) or len(plane) < 2:
            raise ConfigError(f"plane must be (mean (L,), axes (2, L)), as pca_plane returns, got {plane!r:.40}")
        mean = as_numbers("plane mean", plane[0], 1, (L,), want=f"one code of length {L}")
        axes = as_numbers("plane axes", plane[1], 2, (2, L))
        origin = mean if center is None else center
        u, v = axes[0], axes[1]
    else:
        origin = np.zeros(L) if center is None else center
        u, v = np.zeros(L), np.zeros(L)
        u[dims[0]] = 1.0
        if L > 1:
            v[dims[1]] = 1.0
    # rows from top (largest second coordinate) to bottom
    return np.array([origin + vx * u + vy * v for vy in vals[::-1] for vx in vals])


def traversal_codes(model, center, n_values=9, span=3.0, order=None):
    """``(len(order) * n_values, L)`` float64: for each latent dim in ``order``
    (default: all L in turn) the ``center`` code (finite, ``(L,)``) with that
    coordinate swept over [-span, span]. ConfigError for a center of another
    shape, dims outside 0..L-1, a span that is not finite and positive, or
    codes that would not fit in host memory."""
    L = model.config.latent_dim
    given = order
    try:
        order = list(range(L)) if order is None else [operator.index(j) for j in order]
    except TypeError:
        order = None
    if order is None or not all(0 <= j < L for j in order):
        raise ConfigError(f"order must list latent dimensions in 0..{L - 1}, e.g. [2, 0, 1], got {given!r:.40}")
    center = as_numbers("center", center, 1, (L,), want=f"one code of length {L}")
    _finite_nonneg("span", span, positive=True)
    n_values = check_count("n_values", n_values)
    preflight(8 * len(order) * n_values * L, None, f"{len(order)} x {n_values} traversal codes", "use fewer n_values")
    vals = np.linspace(-span, span, n_values)
    Z = np.repeat(center[None], len(order) * n_values, axis=0)
    for r, j in enumerate(order):
        Z[r * n_values:(r + 1) * n_values, j] = vals
    return Z
