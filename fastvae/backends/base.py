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

    def tc_pairwise(self, z, mu, logvar, coef, dz, dmu, dlogvar):
        """The beta-TCVAE pairwise terms (Chen et al. 2018, Sec. 4.1, minibatch-
        weighted sampling) for one sample ``z_i`` per image and the batch's
        posteriors ``(mu_j, logvar_j)``, all ``(B, L)``: with ``lq_ijd = log
        N(z_id; mu_jd, exp(logvar_jd))``, returns ``(lse_i, lsed_i)`` (B,) =
        ``logsumexp_j sum_d lq_ijd`` and ``sum_d logsumexp_j lq_ijd`` (the
        caller subtracts log(N B)); and ADDS to ``dz``, ``dmu``, ``dlogvar`` the
        gradient of ``coef * sum_i (log q(z_i) - sum_d log q(z_id))``:
        ``G_ijd = coef (A_ij - A_ijd)`` with ``A = softmax_j`` of the joint
        and per-dimension ``lq``; ``dz_id -= sum_j G v``, ``dmu_jd += sum_i G v``,
        ``dlogvar_jd += sum_i G (diff^2 / var - 1) / 2``, ``v = diff / var``,
        ``diff = z_id - mu_jd``. Array expressions here (NumPy, CuPy); Numba
        overrides with one fused kernel."""
        xp = self.xp
        var = xp.exp(logvar)
        diff = z[:, None, :] - mu[None, :, :]
        lq = -0.5 * (diff * diff / var[None] + logvar[None] + math.log(2 * math.pi))
        S = lq.sum(2)
        top = S.max(1, keepdims=True)
        A = xp.exp(S - top)
        sA = A.sum(1, keepdims=True)
        A /= sA
        topd = lq.max(1, keepdims=True)
        Ad = xp.exp(lq - topd)
        sAd = Ad.sum(1, keepdims=True)
        Ad /= sAd
        if coef:
            G = coef * (A[:, :, None] - Ad)
            Gv = G * diff / var[None]
            dz -= Gv.sum(1)
            dmu += Gv.sum(0)
            dlogvar += 0.5 * (G * (diff * diff / var[None] - 1.0)).sum(0)
        return top[:, 0] + xp.log(sA[:, 0]), (topd[:, 0, :] + xp.log(sAd[:, 0, :])).sum(1)

    def tc_pairwise_bytes(self, B: int, L: int) -> int:
        """Work memory (bytes) :meth:`tc_pairwise` allocates for a batch of
        ``B`` codes of ``L`` dimensions: about six ``(B, B, L)`` arrays for the
        array expressions above (1.0 GB measured at B = 2048, L = 10)."""
        return 6 * B * B * L * self.dtype.itemsize

    # ---- sampled KL and inverse autoregressive flow (array expressions: every backend) ----
    def sampled_kl(self, kl, z, eps, head):
        """The single-sample KL estimate ``kl_i = log q(z_i|x) - log p(z_i) =
        sum_j (z^2 - eps^2 - logvar) / 2`` (B,) nats for ``z, eps (B, L)``, ``z = mu + std eps`` (the
        2 pi terms cancel; its expectation is the closed form of Kingma &
        Welling 2014, App. B). ``head = [mu | logvar] (B, 2L)``."""
        L = z.shape[1]
        kl[...] = 0.5 * (z * z - eps * eps - head[:, L:]).sum(1)
        return kl

    def sampled_kl_backward(self, dhead, dz, z, std, eps, kl_scale):
        """Backward of :meth:`sampled_kl` plus the reparameterization, for
        ``dz`` (B, L) from the layers after the sampler: with ``g = dz + k z``
        (``k = kl_scale``, the KL's weight), ``dmu = g`` and ``dlogvar =
        g eps std / 2 - k / 2``."""
        L = dz.shape[1]
        g = dz + kl_scale * z
        dhead[:, :L] = g
        dhead[:, L:] = 0.5 * g * eps * std - 0.5 * kl_scale
        return dhead

    def iaf_gate(self, z, kl, z_in, head, bias):
        """One inverse autoregressive flow step's update, in the numerically
        stable gated form (Kingma et al. 2016, "Improved variational inference
        with inverse autoregressive flow", Algorithm 1 and eqs. 14-15): with
        ``head = [m | s] (B, 2L)`` from the step's MADE and
        ``sig = sigmoid(s + bias)``, ``z = sig z_in + (1 - sig) m``. The
        Jacobian dz/dz_in is triangular with diagonal ``sig``, so when ``kl``
        (B,) nats is given (``z, z_in (B, L)``) it gets ``-sum_j log sig_j`` (log q falls by the
        log-determinant) plus ``log p(z_in) - log p(z) = (|z|^2 - |z_in|^2) / 2``,
        which telescope over the steps to ``log q(z_T|x) - log p(z_T)``."""
        xp, L = self.xp, z.shape[1]
        m, a = head[:, :L], head[:, L:] + bias
        sig = 0.5 + 0.5 * xp.tanh(0.5 * a)
        z[...] = sig * z_in + (1.0 - sig) * m
        if kl is not None:
            log_sig = -(xp.maximum(-a, 0.0) + xp.log1p(xp.exp(-xp.abs(a))))     # -softplus(-a)
            kl += (0.5 * (z * z - z_in * z_in) - log_sig).sum(1)
        return z

    def iaf_gate_backward(self, dz_in, dhead, dz, z, z_in, head, bias, kl_scale):
        """Backward of :meth:`iaf_gate` (its KL terms weighted by ``k =
        kl_scale``): with ``g = dz + k z``, ``dm = (1 - sig) g``,
        ``ds = (z_in - m) sig (1 - sig) g - k (1 - sig)`` into ``dhead`` and the
        direct path ``dz_in = sig g - k z_in`` (the caller adds the path
        through the MADE)."""
        xp, L = self.xp, z.shape[1]
        m, a = head[:, :L], head[:, L:] + bias
        sig = 0.5 + 0.5 * xp.tanh(0.5 * a)
        g = dz + kl_scale * z
        dhead[:, :L] = (1.0 - sig) * g
        dhead[:, L:] = (z_in - m) * sig * (1.0 - sig) * g - kl_scale * (1.0 - sig)
        dz_in[...] = sig * g - kl_scale * z_in
        return dz_in

    def mul_(self, out, a, b):
        """``out = a * b`` elementwise (a mask on a weight or its gradient)."""
        self.xp.multiply(a, b, out=out)
        return out

    def add_(self, out, a):
        """``out += a`` elementwise (two gradient paths into one buffer)."""
        self.xp.add(out, a, out=out)
        return out

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

    # ---- convolution (im2col / col2im), channels-last ------------------------
    # Images are (B, H*W*C) rows in channels-last (NHWC) order; a patch row
    # holds (C, kH, kW) in PyTorch's weight order, so ``cols @ W.reshape(F, -1).T``
    # is a convolution with a torch-layout weight (Dumoulin & Visin 2016, "A
    # guide to convolution arithmetic", Sec. 2 and 4: Ho = (H + 2p - k) // s + 1).
    # Written with array slicing only, so every array module runs them.

    #: bytes of the (i, j, c)-ordered staging buffer one chunk of images uses (:meth:`_staged`)
    CONV_STAGE_BYTES = 1 << 21

    def im2col(self, cols, x, in_hwc, k, stride, padding, out_hw, tid=0):
        """Patches of ``x (B, H*W*C)`` into ``cols (B*Ho*Wo, C*k*k)``: row
        ``(b, oh, ow)`` holds ``x[b, oh*s - p + i, ow*s - p + j, c]`` at column
        ``(c, i, j)``, zero where that falls in the padding. ``tid``: the
        calling thread's number, whose own work buffers it uses."""
        H, W, C = in_hwc
        Ho, Wo = out_hw
        B, s, p = x.shape[0], stride, padding
        src = x.reshape(B, H, W, C)
        if p:
            pad = self._zero_border(("im2col_pad", p, tid), (B, H + 2 * p, W + 2 * p, C))
            pad[:, p:p + H, p:p + W, :] = src
            src = pad
        win = lambda a, i, j: a[:, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s, :]
        if C < 8:
            c6 = cols.reshape(B, Ho, Wo, C, k, k)
            for i in range(k):
                for j in range(k):
                    c6[:, :, :, :, i, j] = win(src, i, j)
            return cols
        rows = cols.reshape(B, Ho * Wo, C, k * k)
        for b0, n, t6 in self._staged(B, (Ho, Wo, k, k, C), tid):
            sb = src[b0:b0 + n]
            for i in range(k):
                for j in range(k):
                    t6[:, :, :, i, j, :] = win(sb, i, j)
            rows[b0:b0 + n] = t6.reshape(n, Ho * Wo, k * k, C).transpose(0, 1, 3, 2)
        return cols

    def col2im(self, x, cols, in_hwc, k, stride, padding, out_hw, tid=0):
        """The adjoint of :meth:`im2col`: ``x (B, H*W*C)`` = the sum of every
        patch entry of ``cols (B*Ho*Wo, C*k*k)`` at the pixel it was read
        from (entries in the padding are dropped). Each pixel's sum runs over
        (i, j) in order whichever path, so both give the same bits. ``tid``
        as :meth:`im2col`'s."""
        H, W, C = in_hwc
        Ho, Wo = out_hw
        B, s, p = x.shape[0], stride, padding
        acc = self.scratch(("col2im_acc", tid), (B, H + 2 * p, W + 2 * p, C))
        acc[...] = 0
        win = lambda a, i, j: a[:, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s, :]
        if C < 8:
            c6 = cols.reshape(B, Ho, Wo, C, k, k)
            for i in range(k):
                for j in range(k):
                    win(acc, i, j)[...] += c6[:, :, :, :, i, j]
        else:
            rows = cols.reshape(B, Ho * Wo, C, k * k)
            for b0, n, t6 in self._staged(B, (Ho, Wo, k, k, C), tid):
                t6.reshape(n, Ho * Wo, k * k, C)[...] = rows[b0:b0 + n].transpose(0, 1, 3, 2)
                ab = acc[b0:b0 + n]
                for i in range(k):
                    for j in range(k):
                        win(ab, i, j)[...] += t6[:, :, :, i, j, :]
        x.reshape(B, H, W, C)[...] = acc[:, p:p + H, p:p + W, :]
        return x

    def _staged(self, B, shape, tid=0):
        """``(first image, images, staging view)`` for chunks of the batch that
        fit :data:`CONV_STAGE_BYTES` in a ``(n, Ho, Wo, k, k, C)`` buffer: with
        8 channels or more, im2col and col2im go through it, where each
        window position is a run of C contiguous values, and one transposing
        copy per chunk converts to the columns' (C, k, k) order (direct slices
        would move C values k*k apart; with 1 or 3 channels they stay faster:
        ``bench/RESULTS.md``). Thread ``tid`` gets a buffer of its own."""
        per = int(np.prod(shape)) * self.dtype.itemsize
        bc = max(1, min(B, self.CONV_STAGE_BYTES // per))
        stage = self.scratch(("conv_stage", tid), (bc,) + tuple(shape))
        for b0 in range(0, B, bc):
            n = min(bc, B - b0)
            yield b0, n, stage[:n]

    def _zero_border(self, key, shape):
        """A cached buffer whose border stays zero: callers write the interior only."""
        k = ("zero_border", key, tuple(shape))
        buf = self._scratch.get(k)
        if buf is None:
            buf = self._scratch[k] = self.xp.zeros(shape, dtype=self.dtype)
        return buf

    def sum(self, a):
        """Sum of all elements as a device scalar (no host synchronisation)."""
        return a.sum()

