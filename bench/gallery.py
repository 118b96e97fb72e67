"""The README gallery: what the models learn, made by fastvae's own commands.

    python bench/gallery.py [--runs /tmp/fastvae-gallery] [--backend numba] [--only mnist2d conv_mnist2d ...]

Trains (unless the run folder already holds a checkpoint) and draws:
  * MNIST, 784-400-2: the 2-D latent map and a 20x20 latent grid;
  * MNIST, the seed's ConvNet with latent 2 (--arch conv): the latent map and grid;
  * sprites, 4096-400-10, beta 1 and beta 4: traversals (rows sorted by KL) and MIG;
  * Olivetti faces, 4096-400-50: a spherical morph between two test faces (GIF);
  * the sprites and Olivetti runs again on the Burgess et al. 2018 ConvNet (--arch conv; names conv_*).
Writes small PNG/GIF files to docs/gallery/ (the documentation site shows them) and prints each command.
"""

import argparse
import json
import os
import shutil

from common import fv as _fv


def fv(*args, capture=False):
    return _fv(*args, capture=capture)


HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))
OUT = os.path.join(HERE, os.pardir, "docs", "gallery")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="/tmp/fastvae-gallery")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--only", nargs="*", help="make only these runs' pictures (default: all)")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    R = lambda n: os.path.join(a.runs, n)
    runs = {
        "mnist2d": ["--dataset", "mnist", "--data-dir", os.path.join(DATA, "mnist"), "--hidden", "400",
                    "--latent", "2", "--epochs", "20"],
        "conv_mnist2d": ["--dataset", "mnist", "--data-dir", os.path.join(DATA, "mnist"), "--arch", "conv",
                         "--latent", "2", "--epochs", "10"],
        "sprites_b1": ["--latent", "10", "--epochs", "30", "--beta", "1"],
        "sprites_b4": ["--latent", "10", "--epochs", "30", "--beta", "4"],
        "olivetti": ["--dataset", "olivetti", "--data-dir", os.path.join(DATA, "olivetti"), "--hidden", "400",
                     "--latent", "50", "--epochs", "400", "--batch-size", "64"],
    }
    # the same sprites and faces runs on the Burgess et al. 2018 ConvNet (--arch conv on 64x64 inputs)
    for name in ("sprites_b1", "sprites_b4", "olivetti"):
        args = [x for x in runs[name]]
        if "--hidden" in args:
            i = args.index("--hidden")
            del args[i:i + 2]
        runs["conv_" + name] = args + ["--arch", "conv"]
    want = lambda name: not a.only or name in a.only
    for name, args in runs.items():
        if want(name) and not os.path.exists(os.path.join(R(name), "checkpoint.h5")):
            fv("train", *args, "--backend", a.backend, "--out", R(name), "--no-progress")
    fig = lambda run, f: os.path.join(R(run), "figures", f)
    for run, prefix in (("mnist2d", "mnist"), ("conv_mnist2d", "conv_mnist")):
        if want(run):
            fv("plot", R(run), "--grid", "20")
            shutil.copy(fig(run, "latent_map.png"), os.path.join(OUT, f"{prefix}_latent_map.png"))
            shutil.copy(fig(run, "latent_grid.png"), os.path.join(OUT, f"{prefix}_latent_grid.png"))
    for p in ("", "conv_"):
        scores = {}
        for b in ("b1", "b4") if want(f"{p}sprites_b1") and want(f"{p}sprites_b4") else ():
            run = f"{p}sprites_{b}"
            fv("plot", R(run))
            shutil.copy(fig(run, "traversals.png"), os.path.join(OUT, f"{p}sprites_traversals_{b}.png"))
            res = json.loads(fv("eval", os.path.join(R(run), "checkpoint.h5"), "--json", capture=True))
            scores[b] = {k: res[k] for k in ("neg_elbo", "recon", "kl", "active_units", "mig")}
        if scores:
            with open(os.path.join(OUT, f"{p}sprites_scores.json"), "w") as f:
                json.dump(scores, f, indent=2)
            print(json.dumps(scores, indent=2))
        if want(f"{p}olivetti"):
            fv("interpolate", os.path.join(R(f"{p}olivetti"), "checkpoint.h5"), "0", "7", "--steps", "16",
               "--scale", "2", "--gif", os.path.join(OUT, f"{p}olivetti_morph.gif"),
               "--png", os.path.join(OUT, f"{p}olivetti_morph.png"))
            _inpainted_faces(R(f"{p}olivetti"), os.path.join(OUT, f"{p}olivetti_inpaint.png"))
    _shrink(OUT, PREFIXES)


def _inpainted_faces(run, path, n=4):
    """The first ``n`` test faces with their lower half filled by ``iw`` (fastvae.explore.inpainting),
    the training mean image as the start."""
    import numpy as np
    import fastvae
    from fastvae.explore import inpainting
    model = fastvae.load(run)
    data = fastvae.datasets.load(fastvae.DataConfig.from_dict(model.checkpoint["data"]))
    shape = model.config.image_shape
    inpainting.plot_inpainting(model, data.x_test[:n], inpainting.make_mask("bottom", shape), shape,
                               init=np.asarray(data.x_train, dtype=np.float64).mean(0), path=path)
    print("wrote", path)


# the pictures this script writes; the folder also holds others' (tcvae_dsprites.py), left as they are
PREFIXES = ("mnist_", "conv_mnist_", "sprites_", "conv_sprites_", "olivetti_", "conv_olivetti_")


def _shrink(folder, prefixes, max_side=480):
    """Keep the committed pictures small: downscale this script's PNGs wider than max_side."""
    from PIL import Image
    for f in os.listdir(folder):
        if f.endswith(".png") and f.startswith(prefixes):
            p = os.path.join(folder, f)
            with Image.open(p) as im:
                if max(im.size) > max_side:
                    k = max_side / max(im.size)
                    im = im.convert("RGB").resize((int(im.width * k), int(im.height * k)), Image.Resampling.LANCZOS)
                    im.save(p, optimize=True)


if __name__ == "__main__":
    main()
