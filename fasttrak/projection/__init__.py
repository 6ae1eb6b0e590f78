"""Random projections behind one small protocol.

A projector maps flattened per-example gradients ``(B, p)`` to features ``(B, k)``.
Choose one by name in :class:`fasttrak.TRAK` (``projector="dense"`` or ``"identity"``) or
pass a configured instance (``projector=ft.projection.Dense(distribution="gaussian")``).
"""

from fasttrak.projection.base import Projector, ProjectorConfig, resolve_projector
from fasttrak.projection.dense import Dense, DenseProjector, projection_seed
from fasttrak.projection.identity import Identity, IdentityProjector

__all__ = [
    "Dense",
    "DenseProjector",
    "Identity",
    "IdentityProjector",
    "Projector",
    "ProjectorConfig",
    "projection_seed",
    "resolve_projector",
]
