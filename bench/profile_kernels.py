"""Where a training step's time goes, per backend primitive (ms per step).

    python bench/profile_kernels.py [--backends numpy numba] [--steps 200] [--workloads conv64-10/b64 ...]

Wraps every backend primitive with a timer (synchronising after each call, so
GPU numbers include the sync), runs training steps on each standard workload
and writes bench/results/<device>_profile.md and .jsonl. "other" is the rest
of the step: Python overhead and the noise draw.
"""

import argparse
import collections
import json
import os
import time

from fastvae import backends
from fastvae.bench.harness import WORKLOADS, blas_line, environment, training_step
from fastvae.backends.cpu.threads import fit_backend
from fastvae.bench.workloads import workload

PRIMS = ["gemm", "im2col", "col2im", "bias_act", "act_backward", "col_sum", "reparam_kl", "reparam_kl_backward",
         "likelihood", "adam_update"]


def profile(name, wl, steps):
    be, model, step = training_step(name, wl)
    if be.device == "cpu":
        fit_backend(be, model)         # the threads the trainer would give it
    for _ in range(5):
        step()
    acc = collections.defaultdict(float)
    for p in PRIMS:
        f = getattr(be, p)

        def timed(*a, _f=f, _p=p, **k):
            t = time.perf_counter()
            r = _f(*a, **k)
            be.synchronize()
            acc[_p] += time.perf_counter() - t
            return r
        setattr(be, p, timed)
    steps = max(3, min(steps, int(2.0 / max(wl["batch_size"] * wl["input_dim"] * 2e-9, 1e-4))))
    t = time.perf_counter()
    for _ in range(steps):
        step()
    be.synchronize()
    total = (time.perf_counter() - t) / steps * 1e3
    row = {p: acc[p] / steps * 1e3 for p in PRIMS}
    row["other"] = total - sum(row.values())
    row["total"] = total
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="*")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS),
                    help="standard workloads or your own (D-H-...-L/bB, convS-L/bB); default: the standard ones")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="cpu_profile")
    a = ap.parse_args()
    names = a.backends or [b["name"] for b in backends.available() if b["available"]]
    rows = []
    for wname in a.workloads:
        wl = workload(wname)
        for n in names:
            r = profile(n, wl, a.steps)
            rows.append({"workload": wname, "backend": n, "ms": r})
            print(wname, n, f"{r['total']:.3f} ms/step:",
                  ", ".join(f"{k} {v:.3f}" for k, v in sorted(r.items(), key=lambda kv: -kv[1]) if k != "total"))
    os.makedirs(a.out, exist_ok=True)
    env = environment()
    with open(os.path.join(a.out, a.name + ".jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "env": env}, default=str) + "\n")
    cols = PRIMS + ["other", "total"]
    with open(os.path.join(a.out, a.name + ".md"), "w") as f:
        f.write("| workload | backend | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 2) + "\n")
        for r in rows:
            f.write(f"| {r['workload']} | {r['backend']} | " + " | ".join(f"{r['ms'][c]:.3f}" for c in cols) + " |\n")
        f.write(f"\nms per training step, per primitive (timed individually, sync after each call); "
                f"{env['processor']}, {env['cpus']} CPUs; {blas_line(env)}; {env['date']}.\n")


if __name__ == "__main__":
    main()
