"""CuPy backend: train on an NVIDIA GPU without a deep-learning framework.

Parameters, gradients, Adam state, the dataset, shuffling and noise all live
on the device; the host launches work and reads metrics only when the trainer
reports them. GEMMs go through cuBLAS (``cupy.matmul``; TF32 opt-in with
the backend's ``tf32`` flag, set on every GEMM), or, for a backend whose steps
are CUDA graphs, through fastvae's own ``gemm`` kernel (CuPy refuses cuBLAS
calls on a capturing stream); everything else runs in the fused CUDA kernels of
``fastvae/kernels/cuda_kernels.cu`` (bias + activation, activation gradient,
reparameterization + KL, likelihood + gradient, ONE Adam kernel over the flat
buffer), compiled by NVRTC once per process (CuPy >= 14 keeps the binary in
its on-disk kernel cache across processes). Bias gradients use
CuPy's column-sum reduction.

Random numbers come from a counter-based Philox4x32-10 generator on the
device (see :mod:`fastvae.backends.philox`): its whole state is (key, counter), saved
in checkpoints as JSON and independent of launch shapes.

Every launch (kernels, GEMMs, reductions) goes through ``_op`` and every
per-step value through ``_dynamic`` / ``_counter``, so that a step can be
captured and replayed as a CUDA graph (:mod:`fastvae.backends.cupy.cuda_graph`).
Availability checks live in :mod:`fastvae.backends.cupy.probe`, the kernel
module and launch arguments in :mod:`fastvae.backends.cupy.kernels`.
"""

from __future__ import annotations

import math

import numpy as np

from fastvae.errors import BackendUnavailableError
from fastvae.nn.opcodes import ACTIVATION_CODES, LIKELIHOOD_CODES
from fastvae.backends.base import Backend, BackendRNG, ForeignRNGState
from fastvae.backends.philox import STATE_KIND as PHILOX_STATE, check_state as check_philox_state
from fastvae.backends.cupy.graph_support import GraphSupport
from fastvae.backends.cupy.kernels import (_GEMM_DEPTH, _GEMM_TILE, _THREADS, _blocks, _gemm_grid, _i32, _i64, _u32, _module,
                           ctype_of, source_of)
from fastvae.backends.cupy.kernels import COMPILE_OPTIONS, _MODULES, _TEMPLATED, _source_path, name_expressions  # noqa: F401
from fastvae.backends.cupy.probe import device_reason, probe, toolkit_reason  # noqa: F401 (this module's API)


def set_tf32(on: bool) -> None:
    """Set cuBLAS's float32 GEMM mode for this process: TF32 tensor cores
    (10-bit mantissa inputs, float32 accumulation, ~1e-3 relative error per
    product instead of ~1e-7; faster on Ampere and newer) or plain float32.
    CuPy keeps this setting process-wide, so every float32 GEMM of the backend
    sets it from its own ``tf32`` flag first."""
    from cupy._core import _routines_linalg as lin
    lin.set_compute_type(np.float32, lin.COMPUTE_TYPE_TF32 if on else lin.COMPUTE_TYPE_DEFAULT)


def _matmul(xp, out, a, b, trans_a, trans_b, tf32=None):
    """``out = op(a) @ op(b)`` through ``xp.matmul`` (cuBLAS), in TF32 or plain
    float32 as ``tf32`` says, set right before the GEMM runs (None: float64,
    no mode to set). Never in a CUDA graph: CuPy refuses cuBLAS calls on a
    capturing stream, and a backend with step graphs uses its ``gemm`` kernel."""
    if tf32 is not None:
        set_tf32(tf32)
    xp.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)


class CupyRNG(BackendRNG):
    """Philox4x32-10 stream on the device; state ``{"kind", "key", "counter"}``."""

    def __init__(self, backend, seed):
        from fastvae.backends.philox import key_from_seed
        self.be = backend
        self.key = key_from_seed(seed)
        self.counter = 0

    def _advance(self, n):
        c = self.counter
        self.counter += (int(n) + 3) // 4
        return c

    def _launch(self, name, out, *extra):
        self.be._check(name, out, *extra)
        n = out.size
        c, base = self.be._counter(self._advance(n))
        self.be._op(self.be._fn(name), _blocks((n + 3) // 4), (_THREADS,),
                    (out, *extra, _i64(n), c, base, _u32(0), _u32(self.key[0]),
                     _u32(self.key[1])))
        return out

    def normal_(self, out):
        return self._launch("philox_normal", out)

    def uniform_(self, out):
        """U[0, 1): float32 from the top 24 bits of a word, float64 from (u + 1/2) 2^-32."""
        return self._launch("philox_uniform", out)

    def bernoulli_(self, out, probs):
        return self._launch("philox_bernoulli", out, probs)

    def permutation(self, n):
        """A uniform permutation of ``range(n)``: argsort of 64-bit Philox keys
        (two words each; a tie, which would favour the lower index, has
        probability about n^2 / 2^65: 1e-10 for n = 60,000, against 0.4 ties per
        shuffle with 32-bit keys)."""
        xp = self.be.xp
        keys = xp.empty(int(n), dtype=xp.uint64)
        words = keys.view(xp.uint32)
        c = self._advance(words.size)
        self.be._fn("philox_bits")(
            _blocks((words.size + 3) // 4), (_THREADS,),
            (words, _i64(words.size), np.uint64(c), self.be._zero_counter, _u32(0),
             _u32(self.key[0]), _u32(self.key[1])))
        return xp.argsort(keys)

    def state(self):
        return {"kind": "philox4x32-10", "key": list(self.key), "counter": int(self.counter)}

    def set_state(self, state):
        if not isinstance(state, dict) or state.get("kind") != PHILOX_STATE:
            raise ForeignRNGState("not a philox4x32-10 state")
        self.key, self.counter = check_philox_state(state)


class CupyBackend(GraphSupport, Backend):
    """The GPU backend. ``dtype``: float32 or float64 (ValueError otherwise);
    ``tf32``: let float32 GEMMs use TF32 tensor cores (see :func:`set_tf32`).
    Raises BackendUnavailableError naming what is missing (CuPy, a device, a
    new enough driver, NVRTC, cuBLAS). Every kernel wrapper refuses arrays
    that are not C-contiguous device arrays of the backend's dtype.
    ``own_gemm``: GEMMs through fastvae's ``gemm`` kernel instead of cuBLAS
    (plain float32/float64 products, no TF32); CUDA graphs set it, as CuPy
    refuses cuBLAS calls while a stream is captured."""

    name = "cupy"
    device = "cuda"
    supports_graphs = True
    own_gemm = False

    def __init__(self, dtype="float32", tf32: bool = False):
        reason = probe()
        if reason:
            raise BackendUnavailableError(f"backend 'cupy' is unavailable: {reason}")
        import cupy
        self._setup(cupy, dtype, tf32)
        dev = cupy.cuda.Device()
        self.device = f"cuda:{dev.id} {cupy.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}"

    def _setup(self, xp, dtype, tf32):
        self._ctype = ctype_of(dtype)
        super().__init__(dtype)
        self._xp = xp
        self.array_type = xp.ndarray
        self.tf32 = bool(tf32)
        self._fns = {}
        self._s = self.dtype.type
        self._gemm_smem = 2 * _GEMM_DEPTH * _GEMM_TILE * self.dtype.itemsize     # the gemm kernel's two tiles
        self._gemm_launches = {}
        self._graph_setup()

    def _kernel(self, full_name):
        return _module(self.dtype, source_of(full_name)).get_function(full_name)

    def _fn(self, name):
        f = self._fns.get(name)
        if f is None:
            f = self._fns[name] = self._kernel(name if name == "philox_bits" else f"{name}<{self._ctype}>")
        return f

    def _check(self, what, *arrays):
        """The kernels index raw pointers as C-contiguous arrays of the
        backend's dtype: refuse anything else instead of computing garbage."""
        for a in arrays:
            if not isinstance(a, self._xp.ndarray):
                raise TypeError(f"{what}: expected a {self._xp.__name__} array, got {type(a).__name__}; "
                                "move it to the device with backend.asarray")
            if a.dtype != self.dtype:
                raise TypeError(f"{what}: got a {a.dtype} array but the backend computes in {self.dtype}; "
                                f"convert it with .astype({str(self.dtype)!r})")
            if not a.flags.c_contiguous:
                raise ValueError(f"{what}: got a non-contiguous array (a strided view); pass a C-contiguous "
                                 "copy (xp.ascontiguousarray)")

    # ---- memory ----------------------------------------------------------------
    def to_host(self, a):
        asnumpy = getattr(self.xp, "asnumpy", np.asarray)
        return asnumpy(a) if isinstance(a, self.xp.ndarray) else np.asarray(a)

    def to_float(self, scalar):
        if self._graph is not None:
            self._graph.unsafe("reading a device value on the host")
        return float(scalar)

    def copy_(self, dst, src):
        dst[...] = self.xp.asarray(src)

    def synchronize(self):
        self.xp.cuda.get_current_stream().synchronize()

    def sum(self, a):
        out = self._out((), a.dtype)
        self._op(self._xp.sum, a, out=out)
        return out

    def new_rng(self, seed):
        return CupyRNG(self, seed)

    # ---- data ----------------------------------------------------------------
    def gather_rows(self, out, X, idx):
        self._op(self._xp.take, X, idx, axis=0, out=out)
        return out

    def bernoulli_(self, out, probs, rng):
        rng.bernoulli_(out, probs)
        return out

    # ---- dense ---------------------------------------------------------------
    def gemm(self, out, a, b, trans_a=False, trans_b=False):
        if not self.own_gemm:
            self._op(_matmul, self._xp, out, a, b, trans_a, trans_b, self.tf32 if self.dtype == np.float32 else None)
            return out
        key = (id(out), id(a), id(b), trans_a, trans_b)
        launch = self._gemm_launches.get(key)            # the same arrays as before: checked, arguments built
        if launch is None or launch[0] is not out or launch[1] is not a or launch[2] is not b:
            launch = self._gemm_launch(out, a, b, trans_a, trans_b)
            if launch[1] is a and launch[2] is b:        # (an operand copied into a buffer is copied at each call)
                if len(self._gemm_launches) >= 256:    # it holds its arrays: a few steps' call sites, not more
                    self._gemm_launches.clear()
                self._gemm_launches[key] = launch
        for fn, grid, block, args, smem in launch[3]:
            self._op(self._fn(fn), grid, block, args, shared_mem=smem)
        return out

    def _gemm_launch(self, out, a, b, trans_a, trans_b):
        """``(out, a, b, launches)`` for ``out = op(a) op(b)``: the ``gemm``
        kernel's launch and, when it splits K, the ``gemm_sum`` of its slices
        (none for an empty output); a strided operand is copied into a cached
        contiguous buffer first. TypeError/ValueError as ``_check``."""
        if not (a.flags.c_contiguous and b.flags.c_contiguous):     # a strided view: copied
            a, b = self._contiguous(a, "gemm_a"), self._contiguous(b, "gemm_b")
        self._check("gemm", out, a, b)
        M, N = out.shape
        K = a.shape[0] if trans_a else a.shape[1]
        if not (M and N):
            return out, a, b, ()
        grid, kslice = _gemm_grid(M, N, K)
        part = out if grid[2] == 1 else self.scratch("gemm_slices", (grid[2], M, N))
        args = (part, a, b, _i32(M), _i32(N), _i32(K), _i32(a.shape[1]), _i32(b.shape[1]), _i32(N), _i32(trans_a),
                _i32(trans_b), _i32(kslice))
        launches = (("gemm", grid, (256,), args, self._gemm_smem),)
        if part is not out:
            launches += (("gemm_sum", _blocks(M * N), (_THREADS,), (out, part, _i64(M * N), _i32(grid[2])), 0),)
        return out, a, b, launches

    def bias_act(self, out, pre, bias, act, slope=0.01, alpha=1.0):
        out_ = pre if out is None else out
        self._check("bias_act", pre, bias, out_)
        n = pre.size
        if n:
            self._op(self._fn("bias_act"), _blocks(n), (_THREADS,),
                     (pre, bias, out_, _i64(n), _i32(pre.shape[1]), _i32(ACTIVATION_CODES[act]),
                      self._s(slope), self._s(alpha)))
        return out

    def act_backward(self, d, pre, out, act, slope=0.01, alpha=1.0):
        if act == "identity":
            return d
        self._check("act_backward", d, pre, out)
        n = d.size
        if n:
            self._op(self._fn("act_backward"), _blocks(n), (_THREADS,),
                     (d, pre, out, _i64(n), _i32(ACTIVATION_CODES[act]), self._s(slope), self._s(alpha)))
        return d

    def col_sum(self, out, a):
        self._op(self._xp.sum, a, axis=0, out=out)
        return out

    def reparam_kl(self, z, kl, std, head, eps):
        B, L = z.shape
        kl_ = std if kl is None else kl
        self._check("reparam_kl", z, kl_, std, head, eps)
        if B:
            self._op(self._fn("reparam_kl"), _blocks(B), (_THREADS,),
                     (z, kl_, std, head, eps, _i32(B), _i32(L), _i32(kl is not None)))
        return z

    def reparam_kl_backward(self, dhead, dz, head, std, eps, kl_scale):
        B, L = dz.shape
        self._check("reparam_kl_backward", dhead, dz, head, std, eps)
        if B * L:
            (c,), scale = self._dynamic(kl_scale)       # the KL weight changes during warm-up
            self._op(self._fn("reparam_kl_backward"), _blocks(B * L), (_THREADS,),
                     (dhead, dz, head, std, eps, _i32(B), _i32(L), c, scale))
        return dhead

    def likelihood(self, dlogits, nll, logits, x, kind, sigma, grad_scale):
        B, D = logits.shape
        if kind not in LIKELIHOOD_CODES:
            raise ValueError(f"unknown likelihood {kind!r}")
        d_, nll_ = logits if dlogits is None else dlogits, logits if nll is None else nll
        self._check("likelihood", d_, nll_, logits, x)
        if B == 0:
            return
        k = LIKELIHOOD_CODES[kind]
        if kind == "gaussian":
            inv_var, half = 1.0 / (sigma * sigma), 0.5 / (sigma * sigma)
            cnst = D * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
        else:       # mse; bernoulli ignores the three
            inv_var, half, cnst = 2.0, 1.0, 0.0
        threads = 256 if D >= 256 else max(32, 1 << (max(D, 1) - 1).bit_length())
        s = self._s
        self._op(self._fn("likelihood"), (B,), (threads,),
                 (d_, nll_, logits, x, _i32(B), _i32(D), _i32(k), s(inv_var), s(half), s(cnst),
                  s(grad_scale), _i32(dlogits is not None), _i32(nll is not None)),
                 shared_mem=threads * self.dtype.itemsize)

    def adam_update(self, params, grads, m, v, *, beta1, beta2, eps, step_size,
                    bc2_sqrt, weight_decay, decay_factor):
        self._check("adam_update", params, grads, m, v)
        s = self._s
        n = params.size
        if n:       # the bias corrections and the learning rate change every step
            (e, a, decay), dyn = self._dynamic(eps * bc2_sqrt, step_size * bc2_sqrt, decay_factor)
            self._op(self._fn("adam_update"), _blocks(n), (_THREADS,),
                     (params, grads, m, v, _i64(n), s(beta1), s(1.0 - beta1), s(beta2), s(1.0 - beta2),
                      e, a, s(weight_decay), decay, dyn))

    def tc_pairwise_bytes(self, B, L):
        return (B * B + 4 * B * L) * self.dtype.itemsize     # the (B, B) joint terms and (B, L) rows

    def tc_pairwise(self, z, mu, logvar, logw, coef, coef_dim, dz, dmu, dlogvar):
        B, L = z.shape
        z, mu, logvar, logw = (self._contiguous(a, k) for k, a in (("z", z), ("mu", mu), ("logvar", logvar),
                                                                    ("logw", logw)))
        S, top, tot = self.scratch("tc_S", (B, B)), self.scratch("tc_top", (B,)), self.scratch("tc_tot", (B,))
        topd, sumd = self.scratch("tc_topd", (B, L)), self.scratch("tc_sumd", (B, L))
        lse, lsed = self._out((B,), z.dtype), self._out((B,), z.dtype)
        if B == 0:
            return lse, lsed
        dims = (_i32(B), _i32(L))
        self._check("tc_pairwise", S, top, tot, topd, sumd, lse, lsed, z, mu, logvar, logw)
        self._op(self._fn("tc_rows"), _blocks(B), (_THREADS,),
                 (S, top, tot, topd, sumd, lse, lsed, z, mu, logvar, logw, *dims))
        if coef or coef_dim or self._graph is not None:     # a graph holds them for every step's values
            self._check("tc_pairwise", dz, dmu, dlogvar)
            (cf, cd), scale = self._dynamic(coef, coef_dim)
            stats = (S, top, tot, topd, sumd, z, mu, logvar, logw, cf, cd, *dims, scale)
            self._op(self._fn("tc_grad_z"), _blocks(B * L), (_THREADS,), (dz, *stats))
            self._op(self._fn("tc_grad_params"), _blocks(B * L), (_THREADS,), (dmu, dlogvar, *stats))
        return lse, lsed

    def _contiguous(self, a, name):
        """``a``, or its C-contiguous copy in a cached buffer (the kernels index raw rows)."""
        if a.flags.c_contiguous:
            return a
        buf = self.scratch(("contiguous", name), a.shape, a.dtype)
        self._op(self._xp.copyto, buf, a)
        return buf

    # ---- convolution ------------------------------------------------------------
    def _conv_launch(self, name, out, src, n, in_hwc, k, stride, padding, out_hw, batch):
        self._check(name, out, src)
        if n:
            geom = (batch, *in_hwc, k, stride, padding, *out_hw)
            self._op(self._fn(name), _blocks(n), (_THREADS,), (out, src, *(_i32(v) for v in geom)))
        return out

    def im2col(self, cols, x, in_hwc, k, stride, padding, out_hw):
        return self._conv_launch("im2col", cols, x, cols.size, in_hwc, k, stride, padding, out_hw, x.shape[0])

    def col2im(self, x, cols, in_hwc, k, stride, padding, out_hw):
        return self._conv_launch("col2im", x, cols, x.size, in_hwc, k, stride, padding, out_hw, x.shape[0])
