"""beta-VAE against beta-TCVAE on the built-in sprites with the ConvNet (issue 15).

    python bench/tcvae_sprites.py [--epochs 10] [--beta 6] [--batch-size 128] [--backend numba] [--runs /tmp/fastvae-tcvae]

Trains ``--arch conv --latent 10`` at the same beta, seed and epochs with the
ELBO (beta-VAE) and with ``--objective btcvae``; reports test -ELBO, MIG
(Chen et al. 2018) and, for beta-TCVAE, MI / TC / dimension-wise KL; writes
``bench/results/tcvae_sprites[_bB][_warmupW].json`` and both traversal figures to
``docs/gallery/tcvae_traversals_{betavae,btcvae}[_bB][_warmup].png``
(``_bB`` when the batch size B is not 128).
"""

import argparse
import json
import os
import shutil

from common import fv

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--beta", type=float, default=6.0)
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--runs", default="/tmp/fastvae-tcvae")
    ap.add_argument("--warmup", type=float, default=0.0, help="epochs of a linear beta warm-up (both runs)")
    a = ap.parse_args()
    out = {"settings": {"epochs": a.epochs, "beta": a.beta, "backend": a.backend, "arch": "conv", "latent": 10,
                        "seed": 0, "beta_warmup_epochs": a.warmup, "batch_size": a.batch_size}}
    btag = "" if a.batch_size == 128 else f"_b{a.batch_size}"
    warm = ["--beta-schedule", "linear", "--beta-warmup", a.warmup] if a.warmup else []
    for name, extra in (("betavae", []), ("btcvae", ["--objective", "btcvae"])):
        run = os.path.join(a.runs, name)
        fv("train", "--arch", "conv", "--latent", "10", "--epochs", a.epochs, "--beta", a.beta, "--seed", "0",
           "--batch-size", a.batch_size, "--backend", a.backend, "--no-progress", "--force", "--out", run, *warm, *extra)
        res = json.loads(fv("eval", run, "--json"))
        out[name] = {k: res[k] for k in res if k in ("neg_elbo", "recon", "kl", "active_units", "mig")
                     or k.startswith("btcvae_")}
        fv("plot", run, "--grid", "3", "--n", "2")
        shutil.copy(os.path.join(run, "figures", "traversals.png"),
                    os.path.join(HERE, os.pardir, "docs", "gallery", f"tcvae_traversals_{name}{btag}{'_warmup' if a.warmup else ''}.png"))
        print(name, out[name], flush=True)
    tag = btag + (f"_warmup{a.warmup:g}" if a.warmup else "")
    with open(os.path.join(HERE, "results", f"tcvae_sprites{tag}.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
