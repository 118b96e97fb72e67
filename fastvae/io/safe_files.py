"""Reading files a user hands over (checkpoints, datasets) as untrusted input.

Three rules, shared by :mod:`fastvae.io.checkpoint` and the dataset loaders:

* only regular files are opened, and opening never blocks (a FIFO, a device
  or a folder gets a one-line error instead of a hang);
* HDF5 files are parsed only in a sandboxed child process, where nothing is
  read from outside the file's own bytes (:mod:`fastvae.io.untrusted_hdf5`);
* declared sizes are compared with the bytes present *before* anything is
  allocated, so a small file cannot announce gigabytes.
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import Optional

import numpy as np

from fastvae.errors import DataError

MAX_COMPRESSION = 256      # a real image file compresses far less; all-zero fillers compress ~1000x
MAX_JSON_DEPTH = 16


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, what: str, fix: str, error=OSError):
    """Open ``path`` for binary reading when it is a regular file.

    what: the file's role in messages ("checkpoint", "data file"); fix: the
    advice appended to every message. Opens with ``O_NONBLOCK`` and checks
    the opened descriptor (no race between the check and the open), so a
    FIFO or device never blocks. Returns a binary file object; raises
    ``error`` (a fastvae error class) for a missing, special or unreadable file.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; {fix}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a file; {fix}") from None
    except OSError as exc:
        raise error(f"cannot open {what} {path}: {exc.strerror}; {fix}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what} {path} is {_kind(mode)}, not a regular file; {fix}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def require_regular(path, what: str, fix: str, error=OSError) -> int:
    """The size in bytes of regular file ``path`` (see :func:`open_regular`)."""
    with open_regular(path, what, fix, error) as fh:
        return os.fstat(fh.fileno()).st_size


# ------------------------------------------------------------------ JSON
def _depth(obj, limit: int, level: int = 0) -> int:
    if level > limit:
        return level
    if isinstance(obj, dict):
        return max([_depth(v, limit, level + 1) for v in obj.values()] + [level + 1])
    if isinstance(obj, list):
        return max([_depth(v, limit, level + 1) for v in obj] + [level + 1])
    return level


def dump_json(obj) -> str:
    """``json.dumps`` of what :func:`parse_json` reads back: a non-finite float
    (an epoch's NaN metric) is written as null, never as the non-standard
    ``NaN`` that the reader refuses (a checkpoint that held one could not be
    loaded, resumed or evaluated)."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        return [clean(v) for v in o] if isinstance(o, (list, tuple)) else o
    return json.dumps(clean(obj), allow_nan=False)


def parse_json(text: str, where: str, error, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` that refuses non-standard numbers (NaN, Infinity), nesting
    deeper than ``max_depth`` and anything that is not JSON, raising ``error``."""
    def bad_constant(c):
        raise ValueError(f"non-standard JSON constant {c}")
    try:
        obj = json.loads(text, parse_constant=bad_constant)
    except (ValueError, RecursionError) as exc:
        raise error(f"{where} is not valid JSON ({str(exc)[:80]})") from None
    if _depth(obj, max_depth) > max_depth:
        raise error(f"{where} nests deeper than {max_depth} levels")
    return obj


def check_type(value, types, where: str, error, minimum: Optional[float] = None):
    """Raise ``error`` unless ``value`` is one of ``types`` (bool is never an
    int) and at least ``minimum``; returns ``value``."""
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
    if ok and minimum is not None and isinstance(value, (int, float)) and not value >= minimum:
        ok = False
    if not ok:
        names = "/".join(t.__name__ for t in _as_tuple(types))
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        rng = f" >= {minimum}" if minimum is not None else ""
        raise error(f"{where} must be {names}{rng}, got {shown}")
    return value


def _as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _deep_to_8bit(a: np.ndarray, path, fix: str, error) -> np.ndarray:
    """A 16- or 32-bit integer image (values 0..65535) or a float one (0..1,
    or 0..255) as uint8 0..255, scaled. Pillow's own conversion clips
    instead: a 16-bit PNG ramp came out 99.6% white, a float TIFF in [0, 1] black."""
    floating = a.dtype.kind == "f"
    a = a.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    top = (1.0 if hi <= 1.0 else 255.0) if floating else 65535.0
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > top:
        raise error(f"image {path} holds values in [{lo:g}, {hi:g}], outside 0..{top:g} for its pixel type; {fix}")
    return np.round(a * (255.0 / top)).astype(np.uint8)


#: decoded bytes any image file may declare; beyond it, at most MAX_COMPRESSION times the file's size
IMAGE_FLOOR_BYTES = 64 * 2 ** 20


def _upright(im):
    """``im`` turned as its EXIF orientation tag says a viewer shows it (a
    phone's portrait JPEG is stored sideways: it was read sideways); as it
    is when it has no tag, or one Pillow cannot apply."""
    from PIL import ImageOps
    try:
        return ImageOps.exif_transpose(im)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):     # a damaged EXIF block: pixels as stored
        return im


def on_white(im):
    """``im`` with any transparency (an alpha band, a palette's or a colour
    key's ``transparency``) composited onto white, as a viewer shows it.
    Dropping the alpha band kept whatever colour the file stores under
    transparent pixels: a black icon on a transparent background was read as
    an all-black image."""
    from PIL import Image
    if "A" not in im.getbands() and "a" not in im.getbands() and "transparency" not in im.info:
        return im
    im = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)


def read_image(path, mode: str, size=None, fix: str = "remove or replace it", error=DataError) -> np.ndarray:
    """An image file (PNG, JPEG, ... through Pillow) as a ``uint8`` array
    ``(H, W)`` for ``mode="L"``, ``(H, W, 3)`` for ``"RGB"`` (transparent pixels on white:
    :func:`on_white`), ``(H, W, 4)`` for ``"RGBA"``, upright as its EXIF orientation says,
    centre-cropped to the aspect ratio of ``size = (H, W)`` and resized to it
    when given.

    Read as untrusted input: a regular file only (:func:`open_regular`), and
    the pixel count its header declares is checked before decoding: more
    than ``IMAGE_FLOOR_BYTES`` (64 MiB) of decoded pixels and more than
    ``MAX_COMPRESSION`` times the file's size is refused as a decompression
    bomb (a 140 KB PNG can declare 12,000 x 12,000 pixels). Raises ``error``
    naming the file and ``fix`` for every failure."""
    import warnings
    from PIL import Image, ImageOps
    path = os.fspath(path)
    with open_regular(path, "image", fix, error) as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")     # Pillow's notes on damaged metadata: pixels are read or refused here
        stored = os.fstat(fh.fileno()).st_size
        try:
            with Image.open(fh) as im:
                declared = im.width * im.height * max(len(im.getbands()), len(mode))     # "L", "RGB", "RGBA"
                if declared > max(IMAGE_FLOOR_BYTES, MAX_COMPRESSION * stored):
                    raise error(f"image {path} declares {im.width} x {im.height} pixels ({declared / 2 ** 20:.0f} MiB "
                                f"decoded) in a {stored:,}-byte file: refused as a decompression bomb; {fix}")
                im = _upright(im)
                if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                    im = Image.fromarray(_deep_to_8bit(np.asarray(im), path, fix, error))
                im = (im if mode == "RGBA" else on_white(im)).convert(mode)
                if size is not None:
                    im = ImageOps.fit(im, (int(size[1]), int(size[0])), method=Image.Resampling.BILINEAR)
                return np.asarray(im, dtype=np.uint8)
        except error:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:   # SyntaxError: a broken PNG
            raise error(f"cannot read image {path} ({type(exc).__name__}: {exc}); {fix}") from None
