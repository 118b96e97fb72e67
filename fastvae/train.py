"""Training: the loop, run folders, checkpoints and resume.

Per step: gather a shuffled batch on the device, (optionally) binarize it,
draw ``eps``, forward + hand-derived backward, one Adam call over the flat
buffer. Metrics stay on the device and reach the host at the progress-bar
interval and at the end of each epoch. After each epoch the checkpoint is
saved atomically, so an interrupted run resumes from its last epoch.

Random streams: initialisation uses PCG64(seed) on the host; shuffling,
``eps`` and binarization use the backend stream seeded with ``[seed, 1]``;
evaluation uses its own stream ``[seed, 2]`` so it never shifts training.
On the NumPy backend, N epochs straight and k + (N - k) resumed are
bit-identical.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Optional

import numpy as np

from . import checkpoint as ckpt
from . import datasets as _datasets
from .config import DataConfig, ModelConfig, TrainConfig
from .errors import (CheckpointError, ConfigError, DataError, TrainingDivergedError,  # noqa: F401
                     TrainingInterrupted)
from .evaluate import evaluate
from .model import VAE
from .optim import Adam
from .schedules import beta_at, lr_at

METRIC_FIELDS = ["epoch", "step", "train_loss", "train_neg_elbo", "train_recon", "train_kl", "beta", "lr",
                 "test_neg_elbo", "test_recon", "test_kl", "images_per_s", "seconds", "rss_mb"]


def check_data_for_model(x: np.ndarray, cfg: ModelConfig, what: str = "dataset") -> None:
    """Raise DataError when images ``x (N, D)`` do not fit ``cfg``."""
    if x.ndim != 2 or x.shape[1] != cfg.input_dim:
        raise DataError(f"{what} images have {x.shape[1] if x.ndim == 2 else x.shape} features but the model "
                        f"expects {cfg.input_dim}; use data of the size the model was built for")
    if cfg.likelihood == "bernoulli" and x.size and (x.min() < 0 or x.max() > 1):
        raise DataError(f"{what} values lie in [{x.min():g}, {x.max():g}] but the bernoulli likelihood "
                        "needs [0, 1]; rescale the data or use --likelihood gaussian")


class Trainer:
    """Trains a :class:`VAE` on a :class:`~fastvae.datasets.Dataset`.

    model_config: architecture (input_dim and image_shape must fit the data);
    train_config: optimisation; data_config: recorded in checkpoints so that
    ``fastvae train --resume`` and ``fastvae eval`` find the same data;
    dataset: the loaded data (loaded from data_config when None);
    out: run folder (created), or None to keep everything in memory;
    progress: show a tqdm progress bar.
    """

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig,
                 data_config: Optional[DataConfig] = None, dataset=None,
                 out: Optional[str] = None, progress: bool = True):
        self.model_config = model_config
        self.train_config = train_config
        self.data_config = data_config or DataConfig()
        self.data = dataset if dataset is not None else _datasets.load(self.data_config)
        check_data_for_model(self.data.x_train, model_config, "training")
        if self.data.x_test is not None:
            check_data_for_model(self.data.x_test, model_config, "test")
        n = self.data.x_train.shape[0]
        if n == 0:
            raise DataError("the training split is empty; add images")
        if train_config.batch_size > n:
            raise ConfigError(f"batch_size {train_config.batch_size} is larger than the {n} training "
                              "images; use a smaller --batch-size")
        if train_config.threads is not None:
            from .threads import set_threads
            set_threads(train_config.threads)
        self.model = VAE(model_config, train_config.backend, seed=train_config.seed)
        self.backend = self.model.backend
        if train_config.tf32:
            from .backends.cupy_backend import enable_tf32
            enable_tf32(True)
        tc = train_config
        self.optimizer = Adam.for_model(self.model, lr=tc.lr, betas=tc.betas, eps=tc.adam_eps,
                                        weight_decay=tc.weight_decay, decoupled=tc.decoupled_weight_decay)
        self.rng = self.backend.new_rng([tc.seed, 1])
        self.epoch = 0
        self.step = 0
        self.history = []
        self.out = out
        self.progress = progress
        self.verbose = False          # print one line per epoch when there is no progress bar
        self._x_train_dev = None
        self._partial = None          # position inside an unfinished epoch

    # ---- checkpoints ---------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[str]:
        return None if self.out is None else os.path.join(self.out, "checkpoint.h5")

    def config_dict(self) -> dict:
        return {"model": self.model_config.to_dict(), "train": self.train_config.to_dict(),
                "data": self.data_config.to_dict()}

    def save(self, path: Optional[str] = None) -> str:
        """Write the checkpoint (atomically) to ``path`` or the run folder."""
        path = path or self.checkpoint_path
        if path is None:
            raise ConfigError("no checkpoint path: give save() a path or the Trainer an out folder")
        ckpt.save_checkpoint(
            path, params=self.model.get_flat_params(), adam_state=self.optimizer.state_dict(),
            layout_table=self.model.layout.to_table(), config=self.config_dict(),
            state=self._state_dict(), history=self.history, backend=self.backend.name,
            dtype=self.model_config.dtype, arrays=self._partial_arrays())
        return path

    def _state_dict(self) -> dict:
        st = {"epoch": self.epoch, "step": self.step, "rng": self.rng.state()}
        if self._partial is not None and self._partial["batch"] > 0:
            p, be = self._partial, self.backend
            st["partial"] = {"batch": p["batch"], "recon": be.to_float(p["recon"]), "kl": be.to_float(p["kl"]),
                             "loss": be.to_float(p["loss"]), "counted": p["counted"], "seconds": p["seconds"]}
        return st

    def _partial_arrays(self) -> dict:
        if self._partial is not None and self._partial["batch"] > 0:
            return {"epoch_perm": self.backend.to_host(self._partial["perm"]).astype(np.int64)}
        return {}

    @classmethod
    def from_checkpoint(cls, path, out: Optional[str] = None, epochs: Optional[int] = None,
                        backend: Optional[str] = None, data_dir: Optional[str] = None,
                        dataset=None, progress: bool = True) -> "Trainer":
        """Rebuild a trainer exactly as it was saved, ready to continue.

        epochs: new total epoch count; backend: continue on another backend
        (RNG state carries over between the CPU backends); data_dir: where the
        data lives now. Raises CheckpointError for a bad file.
        """
        data = ckpt.read_checkpoint(path)
        cfg = data["config"]
        mc = ModelConfig.from_dict(cfg["model"])
        tc = TrainConfig.from_dict(cfg["train"])
        dc = DataConfig.from_dict(cfg["data"])
        changes = {}
        if epochs is not None:
            changes["epochs"] = epochs
        if backend is not None:
            changes["backend"] = backend
        if changes:
            tc = tc.replace(**changes)
        if data_dir is not None:
            dc = dc.replace(data_dir=data_dir)
        self = cls(mc, tc, dc, dataset=dataset,
                   out=out if out is not None else os.path.dirname(os.path.abspath(path)),
                   progress=progress)
        self.model.layout.check_table(data["layout"])
        self.model.set_flat_params(data["params"])
        if data["adam"] is not None:
            self.optimizer.load_state_dict(data["adam"])
        st = data["state"]
        self.epoch, self.step = int(st["epoch"]), int(st["step"])
        self.history = list(data["history"])
        if "partial" in st:
            perm = data["arrays"].get("epoch_perm")
            if perm is None or perm.shape != (self.data.x_train.shape[0],):
                raise CheckpointError(f"{path} stopped inside an epoch but its batch order does not match "
                                      f"the {self.data.x_train.shape[0]} training images; resume with the same data")
            self._partial = dict(st["partial"], perm=self.backend.asarray(perm, dtype=np.int64))
        try:
            self.rng.set_state(st["rng"])
        except (KeyError, TypeError, ValueError):
            # another backend's RNG: continue deterministically from the step count
            self.rng = self.backend.new_rng([tc.seed, 1, self.step])
        return self

    # ---- run folder ----------------------------------------------------------
    def _write_run_files(self):
        if self.out is None:
            return
        with open(os.path.join(self.out, "config.json"), "w") as f:
            json.dump(self.config_dict(), f, indent=2)
        tmp = os.path.join(self.out, ".metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            w.writeheader()
            for row in self.history:
                w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_FIELDS})
        os.replace(tmp, os.path.join(self.out, "metrics.csv"))

    def write_pictures(self) -> None:
        """reconstructions.png, samples.png and loss.png into the run folder."""
        if self.out is None:
            return
        from . import plots
        shape = self.model_config.image_shape or _datasets._image_shape_of(self.data.x_train)
        X = self.data.x_test if self.data.x_test is not None else self.data.x_train
        plots.plot_reconstructions(self.model, X, shape, n=16, path=os.path.join(self.out, "reconstructions.png"))
        plots.plot_samples(self.model, shape, n=64, seed=self.train_config.seed,
                           path=os.path.join(self.out, "samples.png"))
        if self.history:
            plots.plot_loss(self.history, path=os.path.join(self.out, "loss.png"))

    # ---- the loop --------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return math.ceil(self.data.x_train.shape[0] / self.train_config.batch_size)

    def _rss_mb(self):
        """Resident memory of this process in MiB (Linux /proc; None elsewhere)."""
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError, IndexError):
            return None

    def _install_sigint(self):
        """Ctrl-C sets a flag; the loop finishes the current step, saves, stops."""
        import signal
        import threading
        if self.out is None or threading.current_thread() is not threading.main_thread():
            return None
        self._stop_requested = False

        def handler(signum, frame):
            if self._stop_requested:          # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            self._stop_requested = True
        return signal.signal(signal.SIGINT, handler)

    def _check_finite(self, value, what):
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"the {what} became {value} at step {self.step} (epoch {self.epoch + 1}); training stopped and "
                f"the last good checkpoint{' in ' + self.out if self.out else ''} is kept; lower --lr, "
                "add --clip-grad-norm 100, or warm beta up with --beta-schedule linear --beta-warmup 5")

    def fit(self, epochs: Optional[int] = None, pictures: bool = True) -> list:
        """Train until ``epochs`` (total, default ``train_config.epochs``) and
        return the metric history (one dict per epoch, nats per image).

        Raises TrainingDivergedError when the loss or gradient norm becomes
        non-finite (checked at every progress interval and epoch end; nothing
        is saved then), and TrainingInterrupted after Ctrl-C once the current
        step is finished and a checkpoint written (run folders only).
        """
        import signal
        tc = self.train_config
        total = tc.epochs if epochs is None else int(epochs)
        if self.out is not None:
            os.makedirs(self.out, exist_ok=True)
            for f in os.listdir(self.out):          # debris of saves killed mid-write
                if f.startswith(".tmp-") and f.endswith(".h5"):
                    try:
                        os.unlink(os.path.join(self.out, f))
                    except OSError:
                        pass
            self._write_run_files()
        be, model, opt = self.backend, self.model, self.optimizer
        if self._x_train_dev is None:
            self._x_train_dev = be.asarray(self.data.x_train)
        X = self._x_train_dev
        N, B = X.shape[0], tc.batch_size
        spe = self.steps_per_epoch()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            done_before = self._partial["batch"] if self._partial else 0
            bar = tqdm(total=(total - self.epoch) * spe - done_before, unit="step", dynamic_ncols=True,
                       disable=None, leave=True)
        previous_handler = self._install_sigint()
        xp = be.xp
        try:
            while self.epoch < total:
                if self._partial is None:
                    self._partial = {"perm": self.rng.permutation(N), "batch": 0, "recon": 0.0, "kl": 0.0,
                                     "loss": 0.0, "counted": 0, "seconds": 0.0}
                part = self._partial
                perm = part["perm"]
                t0 = time.perf_counter()
                shown = part["batch"]
                beta = lr = None
                for b in range(part["batch"], spe):
                    idx = perm[b * B:(b + 1) * B]
                    ws = model.workspace(idx.shape[0])
                    be.gather_rows(ws.x, X, idx)
                    if tc.binarize:
                        be.bernoulli_(ws.x, ws.x, self.rng)
                    self.rng.normal_(ws.eps)
                    beta = beta_at(tc, self.step / spe, total)
                    lr = lr_at(tc, self.step, spe, total)
                    need = b % tc.loss_every == 0 or b == spe - 1
                    recon, kl = model.loss_and_grad(ws.x, ws.eps, beta, need_loss=need)
                    if tc.clip_grad_norm is not None:
                        norm = xp.sqrt(be.sumsq(model.grads))
                        be.scale_(model.grads, xp.minimum(1.0, tc.clip_grad_norm / (norm + 1e-6)))
                    opt.step(lr)
                    self.step += 1
                    part["batch"] = b + 1
                    if need:
                        part["recon"] = part["recon"] + recon
                        part["kl"] = part["kl"] + kl
                        part["loss"] = part["loss"] + (recon + beta * kl)
                        part["counted"] += idx.shape[0]
                    if b % 20 == 19 or b == spe - 1:
                        running = be.to_float(part["recon"] + part["kl"]) / max(part["counted"], 1)
                        self._check_finite(running, "loss")
                        if bar is not None:
                            bar.set_postfix(epoch=self.epoch + 1, neg_elbo=f"{running:.2f}", beta=f"{beta:.3g}",
                                            refresh=False)
                            bar.update(b + 1 - shown)
                            shown = b + 1
                    if getattr(self, "_stop_requested", False) and b < spe - 1:
                        part["seconds"] += time.perf_counter() - t0
                        path = self.save()
                        raise TrainingInterrupted(path, self.epoch, part["batch"], spe, total)
                be.synchronize()
                seconds = part["seconds"] + time.perf_counter() - t0
                counted = part["counted"]
                recon_m, kl_m = be.to_float(part["recon"]) / counted, be.to_float(part["kl"]) / counted
                self._check_finite(recon_m + kl_m, "loss")
                self.epoch += 1
                row = {"epoch": self.epoch, "step": self.step,
                       "train_loss": be.to_float(part["loss"]) / counted, "train_neg_elbo": recon_m + kl_m,
                       "train_recon": recon_m, "train_kl": kl_m, "beta": beta, "lr": lr,
                       "test_neg_elbo": None, "test_recon": None, "test_kl": None,
                       "images_per_s": N / seconds if seconds > 0 else None, "seconds": seconds,
                       "rss_mb": self._rss_mb()}
                self._partial = None
                if self.data.x_test is not None:
                    ev = evaluate(model, self.data.x_test, seed=tc.seed)
                    row.update(test_neg_elbo=ev["neg_elbo"], test_recon=ev["recon"], test_kl=ev["kl"])
                self.history.append(row)
                if self.out is not None:
                    self.save()
                    self._write_run_files()
                if bar is not None or self.verbose:
                    msg = f"epoch {self.epoch}/{total}: train -ELBO {row['train_neg_elbo']:.2f}"
                    if row["test_neg_elbo"] is not None:
                        msg += f", test -ELBO {row['test_neg_elbo']:.2f}"
                    msg += f" nats/image, beta {beta:.3g}, {row['images_per_s']:.0f} images/s"
                    if bar is not None:
                        bar.write(msg)
                    else:
                        print(msg, flush=True)
                if getattr(self, "_stop_requested", False) and self.epoch < total:
                    raise TrainingInterrupted(self.checkpoint_path, self.epoch, 0, spe, total)
        finally:
            if bar is not None:
                bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        if pictures:
            self.write_pictures()
        return self.history


def train(dataset="sprites", out: Optional[str] = None, progress: bool = False, **kwargs) -> Trainer:
    """Train a VAE in one call and return the finished :class:`Trainer`.

    ``dataset``: a name/path or a loaded :class:`~fastvae.datasets.Dataset`.
    Keyword arguments go to :class:`ModelConfig`, :class:`TrainConfig` or
    :class:`DataConfig` by name (e.g. ``hidden=[400], latent_dim=20,
    epochs=10, batch_size=128, lr=1e-3, backend="numpy", data_dir=...``).
    ``input_dim`` and ``image_shape`` default to the data's.
    """
    import dataclasses as dc
    fields = {c: {f.name for f in dc.fields(c)} for c in (ModelConfig, TrainConfig, DataConfig)}
    unknown = set(kwargs) - set().union(*fields.values())
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)} for fastvae.train")
    pick = lambda c: {k: v for k, v in kwargs.items() if k in fields[c]}
    if isinstance(dataset, _datasets.Dataset):
        data, dcfg = dataset, DataConfig(dataset=dataset.name, **pick(DataConfig))
    else:
        dcfg = DataConfig(dataset=dataset, **pick(DataConfig))
        data = _datasets.load(dcfg)
    mk = pick(ModelConfig)
    mk.setdefault("input_dim", data.input_dim)
    mk.setdefault("image_shape", data.image_shape if np.prod(data.image_shape) == data.input_dim else None)
    trainer = Trainer(ModelConfig(**mk), TrainConfig(**pick(TrainConfig)), dcfg, dataset=data,
                      out=out, progress=progress)
    trainer.fit(pictures=out is not None)
    return trainer
