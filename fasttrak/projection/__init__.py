"""Random projections behind one protocol.

A projector kind (``"dense"``, ``"sjlt"``, ``"srht"``, ``"identity"``, ``"factored"``, or a
configured instance such as ``ft.projection.SJLT(s=4)``) lays out the features of a model
(:meth:`ProjectorConfig.layout`) and builds, per model id, a :class:`Featurizer` that turns
(weights, batches) into features ``(B, k)``. Projections of per-example gradients implement
the smaller :class:`Projector` protocol (``(B, p)`` to ``(B, k)``) and share one adapter,
:class:`GradientFeaturizer`. See docs/projections.md for which to choose.
"""

from fasttrak.projection.base import (
    Featurizer,
    GradientFeaturizer,
    GradientProjection,
    Layout,
    Projector,
    ProjectorConfig,
    projector_from_spec,
    projectors,
    resolve_projector,
)
from fasttrak.projection.common import TILE_ROWS, projection_seed
from fasttrak.projection.dense import Dense, DenseProjector
from fasttrak.projection.factored import Factored, FactoredProjector
from fasttrak.projection.identity import Identity, IdentityProjector
from fasttrak.projection.sjlt import SJLT, SJLTProjector
from fasttrak.projection.srht import SRHT, SRHTProjector, fwht

PROJECTORS = projectors()
"""The projector kinds selectable by name, each with its default options."""

__all__ = [
    "PROJECTORS",
    "TILE_ROWS",
    "Dense",
    "DenseProjector",
    "Factored",
    "FactoredProjector",
    "Featurizer",
    "GradientFeaturizer",
    "GradientProjection",
    "Identity",
    "IdentityProjector",
    "Layout",
    "Projector",
    "ProjectorConfig",
    "SJLT",
    "SJLTProjector",
    "SRHT",
    "SRHTProjector",
    "fwht",
    "projection_seed",
    "projector_from_spec",
    "projectors",
    "resolve_projector",
]
