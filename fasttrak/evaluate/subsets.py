"""Random training subsets for datamodel / LDS evaluation."""

from __future__ import annotations

import numbers

import numpy as np

from fasttrak.errors import ConfigError, ConfigTypeError
from fasttrak.evaluate.common import check_int


def sample_subsets(n: int, num_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Draw ``num_subsets`` random subsets of ``range(n)``, each of size ``round(alpha * n)``.

    Returns a bool mask array of shape (num_subsets, n); row s is True on the examples of
    subset s. Drawn with ``np.random.default_rng(seed)``, so the result is deterministic.
    """
    n = check_int("n", n, minimum=1)
    num_subsets = check_int("num_subsets", num_subsets, minimum=1)
    seed = check_int("seed", seed, minimum=0)
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
