"""The engine against torch autograd on identical weights and noise (float64),
and Adam against torch.optim.Adam. Skipped when torch is not installed."""

import itertools

import numpy as np
import pytest

from fastvae import Adam, ModelConfig, VAE
from fastvae.config import ACTIVATIONS, LIKELIHOODS

torch = pytest.importorskip("torch")
from fastvae.bench import torch_twin as torch_ref# noqa: E402

REL = 1e-10   # float64, as the issue asks: ~1e6 ulps of headroom for summation order


def _setup(cfg, B=8, seed=0):
    m = VAE(cfg, "numpy", seed=seed)
    tm = torch_ref.build(cfg)
    torch_ref.copy_from(tm, m)
    r = np.random.default_rng(seed + 100)
    x = r.random((B, cfg.input_dim))
    eps = r.normal(size=(B, cfg.latent_dim))
    return m, tm, x, eps


def _rel(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


@pytest.mark.parametrize("act,lik", list(itertools.product(ACTIVATIONS, LIKELIHOODS)))
def test_loss_and_every_gradient_block_match_torch(act, lik):
    cfg = ModelConfig(input_dim=30, hidden=[16, 12], latent_dim=4, activation=act, likelihood=lik,
                      dtype="float64", sigma=0.4)
    m, tm, x, eps = _setup(cfg)
    beta = 0.6
    recon, kl = m.loss_and_grad(x, eps, beta)
    rec_t, kl_t = tm.losses(torch.from_numpy(x), torch.from_numpy(eps))
    loss_t = (rec_t + beta * kl_t).mean()
    loss_t.backward()
    B = x.shape[0]
    assert abs((recon + beta * kl) / B - loss_t.item()) <= REL * abs(loss_t.item())
    tg = torch_ref.grads_by_name(tm)
    worst = {}
    for e in m.layout:
        mine = m.layout.view(m.grads, e.name)
        worst[e.name] = _rel(mine, tg[e.name])
    print(f"\n{act}/{lik} max relative difference per tensor:",
          {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= REL, worst


def test_mnist_shaped_float32_matches_torch_to_float32_rounding():
    """784-400-20 in float32: differences stay at float32 rounding (~1e-7
    relative per op; we allow 1e-4 on gradients, accumulated over B*D sums)."""
    cfg = ModelConfig(input_dim=784, hidden=[400], latent_dim=20)
    m, tm, x, eps = _setup(cfg, B=32)
    x, eps = x.astype(np.float32), eps.astype(np.float32)
    recon, kl = m.loss_and_grad(x, eps, 1.0)
    rec_t, kl_t = tm.losses(torch.from_numpy(x), torch.from_numpy(eps))
    loss_t = (rec_t + kl_t).mean()
    loss_t.backward()
    assert abs(float(recon + kl) / 32 - loss_t.item()) < 1e-5 * loss_t.item()
    tg = torch_ref.grads_by_name(tm)
    for e in m.layout:
        assert _rel(m.layout.view(m.grads, e.name), tg[e.name]) < 1e-4, e.name


_CONV = [{"type": "conv2d", "name": "e.c", "channels": 3, "kernel": 3, "stride": 2, "padding": 1, "activation": "relu"},
         {"type": "dense", "name": "e.head", "units": 6, "activation": "identity", "parts": ["mu", "lv"]},
         {"type": "gaussian", "name": "q", "latent_dim": 3},
         {"type": "dense", "name": "d.0", "units": 8, "activation": "relu"},
         {"type": "reshape", "name": "d.r", "shape": [2, 2, 2]},
         {"type": "conv_transpose2d", "name": "d.t", "channels": 1, "kernel": 3, "stride": 2, "padding": 0,
          "output_padding": 0, "activation": "identity"},
         {"type": "likelihood", "name": "p", "kind": "bernoulli", "sigma": 0.1}]


@pytest.mark.parametrize("wd,decoupled,arch", [(0.0, False, "mlp"), (0.01, False, "mlp"), (0.05, True, "mlp"),
                                               (0.01, False, "conv")])
def test_ten_adam_steps_track_torch(wd, decoupled, arch):
    cfg = (ModelConfig(input_dim=20, hidden=[10], latent_dim=3, dtype="float64") if arch == "mlp" else
           ModelConfig(input_dim=25, image_shape=(5, 5), latent_dim=3, dtype="float64", layers=_CONV))
    m, tm, _, _ = _setup(cfg)
    opt = Adam.for_model(m, lr=3e-3, betas=(0.85, 0.99), eps=1e-8, weight_decay=wd, decoupled=decoupled)
    topt = (torch.optim.AdamW if decoupled else torch.optim.Adam)(
        tm.parameters(), lr=3e-3, betas=(0.85, 0.99), eps=1e-8, weight_decay=wd)
    r = np.random.default_rng(5)
    for step in range(10):
        x = r.random((6, cfg.input_dim))
        eps = r.normal(size=(6, 3))
        m.loss_and_grad(x, eps, 1.0)
        opt.step()
        topt.zero_grad()
        rec, kl = tm.losses(torch.from_numpy(x), torch.from_numpy(eps))
        (rec + kl).mean().backward()
        topt.step()
        tp = torch_ref.params_by_name(tm)
        for e in m.layout:
            d = _rel(m.layout.view(m.params, e.name), tp[e.name])
            assert d <= 1e-10, (step, e.name, d)
    assert opt.t == 10
