"""Checkpoints are untrusted input (issue 12, part 1): crafted files whose
SHA-256 header is VALID must still end in one CheckpointError line, read
nothing from outside their own bytes and allocate nothing they cannot back."""

import contextlib
import io
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastvae
from fastvae import CheckpointError
from fastvae.io import checkpoint as ckpt
from fastvae import cli
from fastvae.io.restore import load_model

from conftest import PEAK_RSS, PY, fv, tiny_trainer
from fastvae import datasets

SPRITES16 = datasets.make_sprites(400, seed=6, size=16)     # tiny_trainer's data


def seal(path):
    """Stamp a valid fastvae header (format 2, true SHA-256) on an HDF5 file
    written with a 512-byte user block: what an attacker can always do."""
    with open(path, "rb+") as fh:
        digest = ckpt._file_digest(fh)
        fh.seek(0)
        fh.write(ckpt._header(ckpt.FORMAT_VERSION, digest))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real checkpoint's parts (host data) to rebuild crafted files from."""
    out = tmp_path_factory.mktemp("good")
    t = tiny_trainer(out, epochs=1)
    t.fit(pictures=False)
    return ckpt.read_checkpoint(out / "checkpoint.h5")


def craft(path, good, params=None, texts=None, extra=None):
    """Write a checkpoint from ``good``'s parts; ``params(f, data)`` writes the
    params member (default: a plain dataset), ``texts`` overrides JSON texts,
    ``extra(f)`` adds anything else (attributes too); then seal it. Its only
    attributes are the format, its version, backend and dtype."""
    texts = dict({k: json.dumps(good[k]) for k in ("layout", "config", "state", "history")}, **(texts or {}))
    with h5py.File(path, "w", userblock_size=512) as f:
        f.attrs["format"] = ckpt.FORMAT_NAME
        f.attrs["format_version"] = ckpt.FORMAT_VERSION
        f.attrs["backend"] = "numpy"
        f.attrs["dtype"] = "float32"
        (params or (lambda f, p: f.create_dataset("params", data=p)))(f, good["params"])
        for k, v in texts.items():
            f.create_dataset(k, data=v)
        if extra:
            extra(f)
    seal(path)
    return path


def test_the_crafting_helper_makes_loadable_files(tmp_path, good):
    p = craft(tmp_path / "ok.h5", good)
    d = ckpt.read_checkpoint(p)
    np.testing.assert_array_equal(d["params"], good["params"])
    load_model(p)


def test_external_raw_storage_is_refused(tmp_path, good):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(len(good["params"]), dtype=np.float32).tobytes())

    def external(f, p):
        f.create_dataset("params", shape=p.shape, dtype=p.dtype, external=[(str(secret), 0, p.nbytes)])
    p = craft(tmp_path / "ext.h5", good, params=external)
    with pytest.raises(CheckpointError, match="external file"):
        ckpt.read_checkpoint(p)


def test_external_and_soft_links_are_refused(tmp_path, good):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("params", data=good["params"])
    p = craft(tmp_path / "xl.h5", good, params=lambda f, _: f.__setitem__("params", h5py.ExternalLink(str(other),
                                                                                                   "/params")))
    with pytest.raises(CheckpointError, match="is a link to another file, which would read another object or file"):
        ckpt.read_checkpoint(p)

    def soft(f, p):
        f.create_dataset("hidden", data=p)
        f["params"] = h5py.SoftLink("/hidden")
    p = craft(tmp_path / "sl.h5", good, params=soft)
    with pytest.raises(CheckpointError, match="is a soft link, which would read|unexpected members"):
        ckpt.read_checkpoint(p)


def test_virtual_datasets_are_refused(tmp_path, good):
    other = tmp_path / "src.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=good["params"])

    def virtual(f, p):
        lay = h5py.VirtualLayout(shape=p.shape, dtype=p.dtype)
        lay[:] = h5py.VirtualSource(str(other), "x", shape=p.shape)
        f.create_virtual_dataset("params", lay)
    p = craft(tmp_path / "vds.h5", good, params=virtual)
    with pytest.raises(CheckpointError, match="virtual"):
        ckpt.read_checkpoint(p)


def test_filters_fastvae_never_writes_are_refused(tmp_path, good):
    p = craft(tmp_path / "gz.h5", good,
              params=lambda f, p: f.create_dataset("params", data=p, compression="gzip", chunks=True))
    with pytest.raises(CheckpointError, match="filter"):
        ckpt.read_checkpoint(p)


def test_unexpected_members_and_dtypes_are_refused(tmp_path, good):
    p = craft(tmp_path / "m.h5", good, extra=lambda f: f.create_dataset("payload", data=np.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected members"):
        ckpt.read_checkpoint(p)
    p = craft(tmp_path / "d.h5", good, params=lambda f, p: f.create_dataset("params", data=p.astype(np.int32)))
    with pytest.raises(CheckpointError, match="expected a vector"):
        ckpt.read_checkpoint(p)


def test_a_small_file_declaring_a_huge_dataset_allocates_nothing(tmp_path, good):
    """A ~10 KB file declaring 5e8 float32 (2 GB) params: refused from the
    declared shape, peak memory of the reading process stays small."""
    n = 500_000_000
    layout = [{"name": "w", "shape": [n], "offset": 0}]
    p = craft(tmp_path / "huge.h5", good, params=lambda f, _: f.create_dataset("params", shape=(n,), dtype="f4"),
              texts={"layout": json.dumps(layout)})
    assert os.path.getsize(p) < 100_000
    code = ("import fastvae.io.checkpoint as c\n"
            "try:\n    c.read_checkpoint(%r)\nexcept c.CheckpointError as e:\n    print('ERR', e)\n" % str(p)) + PEAK_RSS
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "ERR" in out and "more than the whole file" in out
    rss = float(out.split("RSS_MB")[1])
    assert rss < 400, f"peak RSS {rss:.0f} MB while refusing a 2 GB declaration"


@pytest.mark.parametrize("key,text,needle", [
    ("config", "[1, 2]", "config must be dict"),
    ("config", '{"model": 3}', "config 'model' must be dict"),
    ("state", '{"epoch": "x", "step": 0}', "'epoch' must be int"),
    ("state", '{"epoch": -1, "step": 0}', "'epoch' must be int >= 0"),
    ("state", '{"epoch": true, "step": 0}', "'epoch' must be int"),
    ("state", '{"epoch": 1, "step": 0, "data_rows": [5]}', "'data_rows' holds 1 numbers, not 2"),
    ("state", '{"epoch": 1, "step": 0, "data_rows": [5, -1]}', "'data_rows' must be int >= 0"),
    ("state", '{"epoch": 1, "step": 0, "data_rows": [0, 5]}', "'data_rows' must be int >= 1"),
    ("state", '{"epoch": 1, "step": 0, "data_rows": "5,1"}', "'data_rows' must be list"),
    ("history", '{"epoch": 1}', "history must be list"),
    ("history", '[[1]]', "history row 0 must be dict"),
    ("history", '[{"x": NaN}]', "not valid JSON"),
    ("history", '[{"train_neg_elbo": 3.0}]', "history row 0 'epoch' must be int >= 0, got None"),
    ("history", '[{"epoch": null}]', "history row 0 'epoch' must be int"),
    ("history", '[{"epoch": 1}, {"epoch": 2, "train_neg_elbo": "y"}]',
     "history row 1 field 'train_neg_elbo' must be int/float/NoneType"),
    ("layout", '[{"name": "w", "shape": [-3], "offset": 0}]', "shape must be int >= 0"),
    ("layout", '"w"', "layout must be list"),
    ("config", "[" * 5000 + "]" * 5000, "not valid JSON|nests deeper"),
    ("config", "[" * 20 + "]" * 20, "nests deeper"),
    ("history", "not json", "not valid JSON"),
])
def test_json_parts_are_validated(tmp_path, good, key, text, needle):
    p = craft(tmp_path / "j.h5", good, texts={key: text})
    with pytest.raises(CheckpointError, match=needle):
        ckpt.read_checkpoint(p)
    r = fv("info", p, cwd=tmp_path, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _without_train_part(cfg):
    return {k: v for k, v in cfg.items() if k != "train"}


@pytest.mark.parametrize("case,texts,needles", [
    ("only the attributes a reader needs", {}, ["written by fastvae ? (numpy, float32) on ?"]),
    ("no train and data parts", {"config": lambda g: {"model": g["config"]["model"]}},
     ["settings: elbo (beta 1.0, constant), batch 128", "dataset sprites"]),
    ("a history row of other fields", {"history": lambda g: [{"epoch": 1}]}, ["last epoch: nothing recorded"]),
])
def test_info_reads_every_file_the_checks_pass(tmp_path, good, case, texts, needles):
    """`fastvae info` prints what such a file holds (KeyError or ValueError
    tracebacks before: it read attributes, config parts and history fields
    that the checks do not require); a missing part reads as what a resume
    would use, its defaults."""
    p = craft(tmp_path / "i.h5", good, texts={k: json.dumps(f(good)) for k, f in texts.items()})
    r = fv("info", p, cwd=tmp_path, check=False)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stdout, r.stdout
    assert json.loads(fv("info", p, "--json", cwd=tmp_path).stdout)["num_params"] == good["params"].size


@pytest.mark.parametrize("history", ['[{"train_neg_elbo": 3.0}]', '[{"epoch": 1, "train_neg_elbo": "y"}]'])
def test_a_history_the_loss_plot_cannot_read_is_refused_by_every_command(tmp_path, good, history):
    """Rows without an epoch, or with a text for a loss, were tracebacks
    (KeyError, ValueError) in `fastvae plot` and at the end of a resumed run."""
    p = craft(tmp_path / "h.h5", good, texts={"history": history})
    for cmd in (["plot", p, "--out", tmp_path / "plots"], ["train", "--resume", p, "--out", tmp_path / "r"]):
        r = fv(*cmd, cwd=tmp_path, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "history row 0" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _adam(m, v, t=3):
    def write(f):
        g = f.create_group("adam")
        g.attrs["t"] = t
        g.create_dataset("m", data=m)
        g.create_dataset("v", data=v)
    return write


@pytest.mark.parametrize("case,needle", [
    ("params nan", "the parameters hold NaN or infinite values"),
    ("params inf", "the parameters hold NaN or infinite values"),
    ("m nan", "the Adam first moments hold NaN or infinite values"),
    ("v negative", "the Adam second moments hold negative or NaN values"),
    ("v nan", "the Adam second moments hold negative or NaN values"),
])
def test_numbers_fastvae_never_saves_are_refused(tmp_path, good, case, needle):
    """NaN parameters made `fastvae eval` a ValueError traceback (a histogram's
    range) and a resume a "loss became nan ... lower --lr" at its first
    steps; a NaN or negative Adam moment the same divergence message. No
    save writes them (a diverged run is not saved), so such a file is a bad
    one. (An infinite second moment can come from one huge gradient and is
    kept: its parameter only stops moving.)"""
    n = good["params"].size
    bad = {"params nan": np.nan, "params inf": -np.inf}.get(case)
    params = good["params"].copy()
    if bad is not None:
        params[n // 2] = bad
    m, v = np.zeros(n, np.float32), np.ones(n, np.float32)
    (m if case == "m nan" else v)[1] = {"m nan": np.nan, "v negative": -1.0, "v nan": np.nan}.get(case, 1.0)
    p = craft(tmp_path / "n.h5", good, params=lambda f, _: f.create_dataset("params", data=params),
              extra=_adam(m, v))
    with pytest.raises(CheckpointError, match=needle):
        ckpt.read_checkpoint(p)
    r = fv("eval", p, cwd=tmp_path, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and needle in r.stderr, r.stderr
    v[1] = np.inf
    ckpt.read_checkpoint(craft(tmp_path / "inf.h5", good, extra=_adam(np.zeros(n, np.float32), v)))


def test_config_with_wrong_types_is_a_checkpoint_error(tmp_path, good):
    cfg = json.loads(json.dumps(good["config"]))
    cfg["model"]["hidden"] = "wide"
    p = craft(tmp_path / "c.h5", good, texts={"config": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match="invalid model config"):
        ckpt.read_checkpoint(p)


def test_config_declaring_a_huge_model_is_refused_before_allocation(tmp_path, good):
    cfg = json.loads(json.dumps(good["config"]))
    cfg["model"]["hidden"] = [10 ** 9]
    cfg["model"].pop("layers", None)
    p = craft(tmp_path / "big.h5", good, texts={"config": json.dumps(cfg)})
    r = fv("eval", p, cwd=tmp_path, check=False, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "needs about" in r.stderr or "layout" in r.stderr


@pytest.mark.parametrize("kind", ["fifo", "dir", "dev"])
def test_special_files_never_block(tmp_path, kind):
    if kind == "fifo":
        p = tmp_path / "pipe.h5"
        os.mkfifo(p)
    elif kind == "dir":
        p = tmp_path / "d.h5"
        p.mkdir()
    else:
        p = "/dev/zero"
    with pytest.raises(CheckpointError, match="FIFO|folder|device"):
        ckpt.read_checkpoint(p)
    for cmd in (["info", p], ["eval", p], ["train", "--resume", p, "--out", tmp_path / "r"]):
        r = subprocess.run(PY + [str(c) for c in cmd], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


json_st = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                       | st.text(max_size=8),
                       lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                       max_leaves=20)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["layout", "config", "state", "history"]), value=json_st,
       mutate=st.sampled_from(["replace", "merge"]))
def test_crafted_json_with_a_valid_header_only_raises_checkpoint_error(tmp_path_factory, good, key, value, mutate):
    """Hypothesis: any JSON in any text part (whole, or merged into the real
    object) either loads or raises CheckpointError; nothing else escapes
    (`fastvae info` prints it or refuses it)."""
    orig = good[key]
    if mutate == "merge" and isinstance(orig, dict) and isinstance(value, dict):
        value = dict(orig, **value)
    elif mutate == "merge" and isinstance(orig, list) and orig and isinstance(value, dict):
        value = [dict(orig[0], **value)] + orig[1:]
    p = craft(tmp_path_factory.mktemp("h") / "h.h5", good, texts={key: json.dumps(value)})
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["info", str(p)]) in (0, 2)      # printed, or refused in one line: no exception
    try:
        model, _ = load_model(p)
        fastvae.Trainer.from_checkpoint(p, out=str(p.parent), progress=False)
    except CheckpointError:
        pass
    except fastvae.FastVAEError as exc:      # a config valid as JSON may still name a dataset not here
        assert isinstance(exc, (fastvae.DataError, fastvae.ConfigError)), exc


PCG64 = {"bit_generator": "PCG64", "state": {"state": 5, "inc": 7}, "has_uint32": 0, "uinteger": 0}


def _with(d, path, value):
    d = json.loads(json.dumps(d))
    inner = d
    for k in path[:-1]:
        inner = inner[k]
    inner[path[-1]] = value
    return d


@pytest.mark.parametrize("rng_state", [
    _with(PCG64, ("state", "state"), -1),          # numpy: OverflowError (was a traceback on resume)
    _with(PCG64, ("state", "inc"), 1 << 200),
    _with(PCG64, ("has_uint32",), 10 ** 30),
    _with(PCG64, ("uinteger",), -1),
    _with(PCG64, ("state",), "x"),                  # numpy: TypeError (was taken as another backend's state)
    {"bit_generator": "PCG64"},
])
def test_a_crafted_random_number_state_is_a_checkpoint_error(tmp_path, good, rng_state):
    """A PCG64 state numpy cannot hold is a bad file, not another backend's
    stream to replace silently, and never an OverflowError from numpy."""
    p = craft(tmp_path / "r.h5", good, texts={"state": json.dumps(dict(good["state"], rng=rng_state))})
    with pytest.raises(CheckpointError, match="invalid PCG64 random-number state"):
        fastvae.Trainer.from_checkpoint(p, out=str(tmp_path), dataset=SPRITES16, progress=False)


def test_another_backends_random_number_state_continues_from_the_step(tmp_path, good):
    """A Philox (GPU) state, or none, on a CPU resume: the stream derived from
    the step, the same for both, and training goes on."""
    params = []
    for name, rng_state in (("gpu", {"kind": "philox4x32-10", "key": [1, 2], "counter": 9}), ("none", None)):
        state = {k: v for k, v in good["state"].items() if k != "rng"}
        if rng_state:
            state["rng"] = rng_state
        (tmp_path / name).mkdir()
        p = craft(tmp_path / name / "checkpoint.h5", good, texts={"state": json.dumps(state)})
        t = fastvae.Trainer.from_checkpoint(p, out=str(tmp_path / name), dataset=SPRITES16, progress=False,
                                            epochs=good["state"]["epoch"] + 1, force=True)
        t.fit(pictures=False)
        params.append(t.model.backend.to_host(t.model.params).copy())
    np.testing.assert_array_equal(params[0], params[1])


@pytest.mark.parametrize("state,needle", [
    ({"kind": "philox4x32-10", "key": [1 << 32, 0], "counter": 0}, "key"),
    ({"kind": "philox4x32-10", "key": [1], "counter": 0}, "key"),
    ({"kind": "philox4x32-10", "key": [1, "2"], "counter": 0}, "key"),
    ({"kind": "philox4x32-10", "key": [1, 2], "counter": -1}, "counter"),
    ({"kind": "philox4x32-10", "key": [1, 2], "counter": 1 << 64}, "counter"),
    ({"kind": "philox4x32-10", "key": [1, 2]}, "counter"),
])
def test_the_gpu_stream_refuses_a_state_it_cannot_hold_and_keeps_its_own(state, needle):
    from fastvae.backends.base import ForeignRNGState
    from fastvae.backends.cupy.backend import CupyRNG
    rng = CupyRNG(None, 3)
    before = rng.state()
    with pytest.raises(ValueError, match=f"invalid philox4x32-10 random-number state \\({needle}") as info:
        rng.set_state(state)
    assert not isinstance(info.value, ForeignRNGState)
    assert rng.state() == before
    with pytest.raises(ForeignRNGState):
        rng.set_state(PCG64)
    rng.set_state({"kind": "philox4x32-10", "key": [(1 << 32) - 1, 0], "counter": (1 << 64) - 1})
    assert rng.state()["counter"] == (1 << 64) - 1


def test_the_cpu_stream_refuses_a_state_it_cannot_hold_and_keeps_its_own():
    from fastvae.backends.base import ForeignRNGState
    from fastvae.backends.numpy_backend import NumpyRNG
    a, b = NumpyRNG(4), NumpyRNG(4)
    with pytest.raises(ValueError, match="invalid PCG64"):
        a.set_state(_with(PCG64, ("state", "state"), -1))
    with pytest.raises(ForeignRNGState):
        a.set_state({"kind": "philox4x32-10", "key": [1, 2], "counter": 0})
    assert a.gen.random() == b.gen.random()     # the refused states changed nothing


@pytest.mark.parametrize("section,field", [("train", "binarize"), ("train", "cuda_graph"), ("run", "cuda_graph"),
                                           ("data", "download")])
def test_config_flag_that_is_not_a_boolean_is_a_checkpoint_error(tmp_path, good, section, field):
    """A flag written as "no" would be truthy: refused, naming the field."""
    cfg = json.loads(json.dumps(good["config"]))
    cfg[section][field] = "no"
    p = craft(tmp_path / "c.h5", good, texts={"config": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match=f"invalid {section} config.*{field} must be true or false"):
        ckpt.read_checkpoint(p)


def test_a_crafted_layer_stack_is_a_checkpoint_error_before_any_model_is_built(tmp_path, good):
    """A re-signed config whose layers do not fit its input, or claim far more
    parameters than the file holds, met only the model's own checks: "a
    57x57 convolution ... does not fit its 8x8 input; use a smaller kernel"
    (a ConfigError blaming the user), and 260 billion parameters of a file of
    thousands refused as too large for memory after a memory estimate. Found
    by mutating the layer specs of a conv checkpoint (7 of 300 were
    ConfigErrors). Both are CheckpointErrors now, from load and resume alike."""
    import copy
    import fastvae
    cases = []
    wide = copy.deepcopy(good["config"])
    wide["model"]["layers"][0]["units"] = 10 ** 9                   # encoder.0: 256 x 10^9 weights
    cases.append((wide, "model config and its parameters disagree"))
    broken = copy.deepcopy(good["config"])
    broken["model"]["layers"][1]["units"] = 2                        # the head no longer feeds the sampler
    cases.append((broken, "holds an invalid model config"))
    for i, (cfg, needle) in enumerate(cases):
        p = craft(tmp_path / f"c{i}.h5", good, texts={"config": json.dumps(cfg)})
        with pytest.raises(CheckpointError, match=needle):
            load_model(p)
        with pytest.raises(CheckpointError, match=needle):
            fastvae.Trainer.from_checkpoint(p, out=str(tmp_path / f"run{i}"), dataset=SPRITES16, progress=False)


@pytest.mark.parametrize("part", ["train", "data"])
def test_a_file_that_loads_also_resumes(tmp_path, good, part):
    """The long fuzzing campaign found a checkpoint that fastvae.load accepted
    (a missing config part is its default) and Trainer.from_checkpoint refused
    ("invalid config ('data')"): resume now takes the configs load validated."""
    config = {k: v for k, v in good["config"].items() if k != part}
    (tmp_path / "run").mkdir()
    p = craft(tmp_path / "run" / "checkpoint.h5", good, texts={"config": json.dumps(config)})
    m = fastvae.load(p)
    assert np.isfinite(fastvae.evaluate(m, SPRITES16.x_train[:32])["neg_elbo"])
    t = fastvae.Trainer.from_checkpoint(p, epochs=m.checkpoint["epoch"] + 1, dataset=SPRITES16, progress=False)
    t.fit(pictures=False)
    assert t.epoch == m.checkpoint["epoch"] + 1


@pytest.mark.parametrize("rng_state, needle", [
    (lambda s: {k: v for k, v in s.items() if k != "has_uint32"}, "invalid PCG64 random-number state"),
    (lambda s: dict(s, state={"state": -1, "inc": 3}), "invalid PCG64 random-number state"),
    (lambda s: {"kind": "philox4x32-10", "key": [1, 2 ** 32], "counter": 0}, "invalid philox4x32-10"),
])
def test_a_random_number_state_resume_would_refuse_is_refused_by_load(tmp_path, good, rng_state, needle):
    """The long fuzzing campaign found a checkpoint whose PCG64 state lost its
    'has_uint32' key: fastvae.load accepted it, Trainer.from_checkpoint
    refused it. The schema now checks the state as the stream's set_state does."""
    state = dict(good["state"], rng=rng_state(good["state"]["rng"]))
    p = craft(tmp_path / "rng.h5", good, texts={"state": json.dumps(state)})
    with pytest.raises(CheckpointError, match=needle):
        fastvae.load(p)
