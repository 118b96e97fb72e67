"""The parts a :class:`fastvae.Trainer` is assembled from (in the style of
Chainer's trainer extensions): where batches come from, what is reported,
how a finished epoch is evaluated, and how the run is saved.

- :class:`EpochPosition`: where training stands inside an epoch (the batch
  order and the running sums), the part a mid-epoch checkpoint records.
- :class:`BatchSource`: shuffled batches gathered on the device, optional
  dynamic binarization and the sampler's ``eps``, all from one seeded stream.
- :class:`Reporter`: the progress bar, the divergence check, the per-epoch
  metric row and the run folder's ``config.json`` / ``metrics.csv``.
- :class:`Evaluator`: -ELBO of the test split after each epoch.
- :class:`Checkpointer`: atomic checkpoints of the whole training state.
- :func:`step_graphs`: the CUDA graphs of ``--cuda-graph``.
"""

from __future__ import annotations

import dataclasses

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from fastvae.io import checkpoint as ckpt
from fastvae.errors import ConfigError, TrainingDivergedError
from fastvae.naming import option
from fastvae.explore.evaluation import EVAL_ROWS, binarized, evaluate, train_loss_name
from fastvae.training.distributed import AllReduceGrads, shard
from fastvae.io.restore import data_rows
from fastvae.training.runfolder import CHECKPOINT_NAME, atomic_write_text, clean_debris


def diverged_fixes(cfg=None) -> str:
    """What a diverged run of ``cfg`` (a ModelConfig, or None) can change: a lower learning rate, gradient
    clipping, a beta warm-up, and first a larger sigma for a Gaussian likelihood (its gradient grows as
    1/sigma^2: 1e4 per pixel at sigma 0.01); options named as :func:`fastvae.naming.option` spells them."""
    sigma = (f"raise {option('sigma')} (here {cfg.sigma:g}: the gradient grows as 1/sigma^2), "
             if cfg is not None and cfg.likelihood == "gaussian" else "")
    return (f"{sigma}lower {option('lr')}, add {option('clip_grad_norm', 100)}, or warm beta up with "
            f"{option('beta_schedule', 'linear')} {option('beta_warmup', 5)}")


def _kept(path: Optional[str], ours: bool) -> str:
    """What a diverged run leaves on disk at ``path`` (its checkpoint, or None);
    ``ours``: the file there is this run's (saved by it, or the one it resumed)."""
    if path is None:
        return "nothing was saved (no run folder)"
    if os.path.exists(path):
        return (f"the last good checkpoint {path} is kept" if ours else
                f"no checkpoint of this run was written yet ({path} still holds the run it was to replace)")
    return f"no checkpoint was written yet ({path} would be the first)"


METRIC_FIELDS = ["epoch", "step", "train_loss", "train_neg_elbo", "train_recon", "train_kl", "beta", "lr",
                 "test_neg_elbo", "test_recon", "test_kl", "images_per_s", "seconds", "warmup_s", "rss_mb"]


@dataclass
class EpochPosition:
    """An unfinished epoch: ``perm (N,)`` device batch order, ``batch`` steps
    done, device sums ``recon``/``kl``/``loss`` (nats, over ``counted``
    images whose loss was computed) and ``seconds`` spent so far, of which
    ``warmup`` (not saved) went to this process's warm-up steps, on
    ``warmup_images`` images (kernel compilation or loading, first
    allocations, CUDA-graph capture; see :class:`WarmUp`), timed apart
    from the throughput."""
    perm: object
    batch: int = 0
    recon: object = 0.0
    kl: object = 0.0
    loss: object = 0.0
    counted: int = 0
    seconds: float = 0.0
    warmup: float = 0.0
    warmup_images: int = 0

    def throughput(self, n: int) -> Optional[float]:
        """Images per second over the epoch's ``n`` images, its warm-up steps
        left out (timed apart in ``warmup``) when any other step ran."""
        timed, images = self.seconds - self.warmup, n - self.warmup_images
        if timed > 0 and images > 0 and self.warmup_images:
            return images / timed
        return n / self.seconds if self.seconds > 0 else None

    def to_state(self, be) -> dict:
        """JSON-able scalars (host floats) for the checkpoint's state."""
        return {"batch": self.batch, "recon": be.to_float(self.recon), "kl": be.to_float(self.kl),
                "loss": be.to_float(self.loss), "counted": self.counted, "seconds": self.seconds}


def epoch_steps(n: int, batch_size: int, min_last: int = 1) -> int:
    """Steps of an epoch over ``n`` images: ``ceil(n / batch_size)``, the last
    partial batch kept, unless it would hold fewer than ``min_last`` images
    (then they sit out this epoch; the shuffle changes who). beta-TCVAE asks
    for 2: its TC term estimates log q(z) from the other images of a batch,
    so a batch of one has none (a constant, no gradient: a plain VAE step)."""
    full, last = divmod(n, batch_size)
    return full + (last >= min_last) if full else min(n, 1)


@dataclasses.dataclass
class Batch:
    """One training step's inputs on the device, as a batch source returns
    them: ``x (B, D)`` this rank's images (binarized when asked), ``eps (B, L)``
    their N(0, 1) noise, ``global_batch`` the global batch's size and ``rows``
    this rank's ``(lo, hi)`` of it. ``x`` and ``eps`` are the source's own
    buffers, reused by its next batch of the same size (so a CUDA graph
    replays on the same arrays); the step reads them in place."""
    x: object
    eps: object
    global_batch: int
    rows: tuple

    @property
    def B(self) -> int:
        return self.x.shape[0]


class BatchSource:
    """Batches of the training images on the backend's device.

    x_train: host ``(N, D)``; batch_size: images per step, the GLOBAL batch
    (the last partial batch is kept, as PyTorch's DataLoader does); rng: the
    backend stream that draws the epoch's permutation, the binarization
    uniforms and ``eps`` (in that order per step, so a resumed run draws what
    a straight one does); rank, world_size: this process's shard of every
    batch (:func:`fastvae.training.distributed.shard`). Every rank draws the global
    batch's random numbers and keeps its rows, so the stream, and the model,
    do not depend on the world size. latent_dim: ``L``, the width of ``eps``;
    likelihood: the model's (the streamed source checks its pixel range).
    :meth:`next_batch` returns a :class:`Batch` in the source's own buffers;
    the source never touches the model.
    """

    def __init__(self, backend, x_train, batch_size: int, rng, binarize: bool, rank: int = 0, world_size: int = 1,
                 latent_dim: int = 1, likelihood: str = "bernoulli"):
        self.backend, self.x_host, self.batch_size = backend, x_train, batch_size
        self.rng, self.binarize = rng, binarize
        self.rank, self.world_size = rank, world_size
        self.latent_dim = latent_dim
        self._x = None

    min_last = 1           #: the smallest last batch kept (:func:`epoch_steps`; the trainer sets 2 for beta-TCVAE)

    @property
    def steps_per_epoch(self) -> int:
        return epoch_steps(self.x_host.shape[0], self.batch_size, self.min_last)

    def new_epoch(self) -> EpochPosition:
        return EpochPosition(perm=self.rng.permutation(self.x_host.shape[0]))

    def check_perm(self, perm) -> bool:
        """Whether a checkpoint's ``epoch_perm`` is a permutation of the training rows."""
        N = self.x_host.shape[0]
        return perm.shape == (N,) and np.array_equal(np.sort(perm), np.arange(N))

    def restore_perm(self, perm):
        """A checkpoint's ``epoch_perm`` on the device, as this source keeps it."""
        return self.backend.asarray(perm, dtype=np.int64)

    def buffers(self, n: int):
        """This source's ``(x (n, D), eps (n, L))`` device buffers for a batch of ``n`` rows."""
        be = self.backend
        return be.scratch(("batch_x",), (n, self.x_host.shape[1])), be.scratch(("batch_eps",), (n, self.latent_dim))

    def next_batch(self, pos: EpochPosition, b: int) -> Optional[Batch]:
        """Batch ``b`` of the epoch (this rank's rows of it), drawn as the
        class docstring says; None for an empty shard (the global batch's
        size is then ``last_global_batch``)."""
        be = self.backend
        if self._x is None:                # read only: on the CPU in the model dtype, the data itself, no copy
            x = self.x_host
            same = isinstance(x, be.array_type) and x.dtype == be.dtype and x.flags.c_contiguous
            self._x = x if same else be.asarray(x)
        idx = pos.perm[b * self.batch_size:(b + 1) * self.batch_size]
        n = idx.shape[0]
        if self.world_size == 1:
            x, eps = self.buffers(n)
            be.gather_rows(x, self._x, idx)
            if self.binarize:
                be.bernoulli_(x, x, self.rng)
            self.rng.normal_(eps)
            return Batch(x, eps, n, (0, n))
        lo, hi = shard(n, self.rank, self.world_size)
        if self.binarize:                 # the global batch's uniforms, then this rank's rows
            xg = be.scratch("global_x", (n, self.x_host.shape[1]))
            be.gather_rows(xg, self._x, idx)
            be.bernoulli_(xg, xg, self.rng)
        epsg = be.scratch("global_eps", (n, self.latent_dim))
        self.rng.normal_(epsg)
        self.last_global_batch = n
        if hi == lo:
            return None
        x, eps = self.buffers(hi - lo)
        if self.binarize:
            x[...] = xg[lo:hi]
        else:
            be.gather_rows(x, self._x, idx[lo:hi])
        eps[...] = epsg[lo:hi]
        return Batch(x, eps, n, (lo, hi))


class Reporter:
    """Progress, divergence checks, metric rows and the run folder's text files.

    out: run folder or None; progress: a tqdm bar; verbose: one printed line
    per epoch when there is no bar.
    """

    def __init__(self, out: Optional[str], progress: bool, verbose: bool = False, units: str = "nats per image",
                 axis_units: str = "nats per image"):
        self.out, self.progress, self.verbose, self.units, self.axis_units = out, progress, verbose, units, axis_units
        self.bar = None

    def open(self, steps: int) -> None:
        if self.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=steps, unit="step", dynamic_ncols=True, disable=None, leave=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @staticmethod
    def check_finite(value: float, what: str, step: int, epoch: int, checkpointer: "Checkpointer") -> None:
        """Raise TrainingDivergedError (with the fixes and what is on disk) unless ``value`` is finite."""
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"the {what} became {value} at step {step} (epoch {epoch + 1}); training stopped and "
                f"{checkpointer.kept()}; {checkpointer.fixes}")

    def progress_to(self, done: int, shown: int, epoch: int, running: float, beta: float) -> int:
        """Advance the bar to ``done`` steps of this epoch; returns the new mark."""
        if self.bar is None:
            return shown
        self.bar.set_postfix(epoch=epoch + 1, neg_elbo=f"{running:.2f}", beta=f"{beta:.3g}", refresh=False)
        self.bar.update(done - shown)
        return done

    trigger = ("epoch", 1)

    def __call__(self, trainer, metrics: dict) -> None:
        """As a built-in trainer extension, after the checkpointer: the epoch's line."""
        self.epoch_line(metrics, trainer.target_epochs)

    def epoch_line(self, row: dict, total: int) -> None:
        if self.bar is None and not self.verbose:
            return
        msg = (f"epoch {row['epoch']}/{total}: train {train_loss_name(row)} "
               f"{row['train_neg_elbo']:.2f}")
        if row["test_neg_elbo"] is not None:
            msg += f", test -ELBO {row['test_neg_elbo']:.2f}"
        ips = row["images_per_s"]
        msg += f" {self.units}, beta {row['beta']:.3g}, " + ("n/a images/s" if ips is None else f"{ips:.0f} images/s")
        if row.get("warmup_s") is not None:
            msg += f" (warm-up {row['warmup_s']:.2f} s timed apart)"   # compilation, first allocations: metrics.csv
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def write_run_files(self, config: dict, history: list) -> None:
        """``config.json`` and ``metrics.csv`` (each replaced atomically,
        :func:`fastvae.training.runfolder.atomic_write`) in the run folder."""
        if self.out is None:
            return
        atomic_write_text(os.path.join(self.out, "config.json"), json.dumps(config, indent=2))
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_FIELDS})
        atomic_write_text(os.path.join(self.out, "metrics.csv"), buf.getvalue())

    def write_pictures(self, model, X, image_shape, seed: int, history: list) -> None:
        """reconstructions.png (of the first images of ``X``), samples.png
        (drawn with ``seed``) and loss.png (``history``) into the run folder."""
        if self.out is None:
            return
        from fastvae.explore import plots
        plots.plot_reconstructions(model, X, image_shape, n=16, path=os.path.join(self.out, "reconstructions.png"))
        plots.plot_samples(model, image_shape, n=64, seed=seed, path=os.path.join(self.out, "samples.png"))
        if history:
            plots.plot_loss(history, path=os.path.join(self.out, "loss.png"), units=self.axis_units)

    @staticmethod
    def rss_mb():
        """Resident memory of this process in MiB (Linux /proc; None elsewhere)."""
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError, IndexError):
            return None


class Evaluator:
    """A built-in trainer extension (:mod:`fastvae.training.extensions`), first at
    every epoch's end: adds ``{"test_neg_elbo", "test_recon", "test_kl"}`` (nats per
    image) of the test split to the epoch's metrics, on its own seeded stream (never
    shifts training); all None when there is no test split. ``binarize``: a run
    trained with dynamic binarization is scored on one fixed binary draw of the split
    (:func:`fastvae.explore.evaluation.binarized`), made at the first call. A
    non-finite score raises TrainingDivergedError before the checkpointer saves."""

    trigger = ("epoch", 1)

    def __init__(self, x_test, seed: int, binarize: bool = False):
        self.x_test, self.seed, self.binarize = x_test, seed, binarize

    def scores(self, model) -> dict:
        if self.x_test is None:
            return {"test_neg_elbo": None, "test_recon": None, "test_kl": None}
        if self.binarize:
            self.x_test, self.binarize = binarized(self.x_test, model.config), False
        ev = evaluate(model, self.x_test, seed=self.seed)
        return {"test_neg_elbo": ev["neg_elbo"], "test_recon": ev["recon"], "test_kl": ev["kl"]}

    def __call__(self, trainer, metrics: dict) -> None:
        metrics.update(self.scores(trainer.model))
        if metrics["test_neg_elbo"] is not None:   # finite weights can still overflow (exp(logvar) past float32's range)
            trainer.reporter.check_finite(metrics["test_neg_elbo"], "test -ELBO", trainer.step, trainer.epoch - 1,
                                          trainer.checkpointer)


def preflight_training(model, tc) -> None:
    """Refuse (ConfigError, both sizes and the fix) a run whose Adam state and
    work buffers would not fit in the device's free memory, before they
    exist: the training batch (for IWAE also its K samples of each image,
    :func:`fastvae.objectives.train_rows`) or the evaluation's batch
    (:meth:`fastvae.VAE.rows_within`), whichever is larger, and beta-TCVAE's
    pairwise terms (``backend.tc_pairwise_bytes``)."""
    from fastvae.training import memory
    from fastvae import objectives
    est = lambda **kw: memory.estimate(model.layers, model.num_params, model.backend.dtype.itemsize,  # noqa: E731
                                       host=False, **kw)
    iwae, pairs = tc.objective == "iwae", tc.objective == "btcvae"      # beta-TCVAE: B x B pairwise terms
    memory.preflight(est(batch=max(objectives.train_rows(tc), model.rows_within(EVAL_ROWS)), train=True) - est()
                     + (model.backend.tc_pairwise_bytes(tc.batch_size, model.config.latent_dim) if pairs else 0),
                     model.backend, f"training this model (Adam state and batch {tc.batch_size} buffers"
                     f"{f', {tc.iwae_k} IWAE samples an image' if iwae else ''}"
                     f"{', beta-TCVAE pairwise terms' if pairs else ''})",
                     memory.smaller_model() + (f" (or a smaller {option('iwae_k')})" if iwae else ""))


class Checkpointer:
    """Saves the whole training state to ``<out>/checkpoint.h5`` atomically
    (see :mod:`fastvae.io.checkpoint`), including a mid-epoch position. As a
    built-in trainer extension, after the evaluator at every epoch's end: the
    checkpoint and the run folder's text files (rank 0 of a run with a folder)."""

    trigger = ("epoch", 1)

    def __call__(self, trainer, metrics: dict) -> None:
        if self.out is not None and trainer.writes:
            trainer.save()
            trainer.reporter.write_run_files(trainer.config_dict(), trainer.history)

    def __init__(self, out: Optional[str], fixes: Optional[str] = None):
        self.out = out
        self.fixes = fixes or diverged_fixes()      # what a diverged run can change, for its error
        self.own: Optional[str] = None     # the checkpoint this run saved, or the one it resumed

    @property
    def ours(self) -> bool:
        """Whether the file at :attr:`path` is this run's (a moved ``out`` is not)."""
        return self.own is not None and self.own == self.path

    @property
    def path(self) -> Optional[str]:
        return None if self.out is None else os.path.join(self.out, CHECKPOINT_NAME)

    def kept(self) -> str:
        """What a run that diverges now leaves in its folder, for the error."""
        return _kept(self.path, self.ours)

    def clean_debris(self) -> None:
        """Remove temporary files of saves that were killed mid-write."""
        clean_debris(self.out)

    saving = False       # True while a save runs: a signal then never interrupts it

    def save(self, trainer, path: str) -> str:
        self.saving = True
        try:
            self._save(trainer, path)
            if path == self.path:
                self.own = path
            return path
        finally:
            self.saving = False

    def _save(self, trainer, path: str) -> None:
        be, pos = trainer.backend, trainer.position
        state = {"epoch": trainer.epoch, "step": trainer.step, "rng": trainer.rng.state(),
                 "data_rows": data_rows(trainer.data)}
        arrays = {}
        if pos is not None and pos.batch > 0:
            state["partial"] = pos.to_state(be)
            perm = pos.perm if isinstance(pos.perm, np.ndarray) else be.to_host(pos.perm)
            arrays["epoch_perm"] = np.asarray(perm).astype(np.int64)
        params = trainer.model.get_flat_params()
        bad = params.size - int(np.count_nonzero(np.isfinite(params)))
        if bad:       # diverged since the last loss check (which runs every 20 steps): never replace a good file
            raise TrainingDivergedError(
                f"{bad} of {params.size} parameters are NaN or infinite at step {trainer.step} (training "
                f"diverged); not saved, so {_kept(path, self.ours or path != self.path)}; {self.fixes}")
        ckpt.save_checkpoint(
            path, params=params, adam_state=trainer.optimizer.state_dict(),
            layout_table=trainer.model.layout.to_table(), config=trainer.config_dict(), state=state,
            history=trainer.history, backend=be.name, dtype=trainer.model_config.dtype, arrays=arrays)


class WarmUp:
    """Which steps of this process are warm-up, timed apart from the
    throughput: the first (kernel compilation or loading, first allocations)
    and, with CUDA graphs (``graphs``, a StepGraphs), the eager and capture
    steps before the first replay (at most one eager and one capture per loss flag)."""

    def __init__(self, graphs=None):
        self.graphs, self.steps = graphs, 0

    def next_step(self) -> bool:
        """Whether the next step is warm-up."""
        if self.graphs is None:
            return self.steps == 0
        return self.graphs.stats["replayed"] == 0 and self.steps < 2 * (self.graphs.warmup + 1)

    def add(self, pos: EpochPosition, seconds: float, images: int) -> None:
        """A warm-up step of ``seconds`` on ``images`` images, inside epoch position ``pos``."""
        self.steps += 1
        pos.warmup += seconds
        pos.warmup_images += images


def step_graphs(settings, model, optimizer):
    """The :class:`~fastvae.backends.cupy.cuda_graph.StepGraphs` replaying the
    training step (forward, backward, Adam) when ``settings.cuda_graph`` (a
    :class:`~fastvae.config.RunSettings`), else None.
    Raises ConfigError for a step a graph does not hold: the all-reduce of a
    multi-process run goes through MPI or NCCL, outside the backend."""
    if not settings.cuda_graph:
        return None
    if any(isinstance(h, AllReduceGrads) for h in optimizer.hooks):
        raise ConfigError(f"{option('cuda_graph')} replays one process's step, not the all-reduce of several; "
                          f"drop {option('cuda_graph')} or run one process")
    from fastvae.backends.cupy.cuda_graph import StepGraphs
    return StepGraphs(model.backend)
