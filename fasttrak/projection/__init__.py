"""Random projections behind one small protocol.

A projector maps flattened per-example gradients ``(B, p)`` to features ``(B, k)``.
Choose one by name in :class:`fasttrak.TRAK` (``projector="dense"``, ``"sjlt"``, ``"srht"`` or
``"identity"``) or pass a configured instance (``projector=ft.projection.SJLT(s=4)``,
``ft.projection.Dense(distribution="gaussian")``). See docs/projections.md for which to choose.
"""

from fasttrak.projection.base import Projector, ProjectorConfig, resolve_projector
from fasttrak.projection.dense import Dense, DenseProjector, projection_seed
from fasttrak.projection.factored import Factored, FactoredProjector
from fasttrak.projection.identity import Identity, IdentityProjector
from fasttrak.projection.sjlt import SJLT, SJLTProjector
from fasttrak.projection.srht import SRHT, SRHTProjector, fwht

__all__ = [
    "Dense",
    "Factored",
    "FactoredProjector",
    "DenseProjector",
    "Identity",
    "IdentityProjector",
    "Projector",
    "ProjectorConfig",
    "SJLT",
    "SJLTProjector",
    "SRHT",
    "SRHTProjector",
    "fwht",
    "projection_seed",
    "resolve_projector",
]
