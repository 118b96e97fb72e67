"""The host's share of a CUDA-graph replay, measured without a GPU.

    python bench/graph_host.py [--workloads 784-400-20/b128 conv28-20/b128 ...] [--steps 2000]

A replayed step (``--cuda-graph``, fastvae/backends/cupy/cuda_graph.py) still
runs the step's Python: Adam's step count, the RNG counters and the
schedules advance on the host, and every launch, suppressed, is checked
against the captured one before one ``cudaGraphLaunch``. The device runs the
graph while the host prepares the next step, so a step costs the larger of
the two; at 784-400-20/b128 the graph's work is a few microseconds per node,
and the host side decides how far the replay gets ahead of PyTorch's eager
step (issue 14's goal: 5x).

This script times that host side on the CPU with the emulated CuPy backend
(``tests/cuda_emu.py``: the real ``CupyBackend`` wrappers over NumPy arrays;
the graph launch and the staging upload replaced by nothing), per workload:

* ``replay_us``: one replayed step (the step's Python with its launches
  suppressed and checked);
* ``python_us``: the same step with every device operation dropped (no
  check): the floor a replay of this design can reach;
* ``ops``: launches per step (what a replay checks, and the graph's nodes).

On a GPU the replay also pays the pinned-buffer upload and the graph launch
(a few microseconds each); a NumPy array's pointer (``a.ctypes.data``) costs
more than a CuPy one's (``a.data.ptr``), so fresh array views are checked
more slowly here than there. Writes bench/results/<name>.md and .jsonl.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from fastvae.backends.cupy.cuda_graph import StepGraphs  # noqa: E402
from fastvae.bench.harness import environment, workload_config  # noqa: E402
from fastvae.nn.model import VAE  # noqa: E402
from fastvae.optim.adam import Adam  # noqa: E402
from fastvae.bench.workloads import workload  # noqa: E402

DEFAULT = ["784-400-20/b128", "784-1000-2/b32", "4096-1000-50/b128", "conv28-20/b128", "conv64-10/b64"]


def _per_step(fn, steps, rounds=5):
    """Median over ``rounds`` of the mean seconds per call over ``steps`` calls."""
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        out.append((time.perf_counter() - t) / steps)
    return float(np.median(out))


def host_times(wname: str, steps: int) -> dict:
    """``{"replay_us", "python_us", "ops"}`` for workload ``wname`` (see the module docstring)."""
    from cuda_emu import EmulatedCupyBackend
    wl = workload(wname)
    be = EmulatedCupyBackend("float32")
    be._launch_graph = lambda graph: None          # the device's work is not what is timed
    be._upload = lambda dst, host: None
    cfg = workload_config(wl, "float32")
    model = VAE(cfg, be, seed=0)
    opt, rng = Adam.for_model(model), be.new_rng([0, 1])
    x = be.asarray(np.random.default_rng(1).random((wl["batch_size"], cfg.input_dim)))
    ws = model.workspace(wl["batch_size"])

    def step():
        rng.normal_(ws.eps)
        model.loss_and_grad(x, ws.eps, 1.0)
        opt.step()
    graphs = StepGraphs(be, warmup=0)              # captured at once: the emulated kernels never run
    for _ in range(20):
        graphs("step", step)
    ops = len(graphs._graphs["step"].ops)
    replay = _per_step(lambda: graphs("step", step), steps)
    if graphs.stats["replayed"] != 19 + 5 * steps:          # a replay that turned eager times something else
        raise RuntimeError(f"{wname}: the replays turned eager ({graphs.summary()})")
    be._op = lambda f, *a, **k: None               # the step's Python alone
    python = _per_step(step, steps)
    return {"replay_us": replay * 1e6, "python_us": python * 1e6, "ops": ops}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="*", default=DEFAULT)
    ap.add_argument("--steps", type=int, default=1000, help="replays per timed round (5 rounds, median)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default="graph_host")
    a = ap.parse_args()
    env = environment()
    rows = []
    for w in a.workloads:
        r = {"workload": w, **host_times(w, a.steps)}
        rows.append(r)
        print(f"{w}: replay {r['replay_us']:.1f} us/step, step Python alone {r['python_us']:.1f} us, "
              f"{r['ops']} launches", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, a.name + ".jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "env": env}, default=str) + "\n")
    with open(os.path.join(a.out, a.name + ".md"), "w") as f:
        f.write("| workload | launches per step | replay host us/step | step Python alone us | check us per launch |\n"
                "|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['workload']} | {r['ops']} | {r['replay_us']:.1f} | {r['python_us']:.1f} | "
                    f"{(r['replay_us'] - r['python_us']) / r['ops']:.2f} |\n")
        f.write(f"\nHost time of a CUDA-graph replay, emulated CuPy backend on the CPU (`python bench/graph_host.py`); "
                f"{env['processor']}, {env['cpus']} CPUs, Python {env['python']}, NumPy {env['numpy']}; "
                f"{env['date']}.\n")


if __name__ == "__main__":
    main()
