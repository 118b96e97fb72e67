"""Latent-space exploration: numbers with known answers and every picture."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import fastvae
from fastvae import ConfigError, datasets, explore

from conftest import fv


@pytest.fixture(scope="module")
def trained():
    data = datasets.make_sprites(600, seed=4, size=16, test_fraction=0.2)
    t = fastvae.train(data, hidden=[48], latent_dim=4, epochs=12, batch_size=32, seed=1)
    return t.model, data


def png_size(path):
    with Image.open(path) as im:
        return im.size


def test_iwae_bounds_the_elbo(trained):
    model, data = trained
    X = data.x_test[:40]
    recon, kl = explore.per_image_elbo(model, X)
    iw = explore.iwae(model, X, k=300, seed=0)
    assert iw.shape == (40,) and np.all(np.isfinite(iw))
    # the single-sample -ELBO is noisy per image; its mean over the images is not
    assert iw.mean() < (recon + kl).mean() - 1.0
    # more samples tighten the bound (non-increasing in expectation)
    assert explore.iwae(model, X, k=1000, seed=1).mean() <= explore.iwae(model, X, k=30, seed=1).mean() + 0.5


def test_iwae_at_k1_is_the_single_sample_elbo(trained):
    """k = 1 is an unbiased estimate of -ELBO: over many draws the means agree
    within 4 standard errors of the paired difference."""
    model, data = trained
    X = np.repeat(data.x_test[:30], 40, axis=0)              # 1200 draws
    iw = explore.iwae(model, X, k=1, seed=2)
    recon, kl = explore.per_image_elbo(model, X, seed=3)
    diff = iw - (recon + kl)
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert abs(diff.mean()) < 4 * se + 1e-9, (diff.mean(), se)


def test_iwae_chunking_does_not_change_the_estimate(trained):
    model, data = trained
    X = data.x_test[:6]
    a = explore.iwae(model, X, k=64, seed=5, batch_rows=8192)     # all images in one decode
    b = explore.iwae(model, X, k=64, seed=5, batch_rows=64)       # one image per decode
    np.testing.assert_allclose(a, b, rtol=1e-5)                   # same draws, float32 decoder
    with pytest.raises(ConfigError):
        explore.iwae(model, X, k=0)


def test_best_and_worst_are_truly_sorted():
    losses = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 2.0])
    best, worst = explore.best_and_worst(losses, 3)
    assert best.tolist() == [1, 5, 3]        # 1.0, 2.0, 3.0
    assert worst.tolist() == [2, 4, 0]       # 9.0, 7.0, 5.0


def test_active_units_and_kl_per_dim(trained):
    model, data = trained
    kl = explore.kl_per_dim(model, data.x_test)
    n, var = explore.active_units(model, data.x_test)
    mu, lv = (a.astype(np.float64) for a in model.encode(data.x_test))
    assert kl.dtype == np.float64      # float64 sums on the host: only the summation order differs below
    np.testing.assert_allclose(kl.sum(), (0.5 * (mu ** 2 + np.exp(lv) - lv - 1)).sum(1).mean(), rtol=1e-12)
    np.testing.assert_allclose(var, mu.var(0), rtol=1e-12)
    assert n == int((mu.var(0) > 0.01).sum()) and 1 <= n <= 4


def _disentanglement_lib_mig(mus, ys, num_bins=20):
    """MIG as google-research/disentanglement_lib defines it
    (evaluation/metrics/mig.py and utils.py), transcribed into NumPy: codes
    and factors laid out (dims, points); each code discretised by
    ``np.digitize`` against its ``np.histogram`` edges without the last;
    sklearn's ``mutual_info_score`` from the contingency counts (natural
    log); the factor's entropy as its mutual information with itself; the
    mean over factors of (largest - second largest) / entropy."""
    def mutual_info_score(a, b):
        ua, ia = np.unique(a, return_inverse=True)
        ub, ib = np.unique(b, return_inverse=True)
        counts = np.zeros((len(ua), len(ub)))
        np.add.at(counts, (ia, ib), 1)
        n = counts.sum()
        pi, pj = counts.sum(1), counts.sum(0)
        i, j = np.nonzero(counts)
        nij = counts[i, j]
        return float(np.sum(nij / n * (np.log(nij) + np.log(n) - np.log(pi[i]) - np.log(pj[j]))))

    disc = np.zeros_like(mus)
    for i in range(mus.shape[0]):
        disc[i, :] = np.digitize(mus[i, :], np.histogram(mus[i, :], num_bins)[1][:-1])
    m = np.array([[mutual_info_score(ys[j, :], disc[i, :]) for j in range(ys.shape[0])] for i in range(mus.shape[0])])
    entropy = np.array([mutual_info_score(ys[j, :], ys[j, :]) for j in range(ys.shape[0])])
    sorted_m = np.sort(m, axis=0)[::-1]
    return float(np.mean(np.divide(sorted_m[0, :] - sorted_m[1, :], entropy[:])))


def test_mig_is_disentanglement_libs():
    """fastvae's MIG against disentanglement_lib's definition on the same
    10,000 codes and factors (1e-9): sprites-like factors (3 shapes, 6
    scales, 40 orientations, 32 x 32 positions), codes that hold some of
    them with noise."""
    r = np.random.default_rng(21)
    n = 10000
    f = np.stack([r.integers(0, 3, n), np.linspace(0.5, 1, 6)[r.integers(0, 6, n)],
                  np.linspace(0, 2 * np.pi, 40, endpoint=False)[r.integers(0, 40, n)],
                  np.linspace(0, 1, 32)[r.integers(0, 32, n)], np.linspace(0, 1, 32)[r.integers(0, 32, n)]], 1)
    codes = np.stack([f[:, 3] + 0.05 * r.normal(size=n), f[:, 4] + 0.3 * f[:, 3] + 0.05 * r.normal(size=n),
                      f[:, 1] + 0.1 * r.normal(size=n), np.cos(f[:, 2]) + r.normal(size=n), r.normal(size=n),
                      f[:, 0] * 0.2 + f[:, 4] + 0.2 * r.normal(size=n)], 1)
    ours = explore.mig(codes, f)["mig"]
    theirs = _disentanglement_lib_mig(codes.T, f.T)
    assert 0.05 < ours < 0.95
    assert abs(ours - theirs) <= 1e-9 * abs(theirs), (ours, theirs)


def test_mig_known_answers():
    r = np.random.default_rng(0)
    f = np.stack([r.integers(0, 4, 4000), r.integers(0, 5, 4000)], axis=1).astype(float)
    # each factor captured by exactly one dimension, the rest noise: MIG close to 1
    perfect = np.stack([f[:, 0], f[:, 1], r.normal(size=4000)], axis=1)
    # both factors mixed into both dimensions equally: gap 0
    mixed = np.stack([f[:, 0] * 5 + f[:, 1], f[:, 0] * 5 + f[:, 1]], axis=1)
    assert explore.mig(perfect, f)["mig"] > 0.9
    assert explore.mig(mixed, f)["mig"] < 0.01
    noise = explore.mig(r.normal(size=(4000, 3)), f)["mig"]
    assert noise < 0.05
    # one latent: no second to take the gap from; the binned MI's bias alone scored 0.3-0.7 on few images
    one = explore.mig(r.normal(size=(60, 1)), f[:60])
    assert np.isnan(one["mig"]) and len(one["per_factor"]) == 2 and np.isnan(one["per_factor"]).all()


def test_interpolation_codes():
    za, zb = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    lin = explore.interpolate_codes(za, zb, 5, "linear")
    sph = explore.interpolate_codes(za, zb, 5, "spherical")
    np.testing.assert_allclose(lin[[0, -1]], [za, zb])
    np.testing.assert_allclose(sph[[0, -1]], [za, zb], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(sph, axis=1), 1.0)        # stays on the circle
    np.testing.assert_allclose(sph[2], [np.sqrt(0.5)] * 2)
    assert np.linalg.norm(lin[2]) < 0.75


def test_grid_values():
    q = explore.grid_values(5, "quantile")
    np.testing.assert_allclose(q, -q[::-1])
    assert q[2] == 0 and abs(q[-1] - 1.2815515655) < 1e-8                 # Phi^-1(0.9)
    np.testing.assert_allclose(explore.grid_values(3, "even"), [-3, 0, 3])


def test_every_figure_writes_a_file_of_the_expected_size(trained, tmp_path):
    model, data = trained
    X, shape = data.x_test, (16, 16)
    recon, kl = explore.per_image_elbo(model, X)
    calls = {
        "latent_map": lambda p: explore.plot_latent_map(model, X, data.y_test, data.label_names, path=p),
        "grid": lambda p: explore.plot_latent_grid(model, shape, n=7, path=p),
        "grid_pca": lambda p: explore.plot_latent_grid(model, shape, n=7, pca_codes=model.encode(X)[0], path=p),
        "traversals": lambda p: explore.plot_traversals(model, shape, X=X, n_values=7, path=p),
        "interp": lambda p: explore.plot_interpolation(model, X[0], X[1], shape, steps=6, path=p),
        "hist": lambda p: explore.plot_loss_histogram(recon + kl, {"x": 100.0}, path=p),
        "best_worst": lambda p: explore.plot_best_worst(model, X, recon + kl, shape, n=5, path=p),
        "kl": lambda p: explore.plot_kl_per_dim(explore.kl_per_dim(model, X), path=p),
    }
    for name, fn in calls.items():
        p = tmp_path / f"{name}.png"
        fig = fn(str(p))
        w, h = png_size(p)
        fw, fh = fig.get_size_inches() * fig.dpi
        # bbox_inches="tight" trims empty margins and grows to fit outside labels
        assert 0.4 * fw <= w <= 1.3 * fw and 0.4 * fh <= h <= 1.3 * fh, (name, (w, h), (fw, fh))


def test_latent_map_gives_each_class_its_own_colour_and_a_band_of_the_colour_bar(trained):
    """Three sprite classes were drawn with tab10 spread over [0, 2]: 10
    colour bands on the bar, class ticks on band edges, so a reader read
    "ellipse" off a band no point had; and 20 points of 3 square pixels were
    all but invisible. Now each class i is tab10 colour i, the bar has one
    band per class with its tick in the middle, and few points are drawn big."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba
    model, data = trained
    X, y = data.x_test[:20], data.y_test[:20]
    assert len(set(y.tolist())) >= 2
    fig = explore.plot_latent_map(model, X, y, data.label_names)
    ax, bar = fig.axes
    pts = ax.collections[0]
    want = np.array([to_rgba(colormaps["tab10"].colors[i]) for i in y])
    np.testing.assert_allclose(pts.to_rgba(pts.get_array()), want, atol=1e-6)      # each point's colour
    k = len(data.label_names)
    assert pts.get_cmap().N == k and list(pts.norm.boundaries) == [i - 0.5 for i in range(k + 1)]
    assert list(bar.get_yticks()) == list(range(k))
    assert [t.get_text() for t in bar.get_yticklabels()] == list(data.label_names)
    assert pts.get_sizes()[0] >= 20
    many = explore.plot_latent_map(model, data.x_test, np.arange(len(data.x_test)) % 13)   # > 10 classes
    assert many.axes[0].collections[0].get_cmap().name == "viridis"
    assert bar.get_ylabel() == "class" and many.axes[1].get_ylabel() == "class"     # the bar said nothing
    scores = explore.plot_latent_map(model, X, np.linspace(0, 1, len(X)))      # a value per image, no classes
    assert scores.axes[1].get_ylabel() == "label"


def test_loss_curves_show_negative_losses_and_their_units():
    """A Gaussian likelihood's -ELBO is a density's and can be negative: on the
    log axis the -ELBO and recon curves of such a run vanished, leaving only
    the KL. Those runs get a symmetric-log axis now; positive ones keep the log
    axis. Epochs are whole numbers on the axis, and an mse run's losses are
    not labelled nats."""
    from fastvae.explore import plots
    from fastvae.explore.evaluation import units
    hist = [{"epoch": e, "train_neg_elbo": -1000 + 300 / e, "test_neg_elbo": -950 + 300 / e,
             "train_recon": -1100 + 300 / e, "train_kl": 100 - 5 * e, "beta": 1.0} for e in range(1, 9)]
    ax = plots.plot_loss(hist).axes[0]
    assert ax.get_yscale() == "symlog"
    lo, hi = ax.get_ylim()
    for line in ax.get_lines():                                     # every curve inside the axis
        assert lo <= np.nanmin(line.get_ydata()) and np.nanmax(line.get_ydata()) <= hi, line.get_label()
    assert len(ax.get_lines()) == 4 and all(float(t).is_integer() for t in ax.get_xticks())
    pos = [dict(h, train_neg_elbo=h["train_neg_elbo"] + 2000, test_neg_elbo=h["test_neg_elbo"] + 2000,
                train_recon=h["train_recon"] + 2000) for h in hist[:2]]
    ax = plots.plot_loss(pos, units=units("mse", short=True)).axes[0]
    assert ax.get_yscale() == "log" and all(float(t).is_integer() for t in ax.get_xticks())
    assert ax.get_ylabel() == "per image (recon: sum of squared errors)" and "nats" not in ax.get_ylabel()


def test_counts_and_latent_dimensions_get_whole_number_ticks():
    """The loss histogram's image counts read 0.25, 0.5, ... and the KL bars'
    latent dimensions 0.0, 1.0 for a 2-D code."""
    hist = explore.plot_loss_histogram(np.array([1.0, 2.0, 2.5, 9.0])).axes[0]
    assert all(float(t).is_integer() for t in hist.get_yticks())
    bars = explore.plot_kl_per_dim(np.array([0.02, 0.06])).axes[0]
    assert all(float(t).is_integer() for t in bars.get_xticks())


def test_gif_has_the_expected_frames(trained, tmp_path):
    model, data = trained
    frames = explore.interpolation_frames(model, data.x_test[0], data.x_test[1], steps=10)
    assert frames.shape == (10, 256)
    p = tmp_path / "m.gif"
    assert explore.save_gif(frames, (16, 16), p, scale=3) == 18          # 10 forth + 8 back
    with Image.open(p) as im:
        assert im.n_frames == 18 and im.size == (48, 48)
    explore.save_gif(frames, (16, 16), p, bounce=False)
    with Image.open(p) as im:
        assert im.n_frames == 10
    # identical consecutive frames are one in the file (Pillow adds their durations): it said 8 for 2
    same = np.repeat(frames[:2], [5, 3], axis=0)
    assert explore.save_gif(same, (16, 16), p, bounce=False) == 2
    with Image.open(p) as im:
        assert im.n_frames == 2


def test_plot_and_interpolate_commands(tmp_path):
    run = tmp_path / "run"
    fv("train", "--n-sprites", "300", "--hidden", "16", "--latent", "3", "--epochs", "2",
       "--batch-size", "32", "--out", run, "--no-progress", cwd=tmp_path)
    fv("plot", run, "--grid", "5", "--n", "4", cwd=tmp_path)
    figs = sorted(os.listdir(run / "figures"))
    for f in ("reconstructions.png", "samples.png", "latent_map.png", "latent_grid.png", "traversals.png",
              "best_worst.png", "loss_histogram.png", "kl_per_dim.png", "loss_curves.png", "interpolation.png",
              "interpolation.gif"):
        assert f in figs and (run / "figures" / f).stat().st_size > 1000, f
    Image.fromarray((np.random.default_rng(0).random((20, 30)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    said = fv("interpolate", run / "checkpoint.h5", tmp_path / "a.png", "3", "--steps", "6",
              "--gif", tmp_path / "m.gif", cwd=tmp_path).stdout
    with Image.open(tmp_path / "m.gif") as im:
        assert im.n_frames == 10 and "m.gif: 10 frames (6 steps, spherical, played forth and back)" in said, said
    said = fv("interpolate", run / "checkpoint.h5", "3", "3", "--steps", "6", "--gif", tmp_path / "m.gif",
              cwd=tmp_path).stdout                       # an image to itself: every frame the same
    assert "m.gif: 1 frame (6 steps, spherical, played forth and back; identical frames shown as one)" in said, said
    p = fv("interpolate", run / "checkpoint.h5", "0", "999", "--gif", "x.gif", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "outside the test split" in p.stderr
    out = fv("eval", run / "checkpoint.h5", "--json", "--iwae-k", "20", cwd=tmp_path).stdout
    res = json.loads(out)
    assert res["iwae_neg_log_likelihood"] <= res["neg_elbo"] + 5      # 2-epoch model, k = 20
    assert len(res["kl_per_dim"]) == 3 and 0 <= res["active_units"] <= 3
    assert 0 <= res["mig"] <= 1


def test_plot_refuses_bad_dims_before_writing_any_figure(tmp_path, capsys):
    """`plot RUN --dims 0 5` on a 3-D code wrote three figures, then failed;
    on a 1-D code --dims was ignored without a word. Both are refused first."""
    from fastvae.cli import main
    for latent in ("3", "1"):
        run = tmp_path / f"run{latent}"
        assert main(["train", "--n-sprites", "100", "--hidden", "8", "--latent", latent, "--epochs", "1",
                     "--batch-size", "30", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "run3"), "--dims", "0", "5"]) == 2
    assert "dims (0, 5) must be two different latent dimensions in 0..2" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "run1"), "--dims", "0", "1"]) == 2
    assert "--dims picks the latent grid's plane, but latent_dim is 1" in capsys.readouterr().err
    assert not (tmp_path / "run3" / "figures").exists() and not (tmp_path / "run1" / "figures").exists()


def test_a_grid_too_large_for_memory_is_refused_before_any_work(tmp_path, capsys):
    """`plot RUN --grid 1000000` built the 10^12 grid codes in a Python loop
    (killed after minutes, three figures written) before the memory check
    of the decoded images refused it; now refused first, in a moment."""
    import time
    from fastvae.cli import main
    run = tmp_path / "run"
    assert main(["train", "--n-sprites", "100", "--hidden", "8", "--latent", "2", "--epochs", "1",
                 "--batch-size", "30", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    t = time.perf_counter()
    assert main(["plot", str(run), "--grid", "1000000"]) == 2
    assert time.perf_counter() - t < 30           # the loop ran past 120 s
    assert "a 1000000 x 1000000 latent grid needs about" in capsys.readouterr().err
    assert not (run / "figures").exists()
    model = fastvae.load(run)
    with pytest.raises(ConfigError, match="a 1000000 x 1000000 latent grid needs about"):
        explore.plot_latent_grid(model, (64, 64), n=10 ** 6)


def test_picture_arguments_that_cannot_fit_get_a_named_error(trained):
    """Grid dimensions outside the latent space (or the same one twice, or a
    negative one that NumPy would count from the end), a grid of 0, a centre
    of another length and an image shape of another size: ConfigError naming
    the argument, not an IndexError or a reshape failure."""
    model, data = trained                       # latent_dim 4, 16x16 images
    shape = data.image_shape
    for dims in [(0, 4), (2, 2), (-1, 0), ("a", 1)]:
        with pytest.raises(ConfigError, match="dims"):
            explore.plot_latent_grid(model, shape, n=3, dims=dims)
    with pytest.raises(ConfigError, match="n must be at least 1"):
        explore.latent_grid_codes(model, n=0)
    with pytest.raises(ConfigError, match="center must be one code of length 4"):
        explore.latent_grid_codes(model, n=3, center=np.zeros(3))
    for bad in [(10, 10), (16,), (16, 16, 0)]:
        with pytest.raises(ConfigError, match="image_shape"):
            explore.plot_samples(model, bad, n=4)
    # two channels (a conv model's input, say) are drawn side by side in gray: channel 0 left of channel 1
    img = np.arange(12) / 12.0                  # (H, W, C) = (2, 3, 2) channels last
    grid = explore.tile(img[None], (2, 3, 2), ncol=1)
    np.testing.assert_array_equal(grid, np.concatenate([img.reshape(2, 3, 2)[..., 0], img.reshape(2, 3, 2)[..., 1]], 1))
    # what fits: the last two dimensions in either order (right along dims[0], up along dims[1], top row first)
    Z = explore.latent_grid_codes(model, n=2, dims=(3, 2), spacing="even", center=np.full(4, 0.5))
    np.testing.assert_array_equal(Z, [[0.5, 0.5, 3.5, -2.5], [0.5, 0.5, 3.5, 3.5],
                                      [0.5, 0.5, -2.5, -2.5], [0.5, 0.5, -2.5, 3.5]])


def test_big_pictures_stay_within_memory(trained, monkeypatch):
    """A figure renders to at most MAX_FIGURE_PIXELS and MAX_FIGURE_SIDE
    pixels (the dpi drops, the layout stays); a latent grid whose decoded
    images would not fit in memory is refused before decoding (--grid 400 on
    MNIST took 24 GB and was killed by the OOM killer)."""
    from fastvae.training import memory
    from fastvae.explore.plots import MAX_FIGURE_PIXELS, MAX_FIGURE_SIDE, _figure
    assert _figure((6, 5)).dpi == 100
    for size in [(240, 240), (7000, 1.9), (600, 0.5)]:
        fig = _figure(size)
        w, h = fig.get_size_inches() * fig.dpi
        assert w * h <= MAX_FIGURE_PIXELS * (1 + 1e-9) and max(w, h) <= MAX_FIGURE_SIDE * (1 + 1e-9)
    model, data = trained                                  # 16 x 16 images: 256 pixels
    monkeypatch.setattr(memory, "host_available", lambda: 64 * 2 ** 20)      # pretend 64 MiB free
    explore.plot_latent_grid(model, data.image_shape, n=20)                  # 400 x 256 x 96 B = 9.4 MiB: fine
    with pytest.raises(ConfigError, match="a 60 x 60 latent grid needs about .* use a smaller grid"):
        explore.plot_latent_grid(model, data.image_shape, n=60)              # 84 MiB: refused


def test_pictures_of_nothing_are_refused_by_name(trained):
    """Zero counts, no images, and losses or labels of another length than the
    images: a named error (they raised ZeroDivisionError, IndexError or
    "need at least one array", or drew a figure from mismatched losses)."""
    from fastvae import DataError
    from fastvae.explore import plots
    model, data = trained
    X, shape = data.x_test[:6], data.image_shape
    for call, err, needle in [
            (lambda: plots.plot_samples(model, shape, n=0), ConfigError, "n must be at least 1"),
            (lambda: plots.plot_reconstructions(model, X, shape, n=0), ConfigError, "n must be at least 1"),
            (lambda: plots.plot_reconstructions(model, X[:0], shape), DataError, "0 given, at least 1 needed"),
            (lambda: explore.plot_best_worst(model, X, np.arange(6.0), shape, n=0), ConfigError, "n must be"),
            (lambda: explore.plot_best_worst(model, X, np.arange(5.0), shape, n=2), DataError, "5 losses for 6"),
            (lambda: explore.plot_traversals(model, shape, n_values=0), ConfigError, "n_values must be"),
            (lambda: explore.plot_latent_map(model, X[:0]), DataError, "0 given"),
            (lambda: explore.plot_latent_map(model, X, labels=[1, 2]), DataError, "2 labels for 6 images"),
            (lambda: explore.kl_per_dim(model, X[:0]), DataError, "0 given"),
            (lambda: explore.active_units(model, X[:0]), DataError, "0 given")]:
        with pytest.raises(err, match=needle):
            call()
    assert explore.kl_per_dim(model, X[:1]).shape == (4,) and explore.active_units(model, X[:1])[0] == 0


def test_gif_and_picture_files_that_cannot_be_written_are_refused_first(trained, tmp_path, monkeypatch):
    """--scale 1000 built 46 frames of 64,000^2 pixels until the OOM killer
    ended it at 24 GB; a .xyz picture name raised matplotlib's ValueError.
    Both are named errors now, before anything is drawn."""
    from fastvae.training import memory
    model, data = trained                       # 16 x 16 images
    frames = explore.interpolation_frames(model, data.x_test[0], data.x_test[1], steps=5)
    with pytest.raises(ConfigError, match="scale must be at least 1"):
        explore.save_gif(frames, data.image_shape, tmp_path / "a.gif", scale=0)
    with pytest.raises(ConfigError, match="a GIF holds at most 65535 a side: use scale=4095 or less"):
        explore.save_gif(frames, data.image_shape, tmp_path / "a.gif", scale=4096)
    monkeypatch.setattr(memory, "host_available", lambda: 64 * 2 ** 20)      # pretend 64 MiB free
    with pytest.raises(ConfigError, match="8 GIF frames of 4000 x 4000 pixels needs about"):
        explore.save_gif(frames, data.image_shape, tmp_path / "a.gif", scale=250)
    assert explore.save_gif(frames, data.image_shape, tmp_path / "a.gif", scale=2) == 8
    (tmp_path / "checkpoint.h5").write_bytes(b"precious")          # `--gif RUN/checkpoint.h5` replaced it
    with pytest.raises(ConfigError, match="an animation is written as .gif"):
        explore.save_gif(frames, data.image_shape, tmp_path / "checkpoint.h5")
    assert (tmp_path / "checkpoint.h5").read_bytes() == b"precious"
    with pytest.raises(ConfigError, match="1000000 interpolation frames needs about .* use fewer steps$"):
        explore.interpolation_frames(model, data.x_test[0], data.x_test[1], steps=1_000_000)     # 3.8 GiB
    assert not (tmp_path / "b.xyz").exists()
    with pytest.raises(ConfigError, match=r"cannot write a picture as \.xyz .* use one of .*png"):
        explore.plot_interpolation(model, data.x_test[0], data.x_test[1], data.image_shape, path=tmp_path / "b.xyz")


def test_evaluation_batches_are_bounded_by_their_work_buffers(tmp_path):
    """IWAE decoded 8192 rows at a time and evaluation took 1000 images
    whatever the net: the 64x64 conv net's IWAE peaked at 11.3 GB (k=1000,
    10 images), and a 256x256 conv run was refused at batch 4 for the 45 GiB
    of a 1000-image evaluation batch. Batches now hold at most 1 GiB of work
    buffers (the MLPs keep 1000 and 8192: their numbers do not change)."""
    import subprocess
    import sys
    from fastvae import ModelConfig, VAE
    mlp = VAE(ModelConfig(input_dim=784, hidden=[400], latent_dim=20))
    assert (mlp.rows_within(1000), mlp.rows_within(8192)) == (1000, 8192)
    conv = lambda side: VAE(ModelConfig(input_dim=side * side, image_shape=(side, side), arch="conv", latent_dim=4))
    assert conv(64).rows_within(8192) == 355 and conv(256).rows_within(1000) == 22
    code = ("import re\nhwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())"
            ".group(1)) / 1024\nimport numpy as np\nfrom fastvae import ModelConfig, VAE\n"
            "from fastvae.explore.metrics import iwae\n"
            "m = VAE(ModelConfig(input_dim=4096, image_shape=(64, 64), arch='conv', latent_dim=4), 'numpy', seed=0)\n"
            "x = np.random.default_rng(0).random((10, 4096)).astype(np.float32)\n"
            "b = hwm(); v = iwae(m, x, k=200); print('GROWTH_MB', hwm() - b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "GROWTH_MB" in out.stdout, out.stderr
    assert float(out.stdout.split("GROWTH_MB")[1]) < 1200          # 2,675 MB before (2,000 rows at once); ~290 now


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1), (6, 5, 3), (6, 5, 4)])
def test_gif_frames_of_every_channel_count(tmp_path, shape):
    """A model of 4-channel (RGBA) images ended `fastvae plot` in a
    traceback at the GIF ("Invalid mode for data type"); RGBA frames are
    drawn on white, as the PNG figures show them."""
    from PIL import Image
    from fastvae import explore
    D = int(np.prod(shape))
    frames = np.random.default_rng(0).random((3, D))
    if shape[-1] == 4:
        frames.reshape(3, *shape)[0, ..., 3] = 0.0          # the first frame fully transparent
    n = explore.save_gif(frames, shape, tmp_path / "a.gif", scale=2, bounce=False)
    assert n == 3
    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 3 and im.size == (10, 12)
        first = np.asarray(im.convert("RGB"))
    if shape[-1] == 4:
        assert (first == 255).all()


def test_exploring_functions_name_bad_arguments_and_take_text_labels(trained):
    """Found by calling the exploring functions with odd arguments: text
    labels on the latent map ended in numpy's UFuncTypeError; max_points=0.5,
    max_dims="x", span="x" and threshold=None in TypeErrors; two images of
    other sizes to interpolate in "all input arrays must have the same
    shape". Text labels are class names now (numbered in sorted order, on
    the colour bar); the rest are ConfigErrors or DataErrors naming them."""
    model, data = trained
    X = data.x_test[:12]
    names = np.array(["square", "heart", "ellipse"])[np.arange(12) % 3]
    fig = explore.plot_latent_map(model, X, names)
    bar = fig.axes[1]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["ellipse", "heart", "square"]
    for call, err, needle in (
            (lambda: explore.plot_latent_map(model, X, max_points=0.5), ConfigError, "max_points must be an integer"),
            (lambda: explore.plot_traversals(model, (16, 16), X=X, max_dims="x"), ConfigError,
             "max_dims must be an integer"),
            (lambda: explore.plot_traversals(model, (16, 16), X=X, max_dims=0), ConfigError, "max_dims must be at least"),
            (lambda: explore.plot_traversals(model, (16, 16), X=X, span="x"), ConfigError, "span must be a number"),
            (lambda: explore.active_units(model, X, threshold=None), ConfigError, "threshold must be a number"),
            (lambda: explore.interpolation_frames(model, X[0], X[1][:5]), fastvae.DataError,
             "image b have 5 features")):
        with pytest.raises(err, match=needle):
            call()


def test_grid_helpers_refuse_counts_they_cannot_use(trained, monkeypatch):
    """grid_values(2.5) was a TypeError from range(); latent_grid_codes(model,
    10**6) looped over 10^12 codes in Python (never ended) where the figure's
    check refuses the grid at once. Both name the count now."""
    from fastvae.training import memory
    model, _ = trained
    with pytest.raises(ConfigError, match="n must be an integer, got 2.5"):
        explore.grid_values(2.5)
    monkeypatch.setattr(memory, "host_available", lambda: 64 * 2 ** 20)      # pretend 64 MiB free
    with pytest.raises(ConfigError, match="a grid of 1000000000000 values needs about"):  # a list of 10^12 floats: killed
        explore.grid_values(10 ** 12)
    with pytest.raises(ConfigError, match="a 1000000 x 1000000 grid of codes needs about"):
        explore.latent_grid_codes(model, 10 ** 6)
    assert explore.latent_grid_codes(model, 20).shape == (400, model.config.latent_dim)


def test_a_loss_histogram_leaves_out_losses_that_are_not_finite(tmp_path):
    """An image whose -ELBO overflows (exp(logvar) past float32's range on
    one test image) made the histogram a ValueError traceback ("supplied
    range of [...] is not finite"), so `fastvae plot` failed on such a model;
    the finite ones are drawn and the others counted in the title."""
    import matplotlib.pyplot as plt
    fig = explore.plot_loss_histogram(np.array([1.0, 2.0, np.inf, np.nan, 3.0]), marks={"worst": np.inf})
    title = fig.axes[0].get_title()
    assert "over 3 images (mean 2.00); 2 not finite, left out" in title, title
    plt.close(fig)
    with pytest.raises(fastvae.DataError, match="no finite loss to draw"):
        explore.plot_loss_histogram(np.array([np.nan, np.inf]))


def test_picture_helpers_name_counts_they_cannot_use(tmp_path):
    """tile(ncol=0) was a ZeroDivisionError, save_gif(duration_ms=nan) a
    ValueError from Pillow's int conversion; each is a ConfigError naming it."""
    from fastvae.explore.plots import tile
    x = np.zeros((4, 16))
    with pytest.raises(ConfigError, match="ncol must be at least 1, got 0"):
        tile(x, (4, 4), 0)
    with pytest.raises(ConfigError, match="pad must be at least 0, got -1"):
        tile(x, (4, 4), 2, pad=-1)
    for bad in (float("nan"), 0, -5):
        with pytest.raises(ConfigError, match="duration_ms must be a finite positive number"):
            explore.save_gif(x, (4, 4), str(tmp_path / "a.gif"), duration_ms=bad)


def test_library_helpers_name_arguments_of_the_wrong_kind(trained, tmp_path):
    """Found by calling every public exploring helper with None, numbers,
    text, NaN, a 2-d array and 10^12: a traversal order of 0 was "'int'
    object is not iterable", a centre of 3 numbers for 4 latents an
    IndexError, a KL value of 3 "len() of unsized object", marks=[1, 2] an
    AttributeError, 10^12 traversal values a MemoryError, an image shape of
    None a TypeError, MIG's 10^12 bins a 7 TiB allocation. Each is now a
    ConfigError naming the argument, before any work."""
    from fastvae.explore import latent
    from fastvae.explore import plots
    model, data = trained                       # latent_dim 4, 16x16 images
    X, z = data.x_test[:6], np.zeros(4)
    cases = [
        (lambda: latent.traversal_codes(model, z, order=0), "order must list latent dimensions in 0..3"),
        (lambda: latent.traversal_codes(model, z, order=[4]), "order must list latent dimensions in 0..3"),
        (lambda: latent.traversal_codes(model, np.zeros(3)), "center must be one code of length 4"),
        (lambda: latent.traversal_codes(model, [0, 0, np.nan, 0]), "center holds NaN or infinite values"),
        (lambda: latent.traversal_codes(model, z, n_values=10 ** 12), "traversal codes needs about"),
        (lambda: explore.plot_traversals(model, (16, 16), center="x"), "center must be one code of length 4"),
        (lambda: explore.plot_traversals(model, None, X=X), "image_shape None does not fit"),
        (lambda: latent.interpolate_codes(z, np.zeros(3), 4), r"zb must be a vector of real numbers of shape \(4,\)"),
        (lambda: latent.interpolate_codes(None, z, 4), "za must be a vector of real numbers, got None"),
        (lambda: latent.interpolate_codes(z, z, 10 ** 12), "interpolated codes needs about"),
        (lambda: latent.interpolate_codes(z, z, 4, ["linear"]), "unknown interpolation"),
        (lambda: latent.grid_values(3, "even", float("nan")), "span must be"),
        (lambda: latent.grid_values(3, np.zeros(2)), "unknown grid spacing"),
        (lambda: latent.latent_grid_codes(model, 3, plane=5), r"plane must be \(mean \(L,\), axes \(2, L\)\)"),
        (lambda: latent.latent_grid_codes(model, 3, plane=(z, np.zeros((3, 4)))),
         r"plane axes must be a 2-d array of real numbers of shape \(2, 4\)"),
        (lambda: latent.pca_plane(np.zeros((0, 4))), "codes holds no rows"),
        (lambda: latent.pca_plane("x"), "codes must be a 2-d array of real numbers"),
        (lambda: explore.best_and_worst(np.arange(5.0), 2.5), "n must be an integer"),
        (lambda: explore.best_and_worst(3, 2), "losses must be a vector of real numbers, got 3"),
        (lambda: explore.plot_kl_per_dim(3), "kl must be a vector of real numbers, got 3"),
        (lambda: explore.plot_kl_per_dim(np.ones(4), np.ones(3)), r"variances must be .* of shape \(4,\)"),
        (lambda: explore.plot_kl_per_dim(np.ones(4), threshold=None), "threshold must be a number"),
        (lambda: explore.plot_kl_per_dim(np.ones(4), flows=-1), "flows must be at least 0"),
        (lambda: explore.plot_loss_histogram(np.arange(5.0), marks=[1, 2]), r"marks must be \{label: loss\}"),
        (lambda: explore.plot_loss_histogram(["a"]), "losses must be a vector of real numbers"),
        (lambda: explore.plot_best_worst(model, X, None, (16, 16)), "losses must be a vector of real numbers"),
        (lambda: explore.plot_latent_map(model, X, labels=3), r"labels must be one value per image \(N,\)"),
        (lambda: plots.plot_loss(5), "history must be the per-epoch rows"),
        (lambda: plots.tile(np.ones((2, 4)), (2, 2), 1, pad=10 ** 12), "a tiled picture of .* needs about"),
        (lambda: explore.mig(np.zeros((5, 2)), np.zeros((4, 1))), r"factors must be .* of shape \(5, \.\.\.\)"),
        (lambda: explore.mig(np.zeros((5, 2)), np.zeros((5, 1)), bins=10 ** 12), "bins must be at most 10\\^6"),
        (lambda: explore.mig(None, np.zeros((5, 1))), "codes must be a 2-d array of real numbers, got None"),
    ]
    for call, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            call()
    # what fits still works: a traversal in a given order, MIG on whole-number factors given as floats
    Z = latent.traversal_codes(model, np.full(4, 0.5), n_values=3, span=1.0, order=[2])
    np.testing.assert_array_equal(Z, [[0.5, 0.5, -1.0, 0.5], [0.5, 0.5, 0.0, 0.5], [0.5, 0.5, 1.0, 0.5]])
    codes = np.repeat(np.eye(2), 10, axis=0) + np.linspace(0, 0.01, 20)[:, None]
    factors = np.repeat([0.0, 1.0], 10)[:, None]
    assert explore.mig(codes, factors)["mig"] == pytest.approx(explore.mig(codes, factors.astype(int))["mig"])


def test_mig_points_come_from_the_generator_or_the_training_split():
    from types import SimpleNamespace
    from fastvae.cli import _mig_points
    from fastvae.datasets.dataset import Dataset
    model = SimpleNamespace(config=SimpleNamespace(image_shape=(32, 32)))
    sprites = datasets.make_sprites(40, seed=0, size=32)
    x, f, source = _mig_points(model, sprites, 300, 2)
    assert x.shape == (300, 32 * 32) and f.shape == (300, 5) and source == "sprites generator, seed 1000002"
    again = datasets.make_sprites(300, seed=10 ** 6 + 2, size=32, test_fraction=0)
    np.testing.assert_array_equal(x, again.x_train)
    r = np.random.default_rng(0)
    other = Dataset("npz", r.random((50, 4)), None, r.random((10, 4)), None, (2, 2),
                    factors_train=r.integers(0, 3, (50, 2)), factors_test=r.integers(0, 3, (10, 2)))
    x, f, source = _mig_points(model, other, 20, 0)
    np.testing.assert_array_equal(x, other.x_train[:20])
    assert source == "train split" and len(f) == 20
    assert _mig_points(model, Dataset("npz", r.random((5, 4)), None, None, None, (2, 2)), 20, 0) is None
