"""The CuPy API the GPU code calls exists in the installed CuPy.

The emulator (tests/cuda_emu.py) runs the kernels and the backend's wrappers
over NumPy arrays, so CuPy's own names (streams, graphs, pools, events, the
runtime, cuBLAS's compute type) are never called without a GPU: a name CuPy
renamed or dropped would first fail on a lent device. Here every dotted
``cupy.``/``cupyx.`` name in fastvae's source (found by walking its syntax
trees, so the list cannot drift from the code) is looked up in the installed
CuPy, and the methods called on CuPy objects are checked on their classes.
Needs CuPy (``pip install -e '.[nvrtc]'``), no device. Modules that load a
CUDA library on import (``cupy.cuda.cublas``, ``cupy.cuda.nccl``) pass when
CuPy knows them and only their library is missing; NCCL's names are not
checked (the module holds them only where libnccl loads)."""

import ast
import importlib
import importlib.util
import inspect
import os
import warnings

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("cupy") is None,
                                reason="CuPy is not installed (pip install -e '.[nvrtc]')")

# how the source spells CuPy besides ``cupy`` and ``cupyx``: the backend's module attribute
# and the runtime handed to the probe
_ROOTS = {("self", "_xp"): "cupy", ("self", "xp"): "cupy", ("backend", "xp"): "cupy", ("self", "cupy"): "cupy",
          ("runtime",): "cupy.cuda.runtime"}
_CUPY_FILES = ("backends/cupy/backend.py", "backends/cupy/kernels.py", "backends/cupy/graph_support.py",
               "backends/cupy/probe.py", "backends/cupy/cuda_graph.py", "training/distributed.py", "training/memory.py",
               "bench/timing.py")
_LOADS_A_LIBRARY = ("cupy.cuda.cublas", "cupy.cuda.nccl")


def _chain(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def cupy_names():
    """{dotted name: 'file:line'} of every CuPy name the GPU code uses."""
    found = {}
    for rel in _CUPY_FILES:
        path = os.path.join(ROOT, "fastvae", rel)
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("cupy", "cupyx"):
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                    found.setdefault(f"{node.module}.{a.name}", f"{rel}:{node.lineno}")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or id(node) in inner:
                continue                                    # only the longest chain of each expression
            parts = _chain(node)
            if not parts:
                continue
            if parts[0] in ("cupy", "cupyx"):
                name = ".".join(parts)
            elif parts[0] in aliases:
                name = ".".join([aliases[parts[0]]] + parts[1:])
            else:
                root = next((r for r in _ROOTS if tuple(parts[:len(r)]) == r), None)
                if root is None or (root != ("runtime",) and (len(parts) < 3 or parts[len(root)] != "cuda")):
                    continue                                # xp.<ufunc> is NumPy's API too; only xp.cuda.* is CuPy's
                if root == ("runtime",) and rel != "backends/cupy/probe.py":
                    continue
                name = ".".join([_ROOTS[root]] + parts[len(root):])
            found.setdefault(name, f"{rel}:{node.lineno}")
    return found


def _resolve(name):
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, p in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, p)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:i + 1]))     # a submodule not imported yet
    return obj


def test_the_scan_finds_the_names_the_gpu_code_is_known_to_use():
    names = cupy_names()
    for expected in ("cupy.RawModule", "cupy.cuda.Stream", "cupy.cuda.MemoryPool", "cupy.cuda.using_allocator",
                     "cupy.cuda.Event", "cupy.cuda.get_current_stream", "cupy.cuda.runtime.memGetInfo",
                     "cupy.cuda.runtime.getDeviceCount", "cupy.cuda.runtime.driverGetVersion",
                     "cupyx.empty_pinned", "cupy.cuda.nvrtc.getVersion", "cupy.cuda.cublas",
                     "cupy._core._routines_linalg.set_compute_type", "cupy.cuda.nccl.NcclCommunicator"):
        assert any(n == expected or n.startswith(expected + ".") for n in names), (expected, sorted(names))


def test_every_cupy_name_in_the_source_exists_in_the_installed_cupy():
    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # CuPy warns at import where optional libraries are absent
        for name, where in sorted(cupy_names().items()):
            lib = next((m for m in _LOADS_A_LIBRARY if name == m or name.startswith(m + ".")), None)
            if lib and name != lib:
                continue                            # NCCL's names: only where libnccl loads
            try:
                _resolve(name)
            except ImportError as exc:
                if not (lib and ".so" in str(exc)):     # the module is there; its CUDA library is not
                    missing.append(f"{name} ({where}): {type(exc).__name__}: {exc}")
            except AttributeError as exc:
                missing.append(f"{name} ({where}): {type(exc).__name__}: {exc}")
    assert not missing, "CuPy names the GPU code uses but this CuPy lacks:\n" + "\n".join(missing)


def test_the_methods_called_on_cupy_objects_exist():
    import cupy
    from cupy._core import _routines_linalg as lin
    null = cupy.cuda.Stream.null                    # a Stream object made without a device
    for obj, attrs in ((null, ("ptr", "synchronize", "begin_capture", "end_capture")),
                       (cupy.cuda.graph.Graph, ("launch",)), (cupy.cuda.Event, ("record",)),
                       (cupy.cuda.MemoryPool, ("malloc",)), (cupy.cuda.Device, ("use", "id")),
                       (cupy.RawModule, ("get_function",)), (cupy.ndarray, ("set", "data", "view")),
                       (lin, ("set_compute_type", "COMPUTE_TYPE_TF32", "COMPUTE_TYPE_DEFAULT"))):
        lacking = [a for a in attrs if not hasattr(obj, a)]
        assert not lacking, (obj, lacking)
    assert "non_blocking" in inspect.signature(cupy.cuda.Stream.__init__).parameters
    assert "stream=" in cupy.ndarray.set.__doc__.splitlines()[0]      # ndarray.set(arr, stream=None)
