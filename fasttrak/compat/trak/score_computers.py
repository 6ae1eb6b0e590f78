"""Names of ``trak.score_computers``, accepted for compatibility.

fasttrak computes traker's estimator itself: the kernel ΦᵀΦ accumulated in float64 from
float32 products, ``lambda_reg`` added to its diagonal, solved by Cholesky in float64 (never
an explicit inverse, never float16). ``score_computer=`` is accepted and ignored.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AbstractScoreComputer", "BasicScoreComputer", "BasicSingleBlockScoreComputer"]


class AbstractScoreComputer:
    """Accepted for compatibility; fasttrak's estimator does the work."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class BasicScoreComputer(AbstractScoreComputer):
    """traker's default score computer."""


class BasicSingleBlockScoreComputer(AbstractScoreComputer):
    """traker's single-block score computer."""
