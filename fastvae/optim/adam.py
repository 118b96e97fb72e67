"""Adam over the flat parameter buffer: one backend call per step.

Kingma & Ba 2015 ("Adam: A Method for Stochastic Optimization", Algorithm 1),
written in the form of ``torch.optim.Adam`` so that both follow the same
trajectory: bias corrections are host scalars folded into ``step_size =
lr / (1 - beta1^t)`` and ``bc2_sqrt = sqrt(1 - beta2^t)``, and the update is

    g = grad (+ weight_decay * param          for L2 weight decay)
    param *= 1 - lr * weight_decay            (AdamW, Loshchilov & Hutter 2019)
    m = beta1 m + (1 - beta1) g
    v = beta2 v + (1 - beta2) g^2
    param -= step_size * m / (sqrt(v) / bc2_sqrt + eps)

The state (``m``, ``v`` on the device, step count ``t`` on the host) is saved
in checkpoints, so training resumes exactly. Hooks (``Adam.hooks``) run on the
gradient buffer before the Adam kernel, in order: gradient clipping
(:class:`ClipGradNorm`) and, for data-parallel training, the all-reduce.
"""

from __future__ import annotations

import math

import numpy as np

from fastvae.errors import CheckpointError, ConfigError


class ClipGradNorm:
    """Optimizer hook: rescale the whole flat gradient to global L2 norm
    ``max_norm`` when it is larger (Pascanu et al. 2013, "On the difficulty of
    training recurrent neural networks", Alg. 2): ``g *= min(1, max_norm /
    (||g|| + 1e-6))``, computed on the device without a host sync."""

    def __init__(self, max_norm: float):
        if not (max_norm > 0 and math.isfinite(max_norm)):
            raise ConfigError(f"clip_grad_norm must be a positive finite number, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def __call__(self, opt) -> None:
        opt.backend.array_op(_clip_to_norm, opt.grads, self.max_norm)


def _clip_to_norm(xp, g, max_norm):
    """``g *= min(1, max_norm / (||g|| + 1e-6))`` for a flat gradient ``g``."""
    norm = xp.sqrt(xp.dot(g, g))
    g *= xp.minimum(1.0, max_norm / (norm + 1e-6))


class Adam:
    """Adam on flat buffers ``params`` and ``grads`` (same shape, same backend).

    lr: learning rate (> 0); betas: (beta1, beta2) in [0, 1); eps: > 0 added to
    the denominator; weight_decay >= 0; decoupled: AdamW when True, L2 when False;
    hooks: callables ``hook(adam)`` run in order on ``grads`` before each update.
    """

    def __init__(self, backend, params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, decoupled=False, hooks=()):
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"Adam lr must be a positive finite number, got {lr!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"Adam betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ConfigError(f"Adam eps must be positive, got {eps!r}")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.backend = backend
        self.params, self.grads = params, grads
        self.lr, self.betas, self.eps = float(lr), tuple(map(float, betas)), float(eps)
        self.weight_decay, self.decoupled = float(weight_decay), bool(decoupled)
        self.m = backend.zeros(params.shape)
        self.v = backend.zeros(params.shape)
        self.t = 0
        self.hooks = list(hooks)

    @classmethod
    def for_model(cls, model, **kw):
        return cls(model.backend, model.params, model.grads, **kw)

    def step(self, lr: float = None) -> None:
        """Run the hooks, then apply one update with the gradients in ``grads``
        at learning rate ``lr`` (default ``self.lr``; a schedule may pass 0).
        Raises ConfigError for a negative or non-finite ``lr`` (before anything changes)."""
        lr = self.lr if lr is None else float(lr)
        if not (lr >= 0 and math.isfinite(lr)):
            raise ConfigError(f"Adam step lr must be a finite number >= 0, got {lr!r}")
        for hook in self.hooks:
            hook(self)
        self.t += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1 ** self.t
        bc2 = 1.0 - b2 ** self.t
        wd = self.weight_decay
        self.backend.adam_update(
            self.params, self.grads, self.m, self.v,
            beta1=b1, beta2=b2, eps=self.eps, step_size=lr / bc1, bc2_sqrt=math.sqrt(bc2),
            weight_decay=0.0 if self.decoupled else wd,
            decay_factor=(1.0 - lr * wd) if self.decoupled else 1.0)

    def state_dict(self) -> dict:
        """Host copies: ``m``, ``v`` (flat arrays) and ``t`` (int)."""
        return {"m": self.backend.to_host(self.m).copy(),
                "v": self.backend.to_host(self.v).copy(), "t": int(self.t)}

    def load_state_dict(self, state: dict) -> None:
        m, v = np.asarray(state["m"]), np.asarray(state["v"])
        if m.shape != tuple(self.m.shape) or v.shape != tuple(self.v.shape):
            raise CheckpointError(
                f"Adam state has shape {m.shape} but the model has {tuple(self.m.shape)} parameters")
        self.backend.copy_(self.m, m.astype(self.backend.dtype, copy=False))
        self.backend.copy_(self.v, v.astype(self.backend.dtype, copy=False))
        self.t = int(state["t"])
