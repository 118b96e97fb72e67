"""Every backend against the NumPy reference: each primitive on random inputs
with poisoned outputs, a full training step, cross-backend checkpoints, and
(on real MNIST) 2 epochs of training.

Tolerances from the arithmetic: float32 kernels may accumulate in float64 or in
another order than NumPy's pairwise sums, so results agree to a few float32
ulps of the largest value (1e-5 relative); float64 to 1e-12.
"""

import numpy as np
import pytest

import fastvae
from fastvae import DataConfig, ModelConfig, TrainConfig, Trainer, backends, datasets
from fastvae.config import ACTIVATIONS, LIKELIHOODS

from conftest import MNIST_DIR, needs_mnist

OTHER = [b["name"] for b in backends.available() if b["available"] and b["name"] != "numpy"]
OTHER_OR_SKIP = OTHER or [pytest.param("numba", marks=pytest.mark.skip(reason="no backend besides numpy here"))]
RTOL = {"float32": 1e-5, "float64": 1e-12}


def close(got, ref, dtype, what=""):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert np.all(np.isfinite(got)), f"{what}: unwritten (poisoned) or non-finite entries"
    scale = max(np.abs(ref).max(), 1e-30)
    err = np.abs(got - ref).max() / scale
    assert err <= RTOL[dtype], f"{what}: max error {err:.2e} of max |ref| > {RTOL[dtype]:.0e}"


def pair(name, dtype):
    return backends.get("numpy", dtype), backends.get(name, dtype)


def poison(*shapes_dtype):
    return [np.full(s, np.nan, dtype=d) for s, d in shapes_dtype]


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.mark.parametrize("name", OTHER_OR_SKIP)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_bias_act_and_backward(name, dtype, act):
    ref, be = pair(name, dtype)
    r = np.random.default_rng(0)
    pre0 = (r.normal(size=(33, 17)) * 3).astype(dtype)
    b = r.normal(size=17).astype(dtype)
    d0 = r.normal(size=(33, 17)).astype(dtype)
    outs = {}
    for k, bk in (("ref", ref), ("be", be)):
        pre = be.asarray(pre0)
        out, = poison(((33, 17), dtype))
        bk.bias_act(out, pre, b, act, 0.05, 0.8)
        d = d0.copy()
        bk.act_backward(d, pre, out, act, 0.05, 0.8)
        outs[k] = (pre, out, d)
    for i, w in enumerate(("pre", "out", "grad")):
        close(outs["be"][i], outs["ref"][i], dtype, f"{act} {w}")


@pytest.mark.parametrize("name", OTHER_OR_SKIP)
def test_col_sum_reparam_kl(name, dtype):
    ref, be = pair(name, dtype)
    r = np.random.default_rng(1)
    B, L = 40, 7
    a = r.normal(size=(B, 300)).astype(dtype)
    head = r.normal(size=(B, 2 * L)).astype(dtype)
    eps = r.normal(size=(B, L)).astype(dtype)
    dz = r.normal(size=(B, L)).astype(dtype)
    res = {}
    for k, bk in (("ref", ref), ("be", be)):
        cs, z, kl, std, dhead = poison(((300,), dtype), ((B, L), dtype), ((B,), dtype), ((B, L), dtype),
                                       ((B, 2 * L), dtype))
        bk.col_sum(cs, a)
        bk.reparam_kl(z, kl, std, head[:, :L], head[:, L:], eps)
        bk.reparam_kl_backward(dhead[:, :L], dhead[:, L:], dz, head[:, :L], std, eps, 0.3)
        res[k] = dict(col_sum=cs, z=z, kl=kl, std=std, dhead=dhead)
    for key in res["ref"]:
        close(res["be"][key], res["ref"][key], dtype, key)


@pytest.mark.parametrize("name", OTHER_OR_SKIP)
@pytest.mark.parametrize("kind", LIKELIHOODS)
@pytest.mark.parametrize("B,D", [(21, 50), (300, 784)])   # the second spans several row blocks
def test_likelihood(name, dtype, kind, B, D):
    ref, be = pair(name, dtype)
    r = np.random.default_rng(2)
    logits = (r.normal(size=(B, D)) * 4).astype(dtype)
    logits[0, :3] = [40, -40, 0]
    x = r.random((B, D)).astype(dtype)
    res = {}
    for k, bk in (("ref", ref), ("be", be)):
        d, n, d2, n2 = poison(((B, D), dtype), ((B,), dtype), ((B, D), dtype), ((B,), dtype))
        bk.likelihood(d, n, logits, x, kind, 0.3, 1 / B)
        bk.likelihood(d2, None, logits, x, kind, 0.3, 1 / B)     # grad only
        bk.likelihood(None, n2, logits, x, kind, 0.3, 1.0)        # loss only
        res[k] = dict(grad=d, nll=n, grad_only=d2, nll_only=n2)
    for key in res["ref"]:
        close(res["be"][key], res["ref"][key], dtype, f"{kind} {key}")


@pytest.mark.parametrize("name", OTHER_OR_SKIP)
@pytest.mark.parametrize("wd,decay", [(0.0, 1.0), (0.01, 1.0), (0.0, 0.999)])
def test_adam_update(name, dtype, wd, decay):
    ref, be = pair(name, dtype)
    r = np.random.default_rng(3)
    n = 1001
    # |p| ~ 1e-2 so that float32 rounding of p itself (ulp ~ 1e-9) stays far
    # below the update (~1e-2) whose parity is checked
    p0, g = (r.normal(size=n) * 1e-2).astype(dtype), r.normal(size=n).astype(dtype)
    m0, v0 = r.normal(size=n).astype(dtype) * 0.1, r.random(n).astype(dtype) * 0.01
    res = {}
    for k, bk in (("ref", ref), ("be", be)):
        p, m, v = p0.copy(), m0.copy(), v0.copy()
        bk.adam_update(p, g, m, v, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3 / 0.1,
                       bc2_sqrt=np.sqrt(0.001), weight_decay=wd, decay_factor=decay)
        res[k] = dict(p=p - p0, m=m, v=v)        # compare the update, not the (large) params
    for key in res["ref"]:
        close(res["be"][key], res["ref"][key], dtype, key)


@pytest.mark.parametrize("name", OTHER_OR_SKIP)
def test_gather_and_bernoulli_same_stream(name):
    ref, be = pair(name, "float32")
    r = np.random.default_rng(4)
    X = r.random((50, 9)).astype(np.float32)
    idx = r.permutation(50)[:13]
    outs = {}
    for k, bk in (("ref", ref), ("be", be)):
        o, = poison(((13, 9), np.float32))
        bk.gather_rows(o, X, idx)
        rng = bk.new_rng([5, 1])
        bk.bernoulli_(o, o.copy(), rng)
        outs[k] = o
    np.testing.assert_array_equal(outs["be"], outs["ref"])


@pytest.mark.parametrize("name", OTHER_OR_SKIP)
@pytest.mark.parametrize("lik", LIKELIHOODS)
def test_full_training_step(name, dtype, lik):
    cfg = ModelConfig(input_dim=64, hidden=[32, 16], latent_dim=4, likelihood=lik, dtype=dtype, activation="elu")
    a, b = fastvae.VAE(cfg, "numpy", seed=0), fastvae.VAE(cfg, name, seed=0)
    r = np.random.default_rng(6)
    x = r.random((24, 64)).astype(dtype)
    eps = r.normal(size=(24, 4)).astype(dtype)
    b.grads[:] = np.nan
    ra, ka = a.loss_and_grad(x, eps, 0.8)
    rb, kb = b.loss_and_grad(b.backend.asarray(x), b.backend.asarray(eps), 0.8)
    close(rb, ra, dtype, "recon")
    close(kb, ka, dtype, "kl")
    for e in a.layout:
        close(b.backend.to_host(b.layout.view(b.grads, e.name)), a.layout.view(a.grads, e.name), dtype, e.name)


@pytest.mark.parametrize("name", OTHER_OR_SKIP)
def test_checkpoints_move_between_backends(name, tmp_path):
    data = datasets.make_sprites(320, seed=2, size=16, test_fraction=0.1)
    mc = ModelConfig(input_dim=256, hidden=[24], latent_dim=3, image_shape=(16, 16))

    def trainer(backend, out, epochs):
        return Trainer(mc, TrainConfig(epochs=epochs, batch_size=32, seed=4, backend=backend),
                       DataConfig(), dataset=data, out=str(out), progress=False)

    straight = trainer("numpy", tmp_path / "a", 4)
    straight.fit(pictures=False)
    first = trainer("numpy", tmp_path / "b", 2)
    first.fit(pictures=False)
    there = Trainer.from_checkpoint(tmp_path / "b" / "checkpoint.h5", epochs=3, backend=name, dataset=data,
                                    progress=False)
    assert there.backend.name == name
    there.fit(pictures=False)
    back = Trainer.from_checkpoint(tmp_path / "b" / "checkpoint.h5", epochs=4, backend="numpy", dataset=data,
                                   progress=False)
    assert back.epoch == 3 and fastvae.load(tmp_path / "b" / "checkpoint.h5").checkpoint["meta"]["backend"] == name
    back.fit(pictures=False)
    # same shuffles and eps on both CPU backends: the trajectories agree within float32 rounding
    ls, lb = [h["train_neg_elbo"] for h in straight.history], [h["train_neg_elbo"] for h in back.history]
    np.testing.assert_allclose(lb, ls, rtol=1e-4)


@needs_mnist
@pytest.mark.parametrize("name", OTHER_OR_SKIP)
def test_two_epochs_of_real_mnist_track_numpy(name):
    ds = datasets.load(DataConfig(dataset="mnist", data_dir=MNIST_DIR, download=False))
    mc = ModelConfig(input_dim=784, hidden=[400], latent_dim=20)
    hist = {}
    for b in ("numpy", name):
        t = Trainer(mc, TrainConfig(epochs=2, batch_size=128, backend=b), DataConfig(), dataset=ds, progress=False)
        hist[b] = t.fit(pictures=False)
    for key in ("train_neg_elbo", "test_neg_elbo"):
        np.testing.assert_allclose([h[key] for h in hist[name]], [h[key] for h in hist["numpy"]], rtol=1e-3)
