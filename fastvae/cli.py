"""The ``fastvae`` command: train, eval, info, backends.

Errors a user can cause print one line ``fastvae: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

import numpy as np

from .errors import FastVAEError

# per-dataset defaults for options left unset
_DEFAULT_LATENT = {"sprites": 10, "olivetti": 50}
_MODEL_ARGS = ("hidden", "decoder_hidden", "latent", "activation", "likelihood", "sigma", "dtype", "init")
_TRAIN_ARGS = ("batch_size", "lr", "weight_decay", "adamw", "lr_schedule", "beta", "beta_schedule",
               "beta_delay", "beta_warmup", "beta_cycles", "binarize", "seed", "loss_every", "tf32",
               "clip_grad_norm")
_DATA_ARGS = ("dataset", "image_size", "color", "n_sprites", "no_download", "skip_other_files")


def _parser():
    p = argparse.ArgumentParser(prog="fastvae", description="Train and explore VAEs with hand-derived gradients.")
    p.add_argument("--version", action="version", version=f"fastvae {_version()}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    t = sub.add_parser("train", help="train a VAE (default: the built-in sprites)")
    d = t.add_argument_group("data")
    d.add_argument("--dataset", help="sprites (default), mnist, fashion-mnist, kmnist, olivetti, "
                   "or a path: a folder of images or an .npy/.npz/.h5 file")
    d.add_argument("--data-dir", help="folder holding the dataset files (idx files, olivetti_faces.npz)")
    d.add_argument("--no-download", action="store_true", default=None, help="never download missing files")
    d.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="resize folder images")
    d.add_argument("--color", choices=["grayscale", "rgb"], help="colour mode of folder images")
    d.add_argument("--n-sprites", type=int, help="number of procedural sprites (default 12000)")
    d.add_argument("--skip-other-files", action="store_true", default=None,
                   help="ignore files that are not images in an image folder")
    m = t.add_argument_group("model")
    m.add_argument("--hidden", type=int, nargs="*", help="encoder hidden widths (default: 400)")
    m.add_argument("--decoder-hidden", type=int, nargs="*", help="decoder hidden widths (default: mirror)")
    m.add_argument("--latent", type=int, help="latent_dim (default 20; 10 for sprites, 50 for olivetti)")
    m.add_argument("--activation", help="relu (default), tanh, leaky_relu, elu, softplus, sigmoid")
    m.add_argument("--likelihood", help="bernoulli (default), gaussian, mse")
    m.add_argument("--sigma", type=float, help="gaussian likelihood standard deviation (default 0.1)")
    m.add_argument("--dtype", help="float32 (default) or float64")
    m.add_argument("--init", help="pytorch (default) or xavier")
    o = t.add_argument_group("optimisation")
    o.add_argument("--backend", help="numpy (default); see `fastvae backends`")
    o.add_argument("--epochs", type=int, help="total epochs (default 10; also the target on --resume)")
    o.add_argument("--batch-size", type=int, help="images per step (default 128)")
    o.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    o.add_argument("--weight-decay", type=float, help="weight decay (default 0)")
    o.add_argument("--adamw", action="store_true", default=None, help="decoupled weight decay (AdamW)")
    o.add_argument("--lr-schedule", help="constant (default), step, cosine")
    o.add_argument("--beta", type=float, help="beta_max, the KL weight (default 1)")
    o.add_argument("--beta-schedule", help="constant (default), linear, sigmoid, cyclical")
    o.add_argument("--beta-delay", type=float, help="epochs at beta 0 before the ramp")
    o.add_argument("--beta-warmup", type=float, help="epochs of the ramp to beta_max")
    o.add_argument("--beta-cycles", type=int, help="cycles of the cyclical schedule (default 4)")
    o.add_argument("--binarize", action="store_true", default=None, help="dynamic binarization")
    o.add_argument("--seed", type=int, help="random seed (default 0)")
    o.add_argument("--threads", type=int, help="BLAS/Numba threads (default: all cores, measured fastest)")
    o.add_argument("--loss-every", type=int, help="compute the reported loss every N steps (default 1)")
    o.add_argument("--tf32", action="store_true", default=None, help="TF32 tensor-core GEMMs (cupy backend)")
    o.add_argument("--clip-grad-norm", type=float, help="clip the global gradient norm to this value")
    r = t.add_argument_group("run")
    r.add_argument("--out", help="run folder (default runs/<dataset>-<date>-<time>)")
    r.add_argument("--resume", metavar="CKPT", help="continue training from a checkpoint")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--force", action="store_true", help="write into an --out folder that is not a fastvae run")

    e = sub.add_parser("eval", help="-ELBO, reconstruction and KL of a checkpoint on a split")
    e.add_argument("checkpoint")
    e.add_argument("--dataset", help="default: the dataset the checkpoint was trained on")
    e.add_argument("--data-dir")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument("--batch-size", type=int, default=1000)
    e.add_argument("--seed", type=int, default=0, help="seed of the z samples")
    e.add_argument("--backend", help="default: the one that wrote the checkpoint, else numpy")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--iwae-k", type=int, nargs="?", const=5000, default=None, metavar="K",
                   help="add the importance-weighted -log p(x) with K samples (default 5000 when given)")
    e.add_argument("--iwae-images", type=int, metavar="N", help="IWAE on the first N images only")

    i = sub.add_parser("info", help="what a checkpoint holds")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")

    sub.add_parser("backends", help="list compute backends and whether they can run here")

    pl = sub.add_parser("plot", help="write every latent-space picture of a run into RUN/figures/")
    pl.add_argument("run", help="run folder (or its checkpoint.h5)")
    pl.add_argument("--dataset", help="default: the dataset the run was trained on")
    pl.add_argument("--data-dir")
    pl.add_argument("--split", default="test", choices=["train", "test"])
    pl.add_argument("--grid", type=int, default=15, help="latent grid size (default 15)")
    pl.add_argument("--dims", type=int, nargs=2, default=None, metavar=("I", "J"),
                    help="latent dims of the grid (default: the PCA plane when L > 2)")
    pl.add_argument("--spacing", default="quantile", choices=["quantile", "even"])
    pl.add_argument("--n", type=int, default=8, help="images in best/worst and reconstructions")
    pl.add_argument("--backend", help="default: the one that wrote the checkpoint, else numpy")
    pl.add_argument("--out", help="default: RUN/figures")

    ip = sub.add_parser("interpolate", help="morph one image into another through the latent space")
    ip.add_argument("checkpoint")
    ip.add_argument("a", help="image file or index into the dataset split")
    ip.add_argument("b", help="image file or index into the dataset split")
    ip.add_argument("--steps", type=int, default=24)
    ip.add_argument("--mode", default="spherical", choices=["linear", "spherical"])
    ip.add_argument("--gif", help="write an animated GIF here")
    ip.add_argument("--scale", type=int, default=4, help="GIF pixel upscaling (default 4)")
    ip.add_argument("--png", help="write the strip (linear and spherical) here")
    ip.add_argument("--dataset")
    ip.add_argument("--data-dir")
    ip.add_argument("--split", default="test", choices=["train", "test"])
    ip.add_argument("--backend")

    b = sub.add_parser("bench", help="time training steps of every backend against PyTorch")
    b.add_argument("--workloads", nargs="*", help="default: all of " + ", ".join(
        ["784-400-20/b128", "784-1000-2/b32", "784-1000-50/b4096", "4096-1000-50/b128"]))
    b.add_argument("--backends", nargs="*", help="default: every available backend")
    b.add_argument("--dtype", default="float32")
    b.add_argument("--seconds", type=float, default=3.0, help="timing budget per measurement")
    b.add_argument("--threads", type=int, help="BLAS/Numba threads (default: the libraries' default)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    b.add_argument("--gpu", action="store_true",
                   help="GPU mode: the cupy backend against PyTorch on the same GPU (eager fused Adam, "
                        "torch.compile reduce-overhead)")
    b.add_argument("--tf32", action="store_true", help="TF32 GEMMs for cupy (and torch) in GPU mode")
    b.add_argument("--out", help="folder for <name>.jsonl and <name>.md")
    b.add_argument("--name", default="cpu")
    return p


def _version():
    from . import __version__
    return __version__


RUN_FILES = {"checkpoint.h5", "config.json", "metrics.csv", "reconstructions.png", "samples.png", "loss.png",
             "figures", ".metrics.csv.tmp"}
EXIT_INTERRUPTED = 130


def _check_out_folder(out, force):
    """Refuse to write into a folder holding anything but a fastvae run."""
    from .errors import ConfigError
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file; choose a folder name")
    other = sorted(f for f in os.listdir(out) if f not in RUN_FILES and not f.startswith(".tmp-"))
    if other and not force:
        raise ConfigError(f"--out {out} holds files that are not from a fastvae run ({', '.join(other[:3])}"
                          f"{' ...' if len(other) > 3 else ''}); choose another folder or pass --force")


def _cmd_train(a):
    from . import datasets
    from .config import DataConfig, ModelConfig, TrainConfig
    from .errors import ConfigError
    from .train import Trainer, TrainingInterrupted

    progress = not a.no_progress
    if a.resume:
        given = [n for n in _MODEL_ARGS + _TRAIN_ARGS + _DATA_ARGS if getattr(a, n) is not None]
        if given:
            raise ConfigError("cannot change " + ", ".join("--" + g.replace("_", "-") for g in given) +
                              " when resuming; only --epochs, --out, --data-dir, --backend and --threads apply")
        if a.out:
            _check_out_folder(a.out, a.force)
        if a.threads is not None:
            from .threads import set_threads
            set_threads(a.threads)
        trainer = Trainer.from_checkpoint(a.resume, out=a.out, epochs=a.epochs, backend=a.backend,
                                          data_dir=a.data_dir, progress=progress)
        if trainer.epoch >= trainer.train_config.epochs:
            print(f"checkpoint is already at epoch {trainer.epoch}; pass --epochs N with N > {trainer.epoch}")
    else:
        name = a.dataset or "sprites"
        dcfg = DataConfig(dataset=name, data_dir=a.data_dir, download=not a.no_download,
                          image_size=a.image_size, color=a.color or "grayscale",
                          n_sprites=a.n_sprites or DataConfig().n_sprites,
                          skip_other_files=bool(a.skip_other_files))
        data = datasets.load(dcfg)
        pick = lambda **kw: {k: v for k, v in kw.items() if v is not None}
        mcfg = ModelConfig(input_dim=data.input_dim, image_shape=data.image_shape,
                           latent_dim=a.latent or _DEFAULT_LATENT.get(name, 20),
                           **pick(hidden=a.hidden, decoder_hidden=a.decoder_hidden, activation=a.activation,
                                  likelihood=a.likelihood, sigma=a.sigma, dtype=a.dtype, init=a.init))
        tcfg = TrainConfig(**pick(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                                  decoupled_weight_decay=a.adamw, lr_schedule=a.lr_schedule, beta_max=a.beta,
                                  beta_schedule=a.beta_schedule, beta_delay=a.beta_delay,
                                  beta_warmup=a.beta_warmup, beta_cycles=a.beta_cycles, binarize=a.binarize,
                                  seed=a.seed, backend=a.backend, threads=a.threads, loss_every=a.loss_every,
                                  tf32=a.tf32, clip_grad_norm=a.clip_grad_norm))
        out = a.out or os.path.join("runs", f"{os.path.basename(os.path.normpath(name))}-"
                                    f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
        _check_out_folder(out, a.force)
        trainer = Trainer(mcfg, tcfg, dcfg, dataset=data, out=out, progress=progress)
        print(f"training {trainer.model!r} on {data.name}: {data.x_train.shape[0]} train images"
              + (f", {data.x_test.shape[0]} test" if data.x_test is not None else "") + f" -> {out}")
    trainer.verbose = True
    try:
        trainer.fit()
    except TrainingInterrupted as exc:
        print(f"fastvae: {exc}", file=sys.stderr)
        print(f"resume with: fastvae train --resume {exc.path} --epochs {exc.total} --out {trainer.out}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"run folder: {trainer.out} (checkpoint.h5, metrics.csv, config.json, reconstructions.png, "
          "samples.png, loss.png)")
    print(f"resume with: fastvae train --resume {trainer.checkpoint_path} --epochs "
          f"{trainer.epoch + 10} --out {trainer.out}")
    return 0


def _cmd_eval(a):
    from . import datasets, load
    from .config import DataConfig
    from .evaluate import evaluate
    from .train import check_data_for_model

    model = load(a.checkpoint, backend=a.backend)
    dc = DataConfig.from_dict(model.checkpoint["data"])
    changes = {}
    if a.dataset:
        changes["dataset"] = a.dataset
    if a.data_dir:
        changes["data_dir"] = a.data_dir
    dc = dc.replace(**changes)
    data = datasets.load(dc)
    x, _ = data.split(a.split)
    check_data_for_model(x, model.config, a.split)
    res = evaluate(model, x, batch_size=a.batch_size, seed=a.seed)
    from . import explore
    kl = explore.kl_per_dim(model, x)
    au, _ = explore.active_units(model, x)
    res.update(active_units=au, kl_per_dim=[float(v) for v in kl])
    if a.iwae_k is not None:
        xi = x[:a.iwae_images] if a.iwae_images else x
        iw = explore.iwae(model, xi, k=a.iwae_k, seed=a.seed)
        res.update(iwae_neg_log_likelihood=float(iw.mean()), iwae_k=a.iwae_k, iwae_n=int(len(xi)))
    split_factors = data.factors_test if a.split == "test" else data.factors_train
    if split_factors is not None:
        mu, _ = model.encode(x)
        res["mig"] = explore.mig(mu, split_factors)["mig"]
    res.update(dataset=data.name, split=a.split, checkpoint=a.checkpoint, backend=model.backend.name,
               units="nats per image")
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{data.name} {a.split} ({res['n']} images): -ELBO {res['neg_elbo']:.3f}, "
              f"recon {res['recon']:.3f}, KL {res['kl']:.3f} nats per image; "
              f"{res['active_units']} active units")
        if "iwae_neg_log_likelihood" in res:
            print(f"IWAE -log p(x), k={res['iwae_k']}, {res['iwae_n']} images: "
                  f"{res['iwae_neg_log_likelihood']:.3f} nats per image")
        if "mig" in res:
            print(f"MIG (Chen et al. 2018): {res['mig']:.3f}")
    return 0


def _cmd_info(a):
    from .checkpoint import read_checkpoint
    d = read_checkpoint(a.checkpoint)
    mc = d["config"]["model"]
    info = {
        "checkpoint": a.checkpoint, **d["meta"],
        "architecture": f"{mc['input_dim']}-{'-'.join(map(str, mc['hidden']))}-{mc['latent_dim']}",
        "model": mc, "train": d["config"]["train"], "data": d["config"]["data"],
        "num_params": int(d["params"].shape[0]), "epoch": d["state"]["epoch"], "step": d["state"]["step"],
        "adam_t": None if d["adam"] is None else d["adam"]["t"],
        "tensors": d["layout"], "last_metrics": d["history"][-1] if d["history"] else None,
    }
    if a.json:
        print(json.dumps(info, default=str))
        return 0
    print(f"{a.checkpoint}: {info['format']} v{info['format_version']} written by fastvae "
          f"{info['fastvae_version']} ({info['backend']}, {info['dtype']}) on {info['created']}")
    print(f"model: {info['architecture']} {mc['activation']}, {mc['likelihood']} likelihood, "
          f"{info['num_params']} parameters")
    print(f"trained: epoch {info['epoch']}, step {info['step']}, Adam t={info['adam_t']}, "
          f"dataset {info['data']['dataset']}")
    for t in d["layout"]:
        print(f"  {t['name']:<22} {str(tuple(t['shape'])):<14} offset {t['offset']}")
    if info["last_metrics"]:
        lm = info["last_metrics"]
        s = f"last epoch: train -ELBO {lm['train_neg_elbo']:.3f}"
        if lm.get("test_neg_elbo") is not None:
            s += f", test -ELBO {lm['test_neg_elbo']:.3f}"
        print(s + " nats per image")
    return 0


def _cmd_bench(a):
    from . import benchmark
    from .errors import ConfigError
    from .threads import set_threads
    set_threads(a.threads)
    bad = [w for w in (a.workloads or []) if w not in benchmark.WORKLOADS]
    if bad:
        raise ConfigError(f"unknown workload(s) {bad}; choose from {list(benchmark.WORKLOADS)}")
    if a.gpu:
        rows = benchmark.run(a.workloads, a.backends or ["cupy"], a.dtype, a.seconds, torch_peer=not a.no_torch,
                             torch_device="cuda", tf32=a.tf32)
    else:
        rows = benchmark.run(a.workloads, a.backends, a.dtype, a.seconds, torch_peer=not a.no_torch)
    print(benchmark.markdown(rows))
    if a.out:
        benchmark.save(rows, a.out, a.name)
        print(f"wrote {os.path.join(a.out, a.name)}.jsonl and .md")
    return 0


def _load_for_explore(ckpt, dataset=None, data_dir=None, backend=None):
    from . import datasets, load
    from .config import DataConfig
    model = load(ckpt, backend=backend)
    dc = DataConfig.from_dict(model.checkpoint["data"])
    changes = {k: v for k, v in (("dataset", dataset), ("data_dir", data_dir)) if v}
    return model, datasets.load(dc.replace(**changes))


def _split_images(data, split):
    """``(x, y)`` of ``split``; the train split when the dataset has no test split."""
    return data.split(split if split == "train" or data.x_test is not None else "train")


def _image_shape(model, data):
    from .datasets import _image_shape_of
    return model.config.image_shape or data.image_shape or _image_shape_of(data.x_train)


def _cmd_plot(a):
    from . import explore
    from .train import check_data_for_model
    ckpt = a.run if a.run.endswith(".h5") else os.path.join(a.run, "checkpoint.h5")
    model, data = _load_for_explore(ckpt, a.dataset, a.data_dir, a.backend)
    x, y = _split_images(data, a.split)
    check_data_for_model(x, model.config, a.split)
    shape = _image_shape(model, data)
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(ckpt)), "figures")
    os.makedirs(out, exist_ok=True)
    f = lambda name: os.path.join(out, name)
    written = []

    def save(name, fn, *args, **kw):
        fn(*args, path=f(name), **kw)
        written.append(name)

    save("reconstructions.png", explore.plot_reconstructions, model, x, shape, n=2 * a.n)
    save("samples.png", explore.plot_samples, model, shape)
    save("latent_map.png", explore.plot_latent_map, model, x, y, data.label_names)
    L = model.config.latent_dim
    if L >= 2:
        dims = tuple(a.dims) if a.dims else (0, 1)
        pca = None if (a.dims or L == 2) else model.encode(x[:5000])[0]
        save("latent_grid.png", explore.plot_latent_grid, model, shape, n=a.grid, dims=dims, spacing=a.spacing,
             pca_codes=pca)
    save("traversals.png", explore.plot_traversals, model, shape, X=x[:5000], max_dims=min(L, 16))
    recon, kl = explore.per_image_elbo(model, x)
    losses = recon + kl
    best, worst = explore.best_and_worst(losses, a.n)
    save("best_worst.png", explore.plot_best_worst, model, x, losses, shape, n=a.n)
    save("loss_histogram.png", explore.plot_loss_histogram, losses,
         marks={"best": losses[best[0]], "median": float(np.median(losses)), "worst": losses[worst[0]]})
    kld = explore.kl_per_dim(model, x)
    _, var = explore.active_units(model, x)
    save("kl_per_dim.png", explore.plot_kl_per_dim, kld, var)
    if model.checkpoint["history"]:
        save("loss_curves.png", explore.plot_loss, model.checkpoint["history"])
    if len(x) >= 2:
        save("interpolation.png", explore.plot_interpolation, model, x[0], x[1], shape)
        frames = explore.interpolation_frames(model, x[0], x[1], 24, "spherical")
        explore.save_gif(frames, shape, f("interpolation.gif"))
        written.append("interpolation.gif")
    print(f"wrote {len(written)} figures to {out}: {', '.join(written)}")
    return 0


def _pick_image(spec, data, split, shape):
    """An image file (resized to the model's image size) or an index into the split."""
    from .errors import DataError
    x, _ = _split_images(data, split)
    if spec.lstrip("-").isdigit():
        i = int(spec)
        if not -len(x) <= i < len(x):
            raise DataError(f"index {i} is outside the {split} split ({len(x)} images); pick 0..{len(x) - 1}")
        return x[i]
    if not os.path.exists(spec):
        raise DataError(f"{spec} is neither an image file nor an index into the dataset")
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(spec) as im:
            im = im.convert("RGB" if len(shape) == 3 else "L")
            im = ImageOps.fit(im, (shape[1], shape[0]), method=Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {spec} ({exc})") from None
    return arr.reshape(-1)


def _cmd_interpolate(a):
    from . import explore
    from .errors import ConfigError
    if not (a.gif or a.png):
        raise ConfigError("say where to write the result: --gif OUT.gif and/or --png OUT.png")
    model, data = _load_for_explore(a.checkpoint, a.dataset, a.data_dir, a.backend)
    shape = _image_shape(model, data)
    xa = _pick_image(a.a, data, a.split, shape)
    xb = _pick_image(a.b, data, a.split, shape)
    if a.gif:
        frames = explore.interpolation_frames(model, xa, xb, a.steps, a.mode)
        if a.scale < 1:
            raise ConfigError(f"--scale must be a positive integer, got {a.scale}")
        n = explore.save_gif(frames, shape, a.gif, scale=a.scale)
        print(f"wrote {a.gif}: {n} frames ({a.steps} steps, {a.mode}, played forth and back)")
    if a.png:
        explore.plot_interpolation(model, xa, xb, shape, steps=min(a.steps, 12), path=a.png)
        print(f"wrote {a.png}")
    return 0


def _cmd_backends(a):
    from . import backends
    for b in backends.available():
        print(f"{b['name']:<8} {'available' if b['available'] else 'unavailable: ' + b['reason']}")
    return 0


def main(argv=None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.cmd is None:
        p.print_help()
        return 0
    cmd = {"train": _cmd_train, "eval": _cmd_eval, "info": _cmd_info, "backends": _cmd_backends,
           "bench": _cmd_bench, "plot": _cmd_plot, "interpolate": _cmd_interpolate}[a.cmd]
    try:
        return cmd(a)
    except FastVAEError as exc:
        print(f"fastvae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastvae: interrupted", file=sys.stderr)
        return 130
