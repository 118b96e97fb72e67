"""The VAE-specific layers: the Gaussian sampler (reparameterization + KL)
and the likelihood (reconstruction term)."""

from __future__ import annotations

import math

from fastvae.errors import ConfigError
from fastvae.nn.layers.base import Layer, State


def _split_head(xp, x, head, ctx):
    """``head = x[:, :2L]`` and ``ctx = x[:, 2L:]``, both contiguous."""
    head[...] = x[:, :head.shape[1]]
    ctx[...] = x[:, head.shape[1]:]


def _join_head(xp, dhead, dctx, dx):
    """``dx = [dhead | dctx]``."""
    dx[:, :dhead.shape[1]] = dhead
    dx[:, dhead.shape[1]:] = dctx


def _zero(xp, a):
    a[...] = 0


class GaussianSampler(Layer):
    """The reparameterized diagonal Gaussian posterior and its KL to N(0, I).

    x: the encoder's head ``(B, 2L) = [mu | logvar]``, or ``(B, 2L + C) =
    [mu | logvar | h]`` with a context h for the flow steps after it
    (``context = C``: the sampler hands h on in ``step.context`` and takes
    its gradient from ``step.dcontext``, which the steps add to); y: ``z (B, L)``.
    Forward: ``std = exp(logvar/2)``, ``z = mu + std * eps`` (Kingma & Welling
    2014, Sec. 2.4) and per image ``kl = -1/2 sum_j (1 + logvar - mu^2 -
    exp(logvar))`` nats (ibid., Appendix B). Backward: ``dmu = dz + c mu``,
    ``dlogvar = (dz eps std + c (std^2 - 1)) / 2`` with ``c = beta / B`` the
    weight of each image's KL in the loss. Both are one fused kernel.

    ``sampled=True`` (when flow steps follow, whose KL has no closed form):
    ``kl`` is the single-sample estimate ``log q(z|x) - log p(z)``
    (:meth:`Backend.sampled_kl`), which the flow steps continue.
    """

    spec_type = "gaussian"

    @classmethod
    def from_spec(cls, spec, n, hwc, ctx):
        return cls(spec["name"], n, spec["latent_dim"], sampled=ctx.flows, context=spec.get("context", 0))

    def label(self) -> str:
        return f"z{self.out_features}"

    def __init__(self, name, in_features, latent_dim, sampled=False, context=0):
        if in_features != 2 * latent_dim + context:
            what = f"2 x {latent_dim}" + (f" + a context of {context}" if context else "")
            raise ConfigError(f"layer {name!r} samples latent_dim {latent_dim} and needs a head of "
                              f"{what} = {2 * latent_dim + context} units before it, got {in_features}")
        self.name, self.in_features, self.out_features = name, in_features, latent_dim
        self.sampled, self.context = sampled, context

    def workspace(self, be, B, need_dx):
        st = State()
        L, C = self.out_features, self.context
        st.y, st.std, st.kl = be.empty((B, L)), be.empty((B, L)), be.empty((B,))
        st.dx = be.empty((B, 2 * L + C)) if need_dx else None
        if C:
            st.head, st.ctx, st.dctx = be.empty((B, 2 * L)), be.empty((B, C)), be.empty((B, C))
            st.dhead = be.empty((B, 2 * L)) if need_dx else None
        return st

    def forward(self, be, st, x, step):
        if self.context:
            be.array_op(_split_head, x, st.head, st.ctx)
            be.array_op(_zero, st.dctx)
            step.context, step.dcontext = st.ctx, st.dctx
            x = st.head
        st.x = x
        kl = st.kl if step.need_loss else None
        sampled = self.sampled or step.sampled_kl
        be.reparam_kl(st.y, None if sampled else kl, st.std, x, step.eps)
        if sampled and kl is not None:
            be.sampled_kl(kl, st.y, step.eps, x)
        step.kl = kl
        return st.y

    def backward(self, be, st, dy, step):
        if st.dx is None:
            return None
        k = step.beta * step.grad_scale
        dhead = st.dhead if self.context else st.dx
        if self.sampled or step.sampled_kl:
            be.sampled_kl_backward(dhead, dy, st.y, st.std, step.eps, k)
        else:
            be.reparam_kl_backward(dhead, dy, st.x, st.std, step.eps, k)
        if self.context:
            be.array_op(_join_head, dhead, st.dctx, st.dx)
        return st.dx


    def torch_forward(self, twin, mod, h):
        n = self.out_features
        twin.mu, twin.logvar, twin.context = h[:, :n], h[:, n:2 * n], h[:, 2 * n:]
        twin.z = twin.mu + twin.torch.exp(0.5 * twin.logvar) * twin.eps
        return twin.z


class Likelihood(Layer):
    """The reconstruction term: per-image negative log-likelihood ``nll (B,)``
    in nats, summed over pixels, of the targets ``step.x (B, D)`` under the
    decoder output ``x = logits (B, D)``.

    bernoulli: nll = softplus(l) - x l, grad = sigmoid(l) - x (logits);
    gaussian: nll = (l - x)^2 / (2 sigma^2) + log sigma + log(2 pi)/2,
    grad = (l - x) / sigma^2 (fixed sigma, pixel units); mse: nll = (l - x)^2,
    grad = 2 (l - x). The gradient ``dx = grad_scale * grad`` is computed in
    the same fused pass as the forward (one read of the logits), so
    ``backward`` only hands it on.
    """

    spec_type = "likelihood"

    @classmethod
    def from_spec(cls, spec, n, hwc, ctx):
        if n != ctx.input_dim:
            raise ConfigError(f"layer {spec['name']!r} scores images of {ctx.input_dim} pixels but the "
                              f"decoder before it outputs {n}; end the decoder with {ctx.input_dim} units")
        return cls(spec["name"], n, spec["kind"], spec["sigma"])

    def __init__(self, name, in_features, kind, sigma):
        self.name, self.in_features, self.out_features = name, in_features, 1
        self.kind, self.sigma = kind, sigma

    def workspace(self, be, B, need_dx):
        st = State()
        st.y = be.empty((B,))                      # nll
        st.dx = be.empty((B, self.in_features)) if need_dx else None
        return st

    def forward(self, be, st, x, step):
        be.likelihood(st.dx if step.train else None, st.y if step.need_loss else None, x, step.x,
                      self.kind, self.sigma, step.grad_scale)
        return st.y

    def backward(self, be, st, dy, step):
        return st.dx

    def torch_forward(self, twin, mod, h):
        return h

    def torch_nll(self, twin, logits, x):
        """Per-image negative log-likelihood (nats) in PyTorch, as :meth:`forward` sums it."""
        nn = twin.nn
        if self.kind == "bernoulli":
            return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        if self.kind == "gaussian":
            s = self.sigma
            return (0.5 * (logits - x) ** 2 / s ** 2).sum(1) + x.shape[1] * (math.log(s) + 0.5 * math.log(2 * math.pi))
        return ((logits - x) ** 2).sum(1)
