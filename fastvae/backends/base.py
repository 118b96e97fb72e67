"""The backend interface: the small set of primitives the VAE is written in.

A backend owns the array module (``xp``), memory, random numbers and the fused
elementwise kernels. ``fastvae.nn.model`` calls only these methods, so a new
backend (Numba, CuPy) adds kernels and nothing else.

Conventions (llm.c style): outputs come first in the argument list; gradients
are prefixed ``d``; every method writes into preallocated arrays and allocates
nothing in the hot path except the backend's own cached scratch buffers.
Shapes: ``B`` batch, ``D`` pixels, ``H`` hidden width, ``L`` latent size.
Arithmetic that is not a primitive (an objective's) runs through
``array_op(fn, *buffers)``, with per-step floats from ``step_scalar``, so
that the cupy backend can hold a whole training step in a CUDA graph.
"""

from __future__ import annotations

import math

import numpy as np


class ForeignRNGState(ValueError):
    """``BackendRNG.set_state`` was given another kind of stream's state
    (another backend's: PCG64 on the CPU, Philox4x32-10 on the GPU)."""


class BackendRNG:
    """A seeded random stream living on the backend's device.

    ``state()`` returns JSON-serialisable data that ``set_state`` restores
    exactly, so a checkpoint can resume the same stream.
    """

    def normal_(self, out):  # pragma: no cover - interface
        """Fill ``out`` with N(0, 1) samples in its dtype."""
        raise NotImplementedError

    def uniform_(self, out):  # pragma: no cover
        """Fill ``out`` with U[0, 1) samples in its dtype."""
        raise NotImplementedError

    def permutation(self, n):  # pragma: no cover
        """A random permutation of ``range(n)`` as a device int64 array."""
        raise NotImplementedError

    def state(self):  # pragma: no cover
        raise NotImplementedError

    def set_state(self, state):  # pragma: no cover
        """Restore a ``state()``. Raises ForeignRNGState for another kind of
        stream's state, ValueError for one of this kind whose values it cannot
        hold (nothing is changed then)."""
        raise NotImplementedError


class Backend:
    """Base class; see the module docstring for the conventions."""

    name = "base"
    xp = np
    array_type = np.ndarray       #: the type of the backend's device arrays
    device = "cpu"

    def __init__(self, dtype="float32"):
        self.dtype = np.dtype(dtype)
        self._scratch = {}

    # ---- memory -------------------------------------------------------------
    def empty(self, shape, dtype=None):
        return self.xp.empty(shape, dtype=dtype or self.dtype)

    def zeros(self, shape, dtype=None):
        return self.xp.zeros(shape, dtype=dtype or self.dtype)

    def asarray(self, host, dtype=None):
        """Copy a host (NumPy) array to the device, in ``dtype`` (default: the backend's)."""
        return self.xp.array(np.asarray(host), dtype=dtype or self.dtype, copy=True)

    def to_host(self, a) -> np.ndarray:
        """A NumPy copy of device array ``a`` (or a view when already on the host)."""
        return np.asarray(a)

    def to_float(self, scalar) -> float:
        """A host Python float from a device scalar or 0-d array (synchronises)."""
        return float(scalar)

    def copy_(self, dst, src):
        """``dst[...] = src`` where ``src`` may be a host array."""
        dst[...] = self.xp.asarray(src)

    def scratch(self, key, shape, dtype=None):
        """A cached work buffer (contents undefined), reused across calls."""
        dtype = np.dtype(dtype or self.dtype)
        k = (key, tuple(shape), dtype.str)
        buf = self._scratch.get(k)
        if buf is None:
            buf = self._scratch[k] = self._new_buffer(shape, dtype)
        return buf

    def _new_buffer(self, shape, dtype):
        """A new uninitialised array of the backend (a scratch buffer)."""
        return self.xp.empty(shape, dtype=dtype)

    def synchronize(self):
        """Wait for queued device work (no-op on the CPU)."""

    def new_rng(self, seed) -> BackendRNG:  # pragma: no cover - interface
        raise NotImplementedError

    # ---- data movement ------------------------------------------------------
    def gather_rows(self, out, X, idx):  # pragma: no cover
        """``out[i] = X[idx[i]]``; ``out (b, D)``, ``X (N, D)``, ``idx (b,)``."""
        raise NotImplementedError

    def bernoulli_(self, out, probs, rng):  # pragma: no cover
        """``out = (u < probs)`` as 0/1 in ``out``'s dtype, ``u ~ U[0,1)`` from ``rng``."""
        raise NotImplementedError

    # ---- dense algebra ------------------------------------------------------
    def gemm(self, out, a, b, trans_a=False, trans_b=False):  # pragma: no cover
        """``out = op(a) @ op(b)`` where ``op`` transposes when asked."""
        raise NotImplementedError

    def bias_act(self, out, pre, bias, act, slope=0.01, alpha=1.0):  # pragma: no cover
        """Forward: ``pre += bias`` (in place, kept for backward) then
        ``out = act(pre)``. With ``act == "identity"`` only the bias is added
        and ``out`` may be ``None``."""
        raise NotImplementedError

    def act_backward(self, d, pre, out, act, slope=0.01, alpha=1.0):  # pragma: no cover
        """In place: ``d *= act'(pre)`` where ``d`` holds dLoss/d(out) on entry
        and dLoss/d(pre) on exit; ``out = act(pre)`` is given for activations
        whose derivative is cheaper from it."""
        raise NotImplementedError

    def col_sum(self, out, a):  # pragma: no cover
        """Bias gradient: ``out[j] = sum_i a[i, j]``."""
        raise NotImplementedError

    # ---- VAE-specific fused kernels ----------------------------------------
    def reparam_kl(self, z, kl, std, head, eps):  # pragma: no cover
        """With ``head = [mu | logvar]`` one C-contiguous ``(B, 2L)`` buffer:
        ``std = exp(logvar/2)``, ``z = mu + std * eps`` (Kingma & Welling 2014,
        Sec. 2.4) and per-image ``kl = -1/2 sum_j (1 + logvar - mu^2 - exp(logvar))``
        (ibid., Appendix B). ``z, std, eps: (B, L)``; ``kl: (B,)`` or ``None``
        to skip it."""
        raise NotImplementedError

    def reparam_kl_backward(self, dhead, dz, head, std, eps, kl_scale):  # pragma: no cover
        """Into ``dhead = [dmu | dlogvar]`` (one C-contiguous ``(B, 2L)``
        buffer, like ``head``): ``dmu = dz + kl_scale * mu``;
        ``dlogvar = dz * eps * std / 2 + kl_scale * (std^2 - 1) / 2`` where
        ``kl_scale = beta / B`` is dLoss/dKL_i."""
        raise NotImplementedError

    def tc_pairwise(self, z, mu, logvar, logw, coef, coef_dim, dz, dmu, dlogvar):  # pragma: no cover
        """The beta-TCVAE pairwise terms (Chen et al. 2018, Sec. 4.1 and
        Appendix C) for one sample ``z_i`` per image and the batch's posteriors
        ``(mu_j, logvar_j)``, all ``(B, L)``, under the estimator's log
        importance weights ``logw (B, B)`` (minibatch-weighted sampling:
        ``-log(N B)`` everywhere; stratified: see
        :func:`fastvae.objectives.btcvae.log_weights`): with ``lq_ijd = log
        N(z_id; mu_jd, exp(logvar_jd))``, returns ``(lse_i, lsed_i)`` (B,) =
        ``log q(z_i) ~ logsumexp_j (logw_ij + sum_d lq_ijd)`` and
        ``sum_d log q(z_id) ~ sum_d logsumexp_j (logw_ij + lq_ijd)`` (nats);
        and ADDS to ``dz``, ``dmu``, ``dlogvar`` the gradient of
        ``sum_i (coef log q(z_i) + coef_dim sum_d log q(z_id))``:
        ``G_ijd = coef A_ij + coef_dim A_ijd`` with ``A = softmax_j`` of the
        weighted joint and per-dimension terms; ``dz_id -= sum_j G v``,
        ``dmu_jd += sum_i G v``, ``dlogvar_jd += sum_i G (diff^2 / var - 1) / 2``,
        ``v = diff / var``, ``diff = z_id - mu_jd``. Nothing is added when both
        coefficients are 0."""
        raise NotImplementedError

    def tc_pairwise_bytes(self, B: int, L: int) -> int:  # pragma: no cover
        """Work memory (bytes) this backend's :meth:`tc_pairwise` allocates for
        a batch of ``B`` codes of ``L`` dimensions (the memory preflight adds it)."""
        raise NotImplementedError

    # ---- sampled KL and inverse autoregressive flow ----
    def sampled_kl(self, kl, z, eps, head):  # pragma: no cover
        """The single-sample KL estimate ``kl_i = log q(z_i|x) - log p(z_i) =
        sum_j (z^2 - eps^2 - logvar) / 2`` (B,) nats for ``z, eps (B, L)``, ``z = mu + std eps`` (the
        2 pi terms cancel; its expectation is the closed form of Kingma &
        Welling 2014, App. B). ``head = [mu | logvar] (B, 2L)``."""
        raise NotImplementedError

    def sampled_kl_backward(self, dhead, dz, z, std, eps, kl_scale):  # pragma: no cover
        """Backward of :meth:`sampled_kl` plus the reparameterization, for
        ``dz`` (B, L) from the layers after the sampler: with ``g = dz + k z``
        (``k = kl_scale``, the KL's weight), ``dmu = g`` and ``dlogvar =
        g eps std / 2 - k / 2``."""
        raise NotImplementedError

    def iaf_gate(self, z, kl, z_in, head, bias):  # pragma: no cover
        """One inverse autoregressive flow step's update, in the numerically
        stable gated form (Kingma et al. 2016, "Improved variational inference
        with inverse autoregressive flow", Algorithm 1 and eqs. 14-15): with
        ``head = [m | s] (B, 2L)`` from the step's MADE and
        ``sig = sigmoid(s + bias)``, ``z = sig z_in + (1 - sig) m``. The
        Jacobian dz/dz_in is triangular with diagonal ``sig``, so when ``kl``
        (B,) nats is given (``z, z_in (B, L)``) it gets ``-sum_j log sig_j`` (log q falls by the
        log-determinant) plus ``log p(z_in) - log p(z) = (|z|^2 - |z_in|^2) / 2``,
        which telescope over the steps to ``log q(z_T|x) - log p(z_T)``."""
        raise NotImplementedError

    def iaf_gate_backward(self, dz_in, dhead, dz, z, z_in, head, bias, kl_scale):  # pragma: no cover
        """Backward of :meth:`iaf_gate` (its KL terms weighted by ``k =
        kl_scale``): with ``g = dz + k z``, ``dm = (1 - sig) g``,
        ``ds = (z_in - m) sig (1 - sig) g - k (1 - sig)`` into ``dhead`` and the
        direct path ``dz_in = sig g - k z_in`` (the caller adds the path
        through the MADE)."""
        raise NotImplementedError

    def mul_(self, out, a, b):  # pragma: no cover
        """``out = a * b`` elementwise (a mask on a weight or its gradient)."""
        raise NotImplementedError

    def add_(self, out, a):  # pragma: no cover
        """``out += a`` elementwise (two gradient paths into one buffer)."""
        raise NotImplementedError

    # ---- convolution (im2col / col2im), channels-last ------------------------
    # Images are (B, H*W*C) rows in channels-last (NHWC) order; a patch row
    # holds (C, kH, kW) in PyTorch's weight order, so ``cols @ W.reshape(F, -1).T``
    # is a convolution with a torch-layout weight (Dumoulin & Visin 2016, "A
    # guide to convolution arithmetic", Sec. 2 and 4: Ho = (H + 2p - k) // s + 1).

    def im2col(self, cols, x, in_hwc, k, stride, padding, out_hw):  # pragma: no cover
        """Patches of ``x (B, H*W*C)`` into ``cols (B*Ho*Wo, C*k*k)``: row
        ``(b, oh, ow)`` holds ``x[b, oh*s - p + i, ow*s - p + j, c]`` at column
        ``(c, i, j)``, zero where that falls in the padding."""
        raise NotImplementedError

    def col2im(self, x, cols, in_hwc, k, stride, padding, out_hw):  # pragma: no cover
        """The adjoint of :meth:`im2col`: ``x (B, H*W*C)`` = the sum of every
        patch entry of ``cols (B*Ho*Wo, C*k*k)`` at the pixel it was read
        from (entries in the padding are dropped), each pixel's sum taken
        over (i, j) in order."""
        raise NotImplementedError

    # ---- direct convolution: no column buffer ----------------------------------
    #: the convolution algorithms this backend runs: ``im2col`` (im2col / col2im
    #: around a GEMM, every backend) and, where a kernel exists, ``direct``
    conv_algorithms = ("im2col",)

    def conv_direct(self, y, x, W, in_hwc, k, stride, padding, out_hw):  # pragma: no cover
        """``y (B, Ho*Wo*F) = conv2d(x, W)`` without bias for ``x (B, H*W*C)``
        channels-last and ``W (F, C, k, k)`` (PyTorch's layout): ``y[b, oh, ow,
        f] = sum_{c, i, j} x[b, oh*s - p + i, ow*s - p + j, c] W[f, c, i, j]``,
        the padding read as 0 (the product :meth:`im2col` and a GEMM give)."""
        raise NotImplementedError

    def conv_direct_dx(self, dx, dy, W, in_hwc, k, stride, padding, out_hw):  # pragma: no cover
        """The adjoint of :meth:`conv_direct` (its input gradient, and a
        transposed convolution's forward): ``dx (B, H*W*C)`` (overwritten) from
        ``dy (B, Ho*Wo*F)``: every ``dy[b, oh, ow, f] W[f, c, i, j]`` added at
        the pixel ``(oh*s - p + i, ow*s - p + j)`` it read, padding dropped."""
        raise NotImplementedError

    def conv_direct_dw(self, dW, x, dy, in_hwc, k, stride, padding, out_hw):  # pragma: no cover
        """The weight gradient of :meth:`conv_direct`: ``dW[f, c, i, j] (F, C,
        k, k)`` (overwritten) = ``sum_{b, oh, ow} x[b, oh*s - p + i, ow*s - p +
        j, c] dy[b, oh, ow, f]``."""
        raise NotImplementedError

    def conv_algorithm(self, signature: str, trials) -> str:
        """The convolution algorithm a layer of this ``signature`` (its
        geometry and batch size) runs: ``im2col`` where it is the only one;
        else the fastest of ``trials`` (algorithm -> a callable running the
        layer's forward and backward with it), measured once and cached."""
        return "im2col"

    def step_scalar(self, value):
        """A float that changes from step to step (a KL weight), as
        :meth:`array_op` functions take it: the value itself here; the cupy
        backend hands a CUDA graph's device slot instead (same arithmetic)."""
        return value

    def array_op(self, fn, *args) -> None:
        """``fn(xp, *args)``: array expressions (an objective's arithmetic) over
        device buffers that ``fn`` writes in place, returning nothing; one
        device operation for the backend (a CUDA graph captures and checks it
        as one, so ``fn`` is a module-level function and its scalars arrive
        in ``args``, never from host state that changes between steps)."""
        fn(self.xp, *args)

    def likelihood(self, dlogits, nll, logits, x, kind, sigma, grad_scale):  # pragma: no cover
        """Per-image negative log-likelihood and its gradient, fused.

        ``nll (B,)``: summed over pixels (``None`` to skip); ``dlogits (B, D)``:
        ``grad_scale * d nll_i / d logits`` (``None`` to skip).
        bernoulli: nll = softplus(l) - x l, grad = sigmoid(l) - x;
        gaussian:  nll = (l - x)^2 / (2 sigma^2) + log sigma + log(2 pi)/2,
        grad = (l - x) / sigma^2; mse: nll = (l - x)^2, grad = 2 (l - x).
        """
        raise NotImplementedError

    def adam_update(self, params, grads, m, v, *, beta1, beta2, eps, step_size,
                    bc2_sqrt, weight_decay, decay_factor):  # pragma: no cover
        """One Adam step over whole flat buffers (Kingma & Ba 2015, Alg. 1, in
        the form of ``torch.optim.Adam``): ``g = grads + weight_decay*params``
        (L2), ``params *= decay_factor`` (AdamW), ``m = b1 m + (1-b1) g``,
        ``v = b2 v + (1-b2) g^2``,
        ``params -= step_size * m / (sqrt(v)/bc2_sqrt + eps)``."""
        raise NotImplementedError

    def sum(self, a):
        """Sum of all elements as a device scalar (no host synchronisation)."""
        return a.sum()

