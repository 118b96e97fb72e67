"""How the benchmark times its contenders (fastvae/bench/timing.py): interleaved
chunks, rotated order, an untimed step before each chunk, quartiles."""

import pytest

from fastvae.backends.cpu.compare import compare
from fastvae.bench.timing import Contender, measure

from conftest import MNIST_DIR, needs_mnist


def test_contenders_are_timed_in_rotated_interleaved_chunks():
    log = []

    def contender(name):
        return Contender({"backend": name}, step=lambda: log.append(name), sync=lambda: log.append(name + "|"))

    cs = [contender("a"), contender("b"), contender("c"), Contender({"backend": "broken", "error": "no"})]
    measure(cs, seconds=0.0, min_chunks=3, settle=0, warm=0)
    for c in cs[:3]:
        assert c.k >= 1 and len(c.per) == 3
        assert c.row["chunks"] == 3 and c.row["steps_timed"] == 3 * c.k
        assert c.row["ms_p25"] <= c.row["ms_per_step"] <= c.row["ms_p75"]
    assert "ms_per_step" not in cs[3].row                      # an error row is reported, not timed
    # after one calibration step each: rounds a b c, b c a, c a b; each chunk is one untimed
    # step + sync, then k timed steps + sync
    calib, rounds = log[:6], log[6:]
    assert calib == ["a", "a|", "b", "b|", "c", "c|"]
    chunks, i = [], 0
    while i < len(rounds):
        name = rounds[i]
        k = cs["abc".index(name)].k
        assert rounds[i:i + 2 + k + 1] == [name, name + "|"] + [name] * k + [name + "|"]
        chunks.append(name)
        i += 3 + k
    assert chunks == list("abcbcacab")


def test_each_chunk_runs_its_enter_hook_then_untimed_steps_for_the_warm_time():
    """``enter`` (the contender's own settings) runs before its calibration
    step and before each chunk, untimed; then untimed steps go on until
    ``warm`` seconds have passed, and only then is the chunk timed."""
    import fastvae.bench.timing as T
    clock, log = {"t": 0.0}, []

    def step():
        clock["t"] += 0.004                    # 4 ms per step on the fake clock
        log.append("s")
    real = T.time.perf_counter
    T.time.perf_counter = lambda: clock["t"]
    try:
        c = Contender({"backend": "a"}, step=step, sync=lambda: None, enter=lambda: log.append("enter"))
        measure([c], seconds=0.0, min_chunks=2, settle=0, warm=0.01)
    finally:
        T.time.perf_counter = real
    assert c.k >= 1 and c.row["chunks"] == 2
    # calibration: enter + 1 step; each chunk: enter, 3 untimed steps (0, 4, 8 ms: under 10), k timed
    assert log[:2] == ["enter", "s"]
    chunk = ["enter"] + ["s"] * 3 + ["s"] * c.k
    assert log[2:] == chunk * 2
    assert c.row["ms_per_step"] == pytest.approx(4.0)


def test_compare_puts_each_option_in_force_in_rotated_rounds_and_takes_medians():
    """The start-up choices (--blas auto, --threads auto): per round each
    option in a rotated order, set, then one untimed and one timed call."""
    import time
    state, seen = {}, []

    def work():
        seen.append(state["on"])
        time.sleep({"a": 0.006, "b": 0.001, "c": 0.003}[state["on"]])
    ms = compare({k: (lambda k=k: state.update(on=k)) for k in "abc"}, work, rounds=3)
    assert seen == [k for k in "abcbcacab" for _ in (0, 1)]
    assert ms["b"] < ms["c"] < ms["a"] and 6.0 <= ms["a"] < 60.0   # sleep() never returns early


def test_markdown_adds_the_eager_pytorch_ratio_only_when_compile_was_faster():
    from fastvae.bench.harness import markdown

    def row(backend, ms, **kw):
        return dict(workload="w", backend=backend, ms_per_step=ms, images_per_s=1e3 / ms, warmup_s=0.1,
                    peak_gemm_gflops=1.0, env={}, **kw)

    cpu = [row("numba", 2.0, speedup_vs_torch=1.5), row("torch-fused", 3.0, speedup_vs_torch=1.0)]
    gpu = [row("cupy-graph", 0.2, speedup_vs_torch=1.5, speedup_vs_torch_eager=5.0),
           row("torch-compile", 0.3, speedup_vs_torch=1.0, speedup_vs_torch_eager=3.33)]
    for rows, cells, eager in ((cpu, 11, False), (gpu, 12, True)):
        table = [line for line in markdown(rows).splitlines() if line.startswith("|")]
        assert all(line.count("|") == cells + 1 for line in table)
        assert ("vs PyTorch eager" in table[0]) == eager
    assert "| 5.00x |" in markdown(gpu)
    alone = markdown([row("numpy", 4.0)])              # --no-torch: no peer, an empty ratio (it read "x")
    assert "| 250 |  | " in alone and "x |" not in alone.splitlines()[2]
    assert "left out" not in markdown(cpu)
    cpu[0].update(chunks=10, chunks_kept=7, probe_range=[1.4, 1.9, 1.95])
    cpu[1].update(chunks=10, chunks_kept=10, probe_range=[1.4, 1.9, 1.95])
    assert "probe 1.40-1.95; chunks" in markdown(cpu) and "left out: 3 of 20." in markdown(cpu)


def _bench_script(name):
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _epoch_time():
    return _bench_script("epoch_time")


def test_epochs_are_interleaved_in_rotated_rounds_and_slow_phases_flagged():
    mod = _epoch_time()
    log = []
    fns = [lambda n=n: (log.append(n), float(len(log)))[1] for n in "abc"]
    # probe i runs after epoch i (probe 0 before the first): 4 and 5 saw a core taken
    pr = iter([1.9, 1.9, 1.8, 1.9, 1.4, 1.5, 1.9, 1.9, 1.9, 1.9, 1.76, 1.9, 1.9])
    secs, clean, probes = mod.interleave(fns, epochs=4, settle=0, probe=lambda: next(pr), min_clean=2)
    assert log == list("abc" "bca" "cab" "abc")
    assert secs == [[1.0, 6.0, 8.0, 10.0], [2.0, 4.0, 9.0, 11.0], [3.0, 5.0, 7.0, 12.0]]
    assert len(probes) == 13
    # epoch j (the j-th run overall, 1-based) is clean when probes j-1 and j are > 1.75
    assert clean == [[True, False, True, True], [True, False, True, True], [True, False, True, True]]
    # with 3 clean epochs wanted after the first, a fifth round runs (and no more: 2 clean + 1)
    log.clear()
    pr = iter([1.9, 1.9, 1.8, 1.9, 1.4, 1.5, 1.9, 1.9, 1.9, 1.9, 1.76, 1.9, 1.9, 1.9, 1.9, 1.9, 1.9])
    secs, clean, probes = mod.interleave(fns, epochs=4, settle=0, probe=lambda: next(pr), min_clean=3)
    assert log == list("abc" "bca" "cab" "abc" "bca") and len(probes) == 16
    assert all(c == [True, False, True, True, True] for c in clean)
    # a machine that never settles: at most max_epochs rounds
    log.clear()
    secs, clean, probes = mod.interleave(fns, epochs=2, settle=0, probe=iter([1.9] + [1.0, 1.9] * 20).__next__,
                                         max_epochs=4)
    assert len(log) == 12 and len(secs[0]) == 4
    assert mod.typical([9.0, 1.0, 5.0, 2.0], [True, False, True, True]) == (3.5, 2)   # the slow-phase 1.0 is out
    assert mod.typical([9.0, 1.0, 5.0, 2.0], [True, False, False, True]) == (2.0, 1)  # < 2 clean: all from 2nd


@needs_mnist
def test_epoch_benchmark_on_real_mnist(tmp_path):
    import json
    import subprocess
    import sys
    mod = _epoch_time()
    r = subprocess.run([sys.executable, mod.__file__, "--epochs", "2", "--workloads", "784-400-20/b128",
                        "--backends", "numba", "numpy", "--settle", "0", "--min-clean", "0", "--out", str(tmp_path), "--name", "e",
                        "--data-dir", MNIST_DIR], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.load(open(tmp_path / "e.json"))["rows"]
    names = [row["backend"] for row in rows]
    assert names[:2] == ["numba", "numpy"]
    for row in rows:
        assert len(row["epoch_seconds"]) == 2 == len(row["clean"]) and len(row["probe_speedups"]) == 1 + 2 * len(rows)
        assert round(row["median_s"], 3) == row["epoch_seconds"][1] > 0          # one epoch after the first
        assert row["images_per_s"] == 24000 / row["median_s"] and row["adam_m_denormals"] >= 0
    if "torch-fused" in names:
        peer = rows[names.index("torch-fused")]["median_s"]
        assert rows[0]["vs_torch_fused"] == peer / rows[0]["median_s"]
    md = (tmp_path / "e.md").read_text()
    assert md.count("| 784-400-20/b128 |") == len(rows)


def test_epoch_benchmark_takes_the_mnist_and_sprites_workloads(tmp_path, monkeypatch, capsys):
    """784-input workloads (the MLPs and the seed's ConvNet, conv28) and the
    Burgess net on 64x64 sprites (conv64) reach the data loading; another
    input size is refused with the choices."""
    mod = _epoch_time()

    class Loaded(Exception):
        pass

    def load(cfg):
        raise Loaded
    monkeypatch.setattr(mod.datasets, "load", load)
    for w in ("conv28-20/b128", "784-400-20/b128", "conv64-10/b64"):
        monkeypatch.setattr("sys.argv", ["epoch_time", "--data-dir", str(tmp_path), "--workloads", w])
        with pytest.raises(Loaded):
            mod.main()
    monkeypatch.setattr("sys.argv", ["epoch_time", "--data-dir", str(tmp_path), "--workloads", "3072-512-64/b256"])
    assert mod.main() == 2
    err = capsys.readouterr().err
    assert "neither MNIST workloads" in err and "conv28-20/b128" in err and "conv64-L/bB" in err


def test_rounds_run_while_a_core_was_taken_are_left_out_and_more_rounds_run():
    from fastvae.bench.timing import CoreProbe, clean_intervals
    assert clean_intervals([1.9, 1.9, 1.4, 1.9, 1.8, 2.3]) == [True, False, False, True, True]
    # readings from earlier in the run set the bar for a call spent wholly in a taken-core phase
    assert clean_intervals([1.4, 1.45, 1.4]) == [True, True]
    assert clean_intervals([1.4, 1.45, 1.4], ref=[1.9, 1.95, 1.9, 1.4, 1.45, 1.4]) == [False, False]
    assert clean_intervals([1.4, 1.45, 1.8], floor=1.7) == [False, False]        # no better reading in the run
    assert CoreProbe(lambda: 1.0, floor=None).floor in (0.9, 1.7)
    # seconds per step: calibration, then (untimed, timed) per round; round 1's timed step is slow
    times = iter([0.05, 0.001, 0.001, 0.001, 0.009] + [0.001] * 100)     # a 50 ms calibration step: k = 1
    clock = {"t": 0.0}
    probes = iter([1.9, 1.9, 1.4] + [1.9] * 100)          # the reading after round 1 saw a core taken

    def step():
        clock["t"] += next(times)
    import fastvae.bench.timing as T
    real = T.time.perf_counter
    T.time.perf_counter = lambda: clock["t"]
    try:
        c = Contender({"backend": "a"}, step=step, sync=lambda: None)
        measure([c], seconds=0.01, min_chunks=2, settle=0, probe=CoreProbe(lambda: next(probes), floor=0.0),
                warm=0)
    finally:
        T.time.perf_counter = real
    # rounds 1 and 2 touch the 1.4 reading: their chunks are out, and rounds go on past the time
    # budget until two clean ones exist; the slow chunk (9 ms per step) is not in the median
    assert c.row["chunks"] == 4 and c.row["chunks_kept"] == 2
    assert c.row["ms_per_step"] == pytest.approx(1.0) and c.row["probe_range"] == [1.4, 1.9, 1.9]


def test_a_workload_timed_on_a_taken_core_is_timed_again_after_the_others(monkeypatch):
    import fastvae.bench.harness as B
    tries = []

    def fake_ours(name, wl, dtype, tf32, graph, blas=None):
        return [Contender({"backend": name, "warmup_s": 0.0}, step=lambda: None, sync=lambda: None)]

    def fake_measure(cs, seconds, settle=0.15, probe=None):
        w = next(k for k, v in B.WORKLOADS.items() if v is current["wl"])
        tries.append(w)
        bad = w == "784-1000-2/b32" and tries.count(w) < 3            # slow twice, then clean
        for c in cs:
            c.row.update(ms_per_step=1.0, ms_p25=1.0, ms_p75=1.0, chunks=5, chunks_kept=5,
                         probe_range=[1.9, 1.9, 1.9], taken_core=bad)
    current = {}

    def ours(name, wl, dtype, tf32, graph, blas=None, own_gemm=False):
        current["wl"] = wl
        return fake_ours(name, wl, dtype, tf32, graph)
    monkeypatch.setattr(B, "_ours", ours)
    monkeypatch.setattr(B, "measure", fake_measure)
    monkeypatch.setattr(B, "peak_gemm_gflops", lambda dtype: 100.0)
    ws = ["784-400-20/b128", "784-1000-2/b32", "4096-1000-50/b128"]
    rows = B.run(ws, ["numpy"], torch_peer=False, log=lambda *a: None, blas_names=["numpy"])
    assert tries == ["784-400-20/b128", "784-1000-2/b32", "4096-1000-50/b128", "784-1000-2/b32", "784-1000-2/b32"]
    assert [r["workload"] for r in rows] == ws and not any(r["taken_core"] for r in rows)
    tries.clear()
    rows = B.run(ws, ["numpy"], torch_peer=False, log=lambda *a: None, retries=1,   # gives up: marked
                 blas_names=["numpy"])
    assert [r["taken_core"] for r in rows] == [False, True, False]
    assert "1.000\u2020" in B.markdown(rows) and "not to be trusted" in B.markdown(rows)


def test_the_readme_summary_table_comes_from_the_result_files(tmp_path):
    """bench/summary_table.py: per workload Numba's and PyTorch's step times
    (PyTorch's faster Adam), the step ratios (the last file naming it wins),
    the epoch ratios, Numba's step over its GEMMs alone, their time, the FLOP
    floor and the warm-up; failed rows are no columns, a missing one an empty cell."""
    import json
    mod = _bench_script("summary_table")

    def step(w, b, x, ms, g=None):
        return {"bench": "step_time", "workload": w, "backend": b, "speedup_vs_torch": x, "ms_per_step": ms,
                **({"x_gemm_only": g, "gemm_only_ms": ms / g, "flops_floor_ms": 0.5 * ms, "warmup_s": 0.25}
                   if g else {})}
    first, again, epochs = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "e.json"
    first.write_text("".join(json.dumps(r) + "\n" for r in [
        step("m/b8", "numba", 1.2, 2.5, 1.1), step("m/b8", "numpy", 0.9, 3.3), step("m/b8", "torch-fused", 1.0, 3.1),
        step("m/b8", "torch-foreach", 0.97, 3.0), step("c/b4", "numba", 0.5, 40.0, 1.6),
        {"bench": "step_time", "workload": "c/b4", "backend": "numpy", "error": "x"}]))
    again.write_text(json.dumps(step("m/b8", "numba", 1.25, 2.4, 1.05)) + "\n")
    epochs.write_text(json.dumps({"rows": [{"workload": "m/b8", "backend": "numba", "vs_torch_fused": 1.3},
                                           {"workload": "m/b8", "backend": "torch-fused", "vs_torch_fused": 1.0}]}))
    lines = mod.table([str(first), str(again)], [str(epochs)]).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == 12
    assert lines[2:] == ["| m/b8 | 2.40 | 3.00 | 1.25x | 0.90x | 1.30x |  | 1.05 | 2.29 | 1.20 | 0.25 |",
                         "| c/b4 | 40.0 |  | 0.50x |  |  |  | 1.60 | 25.0 | 20.0 | 0.25 |"]
