"""What reading a checkpoint in the sandboxed HDF5 child costs the commands.

Times ``fastvae info``, ``fastvae eval`` and ``fastvae train --resume`` (one
more epoch) of one 784-400-20 MLP run on 2,000 random 28x28 images (the
sandbox's cost is per file opened, not per image), wall-clock per
command, for this checkout and, with ``--baseline DIR``, another checkout of
fastvae (a ``git worktree`` of the commit before), interleaved round by round
so both see the same machine. Prints a Markdown table of medians; writes
``bench/results/untrusted_read.json``.

    python bench/untrusted_read.py --baseline /tmp/base --rounds 7
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run(checkout, args, cwd):
    env = dict(os.environ, PYTHONPATH=checkout)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastvae", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="another fastvae checkout to time beside this one")
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    here = os.path.dirname(HERE)
    work = tempfile.mkdtemp()
    import numpy as np
    x = (np.random.default_rng(0).random((2000, 28, 28)) * 255).astype(np.uint8)
    np.save(os.path.join(work, "x.npy"), x)
    run(here, ["train", "--dataset", "x.npy", "--hidden", "400", "--latent", "20", "--epochs", "1",
               "--no-progress", "--out", "run"], work)
    ckpt = os.path.join(work, "run", "checkpoint.h5")
    checkouts = {"this": here, **({"baseline": os.path.abspath(a.baseline)} if a.baseline else {})}
    commands = {"info": ["info", ckpt], "eval": ["eval", ckpt, "--dataset", "x.npy"],
                "resume": ["train", "--resume", "RUN", "--epochs", "2", "--no-progress"]}
    times = {(c, k): [] for c in checkouts for k in commands}
    for _ in range(a.rounds):
        for name, checkout in checkouts.items():
            for k, args in commands.items():
                if k == "resume":
                    shutil.rmtree(os.path.join(work, "resumed"), ignore_errors=True)
                    shutil.copytree(os.path.join(work, "run"), os.path.join(work, "resumed"))
                    args = [s if s != "RUN" else os.path.join(work, "resumed", "checkpoint.h5") for s in args]
                times[(name, k)].append(run(checkout, args, work))
    med = {f"{c}/{k}": statistics.median(v) for (c, k), v in times.items()}
    print("| command | " + " | ".join(f"{c} s" for c in checkouts) + " |")
    print("|---|" + "---|" * len(checkouts))
    for k in commands:
        print(f"| {k} | " + " | ".join(f"{med[f'{c}/{k}']:.3f}" for c in checkouts) + " |")
    out = {"rounds": a.rounds, "median_s": med, "all_s": {f"{c}/{k}": v for (c, k), v in times.items()}}
    with open(os.path.join(HERE, "results", "untrusted_read.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
