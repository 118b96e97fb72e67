"""Trainer extensions: the public way to hook into training (after Chainer's
trainer extensions).

An extension is any object with a ``trigger`` and a call::

    class PrintLoss:
        trigger = ("epoch", 1)           # or ("step", N): every N optimizer steps
        def __call__(self, trainer, metrics):
            print(metrics["epoch"], metrics["train_neg_elbo"])

passed as ``fastvae.train(..., extensions=[PrintLoss()])`` or
``Trainer(..., extensions=[...])``. ``("epoch", N)`` calls it after every Nth
epoch with that epoch's metrics row (the dict appended to
``trainer.history``: ``epoch``, ``step``, ``train_neg_elbo``, ``test_neg_elbo``,
... in nats per image, ``seconds``, ``images_per_s``); ``("step", N)`` after
every Nth optimizer step with ``{"epoch", "step", "beta", "lr"}`` (no loss:
reading it would synchronise the device every step). An optional
``finalize(trainer)`` runs when ``fit`` returns or raises. Extensions run in
the process that writes the run folder (rank 0 under MPI), after the
epoch's checkpoint is saved, so an extension that raises stops training with
the checkpoint of the epoch before it intact.

:class:`TensorBoardWriter` logs every epoch's numeric metrics to TensorBoard
through ``tensorboardX`` (``pip install "fastvae[tensorboard]"``; it needs
no PyTorch).
"""

from __future__ import annotations

import numbers
from typing import Optional

from fastvae.errors import ConfigError

TRIGGER_UNITS = ("epoch", "step")


def check_extensions(extensions) -> list:
    """The extensions as a list, each with a valid ``trigger`` and a call;
    ConfigError naming the first that is not."""
    if extensions is None:
        return []
    try:
        extensions = list(extensions)
    except TypeError:
        raise ConfigError(f"extensions must be a list of extensions, got {type(extensions).__name__}; see "
                          "fastvae.training.extensions") from None
    for i, ext in enumerate(extensions):
        trigger = getattr(ext, "trigger", None)
        ok = (isinstance(trigger, tuple) and len(trigger) == 2 and trigger[0] in TRIGGER_UNITS
              and isinstance(trigger[1], int) and not isinstance(trigger[1], bool) and trigger[1] >= 1)
        if not callable(ext) or not ok:
            raise ConfigError(f"extension {i} ({type(ext).__name__}) needs a trigger ('epoch' or 'step', N >= 1) "
                              f"and a __call__(trainer, metrics), got trigger {trigger!r}; see "
                              "fastvae.training.extensions")
    return extensions


def due(extensions, unit: str, count: int) -> list:
    """Those of ``extensions`` whose trigger fires at ``count`` ``unit``s."""
    return [e for e in extensions if e.trigger[0] == unit and count % e.trigger[1] == 0]


class TensorBoardWriter:
    """Every epoch's numeric metrics to TensorBoard event files in ``logdir``,
    each under ``prefix/NAME`` at the run's global step (optimizer steps).
    Raises ConfigError when tensorboardX is not installed."""

    trigger = ("epoch", 1)

    def __init__(self, logdir: str, prefix: str = "fastvae"):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("TensorBoardWriter needs tensorboardX: pip install \"fastvae[tensorboard]\" "
                              "(or pip install tensorboardX)") from None
        self.logdir, self.prefix = logdir, prefix
        self._writer: Optional[object] = SummaryWriter(logdir)

    def __call__(self, trainer, metrics: dict) -> None:
        for name, value in metrics.items():
            if name not in ("epoch", "step") and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(f"{self.prefix}/{name}", float(value), global_step=metrics["step"])
        self._writer.flush()

    def finalize(self, trainer) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
