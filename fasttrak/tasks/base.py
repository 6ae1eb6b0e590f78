"""The Task protocol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

Forward = Callable[..., Any]
"""Calls the model (with whatever parameters the engine substitutes): ``forward(*inputs)``."""


@runtime_checkable
class Task(Protocol):
    """What is attributed: the model output function f and the out-to-loss weight Q.

    Both methods take a *batch* (the collated form of dataset items) and must treat
    examples independently: example i's outputs may depend only on example i. The
    gradient engine calls :meth:`output` on batches of one example under ``torch.func``
    transforms, so it must be plain PyTorch (no ``.item()``, no in-place edits of inputs,
    no data-dependent Python control flow).
    """

    name: str

    def check_batch(self, batch: Any) -> None:
        """Raise a ValueError/TypeError naming the fix when ``batch`` has the wrong form."""
        ...

    def batch_size(self, batch: Any) -> int:
        """Number of examples in ``batch``."""
        ...

    def output(self, forward: Forward, batch: Any) -> Tensor:
        """Model output function f per example: shape ``(B,)``, float32."""
        ...

    def out_to_loss(self, forward: Forward, batch: Any) -> Tensor:
        """Out-to-loss weight Q per example: shape ``(B,)``, float32, no gradient needed."""
        ...

    def spec(self) -> dict[str, Any]:
        """JSON-able description of the task, stored in a run's metadata."""
        ...
