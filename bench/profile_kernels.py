"""Where a training step's time goes, per backend primitive and per layer (ms per step).

    python bench/profile_kernels.py [--backends numpy numba] [--steps 200] [--workloads conv64-10/b64 ...]

Wraps every backend primitive with a timer (synchronising after each call, so
GPU numbers include the sync), runs training steps on each standard workload
and writes bench/results/<name>.md and .jsonl. "other" is the rest
of the step: Python overhead and the noise draw.

Then, per layer (the layers' forward and backward timed in a second pass of
the same steps): its algorithm (a convolution's ``im2col`` or ``direct``),
forward and backward ms, GFLOP/s (the multiply-adds of its GEMMs or its
convolution, x 2), the bytes its passes move at least (activations, weights,
gradients, and a column buffer written and read where it has one), and its
GEMM floor (those FLOPs at the measured peak GEMM rate, a 2048^3 matmul).
"""

import argparse
import collections
import json
import math
import os
import time

from fastvae import backends
from fastvae.bench.harness import WORKLOADS, blas_line, environment, training_step
from fastvae.backends.cpu.threads import fit_backend
from fastvae.bench.workloads import workload

PRIMS = ["gemm", "im2col", "col2im", "bias_act", "act_backward", "col_sum", "reparam_kl", "reparam_kl_backward",
         "likelihood", "adam_update"]


def _timed(be, f, acc, key):
    """``f`` wrapped to add its synchronised seconds to ``acc[key]``."""
    def timed(*a, **k):
        be.synchronize()
        t = time.perf_counter()
        r = f(*a, **k)
        be.synchronize()
        acc[key] += time.perf_counter() - t
        return r
    return timed


def profile(name, wl, steps):
    be, model, step = training_step(name, wl)
    if be.device == "cpu":
        fit_backend(be, model)         # the threads the trainer would give it
    for _ in range(5):
        step()
    acc = collections.defaultdict(float)
    for p in PRIMS:
        setattr(be, p, _timed(be, getattr(be, p), acc, p))
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


def layer_flops(layer, B: int) -> float:
    """FLOPs of one forward pass of ``layer`` at batch ``B`` (2 per multiply-add;
    the backward does twice as many: its input and weight gradients)."""
    kind = type(layer).__name__
    if kind in ("Dense", "MaskedDense"):
        return 2.0 * B * layer.in_features * layer.out_features
    if kind == "Conv2d":
        Ho, Wo, F = layer.out_hwc
        return 2.0 * B * Ho * Wo * F * layer.in_hwc[2] * layer.k * layer.k
    if kind == "ConvTranspose2d":
        H, W, C = layer.in_hwc
        return 2.0 * B * H * W * C * layer.channels * layer.k * layer.k
    return 0.0


def layer_bytes(layer, st, B: int, itemsize: int) -> float:
    """Bytes one forward and backward of ``layer`` move at least: its input,
    output and their gradients once each, its weights and their gradient, and
    a column buffer (written and read, forward and backward) where it uses one."""
    n = B * (layer.in_features + layer.out_features) * 2
    n += 2 * sum(math.prod(shape) for _, shape in getattr(layer, "param_entries", lambda: [])())
    cols = getattr(st, "cols", None)
    if cols is not None:
        n += 4 * cols.size
    return n * itemsize


def profile_layers(name, wl, steps, peak):
    """Per layer of the workload's model: algorithm, forward / backward ms per step, GFLOP/s, bytes, floor ms."""
    be, model, step = training_step(name, wl)
    if be.device == "cpu":
        fit_backend(be, model)
    for _ in range(5):
        step()
    B = wl["batch_size"]
    fwd, bwd = collections.defaultdict(float), collections.defaultdict(float)
    for i, layer in enumerate(model.layers):
        for acc, meth in ((fwd, "forward"), (bwd, "backward")):
            setattr(layer, meth, _timed(be, getattr(layer, meth), acc, i))
    steps = max(3, min(steps, 50))
    for _ in range(steps):
        step()
    ws = model.workspace(B)
    rows = []
    for i, layer in enumerate(model.layers):
        flops = 3 * layer_flops(layer, B)
        ms_f, ms_b = fwd[i] / steps * 1e3, bwd[i] / steps * 1e3
        st = ws.states[i]
        rows.append({"layer": layer.name, "label": layer.label(), "algorithm": getattr(st, "algo", "-"),
                     "forward_ms": ms_f, "backward_ms": ms_b,
                     "gflops_per_s": flops / ((ms_f + ms_b) * 1e6) if flops and ms_f + ms_b > 0 else None,
                     "mbytes": layer_bytes(layer, st, B, be.dtype.itemsize) / 1e6,
                     "floor_ms": flops / peak / 1e6 if flops else None})
    return rows


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
    from fastvae.bench.timing import peak_gemm_gflops
    peak = peak_gemm_gflops()
    rows, per_layer = [], []
    for wname in a.workloads:
        wl = workload(wname)
        for n in names:
            r = profile(n, wl, a.steps)
            rows.append({"workload": wname, "backend": n, "ms": r})
            print(wname, n, f"{r['total']:.3f} ms/step:",
                  ", ".join(f"{k} {v:.3f}" for k, v in sorted(r.items(), key=lambda kv: -kv[1]) if k != "total"))
            if n != "cupy":
                for lr in profile_layers(n, wl, a.steps, peak):
                    per_layer.append({"workload": wname, "backend": n, **lr})
                    print("   ", json.dumps(per_layer[-1]))
    os.makedirs(a.out, exist_ok=True)
    env = environment()
    with open(os.path.join(a.out, a.name + ".jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "env": env}, default=str) + "\n")
        for r in per_layer:
            f.write(json.dumps({**r, "peak_gemm_gflops": peak}) + "\n")
    cols = PRIMS + ["other", "total"]
    with open(os.path.join(a.out, a.name + ".md"), "w") as f:
        f.write("| workload | backend | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 2) + "\n")
        for r in rows:
            f.write(f"| {r['workload']} | {r['backend']} | " + " | ".join(f"{r['ms'][c]:.3f}" for c in cols) + " |\n")
        f.write(f"\nms per training step, per primitive (timed individually, sync after each call); "
                f"{env['processor']}, {env['cpus']} CPUs; {blas_line(env)}; {env['date']}.\n")
        fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"        # noqa: E731
        f.write("\n| workload | backend | layer | algorithm | forward ms | backward ms | GFLOP/s | MB moved | "
                "GEMM floor ms |\n|---|---|---|---|---|---|---|---|---|\n")
        for r in per_layer:
            f.write(f"| {r['workload']} | {r['backend']} | {r['layer']} {r['label']} | {r['algorithm']} | "
                    f"{fmt(r['forward_ms'], 3)} | {fmt(r['backward_ms'], 3)} | {fmt(r['gflops_per_s'], 0)} | "
                    f"{fmt(r['mbytes'], 1)} | {fmt(r['floor_ms'], 3)} |\n")
        f.write(f"\nPer layer: forward and backward ms per step (timed in a second pass, sync around each), "
                f"GFLOP/s of its forward + backward multiply-adds, the bytes its passes move at least, and those "
                f"FLOPs at the peak GEMM rate measured here ({peak:.0f} GFLOP/s).\n")


if __name__ == "__main__":
    main()
