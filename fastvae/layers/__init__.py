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

from typing import List

from ..errors import ConfigError
from .base import Layer, State, Step
from .dense import Dense
from .vae import GaussianSampler, Likelihood


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
