"""Philox4x32-10 on the host: the reference for the GPU generator.

Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as 1, 2,
3" (SC'11). A counter-based generator: block ``b`` of 4 uint32 words is
``philox(key=(k0, k1), counter=(b_lo, b_hi, stream, 0))``, so the state of a
stream is just its key and the next block index, which checkpoints store as
JSON. ``kernels/cuda_kernels.cu`` computes the identical words on the GPU;
this module is used to test it and to draw the same numbers on the host.
"""

from __future__ import annotations

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr, key) -> np.ndarray:
    """Philox4x32-10 of counters ``ctr (N, 4) uint32`` under ``key (2,) uint32``
    -> ``(N, 4) uint32``."""
    c = np.asarray(ctr, dtype=np.uint32).reshape(-1, 4).astype(np.uint64)
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    c0, c1, c2, c3 = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    with np.errstate(over="ignore"):
        for _ in range(10):
            p0, p1 = M0 * c0, M1 * c2
            hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK
            hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK
            c0, c1, c2, c3 = (hi1 ^ c1 ^ np.uint64(k0)), lo1, (hi0 ^ c3 ^ np.uint64(k1)), lo0
            k0, k1 = np.uint32(k0 + W0), np.uint32(k1 + W1)
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def key_from_seed(seed) -> tuple:
    """A 64-bit key (two uint32) from an int or a list of ints (SeedSequence hashing)."""
    k = np.random.SeedSequence(seed).generate_state(2, np.uint32)
    return int(k[0]), int(k[1])


def words(n: int, counter: int, key, stream: int = 0) -> np.ndarray:
    """The first ``n`` uint32 words of the stream from block ``counter``."""
    blocks = (n + 3) // 4
    b = np.arange(blocks, dtype=np.uint64) + np.uint64(counter)
    ctr = np.stack([(b & _MASK).astype(np.uint32), (b >> np.uint64(32)).astype(np.uint32),
                    np.full(blocks, stream, np.uint32), np.zeros(blocks, np.uint32)], axis=1)
    return philox4x32_10(ctr, key).reshape(-1)[:n]


def normals(n: int, counter: int, key, stream: int = 0) -> np.ndarray:
    """N(0, 1) float64 exactly as the GPU's ``philox_normal`` draws them
    (Box-Muller on (u + 1/2) / 2^32)."""
    w = words(((n + 3) // 4) * 4, counter, key, stream).reshape(-1, 4).astype(np.float64)
    u = (w + 0.5) * 2.0 ** -32
    r0, t0 = np.sqrt(-2 * np.log(u[:, 0])), 2 * np.pi * u[:, 1]
    r1, t1 = np.sqrt(-2 * np.log(u[:, 2])), 2 * np.pi * u[:, 3]
    return np.stack([r0 * np.cos(t0), r0 * np.sin(t0), r1 * np.cos(t1), r1 * np.sin(t1)], axis=1).reshape(-1)[:n]


STATE_KIND = "philox4x32-10"


def check_state(state) -> tuple:
    """``(key, counter)`` of a Philox stream's JSON state ``{"kind":
    "philox4x32-10", "key": [k0, k1], "counter": c}``: the key two 32-bit
    words, the counter a 64-bit block count. ValueError naming the part that
    is not (the caller checked ``kind``)."""
    key, counter = state.get("key"), state.get("counter")
    word = lambda v, bits: type(v) is int and 0 <= v < 1 << bits
    for name, ok, value in (("key", isinstance(key, list) and len(key) == 2 and all(word(k, 32) for k in key), key),
                            ("counter", word(counter, 64), counter)):
        if not ok:
            raise ValueError(f"invalid philox4x32-10 random-number state ({name} {str(value)[:60]})")
    return tuple(key), counter
