"""The ``fastvae`` command line: argument definitions (argparse) and the
small helpers the commands share (argument values, one-line messages, JSON).

The commands themselves live in :mod:`fastvae.cli`.
"""

from __future__ import annotations

import argparse
import math

from fastvae.config import check_data_dir, default_batch_size  # noqa: F401  (the commands use them from here)
from fastvae.naming import FIELD_OF_FLAG, option  # noqa: F401

# per-dataset defaults for options left unset
DEFAULT_LATENT = {"sprites": 10, "olivetti": 50}
CKPT_HELP = "a checkpoint.h5, or the run folder holding one"
MODEL_ARGS = ("arch", "hidden", "decoder_hidden", "latent", "activation", "likelihood", "sigma", "dtype", "init",
              "posterior", "flows", "flow_hidden", "no_flow_context", "layers")
TRAIN_ARGS = ("batch_size", "lr", "weight_decay", "adamw", "lr_schedule", "lr_step_epochs", "lr_gamma", "lr_min",
              "beta", "beta_schedule", "beta_delay", "beta_warmup", "beta_cycles", "beta_ratio", "binarize", "seed",
              "loss_every", "clip_grad_norm", "objective", "iwae_k", "tc_estimator", "dwkl_warmup")
#: run settings (fastvae.RunSettings): chosen by every run, a resume too
RUN_ARGS = ("backend", "threads", "blas", "tf32", "cuda_graph")
#: flags whose config field has another name (what ``fastvae.train`` takes)
DATA_ARGS = ("dataset", "image_size", "color", "n_sprites", "no_download", "skip_other_files", "memory_budget")


def parser() -> argparse.ArgumentParser:
    """The ``fastvae`` argument parser with every sub-command."""
    p = argparse.ArgumentParser(prog="fastvae", description="Train and explore VAEs with hand-derived gradients.")
    p.add_argument("--version", action="version", version=f"fastvae {_version()}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    t = sub.add_parser("train", help="train a VAE (default: the built-in sprites)")
    d = t.add_argument_group("data")
    d.add_argument("--dataset", help="sprites (default), mnist, fashion-mnist, kmnist, olivetti, "
                   "or a path: a folder of images or an .npy/.npz/.h5 file")
    d.add_argument("--data-dir", help="folder holding the dataset files (idx files, olivetti_faces.npz); "
                   "default $FASTVAE_DATA/<name>, else ~/.cache/fastvae/<name> (downloads go there)")
    d.add_argument("--no-download", action="store_true", default=None, help="never download missing files")
    d.add_argument("--memory-budget", type=float, metavar="MB",
                   help="stream an .npy/.h5 file whose loading (the array and its float32 copy) takes more "
                        "than this from disk in chunks (default: half the free memory)")
    d.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="resize folder images")
    d.add_argument("--color", choices=["grayscale", "rgb"], help="colour mode of folder images")
    d.add_argument("--n-sprites", type=int, help="number of procedural sprites (default 12000)")
    d.add_argument("--skip-other-files", action="store_true", default=None,
                   help="ignore files that are not images in an image folder")
    m = t.add_argument_group("model")
    m.add_argument("--arch", choices=["mlp", "conv"],
                   help="mlp (default) or conv: the seed's ConvNet on 28x28 images, Burgess et al. 2018 on 64x64 "
                        "and on other power-of-two sides from 16 to 1024")
    m.add_argument("--hidden", type=int, nargs="*", help="encoder hidden widths (default: 400)")
    m.add_argument("--decoder-hidden", type=int, nargs="*", help="decoder hidden widths (default: mirror)")
    m.add_argument("--latent", type=int, help="latent_dim (default 20; 10 for sprites, 50 for olivetti)")
    m.add_argument("--activation", help="relu (default), tanh, leaky_relu, elu, softplus, sigmoid")
    m.add_argument("--likelihood", help="bernoulli (default), gaussian, mse")
    m.add_argument("--sigma", type=float, help="gaussian likelihood standard deviation (default 0.1)")
    m.add_argument("--dtype", help="float32 (default) or float64")
    m.add_argument("--init", help="pytorch (default) or xavier")
    m.add_argument("--posterior", choices=["gaussian", "iaf"],
                   help="gaussian (default) or iaf: inverse autoregressive flow steps after the sampler "
                        "(Kingma et al. 2016); needs --flows")
    m.add_argument("--flows", type=int, metavar="N", help="number of IAF steps of --posterior iaf")
    m.add_argument("--flow-hidden", type=int, metavar="H", help="hidden units of each IAF step's MADE (default 200)")
    m.add_argument("--no-flow-context", action="store_const", const=False, default=None,
                   help="IAF steps without the encoder's context h (Kingma et al. 2016 feed it to every step)")
    m.add_argument("--layers", metavar="FILE",
                   help="a stack of your own: a JSON list of layer specs (dense, conv2d, conv_transpose2d, reshape, "
                        "gaussian, iaf, likelihood; see the README), or a run's config.json; it fixes latent_dim, "
                        "the likelihood and the flows, in place of --arch, --hidden and the other shape flags")
    o = t.add_argument_group("optimisation")
    o.add_argument("--backend", help="auto (default: cupy with a usable GPU, else numba, else numpy), numpy, numba "
                   "or cupy; see `fastvae backends`")
    o.add_argument("--epochs", type=int, help="total epochs (default 10; also the target on --resume)")
    o.add_argument("--batch-size", type=int,
                   help="images per step (default 128, or every training image when there are fewer)")
    o.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    o.add_argument("--weight-decay", type=float, help="weight decay (default 0)")
    o.add_argument("--adamw", action="store_true", default=None, help="decoupled weight decay (AdamW)")
    o.add_argument("--lr-schedule", help="constant (default), step, cosine")
    o.add_argument("--lr-step-epochs", type=int, metavar="N", help="step schedule: epochs between steps (default 10)")
    o.add_argument("--lr-gamma", type=float, help="step schedule: the factor at each step (default 0.5)")
    o.add_argument("--lr-min", type=float, help="cosine schedule: the last step's lr (default 0)")
    o.add_argument("--beta", type=float, help="beta_max, the KL weight (default 1)")
    o.add_argument("--beta-schedule", help="constant (default), linear, sigmoid, cyclical")
    o.add_argument("--beta-delay", type=float, help="epochs at beta 0 before the ramp")
    o.add_argument("--beta-warmup", type=float, help="epochs of the ramp to beta_max")
    o.add_argument("--beta-cycles", type=int, help="cycles of the cyclical schedule (default 4)")
    o.add_argument("--beta-ratio", type=float, help="cyclical schedule: the rising part of each cycle (default 0.5)")
    o.add_argument("--binarize", action="store_true", default=None, help="dynamic binarization")
    o.add_argument("--seed", type=int, help="random seed (default 0)")
    o.add_argument("--threads", type=_threads, help="BLAS/Numba threads, or auto: the fastest count measured on "
                   "this model's step when training starts (default: all cores, fastest on an idle machine)")
    o.add_argument("--blas", choices=["numpy", "mkl", "auto"],
                   help="GEMM library of the CPU backends: numpy (default: NumPy's BLAS, OpenBLAS in its wheels), "
                        "mkl (pip install \"fastvae[mkl]\") or auto: the faster on this model's step, measured "
                        "once and cached")
    o.add_argument("--loss-every", type=int, help="compute the reported loss every N steps (default 1)")
    o.add_argument("--tf32", action="store_true", default=None, help="TF32 tensor-core GEMMs (cupy backend)")
    o.add_argument("--cuda-graph", action="store_true", default=None,
                   help="replay each training step as one CUDA graph (cupy backend; same numbers, less launch time)")
    o.add_argument("--clip-grad-norm", type=float, help="clip the global gradient norm to this value")
    o.add_argument("--objective", choices=["elbo", "iwae", "btcvae"],
                   help="training loss: the ELBO (default), the importance-weighted bound (Burda et al. 2016) "
                        "or beta-TCVAE (Chen et al. 2018; --beta weighs the total correlation)")
    o.add_argument("--iwae-k", type=int, metavar="K", help="samples per image of --objective iwae (default 5)")
    o.add_argument("--tc-estimator", choices=["mss", "mws"],
                   help="--objective btcvae's estimator of q(z): minibatch-stratified (mss, default) or "
                        "minibatch-weighted sampling (mws; Chen et al. 2018, Appendix C)")
    o.add_argument("--dwkl-warmup", type=float, metavar="EPOCHS",
                   help="--objective btcvae: raise the dimension-wise KL weight from 0.05 to 1 over EPOCHS "
                        "(the paper code's --lambda-anneal; default 0: weight 1)")
    r = t.add_argument_group("run")
    r.add_argument("--out", help="run folder (default runs/<dataset>-<date>-<time>, -2, -3, ... added when taken)")
    r.add_argument("--resume", metavar="CKPT", help="continue training from a checkpoint")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--force", action="store_true",
                   help="write into an --out folder holding other files, or replace the run it holds")

    e = sub.add_parser("eval", help="-ELBO, reconstruction and KL of a checkpoint on a split")
    e.add_argument("checkpoint", help=CKPT_HELP)
    e.add_argument("--dataset", help="default: the dataset the checkpoint was trained on")
    e.add_argument("--data-dir")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument("--batch-size", type=int, help="images per evaluation batch (default: up to 1000 whose work "
                   "buffers fit in 1 GiB)")
    e.add_argument("--seed", type=int, help="seed of the z samples (default: the run's --seed, whose test -ELBO "
                   "per epoch it reproduces)")
    e.add_argument("--backend", help="default: the one that wrote the checkpoint, else numpy")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--iwae-k", type=int, nargs="?", const=5000, default=None, metavar="K",
                   help="add the importance-weighted -log p(x) with K samples (default 5000 when given)")
    e.add_argument("--iwae-images", type=int, metavar="N", help="IWAE on the first N images only")
    e.add_argument("--mig-points", type=int, default=10000, metavar="N",
                   help="score MIG on N images (default 10000, as disentanglement_lib): new ones from the sprites "
                        "generator, else the first N of the training split")
    e.add_argument("--no-progress", action="store_true", help="no IWAE progress bar")

    i = sub.add_parser("info", help="what a checkpoint holds")
    i.add_argument("checkpoint", help=CKPT_HELP)
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
    pl.add_argument("--max-dims", type=int, default=16,
                    help="latent dims in the traversals figure, highest KL first (default 16)")
    pl.add_argument("--backend", help="default: the one that wrote the checkpoint, else numpy")
    pl.add_argument("--out", help="default: RUN/figures")

    ip = sub.add_parser("interpolate", help="morph one image into another through the latent space")
    ip.add_argument("checkpoint", help=CKPT_HELP)
    ip.add_argument("a", help="image file, or index into the dataset split (negative counts from the end: -1 "
                              "is the last image)")
    ip.add_argument("b", help="image file or index into the dataset split (as a)")
    ip.add_argument("--steps", type=int, default=24)
    ip.add_argument("--mode", default="spherical", choices=["linear", "spherical"])
    ip.add_argument("--gif", help="write an animated GIF here")
    ip.add_argument("--png", help="write the strip (linear and spherical) here")
    _image_picking(ip)

    ir = sub.add_parser("inpaint", help="fill the missing part of images from the latent space")
    ir.add_argument("run", help=CKPT_HELP)
    ir.add_argument("images", nargs="+", help="image files, or indices into the dataset split (as interpolate)")
    ir.add_argument("--mask", required=True,
                    help="top, bottom, left, right (half), center[:F] (a square, F = 0.5), random:P (a fraction P "
                         "of the pixels, seeded), box:r0,c0,r1,c1, or a mask image file (white = missing)")
    ir.add_argument("--method", default="iw", choices=["iw", "gibbs", "mwg"],
                    help="iw: importance-weighted (MIWAE, default); gibbs: pseudo-Gibbs; mwg: Metropolis-within-Gibbs")
    ir.add_argument("--steps", type=int, default=50, help="iterations of gibbs and mwg (default 50)")
    ir.add_argument("--samples", type=int, default=100, help="importance samples of iw (default 100)")
    ir.add_argument("--seed", type=int, default=0, help="seeds the draws and a random mask (default 0)")
    ir.add_argument("--json", action="store_true",
                    help="print the masked-pixel NLL and MSE of the fill and of two baselines (mean image, nearest "
                         "training image)")
    ir.add_argument("--out", help="default: RUN/figures")
    _image_picking(ir)

    b = sub.add_parser("bench", help="time training steps of every backend against PyTorch")
    from fastvae.bench.workloads import WORKLOADS
    b.add_argument("--workloads", nargs="*", help="default: all of " + ", ".join(WORKLOADS) + "; or your own: "
                   "D-H-...-L/bB (an MLP, e.g. 3072-512-64/b256) or convS-L/bB (e.g. conv64-10/b64)")
    b.add_argument("--backends", nargs="*", help="default: every available backend")
    b.add_argument("--dtype", default="float32")
    b.add_argument("--seconds", type=float, default=3.0, help="timing budget per measurement")
    b.add_argument("--threads", type=int, help="BLAS/Numba threads (default: the libraries' default)")
    b.add_argument("--blas", nargs="*", choices=["numpy", "mkl"],
                   help="GEMM libraries to time the CPU backends with (default: every one installed)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    b.add_argument("--gpu", action="store_true",
                   help="GPU mode: the cupy backend against PyTorch on the same GPU (eager fused Adam, "
                        "torch.compile reduce-overhead)")
    b.add_argument("--tf32", action="store_true", help="TF32 GEMMs for cupy (and torch) in GPU mode")
    b.add_argument("--out", help="folder for <name>.jsonl and <name>.md")
    b.add_argument("--name", help="file name under --out (default: gpu with --gpu, else cpu)")
    return p


def _version():
    from fastvae import __version__
    return __version__


# ---------------------------------------------------------- shared helpers
def checkpoint_arg(path) -> str:
    """A checkpoint argument: a ``checkpoint.h5`` or the run folder holding one."""
    from fastvae.training.runfolder import checkpoint_path
    return checkpoint_path(path)


def check_train_flags(a) -> None:
    """Flags of `fastvae train` that cannot do what they say (``--sigma``
    without the gaussian likelihood, ``--lr-gamma`` without the step
    schedule, :data:`fastvae.options.OPTION_NEEDS`): ConfigError naming the fix."""
    from fastvae.options import idle_option
    from fastvae.errors import ConfigError
    if a.hidden is not None and not a.hidden:
        raise ConfigError("--hidden needs at least one width (e.g. --hidden 400 or --hidden 512 256)")
    if a.arch == "conv" and (a.hidden is not None or a.decoder_hidden is not None):
        raise ConfigError("--hidden and --decoder-hidden shape the mlp; --arch conv has its own stack "
                          "(or describe one with --layers FILE)")
    if a.resume:
        return                                      # flags given on resume are refused by name
    dataset = a.dataset or "sprites"
    if a.n_sprites is not None and dataset != "sprites":
        raise ConfigError(f"--n-sprites sizes the built-in sprites, not {dataset}; drop it")
    check_data_dir(dataset, a.data_dir)
    if a.memory_budget is not None and not dataset.lower().endswith((".npy", ".npz", ".h5", ".hdf5")):
        raise ConfigError(f"--memory-budget decides whether an .npy/.h5 file streams from disk; {dataset} is "
                          "not one, so it would do nothing: drop it")
    given = {FIELD_OF_FLAG.get(n, n): getattr(a, n) for n in MODEL_ARGS + TRAIN_ARGS if getattr(a, n) is not None}
    msg = idle_option(given)
    if msg:
        raise ConfigError(msg)


def out_folder(path: str, what: str) -> str:
    """``--out`` of a command that writes files into a folder: created;
    ConfigError when it is a file ("``what`` into a folder"), an OSError
    (one line, from main) when it cannot be made."""
    import os
    from fastvae.errors import ConfigError
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out {path} is a file; {what} into a folder: name one")
    os.makedirs(path, exist_ok=True)
    return path


def _positive(name, value):
    from fastvae.errors import ConfigError
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value}")


def _threads(value):
    """``--threads``: a positive integer or ``auto``."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {value!r}")
    return int(value)


def _finite(obj):
    """``obj`` with NaN and infinities replaced by None (standard JSON has neither)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _image_picking(cmd) -> None:
    """The options of a command that takes images by index or file and may write a GIF (interpolate, inpaint)."""
    cmd.add_argument("--scale", type=int, default=4, help="GIF pixel upscaling (default 4)")
    cmd.add_argument("--dataset")
    cmd.add_argument("--data-dir")
    cmd.add_argument("--split", default="test", choices=["train", "test"])
    cmd.add_argument("--backend")


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``p.parse_args(argv)``, but an unknown flag is reported by its
    subcommand's parser (its usage, not the top level's) with the closest
    flag it has: ``fastvae train --epcohs 3`` -> "did you mean --epochs?"."""
    import difflib
    a, extra = p.parse_known_args(argv)
    if not extra:
        return a
    subs = next((act.choices for act in p._actions if isinstance(act, argparse._SubParsersAction)), {})
    target = subs.get(getattr(a, "cmd", None)) or p
    flag = next((x for x in extra if x.startswith("-")), extra[0]).split("=")[0]
    flags = [o for act in target._actions for o in act.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.6)
    target.error(f"unrecognized arguments: {' '.join(extra)}" + (f"; did you mean {close[0]}?" if close else ""))


MAX_MESSAGE = 400


def _one_line(msg: str) -> str:
    """An error message on one line of at most about :data:`MAX_MESSAGE`
    characters that never loses its fix: messages read ``<problem>; <fix>``,
    so a longer one keeps the start of its problem (its first clause, cut
    where needed) and its whole fix, the text after the last ``"; "``."""
    msg = " ".join(str(msg).split())
    if len(msg) <= MAX_MESSAGE:
        return msg
    head, sep, fix = msg.rpartition("; ")
    if not sep:                                        # no fix part: the start and the end
        return msg[:MAX_MESSAGE - 60] + " ... " + msg[-55:]
    first = head.split("; ")[0]
    room = max(80, MAX_MESSAGE - len(fix) - len(" ...; "))
    if len(first) > room:
        first = first[:room].rstrip()
    return f"{first} ...; {fix}" if first != head else f"{first}; {fix}"
