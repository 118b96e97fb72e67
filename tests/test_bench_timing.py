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
