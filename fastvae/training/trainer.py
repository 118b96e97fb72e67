"""Training: the loop, assembled from the parts in :mod:`fastvae.training.parts`.

Per step: the batch source gathers a shuffled batch on the device,
(optionally) binarizes it and draws ``eps``; the model's forward walk and
reversed backward walk fill the flat gradient; the optimizer runs its hooks
(gradient clipping) and one Adam call over the flat buffer (with
``--cuda-graph``: forward, backward and Adam replayed as one CUDA graph).
Metrics stay on the device and reach the host at the progress interval and at the end of
each epoch. After each epoch the test split is evaluated and the checkpoint
saved atomically, so an interrupted run resumes from its last epoch (or,
after Ctrl-C, from the exact step).

Random streams: initialisation uses PCG64(seed) on the host; shuffling,
``eps`` and binarization use the backend stream seeded with ``[seed, 1]``;
evaluation uses its own stream ``[seed, 2]`` so it never shifts training.
On the NumPy backend, N epochs straight and k + (N - k) resumed are
bit-identical.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import numpy as np

from fastvae.io import checkpoint as ckpt
from fastvae import datasets as _datasets
from fastvae.training import distributed
from fastvae import backends as _backends
from fastvae import objectives
from fastvae.training import runfolder
from fastvae.config import DataConfig, ModelConfig, RunSettings, TrainConfig
from fastvae.errors import CheckpointError, ConfigError, TrainingInterrupted
from fastvae.naming import option
from fastvae.backends.cpu.gemm_library import configure as configure_blas
from fastvae.datasets.arrayfiles import image_shape_of
from fastvae.backends.base import ForeignRNGState
from fastvae.checks import check_count, check_images
from fastvae.nn.model import VAE
from fastvae.optim.adam import Adam, ClipGradNorm
from fastvae.io.restore import choose_backend, choose_blas, data_change_note, model_config
from fastvae.optim.schedules import beta_at, lr_at, resume_note
from fastvae.training.extensions import check_extensions, due
from fastvae.training.stopping import StopSignals
from fastvae.datasets.streaming import StreamBatchSource, StreamedImages
from fastvae.backends.cpu.threads import autotune_model, fit_backend, set_threads
from fastvae.explore.evaluation import binarized, units
from fastvae.training.parts import (METRIC_FIELDS, BatchSource, Checkpointer, EpochPosition, Evaluator, Reporter,  # noqa: F401
                       WarmUp, diverged_fixes, preflight_training, step_graphs)


class Trainer:
    """Trains a :class:`VAE` on a :class:`~fastvae.datasets.Dataset`.

    model_config: architecture (input_dim and image_shape must fit the data);
    train_config: optimisation; data_config: recorded in checkpoints so that
    ``fastvae train --resume`` and ``fastvae eval`` find the same data (a ``dataset``
    given without it is recorded as in memory); dataset: the data, a Dataset, images (arrays) or a
    name/path (else loaded from data_config);
    out: run folder (created; checked as ``--out`` is, RunFolderError for another run or other files
    there unless ``force``), or None to keep everything in memory; progress: show a tqdm progress bar;
    extensions: objects called every N epochs or steps (:mod:`fastvae.training.extensions`; ConfigError
    for one without a valid trigger and call).

    Parts: ``batches`` (:class:`~fastvae.training.parts.BatchSource`), ``optimizer`` (with hooks), and
    the built-in extensions ``evaluator``, ``checkpointer`` and ``reporter`` (``builtin_extensions``: test
    scores, checkpoint and run files, the epoch line; the same protocol as the user's ``extensions``,
    which run after them). ``stop_requested = True`` (what Ctrl-C does) stops after the step, saving.
    """

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig,
                 data_config: Optional[DataConfig] = None, dataset=None,
                 out: Optional[str] = None, progress: bool = True, force: bool = False, extensions=None,
                 settings: Optional[RunSettings] = None):
        if not isinstance(model_config, ModelConfig) or not isinstance(train_config, TrainConfig):
            raise ConfigError("Trainer takes a fastvae.ModelConfig and a fastvae.TrainConfig (then a DataConfig "
                              f"or None), got {type(model_config).__name__} and {type(train_config).__name__}")
        if out is not None and not isinstance(out, runfolder.CheckedFolder):   # as --out: checked once
            out = runfolder.check_out(out, force=force)
        self.model_config, self.train_config, tc = model_config, train_config, train_config
        dataset, data_config = _datasets.given(dataset, data_config)      # a path, arrays: as fastvae.train
        self.data_config = data_config or DataConfig(**({} if dataset is None else
                                                         {"dataset": _datasets.in_memory(dataset.name)}))
        self.data = dataset if dataset is not None else _datasets.load(self.data_config)
        self.data.x_train = check_images(self.data.x_train, model_config, "training images", min_rows=1)  # (N, D)
        if self.data.x_test is not None:
            self.data.x_test = check_images(self.data.x_test, model_config, "test images")
        n = self.data.x_train.shape[0]
        if tc.batch_size > n:
            raise ConfigError(f"batch_size {tc.batch_size} is larger than the {n} training "
                              f"images; use a smaller {option('batch_size')}")
        rs = settings if settings is not None else RunSettings()
        if not isinstance(rs, RunSettings):
            raise ConfigError(f"settings must be a fastvae.RunSettings, got {type(rs).__name__}")
        backend, self.backend_choice = _backends.resolve(rs.backend)     # "auto": the fastest that runs here
        rs = self.settings = rs.replace(backend=backend)                  # the run records what it ran on
        self.world = distributed.world(rs.backend)
        streamed = distributed.agree_on_streaming(self.world, isinstance(self.data.x_train, StreamedImages))
        threads = rs.threads if rs.threads is not None else distributed.threads_per_rank(self.world)
        if threads is not None and threads != "auto":
            set_threads(threads)
        self.model = VAE(model_config, rs.backend, seed=tc.seed)
        self.backend = self.model.backend
        self.threads_note = (configure_blas(self.model, rs.blas, tc.batch_size)
                             + ("" if threads != "auto" else autotune_model(self.model, tc.batch_size))
                             + fit_backend(self.backend, self.model))
        preflight_training(self.model, tc)
        if self.backend.name == "cupy":
            self.backend.tf32 = rs.tf32
        hooks = [distributed.AllReduceGrads(self.world)] if self.world.size > 1 else []
        hooks += [] if tc.clip_grad_norm is None else [ClipGradNorm(tc.clip_grad_norm)]
        self.optimizer = Adam.for_model(self.model, lr=tc.lr, betas=tc.betas, eps=tc.adam_eps,
                                        weight_decay=tc.weight_decay, decoupled=tc.decoupled_weight_decay,
                                        hooks=hooks)
        source = StreamBatchSource if streamed else BatchSource
        self.batches = source(self.backend, self.data.x_train, tc.batch_size, self.backend.new_rng([tc.seed, 1]),
                              tc.binarize, self.world.rank, self.world.size, latent_dim=model_config.latent_dim,
                              likelihood=model_config.likelihood)
        self.batches.min_last = 2 if tc.objective == "btcvae" else 1    # a last batch of one has no TC term
        self.objective = objectives.make(tc, self.model, n, self.world)
        self.graphs = step_graphs(rs, self.model, self.optimizer)
        self.warmup = WarmUp(self.graphs)
        self.writes = self.world.rank == 0        # rank 0 alone writes the run folder, prints and evaluates
        self.reporter = Reporter(out if self.writes else None, progress and self.writes,
                                 units=units(model_config.likelihood), axis_units=units(model_config.likelihood, True))
        self.evaluator = Evaluator(self.data.x_test if self.writes else None, tc.seed, tc.binarize)
        self.checkpointer = Checkpointer(out, diverged_fixes(model_config))
        self.epoch, self.step, self.history = 0, 0, []
        self.position: Optional[EpochPosition] = None     # inside an unfinished epoch
        self.stop_requested, self.stop_signal = False, None
        self._signals = StopSignals(self)     # Ctrl-C and SIGTERM while fitting
        self.extensions = check_extensions(extensions)
        #: the built-in extensions, called at every epoch's end in this order before the user's
        self.builtin_extensions = [self.evaluator, self.checkpointer, self.reporter]
        self.target_epochs = tc.epochs

    # ---- parts kept reachable under their old names ----------------------------
    @property
    def rng(self):
        """The training stream (shuffles, binarization, eps)."""
        return self.batches.rng

    @property
    def out(self) -> Optional[str]:
        return self.checkpointer.out

    @out.setter
    def out(self, folder: Optional[str]) -> None:
        self.checkpointer.out = self.reporter.out = folder

    @property
    def verbose(self) -> bool:
        return self.reporter.verbose

    @verbose.setter
    def verbose(self, on: bool) -> None:
        self.reporter.verbose = on and self.writes

    # ---- checkpoints ---------------------------------------------------------
    def start_line(self) -> str:
        """The run's first line: what trains, on what data, where, on which
        backend and why (``backend_choice``); for a resumed run, where it
        resumed: ``resuming RUN at epoch 8, step 9/188 (of 10 epochs) on numba
        (the backend that wrote it)``."""
        on = f"on {self.backend.name} ({self.backend_choice})"
        if self.epoch or self.step or self.position is not None:
            b = self.position.batch if self.position is not None else 0
            return (f"resuming {self.out or 'the run'} at epoch {self.epoch + 1}, step {b}/{self.steps_per_epoch()} "
                    f"(of {self.train_config.epochs} epochs) {on}")
        ranks = f" on {self.world.size} ranks ({self.world.name})" if self.world.size > 1 else ""
        test = f", {self.data.x_test.shape[0]} test" if self.data.x_test is not None else ""
        return (f"training{ranks} {self.model!r} on {self.data.name}: {self.data.x_train.shape[0]} train images{test}"
                f" -> {self.out or 'memory'}; {on}{self.threads_note}")

    @property
    def checkpoint_path(self) -> Optional[str]:
        return self.checkpointer.path

    def config_dict(self) -> dict:
        """The checkpoint's and ``config.json``'s config: the experiment (model,
        train, data) and, apart, the run settings it ran with (``run``)."""
        return {"model": self.model_config.to_dict(), "train": self.train_config.to_dict(),
                "data": self.data_config.to_dict(), "run": self.settings.to_dict()}

    def save(self, path: Optional[str] = None) -> str:
        """Write the checkpoint (atomically) to ``path`` or the run folder."""
        path = path or self.checkpoint_path
        if path is None:
            raise ConfigError("no checkpoint path: give save() a path or the Trainer an out folder")
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"save() takes a checkpoint path (a str or path), not {path!r:.60}")
        return self.checkpointer.save(self, path) if self.writes else path   # data-parallel: rank 0 writes

    @classmethod
    def from_checkpoint(cls, path, out: Optional[str] = None, epochs: Optional[int] = None,
                        backend: Optional[str] = None, data_dir: Optional[str] = None,
                        dataset=None, progress: bool = True, threads=None, blas=None,
                        force: bool = False, tf32: bool = False, cuda_graph: bool = False) -> "Trainer":
        """Rebuild a trainer exactly as it was saved, ready to continue.

        epochs: new total epoch count; backend: continue on another backend
        (default: the one that wrote it, or numpy when it cannot run here, as
        :func:`fastvae.io.restore.choose_backend` decides; the RNG state carries
        over between the CPU backends); data_dir: where the data lives now;
        threads: a thread count or ``"auto"`` for the continued run; blas: its
        GEMM library (:func:`fastvae.io.restore.choose_blas` decides when None);
        tf32, cuda_graph: as :class:`~fastvae.config.RunSettings`, off unless
        asked (of the settings the file records, only the backend and the GEMM
        library serve, as the defaults that continue the run bit for bit).
        out (default: the checkpoint's folder) is checked as ``--out`` is: another
        run or other files there raise RunFolderError unless ``force``. ``path``:
        the checkpoint or its run folder (as :func:`fastvae.load` takes it).
        Raises CheckpointError for a bad file, ConfigError for a ``data_dir``
        beside data that never reads it.
        """
        path = runfolder.checkpoint_path(path)
        if not isinstance(out, runfolder.CheckedFolder):
            out = runfolder.check_out(out if out is not None else os.path.dirname(os.path.abspath(path)),
                                      resume=path, force=force)
        data = ckpt.read_checkpoint(path)
        mc = model_config(data, path)                    # checked against the file's parameters
        _, tc, dc = data["configs"]                      # as read_checkpoint validated them: a file load
        #                                                  accepts, resume accepts (a missing part is its default)
        written = data["run_settings"]
        wrote = data["meta"].get("backend") or written.backend
        chosen = choose_backend(backend, wrote)
        settings = RunSettings(backend=chosen, threads=threads, blas=choose_blas(blas, written.blas, chosen),
                               tf32=tf32, cuda_graph=cuda_graph)
        old_epochs = tc.epochs
        if epochs is not None:
            tc = tc.replace(epochs=epochs)
        if data_dir is not None:                          # only files of a built-in dataset are found there
            from fastvae.config import check_data_dir
            check_data_dir(dc.dataset if dataset is None else dataset, data_dir)
            dc = dc.replace(data_dir=data_dir)
        self = cls(mc, tc, dc, dataset=dataset, out=out, progress=progress, settings=settings)
        self.backend_choice = ("asked for" if backend else "the backend that wrote it" if chosen == wrote
                               else f"{wrote}, which wrote it, cannot run here")
        own = self.checkpoint_path                       # resumed in its own folder: the file is this run's
        self.checkpointer.own = own if os.path.exists(own) and os.path.samefile(own, path) else None
        ckpt.load_params(self.model, data, path)
        if data["adam"] is not None:
            self.optimizer.load_state_dict(data["adam"])
        st = data["state"]
        self.epoch, self.step = int(st["epoch"]), int(st["step"])
        self.history = list(data["history"])
        for note in (resume_note(tc, self.step, self.steps_per_epoch(), old_epochs, tc.epochs),
                     data_change_note(st, self.data)):
            if note and self.writes:
                print(f"fastvae: note: {note}", file=sys.stderr)
        if "partial" in st:
            perm = data["arrays"].get("epoch_perm")
            if perm is None or not self.batches.check_perm(perm):
                raise CheckpointError(f"{path} stopped inside an epoch but its batch order does not fit the "
                                      f"{self.data.x_train.shape[0]} training images; resume with the same data")
            try:
                self.position = EpochPosition(perm=self.batches.restore_perm(perm), **st["partial"])
            except TypeError:
                raise CheckpointError(f"{path} holds an invalid mid-epoch state; use an intact checkpoint") from None
            if self.world.rank != 0:        # the saved sums are global: count them once
                p = self.position
                p.recon, p.kl, p.loss, p.counted = 0.0, 0.0, 0.0, 0
        try:
            self.rng.set_state(st.get("rng"))
        except ForeignRNGState:          # another backend's (or none): continue deterministically from the step
            self.batches.rng = self.backend.new_rng([tc.seed, 1, self.step])
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}; use an intact checkpoint") from None   # its random-number state
        return self

    def write_pictures(self) -> None:
        """reconstructions.png, samples.png and loss.png into the run folder."""
        shape = self.model_config.image_shape or image_shape_of(self.data.x_train.shape, self.data.name)
        X = self.data.x_test if self.data.x_test is not None else self.data.x_train
        if self.train_config.binarize:      # the images as they are scored: their binary draw (its first rows)
            X = binarized(X[:16], self.model_config)
        self.reporter.write_pictures(self.model, X, shape, self.train_config.seed, self.history)

    # ---- the loop --------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch

    def train_step(self, ws, beta: float, lr: float, need_loss: bool):
        """One optimisation step on the :class:`~fastvae.training.parts.Batch` ``ws``
        (this rank's shard; None when it is empty): forward and backward walks, optimizer hooks (the
        all-reduce first when data-parallel), Adam. Returns device
        ``(recon_sum, kl_sum)`` of the shard, or ``(None, None)`` when
        ``need_loss`` is False."""
        if ws is None:
            self.objective.idle_step(self.rng, self.batches.last_global_batch)   # the other ranks' draws
            self.model.grads[...] = 0                 # an empty shard adds nothing to the sum
            recon = kl = 0.0 if need_loss else None
            self.optimizer.step(lr)
        elif self.graphs is not None:               # one CUDA graph per batch size and loss flag
            recon, kl = self.graphs((ws.B, need_loss, id(ws.x)), self._step, ws, beta, lr, need_loss)
        else:
            recon, kl = self._step(ws, beta, lr, need_loss)
        self.step += 1
        return recon, kl

    def _step(self, ws, beta, lr, need_loss):
        out = self.objective.train_step(ws, self.rng, beta, 1.0 / ws.global_batch, need_loss)
        self.optimizer.step(lr)
        return out

    def _sums(self, pos, *names):
        """Host sums over ranks of ``pos``'s device sums ``names`` and ``counted``."""
        be = self.backend
        return self.world.sum([be.to_float(getattr(pos, n)) for n in names] + [pos.counted])

    def _stop_agreed(self) -> bool:
        """``stop_requested`` on every rank once any rank has it (a signal may
        reach the ranks at different steps; they all stop at the same one)."""
        if self.world.size > 1:
            self.stop_requested = self.world.any(self.stop_requested)
        return self.stop_requested

    def _run_epoch(self, total: int, spe: int):
        """Steps from the current position to the end of the epoch; returns the last (beta, lr)."""
        tc, pos, rep = self.train_config, self.position, self.reporter
        N = self.data.x_train.shape[0]
        t0 = time.perf_counter()
        shown = pos.batch
        beta = lr = None
        for b in range(pos.batch, spe):
            ts = time.perf_counter()
            beta = beta_at(tc, self.step / spe, total)
            self.objective.set_time(self.step / spe)
            lr = lr_at(tc, self.step, spe, total)
            need = b % tc.loss_every == 0 or b == spe - 1
            warming = self.warmup.next_step()
            with self._signals.hold():     # a second Ctrl-C waits for the step's end (the batch's prefetch too)
                ws = self.batches.next_batch(pos, b)
                recon, kl = self.train_step(ws, beta, lr, need)
            if warming:                           # compilation, first allocations, graph capture: timed apart
                self.backend.synchronize()
                self.warmup.add(pos, time.perf_counter() - ts, min(tc.batch_size, N - b * tc.batch_size))
            pos.batch = b + 1
            if self.writes:
                for ext in due(self.extensions, "step", self.step):
                    ext(self, {"epoch": self.epoch, "step": self.step, "beta": beta, "lr": lr})
            if need and ws is not None:
                pos.recon = pos.recon + recon
                pos.kl = pos.kl + kl
                pos.loss = pos.loss + self.objective.weighted_loss(recon, kl, beta)
                pos.counted += ws.B
            if b % 20 == 19 or b == spe - 1:
                recon_s, kl_s, counted = self._sums(pos, "recon", "kl")
                running = (recon_s + kl_s) / max(counted, 1)
                rep.check_finite(running, "loss", self.step, self.epoch, self.checkpointer)
                shown = rep.progress_to(b + 1, shown, self.epoch, running, beta)
            if self._stop_agreed() and b < spe - 1:
                pos.seconds += time.perf_counter() - t0
                raise TrainingInterrupted(self._save_position(), self.epoch, pos.batch, spe, total, self.stop_signal)
        self.backend.synchronize()
        pos.seconds += time.perf_counter() - t0
        return beta, lr

    def _save_position(self) -> str:
        """Save mid-epoch with the sums of every rank in the position (rank 0 writes)."""
        pos = self.position
        if self.world.size == 1:
            return self.save()
        local = (pos.recon, pos.kl, pos.loss, pos.counted)
        recon, kl, loss, counted = self._sums(pos, "recon", "kl", "loss")
        pos.recon, pos.kl, pos.loss, pos.counted = recon, kl, loss, int(counted)
        try:
            return self.save()
        finally:
            pos.recon, pos.kl, pos.loss, pos.counted = local

    def _finish_epoch(self, beta: float, lr: float) -> dict:
        pos = self.position
        N = self.data.x_train.shape[0]
        recon_s, kl_s, loss_s, counted = self._sums(pos, "recon", "kl", "loss")
        recon_m, kl_m = recon_s / counted, kl_s / counted
        self.reporter.check_finite(recon_m + kl_m, "loss", self.step, self.epoch, self.checkpointer)
        self.epoch += 1
        bound = self.train_config.objective == "iwae"         # -L_K: no recon and KL terms (its KL was 0)
        row = {"epoch": self.epoch, "step": self.step, "train_loss": loss_s / counted, "train_neg_elbo": recon_m + kl_m,
               "train_recon": None if bound else recon_m, "train_kl": None if bound else kl_m, "beta": beta, "lr": lr,
               "images_per_s": pos.throughput(N), "seconds": pos.seconds,
               "warmup_s": pos.warmup if pos.warmup_images else None, "rss_mb": Reporter.rss_mb()}
        self.position = None
        self.history.append(row)
        return row

    def fit(self, epochs: Optional[int] = None, pictures: bool = True) -> list:
        """Train until ``epochs`` (total, default ``train_config.epochs``) and
        return the metric history (one dict per epoch, nats per image).

        Raises TrainingDivergedError when the loss becomes non-finite
        (checked at every progress interval and epoch end; nothing is saved then, and no save writes
        non-finite parameters), TrainingInterrupted after Ctrl-C or SIGTERM once the current step is
        finished and a checkpoint written (run folders only), and RunFolderError when another process
        trains in the same run folder (an ``fcntl`` lock, :mod:`fastvae.training.runfolder`, held while fitting)."""
        # overflow in a diverging step is reported by the loss check with its fixes, not as NumPy warnings
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
                runfolder.locked(self.out if self.writes else None):
            return self._fit(epochs, pictures)

    def _fit(self, epochs, pictures):
        total = self.train_config.epochs if epochs is None else check_count("epochs", epochs, minimum=0)
        if total < self.epoch:          # it rewrote the run's files and pictures, trained nothing, and said nothing
            raise ConfigError(f"the trainer is at epoch {self.epoch}; fit(epochs=N) trains up to N epochs in "
                              f"total: pass N > {self.epoch} to train on")
        if self.out is not None and self.writes:
            self.checkpointer.clean_debris()
            self.reporter.write_run_files(self.config_dict(), self.history)
        spe, self.target_epochs = self.steps_per_epoch(), total
        self.reporter.open((total - self.epoch) * spe - (self.position.batch if self.position else 0))
        self._signals = StopSignals(self).install()
        try:
            while self.epoch < total:
                if self.position is None:
                    self.position = self.batches.new_epoch()
                row = self._finish_epoch(*self._run_epoch(total, spe))
                for ext in self.builtin_extensions + (due(self.extensions, "epoch", self.epoch) if self.writes else []):
                    ext(self, row)
                if self._stop_agreed() and self.epoch < total:
                    raise TrainingInterrupted(self.checkpoint_path, self.epoch, 0, spe, total, self.stop_signal)
        finally:
            self.reporter.close()
            self._signals.restore()
            for ext in self.extensions if self.writes else ():
                if callable(getattr(ext, "finalize", None)):
                    ext.finalize(self)
        if self.out is not None and self.writes and not self.checkpointer.ours:
            self.save()                 # nothing trained (epochs=0): the folder still holds this run to load
        if pictures and self.writes:
            self.write_pictures()
        return self.history

