"""The layer stack: each layer's forward/backward pair on its own, the
layout walk, the architecture as data (custom stacks, bad stacks), and the
one restore path with its backend policy."""

import numpy as np
import pytest

import fastvae
from fastvae import ConfigError, ModelConfig, VAE, backends
from fastvae.nn import layers
from fastvae.io import checkpoint as ckpt
from fastvae.config import ACTIVATIONS, mlp_layer_specs
from fastvae.nn.layout import ParamLayout
from fastvae.io.restore import choose_backend

from conftest import assert_grad, full_gradient_check, numgrad, tiny_trainer

BE = backends.get("numpy", "float64")


def bound(layer, r):
    """A layer bound to a random flat buffer of its own (float64)."""
    lay = ParamLayout.for_layers([layer])
    params, grads = r.normal(size=lay.size) * 0.5, np.full(lay.size, np.nan)
    layer.bind(lay, params, grads)
    return lay, params, grads


def check_layer(layer, x, step, r):
    """Backward of ``sum(w * forward(x))`` against central differences in x and in every parameter."""
    lay, params, grads = bound(layer, r)
    st = layer.workspace(BE, x.shape[0], need_dx=True)
    w = r.normal(size=st.y.shape)

    def f():
        return float((w * layer.forward(BE, st, x.copy(), step)).sum())

    fval = f()
    dx = layer.backward(BE, st, w.copy(), step)
    assert_grad(dx, numgrad(f, x), fval)
    if lay.size:
        assert not np.isnan(grads).any(), "backward must write every parameter gradient"
        assert_grad(grads.copy(), numgrad(f, params), fval)


@pytest.mark.parametrize("act", ("identity",) + ACTIVATIONS)
def test_dense_pair(act, rng):
    layer = layers.Dense("enc.0", 6, 5, act, slope=0.1, alpha=0.7)
    x = rng.normal(size=(4, 6))
    check_layer(layer, x, layers.Step(None, None), rng)


def test_dense_parts_are_one_gemm_with_named_halves(rng):
    layer = layers.Dense("encoder.head", 3, 4, "identity", parts=["mu", "logvar"])
    lay, params, _ = bound(layer, rng)
    assert [e.name for e in lay] == ["encoder.mu.W", "encoder.logvar.W", "encoder.mu.b", "encoder.logvar.b"]
    np.testing.assert_array_equal(layer.W[:2], lay.view(params, "encoder.mu.W"))
    np.testing.assert_array_equal(layer.W[2:], lay.view(params, "encoder.logvar.W"))
    np.testing.assert_array_equal(layer.b[2:], lay.view(params, "encoder.logvar.b"))
    check_layer(layer, rng.normal(size=(3, 3)), layers.Step(None, None), rng)


def test_sampler_pair_includes_the_weighted_kl(rng):
    L, B, beta = 3, 4, 0.6
    layer = layers.GaussianSampler("sampler", 2 * L, L)
    eps = rng.normal(size=(B, L))
    step = layers.Step(None, eps, beta=beta, grad_scale=1.0 / B, train=True)
    head = rng.normal(size=(B, 2 * L))
    st = layer.workspace(BE, B, need_dx=True)
    w = rng.normal(size=(B, L))

    def f():   # the sampler's share of the loss: sum(w * z) + beta/B * sum(kl)
        z = layer.forward(BE, st, head, step)
        return float((w * z).sum() + beta / B * st.kl.sum())

    fval = f()
    dhead = layer.backward(BE, st, w.copy(), step)
    assert_grad(dhead, numgrad(f, head), fval)


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian", "mse"])
def test_likelihood_pair(kind, rng):
    B, D = 3, 5
    layer = layers.Likelihood("likelihood", D, kind, 0.4)
    x = rng.random((B, D))
    step = layers.Step(x, None, grad_scale=1.0 / B, train=True)
    logits = rng.normal(size=(B, D))
    st = layer.workspace(BE, B, need_dx=True)

    def f():
        return float(layer.forward(BE, st, logits, step).sum() / B)

    fval = f()
    assert_grad(layer.backward(BE, st, None, step).copy(), numgrad(f, logits), fval)


def test_layout_is_the_walk_of_the_layers():
    cfg = ModelConfig(input_dim=10, hidden=[6], latent_dim=2)
    names = [e.name for e in ParamLayout.for_config(cfg)]
    assert names == ["encoder.0.W", "encoder.0.b", "encoder.mu.W", "encoder.logvar.W", "encoder.mu.b",
                     "encoder.logvar.b", "decoder.0.W", "decoder.0.b", "decoder.out.W", "decoder.out.b"]


def custom_specs(L=2, D=10):
    return [{"type": "dense", "name": "enc.a", "units": 7, "activation": "tanh"},
            {"type": "dense", "name": "enc.b", "units": 5, "activation": "elu"},
            {"type": "dense", "name": "enc.head", "units": 2 * L, "activation": "identity"},
            {"type": "gaussian", "name": "q", "latent_dim": L},
            {"type": "dense", "name": "dec.a", "units": 6, "activation": "softplus"},
            {"type": "dense", "name": "dec.out", "units": D, "activation": "identity"},
            {"type": "likelihood", "name": "p", "kind": "bernoulli", "sigma": 0.1}]


def test_custom_stack_gradient_and_checkpoint(tmp_path):
    """A stack no --hidden form describes (an activation per layer, no split
    head): the full gradient through the sampler, and a save/load round trip
    that rebuilds it from the specs stored in the checkpoint."""
    cfg = ModelConfig(input_dim=10, latent_dim=2, dtype="float64", layers=custom_specs())
    model = full_gradient_check(cfg, beta=1.3, B=3)
    assert repr(model).startswith("VAE(10-7(tanh)-5(elu)-4-z2-6(softplus)-10,")
    p = tmp_path / "c.h5"
    ckpt.save_checkpoint(p, params=model.get_flat_params(), adam_state=None,
                         layout_table=model.layout.to_table(), config={"model": cfg.to_dict()},
                         state={"epoch": 0, "step": 0}, history=[], backend="numpy", dtype="float64")
    back = fastvae.load(p)
    assert back.config.layers == custom_specs()
    X = np.random.default_rng(0).random((5, 10))
    np.testing.assert_array_equal(back.encode(X)[0], model.encode(X)[0])


def test_reshape_layers_before_the_sampler_and_the_likelihood_keep_every_view():
    """A reshape has no buffer of its own: a stack with one right before the
    sampler and one right before the likelihood trains, encodes, decodes and
    samples as the same stack without them (same parameters, same bits).
    Before the Workspace read head and logits after each pass, decode failed
    on such a stack (its logits view was the reshape's empty slot)."""
    plain = custom_specs()
    shaped = (plain[:3] + [{"type": "reshape", "name": "enc.img", "shape": [4, 1, 1]}] + plain[3:6]
              + [{"type": "reshape", "name": "dec.img", "shape": [1, 2, 5]}] + plain[6:])
    a, b = (VAE(ModelConfig(input_dim=10, latent_dim=2, dtype="float64", layers=s), seed=3) for s in (plain, shaped))
    np.testing.assert_array_equal(a.params, b.params)
    r = np.random.default_rng(0)
    X, eps = r.random((5, 10)), r.standard_normal((5, 2))
    for x_in in (X, X[:3]):                    # a second batch size: a second workspace
        la, lb = a.loss_and_grad(x_in, eps[:len(x_in)]), b.loss_and_grad(x_in, eps[:len(x_in)])
        assert la == lb
        np.testing.assert_array_equal(a.grads, b.grads)
    for f in (lambda m: m.encode(X)[1], lambda m: m.reconstruct(X), lambda m: m.sample(4)):
        np.testing.assert_array_equal(f(a), f(b))
    ws = b.forward(X, eps)
    assert ws.logits.shape == (5, 10) and ws.mu.shape == ws.logvar.shape == (5, 2)


@pytest.mark.parametrize("change,message", [
    (lambda s: s.__setitem__(2, dict(s[2], units=5)), "needs a head of 2 x 2 = 4 units"),
    (lambda s: s.__setitem__(5, dict(s[5], units=9)), "end the decoder with 10 units"),
    (lambda s: s.__setitem__(1, dict(s[1], name="enc.a")), "names must be unique"),
    (lambda s: s.__setitem__(1, dict(s[1], kernel=3)), "unknown key"),
    (lambda s: s.__setitem__(1, dict(s[1], activation="gelu")), "unknown layer 1 ('enc.b') activation"),
    (lambda s: s.pop(3), "exactly one gaussian sampler"),
    (lambda s: s.__setitem__(3, dict(s[3], latent_dim=3)), "differs from the config's latent_dim 2"),
    (lambda s: s.__setitem__(6, dict(s[6], kind="mse")), "differs from the config's likelihood"),
    # a type that is not text ended in "TypeError: unhashable type: 'list'" (found by mutating specs)
    (lambda s: s.__setitem__(2, dict(s[2], type=["dense"])), "layer 2 must be an object with type one of"),
    (lambda s: s.__setitem__(2, dict(s[2], type={"dense": 1})), "layer 2 must be an object with type one of"),
])
def test_bad_stacks_name_the_layer(change, message):
    specs = custom_specs()
    change(specs)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        VAE(ModelConfig(input_dim=10, latent_dim=2, layers=specs))


def test_mlp_form_builds_todays_specs_and_replace_rederives():
    cfg = ModelConfig(input_dim=12, hidden=[8], latent_dim=3)
    assert cfg.layers == mlp_layer_specs(cfg)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(hidden=[4]).layers[0]["units"] == 4
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ModelConfig.from_dict([1, 2])


def test_backend_policy(capsys):
    assert choose_backend("numba", "numpy") == "numba"            # named: used (or refused later)
    assert choose_backend(None, "numpy") == "numpy"
    unavailable = [b["name"] for b in backends.available() if not b["available"]]
    if not unavailable:
        pytest.skip("every backend runs here, so there is no fallback to see")
    assert choose_backend(None, unavailable[0]) == "numpy"
    assert "using numpy" in capsys.readouterr().err


def test_resume_and_load_fall_back_when_the_writer_cannot_run(tmp_path):
    """One policy for fastvae.load, VAE.load_checkpoint and --resume: a file
    from a backend that cannot run here opens on numpy (before, --resume failed)."""
    gone = [b["name"] for b in backends.available() if not b["available"]]
    if not gone:
        pytest.skip("every backend runs here")
    t = tiny_trainer(tmp_path, epochs=1, n=200)
    t.fit(pictures=False)
    d = ckpt.read_checkpoint(tmp_path / "checkpoint.h5")
    d["config"]["train"]["backend"] = gone[0]
    ckpt.save_checkpoint(tmp_path / "checkpoint.h5", params=d["params"], adam_state=d["adam"],
                         layout_table=d["layout"], config=d["config"], state=d["state"], history=d["history"],
                         backend=gone[0], dtype="float32")
    assert fastvae.load(tmp_path / "checkpoint.h5").backend.name == "numpy"
    r = fastvae.Trainer.from_checkpoint(tmp_path / "checkpoint.h5", epochs=2, dataset=t.data, progress=False)
    assert r.backend.name == "numpy" and r.settings.backend == "numpy"
    r.fit(pictures=False)
    assert r.epoch == 2
    m = VAE(t.model_config)
    m.load_checkpoint(tmp_path / "checkpoint.h5")
    np.testing.assert_array_equal(m.get_flat_params(), r.model.get_flat_params())
