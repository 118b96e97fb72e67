"""Datasets: idx files (MNIST family), Olivetti faces, image folders, arrays,
and the built-in procedural ``sprites``.

Every loader returns a :class:`Dataset` of host arrays: images flattened to
``(N, D)`` float32 in [0, 1] (uint8 sources divided by 255), integer labels
``(N,)`` where known, and the image shape for pictures. Errors a user can
cause raise :class:`fastvae.errors.DataError` with the fix in the message.

Package: this module is the public ``fastvae.datasets`` API (the loaders
and ``load``); ``dataset`` (the Dataset class), ``idx``, ``sprites``,
``arrayfiles`` (.npy/.npz/.h5) and ``streaming`` (data larger than memory)
live beside it. May import: fastvae.io.safe_files and
fastvae.io.untrusted_hdf5 (files are untrusted input), fastvae.config,
fastvae.errors/naming/checks, fastvae.training.parts and
fastvae.training.distributed (the streamed batch source); never fastvae.cli.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Tuple

import numpy as np

from fastvae.config import BUILTIN_DATASETS, IN_MEMORY, DataConfig
from fastvae.datasets.dataset import Dataset
from fastvae.errors import DataError
from fastvae.naming import option
from fastvae.datasets.arrayfiles import class_labels, image_shape_of, read_arrays, same_image_shape, unit_split
from fastvae.training.runfolder import holds_run
from fastvae.io.safe_files import read_image
from fastvae.datasets.idx import load_idx, read_idx_header, write_idx  # noqa: F401  (re-exported)
from fastvae.datasets.sprites import SPRITE_FACTORS, SPRITE_SHAPES, make_sprites, render_sprites  # noqa: F401  (re-exported)

__all__ = ["Dataset", "load", "load_idx", "make_sprites", "load_image_folder",
           "load_array_file", "load_olivetti", "load_mnist_family", "BUILTIN",
           "default_data_dir"]


# ------------------------------------------------------------- MNIST family
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

BUILTIN: Dict[str, dict] = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/"],
        "md5": ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
        "labels": [str(i) for i in range(10)],
    },
    "fashion-mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"],
        "labels": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                   "Shirt", "Sneaker", "Bag", "Ankle boot"],
    },
    "kmnist": {
        "mirrors": ["http://codh.rois.ac.jp/kmnist/dataset/kmnist/"],
        "md5": ["bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
                "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"],
        "labels": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
    },
}


def default_data_dir(name: str) -> str:
    """``$FASTVAE_DATA/<name>`` or ``~/.cache/fastvae/<name>``."""
    root = os.environ.get("FASTVAE_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "fastvae")
    return os.path.join(root, name)


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(fname: str, md5: str, mirrors: List[str], folder: str, timeout: float = 30.0) -> str:
    """Fetch ``fname`` from the first mirror that serves it with the right md5: written to a new
    temporary file (no planted link is followed) and renamed once verified. Raises DataError
    listing what each mirror answered when none succeeds."""
    dest, errors = os.path.join(folder, fname), []
    for base in mirrors:
        url, tmp = base + fname, None
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                os.makedirs(folder, exist_ok=True)       # only once a mirror answers: no empty folders
                fd, tmp = tempfile.mkstemp(prefix=fname + ".", suffix=".part", dir=folder)
                with os.fdopen(fd, "wb") as out:
                    for chunk in iter(lambda: r.read(1 << 20), b""):
                        out.write(chunk)
            got = _md5(tmp)
            if got == md5:
                os.replace(tmp, dest)
                return dest
            errors.append(f"{url}: md5 {got} != expected {md5}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
        finally:
            if tmp is not None and os.path.lexists(tmp):
                os.unlink(tmp)
    raise DataError(f"could not download {fname} ({'; '.join(errors)})")


def _find_idx(folder: str, stem: str) -> Optional[str]:
    for cand in (stem + ".gz", stem):
        p = os.path.join(folder, cand)
        if os.path.exists(p):
            return p
    return None


def load_mnist_family(name: str, data_dir: Optional[str] = None, download: bool = True,
                      mirrors: Optional[List[str]] = None, splits=("train", "test")) -> Dataset:
    """MNIST, Fashion-MNIST or KMNIST from idx files in ``data_dir``.

    Files: ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
    ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``; only the
    files of ``splits`` are needed (a split not asked for is returned empty,
    so ``eval --split test`` needs no training files). Missing ones are
    downloaded (md5-verified) when ``download`` is True. Counts come from the
    headers, compared between images and labels before anything is
    decompressed. Raises DataError when files are missing and cannot be
    fetched (the message says where to put them) or disagree.
    """
    spec = BUILTIN[name]
    folder = os.fspath(data_dir) if data_dir else default_data_dir(name)
    paths = {}
    for i, (stem, md5) in enumerate(zip(_IDX_FILES, spec["md5"])):
        if ("train", "test")[i // 2] not in splits:
            continue
        p = _find_idx(folder, stem)
        if p is None:
            if not download:
                raise DataError(f"{stem}[.gz] not found in {folder}; put the {name} idx files "
                                "there or allow downloading")
            try:
                p = download_file(stem + ".gz", md5, mirrors or spec["mirrors"], folder)
            except DataError as exc:
                raise DataError(f"{name} file {stem}.gz is not in {folder} and {exc}; "
                                f"when offline, copy the four idx files ({', '.join(_IDX_FILES)}, "
                                f"plain or .gz) into {folder} or set {option('data_dir')}") from None
        paths[i] = p
    for split, i in (("train", 0), ("test", 2)):
        if i not in paths:
            continue
        (_, dx), (_, dy) = read_idx_header(paths[i]), read_idx_header(paths[i + 1])
        if len(dx) != 3:
            raise DataError(f"{paths[i]} should hold images (3 dimensions), its header says {dx}")
        if len(dy) != 1:
            raise DataError(f"{paths[i + 1]} should hold labels (1 dimension), its header says {dy}")
        if dx[0] != dy[0]:
            raise DataError(f"{name} {split}: {dx[0]} images in {os.path.basename(paths[i])} but "
                            f"{dy[0]} labels in {os.path.basename(paths[i + 1])}; use matching files")
        if dx[0] == 0:
            raise DataError(f"{paths[i]} holds no images")
    arrays = {i: load_idx(p) for i, p in paths.items()}
    shape = tuple(arrays[0 if 0 in arrays else 2].shape[1:])
    empty = np.zeros((0, int(np.prod(shape))), np.float32), np.zeros(0, np.int64)
    unit = lambda i: unit_split(arrays[i], arrays[i + 1].astype(np.int64), 0.0, 0)[:2]   # all rows, float32
    xtr, ytr = unit(0) if 0 in arrays else empty
    xte, yte = unit(2) if 2 in arrays else (None, None)
    if 0 in arrays and 2 in arrays and arrays[0].shape[1:] != arrays[2].shape[1:]:
        raise DataError(f"{name}: train images are {arrays[0].shape[1:]} but test images "
                        f"{arrays[2].shape[1:]}; use matching files")
    return Dataset(name, xtr, ytr, xte, yte, shape, label_names=spec["labels"])


# ------------------------------------------------------------------ Olivetti
def load_olivetti(data_dir: Optional[str] = None, test_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Olivetti / ORL faces: ``olivetti_faces.npz`` with ``images`` (400, 64, 64)
    uint8 and ``subject`` (400,) in ``data_dir``; a seeded random test split."""
    folder = os.fspath(data_dir) if data_dir else default_data_dir("olivetti")
    path = folder if folder.endswith(".npz") else os.path.join(folder, "olivetti_faces.npz")
    if not os.path.exists(path):
        raise DataError(f"{path} not found; put olivetti_faces.npz (arrays 'images' (400, 64, 64) "
                        f"and 'subject') there or set {option('data_dir')}")
    ds = load_array_file(path, test_fraction=test_fraction, seed=seed)
    ds.name = "olivetti"
    return ds


# -------------------------------------------------------------------- arrays


def load_array_file(path, test_fraction: float = 0.1, seed: int = 0, budget_mb: Optional[float] = None) -> Dataset:
    """Images from ``.npy``, ``.npz`` or ``.h5``/``.hdf5``.

    Arrays: ``(N, H, W)``, ``(N, H, W, C)`` (C = 1, 3 or 4) or ``(N, D)``; uint8 (0..255) or
    float in [0, 1]. In ``.npz``/``.h5`` the images are under one of
    ``images, x, X, data, x_train`` and optional labels under ``labels, y,
    subject, targets, y_train``; ``x_test`` (and ``y_test``) beside
    ``x_train`` is the test split (``test_fraction`` then does not apply;
    it was ignored, and 10% of x_train held out). Read as untrusted input (:mod:`fastvae.datasets.arrayfiles`:
    declared sizes checked before allocating). Never unpickles. An ``.npy`` or
    HDF5 file whose loading (the stored array and its float32 copy) would take
    more than ``budget_mb`` MiB (default: half the free memory) is streamed
    (:mod:`fastvae.datasets.streaming`: ``x_train`` is then a
    :class:`~fastvae.datasets.streaming.StreamedImages`, labels are not loaded); an
    ``.npz`` over a given budget is refused (it cannot stream).
    Raises DataError.
    """
    path = os.fspath(path)
    if budget_mb is not None or os.path.splitext(path)[1].lower() in (".npy", ".h5", ".hdf5"):
        from fastvae.datasets.streaming import open_streamed
        streamed = open_streamed(path, None if budget_mb is None else int(budget_mb * 2 ** 20), test_fraction, seed)
        if streamed is not None:
            xtr, xte = streamed
            return Dataset(os.path.splitext(os.path.basename(path))[0], xtr, None, xte, None, xtr.image_shape)
    x, y, xt, yt = read_arrays(path)
    need = sum(a.size * (a.itemsize + 4) for a in (x, xt) if a is not None)
    if budget_mb is not None and need > budget_mb * 2 ** 20:     # not .npy/.h5: it cannot be streamed
        over = option("memory_budget_mb", budget_mb)
        raise DataError(f"{path}: loading it takes {need / 2 ** 20:.0f} MB, over {over} MB, and only .npy and HDF5 "
                        f"files stream; save the images with numpy.save as .npy, or raise {option('memory_budget_mb')}")
    from fastvae.training.memory import preflight                                 # the float32 copy still to come
    preflight(sum(a.size * 4 for a in (x, xt) if a is not None), None, f"the float32 images of {path}",
              "save them with numpy.save as .npy to stream them from disk")
    name = os.path.splitext(os.path.basename(path))[0]
    if xt is None:
        return from_arrays(x, y, name, test_fraction, seed, where=path)
    texts = [np.asarray(v) for v in (y, yt) if v is not None and np.asarray(v).dtype.kind in "OSU"]
    names = np.unique(np.concatenate([v.reshape(-1).astype(str) for v in texts])) if texts else None  # both splits
    train, test = (from_arrays(a, b, name, 0.0, where=f"{path}[{k}]", label_names=names)
                   for a, b, k in ((x, y, "x_train"), (xt, yt, "x_test")))
    same_image_shape(path, train.image_shape, test.image_shape)
    return Dataset(name, train.x_train, train.y_train, test.x_train, test.y_train, train.image_shape,
                   label_names=train.label_names or test.label_names)


def from_arrays(x, y=None, name: str = "arrays", test_fraction: float = 0.1, seed: int = 0,
                where: Optional[str] = None, label_names=None) -> Dataset:
    """A :class:`Dataset` of in-memory images ``x``: ``(N, H, W)``, ``(N, H, W, C)``
    (C = 1, 3 or 4, channels last) or ``(N, D)``, uint8 (0..255, divided by
    255) or float (kept: in [0, 1] for the bernoulli likelihood); labels
    ``y`` optional, one class per image (integers, text numbered by
    ``label_names`` or their sorted set, one-hot rows; others are dropped with a
    note: :func:`fastvae.datasets.arrayfiles.class_labels`). A seeded random
    ``test_fraction`` of the rows is the test split (none when it rounds to 0
    images). ``x`` may be the pair ``(images, labels)``. The rules of array
    files; raises DataError naming the problem."""
    where = where or f"array {name!r}"
    if y is None and isinstance(x, tuple) and len(x) == 2 and np.ndim(x[0]) >= 2 and np.ndim(x[1]) == 1:
        x, y = x                                    # (images, labels): Keras's fit(x, y), TensorDataset(x, y)
    try:
        x = np.asarray(x)
    except (TypeError, ValueError) as exc:           # ragged lists, objects that are not numbers
        raise DataError(f"{where} cannot be read as an array of images ({str(exc)[:80]}); pass an (N, D) or "
                        "(N, H, W[, C]) array") from None
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"{where}: expected images of shape (N, H, W[, C]) or (N, D), got {x.shape}")
    y, names = (None, None) if y is None else class_labels(y, len(x), where, label_names)
    shape = image_shape_of(x.shape, where)
    xtr, ytr, xte, yte = unit_split(x, y, test_fraction, seed)   # floats kept: the bernoulli likelihood checks [0, 1]
    return Dataset(name, xtr, ytr, xte, yte, shape, label_names=names)


# ------------------------------------------------------------- image folders
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


TOP_LEVEL = "(top level)"    # the class of images beside class sub-folders, not in one


def load_image_folder(path, image_size: Optional[Tuple[int, int]] = None, color: str = "grayscale",
                      test_fraction: float = 0.1, seed: int = 0, skip_other_files: bool = False) -> Dataset:
    """Every image under ``path`` (PNG, JPEG, ... via Pillow), sorted by path.

    Sub-folders become integer labels (sorted names; images at the top beside
    them are the class ``"(top level)"``); linked ones are
    followed, each real folder walked once; fastvae run folders (``--out``
    inside the data) are not data and are skipped. ``image_size=(H, W)``
    resizes after a centre crop to that aspect ratio; without it every image
    must have the same size. ``color``: ``grayscale`` (D = H*W) or ``rgb``
    (D = H*W*3). Raises DataError for an empty folder, files that are not
    images (unless ``skip_other_files``; hidden files are always skipped),
    unreadable images, or mixed sizes without ``image_size``.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DataError(f"{path} is not a folder; pass a folder of images")
    files, others, seen = [], [], {os.path.realpath(path)}
    for root, dirs, names in os.walk(path, followlinks=True):     # linked class folders count, as in torchvision
        dirs[:] = [d for d in sorted(dirs) if not d.startswith(".") and _first_visit(os.path.join(root, d), seen)
                   and not holds_run(os.path.join(root, d))]    # a run kept beside its data: its pictures are not data
        for n in sorted(names):
            if n.startswith("."):
                continue                      # .DS_Store and other hidden files
            (files if n.lower().endswith(IMAGE_EXTS) else others).append(os.path.join(root, n))
    if others and not skip_other_files:
        raise DataError(f"{path} holds files that are not images ({', '.join(os.path.relpath(o, path) for o in others[:3])}"
                        f"{' ...' if len(others) > 3 else ''}); remove them or set {option('skip_other_files', True)}")
    if not files:
        raise DataError(f"{path} holds no images ({', '.join(IMAGE_EXTS)}); add images or fix the path")
    if image_size is not None:          # uint8 images, then float32: 5 bytes a value
        from fastvae.training.memory import preflight
        nbytes = 5 * len(files) * image_size[0] * image_size[1] * (3 if color == "rgb" else 1)
        preflight(nbytes, None, f"{len(files):,} images resized to {image_size[0]} x {image_size[1]}",
                  f"use a smaller {option('image_size')}")
    folder_of = lambda f: os.path.relpath(os.path.dirname(f), path)   # "." for images at the top
    classes = sorted({folder_of(f) for f in files})
    use_labels = classes != ["."]
    mode = "L" if color == "grayscale" else "RGB"
    x, labels = None, []
    for i, f in enumerate(files):
        arr = read_image(f, mode, image_size, "remove or replace it", DataError)
        if x is None:                        # filled in place (a list of images, then np.stack, held both)
            if image_size is None:           # the first image tells the size of all: uint8 + float32
                from fastvae.training.memory import preflight
                preflight(5 * len(files) * arr.size, None, f"{len(files):,} images of {arr.shape}",
                          f"set {option('image_size')} to shrink them, or train on a subset")
            x = np.empty((len(files),) + arr.shape, arr.dtype)
        elif arr.shape != x.shape[1:]:
            raise DataError(f"images in {path} have different sizes ({x.shape[1:]} and {arr.shape} in "
                            f"{os.path.relpath(f, path)}); set {option('image_size')} to resize them")
        x[i] = arr
        labels.append(classes.index(folder_of(f)))
    y = np.asarray(labels, dtype=np.int64) if use_labels else None
    xtr, ytr, xte, yte = unit_split(x, y, test_fraction, seed)
    return Dataset(os.path.basename(os.path.normpath(path)), xtr, ytr, xte, yte, tuple(x.shape[1:]),
                   label_names=[TOP_LEVEL if c == "." else c for c in classes] if use_labels else None)


def _first_visit(folder: str, seen: set) -> bool:
    """Whether ``folder`` (after its links) was not walked yet: a link back up
    the tree, or two links to one folder, are walked once."""
    real = os.path.realpath(folder)
    if real in seen:
        return False
    seen.add(real)
    return True


# -------------------------------------------------------------------- entry
def in_memory(name: str) -> str:
    """The DataConfig name recorded for a dataset given in memory."""
    return name if name.startswith(IN_MEMORY) else IN_MEMORY + name


def given(dataset, cfg: Optional[DataConfig]):
    """``(dataset, cfg)`` for a Trainer: a name or path becomes ``cfg``'s
    dataset, to be loaded (None returned for it; ``cfg``'s image size and
    colour mode kept only for a folder of images; a path passed as the data of
    ``Trainer.from_checkpoint`` was taken for a Dataset: AttributeError),
    images as arrays or lists a Dataset (:func:`from_arrays`, ``cfg``'s
    test_fraction and data_seed); a Dataset or None is returned as it is."""
    if isinstance(dataset, (str, os.PathLike)):      # the run's --image-size/--color follow only to a folder
        keep = {} if is_image_folder(os.fspath(dataset)) else {"image_size": None, "color": "grayscale"}
        return None, (cfg or DataConfig()).replace(dataset=os.fspath(dataset), **keep)
    if dataset is not None and not isinstance(dataset, Dataset):
        base = cfg or DataConfig()
        dataset = from_arrays(dataset, test_fraction=base.test_fraction, seed=base.data_seed)
    return dataset, cfg


def is_image_folder(name) -> bool:
    """Whether dataset ``name`` is a folder of image files (built-in names first)."""
    return name not in BUILTIN_DATASETS and os.path.isdir(os.path.expanduser(name))


def check_folder_options(dataset, image_size, color, error=DataError) -> None:
    """Raise ``error`` when ``image_size`` or ``color``, the options of folders of image files, are set
    for other data (a name, a path, images in memory)."""
    if isinstance(dataset, (str, os.PathLike)) and is_image_folder(os.fspath(dataset)):
        return
    if image_size is not None or color != "grayscale":
        what = os.fspath(dataset) if isinstance(dataset, (str, os.PathLike)) else "images given in memory"
        raise error(f"{option('image_size')} and {option('color')} apply to folders of images, not to {what} (it "
                    "would ignore them); resize or convert the images first, or train on a folder of image files")


def load(cfg, splits=("train", "test")) -> Dataset:
    """Load the dataset a :class:`DataConfig` (or a name/path string) describes.

    splits: the splits needed; datasets stored as separate files (the MNIST
    family) read only those, the others are always read whole."""
    if isinstance(cfg, str):
        cfg = DataConfig(dataset=cfg)
    name = cfg.dataset
    path = os.path.expanduser(name)
    check_folder_options(name, cfg.image_size, cfg.color)
    if name.startswith(IN_MEMORY):
        raise DataError(f"this run was trained on data given in memory ({name[len(IN_MEMORY):]!r}), so there is "
                        f"nothing to load it from; name the data for eval and plot with {option('dataset')} (and "
                        f"{option('data_dir')}), and resume in Python with Trainer.from_checkpoint(..., dataset=)")
    if name == "sprites":
        return make_sprites(cfg.n_sprites, cfg.data_seed, test_fraction=cfg.test_fraction)
    if name in BUILTIN:
        return load_mnist_family(name, cfg.data_dir, cfg.download, splits=splits)
    if name == "olivetti":
        return load_olivetti(cfg.data_dir, cfg.test_fraction, cfg.data_seed)
    if is_image_folder(name):
        return load_image_folder(path, cfg.image_size, cfg.color, cfg.test_fraction, cfg.data_seed,
                                 cfg.skip_other_files)
    if os.path.splitext(path)[1].lower() in (".npy", ".npz", ".h5", ".hdf5"):
        return load_array_file(path, cfg.test_fraction, cfg.data_seed, cfg.memory_budget_mb)
    if not os.path.exists(path):
        raise DataError(f"unknown dataset {name!r}: not a built-in name ({', '.join(BUILTIN_DATASETS)}) and no "
                        "such file or folder")
    raise DataError(f"cannot load {name!r}: use a folder of images or an .npy/.npz/.h5 file")
