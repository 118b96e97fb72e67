"""Kingma et al. 2016's MNIST comparison, reduced to this machine: the IWAE objective and the IAF posterior
against the plain VAE, at 5 and 10 epochs, on the shared MNIST.

    python bench/objectives_mnist.py [--epochs 5 10] [--backend numba] [--runs /tmp/fastvae-objectives]

Trains 784-400-20 (ReLU, Bernoulli, batch 128, Adam lr 1e-3, seed 0) with the ELBO, with ``--objective iwae
--iwae-k 5``, with ``--posterior iaf --flows 2`` (MADE hidden 200, the encoder's context h fed to each step),
the same without the context (``--no-flow-context``), and IAF with IWAE; each run trained to the first length,
scored, then resumed to the next (a resume follows the uninterrupted trajectory bit for bit). Scores: the
importance-weighted -log p(x) at k = 1000 on the first 1000 test images (``fastvae eval --iwae-k 1000
--iwae-images 1000``), nats. Writes ``bench/results/objectives_mnist.json``: per length, each run's score, test
-ELBO and seconds per epoch, and each variant's gain over the plain VAE and its step cost relative to it.
"""

import argparse
import csv
import json
import os
import sys

from common import fv

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "mnist"))


RUNS = (("elbo", []), ("iwae5", ["--objective", "iwae", "--iwae-k", "5"]),
        ("iaf2", ["--posterior", "iaf", "--flows", "2"]),
        ("iaf2_no_context", ["--posterior", "iaf", "--flows", "2", "--no-flow-context"]),
        ("iaf2_iwae5", ["--posterior", "iaf", "--flows", "2", "--objective", "iwae", "--iwae-k", "5"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--runs", default="/tmp/fastvae-objectives")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz")):
        sys.exit(f"skipped: no MNIST in {DATA}")
    out = {"settings": {"epochs": a.epochs, "backend": a.backend, "hidden": 400, "latent": 20, "batch_size": 128,
                        "lr": 1e-3, "seed": 0, "flow_hidden": 200, "score": "IWAE k=1000, first 1000 test images"}}
    for name, extra in RUNS:
        run = os.path.join(a.runs, name)
        for n, epochs in enumerate(sorted(a.epochs)):
            if n == 0:
                fv("train", "--dataset", "mnist", "--data-dir", DATA, "--hidden", "400", "--latent", "20",
                   "--epochs", epochs, "--batch-size", "128", "--lr", "1e-3", "--seed", "0", "--backend", a.backend,
                   "--no-progress", "--force", "--out", run, *extra)
            else:
                fv("train", "--resume", run, "--out", run, "--epochs", epochs, "--backend", a.backend, "--no-progress")
            res = json.loads(fv("eval", run, "--iwae-k", "1000", "--iwae-images", "1000", "--json", "--no-progress"))
            with open(os.path.join(run, "metrics.csv")) as f:
                rows = list(csv.DictReader(f))
            at = out.setdefault(f"epochs_{epochs}", {})
            at[name] = {"iwae_k1000_nll_1000_test": res["iwae_neg_log_likelihood"], "test_neg_elbo": res["neg_elbo"],
                        "active_units": res["active_units"],
                        "seconds_per_epoch": sum(float(r["seconds"]) for r in rows) / len(rows)}
            print(epochs, name, at[name], flush=True)
    for epochs in a.epochs:
        at = out[f"epochs_{epochs}"]
        for name, _ in RUNS[1:]:
            at[f"{name}_gain_nats"] = at["elbo"]["iwae_k1000_nll_1000_test"] - at[name]["iwae_k1000_nll_1000_test"]
            at[f"{name}_step_cost_vs_elbo"] = at[name]["seconds_per_epoch"] / at["elbo"]["seconds_per_epoch"]
    path = os.path.join(HERE, "results", "objectives_mnist.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
