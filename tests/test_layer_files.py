"""A stack of the user's own from the command line (``fastvae train --layers
FILE``) and from ``fastvae.train(layers=...)``: the stack fixes latent_dim,
the likelihood and the flows; flags that only shape the built-in stacks are
refused; the file is read as untrusted input."""

import json
import os

import numpy as np
import pytest

import fastvae
from fastvae.nn.architectures import MAX_LAYERS_FILE, fields_of_layers, read_layer_specs
from fastvae.errors import ConfigError

from conftest import PEAK_RSS, fv

TINY = ["--n-sprites", "200", "--batch-size", "50", "--epochs", "1", "--no-progress", "--seed", "3"]


def dense_stack(kind="bernoulli", sigma=None, L=3):
    like = {"type": "likelihood", "name": "likelihood", "kind": kind}
    if sigma is not None:
        like["sigma"] = sigma
    return [{"type": "dense", "name": "enc.0", "units": 24, "activation": "tanh"},
            {"type": "dense", "name": "enc.head", "units": 2 * L, "activation": "identity"},
            {"type": "gaussian", "name": "sampler", "latent_dim": L},
            {"type": "dense", "name": "dec.0", "units": 24, "activation": "elu"},
            {"type": "dense", "name": "dec.out", "units": 4096, "activation": "identity"},
            like]


def conv_stack():
    """One 4x4 stride-4 convolution each way on the 64x64 sprites (16x16 maps)."""
    return [{"type": "conv2d", "name": "enc.conv", "channels": 4, "kernel": 4, "stride": 4, "padding": 0,
             "activation": "relu"},
            {"type": "dense", "name": "enc.head", "units": 4, "activation": "identity", "parts": ["mu", "logvar"]},
            {"type": "gaussian", "name": "sampler", "latent_dim": 2},
            {"type": "dense", "name": "dec.0", "units": 4 * 16 * 16, "activation": "relu"},
            {"type": "reshape", "name": "dec.reshape", "shape": [4, 16, 16]},
            {"type": "conv_transpose2d", "name": "dec.out", "channels": 1, "kernel": 4, "stride": 4, "padding": 0,
             "output_padding": 0, "activation": "identity"},
            {"type": "likelihood", "name": "likelihood", "kind": "bernoulli"}]


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_train_with_a_layers_file_matches_the_library_and_resumes(tmp_path):
    specs = dense_stack()
    stack = write(tmp_path / "stack.json", specs)
    run = tmp_path / "run"
    fv("train", *TINY, "--layers", stack, "--out", run, cwd=tmp_path)
    cfg = json.load(open(run / "config.json"))["model"]
    assert cfg["latent_dim"] == 3 and cfg["likelihood"] == "bernoulli" and cfg["posterior"] == "gaussian"
    assert cfg["layers"][:-1] == specs[:-1]
    assert cfg["layers"][-1] == {**specs[-1], "sigma": 0.1}      # a missing sigma is the config's
    info = fv("info", run, cwd=tmp_path).stdout
    assert "4096-24(tanh)-6-z3-24(elu)-4096" in info, info

    # the same stack through the library trains the same parameters, bit for bit
    lib = fastvae.train("sprites", n_sprites=200, batch_size=50, epochs=1, seed=3, layers=specs)
    assert np.array_equal(fastvae.load(str(run / "checkpoint.h5")).get_flat_params(), lib.model.get_flat_params())

    fv("train", "--resume", run, "--epochs", "2", "--no-progress", cwd=tmp_path)
    assert json.load(open(run / "config.json"))["model"]["layers"] == cfg["layers"]

    # a run's config.json is a layers file too: the same architecture again
    again = tmp_path / "again"
    fv("train", *TINY, "--layers", run / "config.json", "--out", again, cwd=tmp_path)
    assert json.load(open(again / "config.json"))["model"]["layers"] == cfg["layers"]


def test_a_conv_stack_from_a_file(tmp_path):
    stack = write(tmp_path / "conv.json", {"layers": conv_stack()})
    run = tmp_path / "run"
    fv("train", *TINY, "--layers", stack, "--out", run, cwd=tmp_path)
    model = fastvae.load(str(run / "checkpoint.h5"))
    assert model.config.latent_dim == 2
    assert model.layout["enc.conv.W"].shape == (4, 1, 4, 4)
    assert model.layout["dec.out.W"].shape == (4, 1, 4, 4)


@pytest.mark.parametrize("flags,message", [
    (["--hidden", "10"], "--hidden shapes the built-in stacks, and --layers describes the whole stack"),
    (["--arch", "conv"], "--arch shapes the built-in stacks"),
    (["--activation", "tanh"], "--activation shapes the built-in stacks"),
    (["--latent", "5"], "--layers STACK: layer 2 ('sampler') latent_dim 3 differs from the config's latent_dim 5"),
    (["--likelihood", "gaussian"], "--layers STACK: layer 5 ('likelihood') (kind 'bernoulli', sigma 0.1) differs"),
    (["--sigma", "0.2"], "--sigma does something only with --likelihood gaussian (here bernoulli)"),
])
def test_flags_beside_a_layers_file(tmp_path, flags, message):
    stack = write(tmp_path / "stack.json", dense_stack())
    p = fv("train", *TINY, "--layers", stack, *flags, "--out", tmp_path / "run", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert message.replace("STACK", str(stack)) in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()


def test_layers_files_that_cannot_be_read(tmp_path):
    def refused(path, message):
        with pytest.raises(ConfigError, match=message):
            read_layer_specs(path)
    refused(tmp_path / "none.json", "does not exist")
    refused(tmp_path, "is a folder")
    if os.path.exists("/dev/zero"):
        refused("/dev/zero", "is a character device, not a regular file")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe[]")
    refused(tmp_path / "bin.json", "is not UTF-8 text")
    (tmp_path / "nan.json").write_text('[{"type": "likelihood", "sigma": NaN}]')
    refused(tmp_path / "nan.json", "is not valid JSON")
    (tmp_path / "deep.json").write_text("[" * 40 + "]" * 40)
    refused(tmp_path / "deep.json", "nests deeper than 16 levels")
    write(tmp_path / "obj.json", {"hidden": [400]})
    refused(tmp_path / "obj.json", "holds a JSON object, not a list of layer specs")
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:                    # sparse: the reader must stop at its cap, not read it all
        fh.truncate(64 * MAX_LAYERS_FILE)
    refused(big, "is over 1 MiB")
    assert read_layer_specs(write(tmp_path / "ok.json", {"model": {"layers": dense_stack()}})) == dense_stack()
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(dense_stack()).encode())   # as Notepad saves
    assert read_layer_specs(tmp_path / "bom.json") == dense_stack()


def test_a_bad_spec_in_a_file_is_named_before_the_data_loads(tmp_path):
    specs = dense_stack()
    specs[3]["units"] = 0
    stack = write(tmp_path / "stack.json", specs)
    p = fv("train", "--dataset", tmp_path / "missing.npy", "--layers", stack, "--no-progress", "--out",
           tmp_path / "run", cwd=tmp_path, check=False)
    assert p.returncode == 2
    assert f"--layers {stack}: layer 3 ('dec.0') units must be a positive integer" in p.stderr, p.stderr
    assert "missing.npy" not in p.stderr


def test_library_takes_the_stacks_settings():
    g = dense_stack("gaussian", 0.05)
    assert fields_of_layers(g) == {"latent_dim": 3, "likelihood": "gaussian", "sigma": 0.05,
                                   "posterior": "gaussian", "flows": 0}
    t = fastvae.train("sprites", n_sprites=200, batch_size=50, epochs=1, layers=g)
    cfg = t.model_config
    assert (cfg.latent_dim, cfg.likelihood, cfg.sigma) == (3, "gaussian", 0.05)
    for kw, message in (({"hidden": [8]}, "hidden shapes the built-in stacks, and layers describes"),
                        ({"flow_hidden": 8}, "flow_hidden shapes the built-in stacks"),
                        ({"latent_dim": 4}, "latent_dim 3 differs from the config's latent_dim 4")):
        with pytest.raises(ConfigError, match=message):
            fastvae.train("sprites", n_sprites=200, batch_size=50, epochs=1, layers=g, **kw)
    with pytest.raises(ConfigError, match=r"sigma does something only with likelihood gaussian \(here bernoulli\)"):
        fastvae.train("sprites", n_sprites=200, batch_size=50, epochs=1, layers=dense_stack(), sigma=0.05)


def test_an_iaf_stack_too_large_for_memory_is_refused_before_its_masks_exist(tmp_path):
    """A layers file (or a checkpoint's config) with an IAF step of 10^9
    hidden units: building its layers, which every config and checkpoint
    check does, made the MADE masks at once (22 GiB of float64) and the
    process was killed by the kernel's OOM killer. The masks now wait until
    the model's memory check, which refuses the 10^10 parameters by name."""
    import subprocess
    import sys
    specs = dense_stack()
    specs.insert(3, {"type": "iaf", "name": "flow.0", "hidden": 10 ** 9, "activation": "relu", "reverse": False})
    stack = write(tmp_path / "huge.json", specs)
    code = ("from fastvae import ConfigError, VAE, ModelConfig\nfrom fastvae.nn import layers\n"
            "from fastvae.nn.architectures import fields_of_layers, read_layer_specs\n"
            f"specs = read_layer_specs({str(stack)!r})\n"
            "cfg = ModelConfig(input_dim=4096, layers=specs, **fields_of_layers(specs))\n"
            "stack = layers.build(cfg)\n"
            "try:\n    VAE(cfg)\nexcept ConfigError as e:\n    print('ERR', e)\n"
            + PEAK_RSS)                                 # VmHWM: this process's own peak (ru_maxrss starts at the parent's)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "ERR a model of 10,000," in out.stdout and "parameters needs about" in out.stdout, out.stdout + out.stderr
    assert float(out.stdout.split("RSS_MB")[1]) < 500         # 22 GiB of masks before
