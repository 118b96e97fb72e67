"""A PyTorch twin of :class:`fastvae.VAE`, for reference checks and benchmarks.

Same architecture, same parameter names and the same loss convention, built
with ``torch.nn`` and differentiated by autograd. It is a *reference*: the
engine never imports it; tests and ``bench/`` do, when torch is installed.
"""

from __future__ import annotations

import math

import numpy as np


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - only without torch
        raise ImportError("fastvae.torch_ref needs PyTorch: pip install torch") from exc
    return torch


def build(cfg, device="cpu"):
    """A ``torch.nn.Module`` twin of a VAE with config ``cfg`` (weights random)."""
    torch = _torch()
    nn = torch.nn
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32

    def act():
        return {"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(),
                "leaky_relu": nn.LeakyReLU(cfg.leaky_slope), "elu": nn.ELU(cfg.elu_alpha),
                "softplus": nn.Softplus()}[cfg.activation]

    class TorchVAE(nn.Module):
        def __init__(self):
            super().__init__()
            layers, d = [], cfg.input_dim
            for h in cfg.hidden:
                layers += [nn.Linear(d, h), act()]
                d = h
            self.encoder = nn.Sequential(*layers)
            self.mu = nn.Linear(d, cfg.latent_dim)
            self.logvar = nn.Linear(d, cfg.latent_dim)
            layers, d = [], cfg.latent_dim
            for h in cfg.decoder_widths:
                layers += [nn.Linear(d, h), act()]
                d = h
            layers.append(nn.Linear(d, cfg.input_dim))
            self.decoder = nn.Sequential(*layers)

        def forward(self, x, eps):
            h = self.encoder(x)
            mu, logvar = self.mu(h), self.logvar(h)
            z = mu + torch.exp(0.5 * logvar) * eps
            return self.decoder(z), mu, logvar

        def losses(self, x, eps):
            """Per-image ``(recon, kl)`` in nats, the engine's convention."""
            out, mu, logvar = self(x, eps)
            if cfg.likelihood == "bernoulli":
                rec = nn.functional.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
            elif cfg.likelihood == "gaussian":
                s = cfg.sigma
                rec = (0.5 * (out - x) ** 2 / s ** 2).sum(1) + cfg.input_dim * (math.log(s) + 0.5 * math.log(2 * math.pi))
            else:
                rec = ((out - x) ** 2).sum(1)
            kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)
            return rec, kl

    return TorchVAE().to(device=device, dtype=dtype)


def linear_modules(tm):
    """``[(fastvae layer name, nn.Linear)]`` in the engine's layout order."""
    torch = _torch()
    lin = lambda seq: [m for m in seq if isinstance(m, torch.nn.Linear)]
    out = [(f"encoder.{i}", m) for i, m in enumerate(lin(tm.encoder))]
    out += [("encoder.mu", tm.mu), ("encoder.logvar", tm.logvar)]
    dec = lin(tm.decoder)
    out += [(f"decoder.{i}", m) for i, m in enumerate(dec[:-1])]
    out.append(("decoder.out", dec[-1]))
    return out


def copy_from(tm, model) -> None:
    """Copy the engine model's weights into the torch twin."""
    torch = _torch()
    sd = model.state_dict()
    with torch.no_grad():
        for name, m in linear_modules(tm):
            m.weight.copy_(torch.from_numpy(sd[name + ".W"]))
            m.bias.copy_(torch.from_numpy(sd[name + ".b"]))


def grads_by_name(tm) -> dict:
    """``{engine tensor name: host gradient}`` from the twin's ``.grad``."""
    out = {}
    for name, m in linear_modules(tm):
        out[name + ".W"] = m.weight.grad.detach().cpu().numpy()
        out[name + ".b"] = m.bias.grad.detach().cpu().numpy()
    return out


def params_by_name(tm) -> dict:
    out = {}
    for name, m in linear_modules(tm):
        out[name + ".W"] = m.weight.detach().cpu().numpy()
        out[name + ".b"] = m.bias.detach().cpu().numpy()
    return out


def train_reference(cfg, x_train, x_test, epochs=10, batch_size=128, lr=1e-3, seed=0, init_from=None,
                    threads=None):
    """Train the twin the way the PyTorch VAE example does (shuffled batches,
    last partial batch kept, Adam, one z sample per image) and return
    ``{"test_neg_elbo", "test_recon", "test_kl", "seconds"}`` (nats per image).

    init_from: an engine VAE whose weights the twin starts from (identical
    initialisation); otherwise torch's own default initialisation.
    """
    import time
    torch = _torch()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tm = build(cfg)
    if init_from is not None:
        copy_from(tm, init_from)
    dt = next(tm.parameters()).dtype
    X = torch.from_numpy(np.asarray(x_train)).to(dt)
    opt = torch.optim.Adam(tm.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0], batch_size):
            xb = X[perm[i:i + batch_size]]
            eps = torch.randn(xb.shape[0], cfg.latent_dim, generator=g, dtype=dt)
            rec, kl = tm.losses(xb, eps)
            loss = (rec + kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        Xt = torch.from_numpy(np.asarray(x_test)).to(dt)
        gt = torch.Generator().manual_seed(seed + 1)
        rec, kl = tm.losses(Xt, torch.randn(Xt.shape[0], cfg.latent_dim, generator=gt, dtype=dt))
    return {"test_neg_elbo": float((rec + kl).mean()), "test_recon": float(rec.mean()),
            "test_kl": float(kl.mean()), "seconds": seconds}
