import gzip
import hashlib
import os
import re

import h5py
import numpy as np
import pytest
from PIL import Image

import fastvae
from fastvae import DataConfig, DataError, datasets
from fastvae.datasets import load_idx, write_idx

from conftest import MNIST_DIR, OLIVETTI_DIR, needs_mnist, needs_olivetti, write_mnist_like


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_and_counts_from_header(tmp_path, gz):
    arrays = write_mnist_like(tmp_path, n_train=37, n_test=13, gz=gz)
    ds = datasets.load_mnist_family("mnist", tmp_path, download=False)
    assert ds.x_train.shape == (37, 784) and ds.x_test.shape == (13, 784)
    assert ds.x_train.dtype == np.float32
    np.testing.assert_array_equal(ds.x_train, arrays["train-images-idx3-ubyte"].reshape(37, -1) / np.float32(255))
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.image_shape == (28, 28)


def test_idx_wrong_magic_and_truncation(tmp_path):
    p = tmp_path / "bad-idx3-ubyte"
    p.write_bytes(b"\x12\x34\x08\x03" + b"\0" * 20)
    with pytest.raises(DataError, match="wrong idx magic"):
        load_idx(p)
    good = tmp_path / "good-idx3-ubyte"
    write_idx(good, np.zeros((4, 3, 3), np.uint8))
    raw = good.read_bytes()
    cut = tmp_path / "cut-idx3-ubyte"
    cut.write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_idx(cut)
    gzp = tmp_path / "x-idx3-ubyte.gz"
    gzp.write_bytes(gzip.compress(raw)[:-30])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_idx(gzp)


def test_image_and_label_counts_must_agree(tmp_path):
    write_mnist_like(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(49, np.uint8))
    with pytest.raises(DataError, match="50 images .* but 49 labels"):
        datasets.load_mnist_family("mnist", tmp_path, download=False)


def test_download_verifies_md5_and_reports_offline(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    arrays = write_mnist_like(src)
    md5s = [hashlib.md5((src / (k + ".gz")).read_bytes()).hexdigest() for k in arrays]
    monkeypatch.setitem(datasets.BUILTIN, "mnist", dict(datasets.BUILTIN["mnist"], md5=md5s))
    dest = tmp_path / "dest"
    ds = datasets.load_mnist_family("mnist", dest, download=True, mirrors=[src.as_uri() + "/"])
    assert ds.x_train.shape == (50, 784)
    assert sorted(os.listdir(dest)) == sorted(k + ".gz" for k in arrays)
    bad = md5s.copy()
    bad[0] = "0" * 32
    monkeypatch.setitem(datasets.BUILTIN, "mnist", dict(datasets.BUILTIN["mnist"], md5=bad))
    with pytest.raises(DataError, match="md5"):
        datasets.load_mnist_family("mnist", tmp_path / "dest2", mirrors=[src.as_uri() + "/"])
    assert not (tmp_path / "dest2" / "train-images-idx3-ubyte.gz").exists()
    with pytest.raises(DataError, match=r"when offline, copy the four idx files.*into"):
        datasets.load_mnist_family("mnist", tmp_path / "dest3", mirrors=["http://127.0.0.1:9/"])
    with pytest.raises(DataError, match="not found in"):
        datasets.load_mnist_family("mnist", tmp_path / "dest4", download=False)


def _save_png(path, arr, mode="L"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


def test_image_folder_labels_resize_rgb(tmp_path):
    r = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        for i in range(5):
            _save_png(str(tmp_path / cls / f"{i}.png"), r.integers(0, 256, (12, 10), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_text("hidden files are always skipped")
    with pytest.raises(DataError, match=r"not images \(notes.txt\); remove them or set skip_other_files=True"):
        datasets.load_image_folder(tmp_path)
    ds = datasets.load_image_folder(tmp_path, test_fraction=0.2, skip_other_files=True)
    assert ds.image_shape == (12, 10) and ds.x_train.shape == (8, 120) and ds.x_test.shape == (2, 120)
    assert ds.label_names == ["cats", "dogs"]
    assert sorted(np.concatenate([ds.y_train, ds.y_test]).tolist()) == [0] * 5 + [1] * 5
    ds = datasets.load_image_folder(tmp_path, image_size=(8, 8), color="rgb", test_fraction=0, skip_other_files=True)
    assert ds.x_train.shape == (10, 8 * 8 * 3) and ds.image_shape == (8, 8, 3) and ds.x_test is None
    _save_png(str(tmp_path / "stray.png"), r.integers(0, 256, (12, 10), dtype=np.uint8))   # beside the classes
    ds = datasets.load_image_folder(tmp_path, test_fraction=0, skip_other_files=True)
    assert ds.label_names == ["(top level)", "cats", "dogs"]       # its class was named "." on the latent map
    assert sorted(ds.y_train.tolist()) == [0] + [1] * 5 + [2] * 5


def test_image_folder_follows_linked_class_folders_once(tmp_path):
    """A class folder that is a symbolic link (data kept elsewhere) was
    skipped without a word: half the images and one class of two. Links are
    followed now; a link back up the tree is walked once, not forever."""
    r = np.random.default_rng(1)
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere" / "dogs"
    for folder in (root / "cats", elsewhere):
        for i in range(5):
            _save_png(str(folder / f"{i}.png"), r.integers(0, 256, (6, 6), dtype=np.uint8))
    os.symlink(elsewhere, root / "dogs")
    os.symlink(root, root / "cats" / "up")           # a loop
    os.symlink(elsewhere, root / "cats" / "again")   # the dogs a second time
    ds = datasets.load_image_folder(root, test_fraction=0)
    assert ds.x_train.shape == (10, 36) and ds.label_names == ["cats", "dogs"], (ds.x_train.shape, ds.label_names)
    assert sorted(ds.y_train.tolist()) == [0] * 5 + [1] * 5


def test_an_image_folder_too_large_for_memory_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """Without --image-size the first image gives the size of all: 5 bytes a
    pixel (uint8 and float32) are checked against free memory before the
    rest are read (only --image-size runs were checked; a folder too large
    was read until memory ran out)."""
    from fastvae import ConfigError
    from fastvae.training import memory
    r = np.random.default_rng(2)
    for i in range(20):
        _save_png(str(tmp_path / f"{i}.png"), r.integers(0, 256, (100, 100), dtype=np.uint8))
    monkeypatch.setattr(memory, "host_available", lambda: 2 ** 20)       # pretend 1 MiB free: 20 x 50 kB needed
    read = []
    real = datasets.read_image
    monkeypatch.setattr(datasets, "read_image", lambda *a, **k: read.append(1) or real(*a, **k))
    with pytest.raises(ConfigError, match=r"20 images of \(100, 100\) needs about .* set image_size to shrink them"):
        datasets.load_image_folder(tmp_path)
    assert len(read) == 1
    monkeypatch.setattr(memory, "host_available", lambda: 2 ** 30)
    assert datasets.load_image_folder(tmp_path, test_fraction=0).x_train.shape == (20, 10_000)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        datasets.load_image_folder(tmp_path)
    _save_png(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    _save_png(str(tmp_path / "b.png"), np.zeros((9, 8), np.uint8))
    with pytest.raises(DataError, match="different sizes.*; set image_size to resize them"):
        datasets.load_image_folder(tmp_path)
    assert datasets.load_image_folder(tmp_path, image_size=(8, 8), test_fraction=0).x_train.shape == (2, 64)
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        datasets.load_image_folder(tmp_path, image_size=(8, 8))


def test_array_files(tmp_path):
    r = np.random.default_rng(1)
    x = r.integers(0, 256, (20, 6, 6), dtype=np.uint8)
    y = np.arange(20) % 3
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "a.npz", images=x, labels=y)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["x"] = x.astype(np.float32) / 255
        f["y"] = y
    for name in ("a.npy", "a.npz", "a.h5"):
        ds = datasets.load(DataConfig(dataset=str(tmp_path / name), test_fraction=0.25))
        assert ds.x_train.shape == (15, 36) and ds.x_test.shape == (5, 36) and ds.image_shape == (6, 6)
        allx = np.concatenate([ds.x_train, ds.x_test])
        np.testing.assert_allclose(np.sort(allx.sum(1)), np.sort(x.reshape(20, -1).sum(1) / 255), rtol=1e-5)
        if name != "a.npy":
            assert ds.y_train is not None
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="holds object values; images must be numbers"):
        datasets.load(str(tmp_path / "obj.npy"))
    np.save(tmp_path / "big.npy", np.full((4, 4), 2.0))       # fine for a gaussian model
    assert datasets.load(str(tmp_path / "big.npy")).x_train.max() == 2.0
    np.save(tmp_path / "nan.npy", np.full((4, 4), np.nan))
    with pytest.raises(DataError, match="NaN"):
        datasets.load(str(tmp_path / "nan.npy"))


@pytest.mark.parametrize("streamed", [False, True])
def test_array_layouts_are_channels_last_and_the_rest_refused_before_training(tmp_path, streamed):
    """(N, H, W, C) with 1, 3 or 4 channels keeps its image shape; a
    channels-first (N, C, H, W) array (PyTorch's layout) is refused naming
    the transpose, 2 channels and 5-D arrays naming the layouts read, whether
    the file is loaded or streamed (--memory-budget 0). They used to train and
    then fail drawing the pictures (a traceback after the whole run)."""
    r = np.random.default_rng(2)
    budget = 0 if streamed else None
    for shape, image_shape in [((12, 5, 6, 1), (5, 6, 1)), ((12, 5, 6, 3), (5, 6, 3)), ((12, 5, 6, 4), (5, 6, 4)),
                               ((12, 5, 6), (5, 6)), ((12, 49), (7, 7)), ((12, 10), (1, 10))]:
        np.save(tmp_path / "ok.npy", r.integers(0, 256, shape, dtype=np.uint8))
        ds = datasets.load_array_file(tmp_path / "ok.npy", budget_mb=budget)
        assert ds.image_shape == image_shape and ds.x_train.shape[1] == int(np.prod(shape[1:]))
    for shape, needle in [((12, 3, 5, 6), "look channels-first (N, C, H, W); fastvae reads channels last: "
                                          "save x.transpose(0, 2, 3, 1)"),
                          ((12, 5, 6, 2), "with 1, 3 or 4 channels"), ((12, 2, 5, 6, 3), "with 1, 3 or 4 channels")]:
        np.save(tmp_path / "bad.npy", r.integers(0, 256, shape, dtype=np.uint8))
        with pytest.raises(DataError, match=re.escape(needle)):
            datasets.load_array_file(tmp_path / "bad.npy", budget_mb=budget)


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'mnits'"):
        datasets.load("mnits")


def test_sprites_reproducible_with_factors():
    a = datasets.make_sprites(300, seed=5)
    b = datasets.make_sprites(300, seed=5)
    c = datasets.make_sprites(300, seed=6)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == (270, 4096) and a.x_test.shape == (30, 4096)
    assert set(np.unique(a.x_train)) == {0.0, 1.0}
    assert a.factors_train.shape == (270, 5) and a.factor_names[0] == "shape"
    np.testing.assert_array_equal(a.y_train, a.factors_train[:, 0])
    # bigger scale -> more lit pixels, for each shape
    area = a.x_train.sum(1)
    for s in range(3):
        sel = a.y_train == s
        small = area[sel & (a.factors_train[:, 1] == 0.5)]
        large = area[sel & (a.factors_train[:, 1] == 1.0)]
        assert small.size and large.size and small.mean() < large.mean()
        assert small.min() > 0


@needs_mnist
def test_real_mnist_files():
    ds = datasets.load(DataConfig(dataset="mnist", data_dir=MNIST_DIR, download=False))
    assert ds.x_train.shape == (24000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1
    assert set(np.unique(ds.y_test)) == set(range(10))


@needs_olivetti
def test_real_olivetti_file():
    ds = datasets.load(DataConfig(dataset="olivetti", data_dir=OLIVETTI_DIR))
    assert ds.x_train.shape == (360, 4096) and ds.x_test.shape == (40, 4096)
    assert ds.image_shape == (64, 64)
    assert set(np.unique(np.concatenate([ds.y_train, ds.y_test]))) == set(range(40))


def test_a_resize_that_cannot_fit_is_refused_before_reading(tmp_path):
    """--image-size 100000 100000 on a folder resized every image to 10^10
    pixels (out of memory); the total is checked against free memory first."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(fastvae.ConfigError, match="3 images resized to 100000 x 100000 needs about"):
        datasets.load_image_folder(folder, image_size=(100000, 100000))
    assert datasets.load_image_folder(folder, image_size=(4, 4)).x_train.shape[1] == 16


def test_image_size_and_color_are_for_image_folders(tmp_path, monkeypatch):
    """--image-size and --color were silently ignored for array files and the
    built-in datasets (a 32x32 .npy stayed 32x32); now refused naming the
    fix. A run trained on a resized folder is still evaluated and plotted on
    another dataset (its resize setting does not follow there)."""
    np.save(tmp_path / "a.npy", np.zeros((40, 32, 32), np.uint8))
    for name, kw in [(str(tmp_path / "a.npy"), {"image_size": (28, 28)}), (str(tmp_path / "a.npy"), {"color": "rgb"}),
                     ("sprites", {"image_size": (32, 32)})]:
        with pytest.raises(DataError, match="image_size and color apply to folders of images"):
            datasets.load(DataConfig(dataset=name, n_sprites=50, **kw))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(np.full((40, 40), 6 * i, np.uint8)).save(folder / f"{i}.png")
    write_mnist_like(tmp_path / "mnist", n_train=60, n_test=20)
    from fastvae.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dataset", str(folder), "--image-size", "28", "28", "--hidden", "8", "--latent", "2",
                 "--epochs", "1", "--batch-size", "10", "--no-progress", "--out", "run"]) == 0
    assert main(["eval", "run", "--dataset", "mnist", "--data-dir", str(tmp_path / "mnist")]) == 0
    assert main(["plot", "run", "--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"), "--out", "f"]) == 0


def test_a_dataset_built_by_hand_is_checked_when_built():
    """fastvae.datasets.Dataset from a user's own arrays: lists become arrays,
    and labels or factors of another length than their images are refused
    (they were accepted, and the latent map's colours then misread them)."""
    x = np.random.default_rng(0).random((10, 4)).astype(np.float32)
    ds = datasets.Dataset("d", x.tolist(), list(range(10)), None, None, [2, 2])
    assert isinstance(ds.x_train, np.ndarray) and ds.x_train.shape == (10, 4) and ds.y_train.shape == (10,)
    assert ds.image_shape == (2, 2)
    with pytest.raises(DataError, match="10 train images but 3 train labels"):
        datasets.Dataset("d", x, np.arange(3), None, None, (2, 2))
    with pytest.raises(DataError, match="4 test images but 5 test factor rows"):
        datasets.Dataset("d", x, None, x[:4], None, (2, 2), factors_test=np.zeros((5, 2)))


# ----------------------------------------------------- labels of array files
def _load(path):
    return datasets.load(DataConfig(dataset=str(path)))


def test_text_labels_are_numbered_by_their_sorted_names(tmp_path):
    """Class names as text (npz, fixed and variable-length HDF5 strings) were
    refused as "images must be numbers"; they are numbered by their sorted
    set, the names kept for the latent map's colour bar."""
    x = np.random.default_rng(0).random((20, 8, 8)).astype(np.float32)
    names = np.array(["dog", "cat", "emu", "cat"] * 5)
    np.savez(tmp_path / "t.npz", x=x, y=names)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["images"], f["labels"] = x, names.astype("S")
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["images"] = x
        f.create_dataset("labels", data=names.tolist(), dtype=h5py.string_dtype())
    for p in ("t.npz", "s.h5", "v.h5"):
        ds = _load(tmp_path / p)
        assert ds.label_names == ["cat", "dog", "emu"], p
        got = np.concatenate([ds.y_train, ds.y_test])
        rows = np.concatenate([ds.x_train, ds.x_test])
        want = {tuple(r): ["cat", "dog", "emu"].index(n) for r, n in zip(x.reshape(20, -1), names)}
        assert [want[tuple(r)] for r in rows] == got.tolist(), p


def test_text_labels_of_a_keras_split_share_one_numbering(tmp_path):
    """y_train holds a and b, y_test b and c: c is class 2 in both splits."""
    x = np.random.default_rng(1).random((6, 4, 4))
    np.savez(tmp_path / "k.npz", x_train=x, y_train=np.array(list("ababab")), x_test=x[:3],
             y_test=np.array(list("bcb")))
    ds = _load(tmp_path / "k.npz")
    assert ds.label_names == ["a", "b", "c"]
    assert ds.y_train.tolist() == [0, 1, 0, 1, 0, 1] and ds.y_test.tolist() == [1, 2, 1]


@pytest.mark.parametrize("y,want", [
    (np.eye(4)[[0, 3, 1, 2, 3, 0, 1, 2, 2, 0]], [0, 3, 1, 2, 3, 0, 1, 2, 2, 0]),     # one-hot (was "100 labels")
    (np.array([2.0, 1, 0, 2, 1, 0, 2, 1, 0, 0]), [2, 1, 0, 2, 1, 0, 2, 1, 0, 0]),     # whole floats (were dropped)
    (np.arange(10)[:, None] % 3, [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]),                     # (N, 1)
    (np.arange(10, dtype=np.uint8), list(range(10))),
])
def test_one_class_per_image_in_any_common_layout_is_kept(tmp_path, y, want):
    x = np.random.default_rng(2).random((10, 4, 4))
    ds = datasets.from_arrays(x, y, test_fraction=0.0)
    assert ds.y_train.dtype == np.int64 and ds.y_train.tolist() == want


@pytest.mark.parametrize("y,why", [
    (np.random.default_rng(3).integers(0, 2, (10, 40)), "40 values per image"),     # attributes (was refused)
    (np.linspace(0, 1, 10), "not class numbers"),
    (np.array([np.nan] + [1.0] * 9), "not class numbers"),
    (np.array([1e300] + [1.0] * 9), "not class numbers"),                           # was cast to -2^63, warning
    (np.array([2 ** 63 + 5] + [1] * 9, dtype=np.uint64), "not class numbers"),       # was cast to a negative class
])
def test_labels_that_are_not_classes_leave_the_images_unlabelled_with_a_note(tmp_path, capsys, y, why):
    x = np.random.default_rng(4).random((10, 4, 4))
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = _load(tmp_path / "a.npz")
    assert ds.y_train is None and ds.y_test is None and ds.x_train.shape[0] + ds.x_test.shape[0] == 10
    err = capsys.readouterr().err
    assert "fastvae: note:" in err and why in err and "without labels" in err


def test_labels_whose_count_differs_or_that_are_objects_are_refused(tmp_path):
    x = np.random.default_rng(5).random((10, 4, 4))
    np.savez(tmp_path / "n.npz", x=x, y=np.arange(7))
    with pytest.raises(DataError, match="10 images but 7 labels"):
        _load(tmp_path / "n.npz")
    np.savez(tmp_path / "o.npz", x=x, y=np.array([{"a": 1}] * 10, dtype=object))
    with pytest.raises(DataError, match=r"o.npz\[y\] holds object values; labels must be numbers or text"):
        _load(tmp_path / "o.npz")
    np.savez(tmp_path / "i.npz", x=np.array(["a"] * 10), y=np.arange(10))
    with pytest.raises(DataError, match="images must be numbers"):
        _load(tmp_path / "i.npz")


def test_transparent_pixels_are_read_on_white_as_a_viewer_shows_them(tmp_path):
    """A black icon whose shape is its alpha band was read as an all-black
    image (Pillow's convert drops alpha, keeping the colour stored under
    transparent pixels); now composited onto white: grey = 255 - alpha, to
    Pillow's integer rounding (one 8-bit step)."""
    from fastvae.io.safe_files import read_image
    rng = np.random.default_rng(7)
    alpha = (rng.random((6, 12, 12)) * 255).astype(np.uint8)
    (tmp_path / "icons").mkdir()
    for i, a in enumerate(alpha):
        Image.fromarray(np.dstack([np.zeros((12, 12, 3), np.uint8), a])).save(tmp_path / "icons" / f"{i}.png")
    ds = datasets.load_image_folder(tmp_path / "icons", test_fraction=0.0)
    np.testing.assert_allclose(ds.x_train.reshape(6, 12, 12), (255.0 - alpha) / 255, atol=1.01 / 255)
    rgb = datasets.load_image_folder(tmp_path / "icons", color="rgb", test_fraction=0.0)
    np.testing.assert_allclose(rgb.x_train.reshape(6, 12, 12, 3), np.repeat((255.0 - alpha)[..., None], 3, -1) / 255,
                               atol=1.01 / 255)
    # a palette image whose transparent index is black: white where it is transparent
    p = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    p.putpalette([0, 0, 0, 40, 40, 40])
    p.save(tmp_path / "p.png", transparency=0)
    assert read_image(tmp_path / "p.png", "L").tolist() == [[255, 40], [40, 255]]
    # opaque pixels keep their value; a 4-channel model's input keeps its alpha band
    opaque = np.dstack([np.full((2, 2, 3), 100, np.uint8), np.full((2, 2), 255, np.uint8)])
    Image.fromarray(opaque).save(tmp_path / "o.png")
    assert read_image(tmp_path / "o.png", "L").tolist() == [[100, 100], [100, 100]]
    assert read_image(tmp_path / "icons" / "0.png", "RGBA")[..., 3].tolist() == alpha[0].tolist()
