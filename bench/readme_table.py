"""The README's training-step table, from two step_time runs.

    python bench/readme_table.py [bench/results/cpu.jsonl] [bench/results/cpu_rerun.jsonl]

One row per fastvae backend (and GEMM library) and one for the faster PyTorch
Adam of the first run; the last column is the same row in the second run.
"""

import json
import os
import sys

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def rows(path):
    with open(path) as fh:
        return [r for r in map(json.loads, fh) if r.get("bench") == "step_time" and "error" not in r]


def table(first, second):
    again = {(r["workload"], r["backend"]): r for r in second}
    f = lambda v, p=2: "" if v is None else f"{v:,.{p}f}"
    out = ["| workload | backend | ms/step (quartiles) | images/s | vs PyTorch (its faster Adam) | GEMMs alone ms "
           "| x GEMMs alone | FLOP floor ms | warm-up s | second run: ms/step, vs PyTorch |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for w in dict.fromkeys(r["workload"] for r in first):
        group = [r for r in first if r["workload"] == w]
        torch = [r for r in group if r["backend"].startswith("torch")]
        keep = [r for r in group if not r["backend"].startswith("torch")]
        keep += [min(torch, key=lambda r: r["ms_per_step"])] if torch else []
        for r in keep:
            name = r["backend"]
            if name.startswith("torch-"):
                name = f"PyTorch ({name[len('torch-'):]})"
            r2 = again.get((w, r["backend"]))
            taken2 = "\u2020" if r2 and r2.get("taken_core") else ""
            second_col = f"{f(r2['ms_per_step'])}{taken2}, {f(r2.get('speedup_vs_torch'))}x" if r2 else ""
            taken = "\u2020" if r.get("taken_core") else ""
            out.append(f"| {w} | {name} | {f(r['ms_per_step'])}{taken} ({f(r['ms_p25'])}-{f(r['ms_p75'])}) | "
                       f"{f(r['images_per_s'], 0)} | {f(r.get('speedup_vs_torch'))}x | {f(r.get('gemm_only_ms'))} | "
                       f"{f(r.get('x_gemm_only'))} | {f(r.get('flops_floor_ms'))} | {f(r['warmup_s'])} | "
                       f"{second_col} |")
    return "\n".join(out)


if __name__ == "__main__":
    a = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "cpu.jsonl")
    b = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "cpu_rerun.jsonl")
    print(table(rows(a), rows(b)))
