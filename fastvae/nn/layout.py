"""ParamLayout: every parameter tensor of a VAE as a named view into ONE flat buffer.

One allocation for all parameters (and one of the same layout for their
gradients, and for Adam's ``m`` and ``v``) lets the optimizer update the whole
model in a single pass and lets the checkpoint store one array.

Weights use PyTorch's ``nn.Linear`` convention, ``W: (out, in)`` and
``y = x @ W.T + b``, so weights compare with a torch twin without transposes.
The layout is built by walking the model's layers (``fastvae.nn.layers``), each
adding its tensors in order; a layer whose tensors are stored back to back
(the ``mu | logvar`` head: both weights, then both biases) takes one
contiguous view across them with :meth:`ParamLayout.span`, so its two halves
are one GEMM while each keeps its own name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

from fastvae.config import ModelConfig
from fastvae.errors import CheckpointError
from fastvae.nn.layers import build


@dataclass(frozen=True)
class Entry:
    name: str
    shape: Tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


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
    @classmethod
    def for_layers(cls, layers) -> "ParamLayout":
        """The layout of ``layers`` (``fastvae.nn.layers.Layer`` list), walked in order."""
        return cls([entry for layer in layers for entry in layer.param_entries()])

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> "ParamLayout":
        return cls.for_layers(build(cfg))

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
        """``{name: view}`` for every tensor."""
        return {e.name: self.view(flat, e.name) for e in self.entries}

    def span(self, flat, first: str, shape):
        """View of ``shape`` starting where tensor ``first`` starts: one
        contiguous view across tensors stored back to back. Raises ValueError
        when it would run past the buffer."""
        e = self._by_name[first]
        n = math.prod(shape)
        if e.offset + n > self.size:
            raise ValueError(f"a {tuple(shape)} view from {first!r} runs past the {self.size}-element buffer")
        return flat[e.offset:e.offset + n].reshape(shape)

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
