"""Ctrl-C and SIGTERM while a trainer fits: finish the step, save, stop.

The first signal sets the trainer's ``stop_requested`` (and ``stop_signal``):
the loop finishes its step, saves a checkpoint that records the position
inside the epoch and raises TrainingInterrupted. A second signal stops at
once with KeyboardInterrupt, except during a save (which always completes)
and inside a training step, where it waits for the step's end (milliseconds):
raised inside the NumPy backend's wait for its Adam worker, it left the
worker writing the buffers and, caught inside the lock wait, surfaced as
"RuntimeError: cannot release un-acquired lock" with a traceback.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class StopSignals:
    """The SIGINT/SIGTERM handlers of ``trainer`` while it fits (see the
    module docstring): installed by :meth:`install` in the main thread of a
    run with a folder (nothing to save to otherwise: the default handlers
    stay), removed by :meth:`restore`. ``trainer`` needs ``out``,
    ``checkpointer.saving``, ``stop_requested`` and ``stop_signal``."""

    def __init__(self, trainer):
        self.trainer, self.previous, self.held, self.pending = trainer, None, 0, False

    def install(self) -> "StopSignals":
        t = self.trainer
        if t.out is None or threading.current_thread() is not threading.main_thread():
            return self
        t.stop_requested, t.stop_signal = False, None

        def handler(signum, frame):
            if t.stop_requested and not t.checkpointer.saving:
                if self.held:                  # inside a step: at its end
                    self.pending = True
                    return
                raise KeyboardInterrupt        # a second signal: stop at once
            t.stop_requested = True
            t.stop_signal = t.stop_signal or signum
        self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def restore(self) -> None:
        for s, h in (self.previous or {}).items():
            signal.signal(s, h)
        self.previous = None

    @contextlib.contextmanager
    def hold(self):
        """A section (a training step) that a second signal does not cut:
        its KeyboardInterrupt comes when the section ends."""
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
        if self.pending and not self.held:
            self.pending = False
            raise KeyboardInterrupt
