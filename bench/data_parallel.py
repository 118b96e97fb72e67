"""Data-parallel scaling on this machine: 1 process x T threads against
W ranks x T/W threads (mpiexec), same global batch, with the all-reduce's
share of each step.

    python bench/data_parallel.py [--backend numba] [--steps 60]

runs every configuration (each a fresh ``mpiexec -n W`` job, run alone) and
writes ``bench/results/data_parallel.json``. Per configuration: median
ms/step (after 10 warm-up steps, excluded and reported separately), median
all-reduce ms/step, and the bytes each all-reduce moves.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = {"784-400-20/b128": dict(hidden=[400], latent=20, D=784, B=128),
             "conv28-20/b128": dict(arch="conv", latent=20, D=784, B=128)}


def worker(a):
    import numpy as np
    from fastvae import DataConfig, ModelConfig, RunSettings, TrainConfig, Trainer
    from fastvae.datasets.dataset import Dataset
    wl = WORKLOADS[a.workload]
    x = np.random.default_rng(0).random((wl["B"] * (a.steps + 10), wl["D"]), dtype=np.float32)
    data = Dataset("bench", x, None, None, None, (28, 28))
    mc = ModelConfig(input_dim=784, image_shape=(28, 28), latent_dim=wl["latent"], arch=wl.get("arch", "mlp"),
                     **({"hidden": wl["hidden"]} if "hidden" in wl else {}))
    t = Trainer(mc, TrainConfig(batch_size=wl["B"]), DataConfig(), dataset=data, progress=False,
                settings=RunSettings(backend=a.backend, threads=a.threads))
    comm = t.world
    hook = t.optimizer.hooks[0] if comm.size > 1 else None
    reduce_s = []
    if hook is not None:
        def timed(opt, inner=hook):
            t0 = time.perf_counter()
            inner(opt)
            reduce_s.append(time.perf_counter() - t0)
        t.optimizer.hooks[0] = timed
    pos = t.batches.new_epoch()
    steps, t_warm = [], time.perf_counter()
    for b in range(a.steps + 10):
        if b == 10:
            t_warm = time.perf_counter() - t_warm
            reduce_s.clear()
        comm.barrier()
        t0 = time.perf_counter()
        t.train_step(t.batches.next_batch(pos, b), 1.0, 1e-3, False)
        t.backend.synchronize()
        if b >= 10:
            steps.append(time.perf_counter() - t0)
    if comm.rank == 0:
        print(json.dumps({"workload": a.workload, "backend": a.backend, "world_size": comm.size,
                          "threads_per_rank": a.threads, "ms_per_step": 1e3 * statistics.median(steps),
                          "allreduce_ms": 1e3 * statistics.median(reduce_s) if reduce_s else 0.0,
                          "allreduce_bytes": int(t.model.grads.nbytes), "warmup_s": t_warm,
                          "params": t.model.num_params}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workload", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--worker", action="store_true")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    cores = os.cpu_count() or 1
    rows = []
    for wl in WORKLOADS:
        for W in (1, 2):
            cmd = (["mpiexec", "-n", str(W)] if W > 1 else []) + [
                sys.executable, os.path.abspath(__file__), "--worker", "--workload", wl, "--backend", a.backend,
                "--steps", str(a.steps), "--threads", str(max(1, cores // W))]
            print("$", " ".join(cmd), flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(row, flush=True)
            rows.append(row)
    res = {"machine": platform.processor() or platform.machine(), "cores": cores, "rows": rows}
    path = os.path.join(HERE, "results", "data_parallel.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
