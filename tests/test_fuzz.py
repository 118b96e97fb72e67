"""Random corruptions of real files reach the loaders: only fastvae errors
come out (DataError / CheckpointError), never a crash, hang or other type."""

import gzip
import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import fastvae
from fastvae import CheckpointError, DataError, ModelConfig, TrainConfig, Trainer, DataConfig, datasets
from fastvae.datasets import load_idx

from conftest import MNIST_DIR

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _corrupt(raw: bytes, edits, cut):
    b = bytearray(raw)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    if cut is not None and b:
        b = b[: cut % (len(b) + 1)]
    return bytes(b)


edits_st = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), max_size=8)
cut_st = st.one_of(st.none(), st.integers(0, 1 << 30))


def _real_idx_bytes():
    p = os.path.join(MNIST_DIR, "t10k-labels-idx1-ubyte.gz")
    if os.path.exists(p):
        return open(p, "rb").read()[:3000]        # a real (truncated) gzip header and stream start
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        f.write(b"\x00\x00\x08\x01" + (50).to_bytes(4, "big") + bytes(range(50)))
    return buf.getvalue()


IDX_GZ = _real_idx_bytes()
IDX_PLAIN = b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (3, 4, 4)) + bytes(48)


@FUZZ
@given(edits=edits_st, cut=cut_st, gz=st.booleans())
def test_idx_loader(tmp_path_factory, edits, cut, gz):
    d = tmp_path_factory.mktemp("idx")
    p = d / ("x-idx.gz" if gz else "x-idx")
    p.write_bytes(_corrupt(IDX_GZ if gz else IDX_PLAIN, edits, cut))
    try:
        a = load_idx(p)
        assert isinstance(a, np.ndarray)
    except DataError:
        pass


def _png_bytes():
    buf = io.BytesIO()
    Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png_bytes()


@FUZZ
@given(edits=edits_st, cut=cut_st)
def test_image_folder_loader(tmp_path_factory, edits, cut):
    d = tmp_path_factory.mktemp("img")
    (d / "good.png").write_bytes(PNG)
    (d / "bad.png").write_bytes(_corrupt(PNG, edits, cut))
    try:
        ds = datasets.load_image_folder(d, image_size=(8, 8), test_fraction=0)
        assert ds.x_train.shape == (2, 64) and np.all(np.isfinite(ds.x_train))
    except DataError:
        pass


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    data = datasets.make_sprites(100, seed=1, size=8)
    t = Trainer(ModelConfig(input_dim=64, hidden=[6], latent_dim=2), TrainConfig(epochs=1, batch_size=20),
                DataConfig(), dataset=data, out=str(d), progress=False)
    t.fit(pictures=False)
    return (d / "checkpoint.h5").read_bytes()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=12),
       cut=cut_st)
def test_checkpoint_loader(tmp_path_factory, checkpoint_bytes, edits, cut):
    d = tmp_path_factory.mktemp("ckf")
    p = d / "c.h5"
    p.write_bytes(_corrupt(checkpoint_bytes, edits, cut))
    try:
        m = fastvae.load(p)
        assert m.num_params > 0
    except CheckpointError:
        pass


def test_every_single_byte_flip_of_a_checkpoint_is_caught(checkpoint_bytes, tmp_path):
    """Systematically flip bytes across the whole file (a stride keeps it quick):
    each load either refuses with CheckpointError or returns the exact
    parameters (a flip in the header's padding); never wrong numbers, never a
    crash of the HDF5 library (the header's SHA-256 is checked first)."""
    good = None
    p = tmp_path / "c.h5"
    p.write_bytes(checkpoint_bytes)
    good = fastvae.load(p).get_flat_params()
    refused = 0
    for pos in range(0, len(checkpoint_bytes), 5):
        b = bytearray(checkpoint_bytes)
        b[pos] ^= 0xFF
        p.write_bytes(bytes(b))
        try:
            np.testing.assert_array_equal(fastvae.load(p).get_flat_params(), good)
        except CheckpointError:
            refused += 1
    assert refused > 0.9 * (len(checkpoint_bytes) // 5)


@FUZZ
@given(arr=st.one_of(
    st.just(np.zeros((0, 4))), st.just(np.zeros(5)), st.just(np.array([[np.inf, 1.0]])),
    st.just(np.array(["a", "b"])), st.just(np.zeros((3, 2, 2), dtype=np.complex64))))
def test_array_loader_rejects_odd_arrays(tmp_path_factory, arr):
    d = tmp_path_factory.mktemp("npy")
    np.save(d / "a.npy", arr)
    with pytest.raises(DataError):
        datasets.load(str(d / "a.npy"))
