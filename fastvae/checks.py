"""Small value checks shared by the configs and the layer specs; each raises
:class:`fastvae.errors.ConfigError` naming the setting and what it accepts."""

from __future__ import annotations

import math

from .errors import ConfigError


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _finite_nonneg(name, value, positive=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        kind = "positive" if positive else "non-negative"
        raise ConfigError(f"{name} must be a finite {kind} number, got {value!r}")


def _choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
