"""Backend registry.

``available()`` lists every known backend with whether it can run here and,
if not, why; ``get(name, dtype)`` returns a ready backend or raises
:class:`~fastvae.errors.BackendUnavailableError` naming the missing package or
device. Backends register a loader and a probe, so importing fastvae never
imports Numba or CuPy.

Package: ``base`` is the contract (every primitive declared once),
``numpy_backend`` the plain NumPy reference of every primitive,
``numba_backend`` the Numba-jitted CPU backend, ``cupy/`` the GPU backend
and its CUDA graphs, ``cpu/`` the CPU tuning (threads, GEMM library) both
CPU backends share, ``philox`` the host reference of the GPU generator.
Backends hold no model logic. May import: fastvae.kernels,
fastvae.nn.opcodes, fastvae.errors/naming/checks.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

from fastvae.errors import BackendUnavailableError
from fastvae.backends.base import Backend, BackendRNG

_REGISTRY: Dict[str, Tuple[Callable[[], type], Callable[[], str]]] = {}


def register(name: str, loader: Callable[[], type], probe: Callable[[], str]) -> None:
    """Register backend ``name``: ``loader()`` returns its class, ``probe()``
    returns ``""`` when it can run here or the reason it cannot."""
    _REGISTRY[name] = (loader, probe)


def names() -> List[str]:
    return list(_REGISTRY)


def available() -> List[dict]:
    """``[{"name", "available", "reason"}]`` for every registered backend."""
    out = []
    for name, (_, probe) in _REGISTRY.items():
        try:
            reason = probe()
        except Exception as exc:  # a probe must never break listing
            reason = f"{type(exc).__name__}: {exc}"
        out.append({"name": name, "available": not reason, "reason": reason})
    return out


AUTO = "auto"
#: the order ``auto`` tries the backends in: the GPU, then the jitted CPU kernels, then the reference
AUTO_ORDER = ("cupy", "numba", "numpy")


def resolve(name: str = AUTO) -> Tuple[str, str]:
    """``(backend, why)`` for a backend name or ``"auto"``: ``auto`` is the
    first of :data:`AUTO_ORDER` that can run here (``cupy`` with CuPy and a
    usable NVIDIA GPU, else ``numba``, else ``numpy``), and ``why`` is one
    short clause for the run's first line (the reason the faster ones were
    passed over). ``$FASTVAE_BACKEND``, when set to a backend's name, is what
    ``auto`` means on this machine (``why``: "FASTVAE_BACKEND"). Any other name
    comes back as it is, ``why`` "asked for"."""
    if name != AUTO:
        return name, "asked for"
    import os
    chosen = os.environ.get("FASTVAE_BACKEND", AUTO)
    if chosen != AUTO:
        if chosen not in _REGISTRY:
            raise BackendUnavailableError(f"FASTVAE_BACKEND={chosen!r} names no backend; set it to one of "
                                          f"{', '.join(_REGISTRY)} or auto, or unset it")
        return chosen, "FASTVAE_BACKEND"
    reasons = {b["name"]: b["reason"] for b in available()}
    passed = []
    for candidate in AUTO_ORDER:
        if not reasons[candidate]:
            return candidate, "auto: " + ("; ".join(passed) or "the fastest backend here")
        passed.append(f"not {candidate}: {reasons[candidate].split(';')[0]}")
    return "numpy", "auto"                                  # unreachable: numpy always runs


def get(name: str = "numpy", dtype: str = "float32") -> Backend:
    """A backend instance computing in ``dtype``.

    Raises BackendUnavailableError for an unknown name or one that cannot run
    here (the message says what to install or which device is missing).
    """
    if isinstance(name, Backend):
        return name
    name = resolve(name)[0]
    if name not in _REGISTRY:
        raise BackendUnavailableError(
            f"unknown backend {name!r}; choose one of: {', '.join(_REGISTRY)}")
    loader, probe = _REGISTRY[name]
    reason = probe()
    if reason:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return loader()(dtype)


def _numpy_loader():
    from fastvae.backends.cpu.worker import ThreadedNumpyBackend
    return ThreadedNumpyBackend


register("numpy", _numpy_loader, lambda: "")


def _numba_probe():
    import importlib.util
    if importlib.util.find_spec("numba") is None:
        return "the numba package is not installed; pip install 'fastvae[numba]'"
    return ""


def _numba_loader():
    from fastvae.backends.numba_backend import NumbaBackend
    return NumbaBackend


register("numba", _numba_loader, _numba_probe)


def _cupy_probe():
    from fastvae.backends.cupy.backend import probe
    return probe()


def _cupy_loader():
    from fastvae.backends.cupy.backend import CupyBackend
    return CupyBackend


register("cupy", _cupy_loader, _cupy_probe)

def check_rng_state(state) -> None:
    """Raise ValueError when ``state`` (a checkpoint's saved random-number
    state) is of a kind a backend continues, PCG64 (the CPU backends) or
    philox4x32-10 (the GPU), but its stream cannot hold it; a state of
    another kind passes (a resume then continues from a stream derived from
    the step). What ``set_state`` of each backend's generator accepts."""
    from fastvae.backends import philox
    from fastvae.backends.numpy_backend import NumpyRNG
    if isinstance(state, dict) and state.get("kind") == philox.STATE_KIND:
        philox.check_state(state)
    elif isinstance(state, dict) and state.get("bit_generator") == "PCG64":
        NumpyRNG(0).set_state(state)


__all__ = ["Backend", "BackendRNG", "available", "check_rng_state", "get", "names", "register"]
