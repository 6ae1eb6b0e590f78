"""Input checks the evaluation modules share: integer options and subset masks."""

from __future__ import annotations

import numbers

import numpy as np

from fasttrak.errors import ConfigError, ConfigTypeError, DataError, DataTypeError


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an int, raising if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_masks(masks: object) -> np.ndarray:
    """Return ``masks`` as a 2-D bool array (num_subsets, n_train); accepts bool or 0/1 values."""
    arr = np.asarray(masks)
    if arr.ndim != 2:
        raise DataError(
            f"masks must be 2-D (num_subsets, n_train), got shape {arr.shape}; "
            "use sample_subsets(...) or stack one bool row per subset"
        )
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise DataTypeError(f"masks must hold bool or 0/1 values, got dtype {arr.dtype}")
    if not np.isin(arr, (0, 1)).all():
        raise DataError(
            "masks must hold only 0/1 (or bool) values; pass e.g. masks.astype(bool) "
            "if nonzero means 'in the subset'"
        )
    return arr.astype(bool)
