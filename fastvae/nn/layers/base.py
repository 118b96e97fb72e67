"""The layer interface: :class:`Step` (what a pass needs besides
activations), :class:`State` (per-batch buffers) and :class:`Layer`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple


@dataclass
class Step:
    """What one pass over a batch needs besides activations.

    x: ``(B, D)`` target images (the likelihood's data); eps: ``(B, L)``
    N(0, 1) noise for the sampler; beta: KL weight; grad_scale: dLoss/d(per-
    image term) = 1/B; train: compute gradients; need_loss: compute the
    per-image ``nll`` and ``kl`` (skipped on steps whose loss is not reported);
    kl: the per-image KL buffer ``(B,)`` the sampler fills and flow steps
    after it add to (set during the forward walk); sampled_kl: the sampler
    gives the single-sample estimate ``log q(z|x) - log p(z)`` even without
    flows (importance weights need it); row_scale: ``(B, 1)`` per-row weights
    of the KL terms in the backward of flow steps, in place of ``beta *
    grad_scale`` (IWAE's normalised importance weights, scaled);
    context, dcontext: the encoder's context h ``(B, C)`` that flow steps
    read, and its gradient, which their backward adds to (both set by whoever
    starts the flow: the sampler, or an objective that samples itself).
    """
    x: object
    eps: object
    beta: float = 1.0
    grad_scale: float = 1.0
    train: bool = False
    need_loss: bool = True
    kl: object = None
    sampled_kl: bool = False
    row_scale: object = None
    context: object = None
    dcontext: object = None


class State:
    """Per-batch-size buffers of one layer (attributes set by the layer)."""

    def view(self, key, a, *shape):
        """``a.reshape(shape)``, the same view object on every call while
        ``key`` meets the same array ``a`` (one view kept per key and shape):
        a CUDA-graph replay checks each launch's arrays by identity first, and
        a CuPy view takes microseconds to build."""
        views = self.__dict__.setdefault("_views", {})
        hit = views.get((key, shape))
        if hit is None or hit[0] is not a:
            hit = views[(key, shape)] = (a, a.reshape(shape))
        return hit[1]


@dataclass(frozen=True)
class BuildContext:
    """What building one layer from its spec needs besides its input size:
    the model's ``input_dim`` (pixels per image), the ``leaky_slope`` and
    ``elu_alpha`` of its activations, and whether the stack has flow steps
    (``flows``: the sampler then gives its sample's log-density terms) and
    the width ``context`` of the encoder's context h for them (0: none)."""
    input_dim: int
    leaky_slope: float = 0.01
    elu_alpha: float = 1.0
    flows: bool = False
    context: int = 0


class Layer:
    """Base class. ``in_features``/``out_features``: per-image sizes.

    A layer type that a spec names sets ``spec_type`` (the spec's ``"type"``)
    and implements :meth:`from_spec`; :data:`fastvae.nn.layers.LAYER_TYPES`
    maps each spec type to its class."""

    name: str
    in_features: int
    out_features: int
    spec_type: str = ""
    activation: str = "identity"

    @classmethod
    def from_spec(cls, spec: dict, n: int, hwc, ctx: BuildContext) -> "Layer":  # pragma: no cover - interface
        """The layer of validated ``spec`` taking ``n`` values per image
        (``hwc``: their (H, W, C) image shape, None when they are not an
        image). ConfigError when it does not chain onto its input."""
        raise NotImplementedError

    def label(self) -> str:
        """This layer's part of the one-line stack description (its output:
        ``400(relu)``, ``20``)."""
        act = getattr(self, "activation", "identity")
        return str(self.out_features) if act == "identity" else f"{self.out_features}({act})"

    def param_entries(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """``(name, shape)`` of every tensor this layer adds to the flat buffer, in order."""
        return []

    def bind(self, layout, params, grads) -> None:
        """Take this layer's views into the flat ``params`` and ``grads``."""

    def init_params(self, host, layout, rng, scheme) -> None:
        """Fill this layer's tensors inside the host vector ``host`` (float64)."""

    def workspace(self, be, B: int, need_dx: bool) -> State:  # pragma: no cover - interface
        """Buffers for a batch of ``B`` on backend ``be`` (model dtype): at least
        ``y (B, out_features)`` and, when ``need_dx``, ``dx (B, in_features)``."""
        raise NotImplementedError

    def forward(self, be, st: State, x, step: Step):  # pragma: no cover - interface
        """``x (B, in_features)`` -> ``y (B, out_features)`` (returned; kept in ``st``
        with whatever ``backward`` needs)."""
        raise NotImplementedError

    def backward(self, be, st: State, dy, step: Step):  # pragma: no cover - interface
        """``dy (B, out_features)`` = dLoss/dy (may be overwritten) -> dLoss/dx
        ``(B, in_features)`` or None when ``need_dx`` was False; writes the
        layer's parameter gradients into the flat gradient buffer."""
        raise NotImplementedError

    # ---- the PyTorch twin (fastvae.bench.torch_twin: reference tests and benchmarks; torch is passed in)
    def torch_module(self, twin):
        """The ``torch.nn`` module holding this layer's parameters in PyTorch's
        layout, or None for a layer without parameters. ``twin``: the twin's
        context (``torch``, ``nn``, ``acts``, ``rows``, ``nchw``, ``eps``)."""
        return None

    def torch_forward(self, twin, mod, h):  # pragma: no cover - interface
        """This layer's forward in PyTorch on ``h`` (rows ``(B, D)`` or NCHW),
        which autograd differentiates: the reference its hand-written backward
        is tested against. ``mod``: its :meth:`torch_module`."""
        raise NotImplementedError

    def torch_tensors(self, mod) -> List[tuple]:
        """``[(engine tensor name, torch parameter, row slice)]``: where each of
        this layer's flat-buffer tensors lives in ``mod``."""
        return []


def uniform_init(w, b, rng, scheme, fan_in, fan_out):
    """Fill host views ``w`` then ``b`` from ``rng``: ``pytorch`` is torch's
    default for Linear/Conv layers, W, b ~ U(-k, k) with k = 1/sqrt(fan_in)
    (kaiming_uniform with a = sqrt(5)); ``xavier`` is W ~ U(-a, a),
    a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010, eq. 16), b left 0."""
    if scheme == "xavier":
        a = math.sqrt(6.0 / (fan_in + fan_out))
        w[...] = rng.uniform(-a, a, w.size).reshape(w.shape)
    else:
        k = 1.0 / math.sqrt(fan_in)
        w[...] = rng.uniform(-k, k, w.size).reshape(w.shape)
        b[...] = rng.uniform(-k, k, b.size)
