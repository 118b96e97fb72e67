"""Quality on real MNIST: fastvae vs a PyTorch twin at the same settings.

784-400-20 ReLU (``--arch conv``: the seed's ConvNet, latent 20), Bernoulli
likelihood on continuous pixels, batch 128, Adam lr 1e-3, 10 epochs, beta 1,
identical initial weights, the 24,000-image training file and the
10,000-image test set in ../shared/data/mnist.

    python bench/quality_mnist.py [--arch mlp|conv] [--backend numpy] [--epochs 10] [--out FILE]

(default FILE: bench/results/quality_mnist.json, or conv_mnist.json for conv)

Prints and writes one JSON object: test -ELBO (nats per image) of both, their
difference, and the training seconds of each (same machine, same run).
"""

import argparse
import datetime
import json
import os
import platform
import sys

import numpy as np

import fastvae
from fastvae import DataConfig, ModelConfig, TrainConfig, Trainer, datasets

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "mnist"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="mlp", choices=["mlp", "conv"])
    ap.add_argument("--out")
    a = ap.parse_args()
    a.out = a.out or os.path.join(HERE, "results", "conv_mnist.json" if a.arch == "conv" else "quality_mnist.json")
    if not os.path.exists(a.data_dir):
        print(f"skipped: MNIST not found in {a.data_dir}", file=sys.stderr)
        return 0
    import torch
    from fastvae.bench import torch_twin as torch_ref
    ds = datasets.load(DataConfig(dataset="mnist", data_dir=a.data_dir, download=False))
    mc = ModelConfig(input_dim=784, hidden=[400], latent_dim=20, image_shape=(28, 28), arch=a.arch)
    tc = TrainConfig(epochs=a.epochs, batch_size=128, lr=1e-3, seed=a.seed)
    t = Trainer(mc, tc, DataConfig(dataset="mnist", data_dir=a.data_dir), dataset=ds, progress=False,
                settings=fastvae.RunSettings(backend=a.backend))
    init = fastvae.VAE(mc, seed=a.seed)
    t.fit(pictures=False)
    ours = t.history[-1]
    ref = torch_ref.train_reference(mc, ds.x_train, ds.x_test, epochs=a.epochs, batch_size=128, lr=1e-3,
                                    seed=a.seed, init_from=init)
    res = {
        "bench": "quality_mnist", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "numpy": np.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "fastvae": fastvae.__version__, "backend": a.backend, "arch": a.arch, "epochs": a.epochs,
        "train_images": int(ds.x_train.shape[0]), "test_images": int(ds.x_test.shape[0]),
        "fastvae_test_neg_elbo": ours["test_neg_elbo"], "torch_test_neg_elbo": ref["test_neg_elbo"],
        "difference_nats": ours["test_neg_elbo"] - ref["test_neg_elbo"],
        "fastvae_train_seconds": sum(h["seconds"] for h in t.history), "torch_train_seconds": ref["seconds"],
        "fastvae_epoch_seconds": [h["seconds"] for h in t.history],
        "speedup_vs_torch": ref["seconds"] / sum(h["seconds"] for h in t.history),
        "units": "nats per image; seconds",
    }
    print(json.dumps(res, indent=2))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
