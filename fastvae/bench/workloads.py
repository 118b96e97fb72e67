"""The benchmark's workloads: the five it times by default, and any MLP or
ConvNet written as a name (``fastvae bench --workloads 3072-512-64/b256``)."""

from __future__ import annotations

import re
from typing import Dict

from fastvae.config import ModelConfig
from fastvae.errors import ConfigError

WORKLOADS: Dict[str, dict] = {
    "784-400-20/b128": dict(input_dim=784, hidden=[400], latent_dim=20, batch_size=128,
                            note="the PyTorch VAE example"),
    "784-1000-2/b32": dict(input_dim=784, hidden=[1000], latent_dim=2, batch_size=32,
                           note="the seed's MNIST setting"),
    "784-1000-50/b4096": dict(input_dim=784, hidden=[1000], latent_dim=50, batch_size=4096,
                              note="large batch"),
    "4096-1000-50/b128": dict(input_dim=4096, hidden=[1000], latent_dim=50, batch_size=128,
                              note="64x64 faces"),
    "conv28-20/b128": dict(input_dim=784, hidden=[], latent_dim=20, batch_size=128, arch="conv",
                           image_shape=(28, 28), note="the seed's ConvNet on MNIST"),
}

_MLP = re.compile(r"(\d{1,18}(?:-\d{1,18})+)/b(\d{1,18})")
_CONV = re.compile(r"conv(\d{1,5})-(\d{1,18})/b(\d{1,18})")
FORMS = ("D-H-...-L/bB (an MLP: D pixels, hidden widths H, latent_dim L, batch B; e.g. 3072-512-64/b256) or "
         "convS-L/bB (the ConvNet on S x S images, S = 28 or a power of two from 16 to 1024; e.g. conv64-10/b64)")


def workload(name: str) -> dict:
    """The workload ``name`` names: one of :data:`WORKLOADS`, else an MLP
    ``D-H1-...-Hk-L/bB`` (k >= 0 hidden layers, the decoder mirrored) or a
    ConvNet ``convS-L/bB`` (:func:`fastvae.nn.architectures` picks the seed's
    net at S = 28, Burgess et al. 2018's otherwise). Returns a dict of
    ``input_dim, hidden, latent_dim, batch_size`` (and ``arch``,
    ``image_shape``). Raises ConfigError for any other name or for a model
    that :class:`fastvae.ModelConfig` refuses, with the reason."""
    if not isinstance(name, str):
        raise ConfigError(f"a workload is a name such as '784-400-20/b128', got {name!r}")
    if name in WORKLOADS:
        return WORKLOADS[name]
    mlp, conv = _MLP.fullmatch(name), _CONV.fullmatch(name)
    if mlp:
        dims = [int(v) for v in mlp.group(1).split("-")]
        wl = dict(input_dim=dims[0], hidden=dims[1:-1], latent_dim=dims[-1], batch_size=int(mlp.group(2)),
                  note="an MLP of your own")
    elif conv:
        side = int(conv.group(1))
        wl = dict(input_dim=side * side, hidden=[], latent_dim=int(conv.group(2)), batch_size=int(conv.group(3)),
                  arch="conv", image_shape=(side, side), note="a ConvNet of your own")
    else:
        raise ConfigError(f"unknown workload {name!r}; name one of {list(WORKLOADS)} or write your own as {FORMS}")
    if wl["batch_size"] < 1:
        raise ConfigError(f"workload {name!r}: the batch size (/bB) must be at least 1")
    try:
        fits(wl, config(wl))
    except ConfigError as exc:
        raise ConfigError(f"workload {name!r}: {exc}") from None
    return wl


def fits(wl: dict, cfg: ModelConfig) -> None:
    """Raise ConfigError when the workload's model, Adam state and batch
    buffers (float64, the widest dtype timed; the batch first drawn on the
    host as float64) would not fit in the host's free memory."""
    from fastvae.nn import layers
    from fastvae.training import memory
    from fastvae.nn.layout import ParamLayout
    stack = layers.build(cfg)
    B = wl["batch_size"]
    need = memory.estimate(stack, ParamLayout.for_layers(stack).size, 8, batch=B, train=True) + 8 * B * cfg.input_dim
    memory.preflight(need, None, "timing it (its parameters, Adam state and batch buffers)",
                     "make the layers or the batch (/bB) smaller")


def config(wl: dict, dtype="float32") -> ModelConfig:
    """The model config of a workload (an MLP, or ``arch`` with ``image_shape``)."""
    return ModelConfig(input_dim=wl["input_dim"], hidden=wl["hidden"], latent_dim=wl["latent_dim"], dtype=dtype,
                       arch=wl.get("arch", "mlp"), image_shape=wl.get("image_shape"))
