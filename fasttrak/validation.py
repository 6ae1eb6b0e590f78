"""Checks of option values shared across fasttrak's packages."""

from __future__ import annotations

from typing import Any

import numpy as np

from fasttrak.errors import ConfigError, ConfigTypeError


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool or a float."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int if it is a positive integer (not a bool or a float)."""
    if not is_int(value):
        raise ConfigTypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
