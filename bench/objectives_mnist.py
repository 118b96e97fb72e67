"""The IWAE objective and the IAF posterior (and both) against the plain VAE on the shared MNIST (issue 15).

    python bench/objectives_mnist.py [--epochs 10] [--backend numba] [--runs /tmp/fastvae-objectives]

Trains 784-400-20 with the ELBO, with ``--objective iwae --iwae-k 5`` and with
``--posterior iaf --flows 2`` (MADE hidden 200) and with both (same seed, data,
epochs, batch 128, lr 1e-3), then scores each with the
importance-weighted -log p(x) at k = 1000 on the first 1000 test images
(``fastvae eval --iwae-k 1000 --iwae-images 1000``). Writes
``bench/results/objectives_mnist.json`` with the scores, the test -ELBO and
the seconds per epoch (so each step's cost relative to the plain step).
"""

import argparse
import csv
import json
import os
import sys

from common import fv

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "mnist"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--runs", default="/tmp/fastvae-objectives")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz")):
        sys.exit(f"skipped: no MNIST in {DATA}")
    out = {}
    for name, extra in (("elbo", []), ("iwae5", ["--objective", "iwae", "--iwae-k", "5"]),
                        ("iaf2", ["--posterior", "iaf", "--flows", "2"]),
                        ("iaf2_iwae5", ["--posterior", "iaf", "--flows", "2", "--objective", "iwae", "--iwae-k", "5"])):
        run = os.path.join(a.runs, name)
        fv("train", "--dataset", "mnist", "--data-dir", DATA, "--hidden", "400", "--latent", "20", "--epochs", a.epochs,
           "--batch-size", "128", "--lr", "1e-3", "--seed", "0", "--backend", a.backend, "--no-progress", "--force",
           "--out", run, *extra)
        res = json.loads(fv("eval", run, "--iwae-k", "1000", "--iwae-images", "1000", "--json", "--no-progress"))
        with open(os.path.join(run, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        out[name] = {"iwae_k1000_nll_1000_test": res["iwae_neg_log_likelihood"], "test_neg_elbo": res["neg_elbo"],
                     "active_units": res["active_units"],
                     "seconds_per_epoch": sum(float(r["seconds"]) for r in rows) / len(rows)}
        print(name, out[name], flush=True)
    for name in ("iwae5", "iaf2", "iaf2_iwae5"):
        out[f"{name}_gain_nats"] = out["elbo"]["iwae_k1000_nll_1000_test"] - out[name]["iwae_k1000_nll_1000_test"]
        out[f"{name}_step_cost_vs_elbo"] = out[name]["seconds_per_epoch"] / out["elbo"]["seconds_per_epoch"]
    out["settings"] = {"epochs": a.epochs, "backend": a.backend, "hidden": 400, "latent": 20, "batch_size": 128,
                       "lr": 1e-3, "seed": 0}
    path = os.path.join(HERE, "results", "objectives_mnist.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
