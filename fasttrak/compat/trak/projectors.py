"""Projector names of ``trak.projectors``, mapped onto fasttrak's projections.

traker's projector objects carry the projection's settings; :class:`~fasttrak.compat.trak.
TRAKer` reads them and uses a fasttrak projection instead (same features on every device
and batch size, the matrix generated once per model instead of per batch):

=====================================================  ======================================
traker                                                 fasttrak
=====================================================  ======================================
``BasicProjector(proj_type="rademacher")``             ``ft.projection.Dense()``
``BasicProjector(proj_type="normal")``                 ``Dense(distribution="gaussian")``
``CudaProjector`` / ``ChunkedCudaProjector``           ``Dense()`` (Rademacher)
``NoOpProjector``                                      ``"identity"`` (k = p, no projection)
=====================================================  ======================================

``proj_dim``, ``seed`` (the projection's seed) and ``proj_type`` are used; ``grad_dim`` is
checked against the model; ``device``, ``block_size``, ``max_batch_size`` and ``dtype`` have
no meaning here (fasttrak projects in float32 on the TRAKer's device). A fasttrak projector
name or config (``"srht"``, ``ft.projection.SRHT()``) may also be passed as ``projector=``.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import Tensor

from fasttrak.errors import ConfigError
from fasttrak.projection import Dense, Identity, ProjectorConfig
from fasttrak.projection.common import Distribution

__all__ = [
    "AbstractProjector",
    "BasicProjector",
    "BasicSingleBlockProjector",
    "ChunkedCudaProjector",
    "CudaProjector",
    "NoOpProjector",
    "ProjectionType",
]


class ProjectionType(str, Enum):
    normal = "normal"
    rademacher = "rademacher"


class AbstractProjector:
    """Settings of a traker projection (``grad_dim``, ``proj_dim``, ``seed``,
    ``proj_type``); :meth:`fasttrak_projector` is the fasttrak projection it maps to.

    Subclassing it with your own ``project`` is not supported: pass a fasttrak projector
    config instead (see docs/projections.md)."""

    def __init__(
        self,
        grad_dim: int = 0,
        proj_dim: int = 0,
        seed: int = 0,
        proj_type: str | ProjectionType = ProjectionType.rademacher,
        device: str | torch.device = "cpu",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.grad_dim = int(grad_dim)
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)
        self.proj_type = proj_type
        self.device = device

    def fasttrak_projector(self) -> ProjectorConfig:
        raise ConfigError(
            f"{type(self).__name__} is not one of traker's projectors (BasicProjector, "
            "CudaProjector, NoOpProjector); fasttrak cannot run a custom project(): pass a "
            "fasttrak projector instead, e.g. projector=ft.projection.Dense() or 'srht'"
        )

    def project(self, grads: Tensor, model_id: int) -> Tensor:
        raise ConfigError(
            f"{type(self).__name__}.project is not available in fasttrak.compat: the TRAKer "
            "projects with fasttrak's projection; use ft.TRAK(...).features(...) for features"
        )

    def free_memory(self) -> None:
        """Nothing to free: fasttrak's TRAKer holds the projection."""


class _Dense(AbstractProjector):
    def __init__(
        self,
        grad_dim: int,
        proj_dim: int,
        seed: int,
        proj_type: str | ProjectionType = ProjectionType.rademacher,
        device: str | torch.device = "cpu",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(grad_dim, proj_dim, seed, proj_type, device)
        if self.proj_dim < 1:
            raise ConfigError(f"proj_dim must be a positive integer, got {proj_dim!r}")
        self.distribution = _distribution(proj_type)

    def fasttrak_projector(self) -> ProjectorConfig:
        return Dense(distribution=self.distribution)


def _distribution(proj_type: Any) -> Distribution:
    value = proj_type.value if isinstance(proj_type, ProjectionType) else str(proj_type)
    if value == "rademacher":
        return "rademacher"
    if value == "normal":
        return "gaussian"
    raise ConfigError(f"proj_type must be 'rademacher' or 'normal', got {proj_type!r}")


class BasicProjector(_Dense):
    """traker's block-wise dense projection: fasttrak's ``Dense`` projection."""


class BasicSingleBlockProjector(_Dense):
    """traker's single-block dense projection: fasttrak's ``Dense`` projection."""


class CudaProjector(_Dense):
    """traker's fast_jl CUDA projection (Rademacher): fasttrak's ``Dense`` projection, which
    runs as one matrix product on any device (no CUDA extension needed)."""


class ChunkedCudaProjector(AbstractProjector):
    """traker's per-parameter-chunk CUDA projection: fasttrak's ``Dense`` projection."""

    def __init__(self, projector_per_chunk: list[AbstractProjector], *args: Any, **kw: Any) -> None:
        first = projector_per_chunk[0]
        super().__init__(0, first.proj_dim, first.seed, first.proj_type, first.device)

    def fasttrak_projector(self) -> ProjectorConfig:
        return Dense(distribution=_distribution(self.proj_type))


class NoOpProjector(AbstractProjector):
    """No projection: the features are the gradients (fasttrak's ``"identity"``)."""

    def __init__(
        self,
        grad_dim: int = 0,
        proj_dim: int = 0,
        seed: int = 0,
        proj_type: str | ProjectionType = "na",
        device: str | torch.device = "cuda",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(grad_dim, proj_dim, seed, proj_type, device)

    def fasttrak_projector(self) -> ProjectorConfig:
        return Identity()

    def project(self, grads: Tensor, model_id: int) -> Tensor:
        if isinstance(grads, dict):
            grads = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
        return grads
