"""The layers a VAE is a stack of: each a forward/backward pair, side by side.

A model is a list of layers walked forward (encoder, sampler, decoder,
likelihood) and then in reverse for the gradients (llm.c style: a new layer
type is one class with ``forward`` and ``backward`` plus its kernels). Layers
hold no arrays of their own: parameters are views into the model's ONE flat
buffer (:class:`fastvae.nn.layout.ParamLayout`) and per-batch buffers live in a
:class:`State` that the layer sizes with :meth:`Layer.workspace`. They call
backend primitives only, so every layer runs on every backend.

Conventions: a batch is ``B`` images; ``x`` the layer input ``(B, in_features)``,
``y`` its output; ``dy`` holds dLoss/dy on entry to ``backward``, which
returns dLoss/dx (``None`` for the first layer, whose input is data) and
writes its parameter gradients (``dW``, ``db``) into the flat gradient buffer.
The loss is ``mean_i(recon_i + beta * kl_i)`` over the batch (nats per image).

Package: ``base`` (Layer, State), ``dense``, ``conv``, ``flow`` (IAF) and
``vae`` (sampler, likelihood), one layer family per file. May import:
fastvae.backends (primitives only), fastvae.nn.opcodes, fastvae.errors/checks.
"""

from __future__ import annotations

from typing import List

from fastvae.errors import ConfigError
from fastvae.nn.layers.base import BuildContext, Layer, State, Step
from fastvae.nn.layers.conv import Conv2d, ConvTranspose2d, Reshape
from fastvae.nn.layers.dense import Dense, MaskedDense
from fastvae.nn.layers.flow import IAFStep
from fastvae.nn.layers.vae import GaussianSampler, Likelihood


def _image_hwc(cfg):
    """The input image as (H, W, C) when the config knows its shape, else None."""
    if cfg.image_shape is None:
        return None
    return tuple(cfg.image_shape) + (1,) if len(cfg.image_shape) == 2 else tuple(cfg.image_shape)


#: spec ``"type"`` -> the layer class that builds it (its ``from_spec``): the one place a layer type registers
LAYER_TYPES = {cls.spec_type: cls for cls in (Dense, Conv2d, ConvTranspose2d, Reshape, GaussianSampler, IAFStep,
                                              Likelihood)}


def build(cfg) -> List[Layer]:
    """The layers of ``cfg.layers`` (a validated :class:`~fastvae.config.ModelConfig`),
    sizes chained from ``cfg.input_dim`` (and ``cfg.image_shape`` for
    convolutions), each built by its type's class (:data:`LAYER_TYPES`).
    Raises ConfigError naming the layer when a stack does not chain (sampler
    head width, image shape, output size)."""
    layers: List[Layer] = []
    n, hwc = cfg.input_dim, _image_hwc(cfg)
    ctx = BuildContext(cfg.input_dim, cfg.leaky_slope, cfg.elu_alpha,
                       flows=any(spec["type"] == "iaf" for spec in cfg.layers),
                       context=next((spec.get("context", 0) for spec in cfg.layers if spec["type"] == "gaussian"), 0))
    for spec in cfg.layers:
        layer = LAYER_TYPES[spec["type"]].from_spec(spec, n, hwc, ctx)
        layers.append(layer)
        n, hwc = layer.out_features, getattr(layer, "out_hwc", None)
    return layers


def describe(layers: List[Layer]) -> str:
    """The stack in one line, e.g. ``784-400(relu)-40-z20-400(relu)-784``:
    the input size, then each layer's :meth:`~Layer.label` (the sampler as ``zL``)."""
    return "-".join([str(layers[0].in_features)] + [layer.label() for layer in layers[:-1]])


def sampler_index(layers: List[Layer]) -> int:
    """Position of the one :class:`GaussianSampler` (encoder before, flows and decoder after)."""
    return next(i for i, layer in enumerate(layers) if isinstance(layer, GaussianSampler))


def decoder_index(layers: List[Layer]) -> int:
    """Position of the first decoder layer: after the sampler and its flow steps."""
    i = sampler_index(layers) + 1
    while isinstance(layers[i], IAFStep):
        i += 1
    return i


__all__ = ["Step", "State", "Layer", "BuildContext", "LAYER_TYPES", "Dense", "MaskedDense", "IAFStep", "GaussianSampler", "Likelihood", "Conv2d",
           "ConvTranspose2d", "Reshape", "build", "describe", "sampler_index", "decoder_index"]
