"""Training-step speed of every available backend against PyTorch, with the
GEMM-only floor, on the five standard workloads or your own (see fastvae/bench/workloads.py).

    python bench/step_time.py [--seconds 3] [--threads N] [--workloads ...] [--name cpu]

Writes bench/results/<name>.jsonl and bench/results/<name>.md (the table the
README quotes). Same as `fastvae bench --out bench/results`.
"""

import os
import sys

from fastvae.cli import main

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", os.path.join(here, "results")]
    raise SystemExit(main(["bench", *args]))
