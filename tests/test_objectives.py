"""The IWAE objective (issue 15, first part): gradient against float64 central
differences through the sampler, loss and every gradient block against a
PyTorch autograd twin, the bound's properties, and training with it."""

import math

import numpy as np
import pytest

import fastvae
from fastvae import ConfigError, ModelConfig, TrainConfig, VAE
from fastvae.objectives.iwae import IWAEObjective

from conftest import assert_grad, numgrad, randomize_flows, tiny_trainer
from cuda_emu import emu_param, make_backend
from test_conv import small_cfg

CFGS = {
    "mlp-relu-bernoulli": ModelConfig(input_dim=12, hidden=[7], latent_dim=3, dtype="float64"),
    "mlp-tanh-gaussian": ModelConfig(input_dim=10, hidden=[6, 5], latent_dim=2, activation="tanh",
                                     likelihood="gaussian", sigma=0.7, dtype="float64"),
    "conv-small": small_cfg(),
}
IAF = ModelConfig(input_dim=12, hidden=[7], latent_dim=3, dtype="float64", posterior="iaf", flows=2, flow_hidden=5)
IWAE_CFGS = {**CFGS, "mlp-iaf": IAF}       # IWAE through inverse autoregressive flow steps too


def _setup(cfg, B=3, K=4, seed=0):
    model = randomize_flows(VAE(cfg, "numpy", seed=seed), seed)
    r = np.random.default_rng(seed + 1)
    x = r.random((B, cfg.input_dim))
    obj = IWAEObjective(model, K)
    eps = r.normal(size=obj.eps_shape(B))
    return model, obj, x, eps


def _loss(model, obj, x, eps):
    """-L_K averaged over images, from an independent NumPy forward (no
    backward): the model's own sampler and flow steps on the repeated heads,
    log w = -nll - (log q(z|x) - log p(z)) of each sample."""
    B, K, L = x.shape[0], obj.k, model.config.latent_dim
    enc = model.workspace(B)
    model.encode_into(enc, x)
    head = enc.head.copy()                           # [mu | logvar], and the flow steps' context h if any
    xr = np.repeat(x, K, axis=0)
    ws = model.forward(xr, np.zeros((B * K, L)))     # a workspace of B K rows; its buffers are refilled below
    z = model.sample_posterior_into(ws, np.repeat(head, K, axis=0), eps, sampled_kl=True)
    model.decode_into(ws, z)
    nll = model.nll_into(ws, xr).copy()
    logw = -(nll + ws.kl).reshape(B, K)
    top = logw.max(1)
    return float(-(top + np.log(np.exp(logw - top[:, None]).sum(1)) - math.log(K)).mean())


@pytest.mark.parametrize("name", list(IWAE_CFGS))
def test_iwae_gradient_matches_central_differences(name):
    model, obj, x, eps = _setup(IWAE_CFGS[name])
    total, _ = obj.loss_and_grad(x, eps)
    ana = model.grads.copy()
    f = lambda: _loss(model, obj, x, eps)
    assert np.isclose(float(total) / x.shape[0], f(), rtol=1e-12)
    num = numgrad(f, model.params)
    assert_grad(ana, num, f())


@pytest.mark.parametrize("name", ["mlp-relu-bernoulli", "mlp-tanh-gaussian", "conv-small", "mlp-iaf"])
def test_iwae_matches_pytorch_autograd(name):
    torch = pytest.importorskip("torch")
    from fastvae.bench import torch_twin as torch_ref
    cfg = IWAE_CFGS[name]
    model, obj, x, eps = _setup(cfg, B=4, K=3, seed=2)
    total, _ = obj.loss_and_grad(x, eps)
    tm = torch_ref.build(cfg)
    torch_ref.copy_from(tm, model)
    B, K = x.shape[0], obj.k
    xt = torch.tensor(np.repeat(x, K, axis=0))
    et = torch.tensor(eps)
    out, mu, logvar, log_sig = tm(xt, et)
    z = tm.z                                                          # after the flow steps, if any
    rec, _ = tm.losses(xt, et)
    log_det = log_sig if cfg.posterior == "iaf" else 0.0              # sum of the steps' log sig
    logw = (-rec - 0.5 * (z ** 2).sum(1) + 0.5 * (et ** 2).sum(1) + 0.5 * logvar.sum(1) + log_det).view(B, K)
    loss = -(torch.logsumexp(logw, 1) - math.log(K)).mean()
    loss.backward()
    assert abs(float(total) / B - loss.item()) <= 1e-10 * abs(loss.item())
    ours = {e.name: model.layout.view(model.grads, e.name) for e in model.layout}
    for k, g in torch_ref.grads_by_name(tm).items():
        err = np.max(np.abs(ours[k] - g)) / max(np.max(np.abs(g)), 1e-30)
        assert err < 1e-10, (k, err)


@pytest.mark.parametrize("name", ["mlp-relu-bernoulli", "mlp-iaf"])
def test_iwae_evaluation_is_the_training_objectives_forward(name):
    """metrics.iwae scores -log p(x) with IWAEObjective.log_weights: on the
    same noise (its stream PCG64([seed, 3]), one block of all k samples) it is
    the per-image -L_K the training loss sums, and the independent forward."""
    from fastvae.explore import metrics
    model, obj, x, _ = _setup(IWAE_CFGS[name], B=3, K=5)
    eps = np.random.Generator(np.random.PCG64([7, 3])).standard_normal((3 * 5, model.config.latent_dim))
    ours = metrics.iwae(model, x, k=5, seed=7)
    total, _ = obj.loss_and_grad(x, eps)
    assert np.isclose(ours.sum(), float(total), rtol=1e-12)
    assert np.isclose(ours.mean(), _loss(model, obj, x, eps), rtol=1e-12)


def test_bound_properties():
    """On the same samples: the bound lies above the mean log-weight (Jensen),
    and K = 1 is the single-sample ELBO with the KL estimated by sampling."""
    model, obj, x, eps = _setup(CFGS["mlp-relu-bernoulli"], B=5, K=6)
    total, _ = obj.loss_and_grad(x, eps)
    one = IWAEObjective(model, 1)
    per_sample = [float(one.loss_and_grad(np.repeat(x[i:i + 1], 6, axis=0), eps[6 * i:6 * i + 6])[0]) / 6
                  for i in range(5)]                           # mean over samples of -log w
    assert float(total) / 5 <= np.mean(per_sample) + 1e-12


def test_bad_k_and_training_with_iwae(tmp_path):
    with pytest.raises(ConfigError, match="iwae_k"):
        TrainConfig(objective="iwae", iwae_k=0)
    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(objective="vamp")
    straight = tiny_trainer(tmp_path / "a", epochs=2, objective="iwae", iwae_k=3)
    straight.fit(pictures=False)
    t = tiny_trainer(tmp_path / "b", epochs=1, objective="iwae", iwae_k=3)
    t.fit(pictures=False)
    r = fastvae.Trainer.from_checkpoint(tmp_path / "b" / "checkpoint.h5", epochs=2, dataset=t.data, progress=False)
    assert r.train_config.objective == "iwae" and r.train_config.iwae_k == 3
    r.fit(pictures=False)
    np.testing.assert_array_equal(r.model.get_flat_params(), straight.model.get_flat_params())
    h = straight.history
    assert h[1]["train_neg_elbo"] < h[0]["train_neg_elbo"]


# ------------------------------------------------------------------ beta-TCVAE
from fastvae.objectives.btcvae import BetaTCVAEObjective  # noqa: E402


def _paper_log_weights(estimator, B, N):
    """Chen et al. 2018, Appendix C, written out for the tests: MWS 1/(N B)
    everywhere; MSS 1/N for the image's own posterior, (N - B + 1)/(N (B - 1))
    for the next one (cyclically), 1/(B - 1) for the others."""
    if estimator == "mws":
        return np.full((B, B), -math.log(N * B))
    w = np.empty((B, B))
    for i in range(B):
        for j in range(B):
            w[i, j] = 1 / N if j == i else (N - B + 1) / (N * (B - 1)) if j == (i + 1) % B else 1 / (B - 1)
    return np.log(w)


def _tc_loss_reference(model, x, eps, beta, N, estimator="mws", gamma=1.0):
    """Per-batch mean beta-TCVAE loss by explicit loops over (i, j, d) (Chen et al. 2018)."""
    B, L = x.shape[0], model.config.latent_dim
    ws = model.forward(x, eps)
    mu, lv, z, nll = ws.mu.copy(), ws.logvar.copy(), ws.z.copy(), ws.nll.copy()
    logw = _paper_log_weights(estimator, B, N)
    lse = lambda a: a.max() + math.log(np.exp(a - a.max()).sum())
    lq = np.empty((B, B, L))
    for i in range(B):
        for j in range(B):
            for d in range(L):
                lq[i, j, d] = -0.5 * ((z[i, d] - mu[j, d]) ** 2 / math.exp(lv[j, d]) + lv[j, d] + math.log(2 * math.pi))
    total = 0.0
    for i in range(B):
        log_qzx = lq[i, i].sum()
        log_qz = lse(lq[i].sum(1) + logw[i])
        log_qzd = sum(lse(lq[i, :, d] + logw[i]) for d in range(L))
        log_pz = -0.5 * (z[i] ** 2 + math.log(2 * math.pi)).sum()
        total += nll[i] + (log_qzx - log_qz) + beta * (log_qz - log_qzd) + gamma * (log_qzd - log_pz)
    return total / B


def test_log_weights_are_the_papers():
    from fastvae.objectives.btcvae import log_weights
    for est in ("mws", "mss"):
        for B, N in ((2, 2), (5, 9), (7, 1000)):
            np.testing.assert_allclose(log_weights(est, B, N), _paper_log_weights(est, B, N), rtol=1e-15)
            assert np.allclose(np.exp(log_weights(est, B, N)).sum(1), 1.0 / N if est == "mws" else 1.0)
    with pytest.raises(ConfigError, match="batch of 2 or more"):
        log_weights("mss", 1, 10)
    with pytest.raises(ConfigError, match="from a dataset of N"):
        log_weights("mws", 11, 10)
    with pytest.raises(ConfigError, match="unknown beta-TCVAE estimator 'x'"):
        log_weights("x", 3, 10)


@pytest.mark.parametrize("name", list(CFGS))
@pytest.mark.parametrize("beta,estimator,gamma", [(1.0, "mws", 1.0), (6.0, "mws", 1.0), (6.0, "mss", 1.0),
                                                  (4.0, "mss", 0.3)])
def test_btcvae_gradient_matches_central_differences(name, beta, estimator, gamma):
    cfg = CFGS[name]
    model = VAE(cfg, "numpy", seed=3)
    r = np.random.default_rng(4)
    B = 5
    x, eps = r.random((B, cfg.input_dim)), r.normal(size=(B, cfg.latent_dim))
    obj = BetaTCVAEObjective(model, n_train=1000, estimator=estimator, dwkl_warmup=1.0)
    obj.set_time(gamma - 0.05)                  # gamma = min(1, 0.05 + epoch / warm-up)
    assert obj.gamma == pytest.approx(gamma)
    recon, kl = obj.loss_and_grad(x, eps, beta)
    ana = model.grads.copy()
    f = lambda: _tc_loss_reference(model, x, eps, beta, 1000, estimator, obj.gamma)
    assert np.isclose(float(obj.last_terms["loss"]) / B, f(), rtol=1e-12)
    if beta == 1.0:       # beta 1: MI + TC + DWKL is the sampled KL, the plain VAE's loss in expectation
        assert np.isclose(float(recon + kl) / B, f(), rtol=1e-12)
    num = numgrad(f, model.params)
    assert_grad(ana, num, f())


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_btcvae_matches_pytorch_autograd(estimator):
    torch = pytest.importorskip("torch")
    from fastvae.bench import torch_twin as torch_ref
    cfg, beta, N, B, gamma = CFGS["mlp-tanh-gaussian"], 6.0, 500, 6, 0.55
    model = VAE(cfg, "numpy", seed=5)
    r = np.random.default_rng(6)
    x, eps = r.random((B, cfg.input_dim)), r.normal(size=(B, cfg.latent_dim))
    obj = BetaTCVAEObjective(model, n_train=N, estimator=estimator, dwkl_warmup=2.0)
    obj.set_time(1.0)
    obj.loss_and_grad(x, eps, beta)
    tm = torch_ref.build(cfg)
    torch_ref.copy_from(tm, model)
    xt, et = torch.tensor(x), torch.tensor(eps)
    out, mu, lv, _ = tm(xt, et)
    z = mu + torch.exp(0.5 * lv) * et
    rec, _ = tm.losses(xt, et)
    logw = torch.tensor(_paper_log_weights(estimator, B, N))
    lq = -0.5 * ((z[:, None] - mu[None]) ** 2 / lv.exp()[None] + lv[None] + math.log(2 * math.pi))
    log_qzx = torch.diagonal(lq.sum(2))
    log_qz = torch.logsumexp(lq.sum(2) + logw, 1)
    log_qzd = torch.logsumexp(lq + logw[:, :, None], 1).sum(1)
    log_pz = -0.5 * (z ** 2 + math.log(2 * math.pi)).sum(1)
    loss = (rec + (log_qzx - log_qz) + beta * (log_qz - log_qzd) + gamma * (log_qzd - log_pz)).mean()
    loss.backward()
    assert abs(float(obj.last_terms["loss"]) / B - loss.item()) <= 1e-10 * abs(loss.item())
    ours = {e.name: model.layout.view(model.grads, e.name) for e in model.layout}
    for k, g in torch_ref.grads_by_name(tm).items():
        err = np.max(np.abs(ours[k] - g)) / max(np.max(np.abs(g)), 1e-30)
        assert err < 1e-10, (k, err)


def _official_decomposition(z, mu, logvar, N, mss):
    """MI, TC and dimension-wise KL per image, transcribed into NumPy from
    the formulas of the official code (rtqichen/beta-tcvae, vae_quant.py,
    ``VAE.elbo``: ``_logqz`` of shape (B, B, L) from the Normal log-density,
    then the minibatch-weighted or -stratified ``logqz`` and
    ``logqz_prodmarginals``), its importance-weight matrix written with
    the stride B + 1 (the diagonal: its open pull request #1 says that was
    meant; the code's stride B walks down columns) and the wrap-around entry
    on the last row."""
    B, L = z.shape

    def logsumexp(v, dim):
        m = v.max(axis=dim, keepdims=True)
        return (m + np.log(np.exp(v - m).sum(axis=dim, keepdims=True))).squeeze(dim)

    def normal_log_density(x, mean, logsigma):      # lib/dist.py: Normal.log_density with logsigma = logvar / 2
        c = math.log(2 * math.pi)
        inv_sigma = np.exp(-logsigma)
        tmp = (x - mean) * inv_sigma
        return -0.5 * (tmp * tmp + 2 * logsigma + c)

    logpz = normal_log_density(z, 0.0, 0.0).sum(1)
    logqz_condx = normal_log_density(z, mu, 0.5 * logvar).sum(1)
    _logqz = normal_log_density(z.reshape(B, 1, L), mu.reshape(1, B, L), 0.5 * logvar.reshape(1, B, L))
    if not mss:
        logqz_prodmarginals = (logsumexp(_logqz, 1) - math.log(B * N)).sum(1)
        logqz = logsumexp(_logqz.sum(2), 1) - math.log(B * N)
    else:
        M = B - 1
        strat_weight = (N - M) / (N * M)
        W = np.full((B, B), 1 / M)
        W.reshape(-1)[::M + 2] = 1 / N
        W.reshape(-1)[1::M + 2] = strat_weight
        W[M, 0] = strat_weight
        logiw = np.log(W)
        logqz = logsumexp(logiw + _logqz.sum(2), 1)
        logqz_prodmarginals = logsumexp(logiw.reshape(B, B, 1) + _logqz, 1).sum(1)
    return logqz_condx - logqz, logqz - logqz_prodmarginals, logqz_prodmarginals - logpz


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_btcvae_terms_match_the_official_codes_formulas(estimator):
    """One batch's MI, TC and dimension-wise KL against the official code's formulas (float64, 1e-10)."""
    cfg = CFGS["mlp-relu-bernoulli"]
    model = VAE(cfg, "numpy", seed=8)
    r = np.random.default_rng(12)
    B, N = 16, 737280                                 # dSprites' size
    x, eps = r.random((B, cfg.input_dim)), r.normal(size=(B, cfg.latent_dim))
    obj = BetaTCVAEObjective(model, n_train=N, estimator=estimator)
    obj.loss_and_grad(x, eps, 6.0)
    mu, logvar = model.encode(x)
    z = mu + np.exp(0.5 * logvar) * eps
    want = _official_decomposition(z, mu, logvar, N, estimator == "mss")
    for k, w in zip(("mi", "tc", "dwkl"), want):
        assert abs(float(obj.last_terms[k]) - w.sum()) <= 1e-10 * max(1.0, abs(w.sum())), (k, obj.last_terms[k], w.sum())
    ev = BetaTCVAEObjective(model, n_train=N, estimator=estimator)
    dens = ev.terms(model.backend.asarray(mu), model.backend.asarray(logvar), model.backend.asarray(z))
    np.testing.assert_allclose(dens[0] - dens[1], want[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dens[1] - dens[2], want[1], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dens[2] - dens[3], want[2], rtol=1e-10, atol=1e-10)


def test_btcvae_trains_resumes_and_reports_its_terms(tmp_path):
    from conftest import fv
    args = ["train", "--n-sprites", "300", "--hidden", "16", "--latent", "3", "--batch-size", "50", "--beta", "6",
            "--objective", "btcvae", "--no-progress"]
    fv(*args, "--epochs", "2", "--out", tmp_path / "a", cwd=tmp_path)
    fv(*args, "--epochs", "1", "--out", tmp_path / "b", cwd=tmp_path)
    fv("train", "--resume", tmp_path / "b", "--epochs", "2", "--no-progress", cwd=tmp_path)
    a = fastvae.load(tmp_path / "a" / "checkpoint.h5").get_flat_params()
    b = fastvae.load(tmp_path / "b" / "checkpoint.h5").get_flat_params()
    np.testing.assert_array_equal(a, b)
    import json
    res = json.loads(fv("eval", tmp_path / "a", "--json", cwd=tmp_path).stdout)
    assert {"btcvae_mi", "btcvae_tc", "btcvae_dwkl", "mig"} <= set(res)
    text = fv("eval", tmp_path / "a", cwd=tmp_path).stdout            # the terms were printed by --json alone
    assert res["btcvae_estimator"] == "mss"                            # the default
    assert f"beta-TCVAE terms (minibatch-stratified sampling, batch 50): MI {res['btcvae_mi']:.3f}, " \
           f"TC {res['btcvae_tc']:.3f}, dimension-wise KL {res['btcvae_dwkl']:.3f} nats per image" in text, text
    # the three terms add up to the sampled KL, whose mean over the split is the closed-form KL up to
    # sampling noise (std about sqrt(L / 2) nats per image over 30 test images: ~0.25 nats)
    sampled = res["btcvae_mi"] + res["btcvae_tc"] + res["btcvae_dwkl"]
    assert abs(sampled - res["kl"]) < 1.0 + 0.05 * res["kl"], (sampled, res["kl"])


def _backend_param(name):
    from fastvae import backends
    info = {b["name"]: b for b in backends.available()}[name]
    marks = [pytest.mark.gpu] if name == "cupy" else []
    if not info["available"]:
        marks.append(pytest.mark.skip(reason=f"{name}: {info['reason']}"))
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("other", [_backend_param("numba"), _backend_param("cupy"), emu_param()])
def test_tc_pairwise_kernels_match_the_array_expressions(other):
    """The fused Numba kernel and the three CUDA kernels against the NumPy expressions (float64)."""
    from fastvae import backends
    r = np.random.default_rng(11)
    B, L = 37, 5
    z, mu, lv = r.normal(size=(B, L)), r.normal(size=(B, L)), 0.3 * r.normal(size=(B, L))
    logw = r.normal(size=(B, B)) - 5.0
    ref_be, be = backends.get("numpy", "float64"), make_backend(other, "float64")
    outs = []
    for b in (ref_be, be):
        g = [b.asarray(r2) for r2 in (np.ones((B, L)), np.zeros((B, L)), np.full((B, L), 2.0))]
        lse, lsed = b.tc_pairwise(b.asarray(z), b.asarray(mu), b.asarray(lv), b.asarray(logw), -0.7, 0.4, *g)
        outs.append([b.to_host(a).copy() for a in (lse, lsed, *g)])
    for a, b in zip(*outs):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12 * np.abs(a).max())


@pytest.mark.parametrize("other", ["numba", emu_param()])
@pytest.mark.parametrize("objective", ["iwae", "btcvae", "iwae-iaf"])
def test_objectives_agree_across_backends(objective, other):
    """The same step on numba (or the emulated CUDA kernels) as on numpy
    (float64, 1e-12 relative: only summation order differs)."""
    if other == "numba":
        pytest.importorskip("numba")
    from fastvae.objectives.btcvae import BetaTCVAEObjective
    from fastvae.objectives.iwae import IWAEObjective
    cfg = IAF if objective == "iwae-iaf" else CFGS["mlp-relu-bernoulli"]
    r = np.random.default_rng(9)
    x = r.random((6, cfg.input_dim))
    grads = []
    for be in ("numpy", other):
        model = VAE(cfg, make_backend(be, "float64"), seed=1)
        if objective.startswith("iwae"):
            obj = IWAEObjective(model, 4)
            eps = np.random.default_rng(10).normal(size=obj.eps_shape(6))
            obj.loss_and_grad(model.backend.asarray(x), model.backend.asarray(eps))
        else:
            obj = BetaTCVAEObjective(model, 100, estimator="mss", dwkl_warmup=3.0)
            obj.set_time(1.0)
            eps = np.random.default_rng(10).normal(size=(6, cfg.latent_dim))
            obj.loss_and_grad(model.backend.asarray(x), model.backend.asarray(eps), 4.0)
        grads.append(model.backend.to_host(model.grads).copy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-12, atol=1e-12 * np.abs(grads[0]).max())


def test_an_iwae_run_that_would_not_fit_is_refused_before_it_starts(monkeypatch):
    """IWAE's step holds B K rows of decoder buffers; the preflight counted
    B: 128 images x 2000 samples of the 4096-pixel sprites MLP grew to 24 GB
    and were killed by the kernel. Now refused with both sizes and --iwae-k."""
    from fastvae.training import memory
    from fastvae.objectives import train_rows
    assert train_rows(TrainConfig(batch_size=16)) == 16
    assert train_rows(TrainConfig(batch_size=16, objective="iwae", iwae_k=5)) == 96
    monkeypatch.setattr(memory, "host_available", lambda: 100 * 2 ** 20)        # pretend 100 MiB free
    with pytest.raises(ConfigError, match=r"batch 16 buffers, 5000 IWAE samples an image\) needs about .* smaller "
                                          r"batch_size, .* \(or a smaller iwae_k\)"):
        tiny_trainer(None, objective="iwae", iwae_k=5000)
    tiny_trainer(None, objective="iwae", iwae_k=5)                               # 96 rows fit


def test_a_btcvae_batch_whose_pairwise_terms_would_not_fit_is_refused(monkeypatch):
    """beta-TCVAE's array expressions (the NumPy backend) hold about six
    (B, B, L) arrays: 11.9 GB at B = 8192 with L = 10, and B = 12000 would
    have run out of memory unannounced. The preflight counts them; the Numba
    backend's fused kernel needs none."""
    from fastvae import backends
    from fastvae.training import memory
    assert backends.get("numpy").tc_pairwise_bytes(2048, 10) == 6 * 2048 * 2048 * 10 * 4
    monkeypatch.setattr(memory, "host_available", lambda: 10 * 2 ** 20)          # pretend 10 MiB free
    with pytest.raises(ConfigError, match=r"batch 256 buffers, beta-TCVAE pairwise terms\) needs about 11.3 MiB"):
        tiny_trainer(None, objective="btcvae", batch_size=256)       # 6.8 MiB, + 4.5 MiB of (256, 256, 3) arrays
    if "numba" in [b["name"] for b in backends.available() if b["available"]]:
        tiny_trainer(None, "numba", objective="btcvae", batch_size=256)


def test_an_iwae_run_reports_its_bound_without_recon_and_kl_columns(tmp_path, capsys):
    """The IWAE bound -L_K has no reconstruction and KL terms: metrics put all
    of it in train_recon and 0.0 in train_kl (read as a collapsed posterior),
    and the epoch line, `info` and the loss curves called it -ELBO."""
    import csv
    from conftest import fv
    from fastvae.explore import plots
    t = tiny_trainer(tmp_path / "run", epochs=2, objective="iwae", iwae_k=3)
    t.verbose = True
    t.fit(pictures=False)
    out = capsys.readouterr().out
    assert "epoch 2/2: train loss " in out and "train -ELBO" not in out
    for h in t.history:
        assert h["train_recon"] is None and h["train_kl"] is None and h["train_neg_elbo"] == h["train_loss"] > 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [(r["train_recon"], r["train_kl"]) for r in rows] == [("", "")] * 2 and float(rows[-1]["train_loss"]) > 0
    info = fv("info", tmp_path / "run", cwd=tmp_path).stdout
    assert "last epoch: train loss " in info and "settings: iwae (K 3), batch 16" in info, info
    labels = plots.plot_loss(t.history).axes[0].get_legend_handles_labels()[1]
    assert labels[:2] == ["train loss (-L_K)", "test -ELBO"]
    elbo = tiny_trainer(None, epochs=1)
    elbo.fit(pictures=False)
    assert elbo.history[-1]["train_kl"] > 0
    assert plots.plot_loss(elbo.history).axes[0].get_legend_handles_labels()[1][:4] == [
        "train -ELBO", "test -ELBO", "train recon", "train KL"]


def test_btcvae_eval_terms_do_not_depend_on_which_splits_were_loaded(tmp_path):
    """The minibatch-weighted estimates of `eval` take N = the run's training
    set size, as training does; MNIST's eval reads its test files alone and
    took N from them, so the same images scored differently as idx files and
    as an .npz with x_train/x_test (MI 3.20 against 4.12 here)."""
    import json
    from conftest import fv, write_mnist_like
    arrays = write_mnist_like(tmp_path / "m", n_train=60, n_test=24)
    np.savez(tmp_path / "k.npz", x_train=arrays["train-images-idx3-ubyte"], y_train=arrays["train-labels-idx1-ubyte"],
             x_test=arrays["t10k-images-idx3-ubyte"], y_test=arrays["t10k-labels-idx1-ubyte"])
    fv("train", "--dataset", "mnist", "--data-dir", "m", "--no-download", "--objective", "btcvae", "--beta", "4",
       "--hidden", "8", "--latent", "3", "--epochs", "1", "--batch-size", "12", "--no-progress", "--out", "run",
       cwd=tmp_path)
    idx = json.loads(fv("eval", "run", "--json", cwd=tmp_path).stdout)
    npz = json.loads(fv("eval", "run", "--json", "--dataset", "k.npz", cwd=tmp_path).stdout)
    assert idx["n"] == npz["n"] == 24 and idx["neg_elbo"] == pytest.approx(npz["neg_elbo"], rel=1e-9)
    for k in ("btcvae_mi", "btcvae_tc", "btcvae_dwkl"):
        assert idx[k] == pytest.approx(npz[k], rel=1e-9, abs=1e-9), k
    model = fastvae.load(tmp_path / "run")
    x = fastvae.datasets.load(fastvae.DataConfig(dataset=str(tmp_path / "k.npz"))).x_test
    from fastvae.objectives.btcvae import BetaTCVAEObjective
    want = BetaTCVAEObjective(model, 60).evaluate(x, batch_size=12, seed=0)      # N = the 60 training images
    assert idx["btcvae_mi"] == pytest.approx(want["mi"], rel=1e-9)


def test_btcvae_refuses_batches_of_one():
    """Minibatch-weighted sampling estimates log q(z_i) from the batch's
    posteriors; with one image the TC term is the constant (L - 1) log N with
    no gradient, so beta-TCVAE at --batch-size 1 trained the plain VAE
    whatever beta said (two runs at beta 1 and 6 ended on the same weights)."""
    with pytest.raises(ConfigError, match="batch of 1 has none"):
        tiny_trainer(objective="btcvae", batch_size=1)
    tiny_trainer(objective="btcvae", batch_size=2)


def test_btcvae_leaves_out_a_last_batch_of_one():
    """The same holds for an epoch's last batch: with 36 training images in
    batches of 5, the eighth step of each epoch was one image whose TC term
    had no gradient. beta-TCVAE now runs 7 steps an epoch (the image left over
    changes with the shuffle); the ELBO keeps its last partial batch."""
    from fastvae.training.parts import epoch_steps
    assert [epoch_steps(n, 5, 2) for n in (0, 1, 4, 5, 6, 7, 36)] == [0, 1, 1, 1, 1, 2, 7]
    assert [epoch_steps(n, 5) for n in (0, 1, 4, 5, 6, 7, 36)] == [0, 1, 1, 1, 2, 2, 8]
    sizes = []
    t = tiny_trainer(objective="btcvae", batch_size=5, n=40, epochs=2)
    assert len(t.data.x_train) == 36 and t.steps_per_epoch() == 7
    next_batch = t.batches.next_batch

    def counted(pos, b):
        batch = next_batch(pos, b)
        sizes.append(batch.global_batch)
        return batch
    t.batches.next_batch = counted
    t.fit(pictures=False)
    assert sizes == [5] * 14 and t.step == 14
    assert tiny_trainer(batch_size=5, n=40).steps_per_epoch() == 8
