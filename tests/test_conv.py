"""The convolutional layers: im2col/col2im, Conv2d and ConvTranspose2d
gradients (float64 central differences), the full conv loss through the
sampler, PyTorch's F.conv2d / F.conv_transpose2d on identical weights, the
seed's ConvNet and the Burgess net, and conv models end to end."""

import json

import numpy as np
import pytest

import fastvae
from fastvae import ConfigError, ModelConfig, VAE, backends
from fastvae.nn import layers
from fastvae.nn.layout import ParamLayout

from conftest import assert_grad, fv, full_gradient_check, numgrad
from cuda_emu import emu_param, make_backend

BE = backends.get("numpy", "float64")
# (in (H, W, C), channels, kernel, stride, padding, output_padding): odd shapes on purpose
GEOMS = [((5, 7, 2), 3, 3, 1, 0, 0), ((6, 5, 3), 2, 2, 3, 0, 2),      # stride larger than the kernel
         ((4, 4, 1), 2, 3, 2, 1, 1), ((3, 6, 2), 4, 4, 2, 2, 0)]


def test_col2im_is_the_adjoint_of_im2col(rng):
    for (hwc, _, k, s, p, _) in GEOMS:
        Ho, Wo = layers.conv.conv_out(hwc[0], k, s, p), layers.conv.conv_out(hwc[1], k, s, p)
        for B in (1, 3):
            x = rng.normal(size=(B, int(np.prod(hwc))))
            c = rng.normal(size=(B * Ho * Wo, hwc[2] * k * k))
            cols = BE.im2col(np.empty_like(c), x, hwc, k, s, p, (Ho, Wo))
            back = BE.col2im(np.empty_like(x), c, hwc, k, s, p, (Ho, Wo))
            np.testing.assert_allclose((cols * c).sum(), (x * back).sum(), rtol=1e-12)


def test_im2col_against_the_definition(rng):
    hwc, k, s, p = (5, 4, 2), 3, 2, 1
    H, W, C = hwc
    Ho, Wo = layers.conv.conv_out(H, k, s, p), layers.conv.conv_out(W, k, s, p)
    x = rng.normal(size=(2, H * W * C))
    cols = BE.im2col(np.full((2 * Ho * Wo, C * k * k), np.nan), x, hwc, k, s, p, (Ho, Wo))
    _assert_is_the_definition(cols, x, hwc, k, s, p, (Ho, Wo))


def _assert_is_the_definition(cols, x, hwc, k, s, p, out_hw):
    """Every entry of ``cols`` is the pixel im2col's definition names, 0 in the padding."""
    (H, W, C), (Ho, Wo) = hwc, out_hw
    img = x.reshape(-1, H, W, C)
    for b, oh, ow, c, i, j in np.ndindex(len(img), Ho, Wo, C, k, k):
        r, q = oh * s - p + i, ow * s - p + j
        want = img[b, r, q, c] if 0 <= r < H and 0 <= q < W else 0.0
        assert cols[(b * Ho + oh) * Wo + ow, (c * k + i) * k + j] == want


def test_im2col_and_col2im_in_chunks_with_many_channels(rng, monkeypatch):
    """With 8 channels or more the NumPy backend goes through a staging
    buffer of a few images at a time (window positions as runs of C values,
    2.5-4.4x faster at 32 channels): here 2 images a chunk over 5, so the
    last chunk is partial, checked entry by entry against the definition,
    and col2im as its adjoint."""
    hwc, k, s, p = (5, 4, 9), 3, 2, 1
    H, W, C = hwc
    Ho, Wo = layers.conv.conv_out(H, k, s, p), layers.conv.conv_out(W, k, s, p)
    be = backends.get("numpy", "float64")
    monkeypatch.setattr(be, "CONV_STAGE_BYTES", 2 * Ho * Wo * k * k * C * 8)
    x = rng.normal(size=(5, H * W * C))
    cols = be.im2col(np.full((5 * Ho * Wo, C * k * k), np.nan), x, hwc, k, s, p, (Ho, Wo))
    _assert_is_the_definition(cols, x, hwc, k, s, p, (Ho, Wo))
    c = rng.normal(size=cols.shape)
    back = be.col2im(np.empty_like(x), c, hwc, k, s, p, (Ho, Wo))
    np.testing.assert_allclose((cols * c).sum(), (x * back).sum(), rtol=1e-12)
    assert len(list(be._staged(5, (Ho, Wo, k, k, C)))) == 3


def _check(layer, r, B=2):
    lay = ParamLayout.for_layers([layer])
    params, grads = r.normal(size=lay.size) * 0.3, np.full(lay.size, np.nan)
    layer.bind(lay, params, grads)
    st = layer.workspace(BE, B, need_dx=True)
    x = r.normal(size=(B, layer.in_features))
    w = r.normal(size=(B, layer.out_features))
    step = layers.Step(None, None)

    def f():
        return float((w * layer.forward(BE, st, x.copy(), step)).sum())

    fval = f()
    dx = layer.backward(BE, st, w.copy(), step).copy()
    assert not np.isnan(grads).any()
    assert_grad(dx, numgrad(f, x), fval)
    assert_grad(grads.copy(), numgrad(f, params), fval)


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("act", ["identity", "tanh"])
def test_conv2d_pair(geom, act, rng):
    hwc, F, k, s, p, _ = geom
    _check(layers.Conv2d("c", hwc, F, k, s, p, act), rng)


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("act", ["identity", "softplus"])
def test_conv_transpose2d_pair(geom, act, rng):
    hwc, F, k, s, p, op = geom
    if layers.conv.conv_transpose_out(hwc[0], k, s, p, op) < 1:
        pytest.skip("no output")
    _check(layers.ConvTranspose2d("t", hwc, F, k, s, p, op, act), rng, B=1)


def small_conv_specs(C=2, L=2):
    """7x6xC images: conv(3, k3, s2, p1) -> 4x3x3, flatten, head; dense 12 ->
    reshape 3x2x2 -> deconv(C, k3, s3, p1, op2) -> 7x6xC... see the sizes in the test."""
    return [{"type": "conv2d", "name": "e.c", "channels": 3, "kernel": 3, "stride": 2, "padding": 1,
             "activation": "elu"},
            {"type": "dense", "name": "e.head", "units": 2 * L, "activation": "identity", "parts": ["mu", "lv"]},
            {"type": "gaussian", "name": "q", "latent_dim": L},
            {"type": "dense", "name": "d.0", "units": 12, "activation": "tanh"},
            {"type": "reshape", "name": "d.r", "shape": [3, 2, 2]},
            {"type": "conv_transpose2d", "name": "d.t", "channels": C, "kernel": 4, "stride": 3, "padding": 1,
             "output_padding": 2, "activation": "identity"},
            {"type": "likelihood", "name": "p", "kind": "bernoulli", "sigma": 0.1}]


def small_cfg(dtype="float64", C=2):
    # deconv: (2 - 1) * 3 - 2 + 4 + 2 = 7 rows and columns
    return ModelConfig(input_dim=7 * 7 * C, image_shape=(7, 7, C), latent_dim=2, dtype=dtype,
                       layers=small_conv_specs(C))


def test_full_conv_loss_gradient_through_sampler():
    m = full_gradient_check(small_cfg(), beta=0.8, B=3)
    assert repr(m).startswith("VAE(98-3x4x4(elu)-4-z2-12(tanh)-[3x2x2]-2x7x7,")


def test_shapes_that_do_not_chain_name_the_layer():
    specs = small_conv_specs()
    specs[5] = dict(specs[5], output_padding=0)
    with pytest.raises(ConfigError, match="'p' scores images of 98 pixels but the decoder before it outputs 50"):
        VAE(ModelConfig(input_dim=98, image_shape=(7, 7, 2), latent_dim=2, layers=specs))
    specs = small_conv_specs()
    specs[4] = dict(specs[4], shape=[3, 2, 3])
    with pytest.raises(ConfigError, match="'d.r' reshapes 12 values into 3x2x3 = 18"):
        VAE(ModelConfig(input_dim=98, image_shape=(7, 7, 2), latent_dim=2, layers=specs))
    with pytest.raises(ConfigError, match="conv2d.*needs an image"):
        VAE(ModelConfig(input_dim=98, latent_dim=2, layers=small_conv_specs()))
    for shape in ((10, 10), (8, 8), (2048, 2048), (48, 48)):        # 8 and 2048: powers of two out of range
        with pytest.raises(ConfigError, match=f"defined for 28x28 images and sides that are powers of two from 16 "
                                              f"to 1024 .* got {shape[0]}x{shape[1]}"):
            ModelConfig(input_dim=shape[0] * shape[1], image_shape=shape, arch="conv")


def _torch_compare(cfg, B, seed=0):
    torch = pytest.importorskip("torch")
    from fastvae.bench import torch_twin as torch_ref
    m = VAE(cfg, "numpy", seed=seed)
    r = np.random.default_rng(seed + 1)
    x, eps = r.random((B, cfg.input_dim)), r.normal(size=(B, cfg.latent_dim))
    recon, kl = m.loss_and_grad(x, eps, 1.0)
    tm = torch_ref.build(cfg)
    torch_ref.copy_from(tm, m)
    rec_t, kl_t = tm.losses(torch.from_numpy(x), torch.from_numpy(eps))
    (rec_t + kl_t).mean().backward()
    np.testing.assert_allclose(float(recon), float(rec_t.detach().sum()), rtol=1e-10)
    np.testing.assert_allclose(float(kl), float(kl_t.detach().sum()), rtol=1e-10)
    tg, ours = torch_ref.grads_by_name(tm), m.state_dict()
    g = {e.name: m.layout.view(m.grads, e.name) for e in m.layout}
    assert set(tg) == set(ours)
    for name in tg:
        scale = np.abs(tg[name]).max()
        assert np.abs(g[name] - tg[name]).max() <= 1e-10 * scale, name


def test_small_conv_net_matches_pytorch():
    _torch_compare(small_cfg(C=3), B=3)


@pytest.mark.parametrize("shape", [(28, 28), (64, 64, 3), (32, 32, 3), (16, 32)])
def test_seed_and_burgess_nets_match_pytorch(shape):
    """The seed's 28x28 net; Burgess et al.'s 64x64 net and the same net on
    other power-of-two sides (two and three stride-2 layers each way here)."""
    n = int(np.prod(shape))
    _torch_compare(ModelConfig(input_dim=n, image_shape=shape, arch="conv", latent_dim=5, dtype="float64"), B=2)


def test_the_burgess_net_is_the_papers_at_64_and_scales_by_stride_two_layers():
    """Burgess et al. 2018, appendix A.1, at 64x64: four conv(32, 4, s2, p1),
    dense 256 x2, decoder dense 256, 256, 512, reshape 32x4x4 and four
    transposed convs; another power-of-two side adds or drops stride-2 layers."""
    def net(shape):
        return repr(VAE(ModelConfig(input_dim=int(np.prod(shape)), image_shape=shape, arch="conv", latent_dim=10)))
    assert net((64, 64, 3)).startswith(
        "VAE(12288-32x32x32(relu)-32x16x16(relu)-32x8x8(relu)-32x4x4(relu)-256(relu)-256(relu)-20-z10-256(relu)-"
        "256(relu)-512(relu)-[32x4x4]-32x8x8(relu)-32x16x16(relu)-32x32x32(relu)-3x64x64, ")
    assert net((32, 32, 3)).startswith(
        "VAE(3072-32x16x16(relu)-32x8x8(relu)-32x4x4(relu)-256(relu)-256(relu)-20-z10-256(relu)-256(relu)-"
        "512(relu)-[32x4x4]-32x8x8(relu)-32x16x16(relu)-3x32x32, ")
    assert "-1024(relu)-[32x4x8]-" in net((32, 64))


def test_pytorch_default_init_bounds():
    m = VAE(ModelConfig(input_dim=784, image_shape=(28, 28), arch="conv", latent_dim=4), seed=0)
    sd = m.state_dict()
    # Conv2d: fan_in = C k k; ConvTranspose2d: torch takes fan_in from weight dim 1 = C_out k k
    for name, fan_in in (("encoder.conv1.W", 32 * 16), ("decoder.deconv0.W", 256 * 16), ("decoder.deconv1.b", 128 * 36)):
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(sd[name]).max() <= bound and np.abs(sd[name]).max() > 0.95 * bound, name


@pytest.mark.parametrize("backend", ["numba", pytest.param("cupy", marks=pytest.mark.gpu), emu_param()])
def test_conv_step_parity(backend):
    """A full conv step (im2col/col2im kernels included) against the NumPy
    reference, gradient buffer poisoned first; float32 1e-5, float64 1e-12
    (the GPU kernels, real or emulated: 1e-4 and 1e-10, fused multiply-adds
    and block reductions)."""
    if backend != "cupy-emu":
        status = {b["name"]: b for b in backends.available()}[backend]
        if not status["available"]:
            pytest.skip(f"{backend}: {status['reason']}")
    gpu = backend.startswith("cupy")
    for dtype, tol in (("float32", 1e-4 if gpu else 1e-5), ("float64", 1e-10 if gpu else 1e-12)):
        cfg = small_cfg(dtype)
        a, b = VAE(cfg, "numpy", seed=3), VAE(cfg, make_backend(backend, dtype), seed=3)
        r = np.random.default_rng(0)
        x, eps = r.random((4, cfg.input_dim)).astype(dtype), r.normal(size=(4, 2)).astype(dtype)
        b.grads[...] = np.nan
        la = a.loss_and_grad(x, eps, 1.0)
        lb = b.loss_and_grad(b.backend.asarray(x), b.backend.asarray(eps), 1.0)
        np.testing.assert_allclose([float(v) for v in lb], [float(v) for v in la], rtol=tol)
        gb = b.backend.to_host(b.grads)
        np.testing.assert_allclose(gb, a.grads, rtol=tol, atol=tol * np.abs(a.grads).max())


def test_conv_cli_trains_resumes_and_explores(tmp_path):
    run = tmp_path / "RUN"
    fv("train", "--arch", "conv", "--n-sprites", "120", "--latent", "3", "--epochs", "1", "--batch-size", "40",
       "--out", run, "--no-progress", cwd=tmp_path)
    fv("train", "--resume", run / "checkpoint.h5", "--epochs", "2", "--out", run, "--no-progress", cwd=tmp_path)
    m = fastvae.load(run / "checkpoint.h5")
    assert m.config.arch == "conv" and m.checkpoint["epoch"] == 2
    assert "32x32x32(relu)" in fv("info", run / "checkpoint.h5", cwd=tmp_path).stdout
    # exploration runs unchanged on a conv model
    fv("plot", run, "--grid", "4", "--n", "4", cwd=tmp_path)
    assert (run / "figures" / "traversals.png").stat().st_size > 1000
    res = json.loads(fv("eval", run / "checkpoint.h5", "--json", "--iwae-k", "10", cwd=tmp_path).stdout)
    assert len(res["kl_per_dim"]) == 3 and "mig" in res and res["iwae_neg_log_likelihood"] <= res["neg_elbo"] + 5
    p = fv("train", "--arch", "conv", "--hidden", "8", "--n-sprites", "50", "--out", tmp_path / "x",
           cwd=tmp_path, check=False)
    assert p.returncode == 2 and "--arch conv has its own stack" in p.stderr


# ------------------------------------------------------------------ the direct convolution algorithm
DIRECT_SHAPES = [  # (H, W, C, F, k, s, p)
    (9, 7, 5, 6, 3, 1, 1), (8, 8, 3, 4, 4, 2, 1), (10, 6, 1, 3, 5, 2, 0), (5, 5, 4, 1, 2, 3, 2), (6, 6, 16, 16, 4, 2, 1)]


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("shape", DIRECT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_direct_kernels_match_the_reference(shape, dtype, rtol):
    """The Numba direct kernels (forward, input gradient, weight gradient) against
    the NumPy reference (im2col and one GEMM), on both halves of a two-thread split."""
    pytest.importorskip("numba")
    H, W, C, F, k, s, p = shape
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    r = np.random.default_rng(3)
    B = 5
    x, dy = r.normal(size=(B, H * W * C)).astype(dtype), r.normal(size=(B, Ho * Wo * F)).astype(dtype)
    Wt = r.normal(size=(F, C, k, k)).astype(dtype)
    ref, nb = backends.get("numpy", dtype), backends.get("numba", dtype)
    nb.copy_threads, nb.COPY_SPLIT_MIN = 2, 1
    out = {}
    for be in (ref, nb):
        y, dx, dW = np.empty((B, Ho * Wo * F), dtype), np.empty((B, H * W * C), dtype), np.empty(Wt.shape, dtype)
        be.conv_direct(y, x, Wt, (H, W, C), k, s, p, (Ho, Wo))
        be.conv_direct_dx(dx, dy, Wt, (H, W, C), k, s, p, (Ho, Wo))
        be.conv_direct_dw(dW, x, dy, (H, W, C), k, s, p, (Ho, Wo))
        out[be.name] = (y, dx, dW)
    for a, b in zip(out["numpy"], out["numba"]):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * np.abs(a).max())


def test_direct_convnets_train_as_the_reference(monkeypatch):
    """A ConvNet (conv2d and conv_transpose2d layers) whose layers run the direct
    algorithm on numba: the loss and every gradient as the NumPy reference's
    (float64, 1e-12 relative), and the same bits on a second run."""
    pytest.importorskip("numba")
    monkeypatch.setenv("FASTVAE_CONV", "direct")
    cfg = small_cfg()
    r = np.random.default_rng(5)
    x, eps = r.random((4, cfg.input_dim)), r.normal(size=(4, cfg.latent_dim))
    ref = VAE(cfg, "numpy", seed=2)
    la = ref.loss_and_grad(x, eps, 0.7)
    model = VAE(cfg, "numba", seed=2)
    ws = model.workspace(4)
    algos = {type(layer).__name__: st.algo for layer, st in zip(model.layers, ws.states) if hasattr(st, "algo")}
    assert algos == {"Conv2d": "direct", "ConvTranspose2d": "direct"}
    runs = []
    for _ in range(2):
        lb = model.loss_and_grad(x, eps, 0.7)
        runs.append(model.grads.copy())
        np.testing.assert_allclose(lb, la, rtol=1e-12)
        np.testing.assert_allclose(model.grads, ref.grads, rtol=1e-12, atol=1e-12 * np.abs(ref.grads).max())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_direct_convnet_gradient_matches_central_differences(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setenv("FASTVAE_CONV", "direct")
    model = full_gradient_check(small_cfg(), beta=0.8, B=3, backend="numba")
    assert {st.algo for st in model.workspace(3).states if hasattr(st, "algo")} == {"direct"}


def test_the_algorithm_is_measured_once_and_cached(tmp_path, monkeypatch):
    from fastvae.backends.cpu import conv_choice
    monkeypatch.delenv("FASTVAE_CONV", raising=False)
    be = backends.get("numba" if any(b["name"] == "numba" and b["available"] for b in backends.available())
                      else "numpy", "float32")
    calls = {"im2col": 0, "direct": 0}

    def slow():
        calls["im2col"] += 1
        sum(range(20000))

    trials = {"im2col": slow, "direct": lambda: calls.__setitem__("direct", calls["direct"] + 1)}
    cache = str(tmp_path / "blas.json")
    assert conv_choice.choose(be, "layer A", trials, cache=cache) == "direct"
    assert calls["im2col"] == calls["direct"] == 10                    # 5 rounds, one untimed and one timed run each
    assert conv_choice.choose(be, "layer A", trials, cache=cache) == "direct" and calls["direct"] == 10
    entry = next(iter(json.loads(open(cache).read()).values()))
    assert entry["choice"] == "direct" and entry["signature"] == "conv layer A" and set(entry["ms"]) == set(trials)
    monkeypatch.setenv("FASTVAE_CONV", "im2col")
    assert conv_choice.choose(be, "layer A", trials, cache=cache) == "im2col"
    monkeypatch.setenv("FASTVAE_CONV", "fast")
    with pytest.raises(ValueError, match="FASTVAE_CONV must be one of im2col, direct, auto, got 'fast'"):
        conv_choice.choose(be, "layer B", trials, cache=cache)
