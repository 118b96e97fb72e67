"""The benchmark harness behind ``fastvae bench`` and ``bench/step_time.py``.

For each workload and each backend that can run here, and for PyTorch when it
is installed (same architecture, Adam, batch; eager, its default ``foreach``
Adam and ``fused=True``, the faster one is the peer), all in one process:

* warm-up seconds: the first training step (Numba compile or cache load,
  CuPy kernel compilation, allocations) -- reported, never mixed into speed;
* ms per step: median over chunks of steps (each chunk timed as a whole and
  synchronised at its end), a step being ``eps`` draw + forward + backward +
  Adam on a resident batch; for the cupy backend also ``cupy-graph``, the
  same step replayed as a CUDA graph (its capture counted as warm-up), and
  ``cupy-owngemm``, the eager step on the graph's own GEMM kernel (CuPy
  refuses cuBLAS inside a capture), whose GEMMs alone are the graph's. All
  contenders of a workload (backends, their GEMM replays, PyTorch) are timed
  interleaved, chunk by chunk (:func:`measure`), so drift on a shared machine
  reaches them alike; the quartiles over chunks are reported with the median;
* images/s, achieved GFLOP/s (exact GEMM FLOPs of the step);
* the floor: the same step's GEMMs alone (the exact calls, replayed) timed in
  the same run, and FLOPs / measured peak GEMM rate (a 2048^3 GEMM);
* each CPU backend once per GEMM library that loads (:mod:`fastvae.backends.cpu.gemm_library`:
  NumPy's BLAS as ``numba``, Intel MKL as ``numba+mkl``), each with its own
  GEMM replay: the GEMM-only time per library.

Output: JSON lines (one per measurement, with machine, library versions,
thread settings, date) and a Markdown table.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from typing import Callable, List, Optional

import numpy as np

from fastvae import backends as _backends
from fastvae.backends.cpu import gemm_library as _blas
from fastvae.nn.model import VAE
from fastvae.optim.adam import Adam
from fastvae.backends.cpu.threads import fit_backend
from fastvae.bench.timing import (Contender, CoreProbe, GemmRecorder, gemm_flops, gpu_peak_gemm_gflops, measure,
                     peak_gemm_gflops)
from fastvae.bench.workloads import WORKLOADS, workload  # noqa: F401  (fastvae.bench.harness.WORKLOADS: the bench scripts')
from fastvae.bench.workloads import config as workload_config

CPU_BACKENDS = ("numpy", "numba")


def check_request(workloads: Optional[List[str]], backend_names: List[str], seconds: float = 3.0,
                  dtype: str = "float32") -> None:
    """Raise ConfigError for a workload it cannot read or build here
    (:func:`fastvae.bench.workloads.workload`), an unknown dtype or a timing budget
    ``seconds`` that is not a positive number, and BackendUnavailableError
    (with the reason) for a backend that cannot run here."""
    from fastvae.checks import _choice, _finite_nonneg
    from fastvae.config import DTYPES
    from fastvae.errors import BackendUnavailableError
    from fastvae.naming import option
    _finite_nonneg(option("seconds"), seconds, positive=True)
    _choice(option("dtype"), dtype, DTYPES)             # a float16 bench timed for minutes before failing
    for w in workloads or []:
        workload(w)                               # a name it cannot read, or a model that cannot be built here
    ok = {b["name"]: b for b in _backends.available()}
    for name in backend_names:
        if name not in ok or not ok[name]["available"]:
            why = ok[name]["reason"] if name in ok else f"unknown; choose from {sorted(ok)}"
            raise BackendUnavailableError(f"cannot benchmark backend {name!r}: {why}")


def training_step(name: str, wl: dict, dtype="float32", tf32=False, graph=False):
    """``(backend, model, step)`` where ``step()`` is one training step of
    workload ``wl`` (eps draw, forward, backward, Adam) on a resident batch;
    ``tf32`` applies to the cupy backend's float32 GEMMs; ``graph`` replays
    the step as a CUDA graph (the first call eager, the second captured)."""
    be = _backends.get(name, dtype)
    if be.name == "cupy":
        be.tf32 = bool(tf32)
    cfg = workload_config(wl, dtype)
    B = wl["batch_size"]
    model = VAE(cfg, be, seed=0)
    opt = Adam.for_model(model)
    rng = be.new_rng([0, 1])
    x = be.asarray(np.random.default_rng(1).random((B, cfg.input_dim)))
    ws = model.workspace(B)

    def step():
        rng.normal_(ws.eps)
        model.loss_and_grad(x, ws.eps, 1.0)
        opt.step()
    if graph:
        from fastvae.backends.cupy.cuda_graph import StepGraphs
        graphs = StepGraphs(be)
        return be, model, lambda: graphs("step", step)
    return be, model, step


def _ours(name: str, wl: dict, dtype="float32", tf32=False, graph=False, blas=None, own_gemm=False) -> List[Contender]:
    """The training step of fastvae backend ``name`` (warmed up) and, for an
    eager step, the replay of its GEMMs (the exact calls, recorded); ``blas``:
    the GEMM library of a CPU backend (:mod:`fastvae.backends.cpu.gemm_library`; labelled
    ``name+blas`` unless it is NumPy's)."""
    t0 = time.perf_counter()
    be, model, step = training_step(name, wl, dtype, tf32, graph)
    if own_gemm:
        be.own_gemm = True            # the eager step on the GEMM kernel of graph steps (cupy)
    if blas is not None:
        _blas.use(be, blas)
    if be.device == "cpu":
        fit_backend(be, model)
    with GemmRecorder(be) as rec:
        step()
        be.synchronize()
    if graph:
        step()                  # the capture
        be.synchronize()
    warmup = time.perf_counter() - t0
    calls = rec.calls

    def gemms():
        for c in calls:
            be.gemm(*c)

    label = (name + ("-graph" if graph else "-owngemm" if own_gemm else "")
             + (f"+{blas}" if blas not in (None, "numpy") else ""))
    enter = (lambda: fit_backend(be, model)) if be.device == "cpu" else None
    main = Contender({"backend": label, "warmup_s": warmup, "step_gflop": gemm_flops(calls) / 1e9,
                      "gemm_calls": len(calls), "device": be.device, "adam_threads": getattr(be, "adam_threads", None),
                      "copy_threads": getattr(be, "copy_threads", None),
                      **({"gemm_kernel": "fastvae"} if getattr(be, "own_gemm", False) else {}),   # not cuBLAS
                      **({"blas": be.blas.version()} if hasattr(be, "blas") else {})}, step, be.synchronize, enter)
    return [main] if graph else [main, Contender({"gemms_of": label}, gemms, be.synchronize, enter)]


def _rows(contenders: List[Contender]) -> List[dict]:
    """The rows, each GEMM replay's time folded into its step's row as ``gemm_only_ms``."""
    rows = {c.row["backend"]: c.row for c in contenders if "backend" in c.row}
    for c in contenders:
        if "gemms_of" in c.row:
            rows[c.row["gemms_of"]]["gemm_only_ms"] = c.row["ms_per_step"]
    return list(rows.values())


def bench_backend(name: str, wl: dict, dtype="float32", seconds=3.0, tf32=False, graph=False,
                  settle=0.15) -> dict:
    """Measure one fastvae backend on one workload (see module docstring)."""
    cs = _ours(name, wl, dtype, tf32, graph)
    measure(cs, seconds, settle=settle)
    return _rows(cs)[0]


def _torch(wl: dict, dtype="float32", device="cpu", tf32=False) -> List[Contender]:
    """PyTorch twin: eager with Adam(foreach) and Adam(fused=True); on a GPU
    also ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) with fused
    Adam. Raises ImportError without PyTorch, RuntimeError when it sees no
    CUDA device in GPU mode."""
    import torch
    from fastvae.bench import torch_twin as torch_ref
    if device != "cpu" and not torch.cuda.is_available():
        raise RuntimeError(f"this PyTorch ({torch.__version__}) sees no CUDA device")
    cfg = workload_config(wl, dtype)
    B = wl["batch_size"]
    sync = (lambda: torch.cuda.synchronize()) if device != "cpu" else (lambda: None)
    if device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    rows = []
    variants = ("foreach", "fused") if device == "cpu" else ("foreach", "fused", "compile")
    for variant in variants:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        tm = torch_ref.build(cfg, device=device)
        dt = next(tm.parameters()).dtype
        x = torch.rand(B, cfg.input_dim, dtype=dt, device=device)
        try:
            opt = torch.optim.Adam(tm.parameters(), lr=1e-3, **({"foreach": True} if variant == "foreach"
                                                                 else {"fused": True}))
        except (RuntimeError, TypeError) as exc:
            rows.append(Contender({"backend": f"torch-{variant}", "error": str(exc)}))
            continue

        def eager_step():
            eps = torch.randn(B, cfg.latent_dim, dtype=dt, device=device)
            rec, kl = tm.losses(x, eps)
            loss = (rec + kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step = eager_step
        if variant == "compile":
            fwd_bwd = torch.compile(lambda xb, e: (lambda r: (r[0] + r[1]).mean())(tm.losses(xb, e)),
                                    mode="reduce-overhead")

            def step():
                eps = torch.randn(B, cfg.latent_dim, dtype=dt, device=device)
                loss = fwd_bwd(x, eps)
                opt.zero_grad(set_to_none=False)
                loss.backward()
                opt.step()
            for _ in range(3):      # compile and record the graphs: part of warm-up
                step()

        step()
        sync()
        rows.append(Contender({"backend": f"torch-{variant}", "warmup_s": time.perf_counter() - t0,
                               "device": device, "torch_threads": torch.get_num_threads()}, step, sync))
    return rows


def bench_torch(wl: dict, dtype="float32", seconds=3.0, device="cpu", tf32=False, settle=0.15) -> List[dict]:
    """Measure the PyTorch variants of :func:`_torch` (interleaved)."""
    cs = _torch(wl, dtype, device, tf32)
    measure(cs, seconds, settle=settle)
    return _rows(cs)


def environment() -> dict:
    from fastvae import __version__
    from fastvae.backends.cpu.threads import current
    env = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
           "processor": _cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "numpy": np.__version__, "fastvae": __version__, "threads": current(),
           "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}
    for mod in ("numba", "torch", "cupy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


def blas_line(env: dict) -> str:
    """The BLAS libraries of an :func:`environment` record as a results
    footer names them, e.g. ``openblas 2 threads (SkylakeX)``: the kernels a
    library picked (``OPENBLAS_CORETYPE`` changes them) decide its GEMM speed."""
    return ", ".join(f"{b['library']} {b['threads']} threads ({b['architecture']})"
                     for b in (env.get("threads") or {}).get("blas", []))


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(workloads: Optional[List[str]] = None, backend_names: Optional[List[str]] = None,
        dtype="float32", seconds=3.0, torch_peer=True, log=print, torch_device="cpu",
        tf32=False, settle: Optional[float] = None, retries: int = 2,
        blas_names: Optional[List[str]] = None, on_workload: Optional[Callable[[List[dict]], None]] = None,
        ) -> List[dict]:
    """Measure everything asked for; returns the JSON rows (one per measurement).
    ``torch_device="cuda"`` compares against PyTorch on the GPU; ``tf32``
    enables TF32 GEMMs on both sides (GPU only); ``settle``: seconds of idle
    before each timed chunk (see :func:`measure`; default 0.15 on the CPU,
    :data:`fastvae.backends.cpu.gemm_library.SETTLE_S` when MKL is timed, 0 on a GPU). On the
    CPU a workload timed while the host held part of a core (fewer clean
    chunks than needed, ``taken_core`` in its rows) is timed again after the
    others, up to ``retries`` times; the last try is kept.
    ``blas_names``: the GEMM libraries each CPU backend is timed with
    (default: every one that loads, :func:`fastvae.backends.cpu.gemm_library.available`).
    ``on_workload(rows)``: called with the rows so far (in ``workloads``
    order) as each workload is done, so that a run cut short (a time limit,
    Ctrl-C) keeps what it measured (``fastvae bench --out`` saves them)."""
    workloads = list(dict.fromkeys(workloads or WORKLOADS))          # a name given twice is timed once
    avail = [b["name"] for b in _backends.available() if b["available"]]
    names = [n for n in (backend_names or avail) if n in avail]
    libs = blas_names or _blas.available()
    for lib in libs:
        _blas.load(lib)               # a missing library fails here, before anything is timed
    if settle is None:                # MKL's OpenMP threads spin longer than OpenBLAS's
        settle = 0.0 if torch_device != "cpu" else _blas.SETTLE_S if "mkl" in libs else 0.15
    env = environment()
    probe = CoreProbe() if torch_device == "cpu" else None      # one bar for the whole run
    peak = peak_gemm_gflops(dtype) if torch_device == "cpu" else gpu_peak_gemm_gflops(dtype, tf32)
    done, queue = {}, [(w, 0) for w in workloads]
    while queue:
        wname, attempt = queue.pop(0)
        wl = workload(wname)
        B = wl["batch_size"]
        cs = []
        for n, graph, own in [(n, g, o) for n in names for g, o in ((False, False), (False, True), (True, False))
                              if not (g or o) or n == "cupy"]:
            for lib in (libs if n in CPU_BACKENDS else [None]):
                cs += _ours(n, wl, dtype, tf32, graph, lib, own)
        if torch_peer:
            try:
                cs += _torch(wl, dtype, torch_device, tf32)
            except ImportError:
                pass
            except RuntimeError as exc:          # e.g. a PyTorch built without CUDA in GPU mode
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                log(f"{wname:18s} PyTorch on {torch_device} unavailable: {why}")
                cs.append(Contender({"backend": "torch", "error": why}))
        # on the CPU: rounds run while the host held part of a core are left out
        measure(cs, seconds, settle=settle, probe=probe)
        if attempt < retries and any(c.row.get("taken_core") for c in cs):
            log(f"{wname:18s} timed while the host held part of a core: timed again after the others")
            queue.append((wname, attempt + 1))
            continue
        group = _rows(cs)
        rows = done[wname] = []
        eager = {r["backend"]: r for r in group}
        for r in group:
            if r["backend"].endswith("-graph"):     # the GEMMs alone are those of the eager step on its kernel
                r["gemm_only_ms"] = eager[r["backend"][:-len("-graph")] + "-owngemm"].get("gemm_only_ms")
            if "error" not in r:
                log(f"{wname:18s} {r['backend']:14s} {r['ms_per_step']:8.3f} ms/step "
                    f"(quartiles {r['ms_p25']:.3f}-{r['ms_p75']:.3f}; warm-up {r['warmup_s']:.2f} s)")
        ok_torch = [r for r in group if r["backend"].startswith("torch") and "error" not in r]
        peer = min(ok_torch, key=lambda r: r["ms_per_step"]) if ok_torch else None
        eager_torch = [r for r in ok_torch if r["backend"] != "torch-compile"]
        eager_peer = min(eager_torch, key=lambda r: r["ms_per_step"]) if eager_torch else None
        flop = next((r["step_gflop"] for r in group if "step_gflop" in r), None)
        for r in group:
            if "error" in r:
                rows.append({"bench": "step_time", "workload": wname, **r, "env": env})
                continue
            r.update(bench="step_time", workload=wname, dtype=dtype, batch_size=B,
                     images_per_s=B / r["ms_per_step"] * 1e3, peak_gemm_gflops=peak)
            if flop:
                r["step_gflop"] = flop
                r["gflops_per_s"] = flop / r["ms_per_step"] * 1e3
                r["flops_floor_ms"] = flop / peak * 1e3
            if r.get("gemm_only_ms"):
                r["x_gemm_only"] = r["ms_per_step"] / r["gemm_only_ms"]
            if peer:
                r["torch_peer"] = peer["backend"]
                r["speedup_vs_torch"] = peer["ms_per_step"] / r["ms_per_step"]
            if eager_peer and eager_peer is not peer:       # on a GPU: against eager PyTorch too
                r["speedup_vs_torch_eager"] = eager_peer["ms_per_step"] / r["ms_per_step"]
            r["env"] = env
            rows.append(r)
        if on_workload is not None:
            on_workload([r for w in workloads if w in done for r in done[w]])
    return [r for w in workloads for r in done[w]]


def markdown(rows: List[dict]) -> str:
    """A Markdown table of the rows (speed-ups against the fastest PyTorch
    variant, and against eager PyTorch where torch.compile was faster)."""
    eager = any("speedup_vs_torch_eager" in r for r in rows)
    head = ("| workload | backend | ms/step | quartiles | images/s | vs PyTorch | " + ("vs PyTorch eager | " if eager else "")
            + "GEMMs alone ms | x GEMMs alone | GFLOP/s | FLOP floor ms | warm-up s |\n|"
            + "---|" * (12 if eager else 11) + "\n")
    f = lambda v, p=2: "" if v is None else f"{v:.{p}f}"
    x = lambda v: "" if v is None else f"{v:.2f}x"          # a ratio; empty without a peer (--no-torch)
    lines = []
    for r in rows:
        if "error" in r:
            continue
        q = f"{f(r.get('ms_p25'), 3)}-{f(r.get('ms_p75'), 3)}" if "ms_p25" in r else ""
        taken = "\u2020" if r.get("taken_core") else ""
        lines.append(f"| {r['workload']} | {r['backend']} | {f(r['ms_per_step'], 3)}{taken} | {q} | {f(r['images_per_s'], 0)} | "
                     f"{x(r.get('speedup_vs_torch'))} | "
                     + (f"{x(r.get('speedup_vs_torch_eager'))} | " if eager else "")
                     + f"{f(r.get('gemm_only_ms'), 3)} | {f(r.get('x_gemm_only'))} | "
                     f"{f(r.get('gflops_per_s'), 0)} | {f(r.get('flops_floor_ms'), 3)} | {f(r['warmup_s'])} |")
    env = rows[0]["env"] if rows else {}
    foot = (f"\n{env.get('processor')}, {env.get('cpus')} CPUs; {blas_line(env)}; numpy {env.get('numpy')}, "
            f"numba {env.get('numba')}, torch {env.get('torch')}; {env.get('date')}. "
            f"Peak GEMM (measured) {rows[0]['peak_gemm_gflops']:.0f} GFLOP/s; "
            f"devices: {sorted({r.get('device', '') for r in rows if 'error' not in r})}."
            + _kept_note(rows) + "\n" if rows else "")
    return head + "\n".join(lines) + "\n" + foot


def _kept_note(rows: List[dict]) -> str:
    timed = [r for r in rows if "probe_range" in r]
    if not timed:
        return ""
    out = sum(r["chunks"] - r["chunks_kept"] for r in timed)
    lo, hi = min(r["probe_range"][0] for r in timed), max(r["probe_range"][2] for r in timed)
    note = (f" All-core GEMM speedup probe {lo:.2f}-{hi:.2f}; chunks timed while the host held part of a core "
            f"(probe under 0.9 of its typical best, or under 1.7 with two BLAS threads or more) left out: "
            f"{out} of {sum(r['chunks'] for r in timed)}.")
    if any(r.get("taken_core") for r in timed):
        note += " \u2020: every try of that workload found too few clean chunks (its times are not to be trusted)."
    return note


def save(rows: List[dict], folder: str, name: str = "cpu") -> None:
    """``<name>.jsonl`` (a row a line) and ``<name>.md`` in ``folder``, each
    written anew and renamed over the name (:func:`fastvae.training.runfolder.atomic_write`;
    RunFolderError in one line when it cannot be written, the previous file kept)."""
    from fastvae.training.runfolder import atomic_write_text
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(os.path.join(folder, name + ".jsonl"), "".join(json.dumps(r, default=str) + "\n" for r in rows))
    atomic_write_text(os.path.join(folder, name + ".md"), markdown(rows))
