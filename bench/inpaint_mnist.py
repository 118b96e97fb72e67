"""Inpainting on the shared MNIST: each method against the two baselines.

    python bench/inpaint_mnist.py [--epochs 10] [--conv-epochs 5] [--images 1000] [--conv-images 200]

Trains 784-400-20 (``--epochs``) and the seed ConvNet (``--arch conv --latent
20``, ``--conv-epochs``) with the numba backend, seed 0, then for the masks
bottom, right, center:0.5 and random:0.5 fills the first ``--images`` test
images (``--conv-images`` for the ConvNet) with ``iw`` (K = 100), ``gibbs``
and ``mwg`` (50 steps each), and scores each fill and the baselines (the
training mean image; the nearest training image on the observed pixels):
masked-pixel negative log-likelihood (nats per image) and mean squared
error, with the seconds per image. Writes ``bench/results/inpaint_mnist.json``.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "mnist"))
MASKS = ("bottom", "right", "center:0.5", "random:0.5")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--conv-epochs", type=int, default=5)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--conv-images", type=int, default=200)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", default="/tmp/fastvae-inpaint")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz")):
        sys.exit(f"skipped: no MNIST in {DATA}")
    import fastvae
    from fastvae.explore import inpainting
    out = {"settings": vars(a), "units": {"nll": "nats per image over the missing pixels",
                                          "mse": "mean squared error per missing pixel",
                                          "seconds_per_image": "wall clock, numba backend, 2 cores"}}
    for name, kw, epochs, n in (("mlp", dict(hidden=[400]), a.epochs, a.images),
                                ("conv", dict(arch="conv"), a.conv_epochs, a.conv_images)):
        t = fastvae.train("mnist", data_dir=DATA, latent_dim=20, epochs=epochs, batch_size=128, lr=1e-3, seed=0,
                          backend="numba", out=os.path.join(a.runs, name), force=True, **kw)
        model = fastvae.load(os.path.join(a.runs, name))
        x, xt = t.data.x_test[:n], np.asarray(t.data.x_train[:], dtype=np.float64)
        shape = model.config.image_shape or (28, 28)
        res = {"epochs": epochs, "images": n, "test_neg_elbo": t.history[-1]["test_neg_elbo"]}
        for spec in MASKS:
            mask = inpainting.make_mask(spec, shape, seed=0)
            row = {}
            for method in ("iw", "gibbs", "mwg"):
                t0 = time.perf_counter()
                fill = inpainting.inpaint(model, x, mask, method=method, steps=a.steps, samples=a.samples,
                                          init=xt.mean(0))
                secs = (time.perf_counter() - t0) / n
                sc = inpainting.scores(model, x, mask, fill, x_train=xt if method == "iw" else None)
                row[method] = {**sc["fill"], "seconds_per_image": secs}
                if method == "iw":
                    row["mean_image"], row["nearest_image"] = sc["mean_image"], sc["nearest_image"]
            res[spec] = row
            print(name, spec, json.dumps(row), flush=True)
        out[name] = res
    path = os.path.join(HERE, "results", "inpaint_mnist.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
