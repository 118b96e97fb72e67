"""A PyTorch twin of :class:`fastvae.VAE`, for reference checks and benchmarks.

Same architecture, same parameter names and the same loss convention, built
with ``torch.nn`` and differentiated by autograd. It is a *reference*: the
engine never imports it; tests and ``bench/`` do, when torch is installed.
"""

from __future__ import annotations

import numpy as np


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - only without torch
        raise ImportError("fastvae.bench.torch_twin needs PyTorch: pip install torch") from exc
    return torch


class Twin:
    """What the layers' PyTorch code needs (:meth:`fastvae.nn.layers.Layer.torch_forward`):
    ``torch``, ``nn``, the activations by name, the converters between the
    engine's channels-last rows and NCHW, the pass's noise ``eps``, and what
    the sampler and the flow steps leave for the losses (``mu``, ``logvar``,
    ``z``, ``log_sig``: the sum of the flow steps' log sig)."""

    def __init__(self, torch, cfg):
        nn = torch.nn
        self.torch, self.nn = torch, nn
        self.acts = {"identity": lambda h: h, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                     "leaky_relu": lambda h: nn.functional.leaky_relu(h, cfg.leaky_slope),
                     "elu": lambda h: nn.functional.elu(h, cfg.elu_alpha), "softplus": nn.functional.softplus}
        self.start(None)

    def start(self, eps):
        self.eps, self.mu, self.logvar, self.z, self.log_sig = eps, None, None, None, 0.0

    @staticmethod
    def nchw(h, hwc):
        return h.reshape(h.shape[0], *hwc).permute(0, 3, 1, 2) if h.dim() == 2 else h

    @staticmethod
    def rows(h):
        return h.permute(0, 2, 3, 1).reshape(h.shape[0], -1) if h.dim() == 4 else h


def build(cfg, device="cpu"):
    """A ``torch.nn.Module`` twin of the VAE that ``cfg.layers`` describes
    (weights random), each layer's module and forward from its own class
    (``torch_module``, ``torch_forward``: ``nn.Linear``, ``nn.Conv2d`` and
    ``nn.ConvTranspose2d`` in NCHW, with the permutes that reproduce the
    engine's channels-last rows at every flatten and reshape)."""
    torch = _torch()
    nn = torch.nn
    from fastvae.nn import layers as L
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    stack = L.build(cfg)
    twin = Twin(torch, cfg)

    class TorchVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack, self.twin = stack, twin
            self.mods = nn.ModuleDict({layer.name.replace(".", "_"): m for layer in stack
                                       if (m := layer.torch_module(twin)) is not None})

        def forward(self, x, eps):
            """``(logits rows, mu, logvar, sum of the flow steps' log sig)``."""
            twin.start(eps)
            h = x
            for layer in self.stack:
                key = layer.name.replace(".", "_")
                h = layer.torch_forward(twin, self.mods[key] if key in self.mods else None, h)
            self.z = twin.z                                # after the flow steps, if any
            return twin.rows(h), twin.mu, twin.logvar, twin.log_sig

        def losses(self, x, eps):
            """Per-image ``(recon, kl)`` in nats, the engine's convention
            (with flows, kl is log q(z_T|x) - log p(z_T) of this sample)."""
            out, mu, logvar, log_sig = self(x, eps)
            rec = self.stack[-1].torch_nll(twin, out, x)
            if cfg.posterior == "iaf":
                kl = 0.5 * (self.z ** 2 - eps ** 2 - logvar).sum(1) - log_sig
            else:
                kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)
            return rec, kl

    return TorchVAE().to(device=device, dtype=dtype)


def named_tensors(tm):
    """``[(engine tensor name, torch parameter, row slice)]`` of every layer
    (:meth:`fastvae.nn.layers.Layer.torch_tensors`)."""
    out = []
    for layer in tm.stack:
        key = layer.name.replace(".", "_")
        if key in tm.mods:
            out += layer.torch_tensors(tm.mods[key])
    return out


def copy_from(tm, model) -> None:
    """Copy the engine model's weights into the torch twin."""
    torch = _torch()
    sd = model.state_dict()
    with torch.no_grad():
        for name, p, rows in named_tensors(tm):
            p[rows].copy_(torch.from_numpy(sd[name]))


def grads_by_name(tm) -> dict:
    """``{engine tensor name: host gradient}`` from the twin's ``.grad``."""
    return {name: p.grad[rows].detach().cpu().numpy() for name, p, rows in named_tensors(tm)}


def params_by_name(tm) -> dict:
    return {name: p[rows].detach().cpu().numpy() for name, p, rows in named_tensors(tm)}


def epoch_runner(cfg, x_train, batch_size=128, lr=1e-3, seed=0, init_from=None, adam=None):
    """``(module, optimizer, run_epoch)``: the twin trained the way the PyTorch
    VAE example does (shuffled batches, last partial batch kept, Adam, one z
    sample per image); ``run_epoch()`` trains one epoch over ``x_train (N, D)``.

    init_from: an engine VAE whose weights the twin starts from (identical
    initialisation); otherwise torch's own default initialisation. adam:
    ``"fused"`` or ``"foreach"`` for that Adam implementation (default: torch's choice).
    """
    torch = _torch()
    torch.manual_seed(seed)
    tm = build(cfg)
    if init_from is not None:
        copy_from(tm, init_from)
    dt = next(tm.parameters()).dtype
    X = torch.from_numpy(np.asarray(x_train)).to(dt)
    opt = torch.optim.Adam(tm.parameters(), lr=lr, **({adam: True} if adam else {}))
    g = torch.Generator().manual_seed(seed)

    def run_epoch():
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0], batch_size):
            xb = X[perm[i:i + batch_size]]
            eps = torch.randn(xb.shape[0], cfg.latent_dim, generator=g, dtype=dt)
            rec, kl = tm.losses(xb, eps)
            loss = (rec + kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return tm, opt, run_epoch


def train_reference(cfg, x_train, x_test, epochs=10, batch_size=128, lr=1e-3, seed=0, init_from=None,
                    threads=None):
    """Train the twin (:func:`epoch_runner`) for ``epochs`` and return
    ``{"test_neg_elbo", "test_recon", "test_kl", "seconds"}`` (nats per image)."""
    import time
    torch = _torch()
    if threads:
        torch.set_num_threads(threads)
    tm, _, run_epoch = epoch_runner(cfg, x_train, batch_size, lr, seed, init_from)
    dt = next(tm.parameters()).dtype
    t0 = time.perf_counter()
    for _ in range(epochs):
        run_epoch()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        Xt = torch.from_numpy(np.asarray(x_test)).to(dt)
        gt = torch.Generator().manual_seed(seed + 1)
        rec, kl = tm.losses(Xt, torch.randn(Xt.shape[0], cfg.latent_dim, generator=gt, dtype=dt))
    return {"test_neg_elbo": float((rec + kl).mean()), "test_recon": float(rec.mean()),
            "test_kl": float(kl.mean()), "seconds": seconds}
