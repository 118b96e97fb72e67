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
from .conv import Conv2d, ConvTranspose2d, Reshape
from .dense import Dense, MaskedDense
from .flow import IAFStep
from .vae import GaussianSampler, Likelihood


def _image_hwc(cfg):
    """The input image as (H, W, C) when the config knows its shape, else None."""
    if cfg.image_shape is None:
        return None
    return tuple(cfg.image_shape) + (1,) if len(cfg.image_shape) == 2 else tuple(cfg.image_shape)


def build(cfg) -> List[Layer]:
    """The layers of ``cfg.layers`` (a validated :class:`~fastvae.config.ModelConfig`),
    sizes chained from ``cfg.input_dim`` (and ``cfg.image_shape`` for
    convolutions). Raises ConfigError naming the layer when a stack does not
    chain (sampler head width, image shape, output size)."""
    layers: List[Layer] = []
    n, hwc = cfg.input_dim, _image_hwc(cfg)
    slope, alpha = cfg.leaky_slope, cfg.elu_alpha
    flows = any(spec["type"] == "iaf" for spec in cfg.layers)
    for spec in cfg.layers:
        kind, name = spec["type"], spec["name"]
        if kind in ("conv2d", "conv_transpose2d") and hwc is None:
            raise ConfigError(f"layer {name!r} ({kind}) needs an image: give image_shape, or put a reshape "
                              f"layer before it")
        if kind == "dense":
            layer = Dense(name, n, spec["units"], spec["activation"], spec.get("parts"), slope, alpha)
        elif kind == "conv2d":
            layer = Conv2d(name, hwc, spec["channels"], spec["kernel"], spec["stride"], spec["padding"],
                           spec["activation"], slope, alpha)
        elif kind == "conv_transpose2d":
            layer = ConvTranspose2d(name, hwc, spec["channels"], spec["kernel"], spec["stride"], spec["padding"],
                                    spec["output_padding"], spec["activation"], slope, alpha)
        elif kind == "reshape":
            C, H, W = spec["shape"]
            layer = Reshape(name, n, (H, W, C))
        elif kind == "gaussian":
            layer = GaussianSampler(name, n, spec["latent_dim"], sampled=flows)
        elif kind == "iaf":
            layer = IAFStep(name, n, spec["hidden"], spec["activation"], spec["reverse"], slope, alpha)
        else:
            if n != cfg.input_dim:
                raise ConfigError(f"layer {name!r} scores images of {cfg.input_dim} pixels but the "
                                  f"decoder before it outputs {n}; end the decoder with {cfg.input_dim} units")
            layer = Likelihood(name, n, spec["kind"], spec["sigma"])
        layers.append(layer)
        n, hwc = layer.out_features, getattr(layer, "out_hwc", None)
    return layers


def describe(layers: List[Layer]) -> str:
    """The stack in one line, e.g. ``784-400(relu)-40-z20-400(relu)-784``:
    the input size, then each layer's output size (the sampler as ``zL``)."""
    parts = [str(layers[0].in_features)]
    for layer in layers[:-1]:
        if isinstance(layer, GaussianSampler):
            parts.append(f"z{layer.out_features}")
        elif isinstance(layer, IAFStep):
            parts.append(f"iaf({layer.hidden.out_features})")
        elif isinstance(layer, Reshape):
            H, W, C = layer.out_hwc
            parts.append(f"[{C}x{H}x{W}]")
            continue
        elif hasattr(layer, "out_hwc"):
            H, W, C = layer.out_hwc
            act = "" if layer.activation == "identity" else f"({layer.activation})"
            parts.append(f"{C}x{H}x{W}{act}")
        elif getattr(layer, "activation", "identity") != "identity":
            parts.append(f"{layer.out_features}({layer.activation})")
        else:
            parts.append(str(layer.out_features))
    return "-".join(parts)


def sampler_index(layers: List[Layer]) -> int:
    """Position of the one :class:`GaussianSampler` (encoder before, flows and decoder after)."""
    return next(i for i, layer in enumerate(layers) if isinstance(layer, GaussianSampler))


def decoder_index(layers: List[Layer]) -> int:
    """Position of the first decoder layer: after the sampler and its flow steps."""
    i = sampler_index(layers) + 1
    while isinstance(layers[i], IAFStep):
        i += 1
    return i


__all__ = ["Step", "State", "Layer", "Dense", "MaskedDense", "IAFStep", "GaussianSampler", "Likelihood", "Conv2d",
           "ConvTranspose2d", "Reshape", "build", "describe", "sampler_index", "decoder_index"]
