"""The IAF posterior (issue 15, third part): MADE masks, the flow's
log-determinant, the gradient against float64 central differences and PyTorch
autograd, masked weights, IWAE through the flow, every backend, the CLI."""

import json

import numpy as np
import pytest

import fastvae
from fastvae import ConfigError, ModelConfig, VAE
from fastvae.explore import metrics
from fastvae.nn.layers.flow import made_masks

from conftest import fv, full_gradient_check, randomize_flows
from cuda_emu import emu_param, make_backend
from test_conv import small_cfg

CFGS = {
    "mlp-relu-bernoulli": ModelConfig(input_dim=12, hidden=[7], latent_dim=3, posterior="iaf", flows=2,
                                      flow_hidden=5, dtype="float64"),
    "mlp-tanh-gaussian": ModelConfig(input_dim=10, hidden=[6], latent_dim=4, activation="elu",
                                     likelihood="gaussian", sigma=0.5, posterior="iaf", flows=3, flow_hidden=7,
                                     dtype="float64"),
    "conv-small": small_cfg("float64").replace(posterior="iaf", flows=2, flow_hidden=4),
}


@pytest.mark.parametrize("L,H", [(1, 3), (2, 4), (5, 12), (5, 3)])
@pytest.mark.parametrize("reverse", [False, True])
def test_made_masks_are_autoregressive(L, H, reverse):
    """Output j (of m and of s) reaches input i only when i comes before j in
    the step's order; with H >= L - 1 hidden units every such path exists."""
    m1, m2 = made_masks(L, H, reverse)
    assert m1.shape == (H, L) and m2.shape == (2 * L, H)
    order = np.arange(L)[::-1] if reverse else np.arange(L)          # order[r] = position of input r
    rank = np.empty(L, int)
    rank[order] = np.arange(L)
    reach = (m2 @ m1) > 0                                              # (2L, L) paths
    for r in range(2 * L):
        for i in range(L):
            before = rank[i] < rank[r % L]
            assert not reach[r, i] or before, (r, i)
            if H >= L - 1:
                assert reach[r, i] == before, (r, i)


def _iaf_model(seed=0, **kw):
    cfg = ModelConfig(input_dim=9, hidden=[6], latent_dim=4, posterior="iaf", flows=2, flow_hidden=6,
                      dtype="float64", **kw)
    return randomize_flows(VAE(cfg, seed=seed), seed)


def test_flow_log_det_matches_the_numerical_jacobian():
    """kl = log q0(z0) - log|det dz_T/dz0| - log p(z_T): the determinant from
    central differences of the whole flow, not from the formula under test."""
    model = _iaf_model()
    r = np.random.default_rng(3)
    B, L = 1, 4
    head = np.concatenate([r.normal(size=(B, L)), 0.3 * r.normal(size=(B, L)), r.normal(size=(B, L))], 1)
    eps = r.normal(size=(B, L))
    ws = model.workspace(B)

    def flow(mu):
        h = head.copy()
        h[:, :L] = mu
        return model.sample_posterior_into(ws, h, eps).copy()

    zT = flow(head[:, :L])
    kl = ws.kl.copy()[0]
    J = np.empty((L, L))
    for j in range(L):
        d = np.zeros((B, L))
        d[0, j] = 1e-6
        J[:, j] = ((flow(head[:, :L] + d) - flow(head[:, :L] - d)) / 2e-6)[0]
    z0 = head[0, :L] + np.exp(0.5 * head[0, L:2 * L]) * eps[0]
    log_q0 = -0.5 * (eps[0] ** 2 + head[0, L:2 * L]).sum()           # 2 pi terms cancel with log p
    expected = log_q0 - np.log(abs(np.linalg.det(J))) + 0.5 * (zT[0] ** 2).sum()
    assert abs(kl - expected) < 1e-8, (kl, expected)
    assert not np.allclose(zT[0], z0)                                  # the flow did something


@pytest.mark.parametrize("name", list(CFGS))
def test_iaf_gradient_matches_central_differences(name):
    full_gradient_check(CFGS[name], beta=0.7, B=2 if name.startswith("conv") else 3)


def test_iaf_matches_pytorch_autograd():
    torch = pytest.importorskip("torch")
    from fastvae.bench import torch_twin as torch_ref
    for cfg in (CFGS["mlp-tanh-gaussian"], CFGS["conv-small"], CFGS["mlp-tanh-gaussian"].replace(flow_context=False)):
        model = randomize_flows(VAE(cfg, seed=2))
        tm = torch_ref.build(cfg)
        torch_ref.copy_from(tm, model)
        r = np.random.default_rng(4)
        x, eps = r.random((5, cfg.input_dim)), r.normal(size=(5, cfg.latent_dim))
        recon, kl = model.loss_and_grad(x, eps, 0.6)
        rec_t, kl_t = tm.losses(torch.from_numpy(x), torch.from_numpy(eps))
        loss_t = (rec_t + 0.6 * kl_t).mean()
        loss_t.backward()
        assert abs((recon + 0.6 * kl) / 5 - loss_t.item()) <= 1e-10 * abs(loss_t.item())
        assert abs(kl - kl_t.sum().item()) <= 1e-10 * max(abs(kl), 1.0)
        for k, g in torch_ref.grads_by_name(tm).items():
            mine = model.layout.view(model.grads, k)
            assert np.abs(mine - g).max() <= 1e-10 * max(np.abs(g).max(), 1e-300), k


def test_masked_weights_never_act_and_never_move():
    model = _iaf_model()
    masked = [(f"flow.{t}.{part}.W", mask) for t in (0, 1)
              for part, mask in zip(("hidden", "m", "s"), _masks(model, t))]
    r = np.random.default_rng(5)
    x, eps = r.random((6, 9)), r.normal(size=(6, 4))
    before = model.loss_and_grad(x, eps, 1.0)
    p = model.get_flat_params()
    for name, mask in masked:
        model.layout.view(p, name)[mask == 0] = 1e3                     # what a crafted file could hold
    model.set_flat_params(p)
    after = model.loss_and_grad(x, eps, 1.0)
    assert before == after
    for name, mask in masked:
        assert np.all(model.layout.view(model.grads, name)[mask == 0] == 0), name
    opt = fastvae.Adam.for_model(model, lr=0.1)
    for _ in range(3):
        model.loss_and_grad(x, eps, 1.0)
        opt.step()
    q = model.get_flat_params()
    for name, mask in masked:
        assert np.all(model.layout.view(q, name)[mask == 0] == 1e3), name


def _masks(model, t):
    step = model.layers[model.sampler_at + 1 + t]
    L = model.config.latent_dim
    return step.hidden.mask, step.out.mask[:L], step.out.mask[L:]


def test_iwae_goes_through_the_flow():
    """With every flow step at the identity (W = 0, gate bias 40: sig = 1 in
    float64) the flow model's IWAE equals the Gaussian model's with the same
    encoder and decoder; with trained-looking flow weights it differs."""
    flow = _iaf_model(seed=1)
    plain = VAE(flow.config.replace(posterior="gaussian", flows=0), seed=1)
    pf, pp = flow.state_dict(), plain.state_dict()
    host = flow.get_flat_params()
    for name in pf:
        if name.startswith("flow."):
            flow.layout.view(host, name)[...] = 40.0 if name.endswith(".s.b") else 0.0
        elif name.startswith("encoder.context."):                     # h: read only by the steps
            flow.layout.view(host, name)[...] = 0.5
        else:
            flow.layout.view(host, name)[...] = pp[name]
    X = np.random.default_rng(6).random((7, 9))
    flow.set_flat_params(host)
    a, b = metrics.iwae(flow, X, k=30, seed=2), metrics.iwae(plain, X, k=30, seed=2)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    fresh = randomize_flows(VAE(flow.config, seed=1), 1).state_dict()
    for name in pf:
        if name.startswith("flow."):
            flow.layout.view(host, name)[...] = fresh[name]
    flow.set_flat_params(host)
    assert np.abs(metrics.iwae(flow, X, k=30, seed=2) - b).max() > 1e-3
    # the bound: k = 1 averages the sampled -ELBO, which the k-sample estimate lies below (Jensen)
    one, many = metrics.iwae(flow, X, k=1, seed=3).mean(), metrics.iwae(flow, X, k=300, seed=3).mean()
    assert many < one


@pytest.mark.parametrize("name", ["numba", emu_param()])
def test_iaf_step_agrees_across_backends(name):
    if name == "numba":
        pytest.importorskip("numba")
    for cfg in (CFGS["mlp-relu-bernoulli"], CFGS["conv-small"]):
        r = np.random.default_rng(7)
        x, eps = r.random((5, cfg.input_dim)), r.normal(size=(5, cfg.latent_dim))
        ref = randomize_flows(VAE(cfg, "numpy", seed=3))
        other = randomize_flows(VAE(cfg, make_backend(name, "float64"), seed=3))
        other.grads[...] = np.nan
        la = ref.loss_and_grad(x, eps, 0.8)
        lb = other.loss_and_grad(other.backend.asarray(x), other.backend.asarray(eps), 0.8)
        np.testing.assert_allclose([float(v) for v in lb], [float(v) for v in la], rtol=1e-10)
        g = other.backend.to_host(other.grads)
        np.testing.assert_allclose(g, ref.grads, rtol=1e-10, atol=1e-10 * np.abs(ref.grads).max())


def test_config_and_cli_checks(tmp_path):
    with pytest.raises(ConfigError, match="posterior='iaf' needs flows of 1 or more"):
        ModelConfig(posterior="iaf")
    with pytest.raises(ConfigError, match="and flows needs posterior='iaf'"):
        ModelConfig(flows=2)
    cfg = CFGS["mlp-relu-bernoulli"]
    layers = [s for s in cfg.layers if s["type"] != "iaf"]
    with pytest.raises(ConfigError, match="make them agree"):
        ModelConfig(input_dim=12, hidden=[7], latent_dim=3, posterior="iaf", flows=2, layers=layers)
    moved = list(cfg.layers)
    step = moved.pop(moved.index(next(s for s in moved if s["type"] == "iaf")))
    moved.insert(len(moved) - 1, step)                                 # between the decoder and the likelihood
    with pytest.raises(ConfigError, match="directly follow the gaussian sampler"):
        ModelConfig(**{**cfg.to_dict(), "layers": moved})
    # (IWAE trains through the flow steps: tests/test_objectives.py)
    p = fv("train", "--posterior", "iaf", "--flows", "1", "--objective", "btcvae", "--n-sprites", "60",
           "--batch-size", "20", "--out", tmp_path / "x", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "--objective btcvae is written for the Gaussian posterior" in p.stderr
    assert "(--posterior iaf)" in p.stderr


def test_iaf_trains_resumes_and_explores(tmp_path):
    args = ["--posterior", "iaf", "--flows", "2", "--flow-hidden", "16", "--n-sprites", "200", "--latent", "3",
            "--hidden", "32", "--batch-size", "40", "--no-progress"]
    fv("train", *args, "--epochs", "2", "--out", tmp_path / "a", cwd=tmp_path)
    fv("train", *args, "--epochs", "1", "--out", tmp_path / "b", cwd=tmp_path)
    fv("train", "--resume", tmp_path / "b", "--epochs", "2", "--out", tmp_path / "b", "--no-progress", cwd=tmp_path)
    a, b = (fastvae.load(tmp_path / r / "checkpoint.h5") for r in "ab")
    np.testing.assert_array_equal(a.get_flat_params(), b.get_flat_params())
    assert a.config.posterior == "iaf" and a.config.flows == 2 and "iaf(16)-iaf(16)" in repr(a)
    res = json.loads(fv("eval", tmp_path / "a", "--json", "--iwae-k", "20", cwd=tmp_path).stdout)
    assert res["iwae_neg_log_likelihood"] < res["neg_elbo"] + 5 and res["kl"] > 0
    fv("plot", tmp_path / "a", "--grid", "4", "--n", "4", cwd=tmp_path)
    assert (tmp_path / "a" / "figures" / "traversals.png").stat().st_size > 1000
    assert a.codes(np.zeros((2, 4096))).shape == (2, 3)


def test_per_dimension_kl_of_a_flow_posterior_is_named_for_what_it_is(tmp_path):
    """The Gaussian's per-dimension KL before the IAF steps summed to 32.2
    nats on an MNIST run whose KL was 13.6: `eval` reported it as
    kl_per_dim, the plot titled it "KL per dimension", and traversals sorted
    the flow's output dimensions by it (the steps mix dimensions)."""
    from fastvae import explore
    from fastvae.explore.evaluation import evaluate
    x = np.random.default_rng(0).random((40, 9))
    flow = _iaf_model()
    plain = VAE(flow.config.replace(posterior="gaussian", flows=0), seed=1)
    # the Gaussian posterior's per-dimension KLs do sum to its KL (float64 model: rounding only)
    assert metrics.kl_per_dim(plain, x).sum() == pytest.approx(evaluate(plain, x)["kl"], rel=1e-12)
    assert metrics.kl_per_dim(flow, x).sum() != pytest.approx(evaluate(flow, x)["kl"], rel=1e-3)
    title = lambda fig: fig.axes[0].get_title()
    assert "KL per dimension" in title(explore.plot_kl_per_dim(metrics.kl_per_dim(plain, x)))
    assert "before the 2 IAF steps" in title(explore.plot_kl_per_dim(metrics.kl_per_dim(flow, x), flows=2))
    assert "sorted by KL" in title(explore.plot_traversals(plain, (3, 3), x))
    fig = explore.plot_traversals(flow, (3, 3), x)
    assert "sorted by the codes' variance" in title(fig)
    var = flow.codes(x).var(0)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == [f"z[{j}] Var {var[j]:.2f}" for j in np.argsort(-var)]
    assert "sorted" not in title(explore.plot_traversals(plain, (3, 3)))     # no images: not sorted at all


def test_eval_names_a_flow_runs_per_dimension_kl_base(tmp_path):
    args = ["--n-sprites", "100", "--latent", "2", "--hidden", "8", "--batch-size", "30", "--epochs", "1",
            "--no-progress"]
    fv("train", *args, "--posterior", "iaf", "--flows", "1", "--flow-hidden", "4", "--out", "f", cwd=tmp_path)
    fv("train", *args, "--out", "g", cwd=tmp_path)
    f, g = (json.loads(fv("eval", r, "--json", "--mig-points", "700", cwd=tmp_path).stdout) for r in "fg")
    assert "kl_per_dim" not in f and len(f["base_kl_per_dim"]) == 2
    # MIG of the codes the decoder reads, on 700 new sprites from the generator
    assert f["mig_points"] == 700 and f["mig_source"] == "sprites generator, seed 1000000"
    data = fastvae.datasets.make_sprites(700, seed=10 ** 6, test_fraction=0)
    model = fastvae.load(tmp_path / "f")
    assert f["mig"] == pytest.approx(metrics.mig(model.codes(data.x_train), data.factors_train)["mig"], rel=1e-12)
    assert np.abs(model.codes(data.x_train) - model.encode(data.x_train)[0]).max() > 1e-2     # the flow moved them
    assert "base_kl_per_dim" not in g and sum(g["kl_per_dim"]) == pytest.approx(g["kl"], rel=1e-5)   # float32


def test_a_new_flow_starts_as_the_gaussian_posterior():
    """At initialisation (output weights zero, s's bias 1) each step is z_t = sigmoid(2) z_{t-1}:
    the flow's sample and its KL terms are those of the Gaussian posterior, rescaled."""
    model = VAE(_iaf_model().config, seed=4)                         # as built, not randomized
    r = np.random.default_rng(8)
    L = 4
    head = np.concatenate([r.normal(size=(3, L)), 0.3 * r.normal(size=(3, L)), r.normal(size=(3, L))], 1)
    eps = r.normal(size=(3, L))
    ws = model.workspace(3)
    zT = model.sample_posterior_into(ws, head, eps).copy()
    sig = 1.0 / (1.0 + np.exp(-2.0))
    z0 = head[:, :L] + np.exp(0.5 * head[:, L:2 * L]) * eps
    np.testing.assert_allclose(zT, sig ** 2 * z0, rtol=1e-14)
    log_q = -0.5 * (eps ** 2 + head[:, L:2 * L]).sum(1) - 2 * L * np.log(sig)    # 2 pi terms cancel with log p
    np.testing.assert_allclose(ws.kl, log_q + 0.5 * (zT ** 2).sum(1), rtol=1e-12)


def test_the_encoder_context_reaches_every_step():
    cfg = _iaf_model().config
    L = cfg.latent_dim
    head = next(s for s in cfg.layers if s["name"] == "encoder.head")
    assert head["units"] == 3 * L and head["parts"] == ["mu", "logvar", "context"]
    assert next(s for s in cfg.layers if s["type"] == "gaussian")["context"] == L
    model = _iaf_model()
    assert [step.hidden.in_features for step in model.layers[model.sampler_at + 1:model.decoder_at]] == [2 * L] * 2
    x = np.random.default_rng(1).random((5, 9))
    before = model.codes(x)
    p = model.get_flat_params()
    model.layout.view(p, "encoder.context.W")[...] += 0.5
    model.set_flat_params(p)
    mu_after = model.encode(x)[0]
    assert np.abs(model.codes(x) - before).max() > 1e-3 and np.allclose(mu_after, model.encode(x)[0])
    # without the context: the steps see z only, the head is [mu | logvar]
    plain = cfg.replace(flow_context=False)
    assert next(s for s in plain.layers if s["name"] == "encoder.head")["units"] == 2 * L
    assert "context" not in next(s for s in plain.layers if s["type"] == "gaussian")


def test_an_iaf_config_written_before_the_context_reads_without_it():
    old = _iaf_model().config.replace(flow_context=False).to_dict()
    del old["flow_context"]
    cfg = ModelConfig.from_dict(old)
    assert cfg.flow_context is False and cfg.layers == ModelConfig.from_dict({**old, "flow_context": False}).layers
    with pytest.raises(ConfigError, match="context 4: a context h is read by IAF steps only"):
        ModelConfig.from_dict({**old, "posterior": "gaussian", "flows": 0,
                               "layers": [s for s in _iaf_model().config.layers if s["type"] != "iaf"]})


def test_flow_and_estimator_options_refuse_to_do_nothing(tmp_path):
    base = ["train", "--n-sprites", "60", "--batch-size", "20", "--epochs", "1", "--no-progress"]
    for extra, says in ((["--no-flow-context"], "--no-flow-context"), (["--tc-estimator", "mws"], "--tc-estimator"),
                        (["--dwkl-warmup", "2"], "--dwkl-warmup")):
        p = fv(*base, *extra, "--out", tmp_path / "x", cwd=tmp_path, check=False)
        assert p.returncode == 2 and says in p.stderr, p.stderr
