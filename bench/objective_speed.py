"""Step time of each training objective against the plain ELBO step (issue 15).

    python bench/objective_speed.py [--backend numba] [--seconds 3]

Median ms per training step (batch fill, forward, backward, Adam) of a
Trainer on resident synthetic data, for 784-400-20/b128 and the seed ConvNet
(conv28-20/b128): ``elbo``, ``iwae`` with K = 5, ``btcvae`` and the ELBO with
an IAF posterior of 2 steps (``iaf2``, MADE hidden 200). Warm-up (the
first 5 steps, Numba compilation included) is excluded and reported.
Writes ``bench/results/objective_speed.json``.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


VARIANTS = {"elbo": ("elbo", {}), "iwae": ("iwae", {}), "btcvae": ("btcvae", {}),
            "iaf2": ("elbo", {"posterior": "iaf", "flows": 2})}


def measure(arch, variant, backend, seconds):
    from fastvae import DataConfig, ModelConfig, TrainConfig, Trainer
    from fastvae.data import Dataset
    objective, extra = VARIANTS[variant]
    x = np.random.default_rng(0).random((128 * 40, 784), dtype=np.float32)
    mc = ModelConfig(input_dim=784, image_shape=(28, 28), latent_dim=20, arch=arch,
                     **({"hidden": [400]} if arch == "mlp" else {}), **extra)
    t = Trainer(mc, TrainConfig(batch_size=128, backend=backend, objective=objective, iwae_k=5), DataConfig(),
                dataset=Dataset("bench", x, None, None, None, (28, 28)), progress=False)
    pos, b = t.batches.new_epoch(), 0
    t0 = time.perf_counter()
    times = []
    while True:
        if b == t.steps_per_epoch():
            pos, b = t.batches.new_epoch(), 0
        ws = t.batches.fill(t.model, pos, b)
        s0 = time.perf_counter()
        t.train_step(ws, 6.0, 1e-3, False)
        t.backend.synchronize()
        times.append(time.perf_counter() - s0)
        b += 1
        if len(times) == 5:
            warm = time.perf_counter() - t0
        if len(times) > 5 and sum(times[5:]) > seconds:
            break
    return 1e3 * statistics.median(times[5:]), warm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    rows = []
    for arch in ("mlp", "conv"):
        base = None
        for objective in VARIANTS:
            ms, warm = measure(arch, objective, a.backend, a.seconds)
            base = base or ms
            row = {"arch": arch, "objective": objective, "iwae_k": 5 if objective == "iwae" else None,
                   "ms_per_step": ms, "x_elbo": ms / base, "warmup_s": warm, "backend": a.backend}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(HERE, "results", "objective_speed.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
