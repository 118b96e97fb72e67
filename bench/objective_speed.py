"""Step time of each training objective against the plain ELBO step (issue 15).

    python bench/objective_speed.py [--backend numba] [--seconds 3]

Median ms per training step (batch fill, forward, backward, Adam) of a
Trainer on resident synthetic data, for 784-400-20/b128 and the seed ConvNet
(conv28-20/b128): ``elbo``, ``iwae`` with K = 5, ``btcvae`` with each
estimator (``btcvae_mss``, the default, and ``btcvae_mws``), the ELBO with an
IAF posterior of 2 steps (``iaf2``, MADE hidden 200, the encoder's context
h; ``iaf2_no_context`` without it) and IWAE through it (``iaf2_iwae``), timed interleaved
(:func:`fastvae.bench.timing.measure` with the two-core probe, quartiles reported). Warm-up (building the
Trainer and its first 5 steps, Numba compilation included) is excluded and
reported.
Writes ``bench/results/objective_speed.json``.
"""

import argparse
import json
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


#: name: (objective, ModelConfig fields, TrainConfig fields)
VARIANTS = {"elbo": ("elbo", {}, {}), "iwae": ("iwae", {}, {}),
            "btcvae_mss": ("btcvae", {}, {"tc_estimator": "mss"}),
            "btcvae_mws": ("btcvae", {}, {"tc_estimator": "mws"}),
            "iaf2": ("elbo", {"posterior": "iaf", "flows": 2}, {}),
            "iaf2_no_context": ("elbo", {"posterior": "iaf", "flows": 2, "flow_context": False}, {}),
            "iaf2_iwae": ("iwae", {"posterior": "iaf", "flows": 2}, {})}


def contender(arch, variant, backend):
    """A warmed-up Trainer's step (batch fill, forward, backward, Adam) as a
    :class:`fastvae.bench.timing.Contender`; its first 5 steps are the warm-up."""
    from fastvae import DataConfig, ModelConfig, RunSettings, TrainConfig, Trainer
    from fastvae.datasets.dataset import Dataset
    from fastvae.bench.timing import Contender
    objective, extra, train_extra = VARIANTS[variant]
    x = np.random.default_rng(0).random((128 * 40, 784), dtype=np.float32)
    mc = ModelConfig(input_dim=784, image_shape=(28, 28), latent_dim=20, arch=arch,
                     **({"hidden": [400]} if arch == "mlp" else {}), **extra)
    t0 = time.perf_counter()
    t = Trainer(mc, TrainConfig(batch_size=128, objective=objective, iwae_k=5, **train_extra), DataConfig(),
                dataset=Dataset("bench", x, None, None, None, (28, 28)), progress=False,
                settings=RunSettings(backend=backend))
    state = {"pos": t.batches.new_epoch(), "b": 0}

    def step():
        if state["b"] == t.steps_per_epoch():
            state["pos"], state["b"] = t.batches.new_epoch(), 0
        t.train_step(t.batches.next_batch(state["pos"], state["b"]), 6.0, 1e-3, False)
        state["b"] += 1

    for _ in range(5):
        step()
    t.backend.synchronize()
    return Contender({"arch": arch, "objective": variant, "iwae_k": 5 if objective == "iwae" else None,
                      "backend": backend, "warmup_s": time.perf_counter() - t0}, step, t.backend.synchronize)


def main():
    from fastvae.bench.timing import CoreProbe, measure
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    rows, probe = [], CoreProbe()
    for arch in ("mlp", "conv"):
        for attempt in range(3):        # a net timed wholly on a taken core is timed again (fresh trainers)
            cs = [contender(arch, v, a.backend) for v in VARIANTS]
            # interleaved: drift reaches every objective alike; rounds on a taken core are left out
            measure(cs, a.seconds, probe=probe)
            if not any(c.row.get("taken_core") for c in cs):
                break
        base = cs[0].row["ms_per_step"]
        for c in cs:
            c.row["x_elbo"] = c.row["ms_per_step"] / base
            rows.append(c.row)
            print(json.dumps(c.row), flush=True)
    with open(os.path.join(HERE, "results", "objective_speed.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
