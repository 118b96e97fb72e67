"""The README's table of the latest figures, from step_time and epoch_time runs.

    python bench/summary_table.py --steps bench/results/step_time.jsonl --epochs bench/results/epoch_time.json

One row per workload, in the order the files name them: the Numba backend's
milliseconds per training step and PyTorch's (its faster Adam, fused or
foreach, in the same run); the Numba and NumPy backends' ratios to it
(``vs PyTorch`` of bench/step_time.py) and to PyTorch with fused Adam per
epoch on real MNIST (``vs_torch_fused`` of bench/epoch_time.py); Numba's
step over its own GEMMs alone, those GEMMs' milliseconds, the step's FLOP
floor (its GEMM FLOPs at the measured peak SGEMM rate) and Numba's warm-up
(its first step, timed apart). A workload in several step files takes the
last; an empty cell: not measured.
"""

import argparse
import json


def _step_rows(paths):
    rows = {}
    for path in paths:
        with open(path) as fh:
            for r in map(json.loads, fh):
                if r.get("bench") == "step_time" and "error" not in r and "ms_per_step" in r:
                    rows[(r["workload"], r["backend"])] = r
    return rows


def _epoch_rows(paths):
    rows = {}
    for path in paths:
        with open(path) as fh:
            for r in json.load(fh)["rows"]:
                if "vs_torch_fused" in r:
                    rows[(r["workload"], r["backend"])] = r
    return rows


def table(step_paths, epoch_paths) -> str:
    """The Markdown table (header, separator, a row per workload in first-seen
    order) from bench/step_time.py's ``.jsonl`` files ``step_paths`` and
    bench/epoch_time.py's ``.json`` files ``epoch_paths``; ratios are PyTorch's
    time over ours (dimensionless, ``1.37x``), times in milliseconds (warm-up
    in seconds). Failed rows are skipped, PyTorch's give its time; OSError or
    ValueError for a file that cannot be read as JSON."""
    steps, epochs = _step_rows(step_paths), _epoch_rows(epoch_paths)
    x = lambda r, key, fmt="{:.2f}x": "" if r is None or r.get(key) is None else fmt.format(r[key])
    ms = lambda v: "" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2f}"    # noqa: E731
    out = ["| workload | numba ms/step | PyTorch ms/step | numba per step | numpy per step | numba per epoch "
           "| numpy per epoch | numba x its GEMMs alone | GEMMs alone ms | FLOP floor ms | numba warm-up s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in dict.fromkeys(k[0] for k in list(steps) + list(epochs)):
        s = {b: steps.get((w, b)) for b in ("numba", "numpy")}
        e = {b: epochs.get((w, b)) for b in ("numba", "numpy")}
        torch = min((r["ms_per_step"] for (wk, b), r in steps.items() if wk == w and b.startswith("torch")),
                    default=None)
        n = s["numba"]
        out.append(f"| {w} | {ms(n and n['ms_per_step'])} | {ms(torch)} | "
                   f"{x(n, 'speedup_vs_torch')} | {x(s['numpy'], 'speedup_vs_torch')} | "
                   f"{x(e['numba'], 'vs_torch_fused')} | {x(e['numpy'], 'vs_torch_fused')} | "
                   f"{x(n, 'x_gemm_only', '{:.2f}')} | {ms(n and n.get('gemm_only_ms'))} | "
                   f"{ms(n and n.get('flops_floor_ms'))} | {x(n, 'warmup_s', '{:.2f}')} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", nargs="*", default=[])
    ap.add_argument("--epochs", nargs="*", default=[])
    a = ap.parse_args()
    print(table(a.steps, a.epochs))


if __name__ == "__main__":
    main()
