"""``GradientMethod``: which engine computes per-example gradients, as one value."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from fasttrak.errors import ConfigError
from fasttrak.gradients.exact import HookGradients
from fasttrak.gradients.vmap import VmapGradients
from fasttrak.tasks.base import Task

ENGINES = ("auto", "hooks", "vmap")


@dataclass(frozen=True)
class GradientMethod:
    """How per-example gradients are computed.

    engine: ``"hooks"`` (one batched forward and backward with layer hooks; examples must
        not interact in the forward pass) or ``"vmap"`` (``torch.func`` vmap of grad, each
        example alone); ``"auto"`` is hooks.
    vmap_chunk_size: examples per vmap call (None: the whole batch at once).
    """

    engine: str = "hooks"
    vmap_chunk_size: int | None = 128

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "auto":
            object.__setattr__(self, "engine", "hooks")

    @property
    def sums_over_batch(self) -> bool:
        """True when one backward of Σ_i f_i gives every example's gradient (hooks)."""
        return self.engine == "hooks"

    def build(
        self, model: nn.Module, task: Task, params: Sequence[str]
    ) -> HookGradients | VmapGradients:
        """The engine for one bound task: ``.parts(state, batch)`` gives (B, p_i) parts."""
        if self.engine == "hooks":
            return HookGradients(model, task, params)
        return VmapGradients(model, task, params, self.vmap_chunk_size)
