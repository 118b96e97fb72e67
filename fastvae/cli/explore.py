"""The ``fastvae`` commands on a finished run's data: ``plot`` and
``interpolate``, and the run's data for ``eval`` (the checkpoint's data
config, binarized as the run trained). Dispatched by :mod:`fastvae.cli`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from fastvae.errors import ConfigError
from fastvae.cli.args import _finite, _positive, check_data_dir, checkpoint_arg, out_folder


def _trained(model, setting, default=None):
    """A loaded run's recorded training setting (its checkpoint's train config)."""
    return model.checkpoint.get("train", {}).get(setting, default)


def _run_data(model, dataset=None, data_dir=None, splits=("train", "test")):
    """The dataset of a loaded run (its checkpoint's data config), or
    ``dataset`` / ``data_dir`` instead; the run's --image-size and --color
    follow only to another folder of images."""
    from fastvae import datasets
    from fastvae.config import DataConfig
    from fastvae.explore.evaluation import binarized_splits
    from fastvae.io.restore import data_change_note
    recorded = DataConfig.from_dict(model.checkpoint["data"])
    check_data_dir(dataset or recorded.dataset, data_dir)     # before any data loads
    cfg = datasets.given(dataset, recorded)[1] if dataset else recorded
    cfg = cfg.replace(data_dir=data_dir) if data_dir else cfg
    data = datasets.load(cfg, splits=splits)
    note = data_change_note(model.checkpoint, data) if cfg.dataset == recorded.dataset else ""   # the run's data
    if note:
        print(f"fastvae: note: {note}", file=sys.stderr)
    if _trained(model, "binarize"):      # scored as it trained: on binary images
        data = binarized_splits(data, model.config, splits)
    return data


def _load_for_explore(ckpt, dataset=None, data_dir=None, backend=None):
    from fastvae import load
    model = load(checkpoint_arg(ckpt), backend=backend)
    return model, _run_data(model, dataset, data_dir)


def _split_images(data, split):
    """``(x, y)`` of ``split``; the train split when the dataset has no test split."""
    return data.split(split if split == "train" or data.x_test is not None else "train")


def _image_shape(model, data):
    from fastvae.datasets.arrayfiles import image_shape_of
    return model.config.image_shape or data.image_shape or image_shape_of(data.x_train.shape, data.name)


def _cmd_plot(a):
    from fastvae import explore
    from fastvae.checks import check_images
    from fastvae.explore.evaluation import units
    for flag, value in (("--n", a.n), ("--grid", a.grid), ("--max-dims", a.max_dims)):
        _positive(flag, value)
    ckpt = checkpoint_arg(a.run)
    model, data = _load_for_explore(ckpt, a.dataset, a.data_dir, a.backend)
    x, y = _split_images(data, a.split)
    check_images(x, model.config, f"{a.split} images")
    L = model.config.latent_dim
    if a.dims:                # before any figure is written (an error came after three of them)
        if L < 2:
            raise ConfigError(f"--dims picks the latent grid's plane, but latent_dim is {L}: no grid; drop --dims")
        explore.check_grid_dims(a.dims, L)
    if L >= 2:
        explore.check_grid_memory(model, a.grid)
    shape = _image_shape(model, data)
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(ckpt)), "figures")
    out_folder(out, "plot writes its figures")
    f = lambda name: os.path.join(out, name)
    written = []

    def save(name, fn, *args, **kw):
        fn(*args, path=f(name), **kw)
        written.append(name)

    save("reconstructions.png", explore.plot_reconstructions, model, x, shape, n=2 * a.n)
    save("samples.png", explore.plot_samples, model, shape)
    save("latent_map.png", explore.plot_latent_map, model, x, y, data.label_names)
    if L >= 2:
        dims = tuple(a.dims) if a.dims else (0, 1)
        pca = None if (a.dims or L == 2) else model.codes(x[:5000])
        save("latent_grid.png", explore.plot_latent_grid, model, shape, n=a.grid, dims=dims, spacing=a.spacing,
             pca_codes=pca)
    save("traversals.png", explore.plot_traversals, model, shape, X=x[:5000], max_dims=min(L, a.max_dims))
    recon, kl = explore.per_image_elbo(model, x, seed=_trained(model, "seed", 0))  # as eval
    losses = recon + kl
    best, worst = explore.best_and_worst(losses, a.n)
    save("best_worst.png", explore.plot_best_worst, model, x, losses, shape, n=a.n)
    per = units(model.config.likelihood, short=True)
    save("loss_histogram.png", explore.plot_loss_histogram, losses, xlabel=f"-ELBO ({per})",
         marks={"best": losses[best[0]], "median": float(np.median(losses)), "worst": losses[worst[0]]})
    kld = explore.kl_per_dim(model, x)
    _, var = explore.active_units(model, x)
    save("kl_per_dim.png", explore.plot_kl_per_dim, kld, var, flows=model.config.flows)
    if model.checkpoint["history"]:
        save("loss_curves.png", explore.plot_loss, model.checkpoint["history"], units=per)
    if len(x) >= 2:
        save("interpolation.png", explore.plot_interpolation, model, x[0], x[1], shape)
        frames = explore.interpolation_frames(model, x[0], x[1], 24, "spherical")
        explore.save_gif(frames, shape, f("interpolation.gif"))
        written.append("interpolation.gif")
    from fastvae.explore import inpainting
    n = min(8, len(x))
    mask = inpainting.make_mask("bottom", shape)
    init = np.asarray(data.x_train[:], dtype=np.float64).mean(0) if data.x_train is not None else None
    save("inpainting.png", inpainting.plot_inpainting, model, x[:n], mask, shape, init=init,
         seed=_trained(model, "seed", 0))
    print(f"wrote {len(written)} figures to {out}: {', '.join(written)}")
    return 0


def _pick_image(spec, data, split, shape):
    """An image file (resized to the model's image size) or an index into the split."""
    from fastvae.errors import DataError
    x, _ = _split_images(data, split)
    if spec.lstrip("-").isdigit():
        i = int(spec)
        if not -len(x) <= i < len(x):
            raise DataError(f"index {i} is outside the {split} split ({len(x)} images); pick 0..{len(x) - 1}")
        return x[i]
    if not os.path.exists(spec):
        raise DataError(f"{spec} is neither an image file nor an index into the dataset")
    from fastvae.io.safe_files import read_image
    mode = "L" if len(shape) == 2 or shape[2] == 1 else {3: "RGB", 4: "RGBA"}.get(shape[2])
    if mode is None:
        raise DataError(f"the model's images have {shape[2]} channels; an image file cannot give them, pass an index")
    arr = read_image(spec, mode, shape[:2], "pass an image file or an index", DataError)
    return arr.reshape(-1) / 255.0


def _cmd_interpolate(a):
    from fastvae import explore
    if not (a.gif or a.png):
        raise ConfigError("say where to write the result: --gif OUT.gif and/or --png OUT.png")
    _positive("--scale", a.scale)
    model, data = _load_for_explore(a.checkpoint, a.dataset, a.data_dir, a.backend)
    shape = _image_shape(model, data)
    xa = _pick_image(a.a, data, a.split, shape)
    xb = _pick_image(a.b, data, a.split, shape)
    if a.gif:
        frames = explore.interpolation_frames(model, xa, xb, a.steps, a.mode)
        n = explore.save_gif(frames, shape, a.gif, scale=a.scale)
        merged = "; identical frames shown as one" if n < 2 * a.steps - 2 else ""      # Pillow merges them
        print(f"wrote {a.gif}: {n} frame{'s' * (n != 1)} ({a.steps} steps, {a.mode}, played forth and back{merged})")
    if a.png:
        explore.plot_interpolation(model, xa, xb, shape, steps=min(a.steps, 12), path=a.png)
        print(f"wrote {a.png}")
    return 0


def _cmd_inpaint(a):
    """``fastvae inpaint RUN IMAGE... --mask SPEC``: every input checked, the
    fills computed, then the pictures written (nothing is written on an error)."""
    import json
    from fastvae import explore
    from fastvae.explore import inpainting
    for flag, value in (("--steps", a.steps), ("--samples", a.samples), ("--scale", a.scale)):
        _positive(flag, value)
    ckpt = checkpoint_arg(a.run)
    model, data = _load_for_explore(ckpt, a.dataset, a.data_dir, a.backend)
    shape = _image_shape(model, data)
    mask = inpainting.make_mask(a.mask, shape, seed=a.seed)
    x = np.stack([_pick_image(spec, data, a.split, shape) for spec in a.images])
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(ckpt)), "figures")
    mean_image = np.asarray(data.x_train[:], dtype=np.float64).mean(0)
    kw = dict(steps=a.steps, samples=a.samples, seed=a.seed, init=mean_image)
    fills = inpainting.inpaint(model, x, mask, method=a.method, **kw)
    if a.json:
        res = inpainting.scores(model, x, mask, fills, x_train=data.x_train[:])
        res.update(method=a.method, mask=a.mask, images=list(a.images),
                   units={"nll": "nats per image over the missing pixels", "mse": "per missing pixel"})
        print(json.dumps(_finite(res), allow_nan=False))
    out_folder(out, "inpaint writes its pictures")
    written = []
    for spec, xi in zip(a.images, x):
        tag = os.path.splitext(os.path.basename(spec))[0] if not spec.lstrip("-").isdigit() else spec
        name = f"inpaint_{a.method}_{tag}.png"
        inpainting.plot_inpainting(model, xi[None, :], mask, shape, method=a.method, path=os.path.join(out, name),
                                   **kw)
        written.append(name)
        if a.method == "gibbs":
            frames = inpainting.chain_frames(model, xi, mask, steps=a.steps, seed=a.seed, init=mean_image)
            explore.save_gif(frames, shape, os.path.join(out, f"inpaint_gibbs_{tag}.gif"), scale=a.scale,
                             bounce=False)
            written.append(f"inpaint_gibbs_{tag}.gif")
    print(f"wrote {len(written)} pictures to {out}: {', '.join(written)}", file=sys.stderr if a.json else sys.stdout)
    return 0
