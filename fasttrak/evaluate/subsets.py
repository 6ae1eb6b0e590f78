"""Random training subsets for datamodel / LDS evaluation."""

from __future__ import annotations

import numbers

import numpy as np

from fasttrak.errors import ConfigError, ConfigTypeError, DataError, DataTypeError


def sample_subsets(n: int, num_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Draw ``num_subsets`` random subsets of ``range(n)``, each of size ``round(alpha * n)``.

    Returns a bool mask array of shape (num_subsets, n); row s is True on the examples of
    subset s. Drawn with ``np.random.default_rng(seed)``, so the result is deterministic.
    """
    n = _check_int("n", n, minimum=1)
    num_subsets = _check_int("num_subsets", num_subsets, minimum=1)
    seed = _check_int("seed", seed, minimum=0)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ConfigTypeError(f"alpha must be a float in (0, 1), got {type(alpha).__name__}")
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    k = round(alpha * n)
    if k < 1:
        raise ConfigError(
            f"round(alpha * n) = round({alpha} * {n}) = 0, so subsets would be empty; "
            "increase alpha or n"
        )
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, n), dtype=bool)
    for s in range(num_subsets):
        masks[s, rng.choice(n, size=k, replace=False)] = True
    return masks


def _check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an int, raising if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_masks(masks: object) -> np.ndarray:
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
