"""Chen et al. 2018's dSprites comparison (beta-VAE against beta-TCVAE, MIG), reduced to this machine.

    python bench/tcvae_dsprites.py [--seeds 0 1 2] [--epochs 20] [--n-sprites 12000] [--beta 6] [--batch-size 256]
                                   [--estimator mss] [--no-anneal] [--backend numba] [--runs /tmp/fastvae-dsprites]

The paper's settings (Chen, Li, Grosse & Duvenaud 2018, Sec. 6 and the official code rtqichen/beta-tcvae,
``vae_quant.py``): the MLP encoder 4096-1200-1200-2L with ReLU, the decoder L-1200-1200-1200-4096 with tanh,
L = 10, Bernoulli pixels, beta 6, batch 2048, Adam lr 1e-3, the minibatch-stratified estimator, and the
official code's annealing (beta from 0 and the dimension-wise KL weight from 0.05, here over the first quarter
of the run: ``--beta-schedule linear --beta-warmup``, ``--dwkl-warmup``; ``--no-anneal`` drops it). Reductions,
for two CPU cores: the built-in sprites (dSprites' five factors on its grid, drawn at random: ``--n-sprites``
images, 90 % for training) instead of the 737,280 dSprites images; ``--epochs`` passes over them (the paper:
50 epochs of dSprites, about 18,000 steps); and batches of 256 (``--batch-size``), which give 840 steps in 20
epochs where batches of 2048 give 120 (at 2048 and 40 epochs, 240 steps, the beta-VAE had not learnt: test
-ELBO 444 nats, KL 2.0, one active unit).

Each seed trains the beta-VAE (``--objective elbo --beta 6``) and beta-TCVAE (``--objective btcvae``), then
scores MIG (Chen et al. eq. 6, 20 bins, on 10,000 new sprites from the generator: ``fastvae eval
--json``), test -ELBO and active units. Writes ``bench/results/tcvae_dsprites{tag}.json``: every seed's figures,
and per objective the mean and the sample standard deviation over seeds; and the first seed's traversals to
``docs/gallery/tcvae_traversals_{betavae,btcvae}{tag}.png``.
"""

import argparse
import json
import os
import shutil
import statistics

from common import fv

HERE = os.path.dirname(os.path.abspath(__file__))


def layers(L: int) -> list:
    """The official code's MLP VAE as fastvae layer specs."""
    dense = lambda name, units, act: {"type": "dense", "name": name, "units": units, "activation": act}  # noqa: E731
    return [dense("encoder.0", 1200, "relu"), dense("encoder.1", 1200, "relu"),
            {**dense("encoder.head", 2 * L, "identity"), "parts": ["mu", "logvar"]},
            {"type": "gaussian", "name": "sampler", "latent_dim": L},
            dense("decoder.0", 1200, "tanh"), dense("decoder.1", 1200, "tanh"), dense("decoder.2", 1200, "tanh"),
            dense("decoder.out", 4096, "identity"),
            {"type": "likelihood", "name": "likelihood", "kind": "bernoulli", "sigma": 0.1}]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--n-sprites", type=int, default=12000)
    ap.add_argument("--beta", type=float, default=6.0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--estimator", default="mss", choices=["mss", "mws"])
    ap.add_argument("--no-anneal", dest="anneal", action="store_false",
                    help="without the official code's beta and dimension-wise KL warm-up")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--runs", default="/tmp/fastvae-dsprites")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    a = ap.parse_args()
    os.makedirs(a.runs, exist_ok=True)
    spec = os.path.join(a.runs, "layers.json")
    with open(spec, "w") as f:
        json.dump(layers(10), f)
    warm = max(a.epochs / 4, 1e-9)
    out = {"settings": {"paper": "Chen et al. 2018, dSprites MLP", "n_sprites": a.n_sprites, "epochs": a.epochs,
                        "beta": a.beta, "batch_size": a.batch_size, "lr": 1e-3, "latent": 10,
                        "estimator": a.estimator, "anneal_epochs": warm if a.anneal else 0, "seeds": a.seeds,
                        "backend": a.backend, "mig": "20 bins, 10,000 new sprites from the generator"},
           "runs": {}}
    for seed in a.seeds:
        for name, extra in (("betavae", ["--objective", "elbo"]),
                            ("btcvae", ["--objective", "btcvae", "--tc-estimator", a.estimator]
                             + (["--dwkl-warmup", warm] if a.anneal else []))):
            run = os.path.join(a.runs, f"{name}_s{seed}")
            anneal = ["--beta-schedule", "linear", "--beta-warmup", warm] if a.anneal else []
            fv("train", "--n-sprites", a.n_sprites, "--layers", spec, "--epochs", a.epochs, "--beta", a.beta,
               "--batch-size", a.batch_size, "--lr", "1e-3", "--seed", seed, "--backend", a.backend, "--no-progress",
               "--force", "--out", run, *anneal, *extra)
            res = json.loads(fv("eval", run, "--json"))
            keep = ("neg_elbo", "kl", "active_units", "mig", "mig_points", "btcvae_mi", "btcvae_tc", "btcvae_dwkl")
            out["runs"][f"{name}_s{seed}"] = {k: res[k] for k in keep if k in res}
            print(name, seed, out["runs"][f"{name}_s{seed}"], flush=True)
    for name in ("betavae", "btcvae"):
        migs = [out["runs"][f"{name}_s{s}"]["mig"] for s in a.seeds]
        out[name] = {"mig_mean": statistics.fmean(migs), "mig_sd": statistics.stdev(migs) if len(migs) > 1 else 0.0,
                     "mig_per_seed": migs}
    for name in ("betavae", "btcvae"):
        run = os.path.join(a.runs, f"{name}_s{a.seeds[0]}")
        fv("plot", run, "--grid", "3", "--n", "2")
        shutil.copy(os.path.join(run, "figures", "traversals.png"),
                    os.path.join(HERE, os.pardir, "docs", "gallery", f"tcvae_traversals_{name}{a.tag}.png"))
    path = os.path.join(HERE, "results", f"tcvae_dsprites{a.tag}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: out[k] for k in ("betavae", "btcvae")}, indent=2))


if __name__ == "__main__":
    main()
