"""CuPy backend: train on an NVIDIA GPU without a deep-learning framework.

Parameters, gradients, Adam state, the dataset, shuffling and noise all live
on the device; the host launches work and reads metrics only when the trainer
reports them. GEMMs go through cuBLAS (``cupy.matmul``; TF32 opt-in with
:func:`enable_tf32`); everything else runs in the fused CUDA kernels of
``fastvae/kernels/cuda_kernels.cu`` (bias + activation, activation gradient,
reparameterization + KL, likelihood + gradient, ONE Adam kernel over the flat
buffer), compiled once by NVRTC and cached on disk by CuPy. Bias gradients use
CuPy's column-sum reduction.

Random numbers come from a counter-based Philox4x32-10 generator on the
device (see :mod:`fastvae.philox`): its whole state is (key, counter), saved
in checkpoints as JSON and independent of launch shapes.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..errors import BackendUnavailableError
from ..ops import ACTIVATION_CODES, LIKELIHOOD_CODES, cuda_defines
from .base import Backend, BackendRNG

def _source_path() -> str:
    from .. import kernels
    return os.path.join(os.path.dirname(kernels.__file__), "cuda_kernels.cu")

#: NVRTC options: C++14 and the op codes of the one table in fastvae.ops
COMPILE_OPTIONS = ("-std=c++14", *cuda_defines())
_TEMPLATED = ("bias_act", "act_backward", "reparam_kl", "reparam_kl_backward", "likelihood", "adam_update",
              "im2col", "col2im",
              "philox_normal", "philox_uniform", "philox_bernoulli", "tc_rows", "tc_grad_z", "tc_grad_params")
_THREADS = 256
_MODULES = {}


def probe() -> str:
    """'' when CuPy and a CUDA device are usable, else the reason."""
    import importlib.util
    if importlib.util.find_spec("cupy") is None:
        return ("CuPy is not installed; pip install 'fastvae[cuda12]' or 'fastvae[cuda13]' "
                "(matching your CUDA driver)")
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, missing libcuda, ...
        return f"no usable CUDA device ({type(exc).__name__}: {exc})"
    if n < 1:
        return "no CUDA device found"
    try:
        drv, rt = cupy.cuda.runtime.driverGetVersion(), cupy.cuda.runtime.runtimeGetVersion()
    except Exception as exc:
        return f"cannot query the CUDA driver ({exc})"
    if drv < rt:
        return (f"the CUDA driver supports CUDA {drv // 1000}.{drv % 1000 // 10} but CuPy was built for "
                f"{rt // 1000}.{rt % 1000 // 10}; update the driver or install the matching cupy-cudaXXx")
    return ""


def enable_tf32(on: bool = True) -> None:
    """Let cuBLAS use TF32 tensor cores for float32 GEMMs (10-bit mantissa
    inputs, float32 accumulation): faster on Ampere and newer, ~1e-3 relative
    error per product instead of ~1e-7. Off by default."""
    import cupy
    from cupy._core import _routines_linalg as lin
    lin.set_compute_type(np.float32, lin.COMPUTE_TYPE_TF32 if on else lin.COMPUTE_TYPE_DEFAULT)
    del cupy


def _module(dtype):
    """The compiled RawModule for ``dtype`` (compiled once per process; the
    binary is cached on disk by CuPy across processes)."""
    import cupy
    key = np.dtype(dtype).str
    mod = _MODULES.get(key)
    if mod is None:
        ctype = "float" if np.dtype(dtype) == np.float32 else "double"
        with open(_source_path()) as f:
            code = f.read()
        names = [f"{k}<{ctype}>" for k in _TEMPLATED] + ["philox_bits"]
        mod = cupy.RawModule(code=code, options=COMPILE_OPTIONS, name_expressions=names)
        mod._fv_ctype = ctype
        _MODULES[key] = mod
    return mod


def _blocks(n):
    return (max(1, min((int(n) + _THREADS - 1) // _THREADS, 65535)),)


class CupyRNG(BackendRNG):
    """Philox4x32-10 stream on the device; state ``{"kind", "key", "counter"}``."""

    def __init__(self, backend, seed):
        from ..philox import key_from_seed
        self.be = backend
        self.key = key_from_seed(seed)
        self.counter = 0

    def _advance(self, n):
        c = self.counter
        self.counter += (int(n) + 3) // 4
        return c

    def _launch(self, name, out, *extra):
        n = out.size
        c = self._advance(n)
        self.be._fn(name)(_blocks((n + 3) // 4), (_THREADS,),
                          (out, *extra, np.int64(n), np.uint64(c), np.uint32(0),
                           np.uint32(self.key[0]), np.uint32(self.key[1])))
        return out

    def normal_(self, out):
        return self._launch("philox_normal", out)

    def uniform_(self, out):
        return self._launch("philox_uniform", out)

    def bernoulli_(self, out, probs):
        n = out.size
        c = self._advance(n)
        self.be._fn("philox_bernoulli")(_blocks((n + 3) // 4), (_THREADS,),
                                        (out, probs, np.int64(n), np.uint64(c), np.uint32(0),
                                         np.uint32(self.key[0]), np.uint32(self.key[1])))
        return out

    def permutation(self, n):
        import cupy
        keys = cupy.empty(int(n), dtype=cupy.uint32)
        c = self._advance(n)
        self.be._module.get_function("philox_bits")(
            _blocks((n + 3) // 4), (_THREADS,),
            (keys, np.int64(n), np.uint64(c), np.uint32(0), np.uint32(self.key[0]), np.uint32(self.key[1])))
        return cupy.argsort(keys)

    def state(self):
        return {"kind": "philox4x32-10", "key": list(self.key), "counter": int(self.counter)}

    def set_state(self, state):
        if not isinstance(state, dict) or state.get("kind") != "philox4x32-10":
            raise ValueError("not a philox4x32-10 state")
        self.key = tuple(int(k) for k in state["key"])
        self.counter = int(state["counter"])


class CupyBackend(Backend):
    name = "cupy"
    device = "cuda"

    def __init__(self, dtype="float32"):
        reason = probe()
        if reason:
            raise BackendUnavailableError(f"backend 'cupy' is unavailable: {reason}")
        import cupy
        super().__init__(dtype)
        self.xp = cupy
        self._module = _module(self.dtype)
        self._fns = {}
        self._s = self.dtype.type
        dev = cupy.cuda.Device()
        self.device = f"cuda:{dev.id} {cupy.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}"

    def _fn(self, name):
        f = self._fns.get(name)
        if f is None:
            full = name if name == "philox_bits" else f"{name}<{self._module._fv_ctype}>"
            f = self._fns[name] = self._module.get_function(full)
        return f

    # ---- memory ----------------------------------------------------------------
    def to_host(self, a):
        import cupy
        return cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else np.asarray(a)

    def to_float(self, scalar):
        return float(scalar)

    def copy_(self, dst, src):
        import cupy
        dst[...] = cupy.asarray(src)

    def synchronize(self):
        import cupy
        cupy.cuda.get_current_stream().synchronize()

    def new_rng(self, seed):
        return CupyRNG(self, seed)

    # ---- data ----------------------------------------------------------------
    def gather_rows(self, out, X, idx):
        self.xp.take(X, idx, axis=0, out=out)
        return out

    def bernoulli_(self, out, probs, rng):
        rng.bernoulli_(out, probs)
        return out

    # ---- dense ---------------------------------------------------------------
    def gemm(self, out, a, b, trans_a=False, trans_b=False):
        self.xp.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)
        return out

    def bias_act(self, out, pre, bias, act, slope=0.01, alpha=1.0):
        n = pre.size
        self._fn("bias_act")(_blocks(n), (_THREADS,),
                             (pre, bias, pre if out is None else out, np.int64(n), np.int32(pre.shape[1]),
                              np.int32(ACTIVATION_CODES[act]), self._s(slope), self._s(alpha)))
        return out

    def act_backward(self, d, pre, out, act, slope=0.01, alpha=1.0):
        if act == "identity":
            return d
        n = d.size
        self._fn("act_backward")(_blocks(n), (_THREADS,),
                                 (d, pre, out, np.int64(n), np.int32(ACTIVATION_CODES[act]), self._s(slope), self._s(alpha)))
        return d

    def col_sum(self, out, a):
        self.xp.sum(a, axis=0, out=out)
        return out

    def reparam_kl(self, z, kl, std, head, eps):
        B, L = z.shape
        self._fn("reparam_kl")(_blocks(B), (_THREADS,),
                               (z, std if kl is None else kl, std, head, eps,
                                np.int32(B), np.int32(L), np.int32(kl is not None)))
        return z

    def reparam_kl_backward(self, dhead, dz, head, std, eps, kl_scale):
        B, L = dz.shape
        self._fn("reparam_kl_backward")(_blocks(B * L), (_THREADS,),
                                        (dhead, dz, head, std, eps, np.int32(B), np.int32(L), self._s(kl_scale)))
        return dhead

    def likelihood(self, dlogits, nll, logits, x, kind, sigma, grad_scale):
        B, D = logits.shape
        if kind not in LIKELIHOOD_CODES:
            raise ValueError(f"unknown likelihood {kind!r}")
        k = LIKELIHOOD_CODES[kind]
        if kind == "gaussian":
            inv_var, half = 1.0 / (sigma * sigma), 0.5 / (sigma * sigma)
            cnst = D * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
        else:       # mse; bernoulli ignores the three
            inv_var, half, cnst = 2.0, 1.0, 0.0
        threads = 256 if D >= 256 else max(32, 1 << (max(D, 1) - 1).bit_length())
        self._fn("likelihood")((B,), (threads,),
                               (logits if dlogits is None else dlogits, logits if nll is None else nll,
                                logits, x, np.int32(B), np.int32(D), np.int32(k), self._s(inv_var),
                                self._s(half), self._s(cnst), self._s(grad_scale),
                                np.int32(dlogits is not None), np.int32(nll is not None)),
                               shared_mem=threads * self.dtype.itemsize)

    def adam_update(self, params, grads, m, v, *, beta1, beta2, eps, step_size,
                    bc2_sqrt, weight_decay, decay_factor):
        s = self._s
        n = params.size
        self._fn("adam_update")(_blocks(n), (_THREADS,),
                                (params, grads, m, v, np.int64(n), s(beta1), s(1.0 - beta1), s(beta2),
                                 s(1.0 - beta2), s(eps * bc2_sqrt), s(step_size * bc2_sqrt),
                                 s(weight_decay), s(decay_factor)))

    def tc_pairwise(self, z, mu, logvar, coef, dz, dmu, dlogvar):
        import cupy
        B, L = z.shape
        z, mu, logvar = (cupy.ascontiguousarray(a) for a in (z, mu, logvar))
        S, top, tot = cupy.empty((B, B), z.dtype), cupy.empty(B, z.dtype), cupy.empty(B, z.dtype)
        topd, sumd = cupy.empty((B, L), z.dtype), cupy.empty((B, L), z.dtype)
        lse, lsed = cupy.empty(B, z.dtype), cupy.empty(B, z.dtype)
        dims = (np.int32(B), np.int32(L))
        self._fn("tc_rows")(_blocks(B), (_THREADS,), (S, top, tot, topd, sumd, lse, lsed, z, mu, logvar, *dims))
        if coef:
            stats = (S, top, tot, topd, sumd, z, mu, logvar, self._s(coef), *dims)
            self._fn("tc_grad_z")(_blocks(B * L), (_THREADS,), (dz, *stats))
            self._fn("tc_grad_params")(_blocks(B * L), (_THREADS,), (dmu, dlogvar, *stats))
        return lse, lsed

    # ---- convolution ------------------------------------------------------------
    def _conv_launch(self, name, out, src, n, in_hwc, k, stride, padding, out_hw, batch):
        geom = (batch, *in_hwc, k, stride, padding, *out_hw)
        self._fn(name)(_blocks(n), (_THREADS,), (out, src, *(np.int32(v) for v in geom)))
        return out

    def im2col(self, cols, x, in_hwc, k, stride, padding, out_hw):
        return self._conv_launch("im2col", cols, x, cols.size, in_hwc, k, stride, padding, out_hw, x.shape[0])

    def col2im(self, x, cols, in_hwc, k, stride, padding, out_hw):
        return self._conv_launch("col2im", x, cols, x.size, in_hwc, k, stride, padding, out_hw, x.shape[0])
