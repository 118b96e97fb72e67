"""How messages name the options a user sets: as the flags of the ``fastvae``
command (``--batch-size 64``) while it runs, as keywords (``batch_size=64``,
the fields of :class:`~fastvae.ModelConfig`, :class:`~fastvae.TrainConfig`
and :class:`~fastvae.DataConfig`, :func:`fastvae.train`'s ``out`` and
``force``) everywhere else, so that a library user is never told to pass a
flag. One place for the spelling: messages call :func:`option`, and the
command line runs inside :func:`command_line`."""

from __future__ import annotations

import contextlib
from typing import Optional

#: config fields whose command-line flag is not the field's name in kebab case
FLAG_OF_FIELD = {"latent_dim": "latent", "beta_max": "beta", "decoupled_weight_decay": "adamw",
                 "memory_budget_mb": "memory_budget", "download": "no_download", "flow_context": "no_flow_context"}
#: the inverse: a flag's argparse dest -> its config field
FIELD_OF_FLAG = {flag: field for field, flag in FLAG_OF_FIELD.items()}

_cli = False          # a process-wide setting: threads the command starts (prefetch, Adam) write for it too


@contextlib.contextmanager
def command_line():
    """Within it, :func:`option` spells flags (the ``fastvae`` command's
    ``main`` runs every sub-command inside it); nests, and restores the
    previous spelling on exit, exceptions included."""
    global _cli
    before, _cli = _cli, True
    try:
        yield
    finally:
        _cli = before


def on_command_line() -> bool:
    """Whether messages are being written for the command line."""
    return _cli


def option(field: str, value=None, flag: Optional[str] = None) -> str:
    """``field`` (a config field or keyword, e.g. ``"batch_size"``), with
    ``value`` if given, as the user would write it: ``--batch-size 64`` on the
    command line, ``batch_size=64`` in Python (strings quoted: ``likelihood=
    'gaussian'``); a switch set to True is its flag alone (``--force``,
    ``force=True``), a tuple its values (``--image-size 64 64``). Fields
    whose flag has another name use it (``latent_dim``: ``--latent``;
    ``download``: ``--no-download``), as does a keyword given its ``flag``
    (``option("n", flag="grid")``: ``--grid``)."""
    if on_command_line():
        flag = "--" + (flag or FLAG_OF_FIELD.get(field, field)).replace("_", "-")
        if isinstance(value, (tuple, list)):
            value = " ".join(map(str, value))                # nargs: --image-size 64 64
        return flag if value is None or value is True else f"{flag} {value}"
    return field if value is None else f"{field}={value!r}"
