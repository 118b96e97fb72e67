"""Exception types raised by fastvae.

Every error that a user can cause (a bad argument, a missing or corrupt file, a
backend that cannot run here) is raised as a subclass of :class:`FastVAEError`
with a one-line message that names the problem and the fix. The command line
prints that line and exits with status 2, never a traceback.
"""

__all__ = [
    "FastVAEError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "BackendUnavailableError",
    "RunFolderError",
    "TrainingDivergedError",
    "TrainingInterrupted",
]


class FastVAEError(Exception):
    """Base class of every error fastvae raises on purpose."""


class ConfigError(FastVAEError, ValueError):
    """An invalid model, training or data setting (also a ``ValueError``)."""


class DataError(FastVAEError):
    """A dataset that is missing, unreadable, corrupt or inconsistent."""


class CheckpointError(FastVAEError):
    """A checkpoint that is missing, not a fastvae file, of another format
    version, truncated, or incompatible with the model it is loaded into."""


class BackendUnavailableError(FastVAEError, RuntimeError):
    """A compute backend that is unknown or cannot run on this machine
    (missing package, no device); the message names what is missing."""


class RunFolderError(FastVAEError):
    """A run folder that cannot be used: a file in the way, not writable,
    holding another run or foreign files, locked by another trainer, or a
    write that failed (disk full); the previous files are always intact."""


class TrainingDivergedError(FastVAEError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(FastVAEError):
    """Ctrl-C or SIGTERM stopped training after a finished step; a checkpoint
    was saved.

    Attributes: ``path`` (the checkpoint), ``epoch`` (epochs completed),
    ``batch`` (steps done in the current epoch), ``total`` (epochs asked for),
    ``signum`` (the signal, e.g. ``signal.SIGTERM``; None when unknown).
    """

    def __init__(self, path, epoch, batch, steps_per_epoch, total, signum=None):
        self.path, self.epoch, self.batch, self.total = path, epoch, batch, total
        self.signum = signum
        where = f"epoch {epoch + 1}, step {batch}/{steps_per_epoch}" if batch else f"the end of epoch {epoch}"
        super().__init__(f"interrupted at {where}; checkpoint saved to {path}")
