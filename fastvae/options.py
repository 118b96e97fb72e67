"""Options that do something only beside another setting: the one rule, for
the command line's flags and :func:`fastvae.train`'s keywords alike, that
refuses an option which would silently do nothing (``--sigma`` without the
Gaussian likelihood, ``--hidden`` beside a ``--layers`` stack, ...)."""

from __future__ import annotations

import dataclasses

from fastvae.nn.architectures import STACK_ONLY_FIELDS, fields_of_layers
from fastvae.config import ModelConfig, TrainConfig
from fastvae.naming import option

# options that do something only beside another setting: (options, the setting, its values that use them)
OPTION_NEEDS = (
    (("sigma",), "likelihood", ("gaussian",)),
    (("iwae_k",), "objective", ("iwae",)),
    (("tc_estimator", "dwkl_warmup"), "objective", ("btcvae",)),
    (("beta_max", "beta_schedule", "beta_delay", "beta_warmup", "beta_cycles", "beta_ratio"), "objective",
     ("elbo", "btcvae")),                                       # a KL weight: the IWAE bound has none
    (("beta_delay", "beta_warmup"), "beta_schedule", ("linear", "sigmoid")),
    (("beta_cycles", "beta_ratio"), "beta_schedule", ("cyclical",)),
    (("lr_step_epochs", "lr_gamma"), "lr_schedule", ("step",)),
    (("lr_min",), "lr_schedule", ("cosine",)),
    (("flow_hidden", "flow_context"), "posterior", ("iaf",)),
)
_DEFAULTS = {f.name: f.default for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)}


def idle_option(given: dict) -> str:
    """'' when every option in ``given`` (config field -> value, the options a
    user set) does what it says, else a message naming the first that would do
    nothing (:data:`OPTION_NEEDS`; AdamW without weight decay) or the
    reverse of its name (a cosine floor ``lr_min`` above ``lr``), and the fix,
    naming options as :func:`fastvae.naming.option` spells them.
    Beside given ``layers`` (a list of specs), the settings the stack fixes
    (:func:`~fastvae.nn.architectures.fields_of_layers`) count as set, and the
    fields that only derive the built-in stacks would do nothing."""
    layers = given.get("layers")
    fixed = fields_of_layers(layers) if layers is not None else {}
    stack_only = [f for f in STACK_ONLY_FIELDS if f in given] if layers is not None else []
    if stack_only:
        return (f"{option(stack_only[0])} shapes the built-in stacks, and {option('layers')} describes the whole "
                f"stack, so it would do nothing; drop it (a layer's width, activation or kind is in its spec)")
    for options, setting, values in OPTION_NEEDS:
        have = given.get(setting, fixed.get(setting, _DEFAULTS[setting]))
        idle = [o for o in options if o in given] if have not in values else []
        if idle:
            return (f"{option(idle[0])} does something only with {option(setting)} {' or '.join(values)} (here "
                    f"{have}), so it would do nothing; drop it, or set {option(setting)}")
    get = lambda field: given.get(field, _DEFAULTS[field])
    if given.get("decoupled_weight_decay") and not get("weight_decay"):
        return (f"{option('decoupled_weight_decay')} decouples {option('weight_decay')}, which is 0 here, so it would "
                f"do nothing; set {option('weight_decay')} (e.g. 0.01), or drop it")
    if "lr_min" in given and get("lr_min") > get("lr"):
        return (f"{option('lr_min')} {get('lr_min'):g} is above {option('lr')} {get('lr'):g}: the cosine schedule "
                f"would raise the learning rate to it; use {option('lr_min')} below {option('lr')}")
    return ""
