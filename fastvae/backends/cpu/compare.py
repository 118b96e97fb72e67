"""Choices measured when training starts (``--threads auto``, ``--blas
auto``): the work they time, the model's own forward and backward pass
(:func:`model_probe`), and the interleaved loop that times it under each
option (:func:`compare`). The benchmark's longer timing is
:mod:`fastvae.bench.timing`."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import numpy as np


def compare(options: Dict[str, Callable[[], None]], work: Callable[[], None], rounds: int = 5,
            settle: float = 0.0) -> Dict[str, float]:
    """Median ms of ``work()`` under each of ``options`` (name -> a callable
    that puts that option in force: a GEMM library, a thread count), for a
    choice made at start-up: ``rounds`` rounds in which each option, in an
    order rotated every round, is put in force, idles ``settle`` seconds,
    runs ``work()`` once untimed and once timed; interleaved, so that a slow
    phase of the machine reaches every option alike. The last option of the
    last round stays in force; the caller sets the one it keeps."""
    names = list(options)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            options[name]()
            if settle:
                time.sleep(settle)
            work()
            t = time.perf_counter()
            work()
            times[name].append(1e3 * (time.perf_counter() - t))
    return {n: statistics.median(v) for n, v in times.items()}


def model_probe(model, batch_size: int) -> Callable[[], None]:
    """Representative work for a measured choice: ``model``'s forward +
    backward (``loss_and_grad`` on a random batch of ``batch_size``; it writes
    only the gradient buffer, which the first training step overwrites)."""
    r = np.random.default_rng(0)
    x = model.backend.asarray(r.random((batch_size, model.config.input_dim)))
    eps = model.backend.zeros((batch_size, model.config.latent_dim))
    return lambda: (model.loss_and_grad(x, eps), model.backend.synchronize())
