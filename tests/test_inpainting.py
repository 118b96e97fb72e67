"""Inpainting (fastvae.explore.inpainting, `fastvae inpaint`): masks, the
three methods against independent computations, observed pixels untouched,
scores and baselines, the command and its errors."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from fastvae import ConfigError, DataError, ModelConfig, VAE
from fastvae.explore import inpainting as I

from conftest import fv

SHAPE = (16, 16)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder of a tiny MLP on 100 of the built-in 64x64 sprites."""
    base = tmp_path_factory.mktemp("inp")
    fv("train", "--n-sprites", "100", "--hidden", "8", "--latent", "2", "--epochs", "1", "--batch-size", "30",
       "--backend", "numpy", "--out", "run", "--no-progress", cwd=base)
    return base / "run"


def _model64(posterior="gaussian", likelihood="bernoulli", seed=0):
    kw = dict(posterior="iaf", flows=2, flow_hidden=6) if posterior == "iaf" else {}
    cfg = ModelConfig(input_dim=256, hidden=[12], latent_dim=3, dtype="float64", image_shape=SHAPE,
                      likelihood=likelihood, **({"sigma": 0.3} if likelihood == "gaussian" else {}), **kw)
    return VAE(cfg, "numpy", seed=seed)


def _images(n=5, seed=1):
    return np.random.default_rng(seed).random((n, 256))


# ---------------------------------------------------------------- masks
def test_named_masks_hide_what_they_say():
    H, W = SHAPE
    g = lambda spec: I.make_mask(spec, SHAPE).reshape(H, W)                      # noqa: E731
    assert g("top")[:8].all() and not g("top")[8:].any()
    assert g("bottom")[8:].all() and not g("bottom")[:8].any()
    assert g("left")[:, :8].all() and not g("left")[:, 8:].any()
    assert g("right")[:, 8:].all() and not g("right")[:, :8].any()
    c = g("center")
    assert c.sum() == 64 and c[4:12, 4:12].all()
    assert g("center:0.25").sum() == 16
    b = g("box:1,2,4,7")
    assert b.sum() == 15 and b[1:4, 2:7].all()
    r = I.make_mask("random:0.5", SHAPE, seed=3)
    assert abs(r.mean() - 0.5) < 0.1 and np.array_equal(r, I.make_mask("random:0.5", SHAPE, seed=3))
    assert not np.array_equal(r, I.make_mask("random:0.5", SHAPE, seed=4))
    rgb = I.make_mask("bottom", (16, 16, 3))
    assert rgb.shape == (768,) and np.array_equal(rgb.reshape(16, 16, 3)[..., 0], g("bottom"))


@pytest.mark.parametrize("spec,needle", [
    ("middle", "unknown mask"), ("random", "say the fraction"), ("random:1.5", "between 0 and 1"),
    ("center:0", "between 0 and 1"), ("box:0,0,20,4", "inside the 16 x 16 image"), ("box:1,2,3", "four whole"),
    ("box:0,0,16,16", "hides every pixel"), ("random:0.0001", "hides no pixel")])
def test_bad_masks_are_config_errors(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        I.make_mask(spec, SHAPE)


def test_a_mask_file_white_is_missing_and_must_match_the_images(tmp_path):
    a = np.zeros(SHAPE, np.uint8)
    a[:5, :] = 255
    Image.fromarray(a).save(tmp_path / "m.png")
    m = I.make_mask(str(tmp_path / "m.png"), SHAPE).reshape(SHAPE)
    assert m[:5].all() and not m[5:].any()
    Image.fromarray(np.zeros((8, 8), np.uint8) + 255).save(tmp_path / "small.png")
    with pytest.raises(ConfigError, match="8 x 8 pixels but the images are 16 x 16"):
        I.make_mask(str(tmp_path / "small.png"), SHAPE)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="is not an image"):
        I.make_mask(str(tmp_path / "notes.txt"), SHAPE)


# ---------------------------------------------------------------- the methods
@pytest.mark.parametrize("method", I.METHODS)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_observed_pixels_are_never_changed_and_fills_are_seeded(method, likelihood):
    model, x = _model64(likelihood=likelihood), _images()
    mask = I.make_mask("center", SHAPE)
    f = I.inpaint(model, x, mask, method=method, steps=6, samples=7, seed=5)
    assert f.shape == x.shape and np.array_equal(f[:, ~mask], x[:, ~mask])
    assert np.isfinite(f).all() and (f[:, mask] >= 0).all() and (f[:, mask] <= 1).all()
    assert not np.allclose(f[:, mask], x[:, mask])                           # something was filled in
    np.testing.assert_array_equal(f, I.inpaint(model, x, mask, method=method, steps=6, samples=7, seed=5))
    assert not np.array_equal(f, I.inpaint(model, x, mask, method=method, steps=6, samples=7, seed=6))


def test_iw_is_the_miwae_single_imputation_written_out():
    """An independent float64 transcription of Mattei & Frellsen 2019, eqs.
    9-10, on the same draws: z_k = mu + std eps_k from q(z | x~), w_k ∝
    p(x_obs|z_k) p(z_k) / q(z_k|x~), fill = sum_k w~_k E[x_mis|z_k]."""
    model, x = _model64(), _images(3)
    mask = I.make_mask("bottom", SHAPE)
    K, L = 9, 3
    ours = I.inpaint(model, x, mask, method="iw", samples=K, seed=2)
    start = np.where(mask, ((x * ~mask).sum(1) / (~mask).sum())[:, None], x)
    eps = np.random.Generator(np.random.PCG64([2, 42, 0])).standard_normal((3 * K, L))
    mu, logvar = model.encode(start)
    std = np.exp(0.5 * logvar)
    z = np.repeat(mu, K, 0) + np.repeat(std, K, 0) * eps
    logits = np.log(np.clip(model.decode(z), 1e-300, None)) - np.log(np.clip(1 - model.decode(z), 1e-300, None))
    xr = np.repeat(x, K, 0)
    logp_obs = -((np.logaddexp(0, logits) - xr * logits) * ~mask).sum(1)
    logp_z = -0.5 * (z * z).sum(1) - 0.5 * L * math.log(2 * math.pi)
    logq = -0.5 * (eps * eps + np.repeat(logvar, K, 0) + math.log(2 * math.pi)).sum(1)
    logw = (logp_obs + logp_z - logq).reshape(3, K)
    w = np.exp(logw - logw.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    ref = np.einsum("nk,nkd->nd", w, model.decode(z).reshape(3, K, -1))
    np.testing.assert_allclose(ours[:, mask], ref[:, mask], rtol=1e-9, atol=1e-12)


def test_gibbs_is_pseudo_gibbs_written_out():
    """Rezende et al. 2014, sec. 5.2: z ~ q(z | x), x_mis = E[x_mis | z], repeated."""
    model, x = _model64(), _images(2)
    mask = I.make_mask("left", SHAPE)
    ours = I.inpaint(model, x, mask, method="gibbs", steps=3, seed=4)
    rng = np.random.Generator(np.random.PCG64([4, 42, 0]))
    cur = np.where(mask, ((x * ~mask).sum(1) / (~mask).sum())[:, None], x)
    for _ in range(3):
        mu, logvar = model.encode(cur)
        z = mu + np.exp(0.5 * logvar) * rng.standard_normal((2, 3))
        cur = np.where(mask, model.decode(z), x)
    np.testing.assert_allclose(ours, cur, rtol=1e-12, atol=1e-14)


def test_mwg_is_metropolis_within_gibbs_written_out():
    """Mattei & Frellsen 2018, Algorithm 1, transcribed in float64 on the same
    draws: propose z' ~ q(z | x), accept when log u < log [p(x_obs|z') p(z')
    q(z|x)] - log [p(x_obs|z) p(z) q(z'|x)], draw x_mis ~ p(x_mis | z); the
    fill is the mean of E[x_mis | z] over the second half of the chain."""
    model, x = _model64(), _images(4)
    mask = I.make_mask("top", SHAPE)
    steps, B, L = 6, 4, 3
    ours = I.inpaint(model, x, mask, method="mwg", steps=steps, seed=3)
    rng = np.random.Generator(np.random.PCG64([3, 42, 0]))
    obs = ~mask
    logq = lambda z, mu, lv: -0.5 * (((z - mu) ** 2) * np.exp(-lv) + lv + math.log(2 * math.pi)).sum(1)  # noqa
    def target(z):                                                              # noqa: E306
        p = model.decode(z)
        return (np.where(obs, x * np.log(p) + (1 - x) * np.log1p(-p), 0.0).sum(1)
                - 0.5 * (z * z).sum(1) - 0.5 * L * math.log(2 * math.pi))
    cur = np.where(mask, ((x * obs).sum(1) / obs.sum())[:, None], x)
    mu, lv = model.encode(cur)
    z = mu + np.exp(0.5 * lv) * rng.standard_normal((B, L))
    total, accepted = np.zeros_like(x), 0
    for t in range(1, steps + 1):
        mu, lv = model.encode(cur)
        prop = mu + np.exp(0.5 * lv) * rng.standard_normal((B, L))
        ratio = target(prop) + logq(z, mu, lv) - target(z) - logq(prop, mu, lv)
        take = np.log(rng.random(B)) < ratio
        z[take] = prop[take]
        accepted += take.sum()
        mean = model.decode(z)
        cur = np.where(mask, (rng.random(mean.shape) < mean).astype(float), x)
        if t > steps // 2:
            total += mean
    assert 0 < accepted < steps * B                   # both branches of the test were taken
    np.testing.assert_allclose(ours[:, mask], (total / (steps - steps // 2))[:, mask], rtol=1e-9, atol=1e-12)


def test_mwg_refuses_a_flow_posterior_where_iw_and_gibbs_run():
    x, mask = _images(2), I.make_mask("top", SHAPE)
    flow = _model64("iaf")
    with pytest.raises(ConfigError, match="use method='iw' or method='gibbs'"):
        I.inpaint(flow, x, mask, method="mwg")
    for method in ("iw", "gibbs"):
        f = I.inpaint(flow, x, mask, method=method, steps=3, samples=4)
        assert np.array_equal(f[:, ~mask], x[:, ~mask])


def test_bad_arguments_are_config_errors():
    model, x = _model64(), _images(2)
    with pytest.raises(ConfigError, match="unknown inpainting method"):
        I.inpaint(model, x, I.make_mask("top", SHAPE), method="magic")
    with pytest.raises(ConfigError, match="shape"):
        I.inpaint(model, x, np.ones(10, bool))
    with pytest.raises(ConfigError, match="hide some pixels and keep some"):
        I.inpaint(model, x, np.ones((2, 256), bool))
    with pytest.raises(ConfigError, match="steps"):
        I.inpaint(model, x, I.make_mask("top", SHAPE), steps=0)


def test_backends_agree():
    model, x = _model64(), _images(3)
    cfg = model.config.replace(dtype="float64")
    nb = VAE(cfg, "numba", seed=0)
    mask = I.make_mask("center", SHAPE)
    for method in I.METHODS:
        a = I.inpaint(model, x, mask, method=method, steps=4, samples=5)
        b = I.inpaint(nb, x, mask, method=method, steps=4, samples=5)
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- scores
def test_scores_and_baselines():
    model, x = _model64(), _images(4)
    mask = I.make_mask("right", SHAPE)
    xt = np.random.default_rng(9).random((50, 256))
    xt[17] = np.where(mask, 0.3, x[2])                          # image 2's observed pixels, exactly
    near = I.nearest_fill(x, np.broadcast_to(mask, x.shape), xt, batch_size=7)
    assert np.array_equal(near[2, mask], np.full(mask.sum(), 0.3))
    for i in range(4):                                          # brute force
        d = (((xt - x[i]) ** 2) * ~mask).sum(1)
        assert np.array_equal(near[i, mask], xt[d.argmin(), mask])
    s = I.scores(model, x, mask, x, x_train=xt)                 # the truth as its own fill
    assert s["n"] == 4 and s["fill"]["mse"] == 0.0
    p = np.clip(x[:, mask], 1e-6, 1 - 1e-6)
    expect = -(x[:, mask] * np.log(p) + (1 - x[:, mask]) * np.log(1 - p)).sum(1).mean()
    assert math.isclose(s["fill"]["nll"], expect, rel_tol=1e-9)
    assert s["mean_image"]["mse"] > 0 and s["nearest_image"]["mse"] > 0


# ---------------------------------------------------------------- the command
def test_the_command_fills_scores_and_writes_its_pictures(run, tmp_path):
    p = fv("inpaint", run, "0", "3", "--mask", "bottom", "--method", "gibbs", "--steps", "5", "--json",
           "--out", "pics", cwd=tmp_path, check=False)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["n"] == 2 and set(res) >= {"fill", "mean_image", "nearest_image", "method", "mask"}
    assert sorted(os.listdir(tmp_path / "pics")) == ["inpaint_gibbs_0.gif", "inpaint_gibbs_0.png",
                                                     "inpaint_gibbs_3.gif", "inpaint_gibbs_3.png"]


@pytest.mark.parametrize("args,needle", [
    (["0", "--mask", "box:0,0,64,64"], "hides every pixel"),
    (["0", "--mask", "nowhere"], "unknown mask"),
    (["999999", "--mask", "top"], "outside the test split"),
    (["0", "--mask", "top", "--method", "mwg", "--steps", "0"], "--steps")])
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, args, needle):
    p = fv("inpaint", run, *args, "--out", "pics", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "pics").exists()


def test_a_mask_file_of_another_size_is_refused_by_the_command(run, tmp_path):
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(tmp_path / "m.png")
    p = fv("inpaint", run, "0", "--mask", "m.png", "--out", "pics", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "28 x 28 pixels but the images are 64 x 64" in p.stderr
    assert not (tmp_path / "pics").exists()


def test_a_mask_path_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    """The mask file is untrusted input: read through the safe reader, which
    never blocks on a FIFO (opening one with Pillow directly waits forever)."""
    os.mkfifo(tmp_path / "m.png")
    with pytest.raises(DataError, match="is not an image"):
        I.make_mask(str(tmp_path / "m.png"), SHAPE)
