"""Every backend against the NumPy reference: each primitive on random inputs
with poisoned outputs, a full training step, cross-backend checkpoints, and
(on real MNIST) 2 epochs of training. ``cupy-emu`` is the cupy backend's own
code over the CUDA kernels compiled for the CPU (tests/cuda_emu.py): it runs
without a GPU, with the GPU tolerances.

Tolerances from the arithmetic: float32 kernels may accumulate in float64 or in
another order than NumPy's pairwise sums, so results agree to a few float32
ulps of the largest value (1e-5 relative); float64 to 1e-12.
"""

import numpy as np
import pytest

import fastvae
from fastvae import DataConfig, ModelConfig, TrainConfig, Trainer, backends, datasets
from fastvae.config import ACTIVATIONS, LIKELIHOODS

from conftest import MNIST_DIR, needs_mnist, tiny_trainer
from cuda_emu import emu_param, make_backend as make

_AVAIL = {b["name"]: b for b in backends.available()}


def _param(name):
    marks = [pytest.mark.gpu] if name == "cupy" else []
    if not _AVAIL[name]["available"]:
        marks.append(pytest.mark.skip(reason=f"{name}: {_AVAIL[name]['reason']}"))
    return pytest.param(name, marks=marks, id=name)


OTHER_OR_SKIP = [_param(n) for n in _AVAIL if n != "numpy"]
KERNELS = OTHER_OR_SKIP + [emu_param()]         # every implementation of the primitives
CPU_ONLY = [_param(n) for n in _AVAIL if n not in ("numpy", "cupy")]
# CPU kernels may only reorder float32 sums (1e-5); the GPU's fused multiply-adds and
# block reductions get the 1e-4 in float32 and 1e-10 in float64.
RTOL = {"float32": 1e-5, "float64": 1e-12}
RTOL_GPU = {"float32": 1e-4, "float64": 1e-10}
_CURRENT = {"name": "numpy"}


def close(got, ref, dtype, what=""):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert np.all(np.isfinite(got)), f"{what}: unwritten (poisoned) or non-finite entries"
    scale = max(np.abs(ref).max(), 1e-30)
    err = np.abs(got - ref).max() / scale
    tol = (RTOL_GPU if _CURRENT["name"].startswith("cupy") else RTOL)[dtype]
    assert err <= tol, f"{what}: max error {err:.2e} of max |ref| > {tol:.0e}"


def pair(name, dtype):
    _CURRENT["name"] = name
    return backends.get("numpy", dtype), make(name, dtype)


class Dev:
    """Moves test inputs to a backend's device and results back."""

    def __init__(self, bk):
        self.bk = bk

    def __call__(self, a):
        return self.bk.asarray(a, dtype=np.asarray(a).dtype)

    def poison(self, *shapes_dtype):
        return [self.bk.asarray(np.full(s, np.nan, dtype=d), dtype=d) for s, d in shapes_dtype]

    def host(self, d):
        return {k: self.bk.to_host(v) for k, v in d.items()}


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_bias_act_and_backward(name, dtype, act):
    ref, be = pair(name, dtype)
    r = np.random.default_rng(0)
    pre0 = (r.normal(size=(33, 17)) * 3).astype(dtype)
    b = r.normal(size=17).astype(dtype)
    d0 = r.normal(size=(33, 17)).astype(dtype)
    outs = {}
    for k, bk in (("ref", ref), ("be", be)):
        dv = Dev(bk)
        pre = dv(pre0)
        out, = dv.poison(((33, 17), dtype))
        bk.bias_act(out, pre, dv(b), act, 0.05, 0.8)
        d = dv(d0)
        bk.act_backward(d, pre, out, act, 0.05, 0.8)
        outs[k] = dv.host(dict(pre=pre, out=out, grad=d))
    for w in ("pre", "out", "grad"):
        close(outs["be"][w], outs["ref"][w], dtype, f"{act} {w}")


@pytest.mark.parametrize("name", KERNELS)
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
        dv = Dev(bk)
        cs, z, kl, std, dhead = dv.poison(((300,), dtype), ((B, L), dtype), ((B,), dtype), ((B, L), dtype),
                                          ((B, 2 * L), dtype))
        h, e = dv(head), dv(eps)
        bk.col_sum(cs, dv(a))
        bk.reparam_kl(z, kl, std, h, e)
        bk.reparam_kl_backward(dhead, dv(dz), h, std, e, 0.3)
        res[k] = dv.host(dict(col_sum=cs, z=z, kl=kl, std=std, dhead=dhead))
    for key in res["ref"]:
        close(res["be"][key], res["ref"][key], dtype, key)


@pytest.mark.parametrize("name", KERNELS)
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
        dv = Dev(bk)
        d, n, d2, n2 = dv.poison(((B, D), dtype), ((B,), dtype), ((B, D), dtype), ((B,), dtype))
        lg, xx = dv(logits), dv(x)
        bk.likelihood(d, n, lg, xx, kind, 0.3, 1 / B)
        bk.likelihood(d2, None, lg, xx, kind, 0.3, 1 / B)     # grad only
        bk.likelihood(None, n2, lg, xx, kind, 0.3, 1.0)       # loss only
        res[k] = dv.host(dict(grad=d, nll=n, grad_only=d2, nll_only=n2))
    for key in res["ref"]:
        close(res["be"][key], res["ref"][key], dtype, f"{kind} {key}")


@pytest.mark.parametrize("name", KERNELS)
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
        dv = Dev(bk)
        p, m, v = dv(p0), dv(m0), dv(v0)
        bk.adam_update(p, dv(g), m, v, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3 / 0.1,
                       bc2_sqrt=np.sqrt(0.001), weight_decay=wd, decay_factor=decay)
        res[k] = dv.host(dict(p=p, m=m, v=v))
        res[k]["p"] = res[k]["p"] - p0            # compare the update, not the params
    for key in res["ref"]:
        close(res["be"][key], res["ref"][key], dtype, key)


@pytest.mark.parametrize("name", CPU_ONLY)
def test_gather_and_bernoulli_same_stream(name):
    ref, be = pair(name, "float32")
    r = np.random.default_rng(4)
    X = r.random((50, 9)).astype(np.float32)
    idx = r.permutation(50)[:13]
    outs = {}
    for k, bk in (("ref", ref), ("be", be)):
        o = np.full((13, 9), np.nan, np.float32)
        bk.gather_rows(o, X, idx)
        rng = bk.new_rng([5, 1])
        bk.bernoulli_(o, o.copy(), rng)
        outs[k] = o
    np.testing.assert_array_equal(outs["be"], outs["ref"])


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("lik", LIKELIHOODS)
def test_full_training_step(name, dtype, lik):
    cfg = ModelConfig(input_dim=64, hidden=[32, 16], latent_dim=4, likelihood=lik, dtype=dtype, activation="elu")
    a, b = fastvae.VAE(cfg, "numpy", seed=0), fastvae.VAE(cfg, make(name, dtype), seed=0)
    r = np.random.default_rng(6)
    x = r.random((24, 64)).astype(dtype)
    eps = r.normal(size=(24, 4)).astype(dtype)
    _CURRENT["name"] = name
    b.grads[:] = np.nan
    ra, ka = a.loss_and_grad(x, eps, 0.8)
    rb, kb = b.loss_and_grad(b.backend.asarray(x), b.backend.asarray(eps), 0.8)
    close(float(rb), ra, dtype, "recon")
    close(float(kb), ka, dtype, "kl")
    for e in a.layout:
        close(b.backend.to_host(b.layout.view(b.grads, e.name)), a.layout.view(a.grads, e.name), dtype, e.name)


@pytest.mark.parametrize("name", OTHER_OR_SKIP)
def test_checkpoints_move_between_backends(name, tmp_path):
    data = datasets.make_sprites(320, seed=2, size=16, test_fraction=0.1)

    def trainer(backend, out, epochs):
        return tiny_trainer(out, backend, data=data, epochs=epochs, batch_size=32, seed=4)

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
    ls, lb = [h["train_neg_elbo"] for h in straight.history], [h["train_neg_elbo"] for h in back.history]
    if name == "cupy":
        # the GPU draws its own (Philox) stream: same model quality, not the same trajectory
        np.testing.assert_allclose(lb, ls, rtol=0.05)
    else:
        # same shuffles and eps on both CPU backends: the trajectories agree within float32 rounding
        np.testing.assert_allclose(lb, ls, rtol=1e-4)


@needs_mnist
@pytest.mark.parametrize("name", CPU_ONLY)
def test_two_epochs_of_real_mnist_track_numpy(name):
    ds = datasets.load(DataConfig(dataset="mnist", data_dir=MNIST_DIR, download=False))
    mc = ModelConfig(input_dim=784, hidden=[400], latent_dim=20)
    hist = {}
    for b in ("numpy", name):
        t = Trainer(mc, TrainConfig(epochs=2, batch_size=128), DataConfig(), dataset=ds, progress=False,
                    settings=fastvae.RunSettings(backend=b))
        hist[b] = t.fit(pictures=False)
    for key in ("train_neg_elbo", "test_neg_elbo"):
        np.testing.assert_allclose([h[key] for h in hist[name]], [h[key] for h in hist["numpy"]], rtol=1e-3)
