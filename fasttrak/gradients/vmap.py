"""The torch.func engine: vmap of grad over examples, on any model written in PyTorch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from fasttrak.errors import UnsupportedModelError
from fasttrak.tasks.base import Task


class VmapGradients:
    """Per-example gradients of ``task.output`` w.r.t. the selected parameters.

    Only the selected parameters are differentiated: the others enter the function as
    constants. ``chunk_size`` examples are processed per vmap call, which bounds the
    memory of intermediate activations.
    """

    def __init__(
        self, model: nn.Module, task: Task, selected: Sequence[str], chunk_size: int | None = 128
    ) -> None:
        self.model = model
        self.task = task
        self.selected = list(selected)
        self.chunk_size = chunk_size

    def __call__(self, state: dict[str, Tensor], batch: Any) -> Tensor:
        """state: every parameter and buffer by name (on the compute device); batch: a
        collated batch. Returns (B, p) float32, columns in selection order, each parameter
        flattened in row-major order."""
        return torch.cat(self.parts(state, batch), dim=1)

    def parts(self, state: dict[str, Tensor], batch: Any) -> list[Tensor]:
        """Like :meth:`__call__`, as one (B, p_i) float32 block per selected parameter
        (in selection order), so that projections can consume them without a copy."""
        selected = {name: state[name] for name in self.selected}
        constants = {name: t for name, t in state.items() if name not in selected}

        def output_of_one(params: dict[str, Tensor], example: Any) -> Tensor:
            one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)

            def forward(*args: Any, **kwargs: Any) -> Any:
                return functional_call(self.model, (params, constants), args, kwargs)

            return self.task.output(forward, one)[0]

        per_example = vmap(grad(output_of_one), in_dims=(None, 0), chunk_size=self.chunk_size)
        try:
            grads = per_example(selected, batch)
        except RuntimeError as error:
            if "data-dependent control flow" not in str(error) and "vmap" not in str(error):
                raise
            raise UnsupportedModelError(
                "the vmap engine cannot run this model under torch.func.vmap (e.g. Hugging Face "
                "attention masks use data-dependent control flow); use engine='hooks', which "
                f"runs unmodified models with one batched forward and backward. vmap said: {error}"
            ) from error
        size = self.task.batch_size(batch)
        return [grads[name].reshape(size, -1).float() for name in self.selected]

    def parts_and_q(
        self, state: dict[str, Tensor], batch: Any, reuse: bool = False
    ) -> tuple[list[Tensor], Tensor]:
        """:meth:`parts`, and Q = ``task.out_to_loss`` (B,) float32 from a batched no-grad
        forward (vmap runs each example alone, so its forwards cannot serve Q). ``reuse``
        is accepted for the engines' common signature; vmap's parts are always fresh."""
        with torch.no_grad():

            def forward(*args: Any, **kwargs: Any) -> Any:
                return functional_call(self.model, state, args, kwargs)

            q = self.task.out_to_loss(forward, batch).float()
        return self.parts(state, batch), q
