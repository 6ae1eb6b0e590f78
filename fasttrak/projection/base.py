"""The projector protocol and the registry of projectors selectable by name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fasttrak.errors import ConfigError, ConfigTypeError


@runtime_checkable
class Projector(Protocol):
    """Maps per-example gradients ``(B, p)`` to features ``(B, k)``, both float32.

    ``group_rows`` is the number of gradient rows the caller should gather before one
    :meth:`project` call: 1 when the projection is cached (project every batch), more when
    it is generated block by block, so that it is generated once per group, not per batch.
    """

    k: int
    group_rows: int

    def project(self, grads: Tensor | Sequence[Tensor]) -> Tensor:
        """grads: (B, p), or the per-parameter blocks (B, p_i) that concatenate to it."""
        ...


@runtime_checkable
class ProjectorConfig(Protocol):
    """A projector *kind* with its options; builds one projector per model index."""

    def spec(self, k: int) -> dict[str, Any]:
        """JSON-able identity of the projection, stored in and checked against the store."""
        ...

    def output_dim(self, k: int, num_params: int) -> int:
        """The feature dimension the projector produces for a requested ``k``."""
        ...

    def build(
        self,
        param_numels: dict[str, int],
        k: int,
        seed: int,
        model_id: int,
        device: torch.device,
    ) -> Projector: ...


def resolve_projector(projector: str | ProjectorConfig) -> ProjectorConfig:
    """Turn a projector name (``"dense"``, ``"sjlt"``, ``"srht"``, ``"identity"``) or config
    instance into a config."""
    from fasttrak.projection.dense import Dense
    from fasttrak.projection.factored import Factored
    from fasttrak.projection.identity import Identity
    from fasttrak.projection.sjlt import SJLT
    from fasttrak.projection.srht import SRHT

    by_name: dict[str, ProjectorConfig] = {
        "dense": Dense(),
        "factored": Factored(),
        "identity": Identity(),
        "sjlt": SJLT(),
        "srht": SRHT(),
    }
    if isinstance(projector, str):
        if projector not in by_name:
            raise ConfigError(
                f"unknown projector {projector!r}; choose one of {sorted(by_name)} "
                "or pass a configured instance such as ft.projection.Dense(distribution='gaussian')"
            )
        return by_name[projector]
    if isinstance(projector, type):
        raise ConfigTypeError(
            f"projector={projector.__name__} is a class; pass an instance, "
            f"e.g. projector={projector.__name__}()"
        )
    if not isinstance(projector, ProjectorConfig):
        raise ConfigTypeError(
            f"projector must be a name or a projector config, got {type(projector).__name__}"
        )
    return projector
