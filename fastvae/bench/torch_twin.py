"""A PyTorch twin of :class:`fastvae.VAE`, for reference checks and benchmarks.

Same architecture, same parameter names and the same loss convention, built
with ``torch.nn`` and differentiated by autograd. It is a *reference*: the
engine never imports it; tests and ``bench/`` do, when torch is installed.
"""

from __future__ import annotations

import math

import numpy as np

from fastvae.nn.layers.flow import FORGET_BIAS


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - only without torch
        raise ImportError("fastvae.bench.torch_twin needs PyTorch: pip install torch") from exc
    return torch


def build(cfg, device="cpu"):
    """A ``torch.nn.Module`` twin of the VAE that ``cfg.layers`` describes
    (weights random): ``nn.Linear``, ``nn.Conv2d`` and ``nn.ConvTranspose2d``
    in NCHW, with the permutes that reproduce the engine's channels-last rows
    at every flatten and reshape."""
    torch = _torch()
    nn = torch.nn
    from fastvae.nn import layers as L
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    stack = L.build(cfg)
    acts = {"identity": lambda h: h, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
            "leaky_relu": lambda h: nn.functional.leaky_relu(h, cfg.leaky_slope),
            "elu": lambda h: nn.functional.elu(h, cfg.elu_alpha), "softplus": nn.functional.softplus}

    def module(layer):
        if isinstance(layer, L.IAFStep):       # two masked Linear layers, masks as buffers
            m = nn.ModuleDict({"hidden": module(layer.hidden), "out": module(layer.out)})
            m.register_buffer("mask_hidden", torch.from_numpy(layer.hidden.mask))
            m.register_buffer("mask_out", torch.from_numpy(layer.out.mask))
            return m
        if isinstance(layer, L.Dense):
            return nn.Linear(layer.in_features, layer.out_features)
        if isinstance(layer, L.Conv2d):
            return nn.Conv2d(layer.in_hwc[2], layer.channels, layer.k, layer.s, layer.p)
        if isinstance(layer, L.ConvTranspose2d):
            return nn.ConvTranspose2d(layer.in_hwc[2], layer.channels, layer.k, layer.s, layer.p, layer.op)
        return None

    def nchw(h, hwc):
        return h.reshape(h.shape[0], *hwc).permute(0, 3, 1, 2) if h.dim() == 2 else h

    def rows(h):
        return h.permute(0, 2, 3, 1).reshape(h.shape[0], -1) if h.dim() == 4 else h

    class TorchVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = stack
            self.mods = nn.ModuleDict({layer.name.replace(".", "_"): m for layer in stack
                                       if (m := module(layer)) is not None})

        def forward(self, x, eps):
            """``(logits rows, mu, logvar, sum of the flow steps' log sig)``."""
            h, mu, logvar, log_sig = x, None, None, 0.0
            for layer in self.stack:
                if isinstance(layer, L.IAFStep):    # Kingma et al. 2016, Algorithm 1
                    m = self.mods[layer.name.replace(".", "_")]
                    act = acts[layer.hidden.activation]
                    u = act(nn.functional.linear(h, m["hidden"].weight * m.mask_hidden, m["hidden"].bias))
                    head = nn.functional.linear(u, m["out"].weight * m.mask_out, m["out"].bias)
                    n = layer.out_features
                    sig = torch.sigmoid(head[:, n:] + FORGET_BIAS)
                    h = sig * h + (1 - sig) * head[:, :n]
                    log_sig = log_sig + torch.log(sig).sum(1)
                    self.z = h
                elif isinstance(layer, L.Dense):
                    h = acts[layer.activation](self.mods[layer.name.replace(".", "_")](rows(h)))
                elif isinstance(layer, (L.Conv2d, L.ConvTranspose2d)):
                    h = acts[layer.activation](self.mods[layer.name.replace(".", "_")](nchw(h, layer.in_hwc)))
                elif isinstance(layer, L.Reshape):
                    h = nchw(rows(h), layer.out_hwc)
                elif isinstance(layer, L.GaussianSampler):
                    n = layer.out_features
                    mu, logvar = h[:, :n], h[:, n:]
                    h = mu + torch.exp(0.5 * logvar) * eps
                    self.z = h
            return rows(h), mu, logvar, log_sig

        def losses(self, x, eps):
            """Per-image ``(recon, kl)`` in nats, the engine's convention
            (with flows, kl is log q(z_T|x) - log p(z_T) of this sample)."""
            out, mu, logvar, log_sig = self(x, eps)
            if cfg.likelihood == "bernoulli":
                rec = nn.functional.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
            elif cfg.likelihood == "gaussian":
                s = cfg.sigma
                rec = (0.5 * (out - x) ** 2 / s ** 2).sum(1) + cfg.input_dim * (math.log(s) + 0.5 * math.log(2 * math.pi))
            else:
                rec = ((out - x) ** 2).sum(1)
            if cfg.posterior == "iaf":
                kl = 0.5 * (self.z ** 2 - eps ** 2 - logvar).sum(1) - log_sig
            else:
                kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)
            return rec, kl

    return TorchVAE().to(device=device, dtype=dtype)


def named_tensors(tm):
    """``[(engine tensor name, torch parameter, row slice)]``: a Dense layer
    stored in parts (the ``mu | logvar`` head) is one torch Linear whose rows
    split into the engine's named tensors; an IAF step's two masked layers are
    its ``hidden`` and ``out`` Linear."""
    from fastvae.nn import layers as L
    pairs = []
    for layer in tm.stack:
        key = layer.name.replace(".", "_")
        if key not in tm.mods:
            continue
        if isinstance(layer, L.IAFStep):
            pairs += [(layer.hidden, tm.mods[key]["hidden"]), (layer.out, tm.mods[key]["out"])]
        else:
            pairs.append((layer, tm.mods[key]))
    out = []
    for layer, m in pairs:
        if isinstance(layer, L.Dense):
            r = layer.out_features // len(layer.tensors)
            for i, t in enumerate(layer.tensors):
                out += [(t + ".W", m.weight, slice(i * r, (i + 1) * r)), (t + ".b", m.bias, slice(i * r, (i + 1) * r))]
        else:
            out += [(layer.name + ".W", m.weight, slice(None)), (layer.name + ".b", m.bias, slice(None))]
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
