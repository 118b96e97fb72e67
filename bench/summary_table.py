"""The README's table of the latest figures, from step_time and epoch_time runs.

    python bench/summary_table.py --steps bench/results/cpu_zen5_session2.jsonl \\
        bench/results/cpu_zen5_session2_4096.jsonl bench/results/conv_zen5_session2.jsonl \\
        --epochs bench/results/epoch_zen5_session2.json

One row per workload, in the order the files name them: the Numba and NumPy
backends' ratios to PyTorch with fused Adam per training step (``vs PyTorch``
of bench/step_time.py: PyTorch's faster Adam in the same run) and per epoch
on real MNIST (``vs_torch_fused`` of bench/epoch_time.py), and the Numba
step over its own GEMMs alone. A workload in several step files takes the
last; an empty cell: not measured.
"""

import argparse
import json


def _step_rows(paths):
    rows = {}
    for path in paths:
        with open(path) as fh:
            for r in map(json.loads, fh):
                if r.get("bench") == "step_time" and "error" not in r and "speedup_vs_torch" in r:
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
    time over ours (dimensionless, ``1.37x``), the last column Numba's step time
    over the replay of its GEMMs alone. Failed rows and PyTorch's own are
    skipped; OSError or ValueError for a file that cannot be read as JSON."""
    steps, epochs = _step_rows(step_paths), _epoch_rows(epoch_paths)
    x = lambda r, key, fmt="{:.2f}x": "" if r is None or r.get(key) is None else fmt.format(r[key])
    out = ["| workload | numba per step | numpy per step | numba per epoch | numpy per epoch "
           "| numba x its GEMMs alone |", "|---|---|---|---|---|---|"]
    for w in dict.fromkeys(k[0] for k in list(steps) + list(epochs)):
        s = {b: steps.get((w, b)) for b in ("numba", "numpy")}
        e = {b: epochs.get((w, b)) for b in ("numba", "numpy")}
        out.append(f"| {w} | {x(s['numba'], 'speedup_vs_torch')} | {x(s['numpy'], 'speedup_vs_torch')} | "
                   f"{x(e['numba'], 'vs_torch_fused')} | {x(e['numpy'], 'vs_torch_fused')} | "
                   f"{x(s['numba'], 'x_gemm_only', '{:.2f}')} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", nargs="*", default=[])
    ap.add_argument("--epochs", nargs="*", default=[])
    a = ap.parse_args()
    print(table(a.steps, a.epochs))


if __name__ == "__main__":
    main()
