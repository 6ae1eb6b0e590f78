"""Ensembles from one checkpoint: dropout-mask ensembles.

Independently trained models and checkpoints of one run need nothing special: pass them all,
``trak.featurize(train, checkpoints=[c0, c1, c2])``. A dropout-mask ensemble turns ONE
checkpoint into several "models": member j applies a fixed dropout mask (the same for every
example, train and target) in each ``nn.Dropout`` layer::

    trak.featurize(train, checkpoints=ft.dropout_ensemble(ckpt, size=5))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fasttrak.checkpoints import Checkpoint
from fasttrak.errors import ConfigError
from fasttrak.projection.common import projection_seed


@dataclass(frozen=True)
class DropoutMask:
    """Ensemble member ``mask`` of a checkpoint: its dropout layers keep a fixed mask."""

    checkpoint: Checkpoint
    mask: int


def dropout_ensemble(checkpoint: Checkpoint, size: int) -> list[DropoutMask]:
    """``size`` members of a dropout-mask ensemble of ``checkpoint`` (masks 0 .. size-1)."""
    if size < 1:
        raise ConfigError(f"a dropout ensemble needs size >= 1, got {size}")
    return [DropoutMask(checkpoint, j) for j in range(size)]


def keep_mask(seed: int, mask: int, name: str, shape: tuple[int, ...], p: float) -> Tensor:
    """The fixed keep-mask of dropout layer ``name`` for ensemble member ``mask``: a float32
    CPU tensor of ``shape`` (one example's activation shape) with entries 0 or 1 / (1 - p)."""
    gen = torch.Generator().manual_seed(projection_seed(seed, mask, f"{name}/dropout", 0))
    keep = torch.rand(shape, generator=gen) >= p
    return keep.float() / (1.0 - p)


@contextlib.contextmanager
def fixed_dropout(model: nn.Module, mask: int | None, seed: int) -> Iterator[None]:
    """Within the block, every ``nn.Dropout`` of ``model`` multiplies its input by its fixed
    keep-mask for ensemble member ``mask`` (broadcast over the batch); None does nothing."""
    if mask is None:
        yield
        return
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if not layers:
        raise ConfigError(
            "dropout_ensemble needs a model with nn.Dropout layers (p > 0); this model has "
            "none: pass independently trained models or checkpoints instead"
        )
    cache: dict[tuple[str, tuple[int, ...], torch.device], Tensor] = {}

    def hook_for(name: str, p: float) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            shape = tuple(args[0].shape[1:])
            key = (name, shape, args[0].device)
            if key not in cache:
                cache[key] = keep_mask(seed, mask, name, shape, p).to(args[0].device)
            return args[0] * cache[key].to(args[0].dtype)

        return hook

    handles = [m.register_forward_hook(hook_for(n, m.p)) for n, m in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
