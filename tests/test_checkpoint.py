import glob

import h5py
import numpy as np
import pytest

import fastvae
from fastvae import CheckpointError, DataConfig, ModelConfig, Trainer
from fastvae.io import checkpoint as ckpt
from fastvae import datasets

from conftest import tiny_trainer


@pytest.fixture(scope="module")
def tiny_data():
    return datasets.make_sprites(640, seed=3, size=16, test_fraction=0.125)


def make_trainer(data, out, epochs=4, **kw):
    return tiny_trainer(out, data=data, hidden=[32], latent=4, epochs=epochs, batch_size=64, seed=11,
                        data_config=DataConfig(dataset="sprites"), **kw)


def test_round_trip_keeps_everything(tiny_data, tmp_path):
    t = make_trainer(tiny_data, tmp_path, epochs=2)
    t.fit(pictures=False)
    d = ckpt.read_checkpoint(tmp_path / "checkpoint.h5")
    np.testing.assert_array_equal(d["params"], t.model.get_flat_params())
    np.testing.assert_array_equal(d["adam"]["m"], t.optimizer.m)
    np.testing.assert_array_equal(d["adam"]["v"], t.optimizer.v)
    assert d["adam"]["t"] == t.optimizer.t == t.step == 2 * 9
    assert d["state"]["epoch"] == 2
    assert d["layout"] == t.model.layout.to_table()
    assert d["config"]["model"]["hidden"] == [32]
    assert d["meta"]["format"] == "fastvae-checkpoint" and d["meta"]["format_version"] == 2
    assert d["meta"]["backend"] == "numpy" and d["meta"]["dtype"] == "float32"
    assert d["meta"]["fastvae_version"] == fastvae.__version__
    assert [h["epoch"] for h in d["history"]] == [1, 2]
    assert d["params"].dtype == np.float32
    m = fastvae.load(tmp_path / "checkpoint.h5")
    np.testing.assert_array_equal(m.get_flat_params(), t.model.get_flat_params())
    assert m.checkpoint["epoch"] == 2


def test_resume_is_bit_identical(tiny_data, tmp_path):
    a = make_trainer(tiny_data, tmp_path / "straight", epochs=4, binarize=True)
    a.fit(pictures=False)
    b = make_trainer(tiny_data, tmp_path / "split", epochs=2, binarize=True)
    b.fit(pictures=False)
    c = Trainer.from_checkpoint(tmp_path / "split" / "checkpoint.h5", epochs=4, dataset=tiny_data, progress=False)
    assert c.epoch == 2
    c.fit(pictures=False)
    np.testing.assert_array_equal(a.model.get_flat_params(), c.model.get_flat_params())
    np.testing.assert_array_equal(a.optimizer.m, c.optimizer.m)
    np.testing.assert_array_equal(a.optimizer.v, c.optimizer.v)
    assert [h["train_neg_elbo"] for h in a.history] == [h["train_neg_elbo"] for h in c.history]
    # and training actually changed the parameters
    fresh = make_trainer(tiny_data, tmp_path / "fresh", epochs=0)
    assert not np.array_equal(fresh.model.get_flat_params(), a.model.get_flat_params())


def _bump_version(path, version):
    """Rewrite the header as a file of another format version would have it."""
    with open(path, "rb+") as fh:
        v, digest = ckpt._parse_header(fh.read(ckpt.HEADER_SIZE))
        fh.seek(0)
        fh.write(ckpt._header(version, digest))


def test_refuses_other_format_versions(tiny_data, tmp_path):
    t = make_trainer(tiny_data, tmp_path, epochs=1)
    t.fit(pictures=False)
    p = tmp_path / "checkpoint.h5"
    _bump_version(p, 3)
    with pytest.raises(CheckpointError, match="version 3.*reads versions 1-2; upgrade fastvae"):
        fastvae.load(p)
    _bump_version(p, 0)
    with pytest.raises(CheckpointError, match="version 0"):
        ckpt.read_checkpoint(p)


def test_refuses_foreign_truncated_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        fastvae.load(tmp_path / "nope.h5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    with pytest.raises(CheckpointError, match="not a fastvae checkpoint"):
        fastvae.load(other)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="an HDF5 file without the fastvae header"):
        fastvae.load(junk)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CheckpointError, match="not an HDF5 file, or truncated"):
        fastvae.load(tmp_path / "text.h5")


def test_truncated_checkpoint_is_refused(tiny_data, tmp_path):
    t = make_trainer(tiny_data, tmp_path, epochs=1)
    t.fit(pictures=False)
    raw = (tmp_path / "checkpoint.h5").read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        fastvae.load(cut)
    flipped = tmp_path / "flipped.h5"
    flipped.write_bytes(raw[:-100] + bytes([raw[-100] ^ 1]) + raw[-99:])
    with pytest.raises(CheckpointError, match="do not match the SHA-256"):
        fastvae.load(flipped)


def test_layout_mismatch_is_refused(tiny_data, tmp_path):
    t = make_trainer(tiny_data, tmp_path, epochs=1)
    t.fit(pictures=False)
    other = fastvae.VAE(ModelConfig(input_dim=256, hidden=[16], latent_dim=4))
    d = ckpt.read_checkpoint(tmp_path / "checkpoint.h5")
    with pytest.raises(CheckpointError, match="layout differs"):
        other.layout.check_table(d["layout"])


@pytest.mark.parametrize("fail_at", ["replace", "write"])
def test_failed_save_keeps_previous_file(tiny_data, tmp_path, monkeypatch, fail_at):
    t = make_trainer(tiny_data, tmp_path, epochs=1)
    t.fit(pictures=False)
    p = tmp_path / "checkpoint.h5"
    before = p.read_bytes()
    saved = t.model.get_flat_params()
    t.model.params[:] += 1.0
    if fail_at == "replace":
        monkeypatch.setattr(ckpt.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    else:
        real = ckpt.dump_json                     # a crash while writing the history's text
        monkeypatch.setattr(ckpt, "dump_json",
                            lambda obj, *a, **k: (_ for _ in ()).throw(RuntimeError("crash"))
                            if isinstance(obj, list) and obj and "epoch" in obj[0] else real(obj, *a, **k))
    # an OS error becomes one CheckpointError line; anything else propagates; both clean up
    with pytest.raises(fastvae.CheckpointError if fail_at == "replace" else RuntimeError,
                       match="disk full.*previous file is intact" if fail_at == "replace" else "crash"):
        t.save()
    assert p.read_bytes() == before
    assert glob.glob(str(tmp_path / ".tmp-*")) == []
    monkeypatch.undo()
    np.testing.assert_array_equal(fastvae.load(p).get_flat_params(), saved)


def test_no_pickle_in_checkpoint(tiny_data, tmp_path):
    t = make_trainer(tiny_data, tmp_path, epochs=1)
    t.fit(pictures=False)
    with h5py.File(tmp_path / "checkpoint.h5", "r") as f:
        found = {}
        f.visititems(lambda n, o: found.update({n: o.dtype}) if isinstance(o, h5py.Dataset) else None)
    text = {n for n, dt in found.items() if h5py.check_string_dtype(dt) is not None}
    numbers = {n for n, dt in found.items() if dt.kind in "fiu"}
    assert text == {"layout", "config", "state", "history"}      # the JSON texts, and nothing else opaque
    assert numbers == set(found) - text and {"params", "adam/m", "adam/v"} <= numbers
