"""The ``fastvae`` command: train, eval, info, backends.

Errors a user can cause print one line ``fastvae: error: ...`` and exit 2.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sys
from shlex import quote

import numpy as np

from .errors import ConfigError, FastVAEError
from .cli_args import (DATA_ARGS, DEFAULT_LATENT, FIELD_OF_FLAG, MODEL_ARGS, TRAIN_ARGS, _finite, _one_line,
                       _positive, check_train_flags, checkpoint_arg, out_folder, parser)

EXIT_INTERRUPTED = 130     # 128 + SIGINT
EXIT_TERMINATED = 143      # 128 + SIGTERM


def _cmd_train(a):
    from . import distributed, runfolder

    progress = not a.no_progress
    _positive("--epochs", a.epochs)
    check_train_flags(a)
    if a.resume:
        a.resume = checkpoint_arg(a.resume)
        given = [n for n in MODEL_ARGS + TRAIN_ARGS + DATA_ARGS if getattr(a, n) is not None]
        if given:
            raise ConfigError("cannot change " + ", ".join("--" + g.replace("_", "-") for g in given) +
                              " when resuming; only --epochs, --out, --data-dir, --backend, --threads and --blas apply")
    backend = a.backend
    if backend is None and a.resume and distributed.launched_size() > 1:
        from . import backends                               # the resumed backend decides MPI or NCCL
        from .checkpoint import read_checkpoint
        written = read_checkpoint(a.resume)["meta"].get("backend")
        backend = written if any(b["name"] == written and b["available"] for b in backends.available()) else None
    comm = distributed.world(backend)
    out = claimed = None
    if comm.rank == 0:                       # rank 0 owns the run folder; the others learn its name
        if a.resume or a.out:
            out = runfolder.check_out(a.out or os.path.dirname(os.path.abspath(a.resume)), resume=a.resume,
                                      force=a.force)
        else:                                # runs/<data>-<time>[-2, ...]: created and locked here
            name = os.path.basename(os.path.normpath(a.dataset or "sprites"))
            out = claimed = runfolder.claim_new(os.path.join("runs", f"{name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"))
    out = comm.bcast(out)
    try:                                     # locked before any data loads: a second trainer fails at once
        with runfolder.locked(out if comm.rank == 0 else None):
            return _train_locked(a, out, progress and comm.rank == 0, comm.rank == 0)
    finally:
        if claimed:
            runfolder.release(claimed)


def _train_locked(a, out, progress, talk):
    from . import datasets
    from .config import DataConfig, ModelConfig, TrainConfig
    from .train import Trainer, TrainingInterrupted
    if a.resume:
        trainer = Trainer.from_checkpoint(a.resume, out=out, epochs=a.epochs, backend=a.backend,
                                          data_dir=a.data_dir, progress=progress, threads=a.threads,
                                          blas=a.blas, force=bool(a.force))
        if trainer.epoch >= trainer.train_config.epochs:        # before anything is written (exit 0 rewrote files)
            raise ConfigError(f"the checkpoint is already at epoch {trainer.epoch}; pass --epochs N with "
                              f"N > {trainer.epoch} to train on")
    else:
        dcfg = DataConfig(dataset=a.dataset or "sprites", data_dir=a.data_dir, download=not a.no_download,
                          image_size=a.image_size, color=a.color or "grayscale",
                          n_sprites=DataConfig().n_sprites if a.n_sprites is None else a.n_sprites,
                          skip_other_files=bool(a.skip_other_files), memory_budget_mb=a.memory_budget)
        data = datasets.load(dcfg)
        pick = lambda **kw: {k: v for k, v in kw.items() if v is not None}
        mcfg = ModelConfig(input_dim=data.input_dim, image_shape=data.image_shape,
                           latent_dim=a.latent if a.latent is not None else DEFAULT_LATENT.get(a.dataset or "sprites",
                                                                                               20),
                           **pick(**{k: getattr(a, k) for k in MODEL_ARGS if k != "latent"}))
        tcfg = TrainConfig(**pick(epochs=a.epochs, backend=a.backend, threads=a.threads, blas=a.blas,
                                  **{FIELD_OF_FLAG.get(n, n): getattr(a, n) for n in TRAIN_ARGS}))
        trainer = Trainer(mcfg, tcfg, dcfg, dataset=data, out=out, progress=progress, force=True)   # checked
        ranks = f" on {trainer.world.size} ranks ({trainer.world.name})" if trainer.world.size > 1 else ""
        if talk:
            print(f"training{ranks} {trainer.model!r} on {data.name}: {data.x_train.shape[0]} train images"
                  + (f", {data.x_test.shape[0]} test" if data.x_test is not None else "") + f" -> {out}"
                  + trainer.threads_note)
    trainer.verbose = True
    try:
        trainer.fit()
    except TrainingInterrupted as exc:
        import signal
        if talk:
            print(f"fastvae: {exc}", file=sys.stderr)
            print(f"resume with: fastvae train --resume {quote(exc.path)} --epochs {exc.total} --out "
                  f"{quote(trainer.out)}", file=sys.stderr)
        return EXIT_TERMINATED if exc.signum == signal.SIGTERM else EXIT_INTERRUPTED
    if not talk:
        return 0
    if trainer.graphs is not None:
        print(trainer.graphs.summary())
    print(f"run folder: {trainer.out} (checkpoint.h5, metrics.csv, config.json, reconstructions.png, samples.png, "
          "loss.png)")
    print(f"resume with: fastvae train --resume {quote(trainer.checkpoint_path)} --epochs "
          f"{trainer.epoch + 10} --out {quote(trainer.out)}")          # quoted: a command to paste into a shell
    return 0


def _cmd_eval(a):
    from . import explore, load, objectives
    from .evaluate import evaluate, units as evaluate_units
    from .checks import check_images

    for flag, value in (("--batch-size", a.batch_size), ("--iwae-k", a.iwae_k), ("--iwae-images", a.iwae_images)):
        _positive(flag, value)                      # before the checkpoint and the data load
    a.checkpoint = checkpoint_arg(a.checkpoint)
    model = load(a.checkpoint, backend=a.backend)
    a.seed = model.checkpoint.get("train", {}).get("seed", 0) if a.seed is None else a.seed    # as training scored
    data = _run_data(model, a.dataset, a.data_dir, splits=(a.split,))
    x, _ = data.split(a.split)
    check_images(x, model.config, f"{a.split} images")
    res = evaluate(model, x, batch_size=a.batch_size, seed=a.seed)
    kl = explore.kl_per_dim(model, x)
    au, _ = explore.active_units(model, x)
    res.update({"active_units": au, ("base_kl_per_dim" if model.config.flows else "kl_per_dim"): kl.tolist()})
    if a.iwae_k is not None:
        xi = x[:a.iwae_images] if a.iwae_images else x
        iw = explore.iwae(model, xi, k=a.iwae_k, seed=a.seed, progress=not a.no_progress)
        res.update(iwae_neg_log_likelihood=float(iw.mean()), iwae_k=a.iwae_k, iwae_n=int(len(xi)))
    res.update(objectives.eval_terms(model, x, len(data.x_train) or len(x), seed=a.seed))  # beta-TCVAE terms
    split_factors = data.factors_test if a.split == "test" else data.factors_train
    if split_factors is not None:
        res["mig"] = explore.mig(model.codes(x), split_factors)["mig"]    # the codes the decoder reads
    units = evaluate_units(model.config.likelihood)
    res.update(dataset=data.name, split=a.split, checkpoint=a.checkpoint, backend=model.backend.name, units=units,
               binarized=bool(model.checkpoint.get("train", {}).get("binarize")))   # one fixed draw (--binarize)
    if a.json:
        print(json.dumps(_finite(res), allow_nan=False))
    else:
        print(f"{data.name} {a.split} ({res['n']} images{', binarized' * res['binarized']}): "
              f"-ELBO {res['neg_elbo']:.3f}, "
              f"recon {res['recon']:.3f}, KL {res['kl']:.3f} {units}; {res['active_units']} active units")
        if "iwae_neg_log_likelihood" in res:
            print(f"IWAE -log p(x), k={res['iwae_k']}, {res['iwae_n']} images: "
                  f"{res['iwae_neg_log_likelihood']:.3f} {units}")
        if "mig" in res:
            print(f"MIG (Chen et al. 2018): {res['mig']:.3f}")
    return 0


def _cmd_info(a):
    from . import layers
    from .checkpoint import read_checkpoint
    from .config import ModelConfig
    from .errors import CheckpointError, ConfigError
    from .evaluate import train_loss_name
    a.checkpoint = checkpoint_arg(a.checkpoint)
    d = read_checkpoint(a.checkpoint)
    try:
        mcfg = ModelConfig.from_dict(d["config"]["model"])
        arch = layers.describe(layers.build(mcfg))
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{a.checkpoint} holds an invalid model config ({exc}); use a checkpoint "
                              "written by fastvae") from None
    mc = mcfg.to_dict()
    info = {
        "checkpoint": a.checkpoint, **d["meta"],
        "architecture": arch,
        "model": mc, "train": d["config"]["train"], "data": d["config"]["data"],
        "num_params": int(d["params"].shape[0]), "epoch": d["state"]["epoch"], "step": d["state"]["step"],
        "adam_t": None if d["adam"] is None else d["adam"]["t"], "data_rows": d["state"].get("data_rows"),
        "tensors": d["layout"], "last_metrics": d["history"][-1] if d["history"] else None,
    }
    if a.json:
        print(json.dumps(info, default=str))
        return 0
    print(f"{a.checkpoint}: {info['format']} v{info['format_version']} written by fastvae "
          f"{info['fastvae_version']} ({info['backend']}, {info['dtype']}) on {info['created']}")
    print(f"model: {info['architecture']}, {mc['likelihood']} likelihood, {info['num_params']} parameters")
    rows = info["data_rows"]
    print(f"trained: epoch {info['epoch']}, step {info['step']}, Adam t={info['adam_t']}, "
          f"dataset {info['data']['dataset']}" + (f" ({rows[0]} training, {rows[1]} test images)" if rows else ""))
    for t in d["layout"]:
        print(f"  {t['name']:<22} {str(tuple(t['shape'])):<14} offset {t['offset']}")
    if info["last_metrics"]:
        lm = info["last_metrics"]
        s = f"last epoch: train {train_loss_name(lm)} {lm['train_neg_elbo']:.3f}"
        if lm.get("test_neg_elbo") is not None:
            s += f", test -ELBO {lm['test_neg_elbo']:.3f}"
        print(s + " nats per image")
    return 0


def _cmd_bench(a):
    from . import benchmark
    from .threads import set_threads
    set_threads(a.threads)
    benchmark.check_request(a.workloads, a.backends or (["cupy"] if a.gpu else []), a.seconds)
    if a.out:                       # before the timing (minutes) rather than after it
        out_folder(a.out, "bench writes <name>.jsonl and .md")
    rows = benchmark.run(a.workloads, a.backends or (["cupy"] if a.gpu else None), a.dtype, a.seconds,
                         torch_peer=not a.no_torch, **(dict(torch_device="cuda", tf32=a.tf32) if a.gpu
                                                       else dict(blas_names=a.blas)))
    print(benchmark.markdown(rows))
    if a.out:
        name = a.name or ("gpu" if a.gpu else "cpu")
        benchmark.save(rows, a.out, name)
        print(f"wrote {os.path.join(a.out, name)}.jsonl and .md")
    return 0


def _run_data(model, dataset=None, data_dir=None, splits=("train", "test")):
    """The dataset of a loaded run (its checkpoint's data config), or
    ``dataset`` / ``data_dir`` instead; the run's --image-size and --color
    follow only to another folder of images."""
    from . import datasets
    from .config import DataConfig
    from .evaluate import binarized_splits
    from .training import data_change_note
    recorded = DataConfig.from_dict(model.checkpoint["data"])
    cfg = datasets.given(dataset, recorded)[1] if dataset else recorded
    cfg = cfg.replace(data_dir=data_dir) if data_dir else cfg
    data = datasets.load(cfg, splits=splits)
    note = data_change_note(model.checkpoint, data) if cfg.dataset == recorded.dataset else ""   # the run's data
    if note:
        print(f"fastvae: note: {note}", file=sys.stderr)
    if model.checkpoint.get("train", {}).get("binarize"):      # scored as it trained: on binary images
        data = binarized_splits(data, model.config, splits)
    return data


def _load_for_explore(ckpt, dataset=None, data_dir=None, backend=None):
    from . import load
    model = load(checkpoint_arg(ckpt), backend=backend)
    return model, _run_data(model, dataset, data_dir)


def _split_images(data, split):
    """``(x, y)`` of ``split``; the train split when the dataset has no test split."""
    return data.split(split if split == "train" or data.x_test is not None else "train")


def _image_shape(model, data):
    from .arrayfiles import image_shape_of
    return model.config.image_shape or data.image_shape or image_shape_of(data.x_train.shape, data.name)


def _cmd_plot(a):
    from . import explore
    from .checks import check_images
    from .evaluate import units
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
    recon, kl = explore.per_image_elbo(model, x, seed=model.checkpoint.get("train", {}).get("seed", 0))  # as eval
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
    from .safe_files import read_image
    mode = "L" if len(shape) == 2 or shape[2] == 1 else {3: "RGB", 4: "RGBA"}.get(shape[2])
    if mode is None:
        raise DataError(f"the model's images have {shape[2]} channels; an image file cannot give them, pass an index")
    arr = read_image(spec, mode, shape[:2], "pass an image file or an index", DataError)
    return arr.reshape(-1) / 255.0


def _cmd_interpolate(a):
    from . import explore
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
        print(f"wrote {a.gif}: {n} frames ({a.steps} steps, {a.mode}, played forth and back)")
    if a.png:
        explore.plot_interpolation(model, xa, xb, shape, steps=min(a.steps, 12), path=a.png)
        print(f"wrote {a.png}")
    return 0


def _cmd_backends(a):
    from . import backends
    for b in backends.available():
        print(f"{b['name']:<8} {'available' if b['available'] else 'unavailable: ' + b['reason']}")
    from .blas import libraries
    for lib in libraries():               # the CPU backends' GEMM libraries (--blas)
        print(f"--blas {lib['name']:<6} {'available: ' if lib['available'] else 'unavailable: '}{lib['detail']}")
    return 0


class _Terminated(BaseException):
    """SIGTERM outside training (where it is handled like Ctrl-C)."""


def _on_sigterm(signum, frame):
    raise _Terminated


def main(argv=None) -> int:
    import signal
    p = parser()
    a = p.parse_args(argv)
    if a.cmd is None:
        p.print_help()
        return 0
    cmd = {"train": _cmd_train, "eval": _cmd_eval, "info": _cmd_info, "backends": _cmd_backends,
           "bench": _cmd_bench, "plot": _cmd_plot, "interpolate": _cmd_interpolate}[a.cmd]
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return cmd(a)
    except FastVAEError as exc:
        from .distributed import current
        comm = current()
        who = f" (rank {comm.rank} of {comm.size})" if comm and comm.size > 1 else ""
        print(f"fastvae: error{who}: {_one_line(exc)}", file=sys.stderr)
        if comm and comm.size > 1:
            comm.abort(2)                    # the other ranks would wait forever in the next collective
        return 2
    except MemoryError:
        print("fastvae: error: out of memory; use a smaller model, --batch-size or dataset", file=sys.stderr)
        return 2
    except BrokenPipeError:         # the reader went away (| head): stop quietly with SIGPIPE's status, as Unix tools
        with contextlib.suppress(OSError):      # no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except OSError as exc:          # an OS error no check foresaw: still one line, never a traceback
        print(f"fastvae: error: {_one_line(f'{exc.strerror or exc} ({exc.filename or type(exc).__name__})')}; "
              "check the paths, permissions and free disk space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastvae: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print("fastvae: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)
