"""Epoch-level training speed on real MNIST (or the built-in sprites): fastvae's CPU backends against
the PyTorch twin, same data, same settings, same initial weights, same run.

    python bench/epoch_time.py [--epochs 6] [--workloads 784-400-20/b128 784-1000-2/b32]
                               [--backends numba numpy] [--settle 1.0] [--min-clean 3] [--n-sprites 6000]
                               [--name epoch_time]

Workloads: the standard MNIST MLPs, one of your own written as 784-H-...-L/bB,
the seed's ConvNet (conv28-L/bB, e.g. conv28-20/b128), or the Burgess et al.
ConvNet on 64x64 sprites (conv64-L/bB, e.g. conv64-10/b64).
Every contender trains its own model on the 24,000-image MNIST training file
(../shared/data/mnist; skipped with a message when absent), or for conv64 on
``--n-sprites`` built-in sprites (90 % of them for training): Bernoulli
likelihood on continuous pixels, Adam lr 1e-3, beta 1. The epochs are
interleaved: epoch k of each contender runs (rotated order, ``--settle``
seconds of sleep first) before epoch k+1 of any, so the machine's slow phases
reach them alike, and between epochs a probe measures how much faster a GEMM
runs on all cores than on one (``fastvae.bench.timing.blas_parallel_speedup``): an
epoch with a probe on either side under 0.9 of the run's typical best (the
median of the top half of probes), or under 1.7, ran while the host held part
of a core and is left out of the median (marked * in the table; here the
probe reads 1.82-2.00 normally, 1.08-1.58 then). Epochs go on past
``--epochs`` until each contender has 3 clean ones after its first, up to 3
times ``--epochs``. The time of an epoch is its training loop only (shuffle,
batch gather, eps draw, forward, backward, Adam, the running loss), not the
test-set evaluation that the trainer runs after it.

Reported per contender: each epoch's seconds; the median from the second
epoch on (the first holds the warm-up: Numba's compile or cache load, memory
first touched; shown on its own); images/s; the ratio to PyTorch's fused Adam
(its median epoch over ours); and how many Adam first-moment entries are
denormals (nonzero, below the dtype's smallest normal) after the last epoch:
denormal arithmetic is slow on CPUs, and weights whose gradient stops (a
pixel that is rarely on, a dead ReLU unit) decay into them as beta1^t.

Writes bench/results/<name>.json and <name>.md.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np

import fastvae
from fastvae import DataConfig, RunSettings, TrainConfig, Trainer, datasets
from fastvae.backends.cpu.threads import fit_backend
from fastvae.bench.harness import WORKLOADS, blas_line, environment, workload_config
from fastvae.errors import ConfigError
from fastvae.bench.workloads import workload
from fastvae.bench.timing import CoreProbe, clean_intervals

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "mnist"))


def denormals(a) -> int:
    """How many entries of ``a`` are nonzero and under its dtype's smallest normal."""
    a = np.asarray(a)
    return int(np.count_nonzero((a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)))


def ours(name, wl, ds, dcfg):
    t = Trainer(workload_config(wl), TrainConfig(epochs=10 ** 6, batch_size=wl["batch_size"], lr=1e-3, seed=0),
                dcfg, dataset=ds, progress=False, settings=RunSettings(backend=name))

    def epoch():
        fit_backend(t.backend, t.model)      # this backend's threads again, after the others' epochs (untimed)
        t.fit(epochs=t.epoch + 1, pictures=False)
        return t.history[-1]["seconds"]
    return {"backend": name}, epoch, lambda: denormals(t.optimizer.m)


def torch_twin(adam, wl, ds):
    import torch
    from fastvae.bench import torch_twin as torch_ref
    tm, opt, run_epoch = torch_ref.epoch_runner(workload_config(wl), ds.x_train, wl["batch_size"], 1e-3, 0,
                                                init_from=fastvae.VAE(workload_config(wl), seed=0), adam=adam)

    def epoch():
        t0 = time.perf_counter()
        run_epoch()
        return time.perf_counter() - t0
    return ({"backend": f"torch-{adam}", "torch_threads": torch.get_num_threads()}, epoch,
            lambda: sum(denormals(s["exp_avg"].numpy()) for s in opt.state.values()))


def _flags(probes, spans, share, ref=None, floor=0.0):
    ok = clean_intervals(probes, share, ref, floor)
    return [[ok[j - 1] for j in sp] for sp in spans]


def interleave(epoch_fns, epochs, settle, probe=None, share=0.9, min_clean=3, max_epochs=None):
    """``(secs, clean, probes)``: the seconds of each epoch of each contender
    (round k runs epoch k of every contender, the order rotated by k, each
    after ``settle`` seconds of sleep), whether each ran with every core (the
    probes just before and just after it at least ``share`` of the median of
    the top half of all the probe's readings, a ``CoreProbe`` shared by the
    workloads keeping them, and at least its ``floor``), and this call's probes in the order they ran. Rounds go
    on past ``epochs`` until every contender has ``min_clean`` clean epochs
    after its first, up to ``max_epochs`` (default ``3 * epochs``)."""
    probe = probe or CoreProbe()
    ref, floor = getattr(probe, "readings", None), getattr(probe, "floor", 0.0)
    secs = [[] for _ in epoch_fns]
    spans = [[] for _ in epoch_fns]
    probes = [probe()]
    order = list(range(len(epoch_fns)))
    k = 0
    while k < epochs or (k < (max_epochs or 3 * epochs)
                         and min(sum(c[1:]) for c in _flags(probes, spans, share, ref, floor)) < min_clean):
        r = k % len(order)
        for i in order[r:] + order[:r]:
            time.sleep(settle)
            secs[i].append(epoch_fns[i]())
            probes.append(probe())
            spans[i].append(len(probes) - 1)
        k += 1
    return secs, _flags(probes, spans, share, ref, floor), probes


def typical(secs, clean):
    """The median epoch from the second on, over clean ones when at least two are (else over all)."""
    kept = [s for s, c in zip(secs[1:], clean[1:]) if c]
    return statistics.median(kept if len(kept) >= 2 else secs[1:] or secs), len(kept)


def run(workloads, backends, epochs, settle, data, min_clean=3):
    """``data``: input size -> ``(dataset, its DataConfig)``."""
    rows, probe = [], CoreProbe()
    for wname in workloads:
        wl = workload(wname)
        ds, dcfg = data[wl["input_dim"]]
        cands = [ours(b, wl, ds, dcfg) for b in backends]
        try:
            cands += [torch_twin(adam, wl, ds) for adam in ("fused", "foreach")]
        except ImportError as exc:
            print(f"PyTorch peer skipped: {exc}", file=sys.stderr)
        secs, clean, probes = interleave([c[1] for c in cands], epochs, settle, probe, min_clean=min_clean)
        meds = [typical(s, c) for s, c in zip(secs, clean)]
        peer = next((m for c, (m, _) in zip(cands, meds) if c[0]["backend"] == "torch-fused"), None)
        for (row, _, count), s, c, (med, n_clean) in zip(cands, secs, clean, meds):
            row.update(workload=wname, data=ds.name, train_images=int(ds.x_train.shape[0]),
                       epoch_seconds=[round(x, 3) for x in s], clean=c, clean_epochs=n_clean,
                       probe_speedups=[round(p, 2) for p in probes], first_epoch_s=s[0], median_s=med,
                       images_per_s=ds.x_train.shape[0] / med, vs_torch_fused=peer / med if peer else None,
                       adam_m_denormals=count())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows, env) -> str:
    out = ["| workload | contender | epoch seconds, in order (* slow phase) | median s (epochs 2-, clean) "
           "| images/s | vs PyTorch fused | Adam m denormals at the end |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['vs_torch_fused']:.2f}x" if r["vs_torch_fused"] else ""
        ep = ", ".join(f"{x:.2f}" + ("" if c else "*") for x, c in zip(r["epoch_seconds"], r["clean"]))
        out.append(f"| {r['workload']} | {r['backend']} | {ep} "
                   f"| {r['median_s']:.3f} | {r['images_per_s']:,.0f} | {vs} | {r['adam_m_denormals']:,} |")
    probes = [p for r in rows for p in r["probe_speedups"]]
    out.append("")
    out.append(f"{env['processor']}, {env['cpus']} CPUs; {blas_line(env)}; numpy {env['numpy']}, "
               f"numba {env.get('numba')}, torch {env.get('torch')}; {env['date']}. "
               + "; ".join(sorted({f"{r['data']}: {r['train_images']:,} training images" for r in rows}))
               + f"; {env['settle_s']} s settle before each epoch. * : the all-core GEMM speedup probed before or "
               f"after that epoch was under 0.9 of the run's typical best (the host held part of a core; probes "
               f"{min(probes):.2f}-{max(probes):.2f}); the median leaves those out when two or "
               "more clean epochs remain.")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--workloads", nargs="*", default=["784-400-20/b128", "784-1000-2/b32"])
    ap.add_argument("--backends", nargs="*", default=["numba", "numpy"])
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--min-clean", type=int, default=3,
                    help="epochs go on (up to 3x --epochs) until each contender has this many clean ones")
    ap.add_argument("--n-sprites", type=int, default=6000, help="sprites drawn for the conv64 workloads")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default="epoch_time")
    a = ap.parse_args()
    try:                                  # the standard ones, an MLP of your own (784-H-...-L/bB), conv28-L/bB, conv64
        wls = {w: workload(w) for w in a.workloads}
        bad = [w for w, wl in wls.items() if wl["input_dim"] not in (784, 4096)]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if bad:
        print(f"error: {bad} are neither MNIST workloads (784 inputs) nor 64x64 sprites ones; choose from "
              f"{[w for w, v in WORKLOADS.items() if v['input_dim'] in (784, 4096)]} "
              "or write your own as 784-H-...-L/bB, conv28-L/bB or conv64-L/bB", file=sys.stderr)
        return 2
    data = {}
    if any(wl["input_dim"] == 784 for wl in wls.values()):
        if not os.path.exists(a.data_dir):
            print(f"skipped: MNIST not found in {a.data_dir}", file=sys.stderr)
            return 0
        dcfg = DataConfig(dataset="mnist", data_dir=a.data_dir, download=False)
        data[784] = (datasets.load(dcfg), dcfg)
    if any(wl["input_dim"] == 4096 for wl in wls.values()):
        dcfg = DataConfig(dataset="sprites", n_sprites=a.n_sprites)
        data[4096] = (datasets.load(dcfg), dcfg)
    env = dict(environment(), date=datetime.datetime.now().isoformat(timespec="seconds"),
               fastvae=fastvae.__version__, epochs=a.epochs, settle_s=a.settle)
    rows = run(a.workloads, a.backends, a.epochs, a.settle, data, a.min_clean)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, a.name + ".json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=2)
    with open(os.path.join(a.out, a.name + ".md"), "w") as f:
        f.write(markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
