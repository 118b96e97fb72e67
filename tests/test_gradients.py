"""Every hand-derived gradient against float64 central differences.

Tolerance from the arithmetic: with step h = 1e-6 in float64 the central
difference has truncation error ~h^2 |f'''| ~ 1e-12 and rounding error
~ 2^-52 |f| / h ~ 2e-10 |f|; we allow 1e-7 * (1 + |f|) + 1e-6 * max|grad|.
"""

import itertools

import numpy as np
import pytest

from fastvae import ModelConfig, VAE, backends
from fastvae.config import ACTIVATIONS, LIKELIHOODS

from conftest import assert_grad, numgrad
from conftest import full_gradient_check as _full_check


@pytest.fixture
def be():
    return backends.get("numpy", "float64")


def away_from_zero(a, margin=1e-3):
    return np.where(np.abs(a) < margin, margin * np.sign(a + 1e-30) * 2, a)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_forward_backward(be, rng, act):
    pre0 = away_from_zero(rng.normal(size=(5, 7)) * 2)
    b = rng.normal(size=7)
    w = rng.normal(size=(5, 7))

    def f():
        pre = pre0.copy()
        out = np.empty_like(pre)
        be.bias_act(out, pre, b, act, 0.1, 0.7)
        return float((w * out).sum())

    pre = pre0.copy()
    out = np.empty_like(pre)
    be.bias_act(out, pre, b, act, 0.1, 0.7)
    np.testing.assert_allclose(pre, pre0 + b, rtol=0, atol=0)   # pre keeps pre-activation
    ref = {"relu": np.maximum(pre, 0), "tanh": np.tanh(pre), "sigmoid": 1 / (1 + np.exp(-pre)),
           "leaky_relu": np.where(pre > 0, pre, 0.1 * pre), "elu": np.where(pre > 0, pre, 0.7 * np.expm1(pre)),
           "softplus": np.log1p(np.exp(pre))}[act]
    np.testing.assert_allclose(out, ref, rtol=1e-14, atol=1e-15)
    d = w.copy()
    be.act_backward(d, pre, out, act, 0.1, 0.7)
    # d/dpre0 == d/db summed; check against numeric derivative in pre0
    assert_grad(d, numgrad(f, pre0), f())


def test_reparam_kl_values_and_gradients(be, rng):
    B, L = 4, 3
    mu, logvar, eps = rng.normal(size=(B, L)), rng.normal(size=(B, L)), rng.normal(size=(B, L))
    wz, ckl = rng.normal(size=(B, L)), 0.37

    def run():
        z, kl, std = np.empty((B, L)), np.empty(B), np.empty((B, L))
        be.reparam_kl(z, kl, std, np.concatenate([mu, logvar], axis=1), eps)
        return z, kl, std

    z, kl, std = run()
    np.testing.assert_allclose(z, mu + np.exp(0.5 * logvar) * eps, rtol=1e-14)
    np.testing.assert_allclose(kl, -0.5 * (1 + logvar - mu ** 2 - np.exp(logvar)).sum(1), rtol=1e-13)
    f = lambda: float((wz * run()[0]).sum() + ckl * run()[1].sum())
    dhead = np.empty((B, 2 * L))
    be.reparam_kl_backward(dhead, wz, np.concatenate([mu, logvar], axis=1), std, eps, ckl)
    dmu, dlv = dhead[:, :L], dhead[:, L:]
    assert_grad(dmu, numgrad(f, mu), f())
    assert_grad(dlv, numgrad(f, logvar), f())


def test_sampler_uses_variance_consistently_with_kl(be):
    """numpy-ml's bug: sampling with exp(logvar) as the std while the KL reads
    it as a variance. A Monte Carlo KL from the sampler's own z must match the
    analytic KL; with 400k samples the MC standard error is ~0.005 nats."""
    rng = np.random.default_rng(7)
    n, L = 400_000, 2
    mu = np.tile([[0.8, -0.3]], (n, 1))
    logvar = np.tile([[-1.2, 0.9]], (n, 1))
    eps = rng.normal(size=(n, L))
    z, kl, std = np.empty((n, L)), np.empty(n), np.empty((n, L))
    be.reparam_kl(z, kl, std, np.concatenate([mu, logvar], axis=1), eps)
    var = np.exp(logvar[0])
    np.testing.assert_allclose(z.var(0), var, rtol=0.02)
    log_q = -0.5 * (((z - mu) ** 2) / var + logvar + np.log(2 * np.pi)).sum(1)
    log_p = -0.5 * (z ** 2 + np.log(2 * np.pi)).sum(1)
    mc = float((log_q - log_p).mean())
    assert abs(mc - kl[0]) < 0.03, (mc, kl[0])


@pytest.mark.parametrize("kind", LIKELIHOODS)
def test_likelihood_values_and_gradient(be, rng, kind):
    B, D, sigma = 3, 6, 0.3
    logits = rng.normal(size=(B, D)) * 3
    x = rng.random((B, D))
    nll, dl = np.empty(B), np.empty((B, D))
    be.likelihood(dl, nll, logits, x, kind, sigma, 1.0)
    if kind == "bernoulli":
        p = 1 / (1 + np.exp(-logits))
        ref = -(x * np.log(p) + (1 - x) * np.log1p(-p)).sum(1)
    elif kind == "gaussian":
        ref = (0.5 * ((x - logits) / sigma) ** 2 + np.log(sigma) + 0.5 * np.log(2 * np.pi)).sum(1)
    else:
        ref = ((x - logits) ** 2).sum(1)
    np.testing.assert_allclose(nll, ref, rtol=1e-12)

    def f():
        out = np.empty(B)
        be.likelihood(None, out, logits, x, kind, sigma, 1.0)
        return float(out.sum())

    assert_grad(dl, numgrad(f, logits), f())
    dl2 = np.empty((B, D))
    be.likelihood(dl2, None, logits, x, kind, sigma, 0.25)        # grad_scale, no loss
    np.testing.assert_allclose(dl2, 0.25 * dl, rtol=1e-14)


@pytest.mark.parametrize("act,lik", list(itertools.product(ACTIVATIONS, LIKELIHOODS)))
def test_full_loss_gradient_through_sampler(act, lik):
    cfg = ModelConfig(input_dim=10, hidden=[7, 5], latent_dim=3, activation=act, likelihood=lik,
                      dtype="float64", sigma=0.5)
    _full_check(cfg)


@pytest.mark.parametrize("hidden,dec", [([], None), ([6], [4, 5]), ([8, 6, 4], [])])
def test_full_gradient_other_depths(hidden, dec):
    cfg = ModelConfig(input_dim=9, hidden=hidden, decoder_hidden=dec, latent_dim=2, dtype="float64")
    m = _full_check(cfg, beta=2.5, B=3)
    enc = [9] + hidden + [4]                             # the head: 2 x latent_dim outputs
    dec = [2] + (list(reversed(hidden)) if dec is None else dec) + [9]
    expected = sum(a * b + b for sizes in (enc, dec) for a, b in zip(sizes, sizes[1:]))
    assert m.num_params == expected


def test_every_gradient_entry_is_written():
    """Poison the gradient buffer: backward must overwrite every element."""
    cfg = ModelConfig(input_dim=12, hidden=[5], latent_dim=3, dtype="float64")
    m = VAE(cfg, "numpy", seed=3)
    r = np.random.default_rng(0)
    x, eps = r.random((4, 12)), r.normal(size=(4, 3))
    m.grads[:] = np.nan
    m.loss_and_grad(x, eps, 1.0)
    assert np.all(np.isfinite(m.grads))
