"""Data files are untrusted input (issue 12, part 2): declared sizes are
compared with the bytes present before anything is allocated, memory stays
within a small multiple of the real data, and every refusal is one line."""

import gzip
import os
import struct
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fastvae import DataError, datasets
from fastvae.datasets.idx import load_idx

from conftest import PEAK_RSS, PY, fv, write_mnist_like


def peak_rss_mb(code: str):
    """Run ``code`` in a fresh interpreter; (stdout, its peak RSS in MB)."""
    code += "\n" + PEAK_RSS
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    return out, float(out.split("RSS_MB")[1])


def _catching(call):
    return f"from fastvae import datasets, DataError\ntry:\n    {call}\nexcept DataError as e:\n    print('ERR', e)\n"


def test_gzip_idx_declaring_more_than_it_can_hold(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:           # 1e6 images announced, 10 present
        f.write(struct.pack(">HBBIII", 0, 8, 3, 1_000_000, 28, 28) + bytes(7840))
    out, rss = peak_rss_mb(_catching(f"datasets.load_idx({str(p)!r})"))
    assert "ERR" in out and "cannot hold that much" in out and rss < 300


def test_gzip_idx_is_decompressed_no_further_than_the_header_promises(tmp_path):
    p = tmp_path / "bomb.gz"               # header says 10 bytes, stream carries 200 MB of zeros
    with gzip.open(p, "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, 10) + bytes(200 * 2 ** 20))
    out, rss = peak_rss_mb(_catching(f"datasets.load_idx({str(p)!r})"))
    assert "ERR" in out and "more than" in out and rss < 300


def test_counts_are_compared_before_decompression(tmp_path, monkeypatch):
    write_mnist_like(tmp_path, n_train=30, n_test=10)
    from fastvae.datasets.idx import write_idx
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    calls = []
    monkeypatch.setattr(datasets, "load_idx", lambda p: calls.append(p))
    with pytest.raises(DataError, match="30 images .* but 29 labels"):
        datasets.load_mnist_family("mnist", tmp_path, download=False)
    assert calls == []


def test_idx_messages_stay_short(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(struct.pack(">HBB", 0, 8, 255) + b"\xff" * 1020)
    with pytest.raises(DataError) as e:
        load_idx(p)
    assert len(str(e.value)) < 300
    p.write_bytes(struct.pack(">HBBIIII", 0, 8, 4, *(2 ** 32 - 1,) * 4))
    with pytest.raises(DataError, match="file holds") as e:
        load_idx(p)
    assert len(str(e.value)) < 300


def test_sparse_hdf5_declaring_a_million_images(tmp_path):
    """A ~2 KB .h5 declaring 1e6 x 784 images (chunks never written) is refused
    without materialising them (it used to reach 7 GB and train on zeros)."""
    p = tmp_path / "sparse.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("images", shape=(1_000_000, 784), dtype="f4", chunks=(1000, 784), compression="gzip")
    assert os.path.getsize(p) < 10_000
    out, rss = peak_rss_mb(_catching(f"datasets.load({str(p)!r})"))
    assert "ERR" in out and "never written" in out and rss < 300


def test_hdf5_with_some_chunks_missing_or_extreme_compression(tmp_path):
    p = tmp_path / "half.h5"
    with h5py.File(p, "w") as f:
        d = f.create_dataset("images", shape=(100, 64), dtype="f4", chunks=(10, 64))
        d[:50] = 0.5
    with pytest.raises(DataError, match="never written"):
        datasets.load(str(p))
    p = tmp_path / "zeros.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("images", data=np.zeros((4000, 784), np.float32), chunks=(4000, 784), compression="gzip",
                         compression_opts=9)
    with pytest.raises(DataError, match="implausible compression"):
        datasets.load(str(p))


def test_hdf5_data_may_not_read_other_files(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(bytes(range(256)) * 4)
    p = tmp_path / "ext.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("images", shape=(4, 256), dtype="u1", external=[(str(secret), 0, 1024)])
    with pytest.raises(DataError, match="external file"):
        datasets.load(str(p))
    p = tmp_path / "link.h5"
    with h5py.File(tmp_path / "o.h5", "w") as f:
        f["x"] = np.zeros((4, 4))
    with h5py.File(p, "w") as f:
        f["images"] = h5py.ExternalLink(str(tmp_path / "o.h5"), "/x")
    with pytest.raises(DataError, match="is a link to another file"):
        datasets.load(str(p))


def test_npy_header_declaring_a_huge_array(tmp_path):
    p = tmp_path / "big.npy"
    header = {"descr": "<f4", "fortran_order": False, "shape": (10 ** 6, 784)}
    with open(p, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(4096))
    out, rss = peak_rss_mb(_catching(f"datasets.load({str(p)!r})"))
    assert "ERR" in out and "stores only" in out and rss < 300


def test_npy_header_that_numpys_parser_fails_on_with_a_tokenizer_error(tmp_path):
    """A header whose brackets do not match ('shape': B60, 8, 8) sends numpy
    from ast.literal_eval to its legacy tokenize retry, which raised
    tokenize.TokenError: a traceback from `fastvae train`, found by mutating
    bytes of real .npy files (6 of 600 loads). The .npz member path too."""
    import io
    import zipfile
    buf = io.BytesIO()
    np.save(buf, np.zeros((60, 8, 8), np.uint8))
    raw = buf.getvalue().replace(b"'shape': (60,", b"'shape': B60,")
    (tmp_path / "a.npy").write_bytes(raw)
    with zipfile.ZipFile(tmp_path / "a.npz", "w") as z:
        z.writestr("x.npy", raw)
    for name in ("a.npy", "a.npz"):
        for budget in (None, 0.001):                  # loaded, and opened to stream
            with pytest.raises(DataError, match=r"is not a valid .npy array"):
                datasets.load(datasets.DataConfig(dataset=str(tmp_path / name), memory_budget_mb=budget))
    r = fv("train", "--dataset", tmp_path / "a.npy", cwd=tmp_path, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "is not a valid .npy array" in r.stderr, r.stderr


def test_a_damaged_hdf5_file_streams_into_a_data_error(tmp_path, monkeypatch):
    """Mutated bytes of HDF5 files gave h5py's RuntimeError or KeyError when a
    file was opened to stream (9 + 3 of 150), and a damaged gzip chunk its
    OSError in the middle of training ("filter returned failure during
    read"), which `fastvae train` blamed on paths and disk space. Both are
    DataErrors naming the file now."""
    import h5py
    import fastvae
    x = (np.random.default_rng(0).random((400, 64)) * 255).astype(np.uint8)
    p = tmp_path / "d.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x_train", data=x, chunks=(20, 64), compression="gzip")
        f.create_dataset("x_test", data=x[:100], chunks=(20, 64), compression="gzip")
    with h5py.File(p, "r") as f:
        info = f["x_train"].id.get_chunk_info(7)              # rows 140..159, stored compressed
    raw = bytearray(p.read_bytes())
    raw[info.byte_offset + 2:info.byte_offset + info.size] = bytes(info.size - 2)
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"d.h5: rows .* cannot be read \(OSError: .*\); the file is damaged"):
        fastvae.train(str(p), hidden=[4], latent_dim=2, epochs=1, batch_size=20, memory_budget_mb=0.05)
    r = fv("train", "--dataset", p, "--memory-budget", "0.05", "--hidden", "4", "--latent", "2", "--epochs", "1",
           "--batch-size", "20", "--no-progress", "--out", tmp_path / "run", cwd=tmp_path, check=False)
    assert r.returncode == 2 and "the file is damaged" in r.stderr and "disk space" not in r.stderr, r.stderr

    raw[8:48] = bytes(40)                                    # the superblock after its signature: unopenable
    p.write_bytes(bytes(raw))
    for budget in (None, 0.05):
        with pytest.raises(DataError, match="d.h5 is not a readable HDF5 file"):
            datasets.load(datasets.DataConfig(dataset=str(p), memory_budget_mb=budget))


def test_damaged_image_files_print_no_pillow_warnings(tmp_path):
    """A TIFF with one damaged byte made Pillow print "UserWarning: Truncated
    File Read" lines (three, with source lines) into `fastvae train`'s
    output, while the image was read or refused as any other; fastvae's own
    checks (and its decompression-bomb limit) speak for such files now."""
    import io
    import warnings
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(buf, format="TIFF")
    raw = bytearray(buf.getvalue())
    raw[110] = 188                                     # found by mutating bytes: a strip length
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.tiff").write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as pillow:
        warnings.simplefilter("always")
        with Image.open(tmp_path / "imgs" / "a.tiff") as im:
            im.load()
    if not pillow:
        pytest.skip("this Pillow writes or reads the TIFF so that the damaged byte gives no warning")
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        try:
            datasets.load_image_folder(tmp_path / "imgs", color="rgb")
        except DataError:
            pass
    assert not ours, [str(w.message) for w in ours]


def test_npz_member_compressed_beyond_plausibility(tmp_path):
    p = tmp_path / "bomb.npz"
    np.savez_compressed(p, images=np.zeros((20000, 784), np.uint8))     # 15.7 MB of zeros -> ~15 KB
    assert os.path.getsize(p) * 256 < 20000 * 784
    with pytest.raises(DataError, match="stores only"):
        datasets.load(str(p))
    ok = tmp_path / "ok.npz"
    x = np.random.default_rng(0).integers(0, 256, (30, 8, 8), dtype=np.uint8)
    np.savez_compressed(ok, images=x, labels=np.arange(30))
    ds = datasets.load_array_file(ok, test_fraction=0)
    np.testing.assert_array_equal(ds.x_train, x.reshape(30, -1) / np.float32(255))
    f = tmp_path / "f.npy"
    np.save(f, np.asfortranarray(x.reshape(30, 64).astype(np.float32) / 255))
    np.testing.assert_array_equal(datasets.load_array_file(f, test_fraction=0).x_train, x.reshape(30, 64) / np.float32(255))


@pytest.mark.parametrize("kind", ["fifo", "dev", "dir"])
def test_special_files_as_data_never_block(tmp_path, kind):
    if kind == "fifo":
        p = tmp_path / "d.npy"
        os.mkfifo(p)
        os.mkfifo(tmp_path / "train-images-idx3-ubyte")
    elif kind == "dev":
        p = tmp_path / "d.npy"
        p.symlink_to("/dev/zero")
        (tmp_path / "train-images-idx3-ubyte").symlink_to("/dev/zero")
    else:
        p = tmp_path / "d.npy"
        p.mkdir()
    r = subprocess.run(PY + ["train", "--dataset", str(p), "--out", str(tmp_path / "r")], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    if kind != "dir":
        with pytest.raises(DataError, match="FIFO|device"):
            load_idx(tmp_path / "train-images-idx3-ubyte")


def test_eval_on_test_split_needs_no_training_files(tmp_path):
    write_mnist_like(tmp_path / "d", n_train=40, n_test=20)
    fv("train", "--dataset", "mnist", "--data-dir", tmp_path / "d", "--hidden", "8", "--latent", "2", "--epochs", "1",
       "--batch-size", "20", "--out", tmp_path / "run", "--no-progress", cwd=tmp_path)
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        os.unlink(tmp_path / "d" / f)
    r = fv("eval", tmp_path / "run" / "checkpoint.h5", "--split", "test", "--json", cwd=tmp_path)
    assert '"n": 20' in r.stdout


def test_failed_lookup_creates_no_folders(tmp_path, monkeypatch):
    missing = tmp_path / "a" / "b" / "mnist"
    monkeypatch.setenv("FASTVAE_DATA", str(tmp_path / "cache"))
    with pytest.raises(DataError):
        datasets.load_mnist_family("mnist", missing, download=True, mirrors=["http://127.0.0.1:9/"])
    with pytest.raises(DataError):
        datasets.load_mnist_family("mnist", None, download=True, mirrors=["http://127.0.0.1:9/"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "cache").exists()


def test_a_fifo_inside_an_image_folder_never_blocks(tmp_path):
    from PIL import Image
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    with pytest.raises(DataError, match="FIFO"):
        datasets.load_image_folder(tmp_path)


def _png(path, width, height):
    """A valid grayscale PNG of zeros: tiny on disk, ``width * height`` bytes decoded."""
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = zlib.compress(b"".join(b"\0" + bytes(width) for _ in range(height)), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_image_files_declaring_far_more_pixels_than_they_hold_are_refused_before_decoding(tmp_path, monkeypatch):
    """A 9000 x 9000 PNG of zeros is ~80 KB on disk and 77 MiB decoded: refused
    from its header (the image folder loader and `fastvae interpolate` share
    the reader), in a process that stays small. Pillow's own bomb error (a
    declared size past its pixel limit) is one line too, not a traceback."""
    from fastvae.io.safe_files import read_image
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "bomb.png", 9000, 9000)
    assert os.path.getsize(folder / "bomb.png") < 200_000
    out, rss = peak_rss_mb(_catching(f"datasets.load_image_folder({str(folder)!r}, image_size=(8, 8))"))
    assert "ERR" in out and "9000 x 9000 pixels" in out and "decompression bomb" in out and rss < 200
    _png(tmp_path / "ok.png", 300, 200)         # an honest small image of zeros is read (64 MiB floor)
    assert read_image(tmp_path / "ok.png", "L", (8, 12), error=DataError).shape == (8, 12)
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)      # past twice the limit Pillow raises its own error
    with pytest.raises(DataError, match="DecompressionBombError"):
        read_image(tmp_path / "ok.png", "L", error=DataError)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*junk.png.*remove or replace it"):
        read_image(tmp_path / "junk.png", "L", error=DataError)


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    """Pillow's own conversion to 8 bits clips: a 16-bit PNG ramp came out
    99.6% white and a float TIFF in [0, 1] all but black. They are scaled
    (0..65535 and 0..1 or 0..255 onto 0..255); values outside their pixel
    type's range are refused."""
    from PIL import Image
    from fastvae.io.safe_files import read_image
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png", "L"), np.round(ramp / 257.0).astype(np.uint8))
    assert read_image(tmp_path / "deep.png", "RGB").shape == (64, 64, 3)
    unit = np.linspace(0, 1, 64).reshape(8, 8).astype(np.float32)
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "unit.tif", "L"),
                                  np.round(unit.astype(np.float64) * 255).astype(np.uint8))
    Image.fromarray(unit * 200, mode="F").save(tmp_path / "byte.tif")          # 0..200: already 8-bit values
    assert read_image(tmp_path / "byte.tif", "L").max() == 200
    Image.fromarray(unit * 300, mode="F").save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"holds values in \[0, 300\], outside 0..255"):
        read_image(tmp_path / "big.tif", "L")
    # and through the folder loader
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(ramp).save(folder / "a.png")
    Image.fromarray(ramp[::-1]).save(folder / "b.png")
    ds = datasets.load_image_folder(folder, test_fraction=0.0)
    assert 0.45 < ds.x_train.mean() < 0.55                 # a ramp averages one half (it read 0.996 white)


def test_an_unreadable_or_misnamed_hdf5_file_gets_the_loaders_message(tmp_path):
    """The streaming check now reads every .npy/.h5 header (the budget counts
    the loaded size); a file that is not HDF5 then answered with h5py's
    "Unable to synchronously open file (file signature not found) (OSError)".
    The loader names the problem, and a missing images key lists the names
    the file holds."""
    import h5py
    from fastvae import DataConfig, DataError, datasets
    (tmp_path / "bogus.h5").write_text("not hdf5")
    with pytest.raises(DataError, match="is not a readable HDF5 file"):
        datasets.load(DataConfig(dataset=str(tmp_path / "bogus.h5")))
    with h5py.File(tmp_path / "odd.h5", "w") as f:
        f["pixels"] = np.zeros((10, 8, 8), np.uint8)
    with pytest.raises(DataError, match=r"no dataset named one of images, x, X, data, x_train \(it holds: pixels\)"):
        datasets.load(DataConfig(dataset=str(tmp_path / "odd.h5")))


def test_an_npz_of_several_unnamed_arrays_is_not_guessed(tmp_path):
    """An .npz holding arrays "a" and "b" trained on "a", whichever it was;
    it is refused naming what it holds. The only array, or numpy.savez's
    first positional one (arr_0, beside its labels arr_1), is still taken."""
    from fastvae import DataConfig, DataError, datasets
    x = np.random.default_rng(0).random((30, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "two.npz", a=x, b=x[::-1].copy())
    with pytest.raises(DataError, match=r"no array named one of images, x, X, data, x_train \(it holds: a, b\)"):
        datasets.load(DataConfig(dataset=str(tmp_path / "two.npz")))
    np.savez(tmp_path / "pos.npz", x, np.arange(30))
    np.savez(tmp_path / "one.npz", pixels=x)
    for name in ("pos.npz", "one.npz"):
        ds = datasets.load(DataConfig(dataset=str(tmp_path / name), test_fraction=0.0))
        np.testing.assert_array_equal(ds.x_train, x.reshape(30, -1))


def test_a_missing_array_file_is_named(tmp_path):
    """`--dataset nope.npy` got "No such file or directory (nope.npy); check
    the paths, permissions and free disk space": the streaming check asked
    the file's size before the loader could name the problem."""
    from fastvae import DataConfig, DataError, datasets
    for name in ("nope.npy", "nope.h5", "nope.npz"):
        with pytest.raises(DataError, match=f"data file .*{name} does not exist; pass an existing .npy"):
            datasets.load(DataConfig(dataset=str(tmp_path / name)))


def test_images_are_read_upright_as_their_exif_orientation_says(tmp_path):
    """A phone stores a portrait photo sideways with an EXIF orientation tag;
    folders of such JPEGs trained on sideways faces (Pillow decodes the
    stored pixels). Images are turned as a viewer shows them; a damaged tag
    leaves the pixels as stored."""
    from PIL import Image
    from fastvae import DataConfig, datasets
    from fastvae.io.safe_files import read_image
    a = np.zeros((20, 40), np.uint8)
    a[:, :10] = 255                                        # a wide image, its left band bright
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6                                       # shown turned 90 degrees clockwise
    (tmp_path / "f").mkdir()
    for i in range(4):
        im.save(tmp_path / "f" / f"{i}.png", exif=exif.tobytes())
    up = read_image(tmp_path / "f" / "0.png", "L")
    np.testing.assert_array_equal(up, np.rot90(a, -1))     # the bright band on top, 40 x 20
    ds = datasets.load(DataConfig(dataset=str(tmp_path / "f"), test_fraction=0.0))
    assert ds.image_shape == (40, 20)
    np.testing.assert_array_equal(ds.x_train[0], np.rot90(a, -1).reshape(-1) / np.float32(255))
    exif[0x0112] = 77                                      # no such orientation: as stored
    im.save(tmp_path / "odd.png", exif=exif.tobytes())
    np.testing.assert_array_equal(read_image(tmp_path / "odd.png", "L"), a)


def test_a_run_folder_inside_the_image_folder_is_not_data(tmp_path):
    """`train --dataset imgs --out imgs/run` trained, then every later load of
    imgs failed ("holds files that are not images (run/checkpoint.h5, ...)"),
    and with --skip-other-files the run's own pictures became a class of
    training images. Run folders inside the data are skipped."""
    from PIL import Image
    from fastvae import datasets
    from fastvae.cli import main
    r = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray((r.random((8, 8)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    before = datasets.load(str(tmp_path / "imgs"))
    run = str(tmp_path / "imgs" / "run")
    assert main(["train", "--dataset", str(tmp_path / "imgs"), "--hidden", "4", "--latent", "2", "--epochs", "1",
                 "--batch-size", "6", "--no-progress", "--out", run]) == 0
    assert main(["plot", run, "--grid", "3"]) == 0                     # figures inside the run folder too
    after = datasets.load(str(tmp_path / "imgs"))
    assert after.label_names == ["a", "b"] == before.label_names
    np.testing.assert_array_equal(after.x_train, before.x_train)
    assert main(["eval", run]) == 0


@pytest.mark.parametrize("where", ["x", "x_test"])
def test_an_hdf5_dataset_without_a_dataspace_is_refused(tmp_path, where):
    """An HDF5 dataset with a null dataspace (h5py shape None: no values at
    all) as the images was a TypeError traceback from the streaming check."""
    from fastvae import DataConfig
    with h5py.File(tmp_path / "n.h5", "w") as f:
        if where == "x":
            f.create_dataset("x", shape=None, dtype="f4")
        else:
            f["x_train"] = np.zeros((20, 4, 4), np.float32)
            f.create_dataset("x_test", shape=None, dtype="f4")
    for budget in (None, 1e-4):             # loaded, or streamed past a tiny memory budget
        with pytest.raises(DataError, match=f"'{where}' holds no values \\(an HDF5 dataset with a null dataspace\\)"):
            datasets.load(DataConfig(dataset=str(tmp_path / "n.h5"), memory_budget_mb=budget))
    r = fv("train", "--dataset", tmp_path / "n.h5", "--epochs", "1", "--out", tmp_path / "run", cwd=tmp_path,
           check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "null dataspace" in r.stderr, r.stderr


def test_images_without_pixels_are_named_as_such(tmp_path):
    """An array of shape (60, 0, 8) passed the loader and failed later as
    "input_dim must be a positive integer, got 0", naming neither the file
    nor its shape."""
    from fastvae import DataConfig
    np.save(tmp_path / "z.npy", np.zeros((60, 0, 8), np.float32))
    with pytest.raises(DataError, match=r"z.npy: images of shape \(60, 0, 8\) hold no pixels"):
        datasets.load(DataConfig(dataset=str(tmp_path / "z.npy")))
    with pytest.raises(DataError, match=r"images of shape \(5, 4, 0\) hold no pixels"):
        datasets.from_arrays(np.zeros((5, 4, 0)))
