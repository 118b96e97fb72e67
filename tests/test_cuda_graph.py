"""CUDA graphs (``--cuda-graph``, fastvae/backends/cupy/cuda_graph.py).

On the CPU the emulated backend stands in for the GPU: its "capture" records
every launch with the arguments it was given and runs nothing; a "launch"
runs that list as captured (the same arrays, the same frozen scalars), which
is what a CUDA graph replay does. A per-step value frozen into the graph
(the KL weight, Adam's bias correction, a Philox counter) would change the
numbers; a replay that silently fell back to eager steps would show in the
counts. Both are asserted. With a GPU (marker ``gpu``) the same tests run
on CuPy's real stream capture.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from fastvae import DataConfig, ModelConfig, RunSettings, TrainConfig, Trainer, backends, datasets
from fastvae.backends.cupy import backend as cb
from fastvae.backends.cupy.cuda_graph import GraphUnsafeError, StepGraphs, _same
from fastvae.training.distributed import AllReduceGrads
from fastvae.errors import ConfigError
from fastvae.nn.model import VAE
from fastvae.optim.adam import Adam
from fastvae.training.parts import step_graphs

from cuda_emu import EmulatedCupyBackend, emu_param, make_backend
from test_conv import small_cfg

_cupy = {b["name"]: b for b in backends.available()}["cupy"]
GPU = pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(not _cupy["available"],
                                                                      reason=f"cupy: {_cupy['reason']}")], id="cupy")
BACKENDS = [GPU, emu_param()]


def _model(name, dtype, arch):
    be = make_backend(name, dtype)
    if arch == "conv":
        cfg = small_cfg(dtype)
    else:           # "iaf": two flow steps after the Gaussian sampler
        cfg = ModelConfig(input_dim=12, hidden=[8], latent_dim=3, dtype=dtype, likelihood="bernoulli",
                          **(dict(posterior="iaf", flows=2, flow_hidden=6) if arch == "iaf" else {}))
    model = VAE(cfg, be, seed=0)
    return be, model, Adam.for_model(model, weight_decay=0.01, decoupled=True), be.new_rng([0, 1])


def _run(name, dtype, arch, graphs, steps=7):
    """``steps`` training steps, beta, lr and the loss flag changing every step;
    returns the host state and the StepGraphs (None when eager)."""
    be, model, opt, rng = _model(name, dtype, arch)
    be.own_gemm = True                  # the GEMM kernel of graph steps (StepGraphs sets it), eager runs too
    x = be.asarray(np.random.default_rng(1).random((5, model.config.input_dim)))
    ws = model.workspace(5)

    def step(beta, lr, need):
        rng.normal_(ws.eps)
        out = model.loss_and_grad(x, ws.eps, beta, need_loss=need)
        opt.step(lr)
        return out

    g = StepGraphs(be) if graphs else None
    losses = []
    for t in range(steps):
        beta, lr, need = 0.25 * (t + 1), 1e-2 / (t + 1), t % 2 == 0
        args = (beta, lr, need)
        out = g((need,), step, *args) if g else step(*args)
        if need:
            losses.append(tuple(be.to_float(v) for v in out))
    state = [be.to_host(a).copy() for a in (model.params, opt.m, opt.v)]
    return state, (opt.t, rng.counter), losses, g


def _plain_step(name, arch):
    """``(backend, step)``: a float32 training step (noise, forward, backward,
    Adam at beta 0.5) of the ``arch`` model on a fixed batch of 5."""
    be, model, opt, rng = _model(name, "float32", arch)
    x = be.asarray(np.random.default_rng(1).random((5, model.config.input_dim)))
    ws = model.workspace(5)

    def step():
        rng.normal_(ws.eps)
        model.loss_and_grad(x, ws.eps, 0.5)
        opt.step()
    return be, step


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("arch,dtype", [("mlp", "float64"), ("mlp", "float32"), ("conv", "float64"),
                                        ("iaf", "float64"), ("iaf", "float32")])
def test_replayed_steps_equal_eager_steps_bit_for_bit(name, arch, dtype):
    eager = _run(name, dtype, arch, graphs=False)
    state, host, losses, g = _run(name, dtype, arch, graphs=True)
    for a, b in zip(eager[0], state):
        np.testing.assert_array_equal(a, b)
    assert host == eager[1] and losses == eager[2]
    # two keys (loss / no loss): one eager warm-up each, one capture each, the rest replayed
    assert dict(g.stats) == {"eager": 2, "captured": 2, "replayed": 3}


@pytest.mark.parametrize("name", BACKENDS)
def test_a_step_that_differs_from_its_capture_runs_eagerly(name):
    """Another input array on every call: the replay notices the pointer
    change, runs the step eagerly (same numbers), and after three such
    differences the key stays eager."""
    be, model, opt, rng = _model(name, "float64", "mlp")
    xs = [be.asarray(np.random.default_rng(s).random((5, 12))) for s in range(8)]
    ws = model.workspace(5)

    def step(i):
        rng.normal_(ws.eps)
        model.loss_and_grad(xs[i], ws.eps, 1.0, need_loss=False)
        opt.step()

    g = StepGraphs(be)
    for i in range(8):
        g("k", step, i)
    eager = _model(name, "float64", "mlp")
    eager[0].own_gemm = True
    e_model, e_opt, e_rng = eager[1:]
    e_ws = e_model.workspace(5)
    for i in range(8):
        e_rng.normal_(e_ws.eps)
        e_model.loss_and_grad(xs[i], e_ws.eps, 1.0, need_loss=False)
        e_opt.step()
    np.testing.assert_array_equal(be.to_host(model.params), eager[0].to_host(e_model.params))
    assert rng.counter == e_rng.counter
    # warm-up, then capture / differing replay three times, then eager for good
    assert dict(g.stats) == {"eager": 2, "captured": 3, "diverged": 3}


def test_a_replayed_launch_must_match_the_captured_one_in_every_argument():
    """What a replay compares (``cuda_graph._same``): arrays by pointer,
    shape, strides and dtype (a new view of the same memory matches), scalars
    by type and value (the kernel's C signature follows the type), nested
    tuples element by element, lengths too."""
    a = np.arange(8.0)
    ptr = lambda x: x.__array_interface__["data"][0]

    def same(x, y):
        return _same(x, y, np.ndarray, ptr)
    assert same((a, 1, np.int32(2), np.float32(0.5), "k", (4,), ((a[:4],), 3)),
                (a, 1, np.int32(2), np.float32(0.5), "k", (4,), ((a[:4],), 3)))
    assert same((a[2:],), (a[2:],))                                 # a new view, same memory
    differ = [((a[1:],), (a[:-1],)),                                # another pointer
              ((a[:3],), (a[:4],)),                                 # another shape
              ((a[::2],), (a[:4],)),                                # same pointer and shape, other strides
              ((a.view(np.int64),), (a,)),                          # other dtype
              ((a.reshape(2, 4),), (a.reshape(4, 2),)),
              ((np.int32(2),), (np.int64(2),)),                     # same value, other C type
              ((2,), (2.0,)),
              ((np.float32(0.5),), (np.float32(0.25),)),
              (((a[:4],),), ((a[1:5],),)),                          # nested
              (((1, 2),), ((1, 2, 3),)),
              ((a, 1), (a,))]
    for x, y in differ:
        assert not same(x, y) and not same(y, x), (x, y)


def test_direct_array_operations_are_refused_at_capture_and_turn_replays_eager():
    be = EmulatedCupyBackend("float64")
    a = be.asarray(np.arange(4.0))
    g = StepGraphs(be, warmup=0)
    with pytest.raises(GraphUnsafeError, match="direct array operation"):
        g("bad", lambda: be.xp.multiply(a, 2.0, out=a))
    def step(i):                 # captured clean; later calls reach past the backend
        be.gemm(out, m, m)
        if i >= 1:
            be.xp.add(out, 1.0, out=out)

    m, out = be.asarray(np.eye(2) * 2), be.zeros((2, 2))
    g("ok", step, 0)
    g("ok", step, 1)
    np.testing.assert_array_equal(out, np.eye(2) * 4 + 1)     # the suppressed GEMM caught up before the add
    assert g.stats["diverged"] == 1


@pytest.mark.parametrize("name", BACKENDS)
def test_graph_steps_run_their_gemms_on_fastvaes_kernel(name):
    """CuPy refuses cuBLAS calls on a capturing stream (``cublas.setStream``
    raises NotImplementedError; the emulator's capture does the same), so a
    backend with step graphs runs every GEMM on its own ``gemm`` kernel: the
    captured MLP step holds its 11 GEMMs as launches of that kernel."""
    from fastvae.backends.cupy.cuda_graph import capture
    be, step = _plain_step(name, "mlp")
    step()
    assert not be.own_gemm
    if name == "cupy-emu":
        with pytest.raises(NotImplementedError, match="cuBLAS API during stream capture"):
            capture(be, step)
    g = StepGraphs(be)
    assert be.own_gemm
    for _ in range(3):
        g("k", step)
    assert g.stats["replayed"] == 1
    if name == "cupy-emu":
        ops = g._graphs["k"].ops
        assert sum(f is be._fn("gemm") for f, _, _ in ops) == 11 and not any(f is cb._matmul for f, _, _ in ops)


def test_step_graphs_need_a_graph_backend():
    with pytest.raises(GraphUnsafeError, match="has no CUDA graphs; use backend='cupy'"):
        StepGraphs(backends.get("numpy"))


@pytest.fixture
def cupy_registry(request, monkeypatch):
    if request.param == "cupy-emu":
        monkeypatch.setitem(backends._REGISTRY, "cupy", (lambda: EmulatedCupyBackend, lambda: ""))
    return request.param


@pytest.mark.parametrize("objective", ["elbo", "iwae", "btcvae", "iwae-iaf"])
@pytest.mark.parametrize("cupy_registry", BACKENDS, indirect=True)
def test_training_with_cuda_graph_equals_training_without(tmp_path, cupy_registry, objective, monkeypatch):
    """Two epochs with a KL warm-up, a cosine learning rate, gradient
    clipping, dynamic binarization, the loss every 3 steps and a last partial
    batch (70 = 4 x 16 + 6 images): the same parameters, history and
    checkpoint as eager steps,
    for the ELBO, the IWAE objective (K = 3: its noise drawn inside the step)
    and beta-TCVAE (beta in its pairwise kernels and its loss, changing every
    step): the objectives' arithmetic runs as array operations. IWAE through
    IAF steps: their backward weighs each row by its importance weight (an
    array in place of the per-step scalar)."""
    monkeypatch.setattr(cb.CupyBackend, "own_gemm", True)     # the GEMM kernel of graph steps, eager run too
    data = datasets.make_sprites(78, seed=2, size=4)
    flows = dict(posterior="iaf", flows=2, flow_hidden=5) if objective == "iwae-iaf" else {}
    mc = ModelConfig(input_dim=16, hidden=[6], latent_dim=2, image_shape=(4, 4), dtype="float64", **flows)
    runs = {}
    for graph in (False, True):
        tc = TrainConfig(epochs=2, batch_size=16, binarize=True, loss_every=3,
                         beta_schedule="linear", beta_warmup=1.5, beta_max=4.0, lr_schedule="cosine", lr=3e-3,
                         clip_grad_norm=0.5,
                         objective=objective.split("-")[0], iwae_k=3)
        t = Trainer(mc, tc, DataConfig(), dataset=data, out=str(tmp_path / str(graph)), progress=False,
                    settings=RunSettings(backend="cupy", cuda_graph=graph))
        t.fit(pictures=False)
        runs[graph] = t
    a, b = runs[False], runs[True]
    np.testing.assert_array_equal(a.model.get_flat_params(), b.model.get_flat_params())
    assert [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s", "warmup_s", "rss_mb")} for r in a.history] == \
           [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s", "warmup_s", "rss_mb")} for r in b.history]
    assert a.graphs is None
    # keys: full batch with/without loss, last batch (always with loss). (beta never equals 1 exactly here:
    # at beta = 1 beta-TCVAE skips its pairwise gradient kernels, a different step that runs eagerly)
    assert b.graphs.stats["replayed"] >= 4 and b.graphs.stats["diverged"] == 0, b.graphs.stats
    r = Trainer.from_checkpoint(tmp_path / "True" / "checkpoint.h5", epochs=3, backend="numpy", dataset=data,
                                progress=False)
    assert not r.settings.cuda_graph and r.graphs is None
    assert "cuda_graph" not in r.train_config.to_dict()           # a run setting, not part of the experiment
    r = Trainer.from_checkpoint(tmp_path / "True" / "checkpoint.h5", epochs=3, dataset=data, progress=False,
                                cuda_graph=True, out=str(tmp_path / "again"))
    assert r.settings == RunSettings(backend="cupy", cuda_graph=True) and r.graphs is not None


def test_cuda_graph_is_refused_where_it_cannot_hold_the_step_and_allowed_with_clipping(monkeypatch):
    with pytest.raises(ConfigError, match="cupy backend only"):
        RunSettings(cuda_graph=True, backend="numpy")
    with pytest.raises(ConfigError, match="own GEMM kernel in plain float32 .* drop tf32 or cuda_graph"):
        RunSettings(cuda_graph=True, tf32=True, backend="cupy")
    monkeypatch.setitem(backends._REGISTRY, "cupy", (lambda: EmulatedCupyBackend, lambda: ""))
    data = datasets.make_sprites(40, seed=2, size=4)
    mc = ModelConfig(input_dim=16, hidden=[6], latent_dim=2, image_shape=(4, 4), dtype="float64")
    model = VAE(mc, "cupy", seed=0)
    with pytest.raises(ConfigError, match="not the all-reduce"):
        step_graphs(RunSettings(backend="cupy", cuda_graph=True), model, SimpleNamespace(hooks=[AllReduceGrads(None)]))
    t = Trainer(mc, TrainConfig(batch_size=8, clip_grad_norm=1.0), DataConfig(),
                dataset=data, progress=False, settings=RunSettings(backend="cupy", cuda_graph=True))
    assert t.graphs is not None


def test_bench_times_the_graph_replay_with_its_capture_in_the_warm_up(monkeypatch):
    from fastvae.bench import harness as benchmark
    monkeypatch.setitem(backends._REGISTRY, "cupy", (lambda: EmulatedCupyBackend, lambda: ""))
    wl = dict(input_dim=12, hidden=[8], latent_dim=3, batch_size=5)
    rows = [benchmark.bench_backend("cupy", wl, "float64", seconds=0.01, graph=g, settle=0) for g in (False, True)]
    assert [r["backend"] for r in rows] == ["cupy", "cupy-graph"]
    assert rows[0]["gemm_calls"] == rows[1]["gemm_calls"] == 11        # 4 dense layers: 4 forward, 7 backward
    assert "gemm_kernel" not in rows[0] and rows[1]["gemm_kernel"] == "fastvae"    # graph steps: not cuBLAS
    assert all(r["ms_per_step"] > 0 and r["chunks"] >= 5 and r["ms_p25"] <= r["ms_per_step"] <= r["ms_p75"]
               for r in rows)


def test_cli_trains_with_cuda_graph_and_reports_the_replays(tmp_path):
    """``fastvae train --backend cupy --cuda-graph`` end to end in a
    subprocess, the emulated backend registered as ``cupy``."""
    import os
    import subprocess
    import sys
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 4, 4)))
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); from cuda_emu import EmulatedCupyBackend; "
            "from fastvae import backends; backends._REGISTRY['cupy'] = (lambda: EmulatedCupyBackend, lambda: ''); "
            "from fastvae.cli import main; sys.exit(main(['train', '--dataset', 'x.npy', '--backend', 'cupy', "
            "'--cuda-graph', '--epochs', '2', '--batch-size', '8', '--hidden', '6', '--latent', '2', "
            "'--likelihood', 'gaussian', '--no-progress', '--out', 'run']))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    # 36 training images: 4 batches of 8 and one of 4 per epoch; batch 8: warm-up, capture, 6 replays;
    # batch 4: warm-up in epoch 1, capture in epoch 2
    assert "CUDA graphs: 2 captured, 6 replays, 0 ran eagerly after a difference, 2 eager warm-up steps" \
        in p.stdout, p.stdout


def test_the_readme_loop_replays(monkeypatch):
    """The README's own-loop example ("As a library"), smaller, on the emulated backend."""
    from fastvae import VAE, Adam, ModelConfig
    monkeypatch.setitem(backends._REGISTRY, "cupy", (lambda: EmulatedCupyBackend, lambda: ""))
    model = VAE(ModelConfig(input_dim=12, hidden=[8], latent_dim=3), "cupy", seed=0)
    opt, rng = Adam.for_model(model), model.backend.new_rng([0, 1])
    ws = model.workspace(4)
    graphs = StepGraphs(model.backend)
    data = np.random.default_rng(0).random((6, 4, 12))

    def step(beta, lr):
        rng.normal_(ws.eps)
        model.loss_and_grad(ws.x, ws.eps, beta, need_loss=False)
        opt.step(lr)

    for t in range(6):
        model.backend.copy_(ws.x, data[t])
        graphs(4, step, min(1.0, t / 3), 1e-3)
    assert dict(graphs.stats) == {"eager": 1, "captured": 1, "replayed": 4}


def test_bench_gpu_mode_reports_eager_and_graph_rows(monkeypatch):
    """``fastvae bench --gpu``'s code path on the emulated backend (a tiny
    workload; this PyTorch has no CUDA, which becomes an error row)."""
    from fastvae.bench import harness as benchmark
    monkeypatch.setitem(backends._REGISTRY, "cupy", (lambda: EmulatedCupyBackend, lambda: ""))
    monkeypatch.setitem(benchmark.WORKLOADS, "tiny", dict(input_dim=12, hidden=[8], latent_dim=3, batch_size=5))
    monkeypatch.setattr(benchmark, "gpu_peak_gemm_gflops", lambda dtype, tf32: 1000.0)
    lines = []
    rows = benchmark.run(["tiny"], ["cupy"], "float64", seconds=0.01, torch_peer=True, torch_device="cuda",
                         log=lines.append)
    by = {r["backend"]: r for r in rows}
    assert by["cupy"]["ms_per_step"] > 0 and by["cupy-graph"]["ms_per_step"] > 0
    # the graph's GEMMs alone: those of the eager step on its own GEMM kernel, not cuBLAS's
    assert by["cupy-graph"]["gemm_only_ms"] == by["cupy-owngemm"]["gemm_only_ms"] > 0
    assert by["cupy-owngemm"]["gemm_kernel"] == "fastvae" and "gemm_kernel" not in by["cupy"]
    table = benchmark.markdown(rows)
    assert all(f"| tiny | {b} |" in table for b in ("cupy", "cupy-owngemm", "cupy-graph"))
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = None
    if has_cuda is False:
        assert "error" in by["torch"] and any("PyTorch on cuda unavailable" in line for line in lines)


def test_the_graph_host_benchmark_times_replays_of_every_launch(tmp_path, monkeypatch):
    """``bench/graph_host.py``: its launch count is the step's (every ``_op``
    call of an eager step), its replays stayed replays, a row per workload."""
    import json
    import os
    import sys
    from fastvae.bench.harness import workload_config
    from fastvae.bench.workloads import workload
    from test_bench_timing import _bench_script
    gh = _bench_script("graph_host")
    names = ["12-8-3/b5", "conv28-4/b3"]
    launches = []
    for name in names:             # the step's device operations, counted, none run
        wl, be = workload(name), EmulatedCupyBackend("float32")
        be.own_gemm = True                 # as under StepGraphs: GEMMs on the gemm kernel (and its slice sums)
        calls = []
        be._op = lambda f, *a, **k: calls.append(f)
        model = VAE(workload_config(wl, "float32"), be, seed=0)
        opt, rng, ws = Adam.for_model(model), be.new_rng([0, 1]), model.workspace(wl["batch_size"])
        rng.normal_(ws.eps)
        model.loss_and_grad(be.zeros((wl["batch_size"], model.config.input_dim)), ws.eps, 1.0)
        opt.step()
        launches.append(len(calls))
    monkeypatch.setattr(sys, "argv", ["graph_host", "--workloads", *names, "--steps", "3",
                                      "--out", str(tmp_path), "--name", "gh"])
    gh.main()
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "gh.jsonl"))]
    assert [r["workload"] for r in rows] == names
    assert [r["ops"] for r in rows] == launches and launches[0] == 28 and launches[1] > 28
    for r in rows:
        assert 0 < r["python_us"] and 0 < r["replay_us"] < 1e6
    assert "| conv28-4/b3 |" in open(os.path.join(tmp_path, "gh.md")).read()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_per_step_values_reach_the_kernels_through_their_own_slots(dtype):
    """The slot views a step's launches get (:meth:`Recording.floats`,
    :meth:`Recording.counter`) show, after the upload, exactly the values
    staged for them: float slots in the backend's dtype (64 of them in
    float32, past the first 32 words), counters in the words after those."""
    from fastvae.backends.cupy.cuda_graph import Recording
    be = EmulatedCupyBackend(dtype)
    rec = Recording(be)
    n_float = rec._float.size
    first = [0.5 + i for i in range(n_float - 5)]
    last = [-1.0 - i for i in range(5)]
    views = [rec.floats(first), rec.floats(last), rec.counter(2**40 + 3), rec.counter(7)]
    rec._upload()
    np.testing.assert_array_equal(views[0], np.array(first, dtype))
    np.testing.assert_array_equal(views[1], np.array(last, dtype))
    assert views[2].dtype == np.uint64 and [int(views[2][0]), int(views[3][0])] == [2**40 + 3, 7]
    with pytest.raises(GraphUnsafeError, match=f"more than {n_float} per-step values"):
        rec.floats([1.0])


@pytest.mark.parametrize("arch", ["mlp", "conv", "iaf"])
def test_a_replay_meets_the_captured_arrays_themselves(arch, monkeypatch):
    """Every array a replayed step hands its launches is the object captured
    (the layers keep their reshaped views, the graph its slot views), so each
    check passes at its identity test instead of comparing pointers, shapes
    and strides: what keeps a replay's host time low."""
    from fastvae.backends.cupy.cuda_graph import Recording
    be, step = _plain_step("cupy-emu", arch)
    g = StepGraphs(be)
    g("k", step)
    g("k", step)                         # eager, captured
    fresh, checked = [], [0]
    op = Recording.op

    def spy(self, f, args, kw):
        def walk(a, b):
            for u, v in zip(a, b):
                if isinstance(u, np.ndarray):
                    checked[0] += 1
                    if u is not v:
                        fresh.append(u.shape)
                elif type(u) is tuple:
                    walk(u, v)
        walk(args, self.ops[self._pos][1])
        return op(self, f, args, kw)
    monkeypatch.setattr(Recording, "op", spy)
    g("k", step)
    assert g.stats["replayed"] == 1 and checked[0] > 20 and fresh == []


def test_a_state_view_is_kept_while_its_array_is_the_same():
    from fastvae.nn.layers.base import State
    st, a, b = State(), np.zeros(12), np.zeros(12)
    v = st.view("x", a, 3, -1)
    assert v.shape == (3, 4) and np.shares_memory(v, a)
    assert st.view("x", a, 3, -1) is v and st.view("y", a, 3, -1) is not v
    w = st.view("x", b, 3, -1)
    assert w is not v and np.shares_memory(w, b) and st.view("x", b, 3, -1) is w
    assert len(st._views) == 2                  # one view per key, the old array let go
    assert st.view("x", b, 4, 3).shape == (4, 3) and st.view("x", b, 3, -1) is w


def test_a_split_gemm_captured_first_thing_allocates_its_slices_inside_the_capture():
    """A GEMM whose K is split needs a (slices, M, N) buffer: first needed
    inside a capture (no eager step before), it comes from the graph's pool
    instead of being refused as an array operation; replays give the eager
    product, bit for bit."""
    be = EmulatedCupyBackend("float64")
    rng = np.random.default_rng(0)
    a, b = be.asarray(rng.standard_normal((3, 300))), be.asarray(rng.standard_normal((300, 200)))
    out = be.zeros((3, 200))
    g = StepGraphs(be, warmup=0)
    for _ in range(3):
        g("k", be.gemm, out, a, b)
    assert dict(g.stats) == {"captured": 1, "replayed": 2}
    assert sum(f is be._fn("gemm_sum") for f, _, _ in g._graphs["k"].ops) == 1
    replayed = be.to_host(out).copy()
    out[...] = np.nan
    be.gemm(out, a, b)                       # eager, on the same kernel (StepGraphs set own_gemm)
    np.testing.assert_array_equal(be.to_host(out), replayed)
    np.testing.assert_allclose(replayed, be.to_host(a) @ be.to_host(b), rtol=1e-12, atol=1e-12)
