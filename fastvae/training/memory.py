"""Memory preflight: refuse a model that cannot fit before allocating it.

Without it a model too large for the machine ends in a MemoryError
traceback, or, slightly smaller, is killed by the kernel's OOM killer
minutes into training with no message. :func:`preflight` compares an
estimate of what a model needs with what the device has free and raises
:class:`~fastvae.errors.ConfigError` naming both sizes and the fix.

The estimate (bytes, model dtype of ``itemsize`` bytes, ``P`` parameters,
batch ``B``): parameters and gradients ``2 P itemsize``; the float64 host
copy used once at initialisation ``8 P`` (host only); Adam's two moments
``2 P itemsize`` when training; per layer ``B (3 out + in) itemsize`` for
pre-activations, outputs and input gradients, plus the im2col column buffer
of convolutions, and ``B D itemsize`` for the workspace's batch. It errs
high by design (workspaces of two batch sizes may coexist); a model under
90% of the free memory is allowed.
"""

from __future__ import annotations

import os
from typing import Optional

from fastvae.errors import ConfigError
from fastvae.naming import option

HEADROOM = 0.9


def smaller_model() -> str:
    """The fix for a model too large for memory (options spelled by :func:`fastvae.naming.option`)."""
    return (f"use smaller layers ({option('hidden')}, {option('latent_dim')}, or the layer specs), a smaller "
            f"{option('batch_size')}, or a machine with more memory")


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 27 else f"{n / 2 ** 20:.1f} MiB"


def estimate(layers, n_params: int, itemsize: int, batch: int = 0, train: bool = False,
             host: bool = True) -> int:
    """Bytes a model needs (see the module docstring); ``batch`` 0 leaves out
    the workspaces, ``host`` adds the float64 initialisation copy."""
    need = 2 * n_params * itemsize + (8 * n_params if host else 0)
    if train:
        need += 2 * n_params * itemsize
    for layer in layers if batch else ():
        need += batch * (3 * layer.out_features + layer.in_features) * itemsize
        need += batch * getattr(layer, "cols_per_image", 0) * itemsize
    if batch and layers:
        need += batch * layers[0].in_features * itemsize       # the workspace's own batch x (IWAE: the repeats)
    return int(need)


WORK_BYTES = 2 ** 30     # the work buffers one batch of evaluation, IWAE or encoding may take


def rows_within(layers, itemsize: int, cap: int, budget: int = WORK_BYTES) -> int:
    """The largest batch, at most ``cap`` and at least 1, whose work buffers
    (as :func:`estimate` counts them) fit in ``budget`` bytes: 1000 images of
    an MLP, 355 of the 64x64 conv net (2.9 MiB each), 22 at 256x256. A
    fixed rule of the model, so a seeded estimate is the same on any machine
    (IWAE's 8192 rows of the 64x64 conv net peaked at 11.3 GB)."""
    per = estimate(layers, 0, itemsize, batch=1) - estimate(layers, 0, itemsize, batch=0)
    return int(max(1, min(cap, budget // max(per, 1))))


def host_available() -> Optional[int]:
    """Free host memory in bytes: psutil's ``available`` bounded by this
    process's address-space limit (``ulimit -v``); None when unknown."""
    try:
        import psutil
        free = int(psutil.virtual_memory().available)
    except Exception:    # psutil missing or unsupported platform: no preflight
        return None
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            free = min(free, max(soft - _vms(), 0))
    except (ImportError, ValueError, OSError):
        pass
    return free


def _vms() -> int:
    """This process's virtual size (what RLIMIT_AS counts)."""
    try:
        import psutil
        return int(psutil.Process(os.getpid()).memory_info().vms)
    except Exception:
        return 0


def device_available(backend) -> Optional[int]:
    """Free memory of ``backend``'s device: the GPU's free bytes for a CUDA
    backend, else :func:`host_available`."""
    if getattr(backend, "device", "cpu") != "cpu":
        try:
            free, _total = backend.xp.cuda.runtime.memGetInfo()
            return int(free)
        except Exception:
            return None
    return host_available()


def preflight(need: int, backend, what: str, fix: str) -> None:
    """Raise ConfigError when ``need`` bytes exceed 90% of what ``backend``'s
    device has free. ``what`` names the allocation ("the model with 5e9
    parameters"), ``fix`` the remedy."""
    free = device_available(backend)
    if free is not None and need > HEADROOM * free:
        where = "GPU" if getattr(backend, "device", "cpu") != "cpu" else "host"
        raise ConfigError(f"{what} needs about {_gib(need)} but the {where} has {_gib(free)} free; {fix}")
