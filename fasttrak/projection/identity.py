"""No projection: features are the raw gradients (k = p). Exact, for small models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fasttrak.errors import DataError
from fasttrak.projection.base import GradientProjection


@dataclass(frozen=True)
class IdentityProjector:
    k: int
    group_rows: int = 1

    def matrix(self) -> Tensor:
        """The (p, p) identity."""
        return torch.eye(self.k)

    def project(self, grads: Tensor | Sequence[Tensor]) -> Tensor:
        """grads (B, p) (or its per-parameter parts) -> the same (B, p) float32."""
        if not isinstance(grads, Tensor):
            grads = torch.cat(list(grads), dim=1)
        if grads.shape[1] != self.k:
            raise DataError(
                f"identity projector expects {self.k} gradient columns, got {grads.shape[1]}"
            )
        return grads.float()


@dataclass(frozen=True)
class Identity(GradientProjection):
    """Use the full gradient as the feature (``proj_dim`` is ignored; k = p)."""

    def spec(self, k: int) -> dict[str, Any]:
        return {"kind": "identity", "version": 1}

    def output_dim(self, k: int, num_params: int) -> int:
        return num_params

    def build(
        self, param_numels: dict[str, int], k: int, seed: int, model_id: int, device: torch.device
    ) -> IdentityProjector:
        return IdentityProjector(k=sum(param_numels.values()))
