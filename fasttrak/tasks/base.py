"""The Task protocol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

Forward = Callable[..., Any]
"""Calls the model (with whatever parameters the engine substitutes): ``forward(*inputs)``
or ``forward(**inputs)``; returns whatever the model returns (a tensor, a tuple, or a
Hugging Face ``ModelOutput``)."""


@runtime_checkable
class Task(Protocol):
    """What is attributed: the model output function f and the out-to-loss weight Q.

    Both methods take a *batch* (the collated form of dataset items: a tuple, or the dict a
    tokenizer/processor produces) and must treat examples independently: example i's
    outputs may depend only on example i. Two gradient engines call :meth:`output`:

    - the hook engine calls it once per batch, as ordinary batched PyTorch with autograd;
    - the vmap engine calls it on batches of one example under ``torch.func`` transforms,
      so it must also be plain PyTorch there (no ``.item()``, no in-place edits of inputs,
      no data-dependent Python control flow).

    A task whose Q is a function of f alone (classification: Q = sigmoid(-f)) may also
    define ``out_to_loss_from_output(f, batch) -> Tensor``, Q from the (B,) output of
    :meth:`output`: the hook engines then take Q from the gradient pass's f instead of
    running ``out_to_loss`` (see :func:`q_from_output`).

    A task that needs per-checkpoint state (CLIP's negative embeddings) also defines
    ``bind(forward, device) -> Task``: the runner calls it once per checkpoint, under
    ``torch.no_grad()`` with the model in eval mode, that checkpoint's weights and the
    compute device, and uses the returned task (a new object: tasks hold no mutable state)
    for that checkpoint.
    """

    @property
    def name(self) -> str: ...

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


def bind_task(task: Task, forward: Forward, device: Any = None) -> Task:
    """``task.bind(forward, device=device)`` when the task defines it (per-checkpoint
    state), else ``task``."""
    bind = getattr(task, "bind", None)
    return bind(forward, device=device) if callable(bind) else task


def q_from_output(task: Task) -> Callable[[Tensor, Any], Tensor] | None:
    """``task.out_to_loss_from_output``, unless the task's ``out_to_loss`` is defined in a
    class derived from the one that defines ``out_to_loss_from_output`` (then None). A
    subclass that changes Q without saying how it follows from f so keeps its own
    ``out_to_loss`` rather than inheriting a formula that no longer holds."""
    mro = type(task).__mro__
    q_of_f = next((i for i, cls in enumerate(mro) if "out_to_loss_from_output" in vars(cls)), None)
    q_of_batch = next((i for i, cls in enumerate(mro) if "out_to_loss" in vars(cls)), len(mro))
    if q_of_f is None or q_of_f > q_of_batch:
        return None
    return task.out_to_loss_from_output  # type: ignore[attr-defined]
