"""The layers a VAE is a stack of: each a forward/backward pair, side by side.

A model is a list of layers walked forward (encoder, sampler, decoder,
likelihood) and then in reverse for the gradients (llm.c style: a new layer
type is one class with ``forward`` and ``backward`` plus its kernels). Layers
hold no arrays of their own: parameters are views into the model's ONE flat
buffer (:class:`fastvae.layout.ParamLayout`) and per-batch buffers live in a
:class:`State` that the layer sizes with :meth:`Layer.workspace`. They call
backend primitives only, so every layer runs on every backend.

Conventions: a batch is ``B`` images; ``x`` the layer input ``(B, in_features)``,
``y`` its output; ``dy`` holds dLoss/dy on entry to ``backward``, which
returns dLoss/dx (``None`` for the first layer, whose input is data) and
writes its parameter gradients (``dW``, ``db``) into the flat gradient buffer.
The loss is ``mean_i(recon_i + beta * kl_i)`` over the batch (nats per image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

from .errors import ConfigError


@dataclass
class Step:
    """What one pass over a batch needs besides activations.

    x: ``(B, D)`` target images (the likelihood's data); eps: ``(B, L)``
    N(0, 1) noise for the sampler; beta: KL weight; grad_scale: dLoss/d(per-
    image term) = 1/B; train: compute gradients; need_loss: compute the
    per-image ``nll`` and ``kl`` (skipped on steps whose loss is not reported).
    """
    x: object
    eps: object
    beta: float = 1.0
    grad_scale: float = 1.0
    train: bool = False
    need_loss: bool = True


class State:
    """Per-batch-size buffers of one layer (attributes set by the layer)."""


class Layer:
    """Base class. ``in_features``/``out_features``: per-image sizes."""

    name: str
    in_features: int
    out_features: int

    def param_entries(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """``(name, shape)`` of every tensor this layer adds to the flat buffer, in order."""
        return []

    def bind(self, layout, params, grads) -> None:
        """Take this layer's views into the flat ``params`` and ``grads``."""

    def init_params(self, host, layout, rng, scheme) -> None:
        """Fill this layer's tensors inside the host vector ``host`` (float64)."""

    def workspace(self, be, B: int, need_dx: bool) -> State:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, be, st: State, x, step: Step):  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, be, st: State, dy, step: Step):  # pragma: no cover - interface
        raise NotImplementedError


class Dense(Layer):
    """Fully connected layer with its activation: ``y = act(x W^T + b)``.

    W: ``(out, in)``, b: ``(out,)`` (PyTorch's ``nn.Linear`` convention, so
    weights compare with a torch twin without transposes); x: ``(B, in)``,
    y: ``(B, out)`` in the model dtype. ``parts`` stores the one GEMM's rows
    as several named tensors, back to back (all weights, then all biases):
    the encoder's ``mu | logvar`` head is one ``(2L, H)`` GEMM whose halves
    keep their names ``encoder.mu.W`` and ``encoder.logvar.W``.
    """

    def __init__(self, name, in_features, out_features, activation, parts=None, slope=0.01, alpha=1.0):
        self.name, self.in_features, self.out_features = name, in_features, out_features
        self.activation, self.slope, self.alpha = activation, slope, alpha
        prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""
        self.tensors = [prefix + p for p in parts] if parts else [name]

    def param_entries(self):
        rows = self.out_features // len(self.tensors)
        return ([(t + ".W", (rows, self.in_features)) for t in self.tensors]
                + [(t + ".b", (rows,)) for t in self.tensors])

    def bind(self, layout, params, grads):
        first_w, first_b = self.tensors[0] + ".W", self.tensors[0] + ".b"
        w_shape = (self.out_features, self.in_features)
        self.W, self.dW = layout.span(params, first_w, w_shape), layout.span(grads, first_w, w_shape)
        self.b, self.db = layout.span(params, first_b, (self.out_features,)), layout.span(grads, first_b, (self.out_features,))

    def init_params(self, host, layout, rng, scheme):
        """``pytorch``: W, b ~ U(-k, k), k = 1/sqrt(fan_in) (``nn.Linear``'s
        default, kaiming_uniform with a = sqrt(5)); ``xavier``: W ~ U(-a, a),
        a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010, eq. 16), b = 0.
        Each part is initialised as a layer of its own (W, then b)."""
        fan_in = self.in_features
        for t in self.tensors:
            w, b = layout.view(host, t + ".W"), layout.view(host, t + ".b")
            if scheme == "xavier":
                a = math.sqrt(6.0 / (fan_in + w.shape[0]))
                w[...] = rng.uniform(-a, a, w.size).reshape(w.shape)
            else:
                k = 1.0 / math.sqrt(fan_in)
                w[...] = rng.uniform(-k, k, w.size).reshape(w.shape)
                b[...] = rng.uniform(-k, k, b.size)

    def workspace(self, be, B, need_dx):
        st = State()
        st.pre = be.empty((B, self.out_features))            # x W^T + b, kept for act'
        st.y = st.pre if self.activation == "identity" else be.empty((B, self.out_features))
        st.dx = be.empty((B, self.in_features)) if need_dx else None
        return st

    def forward(self, be, st, x, step):
        """``pre = x W^T + b`` (one GEMM, then the bias fused with the
        activation); returns ``y = act(pre)``, ``(B, out)``."""
        st.x = x
        be.gemm(st.pre, x, self.W, trans_b=True)
        be.bias_act(None if st.y is st.pre else st.y, st.pre, self.b, self.activation, self.slope, self.alpha)
        return st.y

    def backward(self, be, st, dy, step):
        """In place ``dy *= act'(pre)`` (now dLoss/dpre), then
        ``dW = dpre^T x``, ``db = sum_i dpre_i`` and ``dx = dpre W``."""
        if self.activation != "identity":
            be.act_backward(dy, st.pre, st.y, self.activation, self.slope, self.alpha)
        be.gemm(self.dW, dy, st.x, trans_a=True)
        be.col_sum(self.db, dy)
        if st.dx is None:
            return None
        be.gemm(st.dx, dy, self.W)
        return st.dx


class GaussianSampler(Layer):
    """The reparameterized diagonal Gaussian posterior and its KL to N(0, I).

    x: the encoder's head ``(B, 2L) = [mu | logvar]``; y: ``z (B, L)``.
    Forward: ``std = exp(logvar/2)``, ``z = mu + std * eps`` (Kingma & Welling
    2014, Sec. 2.4) and per image ``kl = -1/2 sum_j (1 + logvar - mu^2 -
    exp(logvar))`` nats (ibid., Appendix B). Backward: ``dmu = dz + c mu``,
    ``dlogvar = (dz eps std + c (std^2 - 1)) / 2`` with ``c = beta / B`` the
    weight of each image's KL in the loss. Both are one fused kernel.
    """

    def __init__(self, name, in_features, latent_dim):
        if in_features != 2 * latent_dim:
            raise ConfigError(f"layer {name!r} samples latent_dim {latent_dim} and needs a head of "
                              f"2 x {latent_dim} = {2 * latent_dim} units before it, got {in_features}")
        self.name, self.in_features, self.out_features = name, in_features, latent_dim

    def workspace(self, be, B, need_dx):
        st = State()
        L = self.out_features
        st.y, st.std, st.kl = be.empty((B, L)), be.empty((B, L)), be.empty((B,))
        st.dx = be.empty((B, 2 * L)) if need_dx else None
        return st

    def forward(self, be, st, x, step):
        st.x = x
        be.reparam_kl(st.y, st.kl if step.need_loss else None, st.std, x, step.eps)
        return st.y

    def backward(self, be, st, dy, step):
        if st.dx is None:
            return None
        be.reparam_kl_backward(st.dx, dy, st.x, st.std, step.eps, step.beta * step.grad_scale)
        return st.dx


class Likelihood(Layer):
    """The reconstruction term: per-image negative log-likelihood ``nll (B,)``
    in nats, summed over pixels, of the targets ``step.x (B, D)`` under the
    decoder output ``x = logits (B, D)``.

    bernoulli: nll = softplus(l) - x l, grad = sigmoid(l) - x (logits);
    gaussian: nll = (l - x)^2 / (2 sigma^2) + log sigma + log(2 pi)/2,
    grad = (l - x) / sigma^2 (fixed sigma, pixel units); mse: nll = (l - x)^2,
    grad = 2 (l - x). The gradient ``dx = grad_scale * grad`` is computed in
    the same fused pass as the forward (one read of the logits), so
    ``backward`` only hands it on.
    """

    def __init__(self, name, in_features, kind, sigma):
        self.name, self.in_features, self.out_features = name, in_features, 1
        self.kind, self.sigma = kind, sigma

    def workspace(self, be, B, need_dx):
        st = State()
        st.y = be.empty((B,))                      # nll
        st.dx = be.empty((B, self.in_features)) if need_dx else None
        return st

    def forward(self, be, st, x, step):
        be.likelihood(st.dx if step.train else None, st.y if step.need_loss else None, x, step.x,
                      self.kind, self.sigma, step.grad_scale)
        return st.y

    def backward(self, be, st, dy, step):
        return st.dx


def build(cfg) -> List[Layer]:
    """The layers of ``cfg.layers`` (a validated :class:`~fastvae.config.ModelConfig`),
    sizes chained from ``cfg.input_dim``. Raises ConfigError naming the layer
    when a stack does not chain (sampler head width, output size)."""
    layers: List[Layer] = []
    n = cfg.input_dim
    for spec in cfg.layers:
        kind = spec["type"]
        if kind == "dense":
            layer = Dense(spec["name"], n, spec["units"], spec["activation"], spec.get("parts"),
                          cfg.leaky_slope, cfg.elu_alpha)
        elif kind == "gaussian":
            layer = GaussianSampler(spec["name"], n, spec["latent_dim"])
        else:
            if n != cfg.input_dim:
                raise ConfigError(f"layer {spec['name']!r} scores images of {cfg.input_dim} pixels but the "
                                  f"decoder before it outputs {n}; end the decoder with {cfg.input_dim} units")
            layer = Likelihood(spec["name"], n, spec["kind"], spec["sigma"])
        layers.append(layer)
        n = layer.out_features
    return layers


def describe(layers: List[Layer]) -> str:
    """The stack in one line, e.g. ``784-400(relu)-40-z20-400(relu)-784``:
    the input size, then each layer's output size (the sampler as ``zL``)."""
    parts = [str(layers[0].in_features)]
    for layer in layers[:-1]:
        if isinstance(layer, GaussianSampler):
            parts.append(f"z{layer.out_features}")
        elif getattr(layer, "activation", "identity") != "identity":
            parts.append(f"{layer.out_features}({layer.activation})")
        else:
            parts.append(str(layer.out_features))
    return "-".join(parts)


def sampler_index(layers: List[Layer]) -> int:
    """Position of the one :class:`GaussianSampler` (encoder before, decoder after)."""
    return next(i for i, layer in enumerate(layers) if isinstance(layer, GaussianSampler))


__all__ = ["Step", "State", "Layer", "Dense", "GaussianSampler", "Likelihood", "build", "describe", "sampler_index"]
