"""KL-weight (beta) and learning-rate schedules, evaluated per training step.

Time is measured in epochs as a float, ``e = step / steps_per_epoch``, so a
schedule set in epochs behaves the same at any batch size.

beta schedules (``beta_max`` is the final or peak weight):

* ``constant``: ``beta_max``.
* ``linear``: 0 for ``delay`` epochs, then a straight ramp to ``beta_max`` over
  ``warmup`` epochs (the "KL warm-up" of Bowman et al. 2016 and Sønderby et al.
  2016; the seeds' "delayed ramp").
* ``sigmoid``: 0 for ``delay`` epochs, then ``beta_max * sigmoid(12 (t - 1/2))``
  with ``t`` the fraction of ``warmup`` elapsed, so the ramp is 0.25 % done at
  its start and 99.75 % at its end; ``beta_max`` from then on.
* ``cyclical``: Fu et al. 2019 ("Cyclical Annealing Schedule", eq. 2 with a
  linear f): the run is split into ``cycles`` periods; in each, beta rises
  linearly from 0 to ``beta_max`` over the first ``ratio`` of the period and
  stays there.
"""

from __future__ import annotations

import math

from fastvae.config import TrainConfig
from fastvae.naming import option


def beta_at(cfg: TrainConfig, epoch_float: float, total_epochs: int) -> float:
    """KL weight at time ``epoch_float`` (epochs since the start, float)."""
    e, bmax, kind = float(epoch_float), float(cfg.beta_max), cfg.beta_schedule
    if kind == "constant":
        return bmax
    if kind == "cyclical":
        period = max(total_epochs, 1) / cfg.beta_cycles
        tau = (e % period) / period
        return bmax * min(tau / cfg.beta_ratio, 1.0)
    t = e - cfg.beta_delay
    if t < 0:
        return 0.0
    if t >= cfg.beta_warmup:           # after the ramp: the final weight itself (sigmoid's ramp ends at 99.75 %)
        return bmax
    frac = t / cfg.beta_warmup          # in [0, 1)
    if kind == "linear":
        return bmax * frac
    if kind == "sigmoid":
        return bmax / (1.0 + math.exp(-12.0 * (frac - 0.5)))
    raise ValueError(f"unknown beta schedule {kind!r}")


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int, total_epochs: int) -> float:
    """Learning rate at (0-based) ``step``.

    ``step``: multiplied by ``lr_gamma`` every ``lr_step_epochs`` epochs;
    ``cosine``: Loshchilov & Hutter 2017 (SGDR, eq. 5, one cycle without
    restarts) from ``lr`` to ``lr_min`` over all steps of the run.
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "step":
        k = (step // max(steps_per_epoch, 1)) // cfg.lr_step_epochs
        return cfg.lr * cfg.lr_gamma ** k
    if cfg.lr_schedule == "cosine":
        total = max(total_epochs * steps_per_epoch - 1, 1)
        frac = min(step / total, 1.0)
        return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {cfg.lr_schedule!r}")


def resume_note(cfg: TrainConfig, step: int, steps_per_epoch: int, old_total: int, new_total: int) -> str:
    """A note when continuing at ``step`` with ``new_total`` epochs instead of
    ``old_total`` moves a schedule that depends on the run's length (cosine
    lr, cyclical beta): the values it jumps between; else ``""``."""
    jumps = []
    lr0, lr1 = (lr_at(cfg, step, steps_per_epoch, t) for t in (old_total, new_total))
    if not math.isclose(lr0, lr1, rel_tol=1e-9):
        jumps.append(f"the {cfg.lr_schedule} lr from {lr0:.3g} to {lr1:.3g}")
    e = step / max(steps_per_epoch, 1)
    b0, b1 = (beta_at(cfg, e, t) for t in (old_total, new_total))
    if not math.isclose(b0, b1, rel_tol=1e-9):
        jumps.append(f"the {cfg.beta_schedule} beta from {b0:.3g} to {b1:.3g}")
    if not jumps:
        return ""
    keep = f"; resume with {option('epochs', old_total)} to keep it" if step < old_total * steps_per_epoch else ""
    return (f"{option('epochs', new_total)} instead of the run's {old_total} stretches its schedule: at step {step} "
            f"{' and '.join(jumps)} (a jump){keep}")
