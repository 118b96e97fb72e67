import json
import math
import re

import numpy as np
import pytest

import fastvae
from fastvae import BackendUnavailableError, ConfigError, ModelConfig, backends, datasets

from conftest import tiny_trainer


def test_public_api_names():
    for name in ("VAE", "Trainer", "train", "load", "evaluate", "backends", "datasets", "Adam",
                 "ModelConfig", "TrainConfig", "DataConfig", "FastVAEError"):
        assert hasattr(fastvae, name), name
    import importlib
    kernels = importlib.import_module("fastvae.kernels")   # installed from kernels/ via package_dir
    assert kernels.__file__


def test_train_in_one_call_and_load(tmp_path):
    data = datasets.make_sprites(200, seed=1, size=16)
    t = fastvae.train(data, out=str(tmp_path), hidden=[16], latent_dim=3, epochs=2, batch_size=32)
    assert [h["epoch"] for h in t.history] == [1, 2]
    assert t.history[1]["train_neg_elbo"] < t.history[0]["train_neg_elbo"]
    m = fastvae.load(tmp_path / "checkpoint.h5")
    mu, logvar = m.encode(data.x_test)
    assert mu.shape == logvar.shape == (20, 3)
    rec = m.reconstruct(data.x_test[:4])
    assert rec.shape == (4, 256) and rec.min() >= 0 and rec.max() <= 1
    ev = fastvae.evaluate(m, data.x_test)
    assert ev["n"] == 20 and ev["neg_elbo"] == pytest.approx(t.history[-1]["test_neg_elbo"], rel=1e-6)
    # the run folder stands for its checkpoint, as on the command line (str or path-like)
    for folder in (tmp_path, str(tmp_path)):
        np.testing.assert_array_equal(fastvae.load(folder).get_flat_params(), m.get_flat_params())
    # a second run into the same folder is refused (it replaced the first silently), unless force=True
    before = (tmp_path / "checkpoint.h5").read_bytes()
    with pytest.raises(fastvae.RunFolderError, match=r"already holds a run.*force=True"):
        fastvae.train(data, out=str(tmp_path), hidden=[16], latent_dim=3, epochs=1, batch_size=32, seed=5)
    assert (tmp_path / "checkpoint.h5").read_bytes() == before
    t2 = fastvae.train(data, out=str(tmp_path), force=True, hidden=[16], latent_dim=3, epochs=1, batch_size=32, seed=5)
    assert fastvae.load(tmp_path).checkpoint["epoch"] == 1 and len(t2.history) == 1
    for bad, needle in [(-1, "epochs must be at least 0"), (2.5, "epochs must be an integer")]:
        with pytest.raises(ConfigError, match=needle):
            t.fit(epochs=bad)
    with pytest.raises(ConfigError, match="unknown option"):
        fastvae.train(data, hidden_units=[3])


def test_registry_reports_reasons():
    rows = {b["name"]: b for b in backends.available()}
    assert rows["numpy"]["available"] and rows["numpy"]["reason"] == ""
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tpu'; choose one of: numpy"):
        backends.get("tpu")
    backends.register("fake", lambda: None, lambda: "needs the 'fake' package: pip install fake")
    try:
        assert not {b["name"]: b for b in backends.available()}["fake"]["available"]
        with pytest.raises(BackendUnavailableError, match="pip install fake"):
            fastvae.VAE(ModelConfig(), "fake")
    finally:
        backends._REGISTRY.pop("fake")


def test_init_is_seeded_and_pytorch_like():
    cfg = ModelConfig(input_dim=784, hidden=[400], latent_dim=20)
    a, b, c = fastvae.VAE(cfg, seed=0), fastvae.VAE(cfg, seed=0), fastvae.VAE(cfg, seed=1)
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)
    W = a.p["encoder.0.W"]
    k = 1 / np.sqrt(784)
    assert W.shape == (400, 784) and np.abs(W).max() <= k and np.abs(W).max() > 0.99 * k
    assert abs(W.std() - k / np.sqrt(3)) < 0.01 * k          # U(-k, k) has std k/sqrt(3)
    x = fastvae.VAE(ModelConfig(input_dim=784, hidden=[400], latent_dim=20, init="xavier"))
    a_ = np.sqrt(6 / (784 + 400))
    assert np.abs(x.p["encoder.0.W"]).max() <= a_ and not x.p["encoder.0.b"].any()


def test_loss_every_keeps_gradients_and_estimates_the_loss():
    data = datasets.make_sprites(256, seed=1, size=16)
    kw = dict(hidden=[16], latent_dim=3, epochs=2, batch_size=16, seed=3)
    a = fastvae.train(data, **kw)
    b = fastvae.train(data, loss_every=4, **kw)
    # skipping the loss reductions never changes the parameters
    np.testing.assert_array_equal(a.model.params, b.model.params)
    # the epoch means over every 4th step estimate the full means
    for ha, hb in zip(a.history, b.history):
        assert hb["train_neg_elbo"] != ha["train_neg_elbo"]
        assert abs(hb["train_neg_elbo"] - ha["train_neg_elbo"]) < 0.1 * ha["train_neg_elbo"]
        assert hb["test_neg_elbo"] == ha["test_neg_elbo"]


def test_threads_setting(capsys):
    from fastvae.backends.cpu.threads import current, set_threads, usable_cores
    before = current()["blas"][0]["threads"]
    try:
        assert set_threads(1)["blas"][0]["threads"] == 1
        assert "note" not in capsys.readouterr().err
        more = usable_cores() + 1                   # oversubscribed: said once, then kept quiet on re-applying
        set_threads(more)
        set_threads(more)
        assert capsys.readouterr().err.count(f"threads={more} is more than the {usable_cores()} cores") == 1
    finally:
        set_threads(before)
    with pytest.raises(ConfigError, match="threads"):
        set_threads(0)


def test_threads_auto_picks_the_fastest_measured_count(tmp_path):
    """autotune keeps the count under which the probe ran fastest (a probe that
    is slow with 2 BLAS threads, as OpenBLAS is beside a busy process), and
    --threads auto tunes on the model's own step when training starts."""
    import time as _time
    from fastvae import TrainConfig
    from fastvae.backends.cpu.threads import autotune, current, set_threads
    before = current()["blas"][0]["threads"]
    try:
        res = autotune(lambda: _time.sleep(0.004 if current()["blas"][0]["threads"] == 2 else 0.001),
                       candidates=[2, 1], repeats=3)
        assert res["threads"] == 1 and res["ms"][2] > res["ms"][1] and current()["blas"][0]["threads"] == 1
        assert fastvae.RunSettings(threads="auto").threads == "auto"
        with pytest.raises(ConfigError, match="threads"):
            fastvae.RunSettings(threads="fast")
        t = tiny_trainer(tmp_path / "run", threads="auto")
        assert t.threads_note.startswith("; threads auto: ")
        t.fit(pictures=False)
    finally:
        set_threads(before)


def test_library_entry_points_refuse_bad_images_codes_and_counts_in_one_message():
    """encode / codes / reconstruct / evaluate / decode / sample check what a
    user hands them, as the CLI checks data files: 8-bit pixels, NaN, wrong
    shapes, strings and zero batch sizes get a named error, not NaN results."""
    from fastvae import DataError
    model = fastvae.VAE(ModelConfig(input_dim=16, hidden=[8], latent_dim=2), "numpy", seed=0)
    good = np.random.default_rng(0).random((5, 16)).astype(np.float32)
    readers = [model.encode, model.codes, model.reconstruct, lambda X: fastvae.evaluate(model, X)]
    bad = {"needs [0, 1]; rescale the data (8-bit pixels: x / 255)": good * 255, "NaN": np.where(good > 0.5, np.nan, good),
           "NaN or infinite": np.where(good > 0.5, np.inf, good), "(16,) is one image: pass a batch of one": good[0],
           "17 features": np.zeros((5, 17)), "real numbers": good.astype(str)}
    for f in readers:
        for needle, X in bad.items():
            with pytest.raises(DataError, match=re.escape(needle)):
                f(X)
        with pytest.raises(ConfigError, match="batch_size must be at least 1"):
            f(good, batch_size=0) if f is not readers[3] else fastvae.evaluate(model, good, batch_size=0)
    # the range check is the bernoulli likelihood's; a gaussian model scores values outside [0, 1]
    g = fastvae.VAE(ModelConfig(input_dim=16, hidden=[8], latent_dim=2, likelihood="gaussian"), "numpy")
    assert np.isfinite(fastvae.evaluate(g, good * 3 - 1)["neg_elbo"])
    with pytest.raises(DataError, match="NaN"):
        g.encode(bad["NaN"])
    # integer types of any kind are counts; a list of rows is an array
    mu, _ = model.encode(good.tolist(), batch_size=np.int64(2))
    np.testing.assert_array_equal(mu, model.encode(good, batch_size=2)[0])
    for Z, needle in [(np.zeros(2), "shape (N, 2)"), (np.full((1, 2), np.nan), "NaN"), (np.zeros((1, 3)), "got (1, 3)")]:
        with pytest.raises(DataError, match=re.escape(needle)):
            model.decode(Z)
    with pytest.raises(ConfigError, match="n must be at least 0"):
        model.sample(-1)
    with pytest.raises(ConfigError, match="n must be an integer"):
        model.sample(2.5)
    assert model.sample(0).shape == (0, 16)


def test_an_unknown_train_option_names_the_field_meant():
    """The command line's spellings (--beta, --latent, --adamw) and typos point
    at the config field fastvae.train takes; the table of spellings names real
    flags and real fields."""
    import dataclasses as dc
    from fastvae.cli.args import parser
    for kw, hint in [({"beta": 4.0}, "'beta' (did you mean beta_max=?)"),
                     ({"adamw": True}, "'adamw' (did you mean decoupled_weight_decay=?)"),
                     ({"latnt_dim": 3}, "'latnt_dim' (did you mean latent_dim=?)"),
                     ({"zzz": 1}, "'zzz' for fastvae.train")]:
        with pytest.raises(ConfigError, match=re.escape(hint)):
            fastvae.train("sprites", n_sprites=50, **kw)
    train = [a for a in parser()._actions if a.dest == "cmd"][0].choices["train"]
    flags = {a.dest for a in train._actions}
    fields = set().union(*({f.name for f in dc.fields(c)} for c in (ModelConfig, fastvae.TrainConfig,
                                                                   fastvae.DataConfig)))
    from fastvae.cli.args import FIELD_OF_FLAG
    assert set(FIELD_OF_FLAG) <= flags - fields and set(FIELD_OF_FLAG.values()) <= fields


def test_warm_up_is_timed_apart_from_the_epoch_throughput(tmp_path):
    """The first step of a process (kernel compilation or loading, first
    allocations) is reported as warmup_s and left out of images_per_s; later
    epochs have none; a resumed process warms up again. With CUDA graphs the
    eager and capture steps before the first replay count too, at most one
    of each per loss flag."""
    import csv
    from fastvae.training.parts import EpochPosition, WarmUp
    data = datasets.make_sprites(130, seed=1, size=8, test_fraction=0.0)      # 130 = 2 x 50 + 30
    t = fastvae.train(data, out=str(tmp_path), hidden=[8], latent_dim=2, epochs=2, batch_size=50)
    first, second = t.history
    assert first["warmup_s"] > 0 and second["warmup_s"] is None
    assert first["images_per_s"] == pytest.approx((130 - 50) / (first["seconds"] - first["warmup_s"]), rel=1e-12)
    assert second["images_per_s"] == pytest.approx(130 / second["seconds"], rel=1e-12)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert float(rows[0]["warmup_s"]) == pytest.approx(first["warmup_s"]) and rows[1]["warmup_s"] == ""
    again = fastvae.Trainer.from_checkpoint(tmp_path / "checkpoint.h5", epochs=3, dataset=data, progress=False)
    again.fit()
    assert again.history[2]["warmup_s"] > 0
    # a one-step epoch has nothing left to time apart from: its throughput counts the warm-up
    pos = EpochPosition(perm=None, seconds=2.0, warmup=1.5, warmup_images=50)
    assert pos.throughput(50) == 25.0 and pos.throughput(150) == 200.0

    class Graphs:
        warmup, stats = 1, {"replayed": 0}
    w, p = WarmUp(Graphs()), EpochPosition(perm=None)
    counted = 0
    while w.next_step():                       # never replayed (every step diverged): warm-up stops at 4 steps
        w.add(p, 0.25, 10)
        counted += 1
    assert counted == 4 and p.warmup == 1.0 and p.warmup_images == 40
    w, Graphs.stats = WarmUp(Graphs()), {"replayed": 0}
    w.add(p, 0.1, 10)
    Graphs.stats["replayed"] = 1               # the first replay: steady state
    assert not w.next_step()
    u = WarmUp(None)                           # without graphs: the first step only
    assert u.next_step()
    u.add(p, 0.0, 1)
    assert not u.next_step()


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_the_step_refuses_batches_the_kernels_would_misread(backend):
    """loss_and_grad and forward take x (B, D) and eps (B, L) as the backend's
    arrays in the model dtype. Numba's kernels index without bounds checks:
    an eps of 3 rows for 4 images once read past its end and returned a loss.
    Adam.step refuses a NaN or negative lr before touching anything."""
    if backend not in [b["name"] for b in backends.available() if b["available"]]:
        pytest.skip(f"{backend} backend not available here")
    model = fastvae.VAE(ModelConfig(input_dim=16, hidden=[8], latent_dim=2), backend, seed=0)
    be = model.backend
    x = be.asarray(np.random.default_rng(0).random((4, 16)))
    eps = be.zeros((4, 2))
    for xx, ee, needle in [(x, be.zeros((3, 2)), "eps must be a (4, 2) float32 array"),
                           (x, be.zeros((4, 3)), "got a float32 array of shape (4, 3)"),
                           (x[:, :8], eps, "x must be a (B, 16) float32 array"),
                           (x.astype(np.float64), eps, "got a float64 array"),
                           (x.tolist(), eps, "got a list"), (x, eps[None], "shape (1, 4, 2)"),
                           (x[0, 0], eps, "got a float32; convert"), (x[0], eps, "got a float32 array of shape (16,)")]:
        for call in (lambda: model.loss_and_grad(xx, ee), lambda: model.forward(xx, ee)):
            with pytest.raises(ConfigError, match=re.escape(needle)):
                call()
    recon, kl = model.loss_and_grad(x, eps)
    assert np.isfinite(float(recon)) and np.isfinite(float(kl))
    opt = fastvae.Adam.for_model(model)
    before = model.get_flat_params()
    for lr in (float("nan"), float("inf"), -1e-3):
        with pytest.raises(ConfigError, match="Adam step lr"):
            opt.step(lr)
    assert opt.t == 0
    np.testing.assert_array_equal(model.get_flat_params(), before)
    opt.step(0.0)                               # a schedule's last value may be 0: a valid step that moves nothing
    assert opt.t == 1
    np.testing.assert_array_equal(model.get_flat_params(), before)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_threads_sharing_a_model_get_the_answers_one_thread_gets(backend):
    """The workspaces are the model's: four threads calling encode / decode /
    evaluate / iwae on one model at once overwrote each other's buffers (all
    four encode threads got wrong codes, silently). Calls now take turns."""
    if backend not in [b["name"] for b in backends.available() if b["available"]]:
        pytest.skip(f"{backend} backend unavailable here")
    import threading
    from fastvae.explore.metrics import iwae
    m = fastvae.VAE(ModelConfig(input_dim=784, hidden=[200], latent_dim=8), backend, seed=0)
    r = np.random.default_rng(0)
    xs = [r.random((48 + 16 * i, 784), dtype=np.float32) for i in range(3)]   # three batch sizes
    z = r.standard_normal((40, 8))
    calls = [lambda i=i: m.encode(xs[i])[0] for i in range(3)]
    calls += [lambda: m.decode(z), lambda: fastvae.evaluate(m, xs[1])["neg_elbo"],
              lambda: iwae(m, xs[0][:6], k=8), lambda: m.codes(xs[2], batch_size=32)]
    expected = [c() for c in calls]
    wrong = []

    def work(j):
        for _ in range(30):
            got = calls[j]()
            if not np.array_equal(got, expected[j]):
                wrong.append(j)
                return
    threads = [threading.Thread(target=work, args=(j,)) for j in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [], f"calls {sorted(wrong)} returned other answers under threads"


def test_train_takes_an_array_of_images():
    """fastvae.train(X) answered "dataset must be a built-in name or a path"
    for an in-memory array; arrays follow the rules of array files."""
    r = np.random.default_rng(3)
    X = r.random((200, 8, 8)).astype(np.float32)
    kw = dict(hidden=[8], latent_dim=2, epochs=1, batch_size=20)
    t = fastvae.train(X, **kw)
    assert t.data.x_train.shape == (180, 64) and t.data.x_test.shape == (20, 64)
    assert t.model_config.image_shape == (8, 8)
    back = np.sort(np.concatenate([t.data.x_train, t.data.x_test]), axis=0)
    np.testing.assert_array_equal(back, np.sort(X.reshape(200, 64), axis=0))       # every row, once
    u8 = fastvae.train((X * 255).astype(np.uint8)[..., None], test_fraction=0.25, **kw)
    assert u8.data.x_test.shape == (50, 64) and u8.model_config.image_shape == (8, 8, 1)
    assert u8.data.x_train.max() <= 1.0 and u8.data.x_train.max() > 0.9        # 0..255 scaled to [0, 1]
    with pytest.raises(fastvae.DataError, match=r"expected images of shape .* got \(5,\)"):
        fastvae.train(np.zeros(5), **kw)
    with pytest.raises(fastvae.DataError, match="channels-first"):
        fastvae.train(np.zeros((10, 3, 8, 8)), **kw)
    assert fastvae.train(X.reshape(200, 64).tolist(), **kw).data.x_train.shape == (180, 64)     # a list of rows
    with pytest.raises(fastvae.DataError, match="cannot be read as an array of images"):
        fastvae.train([[0.5, 0.5], [0.5]], **kw)                                                 # ragged


def test_data_given_in_memory_is_never_recorded_as_a_loadable_dataset(tmp_path, capsys):
    """A run on a Dataset handed over in memory recorded its name ("sprites")
    or, from a Trainer without a data_config, the default "sprites": `fastvae
    eval RUN` then scored 1,200 regenerated default sprites instead of the
    60 test images the run had, without a word. It is recorded as in memory
    now, and the commands ask for --dataset."""
    from fastvae.cli import main
    data = datasets.make_sprites(300, seed=1, size=16)
    fastvae.train(data, out=str(tmp_path / "a"), hidden=[8], latent_dim=2, epochs=1, batch_size=30)
    fastvae.Trainer(ModelConfig(input_dim=256, hidden=[8], latent_dim=2, image_shape=(16, 16)),
                    fastvae.TrainConfig(epochs=1, batch_size=30), dataset=data, out=str(tmp_path / "b"),
                    progress=False).fit(pictures=False)
    for run in ("a", "b"):
        assert fastvae.load(tmp_path / run).checkpoint["data"]["dataset"] == "in-memory:sprites"
        for cmd in (["eval", str(tmp_path / run)], ["plot", str(tmp_path / run)],
                    ["train", "--resume", str(tmp_path / run), "--epochs", "2"]):
            assert main(cmd) == 2
            assert "trained on data given in memory ('sprites')" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", data.x_test.reshape(-1, 16, 16))
    assert main(["eval", str(tmp_path / "a"), "--dataset", str(tmp_path / "x.npy"), "--split", "train",
                 "--json"]) == 0
    assert '"n": 27' in capsys.readouterr().out                        # 30 test images, 10% held out again
    again = fastvae.Trainer.from_checkpoint(tmp_path / "b" / "checkpoint.h5", epochs=2, dataset=data, progress=False)
    again.fit(pictures=False)
    assert again.data_config.dataset == "in-memory:sprites" and again.epoch == 2


def test_a_library_run_records_its_data_paths_absolute(tmp_path, monkeypatch, capsys):
    """fastvae.train("x.npy") recorded "x.npy": `fastvae eval RUN` from
    another directory failed (or would read another x.npy there); the
    command line made paths absolute, the library did not. DataConfig does
    it now, for both (built-in names and in-memory data stay as they are)."""
    from fastvae import DataConfig
    from fastvae.cli import main
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    np.save("x.npy", np.random.default_rng(0).random((40, 8, 8)).astype(np.float32))
    fastvae.train("x.npy", out="run", hidden=[4], latent_dim=2, epochs=1, batch_size=8)
    data = fastvae.load("run").checkpoint["data"]
    assert data["dataset"] == str(tmp_path / "work" / "x.npy")
    assert DataConfig(dataset="mnist", data_dir="d").data_dir == str(tmp_path / "work" / "d")
    assert DataConfig(dataset="mnist").dataset == "mnist" and DataConfig(dataset="in-memory:x").dataset == "in-memory:x"
    assert DataConfig(dataset="no-such-file.npy").dataset == "no-such-file.npy"     # named as given in its error
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "work" / "run"), "--json"]) == 0
    assert '"n": 4' in capsys.readouterr().out


def test_the_library_takes_images_in_the_models_own_image_shape():
    """model.encode(x) of (N, H, W) images, the shape the model was trained
    on, was refused ("must be an (N, D) array"); it now reads them as rows,
    without a copy, as (N, D) does. Other shapes are refused, naming both."""
    from fastvae.explore.metrics import iwae
    t = tiny_trainer(None, epochs=1)
    m, x = t.model, t.data.x_test[:6]
    img = x.reshape(6, 16, 16)
    np.testing.assert_array_equal(m.encode(img)[0], m.encode(x)[0])
    np.testing.assert_array_equal(m.reconstruct(img), m.reconstruct(x))
    assert fastvae.evaluate(m, img) == fastvae.evaluate(m, x)
    np.testing.assert_array_equal(iwae(m, img, k=4), iwae(m, x, k=4))
    np.testing.assert_array_equal(m.encode(img[..., None])[0], m.encode(x)[0])    # (N, H, W, 1), as train takes
    for bad in (img[:, :8], np.repeat(img[..., None], 2, axis=3)):
        with pytest.raises(fastvae.DataError, match=r"one flattened image per row, or \(N, 16, 16\), got shape"):
            m.encode(bad)
    for one in (img[0], img[0][..., None], x[0]):     # one image: it read (16, 16) as 16 images of 16 pixels
        for f in (m.encode, m.reconstruct, lambda images: fastvae.evaluate(m, images)):
            with pytest.raises(fastvae.DataError, match=re.escape(f"must be a batch, one image per row; shape "
                                                                  f"{one.shape} is one image: pass a batch of one")):
                f(one)
    np.testing.assert_array_equal(m.encode(img[0][None])[0], m.encode(x[:1])[0])


def test_the_library_takes_8_bit_pixels_as_fastvae_train_does():
    """fastvae.train(X) takes uint8 images (divided by 255), but the trained
    model's encode/evaluate refused the same array ("values in [0, 255] but
    the bernoulli likelihood needs [0, 1]"). Library calls now divide uint8
    by 255 as the loaders do (float32, exactly rounded), so the numbers are
    those of the float images."""
    from fastvae.explore.metrics import iwae
    t = tiny_trainer(None, epochs=1)
    m = t.model
    pixels = np.random.default_rng(3).integers(0, 256, (6, 256)).astype(np.uint8)
    unit = pixels.astype(np.float32) / np.float32(255.0)
    np.testing.assert_array_equal(m.encode(pixels)[0], m.encode(unit)[0])
    np.testing.assert_array_equal(m.reconstruct(pixels.reshape(6, 16, 16)), m.reconstruct(unit))
    assert fastvae.evaluate(m, pixels) == fastvae.evaluate(m, unit)
    np.testing.assert_array_equal(iwae(m, pixels, k=4), iwae(m, unit, k=4))
    assert pixels.max() > 1                                     # the caller's array is not scaled in place
    with pytest.raises(fastvae.DataError, match=r"values in \[0, 255\] but the bernoulli likelihood needs"):
        m.encode(pixels.astype(np.int64))                       # other integers are taken as values


def test_zero_epochs_leave_a_run_folder_that_loads_and_resumes(tmp_path):
    """fastvae.train(..., epochs=0) (the command line refuses 0, the library
    takes it) wrote config.json, metrics.csv and pictures but no checkpoint:
    `fastvae info`/`eval`/`plot` and resuming then said the checkpoint does
    not exist. The untrained state is saved now, and resuming it to 2
    epochs gives the parameters of 2 epochs straight, bit for bit."""
    from fastvae import Trainer
    data = fastvae.datasets.make_sprites(200, seed=6, size=16)
    t0 = tiny_trainer(tmp_path / "zero", data=data, epochs=0)
    t0.fit()
    assert (tmp_path / "zero" / "checkpoint.h5").exists()
    m = fastvae.load(tmp_path / "zero")
    np.testing.assert_array_equal(m.get_flat_params(), t0.model.get_flat_params())
    resumed = Trainer.from_checkpoint(tmp_path / "zero" / "checkpoint.h5", epochs=2, dataset=data, progress=False)
    resumed.fit(pictures=False)
    straight = tiny_trainer(tmp_path / "straight", data=data, epochs=2)
    straight.fit(pictures=False)
    np.testing.assert_array_equal(resumed.model.get_flat_params(), straight.model.get_flat_params())
    # over another run (force=True), the untrained state replaces that run's checkpoint, as its config.json
    t0 = Trainer(straight.model_config, straight.train_config.replace(epochs=0, seed=9), dataset=data,
                 out=str(tmp_path / "straight"), progress=False, force=True)
    t0.fit(pictures=False)
    np.testing.assert_array_equal(fastvae.load(tmp_path / "straight").get_flat_params(), t0.model.get_flat_params())


def test_fastvae_train_refuses_options_that_would_do_nothing():
    """fastvae.train(X, lr_gamma=0.5) (constant schedule) or
    objective="iwae" with beta_max=4 took the option and ignored it; the
    command line's rule (fastvae.options.OPTION_NEEDS) holds for the library too."""
    X = np.random.default_rng(0).random((40, 8, 8))
    for kw, needle in ((dict(lr_gamma=0.5), "lr_gamma does something only with lr_schedule step (here constant)"),
                       (dict(objective="iwae", beta_max=4.0), "beta_max does something only with objective elbo"),
                       (dict(iwae_k=3), "iwae_k does something only with objective iwae"),
                       (dict(likelihood="mse", sigma=0.2), "sigma does something only with likelihood gaussian")):
        with pytest.raises(fastvae.ConfigError, match=re.escape(needle)):
            fastvae.train(X, epochs=1, batch_size=8, hidden=[4], latent_dim=2, **kw)
    fastvae.train(X, epochs=1, batch_size=8, hidden=[4], latent_dim=2, lr_schedule="step", lr_gamma=0.5)


def test_tensors_get_the_checks_arrays_get():
    """A torch tensor has .shape and .ndim, so check_images took it for a
    streamed dataset and returned it unchecked: a tensor of NaN scored NaN
    and one of 0..300 pixels scored garbage under the bernoulli likelihood.
    Tensors are read as arrays and checked; a valid one gives the array's numbers."""
    torch = pytest.importorskip("torch")
    t = tiny_trainer(None, epochs=1)
    m, x = t.model, t.data.x_test[:6]
    np.testing.assert_array_equal(m.encode(torch.from_numpy(x))[0], m.encode(x)[0])
    np.testing.assert_array_equal(m.encode(torch.from_numpy(x).reshape(6, 16, 16))[0], m.encode(x)[0])
    with pytest.raises(fastvae.DataError, match="NaN or infinite"):
        fastvae.evaluate(m, torch.full((3, 256), float("nan")))
    with pytest.raises(fastvae.DataError, match=r"values in .* but the bernoulli likelihood needs \[0, 1\]"):
        m.encode(torch.from_numpy(x) * 300)


def test_a_trainer_takes_a_path_or_images_as_its_data(tmp_path):
    """Trainer.from_checkpoint(RUN, dataset="x.npy") (how an in-memory run is
    resumed, the error message says) raised AttributeError ('str' object has
    no attribute 'x_train'); Trainer(..., dataset=array) likewise. A path is
    loaded and recorded; arrays are taken as fastvae.train takes them."""
    from fastvae import ModelConfig, TrainConfig, Trainer
    X = np.random.default_rng(0).random((40, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    fastvae.train(X, out=str(tmp_path / "run"), hidden=[4], latent_dim=2, epochs=1, batch_size=8)
    t = Trainer.from_checkpoint(tmp_path / "run" / "checkpoint.h5", epochs=2, dataset=str(tmp_path / "x.npy"),
                                progress=False)
    assert t.data_config.dataset == str(tmp_path / "x.npy") and t.data.x_train.shape == (36, 64)
    t.fit(pictures=False)
    assert fastvae.load(tmp_path / "run").checkpoint["data"]["dataset"] == str(tmp_path / "x.npy")
    a = Trainer(ModelConfig(input_dim=64, hidden=[4], latent_dim=2), TrainConfig(epochs=1, batch_size=8),
                dataset=X, progress=False)
    assert a.data_config.dataset == "in-memory:arrays"
    np.testing.assert_array_equal(a.data.x_train, t.data.x_train)       # the same seeded split of the same images
    # a folder run's --image-size/--color do not follow its data to an array file (they would be refused)
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image
    for i in range(40):
        Image.fromarray((X[i] * 255).astype(np.uint8)).resize((16, 16)).save(folder / f"{i:02d}.png")
    fastvae.train(str(folder), out=str(tmp_path / "frun"), image_size=(8, 8), hidden=[4], latent_dim=2, epochs=1,
                  batch_size=8)
    f = Trainer.from_checkpoint(tmp_path / "frun" / "checkpoint.h5", epochs=2, dataset=str(tmp_path / "x.npy"),
                                progress=False)
    assert (f.data_config.image_size, f.data_config.color) == (None, "grayscale") and f.data.x_train.shape == (36, 64)


def test_binarized_evaluation_images_are_one_fixed_draw():
    from fastvae import ModelConfig
    from fastvae.explore.evaluation import binarized
    cfg = ModelConfig(input_dim=400, hidden=[8], latent_dim=2)
    x = np.random.default_rng(0).random((50, 400)).astype(np.float32)
    x[0], x[1] = 0.0, 1.0
    a, b = binarized(x, cfg), binarized(x.astype(np.float64), cfg)
    assert a.dtype == np.float32 and set(np.unique(a)) <= {0.0, 1.0}
    np.testing.assert_array_equal(a, b)                      # the same draw for every call and dtype
    assert not a[0].any() and a[1].all()
    # 20,000 Bernoulli pixels: the mean's standard error is about 0.0035; 0.02 is over 5 of them
    assert abs(float(a[2:].mean()) - float(x[2:].mean())) < 0.02
    np.testing.assert_array_equal(binarized(x[:7], cfg), a[:7])   # row chunks: the same draw for a prefix
    with pytest.raises(fastvae.DataError, match=r"\[0, 1\]"):
        binarized(x * 2, cfg)


def test_a_run_trained_on_binarized_images_is_scored_on_binarized_test_images(tmp_path):
    """--binarize trained on binary draws but every test -ELBO (per epoch,
    `fastvae eval`, IWAE, plots) scored the grey test images: neither the
    likelihood of the binary data the model describes nor comparable between
    runs. Now one fixed binary draw of the split (evaluate.binarized)."""
    from fastvae.explore.evaluation import binarized, evaluate
    from conftest import fv
    x = np.random.default_rng(1).random((300, 8, 8)).astype(np.float32)
    np.save(tmp_path / "grey.npy", x)
    fv("train", "--dataset", "grey.npy", "--binarize", "--hidden", "16", "--latent", "2", "--epochs", "2",
       "--batch-size", "30", "--no-progress", "--out", "run", cwd=tmp_path)
    model = fastvae.load(tmp_path / "run")
    data = fastvae.datasets.load(fastvae.DataConfig(dataset=str(tmp_path / "grey.npy")))
    on_binary = evaluate(model, binarized(data.x_test, model.config))
    assert model.checkpoint["history"][-1]["test_neg_elbo"] == pytest.approx(on_binary["neg_elbo"], rel=1e-9)
    assert evaluate(model, data.x_test)["neg_elbo"] != pytest.approx(on_binary["neg_elbo"], rel=1e-6)   # grey
    r = json.loads(fv("eval", "run", "--json", cwd=tmp_path).stdout)
    assert r["binarized"] is True and r["neg_elbo"] == pytest.approx(on_binary["neg_elbo"], rel=1e-9)
    fv("train", "--dataset", "grey.npy", "--hidden", "16", "--latent", "2", "--epochs", "1", "--batch-size", "30",
       "--no-progress", "--out", "plain", cwd=tmp_path)                 # without --binarize: the grey images
    plain = fastvae.load(tmp_path / "plain")
    r = json.loads(fv("eval", "plain", "--json", cwd=tmp_path).stdout)
    assert r["binarized"] is False and r["neg_elbo"] == pytest.approx(evaluate(plain, data.x_test)["neg_elbo"],
                                                                      rel=1e-9)


def test_fit_to_fewer_epochs_than_done_is_refused_before_writing(tmp_path):
    """fit(epochs=N) trains up to N epochs in total; asked for fewer than the
    trainer had done, it rewrote the run's files, trained nothing and said
    nothing (a Keras habit: epochs as the number to add)."""
    t = tiny_trainer(tmp_path / "run", epochs=2)
    t.fit(pictures=False)
    files = lambda: {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir() if p.name != ".lock"}
    before = files()
    with pytest.raises(ConfigError, match="at epoch 2; fit.epochs=N. trains up to N epochs in total: pass N > 2"):
        t.fit(epochs=1)
    assert files() == before and len(before) >= 3
    assert t.fit(epochs=2) == t.history and len(t.history) == 2      # already there: nothing to do
    t.fit(epochs=3, pictures=False)
    assert t.epoch == 3


def test_from_checkpoint_takes_the_run_folder_as_load_does(tmp_path):
    """fastvae.load and every command take the run folder or its checkpoint;
    Trainer.from_checkpoint(folder) said "is a folder, not a regular file"."""
    data = datasets.make_sprites(400, seed=6, size=16)
    t = tiny_trainer(tmp_path / "run", epochs=1, data=data)
    t.fit(pictures=False)
    a = fastvae.Trainer.from_checkpoint(tmp_path / "run", dataset=data, progress=False, epochs=2)
    assert a.epoch == 1 and a.out == str(tmp_path / "run")
    a.fit(pictures=False)
    assert fastvae.load(tmp_path / "run").checkpoint["epoch"] == 2


def test_a_binarize_runs_reconstructions_show_the_images_it_is_scored_on(tmp_path, monkeypatch):
    """The run folder's reconstructions.png of a --binarize run showed the grey
    test images; `plot` and the scores use their fixed binary draw."""
    from fastvae.explore.evaluation import binarized
    from fastvae.training.parts import Reporter
    x = np.random.default_rng(2).random((200, 16, 16)).astype(np.float32)
    data = datasets.from_arrays(x)
    shown = []
    real = Reporter.write_pictures
    monkeypatch.setattr(Reporter, "write_pictures", lambda self, model, X, *a: (shown.append(np.asarray(X)),
                                                                                 real(self, model, X, *a)))
    t = tiny_trainer(tmp_path / "run", data=data, epochs=1, binarize=True)
    t.fit()
    assert len(shown) == 1 and set(np.unique(shown[0])) == {0.0, 1.0}
    np.testing.assert_array_equal(shown[0], binarized(data.x_test, t.model.config)[:16])
    assert (tmp_path / "run" / "reconstructions.png").stat().st_size > 1000


def test_a_data_folder_beside_data_that_never_reads_it_is_refused_everywhere(tmp_path, monkeypatch, capsys):
    """`--data-dir` names where MNIST's or Olivetti's files are. `fastvae train`
    refused it beside a path dataset, but `eval` and `plot` of a run trained
    on an .npy file, and `fastvae.train("x.npy", data_dir=...)`, took it and
    silently read the .npy (a user pointing eval at other data got the old)."""
    from fastvae.cli import main
    monkeypatch.chdir(tmp_path)
    np.save("x.npy", np.random.default_rng(0).random((40, 8, 8)).astype(np.float32))
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="data_dir is where a built-in dataset's files are .*x.npy does not read it"):
        fastvae.train("x.npy", hidden=[4], latent_dim=2, epochs=1, batch_size=8, data_dir="d")
    with pytest.raises(ConfigError, match="data given in memory does not read it: drop it, or give the data's path in "
                                          "dataset"):
        fastvae.train(np.zeros((40, 4), np.float32), hidden=[4], latent_dim=2, epochs=1, batch_size=8, data_dir="d")
    fastvae.train("x.npy", out="run", hidden=[4], latent_dim=2, epochs=1, batch_size=8)
    capsys.readouterr()
    for cmd in (["eval", "run"], ["plot", "run", "--out", "f"], ["interpolate", "run", "0", "1", "--png", "i.png"]):
        assert main(cmd + ["--data-dir", "d"]) == 2
        err = capsys.readouterr().err
        assert "--data-dir is where a built-in dataset's files are" in err and "x.npy does not read it" in err, err
    assert not (tmp_path / "f").exists() and not (tmp_path / "i.png").exists()
    assert main(["train", "--resume", "run", "--epochs", "2", "--data-dir", "d", "--out", "run"]) == 2   # resumed
    assert "x.npy does not read it" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="x.npy does not read it"):
        fastvae.Trainer.from_checkpoint("run", epochs=2, data_dir="d")
    assert fastvae.load("run").checkpoint["epoch"] == 1
    assert main(["eval", "run", "--json"]) == 0            # without it, the run's own data


def test_evaluate_names_the_fix_for_a_path_or_none_given_as_its_model(tmp_path):
    """fastvae.evaluate("run", x) (a run folder, as fastvae.load takes) and
    evaluate(None, x) ended in "AttributeError: 'str' object has no attribute
    'rows_within'"."""
    x = np.random.default_rng(0).random((8, 16)).astype(np.float32)
    with pytest.raises(ConfigError, match=r"evaluate takes a fastvae.VAE as its model, not a str; load the "
                                          r"checkpoint \(or run folder\) with fastvae.load\(path\)"):
        fastvae.evaluate(str(tmp_path), x)
    with pytest.raises(ConfigError, match="not a PosixPath; load the checkpoint"):
        fastvae.evaluate(tmp_path, x)
    with pytest.raises(ConfigError, match=r"not None; pass a fastvae.VAE \(fastvae.load\(path\) loads one"):
        fastvae.evaluate(None, x)
    model = fastvae.VAE(ModelConfig(input_dim=16, hidden=[4], latent_dim=2), "numpy", seed=0)
    assert fastvae.evaluate(model, x)["n"] == 8


def test_train_takes_images_and_labels_as_a_pair():
    """fastvae.train((x, y)), as Keras's fit(x, y) or TensorDataset(x, y) pair
    them, was refused ("cannot be read as an array of images ... inhomogeneo"):
    the labels now go with their images through both splits."""
    x = np.random.default_rng(0).random((60, 4, 4)).astype(np.float32)
    y = np.arange(60) % 3
    t = fastvae.train((x, y), hidden=[4], latent_dim=2, epochs=1, batch_size=10)
    d = t.data
    assert d.x_train.shape == (54, 16) and d.y_train.shape == (54,) and d.y_test.shape == (6,)
    rows = {tuple(r): c for r, c in zip(x.reshape(60, -1).tolist(), y.tolist())}   # each image keeps its label
    assert all(rows[tuple(r)] == c for r, c in zip(d.x_train.tolist() + d.x_test.tolist(),
                                                    d.y_train.tolist() + d.y_test.tolist()))
    with pytest.raises(fastvae.DataError, match="60 images but 10 labels; they must match"):
        fastvae.train((x, y[:10]), hidden=[4], latent_dim=2, epochs=1, batch_size=10)


def test_evaluate_of_a_loaded_run_reproduces_its_last_test_elbo(tmp_path):
    """fastvae.evaluate(fastvae.load(RUN), x_test) drew its z with seed 0,
    while the run (and `fastvae eval`) used the run's --seed: a seed-3 run's
    metrics and the library disagreed. The run's seed is the default now."""
    x = np.random.default_rng(0).random((200, 16)).astype(np.float32)
    t = fastvae.train(x, out=str(tmp_path / "run"), hidden=[8], latent_dim=2, epochs=1, batch_size=20, seed=3)
    m = fastvae.load(tmp_path / "run")
    last = t.history[-1]["test_neg_elbo"]
    assert fastvae.evaluate(m, t.data.x_test)["neg_elbo"] == pytest.approx(last, rel=1e-6)
    assert fastvae.evaluate(m, t.data.x_test, seed=0)["neg_elbo"] != pytest.approx(last, rel=1e-6)
    fresh = fastvae.VAE(ModelConfig(input_dim=16, hidden=[8], latent_dim=2), "numpy", seed=0)   # no run: seed 0
    assert fastvae.evaluate(fresh, x) == fastvae.evaluate(fresh, x, seed=0)


def test_data_settings_that_would_be_ignored_or_crash_are_refused():
    """fastvae.train(x, image_size=(4, 4)) trained on x as it was (image_size
    and color resize folders of images only); data_seed=-1 ended in NumPy's
    "ValueError: expected non-negative integer"; test_fraction=0.99 of 20
    images rounded to all 20 and gave no test split at all, silently."""
    x = np.random.default_rng(0).random((20, 16)).astype(np.float32)
    kw = dict(hidden=[4], latent_dim=2, epochs=1, batch_size=5)
    for bad, needle in ((dict(image_size=(4, 4)), "image_size and color apply to folders of images, not to images "
                                                  "given in memory"),
                        (dict(color="rgb"), "apply to folders of images"),
                        (dict(data_seed=-1), "data_seed must be a non-negative integer, got -1")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            fastvae.train(x, **kw, **bad)
    t = fastvae.train(x, test_fraction=0.99, **dict(kw, batch_size=1))
    assert t.data.x_train.shape == (1, 16) and t.data.x_test.shape == (19, 16)      # one image left to train on
    assert fastvae.train(x, test_fraction=0.5, **kw).data.x_test.shape == (10, 16)      # as before


def test_a_lone_hidden_width_names_the_list_it_should_be():
    """fastvae.train(x, hidden=400) ended in "TypeError: 'int' object is not
    iterable" (ModelConfig too); a width list is asked for by name now."""
    x = np.random.default_rng(0).random((40, 16)).astype(np.float32)
    for name, value in (("hidden", 400), ("decoder_hidden", 8.0), ("hidden", True), ("hidden", "400")):
        with pytest.raises(ConfigError, match=re.escape(f"{name} is a list of layer widths, got {value!r}; e.g. "
                                                        f"{name}=[400] (one layer)")):
            fastvae.train(x, latent_dim=2, epochs=1, batch_size=8, **{name: value})
        with pytest.raises(ConfigError, match=f"{name} is a list of layer widths"):
            ModelConfig(input_dim=16, **{name: value})
    assert ModelConfig(input_dim=16, hidden=(8, 4), decoder_hidden=np.array([6])).hidden == [8, 4]
    with pytest.raises(ConfigError, match=re.escape("Adam betas must be two numbers in [0, 1), got 0.9")):
        fastvae.train(x, hidden=[4], latent_dim=2, epochs=1, batch_size=8, betas=0.9)     # the same TypeError


def test_entry_points_name_arguments_of_the_wrong_kind():
    """fastvae.load(None), Trainer.from_checkpoint(123) and save(123) ended in
    os.fspath's TypeError, Trainer(None, ...) in "AttributeError: 'NoneType'
    object has no attribute 'input_dim'"; each names what it takes now."""
    x = np.random.default_rng(0).random((40, 16)).astype(np.float32)
    for call in (lambda: fastvae.load(None), lambda: fastvae.load(123),
                 lambda: fastvae.Trainer.from_checkpoint(None)):
        with pytest.raises(ConfigError, match=r"a checkpoint is given as its path or its run folder's"):
            call()
    with pytest.raises(ConfigError, match="Trainer takes a fastvae.ModelConfig and a fastvae.TrainConfig"):
        fastvae.Trainer(None, fastvae.TrainConfig(), dataset=x)
    with pytest.raises(ConfigError, match="got ModelConfig and NoneType"):
        fastvae.Trainer(ModelConfig(input_dim=16), None, dataset=x)
    t = fastvae.Trainer(ModelConfig(input_dim=16, hidden=[4], latent_dim=2), fastvae.TrainConfig(batch_size=8),
                        dataset=x, progress=False)
    with pytest.raises(ConfigError, match=r"save\(\) takes a checkpoint path"):
        t.save(123)


def test_sampling_more_images_than_memory_holds_is_refused_before_drawing():
    """model.sample(10**12) ended in numpy's MemoryError ("Unable to allocate
    21.8 TiB"); the sample count is checked against the free memory first."""
    model = fastvae.VAE(ModelConfig(input_dim=16, hidden=[4], latent_dim=3), "numpy", seed=0)
    with pytest.raises(ConfigError, match=r"sampling 1,000,000,000,000 images needs about .* GiB but the host has "
                                          r".* free; draw fewer at a time"):
        model.sample(10 ** 12)
    assert model.sample(5).shape == (5, 16)
    wide = fastvae.VAE(ModelConfig(input_dim=4096, hidden=[4], latent_dim=3), "numpy", seed=0)
    big = np.broadcast_to(np.zeros(3, np.float32), (10 ** 7, 3))       # 10^7 codes, 327 GB decoded
    with pytest.raises(ConfigError, match=r"decoding 10,000,000 images needs about .* decode fewer codes at a time"):
        wide.decode(big)
    assert wide.decode(big[:4]).shape == (4, 4096)


def test_sigma_is_checked_against_the_pixels_one_image_sums():
    """The Gaussian nll sums (x - mean)^2 / (2 sigma^2) over D pixels: with
    errors of one pixel unit it must stay finite in the dtype, D / (2 sigma^2)
    <= its largest number. sigma 1e-19 in float32 passed the check of 1/sigma^2
    alone and overflowed the nll at the first step at D 784 (a divergence that
    did not name sigma); it is refused there, and kept where D is small."""
    bound = lambda D: math.sqrt(D / (2 * float(np.finfo(np.float32).max)))   # noqa: E731
    assert bound(784) > 1e-19 > bound(4)
    with pytest.raises(fastvae.ConfigError, match=r"sigma 1e-19 is outside what float32 arithmetic can use "
                                                  r"\(1\.1e-18 to"):
        fastvae.ModelConfig(input_dim=784, likelihood="gaussian", sigma=1e-19)
    fastvae.ModelConfig(input_dim=4, hidden=[3], likelihood="gaussian", sigma=1e-19)
    fastvae.ModelConfig(input_dim=784, likelihood="gaussian", sigma=1e-19, dtype="float64")
