"""Datasets larger than memory (issue 13): .npy and HDF5 files beyond the
memory budget are streamed in chunks with a prefetch thread; RSS stays flat
as the file grows; order, shards and resume behave as in memory."""

import subprocess
import sys

import h5py
import numpy as np
import pytest

import fastvae
from fastvae import DataConfig, datasets
from fastvae.datasets.arrayfiles import held_out_rows
from fastvae.datasets.streaming import StreamBatchSource, StreamedImages

from conftest import PEAK_RSS


def _npy(path, n, seed=0):
    r = np.random.default_rng(seed)
    x = ((r.random((n, 16, 16)) < 0.3) * 255).astype(np.uint8)
    np.save(path, x)
    return x


def _trainer(data, out=None, **kw):
    from fastvae import ModelConfig, RunSettings, TrainConfig, Trainer
    mc = ModelConfig(input_dim=256, hidden=[12], latent_dim=3, image_shape=(16, 16), dtype="float64")
    tc = TrainConfig(epochs=kw.pop("epochs", 2), batch_size=kw.pop("batch_size", 64), seed=4, **kw)
    return Trainer(mc, tc, DataConfig(), dataset=data, out=out, progress=False, settings=RunSettings(backend="numpy"))


def test_a_file_over_the_budget_is_streamed_and_one_under_is_loaded(tmp_path):
    _npy(tmp_path / "a.npy", 1000)
    ds = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy"), memory_budget_mb=0.5))
    assert isinstance(ds.x_train, StreamedImages) and ds.x_train.shape == (900, 256)
    loaded = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy")))
    assert isinstance(loaded.x_train, np.ndarray)
    np.testing.assert_array_equal(ds.x_test, loaded.x_test)
    np.testing.assert_array_equal(ds.x_train[5:8], loaded.x_train[5:8])


def test_a_streamed_file_splits_as_it_would_loaded(tmp_path):
    """A streamed file held out its last rows as the test split, a loaded one
    a seeded random 10%: the same run evaluated where the file loaded (more
    free memory, or another rank) scored a "test" split of images it had
    trained on. Both take the same rows now (data_seed decides), all of them:
    test rows a small budget cannot hold are streamed too (a subset that fitted
    was kept, 51 of 100 here, so the split depended on the free memory)."""
    x = _npy(tmp_path / "a.npy", 1000)
    flat = x.reshape(1000, -1) / np.float32(255)
    for seed in (0, 5):
        loaded = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy"), data_seed=seed))
        test = held_out_rows(1000, 0.1, seed)
        np.testing.assert_array_equal(loaded.x_test, flat[test])
        for budget in (0.5, 0.1):                       # the 100 test rows fit in half of 0.5 MB, not of 0.1
            ds = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy"), memory_budget_mb=budget, data_seed=seed))
            np.testing.assert_array_equal(np.asarray(ds.x_train), loaded.x_train)
            for rows in ([0, 1], [898, 899], [17, 450, 3]):
                np.testing.assert_array_equal(ds.x_train[rows], loaded.x_train[rows])
            assert isinstance(ds.x_test, np.ndarray if budget == 0.5 else StreamedImages)
            np.testing.assert_array_equal(np.asarray(ds.x_test), loaded.x_test)
            np.testing.assert_array_equal(ds.x_test[[99, 0, 7]], loaded.x_test[[99, 0, 7]])


def test_a_streamed_split_never_reads_the_rows_of_the_other(tmp_path):
    """The train split of a streamed file skips its test rows, which lie in the
    same file. Indexing past the split (np.asarray iterated
    x[i] until a read failed, reading test rows as training rows and then
    calling the intact file truncated) raises IndexError; x[-1] is the
    split's last row; np.asarray reads the split, (n, D). The exploring
    commands on --split train of a streamed run work (they failed with
    "the data file ends before row N; it was truncated")."""
    _npy(tmp_path / "a.npy", 1000)
    train = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy"), memory_budget_mb=0.1)).x_train
    flat = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy"))).x_train        # the same rows, loaded
    np.testing.assert_array_equal(train[-1], flat[899])
    np.testing.assert_array_equal(train[[3, 0]], flat[[3, 0]])
    np.testing.assert_array_equal(np.asarray(train), flat)
    for key in (900, -901, [5, 900], np.array([-1])):
        with pytest.raises(IndexError, match="this split has rows 0..899"):
            train[key]
    from fastvae.cli import main
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "a.npy"), "--memory-budget", "0.1", "--hidden", "8",
                 "--latent", "2", "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    assert main(["plot", str(out), "--split", "train", "--out", str(tmp_path / "figs")]) == 0
    assert main(["eval", str(out), "--split", "train", "--iwae-k", "2", "--iwae-images", "50"]) == 0
    assert main(["eval", str(out), "--split", "train", "--iwae-k", "2"]) == 0


def test_every_row_once_per_epoch_shuffled_in_windows_of_chunks(tmp_path):
    """Each epoch visits every row once, in windows of MIX chunks whose rows
    are interleaved: a batch was one chunk's consecutive rows (of a file
    sorted by class, one class), now rows from MIX places of the file."""
    from fastvae.datasets.streaming import MIX
    _npy(tmp_path / "a.npy", 1000)
    ds = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy"), memory_budget_mb=0.05))
    t = _trainer(ds)
    src = t.batches
    assert isinstance(src, StreamBatchSource) and src.n_chunks > 3 * MIX
    pos = src.new_epoch()
    ids = src._row_ids(np.asarray(pos.perm), 0, 900)
    assert sorted(ids) == list(range(900))
    C = ds.x_train.chunk_rows
    window = ids[:MIX * C]
    assert len(set((window // C).tolist())) == MIX and not np.array_equal(window, np.sort(window))
    assert len(set((ids[:64] // C).tolist())) >= MIX - 2                  # one batch: rows of (nearly) all of them
    for lo, hi in ((0, 900), (37, 301), (500, 501), (850, 900)):          # any stretch, as whole-epoch ids
        np.testing.assert_array_equal(src._row_ids(np.asarray(pos.perm), lo, hi), ids[lo:hi])
    assert not np.array_equal(src._row_ids(np.asarray(src.new_epoch().perm), 0, 900), ids)


def test_a_file_sorted_by_class_gives_batches_of_many_classes(tmp_path):
    """A file sorted by class (or by factor, as 3dshapes is) streamed in
    batches of one chunk each: 1 to 2 of 10 classes a batch. Now about
    as many as a shuffle of the whole file gives."""
    n = 4000
    np.save(tmp_path / "s.npy", np.repeat(np.arange(10, dtype=np.uint8) * 25, n // 10)[:, None].repeat(64, 1))
    ds = datasets.load(DataConfig(dataset=str(tmp_path / "s.npy"), memory_budget_mb=0.2, test_fraction=0))
    assert isinstance(ds.x_train, StreamedImages)
    src = StreamBatchSource(fastvae.backends.get("numpy", "float32"), ds.x_train, 64,
                            fastvae.backends.get("numpy", "float32").new_rng([0, 1]), False)
    ids = src._row_ids(np.asarray(src.new_epoch().perm), 0, n)
    classes = [len(set((ids[b:b + 64] // (n // 10)).tolist())) for b in range(0, n, 64)]
    assert np.median(classes) >= 7, classes      # a shuffle of the whole file: 10


@pytest.mark.parametrize("binarize", [False, True])
def test_rank_shards_are_slices_of_the_one_process_batch(tmp_path, binarize):
    _npy(tmp_path / "a.npy", 700)
    ds = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy"), memory_budget_mb=0.05))
    t = _trainer(ds)
    be = t.backend

    def batch(rank, size, b=4):
        s = StreamBatchSource(be, ds.x_train, 45, be.new_rng([3, 1]), binarize, rank, size, latent_dim=3)
        p = s.new_epoch()
        for i in range(b):
            s.next_batch(p, i)
        ws = s.next_batch(p, b)
        return ws.x.copy(), ws.eps.copy()
    ref = batch(0, 1)
    for size in (2, 3):
        parts = [batch(r, size) for r in range(size)]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), ref[0])
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), ref[1])


@pytest.mark.parametrize("resume_budget", [0.05, 0.2])
def test_mid_epoch_interrupt_resumes_bit_for_bit(tmp_path, resume_budget):
    """Also where the free memory changed before the resume (budget 0.2 MB
    instead of 0.05, both streaming): the chunk size came from the budget, so
    the resume was refused ("its batch order does not fit") and a seed drew
    other batches on another machine. The file decides it now."""
    _npy(tmp_path / "a.npy", 800)
    load = lambda mb=0.05: datasets.load(DataConfig(dataset=str(tmp_path / "a.npy"), memory_budget_mb=mb))
    straight = _trainer(load(), epochs=2)
    straight.fit(pictures=False)
    t = _trainer(load(), out=str(tmp_path / "run"), epochs=2)
    real = t.model.loss_and_grad
    calls = {"n": 0}

    def stop_after_17(*a, **k):
        calls["n"] += 1
        if calls["n"] == 17:
            t.stop_requested = True
        return real(*a, **k)
    t.model.loss_and_grad = stop_after_17
    with pytest.raises(fastvae.TrainingInterrupted):
        t.fit(pictures=False)
    data = load(resume_budget)
    assert isinstance(data.x_train, StreamedImages) and data.x_train.chunk_rows == straight.data.x_train.chunk_rows
    r = fastvae.Trainer.from_checkpoint(tmp_path / "run" / "checkpoint.h5", dataset=data, progress=False)
    r.fit(pictures=False)
    np.testing.assert_array_equal(r.model.get_flat_params(), straight.model.get_flat_params())


def test_hdf5_files_stream_too(tmp_path):
    x = ((np.random.default_rng(1).random((600, 256)) < 0.5) * 255).astype(np.uint8)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("images", data=x, chunks=(50, 256), compression="gzip")
    ds = datasets.load(DataConfig(dataset=str(tmp_path / "d.h5"), memory_budget_mb=0.01))
    assert isinstance(ds.x_train, StreamedImages)
    loaded = datasets.load(DataConfig(dataset=str(tmp_path / "d.h5")))           # the same split, in memory
    np.testing.assert_array_equal(ds.x_train.rows([7, 3, 500]), loaded.x_train[[7, 3, 500]])
    np.testing.assert_array_equal(ds.x_test, loaded.x_test[:len(ds.x_test)])
    _trainer(ds, epochs=1).fit(pictures=False)


def _peak_rss_training(tmp_path, n):
    p = tmp_path / f"rows{n}.npy"
    x = np.zeros((n, 28, 28), np.uint8)
    x[:, ::3, ::2] = 255
    np.save(p, x)
    code = ("import sys\nfrom fastvae.cli import main\n"
            f"main(['train', '--dataset', {str(p)!r}, '--memory-budget', '2', '--hidden', '16', '--latent', '2', "
            f"'--epochs', '1', '--batch-size', '500', '--backend', 'numpy', '--no-progress', "
            f"'--out', {str(tmp_path / f'run{n}')!r}])\n") + PEAK_RSS
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert "RSS_MB" in out.stdout, out.stderr
    return float(out.stdout.split("RSS_MB")[1])


def test_rss_stays_flat_as_the_file_grows(tmp_path):
    """20,000 then 80,000 images (15.7 then 62.7 MB of uint8; 63 then 251 MB as
    float32 in memory): the streamed run's peak RSS grows by about its
    in-memory test split (10%: 2,000 then 8,000 rows, +19 MB as float32), far
    below the +188 MB of loading the training rows."""
    small, large = _peak_rss_training(tmp_path, 20_000), _peak_rss_training(tmp_path, 80_000)
    assert large - small < 40, (small, large)


def test_the_budget_counts_the_loaded_float32_images_not_the_file(tmp_path):
    """A uint8 file of 256 KiB under a 0.5 MiB budget was loaded (it compared
    the file's size) and took 1 MiB as float32: the budget now counts the
    stored array plus its float32 copy (5 bytes a uint8 pixel)."""
    _npy(tmp_path / "a.npy", 1024)                                   # 1024 x 256 uint8 = 256 KiB
    at = lambda mb: datasets.load(DataConfig(dataset=str(tmp_path / "a.npy"), memory_budget_mb=mb)).x_train
    assert isinstance(at(0.5), StreamedImages)                       # 1.25 MiB to load
    assert isinstance(at(1.3), np.ndarray)
    np.save(tmp_path / "f.npy", np.asfortranarray(np.zeros((1024, 16, 16), np.float32)))
    with pytest.raises(fastvae.DataError, match="Fortran-ordered and too large to load .*write it C-ordered"):
        datasets.load(DataConfig(dataset=str(tmp_path / "f.npy"), memory_budget_mb=0.5))
    assert datasets.load(DataConfig(dataset=str(tmp_path / "f.npy"), memory_budget_mb=3)).x_train.shape == (922, 256)
    np.savez(tmp_path / "z.npz", images=np.zeros((1024, 16, 16), np.uint8))
    with pytest.raises(fastvae.DataError, match=r"over memory_budget_mb=0.5 MB, and only .npy and HDF5 files stream"):
        datasets.load(DataConfig(dataset=str(tmp_path / "z.npz"), memory_budget_mb=0.5))   # it loaded, unbounded
    assert datasets.load(DataConfig(dataset=str(tmp_path / "z.npz"))).x_train.shape == (922, 256)


def test_loading_an_array_file_holds_the_file_and_its_float32_images_once(tmp_path):
    """The conversion to float32 and then the random split held three copies
    (9 bytes a uint8 pixel at the peak: 205 MB for 30,000 28x28 images);
    each split is now filled chunk by chunk (raw 22 MB + float32 90 MB)."""
    p = tmp_path / "m.npy"
    np.save(p, np.random.default_rng(0).integers(0, 256, (30_000, 28, 28), dtype=np.uint8))
    code = ("import re\ndef hwm():\n    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())"
            ".group(1)) / 1024\nfrom fastvae import DataConfig, datasets\nbefore = hwm()\n"
            f"ds = datasets.load(DataConfig(dataset={str(p)!r}, memory_budget_mb=10 ** 6))\n"
            "print('GROWTH_MB', hwm() - before, ds.x_train.shape, ds.x_test.shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "GROWTH_MB" in out.stdout, out.stderr
    growth = float(out.stdout.split("GROWTH_MB")[1].split()[0])
    raw, f32 = 30_000 * 784 / 2 ** 20, 30_000 * 784 * 4 / 2 ** 20         # 22.4 and 89.7 MiB
    assert "(27000, 784) (3000, 784)" in out.stdout
    assert growth < raw + f32 + 15, (growth, raw + f32)                  # 9 bytes a pixel (202 MiB) before


def test_an_npz_that_would_not_fit_is_refused_before_its_float32_copy(tmp_path, monkeypatch):
    """An .npz cannot stream: without a budget it was converted to float32
    whatever the free memory (4 bytes a pixel on top of the file's)."""
    from fastvae import ConfigError
    from fastvae.training import memory
    np.savez(tmp_path / "z.npz", images=np.zeros((1000, 32, 32), np.uint8))
    monkeypatch.setattr(memory, "host_available", lambda: 2 ** 20)          # pretend 1 MiB free; 3.9 MiB needed
    with pytest.raises(ConfigError, match=r"float32 images of .*z.npz needs about 3.9 MiB .* save them with "
                                          r"numpy.save as .npy to stream them"):
        datasets.load(DataConfig(dataset=str(tmp_path / "z.npz")))


def test_ranks_that_disagree_on_streaming_stop_with_the_fix(tmp_path, monkeypatch):
    """Each rank decides to stream from its own free memory; one rank that
    loaded the file drew other batches than one that streamed it (chunked
    order), and data-parallel training went on silently. Disagreeing ranks
    now stop with a named fix; agreeing ones (streamed or not) train."""
    from fastvae import ConfigError
    from fastvae.training import distributed

    class TwoRanks(distributed.World):                  # the other rank's data streamed (``other``) or not
        size = 2

        def __init__(self, other):
            self.answers = [other, not other]           # its part of any(streamed), then of any(not streamed)

        def any(self, flag):
            theirs = self.answers.pop(0)
            return bool(flag) or theirs

    _npy(tmp_path / "a.npy", 1000)
    ds = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy"), memory_budget_mb=0.1))
    assert isinstance(ds.x_train, StreamedImages)
    assert distributed.agree_on_streaming(TwoRanks(other=True), True) is True
    with pytest.raises(ConfigError, match=r"the ranks disagree on streaming the data from disk.*set memory_budget_mb "
                                          r"\(MB\), the same for every"):
        distributed.agree_on_streaming(TwoRanks(other=False), True)
    monkeypatch.setattr(distributed, "world", lambda backend=None: TwoRanks(other=False))
    before = fastvae.backends.cpu.threads.current()["blas"]
    with pytest.raises(ConfigError, match="ranks disagree on streaming"):
        _trainer(ds)
    assert fastvae.backends.cpu.threads.current()["blas"] == before      # refused before the ranks' thread counts are set


def test_a_files_own_test_split_is_used_loaded_or_streamed(tmp_path):
    """A file holding x_train, y_train, x_test, y_test (Keras's mnist.npz
    layout) was read as x_train alone, 10% of it held out at random and its
    x_test and labels never used. Its own split is the split now, in .npz and
    HDF5, loaded or streamed; a test split of another image shape is refused."""
    r = np.random.default_rng(2)
    xtr, xte = ((r.random((600, 16, 16)) < 0.4) * 255).astype(np.uint8), (r.random((40, 16, 16)) * 255).astype(np.uint8)
    ytr, yte = np.arange(600) % 10, np.arange(40) % 10
    np.savez(tmp_path / "k.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    with h5py.File(tmp_path / "k.h5", "w") as f:
        for k, v in (("x_train", xtr), ("y_train", ytr), ("x_test", xte), ("y_test", yte)):
            f.create_dataset(k, data=v)
    unit = lambda a: a.reshape(len(a), -1) / np.float32(255)
    for name in ("k.npz", "k.h5"):
        ds = datasets.load(DataConfig(dataset=str(tmp_path / name)))
        np.testing.assert_array_equal(ds.x_train, unit(xtr))
        np.testing.assert_array_equal(ds.x_test, unit(xte))
        np.testing.assert_array_equal(ds.y_train, ytr)
        np.testing.assert_array_equal(ds.y_test, yte)
    streamed = datasets.load(DataConfig(dataset=str(tmp_path / "k.h5"), memory_budget_mb=0.2))
    assert isinstance(streamed.x_train, StreamedImages) and streamed.x_train.shape == (600, 256)
    np.testing.assert_array_equal(np.asarray(streamed.x_train), unit(xtr))
    np.testing.assert_array_equal(streamed.x_test, unit(xte))
    tiny = datasets.load(DataConfig(dataset=str(tmp_path / "k.h5"), memory_budget_mb=0.01))   # 40 rows over half of it
    assert isinstance(tiny.x_test, StreamedImages)                   # were its first 20 rows
    np.testing.assert_array_equal(np.asarray(tiny.x_test), unit(xte))
    np.savez(tmp_path / "bad.npz", x_train=xtr, x_test=xte[:, :8])
    with pytest.raises(fastvae.DataError, match=r"x_train holds \(16, 16\) images but x_test \(8, 16\)"):
        datasets.load(DataConfig(dataset=str(tmp_path / "bad.npz")))


def test_a_streamed_run_evaluated_loaded_is_not_called_changed_data(tmp_path):
    """A file streamed under a small budget (its test rows streamed too)
    and loaded later: same training rows, so no "the data has changed" note;
    a file that gained rows gets one."""
    from fastvae.io.restore import data_change_note, data_rows
    _npy(tmp_path / "a.npy", 1000)
    streamed = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy"), memory_budget_mb=0.1))
    loaded = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy")))
    state = {"data_rows": data_rows(streamed)}
    assert state["data_rows"] == [900, 100] and data_rows(loaded) == [900, 100]
    assert data_change_note(state, loaded) == ""
    _npy(tmp_path / "a.npy", 1100)
    grown = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy")))
    assert "990 and 110 now" in data_change_note(state, grown)


def test_a_binarized_streamed_split_draws_what_the_loaded_one_does(tmp_path):
    """A run trained with --binarize is scored on one fixed binary draw of its
    test split: the same images whether the split is in memory or streamed,
    read whole or in any rows (a row's draw depends on its place alone)."""
    from fastvae import ModelConfig
    from fastvae.explore.evaluation import binarized, evaluate
    from fastvae.training.parts import Evaluator
    r = np.random.default_rng(3)
    np.save(tmp_path / "g.npy", (r.random((1000, 16, 16)) * 255).astype(np.uint8))        # grey pixels
    loaded = datasets.load(DataConfig(dataset=str(tmp_path / "g.npy")))
    streamed = datasets.load(DataConfig(dataset=str(tmp_path / "g.npy"), memory_budget_mb=0.1))
    assert isinstance(streamed.x_test, StreamedImages)
    cfg = ModelConfig(input_dim=256, hidden=[8], latent_dim=2)
    a, b = binarized(loaded.x_test, cfg), binarized(streamed.x_test, cfg)
    assert set(np.unique(a)) == {0.0, 1.0} and 0.3 < a.mean() < 0.7
    np.testing.assert_array_equal(np.asarray(b), a)
    np.testing.assert_array_equal(b[[5, 2, 99]], a[[5, 2, 99]])
    np.testing.assert_array_equal(b[40:60], a[40:60])
    assert not np.array_equal(np.asarray(streamed.x_test), a)        # the split itself is left grey
    model = fastvae.VAE(cfg, seed=0)
    ev = Evaluator(streamed.x_test, 0, binarize=True).scores(model)
    assert ev["test_neg_elbo"] == pytest.approx(evaluate(model, a)["neg_elbo"], rel=1e-12)


@pytest.mark.parametrize("dtype", [bool, np.float16, np.int16])
def test_every_pixel_type_that_loads_also_streams(tmp_path, dtype):
    """A bool .npy loaded (0/1) but streaming refused it ("of numbers, got
    bool"): whether a file fits in memory decided whether it could train."""
    r = np.random.default_rng(4)
    x = (r.random((1000, 16, 16)) < 0.4).astype(dtype)
    np.save(tmp_path / "a.npy", x)
    loaded = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy")))
    streamed = datasets.load(DataConfig(dataset=str(tmp_path / "a.npy"), memory_budget_mb=0.1))
    assert isinstance(streamed.x_train, StreamedImages)
    np.testing.assert_array_equal(np.asarray(streamed.x_train), loaded.x_train)
    np.testing.assert_array_equal(np.asarray(streamed.x_test), loaded.x_test)


def test_an_hdf5_file_that_cannot_stream_is_closed(tmp_path, monkeypatch):
    """An HDF5 file opened to stream whose images could not be found stayed
    open until garbage collection (a file handle held by nothing)."""
    import fastvae.datasets.streaming as streaming
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["nothing_known"] = np.zeros((10, 4), np.uint8)
    opened = []

    class Spy(streaming.SandboxedH5):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            opened.append(self)
    monkeypatch.setattr(streaming, "SandboxedH5", Spy)
    assert streaming._open_rows(str(tmp_path / "d.h5"), ".h5") is None
    assert opened and opened[0]._proc.returncode is not None      # its reader process stopped
