"""The :class:`Dataset` every loader returns (host arrays of a train and a
test split); the loaders are in :mod:`fastvae.datasets` and
:mod:`fastvae.datasets.sprites`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from fastvae.errors import DataError
from fastvae.naming import option


@dataclass
class Dataset:
    """Images and labels of a train split and (when there is one) a test split.

    x_train: (N, D) float32 in [0, 1]; y_train: (N,) int64 or None;
    x_test, y_test: likewise or None; image_shape: (H, W) or (H, W, C);
    factors_*: (N, K) float64 generative factors (sprites only) and
    factor_names; label_names: names of the label values when known.
    """

    name: str
    x_train: np.ndarray
    y_train: Optional[np.ndarray]
    x_test: Optional[np.ndarray]
    y_test: Optional[np.ndarray]
    image_shape: Tuple[int, ...]
    label_names: Optional[List[str]] = None
    factors_train: Optional[np.ndarray] = None
    factors_test: Optional[np.ndarray] = None
    factor_names: Optional[List[str]] = None

    def __post_init__(self):
        """Array-likes become arrays (a streamed split, with ``shape``, stays
        as it is); labels and factors must have one row per image of their
        split. Raises DataError naming the mismatch."""
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            if x is None:
                continue
            if not hasattr(x, "shape"):
                x = np.asarray(x)
                setattr(self, f"x_{split}", x)
            for kind in ("y", "factors"):
                v = getattr(self, f"{kind}_{split}")
                if v is None:
                    continue
                v = np.asarray(v)
                setattr(self, f"{kind}_{split}", v)
                if len(v) != len(x):
                    raise DataError(f"dataset {self.name!r}: {len(x)} {split} images but {len(v)} {split} "
                                    f"{'labels' if kind == 'y' else 'factor rows'}; give one per image")
        self.image_shape = tuple(int(s) for s in self.image_shape)

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])

    def split(self, name: str):
        """``(x, y)`` of ``"train"`` or ``"test"``; DataError when absent."""
        if name == "train":
            return self.x_train, self.y_train
        if name == "test":
            if self.x_test is None:
                raise DataError(f"dataset {self.name!r} has no test split; use {option('split', 'train')}")
            return self.x_test, self.y_test
        raise DataError(f"unknown split {name!r}; use train or test")
