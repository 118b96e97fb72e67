"""Inverse autoregressive flow (Kingma, Salimans, Jozefowicz, Chen, Sutskever &
Welling 2016, "Improved Variational Inference with Inverse Autoregressive
Flow"): steps after the Gaussian sampler that make the posterior richer.

Step t maps ``z_{t-1} (B, L)`` to ``z_t``: a MADE network (Germain, Gregor,
Murray & Larochelle 2015) of two masked dense layers gives ``[m | s] (B, 2L)``
where ``m_j``, ``s_j`` depend only on the coordinates before j in the step's
order and on the encoder's context ``h (B, C)`` (Kingma et al. 2016, Sec. 4
and Algorithm 1: the encoder outputs mu, sigma and h, and every step's
autoregressive network reads ``[z, h]``; here h enters the MADE's hidden
layer, unmasked, as more inputs); then the gated update ``z_t = sig
z_{t-1} + (1 - sig) m`` with ``sig = sigmoid(s + 1)`` (Algorithm 1; the +1
keeps s "sufficiently positive", Sec. 4). Its Jacobian is triangular with
diagonal ``sig``, so ``log q(z_t|x) = log q(z_{t-1}|x) - sum_j log sig_j``.
Consecutive steps reverse the order (the paper reverses z).

Initialisation: the MADE's output layer starts with zero weights, m's bias
at 0 and s's at 1, so a new step is ``z_t = sigmoid(2) z_{t-1}`` (0.88
z_{t-1}): the flow starts as the Gaussian posterior, rescaled, near the
identity, with ``s + 1 = 2`` as the paper advises ("close to +1 or +2",
Sec. 4), and departs from it as it learns.
"""

from __future__ import annotations

import functools

import numpy as np

from fastvae.nn.layers.base import Layer, State
from fastvae.nn.layers.dense import MaskedDense

#: added to s before the sigmoid (Kingma et al. 2016, Sec. 4)
FORGET_BIAS = 1.0
#: the initial bias of s: the gate starts at sigmoid(FORGET_BIAS + S_BIAS_INIT) = sigmoid(2)
S_BIAS_INIT = 1.0


def made_masks(L: int, H: int, reverse: bool):
    """MADE masks (Germain et al. 2015, eqs. 12-13) for ``L`` inputs, one
    hidden layer of ``H`` units and the ``2L`` outputs ``[m | s]``: input j has
    degree ``d_j`` (1..L, reversed when ``reverse``), hidden unit k degree
    ``1 + k mod (L - 1)`` (0 when L = 1: no input), hidden k sees input j when
    ``deg_k >= d_j`` and output j (of m and of s) sees hidden k when ``d_j >
    deg_k``; so output j depends on exactly the inputs of lower degree.
    Returns float64 ``(H, L)`` and ``(2L, H)`` 0/1 arrays."""
    d = np.arange(L, 0, -1) if reverse else np.arange(1, L + 1)
    deg = 1 + np.arange(H) % (L - 1) if L > 1 else np.zeros(H, dtype=int)
    m1 = (deg[:, None] >= d[None, :]).astype(np.float64)
    m2 = (d[:, None] > deg[None, :]).astype(np.float64)
    return m1, np.vstack([m2, m2])


def _concat(xp, z, ctx, out):
    """``out = [z | ctx]``."""
    out[:, :z.shape[1]] = z
    out[:, z.shape[1]:] = ctx


def _split_add(xp, dzc, dz, dctx):
    """``dz += dzc[:, :L]`` and ``dctx += dzc[:, L:]``."""
    dz += dzc[:, :dz.shape[1]]
    dctx += dzc[:, dz.shape[1]:]


class IAFStep(Layer):
    """One IAF step on ``z (B, L)``: ``{name}.hidden`` (masked dense L + C ->
    H, ``activation``; the C context inputs ``step.context`` unmasked) and
    ``{name}.out`` (masked dense H -> 2L stored as ``{name}.m`` and
    ``{name}.s``, weights initialised to zero), then the gate (:meth:`Backend.iaf_gate`).
    Forward adds the step's terms to the per-image KL estimate that the
    sampler started (``step.kl``); backward chains both paths, the gate's
    direct one and the one through the MADE, whose context part it adds to
    ``step.dcontext``."""

    spec_type = "iaf"

    @classmethod
    def from_spec(cls, spec, n, hwc, ctx):
        return cls(spec["name"], n, spec["hidden"], spec["activation"], spec["reverse"], ctx.leaky_slope,
                   ctx.elu_alpha, context=ctx.context)

    def label(self) -> str:
        return f"iaf({self.hidden.out_features})"

    def __init__(self, name, latent_dim, hidden, activation, reverse, slope=0.01, alpha=1.0, context=0):
        L, C = latent_dim, context
        self.name, self.in_features, self.out_features, self.context = name, L, L, C
        masks = functools.lru_cache(maxsize=1)(lambda: made_masks(L, hidden, reverse))   # when first needed
        hidden_mask = lambda: np.hstack([masks()[0], np.ones((hidden, C))])    # noqa: E731  (h: every unit)
        self.hidden = MaskedDense(f"{name}.hidden", L + C, hidden, activation, hidden_mask, slope=slope,
                                  alpha=alpha)
        self.out = MaskedDense(f"{name}.out", hidden, 2 * L, "identity", lambda: masks()[1], parts=["m", "s"])
        self.parts = (self.hidden, self.out)

    def param_entries(self):
        return [e for p in self.parts for e in p.param_entries()]

    def bind(self, layout, params, grads):
        for p in self.parts:
            p.bind(layout, params, grads)

    def init_params(self, host, layout, rng, scheme):
        """The hidden layer by ``scheme``; the output layer's weights zero,
        m's bias 0 and s's :data:`S_BIAS_INIT` (the module docstring)."""
        for p in self.parts:
            p.init_params(host, layout, rng, scheme)
        m, s = self.out.tensors
        for t in (m, s):
            layout.view(host, t + ".W")[...] = 0
        layout.view(host, m + ".b")[...] = 0
        layout.view(host, s + ".b")[...] = S_BIAS_INIT

    def workspace(self, be, B, need_dx):
        st = State()
        L = self.out_features
        st.h, st.o = self.hidden.workspace(be, B, True), self.out.workspace(be, B, True)
        st.y, st.dhead = be.empty((B, L)), be.empty((B, 2 * L))
        st.dx = be.empty((B, L))
        st.xc = be.empty((B, L + self.context)) if self.context else None
        return st

    def forward(self, be, st, x, step):
        """``z_t (B, L)`` from ``x = z_{t-1}`` and ``step.context``; adds the step's KL terms to ``step.kl``."""
        st.x = x
        made_in = x
        if self.context:
            be.array_op(_concat, x, step.context, st.xc)
            made_in = st.xc
        head = self.out.forward(be, st.o, self.hidden.forward(be, st.h, made_in, step), step)
        be.iaf_gate(st.y, step.kl, x, head, FORGET_BIAS)      # step.kl: the sampler's buffer, None without loss
        return st.y

    def backward(self, be, st, dy, step):
        """dLoss/dz_{t-1}: the gate's direct path plus the path through the MADE."""
        k = step.beta * step.grad_scale if step.row_scale is None else step.row_scale
        be.iaf_gate_backward(st.dx, st.dhead, dy, st.y, st.x, st.o.y, FORGET_BIAS, k)
        dx_made = self.hidden.backward(be, st.h, self.out.backward(be, st.o, st.dhead, step), step)
        if self.context:
            be.array_op(_split_add, dx_made, st.dx, step.dcontext)
            return st.dx
        return be.add_(st.dx, dx_made)

    def torch_module(self, twin):
        """Its two masked Linear layers, the masks as buffers."""
        m = twin.nn.ModuleDict({"hidden": self.hidden.torch_module(twin), "out": self.out.torch_module(twin)})
        m.register_buffer("mask_hidden", twin.torch.from_numpy(self.hidden.mask))
        m.register_buffer("mask_out", twin.torch.from_numpy(self.out.mask))
        return m

    def torch_forward(self, twin, mod, h):
        """Kingma et al. 2016, Algorithm 1, as :meth:`forward` computes it."""
        torch, F = twin.torch, twin.nn.functional
        made_in = torch.cat([h, twin.context], 1) if self.context else h
        u = twin.acts[self.hidden.activation](F.linear(made_in, mod["hidden"].weight * mod.mask_hidden,
                                                        mod["hidden"].bias))
        head = F.linear(u, mod["out"].weight * mod.mask_out, mod["out"].bias)
        n = self.out_features
        sig = torch.sigmoid(head[:, n:] + FORGET_BIAS)
        twin.z = sig * h + (1 - sig) * head[:, :n]
        twin.log_sig = twin.log_sig + torch.log(sig).sum(1)
        return twin.z

    def torch_tensors(self, mod):
        return self.hidden.torch_tensors(mod["hidden"]) + self.out.torch_tensors(mod["out"])
