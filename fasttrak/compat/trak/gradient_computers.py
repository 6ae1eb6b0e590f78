"""Names of ``trak.gradient_computers``, accepted for compatibility.

fasttrak computes per-example gradients with its own engines: the hook engine (one batched
forward and backward) for the built-in tasks, and the ``torch.func`` vmap engine (each
example alone, as traker's ``FunctionalGradientComputer``) for custom model outputs. The
``gradient_computer=`` argument of :class:`~fasttrak.compat.trak.TRAKer` is therefore
accepted and ignored (with a note in the log).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AbstractGradientComputer",
    "FunctionalGradientComputer",
    "IterativeGradientComputer",
]


class AbstractGradientComputer:
    """Accepted for compatibility; fasttrak's gradient engines do the work."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class FunctionalGradientComputer(AbstractGradientComputer):
    """traker's default (``torch.func``); fasttrak picks its engine itself."""


class IterativeGradientComputer(AbstractGradientComputer):
    """traker's loop over examples; fasttrak picks its engine itself."""
