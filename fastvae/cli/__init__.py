"""The ``fastvae`` command: train, eval, info, backends, bench (plot and
interpolate live in :mod:`fastvae.cli.explore`).

Errors a user can cause print one line ``fastvae: error: ...`` and exit 2.

Package: the command line only; ``args`` defines the arguments (argparse)
and ``explore`` the commands on a finished run. It may import anything in
fastvae; nothing in the library imports it (tests/test_structure.py).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sys
from shlex import quote

from fastvae.errors import ConfigError, FastVAEError
from fastvae.naming import command_line
from fastvae.cli.args import (DATA_ARGS, DEFAULT_LATENT, FIELD_OF_FLAG, MODEL_ARGS, RUN_ARGS, TRAIN_ARGS, _finite, _one_line,
                       _positive, check_train_flags, checkpoint_arg, default_batch_size, out_folder, parse, parser)
from fastvae.cli.explore import _cmd_inpaint, _cmd_interpolate, _cmd_plot, _run_data, _trained

EXIT_INTERRUPTED = 130     # 128 + SIGINT
EXIT_TERMINATED = 143      # 128 + SIGTERM


def _cmd_train(a):
    from fastvae.training import distributed
    from fastvae.training import runfolder

    progress = not a.no_progress
    _positive("--epochs", a.epochs)
    if a.layers is not None and not a.resume:         # read and checked before any data loads
        a.layers = _layer_specs(a)
    check_train_flags(a)
    if a.resume:
        a.resume = checkpoint_arg(a.resume)
        given = [n for n in MODEL_ARGS + TRAIN_ARGS + DATA_ARGS if getattr(a, n) is not None]
        if given:
            raise ConfigError("cannot change " + ", ".join("--" + g.replace("_", "-") for g in given) +
                              " when resuming; only --epochs, --out, --data-dir and the run settings (--backend, "
                              "--threads, --blas, --tf32, --cuda-graph) apply")
    backend = a.backend
    if backend is None and a.resume and distributed.launched_size() > 1:
        from fastvae import backends                               # the resumed backend decides MPI or NCCL
        from fastvae.io.checkpoint import read_checkpoint
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


def _layer_specs(a):
    """``--layers FILE``: its specs, checked as far as they can be without the data (their values, one sampler,
    the likelihood last, agreeing with --latent, --likelihood, --sigma, --posterior and --flows where given);
    ConfigError naming the file. Sizes are checked when the layers are built."""
    from fastvae.nn.architectures import fields_of_layers, read_layer_specs
    from fastvae.config import ModelConfig
    specs = read_layer_specs(a.layers)
    flags = {FIELD_OF_FLAG.get(n, n): getattr(a, n) for n in ("latent", "likelihood", "sigma", "posterior", "flows",
                                                              "dtype")}
    try:
        ModelConfig(**{"input_dim": 1, **fields_of_layers(specs), "layers": specs,
                       **{k: v for k, v in flags.items() if v is not None}})
    except ConfigError as exc:
        raise ConfigError(f"--layers {a.layers}: {exc}") from None
    return specs


def _train_locked(a, out, progress, talk):
    from fastvae import datasets
    from fastvae.nn.architectures import fields_of_layers
    from fastvae.config import DataConfig, ModelConfig, RunSettings, TrainConfig
    from fastvae.training.trainer import Trainer, TrainingInterrupted
    if a.resume:
        trainer = Trainer.from_checkpoint(a.resume, out=out, epochs=a.epochs, backend=a.backend,
                                          data_dir=a.data_dir, progress=progress, threads=a.threads,
                                          blas=a.blas, force=bool(a.force), tf32=bool(a.tf32),
                                          cuda_graph=bool(a.cuda_graph))
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
        fixed = fields_of_layers(a.layers) if a.layers is not None else {}      # what a --layers stack fixes
        latent = a.latent if a.latent is not None else fixed.get("latent_dim",
                                                                 DEFAULT_LATENT.get(a.dataset or "sprites", 20))
        mcfg = ModelConfig(**{"input_dim": data.input_dim, "image_shape": data.image_shape, **fixed,
                              "latent_dim": latent, **pick(**{FIELD_OF_FLAG.get(k, k): getattr(a, k) for k in MODEL_ARGS
                                                               if k != "latent"})})
        batch_note = ""
        if a.batch_size is None:                    # the default, or every image of a small dataset
            a.batch_size, batch_note = default_batch_size(len(data.x_train))
        tcfg = TrainConfig(**pick(epochs=a.epochs, **{FIELD_OF_FLAG.get(n, n): getattr(a, n) for n in TRAIN_ARGS}))
        settings = RunSettings(**pick(**{n: getattr(a, n) for n in RUN_ARGS}))
        trainer = Trainer(mcfg, tcfg, dcfg, dataset=data, out=out, progress=progress, settings=settings)
    if talk:
        print(trainer.start_line())
        if not a.resume and batch_note:             # once the data passed its checks
            print(batch_note, file=sys.stderr)
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


def _mig_points(model, data, n: int, seed: int):
    """The images and factors MIG is scored on, and where they came from:
    ``n`` new sprites from the generator (the run's image size, seed
    ``10^6 + seed``: none of them a training image's draw) for the sprites, else the first
    ``n`` training images of a dataset with factors (the test split's when only it has them); None without factors."""
    from fastvae.datasets.sprites import make_sprites
    if data.name == "sprites":
        gseed = 10 ** 6 + seed
        d = make_sprites(n, seed=gseed, size=model.config.image_shape[0], test_fraction=0.0)
        return d.x_train, d.factors_train, f"sprites generator, seed {gseed}"
    for x, f, split in ((data.x_train, data.factors_train, "train"), (data.x_test, data.factors_test, "test")):
        if f is not None and x is not None and len(x):
            return x[:n], f[:n], f"{split} split"
    return None


def _cmd_eval(a):
    from fastvae import explore, load
    from fastvae.objectives import btcvae as objectives
    from fastvae.explore.evaluation import evaluate, units as evaluate_units
    from fastvae.checks import check_images

    for flag, value in (("--batch-size", a.batch_size), ("--iwae-k", a.iwae_k), ("--iwae-images", a.iwae_images),
                        ("--mig-points", a.mig_points)):
        _positive(flag, value)                      # before the checkpoint and the data load
    a.checkpoint = checkpoint_arg(a.checkpoint)
    model = load(a.checkpoint, backend=a.backend)
    a.seed = _trained(model, "seed", 0) if a.seed is None else a.seed    # as training scored
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
    points = _mig_points(model, data, a.mig_points, a.seed)
    if points is not None:
        xm, fm, source = points
        res["mig"] = explore.mig(model.codes(xm), fm)["mig"]          # the codes the decoder reads
        res.update(mig_points=int(len(xm)), mig_source=source)
    units = evaluate_units(model.config.likelihood)
    res.update(dataset=data.name, split=a.split, checkpoint=a.checkpoint, backend=model.backend.name, units=units,
               binarized=bool(_trained(model, "binarize")))   # one fixed draw (--binarize)
    if a.json:
        print(json.dumps(_finite(res), allow_nan=False))
    else:
        print(f"{data.name} {a.split} ({res['n']} images{', binarized' * res['binarized']}): "
              f"-ELBO {res['neg_elbo']:.3f}, "
              f"recon {res['recon']:.3f}, KL {res['kl']:.3f} {units}; {res['active_units']} active units")
        if "iwae_neg_log_likelihood" in res:
            what = "-log p(x)" if model.config.likelihood != "mse" else "bound (mse: no density)"
            print(f"IWAE {what}, k={res['iwae_k']}, {res['iwae_n']} images: "
                  f"{res['iwae_neg_log_likelihood']:.3f} {units}")
        if "btcvae_tc" in res:                      # printed by --json alone before
            sampling = {"mss": "minibatch-stratified", "mws": "minibatch-weighted"}[res["btcvae_estimator"]]
            print(f"beta-TCVAE terms ({sampling} sampling, batch {_trained(model, 'batch_size', 128)}): "
                  f"MI {res['btcvae_mi']:.3f}, TC {res['btcvae_tc']:.3f}, dimension-wise KL "
                  f"{res['btcvae_dwkl']:.3f} {units}")
        if "mig" in res:
            print(f"MIG (Chen et al. 2018): {res['mig']:.3f}" if res["mig"] == res["mig"] else
                  "MIG (Chen et al. 2018): none, the gap between two latents needs latent_dim 2 or more")
    return 0


def _cmd_info(a):
    from fastvae.nn import layers
    from fastvae.io.checkpoint import read_checkpoint
    from fastvae.errors import CheckpointError, ConfigError
    from fastvae.explore.evaluation import train_loss_name, units
    a.checkpoint = checkpoint_arg(a.checkpoint)
    d = read_checkpoint(a.checkpoint)
    mcfg, tcfg, dcfg = d["configs"]     # checked by the reader; a part the file lacks reads as its defaults
    try:
        arch = layers.describe(layers.build(mcfg))
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{a.checkpoint} holds an invalid model config ({exc}); use a checkpoint "
                              "written by fastvae") from None
    mc, tr = mcfg.to_dict(), tcfg.to_dict()
    info = {
        "checkpoint": a.checkpoint, **d["meta"],
        "architecture": arch,
        "model": mc, "train": tr, "data": dcfg.to_dict(), "run": d["run_settings"].to_dict(),
        "num_params": int(d["params"].shape[0]), "epoch": d["state"]["epoch"], "step": d["state"]["step"],
        "adam_t": None if d["adam"] is None else d["adam"]["t"], "data_rows": d["state"].get("data_rows"),
        "tensors": d["layout"], "last_metrics": d["history"][-1] if d["history"] else None,
    }
    if a.json:
        print(json.dumps(info, default=str))
        return 0
    meta = {k: info.get(k, "?") for k in ("format_version", "fastvae_version", "backend", "dtype", "created")}
    print(f"{a.checkpoint}: {info['format']} v{meta['format_version']} written by fastvae "
          f"{meta['fastvae_version']} ({meta['backend']}, {meta['dtype']}) on {meta['created']}")
    print(f"model: {info['architecture']}, {mc['likelihood']} likelihood, {info['num_params']} parameters")
    rows = info["data_rows"]
    print(f"trained: epoch {info['epoch']}, step {info['step']}, Adam t={info['adam_t']}, "
          f"dataset {info['data']['dataset']}" + (f" ({rows[0]} training, {rows[1]} test images)" if rows else ""))
    weight = {"iwae": f" (K {tr['iwae_k']})", "btcvae": f" (TC weight beta {tr['beta_max']})"}.get(
        tr["objective"], f" (beta {tr['beta_max']}, {tr['beta_schedule']})")
    print(f"settings: {tr['objective']}{weight}, batch {tr['batch_size']}, lr {tr['lr']} "
          f"({tr['lr_schedule']}), seed {tr['seed']}")
    for t in d["layout"]:
        print(f"  {t['name']:<22} {str(tuple(t['shape'])):<14} offset {t['offset']}")
    if info["last_metrics"] is not None:
        print("last epoch: " + _last_epoch(info["last_metrics"], train_loss_name(info["last_metrics"]),
                                          units(mc["likelihood"])))
    return 0


def _last_epoch(row: dict, loss_name: str, unit: str) -> str:
    """A history row's losses as one phrase (the reader checks a row holds
    numbers or nulls only; a loss it lacks is left out)."""
    parts = [f"{name} {row[k]:.3f}" for k, name in (("train_neg_elbo", f"train {loss_name}"),
                                                       ("test_neg_elbo", "test -ELBO")) if row.get(k) is not None]
    return f"{', '.join(parts)} {unit}" if parts else "nothing recorded"


def _cmd_bench(a):
    from fastvae.bench import harness as benchmark
    from fastvae.backends.cpu.threads import set_threads
    set_threads(a.threads)
    if a.tf32 and not a.gpu:                # each was ignored
        raise ConfigError("--tf32 does something only with --gpu; drop it")
    if a.blas and a.gpu:
        raise ConfigError("--blas does something only without --gpu (the CPU backends); drop it")
    if a.name is not None and (os.path.basename(a.name) != a.name or a.name in (".", "..")):
        raise ConfigError(f"--name {a.name!r} is a file name for <name>.jsonl and .md inside --out; name the "
                          "folder with --out")
    benchmark.check_request(a.workloads, a.backends or (["cupy"] if a.gpu else []), a.seconds, a.dtype)
    if a.out:                       # before the timing (minutes) rather than after it
        out_folder(a.out, "bench writes <name>.jsonl and .md")
    name = a.name or ("gpu" if a.gpu else "cpu")
    save = (lambda rows: benchmark.save(rows, a.out, name)) if a.out else None     # after each workload too
    rows = benchmark.run(a.workloads, a.backends or (["cupy"] if a.gpu else None), a.dtype, a.seconds,
                         torch_peer=not a.no_torch, on_workload=save,
                         **(dict(torch_device="cuda", tf32=a.tf32) if a.gpu else dict(blas_names=a.blas)))
    print(benchmark.markdown(rows))
    if a.out:
        save(rows)
        print(f"wrote {os.path.join(a.out, name)}.jsonl and .md")
    return 0


def _cmd_backends(a):
    from fastvae import backends
    for b in backends.available():
        print(f"{b['name']:<8} {'available' if b['available'] else 'unavailable: ' + b['reason']}")
    from fastvae.backends.cpu.gemm_library import libraries
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
    a = parse(p, argv)
    if a.cmd is None:
        p.print_help()
        return 0
    cmd = {"train": _cmd_train, "eval": _cmd_eval, "info": _cmd_info, "backends": _cmd_backends,
           "bench": _cmd_bench, "plot": _cmd_plot, "interpolate": _cmd_interpolate,
           "inpaint": _cmd_inpaint}[a.cmd]
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with command_line():                 # messages name flags, not keywords (fastvae.naming)
            return cmd(a)
    except FastVAEError as exc:
        from fastvae.training.distributed import current
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
