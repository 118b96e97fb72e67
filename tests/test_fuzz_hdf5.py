"""Seeded structural fuzzing of the HDF5 readers: real checkpoints (their
header re-sealed, as any attacker can) and real data files, mutated mostly in
their HDF5 metadata (object headers, B-trees, heaps: every byte outside the
datasets' raw data). Each mutant must end in a clean one-line fastvae error or
a valid load, and every checkpoint accepted must be fully usable: evaluated
and resumed. The default suite runs a fast subset; ``pytest -m slow`` runs
the campaign (``FASTVAE_FUZZ_MUTANTS``, default 10,000 checkpoints and
2,000 data files) and prints its counts by outcome."""

import collections
import concurrent.futures
import json
import os
import sys
import time

import h5py
import numpy as np
import pytest

import fastvae
from fastvae import CheckpointError, DataError, FastVAEError, Trainer, TrainingDivergedError
from fastvae.io import checkpoint as ckpt
from fastvae.datasets.arrayfiles import read_arrays

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_trainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")    # crafted weights overflow, as they may

INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               2 ** 63 - 1, 2 ** 64 - 1]


def raw_extents(path):
    """``(start, stop)`` byte ranges of the datasets' raw data in ``path`` (a
    file the test wrote itself); everything else is HDF5 metadata."""
    out = []

    def visit(name, obj):
        if not isinstance(obj, h5py.Dataset) or obj.dtype.kind == "O":
            return
        if obj.chunks is None:
            off = obj.id.get_offset()
            if off is not None:
                out.append((off, off + obj.id.get_storage_size()))
        else:
            for i in range(obj.id.get_num_chunks()):
                info = obj.id.get_chunk_info(i)
                out.append((info.byte_offset, info.byte_offset + info.size))
    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return out


def metadata_positions(raw_len, extents, start):
    mask = np.ones(raw_len, bool)
    mask[:start] = False
    for a, b in extents:
        mask[a:b] = False
    return np.flatnonzero(mask)


def mutate(raw: bytes, meta: np.ndarray, rng) -> bytes:
    """1 to 3 seeded structural edits: bytes, bit flips, little-endian fields
    set to boundary values, copied runs, all mostly at metadata positions;
    sometimes a cut or a byte anywhere."""
    b = bytearray(raw)
    for _ in range(int(rng.integers(1, 4))):
        pos = int(meta[rng.integers(len(meta))]) if rng.random() < 0.9 else int(rng.integers(len(raw)))
        if pos >= len(b):               # cut shorter by an earlier edit
            continue
        kind = rng.integers(5)
        if kind == 0:
            b[pos] = int(rng.integers(256))
        elif kind == 1:
            b[pos] ^= 1 << int(rng.integers(8))
        elif kind == 2:
            width = int(rng.choice([1, 2, 4, 8]))
            value = int(rng.choice(INTERESTING + [len(b), int(rng.integers(1 << 31))])) % (1 << (8 * width))
            b[pos:pos + width] = value.to_bytes(width, "little")[:max(0, len(b) - pos)]
        elif kind == 3:
            src, n = int(meta[rng.integers(len(meta))]), int(rng.integers(4, 64))
            b[pos:pos + n] = b[src:src + n][:max(0, len(b) - pos)]
        elif rng.random() < 0.3:
            del b[pos:]
        else:
            b[pos] = int(rng.integers(256))
    return bytes(b)


def seal(raw: bytes) -> bytes:
    """``raw`` with a valid fastvae header (true SHA-256 of the rest)."""
    import hashlib
    return ckpt._header(ckpt.FORMAT_VERSION, hashlib.sha256(raw[ckpt.HEADER_SIZE:]).hexdigest()) + \
        raw[ckpt.HEADER_SIZE:]


def _one_line(exc):
    """The outcome a clean one-line error stands for: the sandboxed reader
    ``crashed`` (a signal), ``hung`` (stopped at its time limit), hit its
    ``cpu or memory limit``, or the file was ``refused`` by a check."""
    assert "\n" not in str(exc) and len(str(exc)) < 1000, str(exc)
    text = str(exc)
    if "the HDF5 reader crashed (" in text:
        return "crashed"
    if "the HDF5 reader took longer than its time limit" in text:
        return "hung"
    if ("the HDF5 reader used up its CPU-time limit" in text or "the HDF5 reader was killed" in text
            or "needs more memory than its size can back" in text):
        return "cpu or memory limit"
    return "refused"


def checkpoint_outcome(path, data_x):
    """The outcome of a clean CheckpointError (:func:`_one_line`), or for
    an accepted file, evaluated and resumed one epoch: ``"loaded"``, or
    ``"loaded, diverges"`` when its (finite, crafted) weights give a
    non-finite loss, which evaluation reports and a resumed run stops on
    with TrainingDivergedError, keeping the file."""
    try:
        model = fastvae.load(path)
    except CheckpointError as exc:
        return _one_line(exc)
    result = fastvae.evaluate(model, data_x.x_train[:64])
    epoch = model.checkpoint["epoch"]
    before = path.read_bytes()
    t = Trainer.from_checkpoint(path, epochs=epoch + 1, dataset=data_x, progress=False)
    try:
        t.fit(pictures=False)
    except TrainingDivergedError as exc:
        assert path.read_bytes() == before and "\n" not in str(exc)
        return "loaded, diverges"
    assert np.isfinite(result["neg_elbo"]) and t.epoch == epoch + 1
    assert np.isfinite(t.history[-1]["train_neg_elbo"])
    return "loaded"


def data_outcome(path):
    try:
        x, y, xt, yt = read_arrays(path)
    except DataError as exc:
        return _one_line(exc)
    assert isinstance(x, np.ndarray)
    return "loaded"


# ------------------------------------------------ the seeds: real files
@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    run = out / "run"
    t = tiny_trainer(run, epochs=1, n=200)
    t.fit(pictures=False)
    from fastvae import datasets
    x = datasets.make_sprites(200, seed=6, size=16)
    data = out / "data.h5"
    rng = np.random.default_rng(0)
    with h5py.File(data, "w") as f:
        f.create_dataset("x_train", data=(rng.random((60, 8, 8)) * 255).astype(np.uint8), chunks=(10, 8, 8),
                         compression="gzip")
        f.create_dataset("y_train", data=rng.integers(0, 3, 60))
        f.create_dataset("x_test", data=(rng.random((20, 8, 8)) * 255).astype(np.uint8))
        f.create_dataset("labels_text", data=["a", "b"], dtype=h5py.string_dtype())
    return {"checkpoint": run / "checkpoint.h5", "data": data, "x": x}


def campaign(seeds, kind, n, seed, workdir):
    path = seeds[kind]
    raw = path.read_bytes()
    meta = metadata_positions(len(raw), raw_extents(path), ckpt.HEADER_SIZE if kind == "checkpoint" else 0)
    rng = np.random.default_rng(seed)
    counts, seconds = collections.Counter(), {}
    for i in range(n):
        m = mutate(raw, meta, rng)
        folder = workdir / f"{kind}{i}"
        folder.mkdir()
        p = folder / ("checkpoint.h5" if kind == "checkpoint" else "data.h5")
        p.write_bytes(seal(m) if kind == "checkpoint" else m)
        t0 = time.perf_counter()
        try:
            counts[checkpoint_outcome(p, seeds["x"]) if kind == "checkpoint" else data_outcome(p)] += 1
        except FastVAEError as exc:      # an accepted file that then fails to evaluate or resume
            raise AssertionError(f"mutant {i} (seed {seed}) was accepted but is not usable: {exc}") from None
        seconds[kind] = seconds.get(kind, 0.0) + time.perf_counter() - t0
        for f in folder.iterdir():
            f.unlink() if f.is_file() else None
    return counts


def test_checkpoint_mutants_are_refused_cleanly_or_fully_usable(seeds, tmp_path):
    counts = campaign(seeds, "checkpoint", 120, seed=1, workdir=tmp_path)
    print("\nFUZZ checkpoint", dict(counts))
    assert sum(counts.values()) == 120
    assert set(counts) <= {"refused", "crashed", "hung", "cpu or memory limit", "loaded", "loaded, diverges"}
    assert counts["refused"] > 0 and counts["loaded"] > 0                  # the mutations reach the parser


def test_data_file_mutants_are_refused_cleanly_or_load(seeds, tmp_path):
    counts = campaign(seeds, "data", 80, seed=2, workdir=tmp_path)
    print("\nFUZZ data", dict(counts))
    assert sum(counts.values()) == 80 and counts["refused"] > 0 and counts["loaded"] > 0


def test_the_mutator_touches_metadata_not_only_raw_data(seeds):
    raw = seeds["checkpoint"].read_bytes()
    ext = raw_extents(seeds["checkpoint"])
    meta = metadata_positions(len(raw), ext, ckpt.HEADER_SIZE)
    assert ext and 0 < len(meta) < len(raw) - ckpt.HEADER_SIZE
    params = ckpt.read_checkpoint(seeds["checkpoint"])["params"]
    assert sum(b - a for a, b in ext) >= 3 * params.nbytes          # params, adam m and v are raw data


def _campaign_worker(args):
    seeds, kind, n, seed, workdir = args
    os.makedirs(workdir, exist_ok=True)
    import pathlib
    return campaign(seeds, kind, n, seed, pathlib.Path(workdir))


@pytest.mark.slow
def test_long_campaign(seeds, tmp_path):
    n_ckpt = int(os.environ.get("FASTVAE_FUZZ_MUTANTS", "10000"))
    n_data = max(1, n_ckpt // 5)
    jobs, workers = [], max(1, min(4, os.cpu_count() or 1))
    for kind, n in (("checkpoint", n_ckpt), ("data", n_data)):
        per = -(-n // workers)
        jobs += [(seeds, kind, min(per, n - w * per), 1000 + 17 * w + (kind == "data"),
                  str(tmp_path / f"{kind}-{w}")) for w in range(workers) if n - w * per > 0]
    totals = {"checkpoint": collections.Counter(), "data": collections.Counter()}
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for job, counts in zip(jobs, pool.map(_campaign_worker, jobs)):
            totals[job[1]].update(counts)
    print("\nFUZZ", json.dumps({k: dict(v) for k, v in totals.items()}))
    assert sum(totals["checkpoint"].values()) == n_ckpt and sum(totals["data"].values()) == n_data
