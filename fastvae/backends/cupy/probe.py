"""Whether the CuPy backend can run here, and if not, why: CuPy installed and
importable, a CUDA device whose driver runs this CuPy, NVRTC and cuBLAS
loadable. Each check returns '' or one sentence naming the problem and the fix."""

from __future__ import annotations

_FIX = "pip install 'fastvae[cuda12]' or 'fastvae[cuda13]' (CuPy with the CUDA toolkit wheels, matching your driver)"


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


NO_GPU = "no NVIDIA GPU found"


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver: its kernel module's files
    (``/proc/driver/nvidia``, ``/dev/nvidia*``) or a loadable ``libcuda``. The
    CUDA runtime answers "driver version is insufficient" both for an old
    driver and for none at all; without one there is no GPU to use."""
    import ctypes
    import glob
    import os
    if os.path.exists("/proc/driver/nvidia/version") or glob.glob("/dev/nvidia[0-9]*"):
        return True
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def device_reason(runtime, driver_present=nvidia_driver_present) -> str:
    """'' when ``runtime`` (``cupy.cuda.runtime``) sees a device whose driver
    runs this CuPy, else the reason. CUDA minor-version compatibility: a driver
    of the same major version as CuPy's runtime runs it (CuPy compiles kernels
    to SASS for the device), so only the major versions are compared."""
    try:
        n = runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, missing libcuda, ...
        if not driver_present():
            from fastvae.naming import option
            return f"{NO_GPU} (no NVIDIA driver on this machine); train on the CPU with {option('backend', 'numba')}"
        if "InsufficientDriver" in type(exc).__name__ + str(exc):
            return (f"the NVIDIA driver is older than this CuPy's CUDA runtime ({_first_line(exc)}); update the "
                    f"driver or install the CuPy for it: {_FIX}")
        return f"no usable CUDA device ({_first_line(exc)})"
    if n < 1:
        return f"{NO_GPU} (the driver sees no device)"
    try:
        drv, rt = runtime.driverGetVersion(), runtime.runtimeGetVersion()
    except Exception as exc:
        return f"cannot query the CUDA driver ({_first_line(exc)})"
    if drv // 1000 < rt // 1000:
        other = (f", or pip install 'fastvae[cuda{drv // 1000}]' (CuPy for that driver)"
                 if drv // 1000 in (12, 13) else "")
        return (f"the CUDA driver supports CUDA {drv // 1000}.{drv % 1000 // 10} but this CuPy needs a CUDA "
                f"{rt // 1000}.x driver; update the driver{other}")
    return ""


def toolkit_reason(cupy) -> str:
    """'' when CuPy can load NVRTC (the kernel compiler) and cuBLAS (the
    GEMMs), else which one is missing and how to install it. Without this a
    host with a driver but no toolkit fails at the first compile or GEMM."""
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as exc:
        return f"CuPy cannot load NVRTC, the CUDA runtime compiler ({_first_line(exc)}); {_FIX}"
    try:
        cupy.cuda.cublas          # importing the module loads libcublas
    except Exception as exc:
        return f"CuPy cannot load cuBLAS ({_first_line(exc)}); {_FIX}"
    return ""


def probe() -> str:
    """'' when CuPy, a CUDA device, NVRTC and cuBLAS are usable, else the reason."""
    import importlib.util
    if importlib.util.find_spec("cupy") is None:
        return f"CuPy is not installed; {_FIX}"
    try:
        import cupy
    except Exception as exc:
        return f"CuPy fails to import ({_first_line(exc)}); reinstall it: {_FIX}"
    return device_reason(cupy.cuda.runtime) or toolkit_reason(cupy)
