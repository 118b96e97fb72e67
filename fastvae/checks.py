"""Small value checks shared by the configs, the layer specs and the entry
points that take images or codes; each raises :class:`fastvae.errors.ConfigError`
(a setting) or :class:`fastvae.errors.DataError` (an array) naming the problem
and what is accepted."""

from __future__ import annotations

import math
import operator

import numpy as np

from fastvae.errors import ConfigError, DataError
from fastvae.naming import option


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _seed(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")


def check_count(name, value, minimum: int = 1) -> int:
    """``value`` as a Python int of at least ``minimum`` (any integer type,
    NumPy's included); raises ConfigError otherwise."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if n < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {n}")
    return n


def _shown(value) -> str:
    """A short description of a bad argument: its array shape and dtype, or its repr."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def as_numbers(name, value, ndim: int, shape=(), finite: bool = True, want: str = "") -> np.ndarray:
    """``value`` as a float64 array of ``ndim`` dimensions whose leading sizes
    are ``shape`` (None: any), of real numbers (and finite unless ``finite``
    is False). The check of the library's array arguments (codes, losses, KL
    values): ConfigError naming ``name``, what it must be (``want``, else
    its shape) and what it got."""
    if not want:
        dims = ["N" if s is None else str(s) for s in shape] + ["..."] * (ndim > len(shape))
        want = (f"a {'vector' if ndim == 1 else f'{ndim}-d array'} of real numbers"
                + (f" of shape ({', '.join(dims)}{',' * (len(dims) == 1)})" if shape else ""))
    try:
        a = np.asarray(value)
    except (TypeError, ValueError):
        a = None
    if (a is None or a.dtype.kind not in "fiub" or a.ndim != ndim
            or any(s is not None and s != n for s, n in zip(shape, a.shape))):
        raise ConfigError(f"{name} must be {want}, got {_shown(value)}")
    a = a.astype(np.float64)
    if finite and not np.isfinite(a).all():
        raise ConfigError(f"{name} holds NaN or infinite values; pass finite ones")
    return a


def check_model(model, what: str) -> None:
    """ConfigError naming the fix when ``model`` is not a trained model (a
    :class:`fastvae.VAE`): a checkpoint's path or run folder, None, or
    another library's model, which ``what`` (the function) cannot use."""
    if not all(hasattr(model, name) for name in ("config", "backend", "forward", "workspace")):
        kind = "None" if model is None else f"a {type(model).__name__}"
        hint = ("load the checkpoint (or run folder) with fastvae.load(path) and pass the model"
                if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") else
                "pass a fastvae.VAE (fastvae.load(path) loads one from a checkpoint; Trainer.model is one)")
        raise ConfigError(f"{what} takes a fastvae.VAE as its model, not {kind}; {hint}")


def _finite_nonneg(name, value, positive=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        kind = "positive" if positive else "non-negative"
        raise ConfigError(f"{name} must be a finite {kind} number, got {value!r}")


def _sigma(value, dtype, input_dim: int = 1):
    """The Gaussian likelihood's sigma (pixel units): finite, positive, and
    such that ``1 / sigma^2``, its gradient's factor, is a finite nonzero
    number in ``dtype`` (1e-200 in float64 was a ZeroDivisionError traceback,
    1e-30 in float32 an infinite gradient called a divergence), and that the
    nll of an image whose ``input_dim`` pixels are each one unit off,
    ``input_dim / (2 sigma^2)``, is finite (1e-19 in float32 at 784 pixels
    overflowed at the first step)."""
    _finite_nonneg("sigma", value, positive=True)
    fi = np.finfo(dtype)
    lo = math.sqrt(max(1.0, input_dim / 2) / float(fi.max))
    hi = 1 / math.sqrt(float(fi.tiny))
    if not lo <= float(value) <= hi:
        raise ConfigError(f"sigma {value!r} is outside what {dtype} arithmetic can use ({lo:.2g} to {hi:.2g}: "
                          f"1/sigma^2 must be a finite nonzero number, and so must an image's nll over its "
                          f"{input_dim} pixels); sigma is in pixel units (default 0.1)")


def _choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def unit_pixels(raw) -> np.ndarray:
    """Image values as float32: uint8 pixels (0..255) divided by 255, exactly
    rounded (as torchvision's ``ToTensor``), other numbers converted as they
    are (``raw`` itself when it is float32). The one rule of the loaders,
    streamed reads and the model's calls."""
    return raw / np.float32(255.0) if raw.dtype == np.uint8 else np.asarray(raw, np.float32)


def check_images(X, cfg, what: str = "images", min_rows: int = 0):
    """``X`` as images for a model of config ``cfg``: a host array ``(N, D)``
    with ``D = cfg.input_dim`` (or ``(N, *cfg.image_shape)``, with or without
    a trailing channel of 1, returned as ``(N, D)`` without a copy); uint8
    pixels (0..255) are returned divided by 255 (a float32 copy, as the
    loaders and ``fastvae.train(X)`` take them); else real numbers, finite, and in [0, 1] for the
    bernoulli likelihood (whose recon term, Kingma & Welling 2014 App. C.1,
    is defined only there). Array-likes (lists, CPU tensors; a CuPy array
    is copied to the host) are converted and checked; a streamed
    dataset (``fastvae.datasets.streaming.StreamedImages``, checked row by row as it
    is read) is checked for its shape only and returned as is. ``what``
    names them in messages ("training images"); fewer than ``min_rows``
    images are refused (a picture of none). Cost: two
    passes (min, max) over the data, no copy of a NumPy array.
    Raises DataError naming the problem and the fix."""
    streamed = hasattr(X, "rows") and hasattr(X, "chunk_rows")   # a StreamedImages (not imported: a cycle)
    if not isinstance(X, np.ndarray) and not streamed:  # lists, tensors: checked as arrays (a torch tensor
        if hasattr(X, "__cuda_array_interface__") and hasattr(X, "get"):      # of NaN passed unchecked)
            X = X.get()                                     # a CuPy array: checked on the host
        try:
            X = np.asarray(X)
        except (TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"{what} cannot be read as an array ({e}); pass an (N, D) array of numbers") from None
    shape = tuple(getattr(cfg, "image_shape", None) or ())
    if X.ndim > 2 and isinstance(X, np.ndarray) and shape and tuple(X.shape[1:]) in (shape, shape + (1,)):
        X = X.reshape(len(X), -1)             # (N, *image_shape[, 1]): the model's own images, one row each
    one = {(cfg.input_dim,)} | ({shape, shape + (1,)} if shape else set())     # a single image's shapes
    if tuple(X.shape) in one and not (X.ndim == 2 and X.shape[1] == cfg.input_dim):
        raise DataError(f"{what} must be a batch, one image per row; shape {tuple(X.shape)} is one image: pass "
                        "a batch of one (x[None])")
    if X.ndim != 2:
        own = f", or (N, {', '.join(map(str, shape))})" if shape else ""
        raise DataError(f"{what} must be an (N, D) array, one flattened image per row{own}, got shape "
                        f"{tuple(X.shape)}; flatten each image to one row (x.reshape(len(x), -1))")
    if X.shape[1] != cfg.input_dim:
        raise DataError(f"{what} have {X.shape[1]} features but the model expects {cfg.input_dim}; "
                        "use data of the size the model was built for")
    if X.shape[0] < min_rows:
        raise DataError(f"{what}: {X.shape[0]} given, at least {min_rows} needed; pass more images")
    if not isinstance(X, np.ndarray):
        return X
    if X.dtype.kind not in "fiub":
        raise DataError(f"{what} must be real numbers, got dtype {X.dtype}; convert them (x.astype(np.float32))")
    if X.dtype == np.uint8:                   # 8-bit pixels, as the loaders and fastvae.train(X) take them
        return unit_pixels(X)
    if X.size == 0:
        return X
    lo, hi = X.min(), X.max()                 # NaN propagates through both; an infinity shows in one
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"{what} contain NaN or infinite values; clean the data first")
    if cfg.likelihood == "bernoulli" and (lo < 0 or hi > 1):
        raise DataError(f"{what} have values in [{lo:g}, {hi:g}] but the bernoulli likelihood needs [0, 1]; "
                        f"rescale the data (8-bit pixels: x / 255) or use {option('likelihood', 'gaussian')}")
    return X


def check_codes(Z, latent_dim: int):
    """``Z`` as latent codes: a finite host array ``(N, latent_dim)`` of real
    numbers. Raises DataError naming the problem and the fix."""
    try:
        Z = np.asarray(Z)
    except (TypeError, ValueError) as e:
        raise DataError(f"codes cannot be read as an array ({e}); pass an (N, {latent_dim}) array") from None
    if Z.ndim != 2 or Z.shape[1] != latent_dim:
        raise DataError(f"expected codes of shape (N, {latent_dim}), got {Z.shape}; "
                        "one row per code (z.reshape(-1, latent_dim))")
    if Z.dtype.kind not in "fiub":
        raise DataError(f"codes must be real numbers, got dtype {Z.dtype}; convert them (z.astype(np.float32))")
    if Z.size and not np.all(np.isfinite(Z)):
        raise DataError("codes contain NaN or infinite values; pass finite codes")
    return Z
