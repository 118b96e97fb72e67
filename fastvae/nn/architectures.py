"""Architectures as data: the layer-spec lists of the built-in stacks
(``arch="mlp"`` and ``arch="conv"``) and the validation of any spec list a
user or a checkpoint hands in. Specs are plain JSON objects; see
:class:`fastvae.config.ModelConfig` for the format and
:func:`fastvae.nn.layers.build` for the layers they become.
"""

from __future__ import annotations

from typing import List

from fastvae.checks import _choice, _positive_int
from fastvae.errors import ConfigError
from fastvae.naming import option
from fastvae.nn.opcodes import ACTIVATION_CODES
from fastvae.io.safe_files import open_regular, parse_json

ARCHS = ("mlp", "conv")
POSTERIORS = ("gaussian", "iaf")
DERIVING_FIELDS = ("input_dim", "hidden", "latent_dim", "decoder_hidden", "activation", "likelihood", "sigma",
                   "arch", "image_shape", "posterior", "flows", "flow_hidden", "flow_context")
_CONV_KEYS = {"type", "name", "channels", "kernel", "stride", "padding", "activation"}
_SPEC_KEYS = {"dense": {"type", "name", "units", "activation", "parts"},
              "conv2d": _CONV_KEYS, "conv_transpose2d": _CONV_KEYS | {"output_padding"},
              "reshape": {"type", "name", "shape"},
              "gaussian": {"type", "name", "latent_dim", "context"},
              "iaf": {"type", "name", "hidden", "activation", "reverse"},
              "likelihood": {"type", "name", "kind", "sigma"}}
#: ModelConfig fields that only derive the built-in stacks: they do nothing beside given layers
STACK_ONLY_FIELDS = ("arch", "hidden", "decoder_hidden", "activation", "flow_hidden")
MAX_LAYERS_FILE = 1 << 20           # bytes; 1000 specs of ~200 characters each take a fifth of it
_LAYERS_FIX = "give a JSON file holding a list of layer specs (ModelConfig.layers), or a run's config.json"


def fields_of_layers(specs) -> dict:
    """The :class:`~fastvae.config.ModelConfig` fields that a layer list fixes,
    read off its specs: ``latent_dim`` (its gaussian sampler), ``likelihood``
    and ``sigma`` (its likelihood layer; sigma only where the spec gives one),
    ``posterior`` and ``flows`` (its iaf steps) and, with iaf steps,
    ``flow_context`` (whether its sampler has a ``context``). What a malformed list does not
    say is left out, for :func:`check_layer_specs` to name. So ``fastvae train
    --layers`` and ``fastvae.train(layers=...)`` need no ``latent_dim`` beside
    the stack that already holds it."""
    out: dict = {}
    if not isinstance(specs, (list, tuple)):
        return out
    specs = [s for s in specs if isinstance(s, dict)]
    context = False
    for s in specs:
        if s.get("type") == "gaussian" and "latent_dim" in s:
            out.setdefault("latent_dim", s["latent_dim"])
            context = bool(s.get("context", 0))
        elif s.get("type") == "likelihood":
            out.update({k: s[f] for k, f in (("likelihood", "kind"), ("sigma", "sigma")) if f in s and k not in out})
    n_iaf = sum(s.get("type") == "iaf" for s in specs)
    out["posterior"], out["flows"] = ("iaf", n_iaf) if n_iaf else ("gaussian", 0)
    if n_iaf:
        out["flow_context"] = context
    return out


def read_layer_specs(path) -> list:
    """The layer specs in the JSON file ``path`` (``fastvae train --layers``):
    a list of specs as :class:`~fastvae.config.ModelConfig` ``layers`` takes,
    an object holding one under ``"layers"``, or a run's ``config.json`` (its
    ``"model"``'s). The file is untrusted: a regular file of at most
    :data:`MAX_LAYERS_FILE` bytes of UTF-8 (a byte-order mark allowed), standard JSON (no NaN) nested at
    most 16 deep. Returns the list unchecked (``ModelConfig`` checks each
    spec); raises ConfigError naming the file, the problem and the fix."""
    with open_regular(path, "layers file", _LAYERS_FIX, ConfigError) as fh:
        raw = fh.read(MAX_LAYERS_FILE + 1)
    if len(raw) > MAX_LAYERS_FILE:
        raise ConfigError(f"layers file {path} is over {MAX_LAYERS_FILE >> 20} MiB, far more than any stack of "
                          f"at most 1000 layers takes; {_LAYERS_FIX}")
    try:
        text = raw.decode("utf-8-sig")          # a byte-order mark, as some editors write, is not content
    except UnicodeDecodeError:
        raise ConfigError(f"layers file {path} is not UTF-8 text; {_LAYERS_FIX}") from None
    obj = parse_json(text, f"layers file {path}", ConfigError)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if isinstance(obj, dict) and "layers" in obj:
        obj = obj["layers"]
    if not isinstance(obj, list):
        raise ConfigError(f"layers file {path} holds a JSON {type(obj).__name__.replace('dict', 'object')}, not a "
                          f"list of layer specs; {_LAYERS_FIX}")
    return obj


def mlp_layer_specs(cfg) -> List[dict]:
    """The layer specs of the MLP VAE that ``hidden``/``latent_dim`` describe:
    dense ``encoder.i`` layers, the fused ``encoder.head`` (:func:`head_spec`), the posterior, dense
    ``decoder.i`` layers, ``decoder.out`` (input_dim logits) and the likelihood."""
    specs = [{"type": "dense", "name": f"encoder.{i}", "units": h, "activation": cfg.activation}
             for i, h in enumerate(cfg.hidden)]
    specs.append(head_spec(cfg))
    specs += posterior_specs(cfg)
    specs += [{"type": "dense", "name": f"decoder.{i}", "units": h, "activation": cfg.activation}
              for i, h in enumerate(cfg.decoder_widths)]
    specs.append({"type": "dense", "name": "decoder.out", "units": cfg.input_dim, "activation": "identity"})
    specs.append({"type": "likelihood", "name": "likelihood", "kind": cfg.likelihood, "sigma": cfg.sigma})
    return specs


def _context(cfg) -> int:
    """Units of the encoder's context h for the flow steps: L with IAF and ``flow_context``, else 0."""
    return cfg.latent_dim if cfg.posterior == "iaf" and cfg.flow_context else 0


def head_spec(cfg) -> dict:
    """The encoder's last layer, one GEMM: ``2L`` units stored as
    ``encoder.mu`` and ``encoder.logvar``, and with an IAF posterior's
    context L more as ``encoder.context`` (Kingma et al. 2016, Sec. 4: the
    encoder outputs mu, sigma and h)."""
    C = _context(cfg)
    return {"type": "dense", "name": "encoder.head", "units": 2 * cfg.latent_dim + C, "activation": "identity",
            "parts": ["mu", "logvar", "context"] if C else ["mu", "logvar"]}


def posterior_specs(cfg) -> List[dict]:
    """The Gaussian sampler (with the context h of ``L`` units after
    ``[mu | logvar]`` when the flow steps read one), then ``cfg.flows`` IAF
    steps ``flow.t`` (MADE hidden width ``cfg.flow_hidden``,
    ``cfg.activation``, every other step in reversed order) when
    ``cfg.posterior == "iaf"``."""
    specs = [{"type": "gaussian", "name": "sampler", "latent_dim": cfg.latent_dim}]
    if _context(cfg):
        specs[0]["context"] = _context(cfg)
    if cfg.posterior == "iaf":
        specs += [{"type": "iaf", "name": f"flow.{t}", "hidden": cfg.flow_hidden, "activation": cfg.activation,
                   "reverse": t % 2 == 1} for t in range(cfg.flows)]
    return specs


def _conv(name, channels, kernel, stride, padding, act, transpose=False, output_padding=0):
    spec = {"type": "conv_transpose2d" if transpose else "conv2d", "name": name, "channels": channels,
            "kernel": kernel, "stride": stride, "padding": padding, "activation": act}
    if transpose:
        spec["output_padding"] = output_padding
    return spec


def conv_layer_specs(cfg) -> List[dict]:
    """The convolutional stacks of ``arch="conv"`` (``cfg.activation`` between layers).

    28x28 (the Hasktorch seed's net): conv(C->32, 4, s2) -> conv(32->64, 4, s2) ->
    conv(64->128, 3, s2), flatten 2*2*128 -> mu, logvar; decoder L -> dense 1024,
    reshape 1024x1x1 -> deconv(1024->256, 4, s2) -> deconv(256->128, 6, s2) ->
    deconv(128->C, 6, s2) logits (sizes 1 -> 4 -> 12 -> 28).
    64x64 (Burgess et al. 2018, "Understanding disentangling in beta-VAE",
    appendix A.1): four conv(32, 4, s2, p1), dense 256, dense 256 -> mu, logvar;
    decoder dense 256, dense 256, dense 512, reshape 32x4x4, three
    deconv(32, 4, s2, p1) and deconv(C, 4, s2, p1) logits. Other sides that
    are powers of two from 16 to 1024 (32x32 as CIFAR-10, 128x128, 32x64) take
    the same net with k = log2(min(H, W) / 4) stride-2 layers each way (so 64x64
    is exactly the paper's), down to a 32 x H/2^k x W/2^k map.
    Raises ConfigError for any other image size.
    """
    if cfg.image_shape is None:
        raise ConfigError("arch 'conv' needs image_shape (H, W) or (H, W, C); the data sets it when training")
    H, W = cfg.image_shape[:2]
    C = cfg.image_shape[2] if len(cfg.image_shape) == 3 else 1
    a, L = cfg.activation, cfg.latent_dim
    head = head_spec(cfg)
    dense = lambda name, units, act=a: {"type": "dense", "name": name, "units": units, "activation": act}
    if (H, W) == (28, 28):
        enc = [_conv("encoder.conv0", 32, 4, 2, 0, a), _conv("encoder.conv1", 64, 4, 2, 0, a),
               _conv("encoder.conv2", 128, 3, 2, 0, a)]
        dec = [dense("decoder.0", 1024), {"type": "reshape", "name": "decoder.reshape", "shape": [1024, 1, 1]},
               _conv("decoder.deconv0", 256, 4, 2, 0, a, True), _conv("decoder.deconv1", 128, 6, 2, 0, a, True),
               _conv("decoder.out", C, 6, 2, 0, "identity", True)]
    elif all(16 <= n <= 1024 and n & (n - 1) == 0 for n in (H, W)):
        k = (min(H, W) // 4).bit_length() - 1                # stride-2 layers down to a side of 4
        h, w = H >> k, W >> k
        enc = [_conv(f"encoder.conv{i}", 32, 4, 2, 1, a) for i in range(k)]
        enc += [dense("encoder.0", 256), dense("encoder.1", 256)]
        dec = [dense("decoder.0", 256), dense("decoder.1", 256), dense("decoder.2", 32 * h * w),
               {"type": "reshape", "name": "decoder.reshape", "shape": [32, h, w]}]
        dec += [_conv(f"decoder.deconv{i}", 32, 4, 2, 1, a, True) for i in range(k - 1)]
        dec.append(_conv("decoder.out", C, 4, 2, 1, "identity", True))
    else:
        raise ConfigError(f"arch 'conv' is defined for 28x28 images and sides that are powers of two from 16 to "
                          f"1024 (64x64 as in Burgess et al. 2018), got {H}x{W}; resize the images (a folder of "
                          f"image files: {option('image_size', (64, 64))}) or describe your own stack "
                          f"({option('layers')})")
    return enc + [head] + posterior_specs(cfg) + dec + [
        {"type": "likelihood", "name": "likelihood", "kind": cfg.likelihood, "sigma": cfg.sigma}]


def check_layer_specs(cfg, specs) -> List[dict]:
    """Validate layer specs (types, keys, values, one sampler, the likelihood
    last and agreeing with the config); returns plain-JSON copies."""
    if not isinstance(specs, (list, tuple)) or not specs:
        raise ConfigError("layers must be a non-empty list of layer specs (JSON objects)")
    if len(specs) > 1000:
        raise ConfigError(f"layers lists {len(specs)} layers; at most 1000 are supported")
    out, names = [], set()
    for i, spec in enumerate(specs):
        where = f"layer {i}"
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or spec["type"] not in _SPEC_KEYS:
            raise ConfigError(f"{where} must be an object with type one of {', '.join(_SPEC_KEYS)}, got {spec!r:.80}")
        kind = spec["type"]
        extra = set(spec) - _SPEC_KEYS[kind]
        name = spec.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "._-" for c in name):
            raise ConfigError(f"{where} ({kind}) needs a name of 1-64 letters, digits, '.', '_' or '-'")
        where = f"layer {i} ({name!r})"
        if extra:
            raise ConfigError(f"{where} has unknown key(s) {sorted(extra)}; a {kind} layer takes {sorted(_SPEC_KEYS[kind])}")
        if name in names:
            raise ConfigError(f"{where}: layer names must be unique")
        names.add(name)
        spec = dict(spec)
        if kind == "dense":
            _positive_int(f"{where} units", spec.get("units"))
            _choice(f"{where} activation", spec.get("activation"), tuple(ACTIVATION_CODES))
            if "parts" in spec:
                parts = spec["parts"]
                if (not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p.isidentifier()
                                                                        for p in parts)
                        or len(set(parts)) != len(parts) or spec["units"] % len(parts)):
                    raise ConfigError(f"{where} parts must be distinct identifiers that split units evenly")
                spec["parts"] = list(parts)
        elif kind in ("conv2d", "conv_transpose2d"):
            for key in ("channels", "kernel", "stride"):
                _positive_int(f"{where} {key}", spec.get(key))
            for key in ("padding", "output_padding") if kind == "conv_transpose2d" else ("padding",):
                v = spec.get(key)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ConfigError(f"{where} {key} must be a non-negative integer, got {v!r}")
            _choice(f"{where} activation", spec.get("activation"), tuple(ACTIVATION_CODES))
        elif kind == "reshape":
            shape = spec.get("shape")
            if not isinstance(shape, list) or len(shape) != 3:
                raise ConfigError(f"{where} shape must be [C, H, W], got {shape!r}")
            for v in shape:
                _positive_int(f"{where} each shape size", v)
        elif kind == "iaf":
            _positive_int(f"{where} hidden", spec.get("hidden"))
            _choice(f"{where} activation", spec.get("activation"), tuple(ACTIVATION_CODES))
            if not isinstance(spec.get("reverse"), bool):
                raise ConfigError(f"{where} reverse must be true or false, got {spec.get('reverse')!r}")
        elif kind == "gaussian":
            if spec.get("latent_dim") != cfg.latent_dim:
                raise ConfigError(f"{where} latent_dim {spec.get('latent_dim')!r} differs from the config's "
                                  f"latent_dim {cfg.latent_dim}")
            if "context" in spec:
                _positive_int(f"{where} context", spec["context"])
            if bool(spec.get("context", 0)) != bool(cfg.posterior == "iaf" and cfg.flow_context):
                raise ConfigError(f"{where} context {spec.get('context', 0)!r}: a context h is read by IAF steps "
                                  f"only; give it with {option('posterior', 'iaf')} and flow_context true, "
                                  f"and leave it out otherwise")
        elif spec.setdefault("sigma", cfg.sigma) != cfg.sigma or spec.get("kind") != cfg.likelihood:
            raise ConfigError(f"{where} (kind {spec.get('kind')!r}, sigma {spec.get('sigma')!r}) differs from the "
                              f"config's likelihood {cfg.likelihood!r}, sigma {cfg.sigma!r}")
        out.append(spec)
    kinds = [s["type"] for s in out]
    if kinds.count("gaussian") != 1 or kinds.count("likelihood") != 1 or kinds[-1] != "likelihood":
        raise ConfigError("layers need exactly one gaussian sampler and end with the one likelihood layer")
    n_iaf, after = kinds.count("iaf"), kinds.index("gaussian") + 1
    if kinds[after:after + n_iaf] != ["iaf"] * n_iaf:
        raise ConfigError("iaf layers must directly follow the gaussian sampler (the flow acts on z)")
    if (cfg.posterior == "iaf") != (n_iaf > 0) or (n_iaf and n_iaf != cfg.flows):
        raise ConfigError(f"layers hold {n_iaf} iaf step(s) but the config says posterior {cfg.posterior!r}, "
                          f"flows {cfg.flows}; make them agree")
    return out
