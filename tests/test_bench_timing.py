"""How the benchmark times its contenders (fastvae/timing.py): interleaved
chunks, rotated order, an untimed step before each chunk, quartiles."""

from fastvae.timing import Contender, measure


def test_contenders_are_timed_in_rotated_interleaved_chunks():
    log = []

    def contender(name):
        return Contender({"backend": name}, step=lambda: log.append(name), sync=lambda: log.append(name + "|"))

    cs = [contender("a"), contender("b"), contender("c"), Contender({"backend": "broken", "error": "no"})]
    measure(cs, seconds=0.0, min_chunks=3, settle=0)
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


def test_markdown_adds_the_eager_pytorch_ratio_only_when_compile_was_faster():
    from fastvae.benchmark import markdown

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
