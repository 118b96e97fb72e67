"""ParamLayout: every parameter tensor of a VAE as a named view into ONE flat buffer.

One allocation for all parameters (and one of the same layout for their
gradients, and for Adam's ``m`` and ``v``) lets the optimizer update the whole
model in a single pass and lets the checkpoint store one array.

Weights use PyTorch's ``nn.Linear`` convention, ``W: (out, in)`` and
``y = x @ W.T + b``, so weights compare with a torch twin without transposes.
The ``mu`` and ``logvar`` heads are stored back to back (both weights, then
both biases), so that together they form one ``(2L, H)`` weight and one
``(2L,)`` bias: the encoder computes both heads with a single GEMM while each
head keeps its own name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

from .config import ModelConfig
from .errors import CheckpointError


@dataclass(frozen=True)
class Entry:
    name: str
    shape: Tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LinearSpec:
    """One dense layer: weight/bias names, fan-in, fan-out, activation after it."""
    name: str
    fan_in: int
    fan_out: int
    activation: str  # "identity" for heads / output


class ParamLayout:
    """Names, shapes and offsets of every tensor in the flat parameter buffer."""

    def __init__(self, entries: List[Tuple[str, Tuple[int, ...]]]):
        self.entries: List[Entry] = []
        self._by_name: Dict[str, Entry] = {}
        off = 0
        for name, shape in entries:
            e = Entry(name, tuple(int(s) for s in shape), off)
            self.entries.append(e)
            self._by_name[name] = e
            off += e.size
        self.size = off

    # --- construction --------------------------------------------------------
    @staticmethod
    def linear_specs(cfg: ModelConfig) -> Tuple[List[LinearSpec], LinearSpec, List[LinearSpec]]:
        """(encoder hidden layers, fused head, decoder layers incl. output)."""
        enc, fan_in = [], cfg.input_dim
        for i, h in enumerate(cfg.hidden):
            enc.append(LinearSpec(f"encoder.{i}", fan_in, h, cfg.activation))
            fan_in = h
        head = LinearSpec("encoder.head", fan_in, 2 * cfg.latent_dim, "identity")
        dec, fan_in = [], cfg.latent_dim
        for i, h in enumerate(cfg.decoder_widths):
            dec.append(LinearSpec(f"decoder.{i}", fan_in, h, cfg.activation))
            fan_in = h
        dec.append(LinearSpec("decoder.out", fan_in, cfg.input_dim, "identity"))
        return enc, head, dec

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> "ParamLayout":
        enc, head, dec = cls.linear_specs(cfg)
        entries = []
        for s in enc:
            entries += [(s.name + ".W", (s.fan_out, s.fan_in)), (s.name + ".b", (s.fan_out,))]
        L, H = cfg.latent_dim, head.fan_in
        entries += [("encoder.mu.W", (L, H)), ("encoder.logvar.W", (L, H)),
                    ("encoder.mu.b", (L,)), ("encoder.logvar.b", (L,))]
        for s in dec:
            entries += [(s.name + ".W", (s.fan_out, s.fan_in)), (s.name + ".b", (s.fan_out,))]
        return cls(entries)

    # --- access --------------------------------------------------------------
    def __getitem__(self, name: str) -> Entry:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def view(self, flat, name: str):
        """View of tensor ``name`` inside ``flat`` (any array module)."""
        e = self._by_name[name]
        return flat[e.offset:e.offset + e.size].reshape(e.shape)

    def views(self, flat) -> Dict[str, object]:
        """``{name: view}`` for every tensor, plus the fused head
        ``encoder.head.W (2L, H)`` and ``encoder.head.b (2L,)``."""
        out = {e.name: self.view(flat, e.name) for e in self.entries}
        mw, mb = self._by_name["encoder.mu.W"], self._by_name["encoder.mu.b"]
        L, H = mw.shape
        out["encoder.head.W"] = flat[mw.offset:mw.offset + 2 * L * H].reshape(2 * L, H)
        out["encoder.head.b"] = flat[mb.offset:mb.offset + 2 * L]
        return out

    # --- serialisation -------------------------------------------------------
    def to_table(self) -> List[dict]:
        return [{"name": e.name, "shape": list(e.shape), "offset": e.offset} for e in self.entries]

    def check_table(self, table: List[dict]) -> None:
        """Raise CheckpointError unless ``table`` describes this exact layout."""
        mine = self.to_table()
        if table != mine:
            def brief(t):
                return ", ".join(f"{r['name']}{tuple(r['shape'])}" for r in t[:4]) + (" ..." if len(t) > 4 else "")
            raise CheckpointError(
                "checkpoint parameter layout differs from this model's "
                f"(file: {brief(table)}; model: {brief(mine)}); build the model from the "
                "checkpoint's own config (fastvae.load) instead of a different architecture")
