"""The code's shape, as the project's standards ask: no import cycle inside
the package (function-level imports count), and every layer type a
forward/backward pair. (Cohesion decides a module's size, not a line count:
a module is one concept.)"""

import ast
import os


from fastvae.nn import layers

from conftest import ROOT

PKG = os.path.join(ROOT, "fastvae")


def _modules():
    for base in (PKG, os.path.join(ROOT, "kernels")):
        for folder, _, files in os.walk(base):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(folder, f)


def _import_graph():
    """{module: modules of the package it imports} (absolute or relative,
    function-level imports included; ``from pkg import mod`` counts ``pkg.mod``)."""
    graph = {}
    for path in _modules():
        if not path.startswith(PKG + os.sep):
            continue
        rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        pkg = rel[:-1]
        name = ".".join(rel if rel[-1] != "__init__" else rel[:-1])
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                target = (pkg[:len(pkg) - (node.level - 1)] if node.level else []) + \
                    (node.module.split(".") if node.module else [])
                deps.add(".".join(target))
                deps.update(".".join(target + [a.name]) for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = deps
    return {m: {d for d in ds if d in graph and d != m} for m, ds in graph.items()}


def test_no_import_cycle():
    graph = _import_graph()
    assert "fastvae.nn.layers" in graph and "fastvae.nn.model" in graph["fastvae.io.restore"]
    # the package __init__ re-exports everything; cycles through it are by design
    graph = {m: ds - {"fastvae"} for m, ds in graph.items() if m != "fastvae"}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)


def test_every_layer_is_a_forward_backward_pair():
    kinds = [c for c in vars(layers).values() if isinstance(c, type) and issubclass(c, layers.Layer)
             and c is not layers.Layer]
    assert {c.__name__ for c in kinds} >= {"Dense", "GaussianSampler", "Likelihood"}
    for c in kinds:
        assert "forward" in vars(c) and "backward" in vars(c), c.__name__


def test_the_library_never_imports_the_command_line():
    """Only the command line's own modules (and ``python -m fastvae``) import
    it: the library works, and is importable, without it."""
    cli = {"fastvae.cli", "fastvae.cli.args", "fastvae.cli.explore"}
    offenders = {m: sorted(ds & cli) for m, ds in _import_graph().items()
                 if m not in cli | {"fastvae.__main__"} and ds & cli}
    assert offenders == {}, offenders


def test_each_spec_type_is_one_class_in_one_file():
    """A layer type registers once (``LAYER_TYPES``): its class builds itself
    from its spec and has its forward and backward beside each other; every
    spec type the architectures validate has one."""
    import inspect
    from fastvae.nn.architectures import _SPEC_KEYS as SPEC_TYPES
    assert set(layers.LAYER_TYPES) == set(SPEC_TYPES)
    for kind, cls in layers.LAYER_TYPES.items():
        assert cls.spec_type == kind and "from_spec" in vars(cls), kind
        files = {inspect.getsourcefile(getattr(cls, m))
                 for m in ("from_spec", "forward", "backward", "torch_forward")}      # its PyTorch twin too
        assert len(files) == 1, (kind, files)
        assert cls.torch_forward is not layers.Layer.torch_forward, kind
    twin = open(os.path.join(PKG, "bench", "torch_twin.py")).read()
    assert "isinstance(layer" not in twin                # no per-layer-type code left in the twin


def test_every_objective_is_one_class_of_the_protocol():
    """ELBO, IWAE and beta-TCVAE: each one class with the protocol's methods
    (fastvae.objectives), so the trainer has no per-objective branch."""
    from fastvae import objectives
    for cls in (objectives.ELBOObjective, objectives.IWAEObjective, objectives.BetaTCVAEObjective):
        assert cls.name and all(callable(getattr(cls, m, None)) for m in ("train_step", "idle_step", "weighted_loss"))
    src = open(os.path.join(PKG, "training", "trainer.py")).read()
    assert "objective is None" not in src and "objective is not None" not in src
    assert not [p for p in _modules() if "._walk(" in open(p).read()]
    metrics = open(os.path.join(PKG, "explore", "metrics.py")).read()      # IWAE written once
    assert "log_weights(" in metrics and "sample_posterior_into" not in metrics


def test_every_backend_primitive_is_declared_once_and_implemented_by_the_numpy_reference():
    """The contract (backends/base.py) declares each primitive without a body;
    the NumPy reference implements every one on one thread (the two-thread
    passes live in backends/cpu/worker.py); a fast backend only overrides."""
    import inspect
    from fastvae.backends.base import Backend
    from fastvae.backends.numpy_backend import NumpyBackend
    declared = [n for n, f in vars(Backend).items() if inspect.isfunction(f) and not n.startswith("_")
                and "raise NotImplementedError" in inspect.getsource(f)]
    assert {"gemm", "tc_pairwise", "sampled_kl", "iaf_gate", "im2col", "col2im", "adam_update"} <= set(declared)
    missing = [n for n in declared if n not in vars(NumpyBackend)]
    assert not missing, f"the NumPy reference does not implement {missing}"
    src = inspect.getsource(NumpyBackend)
    assert "ThreadPool" not in src and "adam_threads" not in src and "copy_threads" not in src
