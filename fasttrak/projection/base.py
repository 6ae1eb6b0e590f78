"""The projector protocol, the adapter for gradient projections, and the registry.

Every projector kind (a *config*, such as ``SRHT(block_size=...)``) does two things:

- :meth:`ProjectorConfig.layout` says, for a model and its selected parameters, which
  parameters it attributes, the feature dimension k and its identity in the store;
- :meth:`ProjectorConfig.featurizer` builds, for one model id, a :class:`Featurizer`:
  the one way to turn (weights, batches) into features ``(B, k)``.

Projections of per-example gradients (dense, sjlt, srht, identity) implement the smaller
:class:`Projector` protocol, ``(B, p)`` gradients to ``(B, k)`` features, and get both
methods from :class:`GradientProjection`, whose :class:`GradientFeaturizer` computes the
gradients with a gradient engine and groups rows for projections generated block by
block. The factored projection reads layer activations instead and implements
:class:`Featurizer` itself. A new projector is a new module; the runner does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from fasttrak.errors import ConfigError, ConfigTypeError
from fasttrak.gradients import GradientMethod
from fasttrak.tasks.base import Task

Batches = Iterable[tuple[slice, Any]]
"""Collated batches on the compute device, each with the rows it holds."""


@runtime_checkable
class Projector(Protocol):
    """Maps per-example gradients ``(B, p)`` to features ``(B, k)``, both float32.

    ``group_rows`` is the number of gradient rows to gather before one :meth:`project`
    call: 1 when the projection is cached (project every batch), more when it is generated
    block by block, so that it is generated once per group, not per batch.
    """

    @property
    def k(self) -> int: ...

    @property
    def group_rows(self) -> int: ...

    def project(self, grads: Tensor | Sequence[Tensor]) -> Tensor:
        """grads: (B, p), or the per-parameter parts (B, p_i) that concatenate to it."""
        ...

    def matrix(self) -> Tensor:
        """The explicit (p, k) map (tests and small p only)."""
        ...


@runtime_checkable
class Featurizer(Protocol):
    """One model id's projection, applied to (weights, batches): features ``(rows, k)``.

    ``params``: the attributed parameters, in feature order. ``sums_over_batch``: the
    features come from one backward pass of Σ_i f_i over a batch, exact only when examples
    do not interact in the forward pass (checked on the first batch by the runner).
    """

    @property
    def k(self) -> int: ...

    @property
    def params(self) -> list[str]: ...

    @property
    def sums_over_batch(self) -> bool: ...

    @property
    def group_rows(self) -> int:
        """Rows gathered before features come out (1: every batch on its own)."""
        ...

    def features(
        self, state: dict[str, Tensor], task: Task, batches: Batches
    ) -> Iterator[tuple[slice, Tensor, Tensor]]:
        """Yield (rows, features (rows, k) float32, Q (rows,) float32) covering ``batches``
        in order; several batches may come out as one group. Q is ``task.out_to_loss``,
        from the gradient pass's forward where the engine allows it. ``state``: every
        parameter and buffer by name, on the compute device; ``task`` bound to these
        weights; the model in eval mode."""
        ...

    def matrix(self) -> Tensor:
        """The explicit (p, k) projection (tests and small models): features = G @ matrix,
        G the per-example gradients of ``params``, each flattened row-major, concatenated."""
        ...


@dataclass(frozen=True)
class Layout:
    """What a projector makes of a model: the feature dimension ``k``, the projection's
    identity in the store (``spec``, JSON-able), the attributed parameters in feature order
    (``params``) and the selected parameters it leaves out (``excluded``)."""

    k: int
    spec: dict[str, Any]
    params: list[str]
    excluded: list[str] = field(default_factory=list)


@runtime_checkable
class ProjectorConfig(Protocol):
    """A projector kind with its options."""

    def layout(self, model: nn.Module, selected: Sequence[str], proj_dim: int) -> Layout: ...

    def featurizer(
        self,
        model: nn.Module,
        layout: Layout,
        seed: int,
        model_id: int,
        device: torch.device,
        gradients: GradientMethod,
    ) -> Featurizer:
        """Model ``model_id``'s projection: a pure function of (seed, model_id, layout)."""
        ...


class GradientProjection(ABC):
    """Base of the projections of per-example gradients (dense, sjlt, srht, identity).

    Subclasses define :meth:`spec`, :meth:`output_dim` and :meth:`build`; this class turns
    them into the :class:`ProjectorConfig` protocol.
    """

    @abstractmethod
    def spec(self, k: int) -> dict[str, Any]:
        """JSON-able identity of the projection, stored in and checked against the store."""

    @abstractmethod
    def output_dim(self, k: int, num_params: int) -> int:
        """The feature dimension the projector produces for a requested ``k``."""

    @abstractmethod
    def build(
        self, param_numels: dict[str, int], k: int, seed: int, model_id: int, device: torch.device
    ) -> Projector:
        """The projector of model ``model_id`` for gradients of these parameters."""

    def layout(self, model: nn.Module, selected: Sequence[str], proj_dim: int) -> Layout:
        k = self.output_dim(proj_dim, sum(_numels(model, selected).values()))
        return Layout(k, self.spec(k), list(selected))

    def featurizer(
        self,
        model: nn.Module,
        layout: Layout,
        seed: int,
        model_id: int,
        device: torch.device,
        gradients: GradientMethod,
    ) -> GradientFeaturizer:
        with record_function("fasttrak.featurizer"):
            projector = self.build(_numels(model, layout.params), layout.k, seed, model_id, device)
        return GradientFeaturizer(projector, model, list(layout.params), gradients)


@dataclass
class GradientFeaturizer:
    """Per-example gradients from an engine, projected by a :class:`Projector`.

    Owns the grouping of rows: gradients are projected per batch when the projection is
    cached, or gathered into groups of ``projector.group_rows`` rows when it is generated
    block by block. Non-finite gradients show as non-finite features: every projector
    sends each gradient coordinate to at least one output with a nonzero weight.
    """

    projector: Projector
    model: nn.Module
    params: list[str]
    gradients: GradientMethod
    _engine: tuple[Task, Any] | None = field(default=None, init=False, repr=False)

    @property
    def k(self) -> int:
        return self.projector.k

    @property
    def sums_over_batch(self) -> bool:
        return self.gradients.sums_over_batch

    @property
    def group_rows(self) -> int:
        return self.projector.group_rows

    def features(
        self, state: dict[str, Tensor], task: Task, batches: Batches
    ) -> Iterator[tuple[slice, Tensor, Tensor]]:
        engine = self._engine_for(task)
        group: list[list[Tensor]] = []  # per batch: per-parameter gradient parts (B, p_i)
        qs: list[Tensor] = []
        start, stop, size = 0, 0, 0
        for rows, batch in batches:
            # A batch projected before the next one is computed may use the engine's buffers.
            now = not group and rows.stop - rows.start >= self.group_rows
            with record_function("fasttrak.gradients"):
                parts, q = engine.parts_and_q(state, batch, reuse=now)
            group.append(parts)
            qs.append(q)
            start = rows.start if size == 0 else start
            stop, size = rows.stop, size + rows.stop - rows.start
            if size >= self.group_rows:
                yield slice(start, stop), self._project(group), torch.cat(qs)
                qs, size = [], 0
        if group:
            yield slice(start, stop), self._project(group), torch.cat(qs)

    def _engine_for(self, task: Task) -> Any:
        """The gradient engine of this (bound) task, kept across calls with the same task
        object (one checkpoint's chunks): its probe of batch-less layers and its reusable
        gradient buffers then serve every chunk, not just one."""
        if self._engine is None or self._engine[0] is not task:
            self._engine = (task, self.gradients.build(self.model, task, self.params))
        return self._engine[1]

    def _project(self, group: list[list[Tensor]]) -> Tensor:
        """Project a group of batches, emptying ``group``."""
        if len(group) == 1:
            parts = group[0]
        else:  # per parameter, releasing each batch's part once copied: one copy at a time
            parts = []
            for i in range(len(group[0])):
                parts.append(torch.cat([batch[i] for batch in group]))
                for batch in group:
                    batch[i] = None  # type: ignore[call-overload]
        group.clear()
        with record_function("fasttrak.project"):
            features = self.projector.project(parts)
        if any(_shares_memory(features, part) for part in parts):
            features = features.clone()  # the parts may be the engine's reused buffers
        return features

    def matrix(self) -> Tensor:
        """(p, k): the projector's explicit map, one gradient coordinate per row."""
        return self.projector.matrix()


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _numels(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """Number of elements of each named parameter, in the given order."""
    named = dict(model.named_parameters())
    return {name: named[name].numel() for name in names}


def projectors() -> dict[str, ProjectorConfig]:
    """The projector kinds selectable by name, each with its default options."""
    from fasttrak.projection.dense import Dense
    from fasttrak.projection.factored import Factored
    from fasttrak.projection.identity import Identity
    from fasttrak.projection.sjlt import SJLT
    from fasttrak.projection.srht import SRHT

    return {
        "dense": Dense(),
        "factored": Factored(),
        "identity": Identity(),
        "sjlt": SJLT(),
        "srht": SRHT(),
    }


def resolve_projector(projector: str | ProjectorConfig) -> ProjectorConfig:
    """Turn a projector name (``"dense"``, ``"sjlt"``, ``"srht"``, ``"identity"``,
    ``"factored"``) or configured instance into a config."""
    by_name = projectors()
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


def projector_from_spec(spec: dict[str, Any]) -> ProjectorConfig:
    """The config whose layout has this store ``spec`` (for the same model, selection and
    proj_dim): the inverse of ``config.layout(...).spec``. Options that do not change the
    features (such as ``Dense.cache_bytes``) take their defaults."""
    from fasttrak.projection.dense import Dense
    from fasttrak.projection.factored import Factored
    from fasttrak.projection.identity import Identity
    from fasttrak.projection.sjlt import SJLT
    from fasttrak.projection.srht import SRHT

    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "dense":
        return Dense(distribution=spec["distribution"])
    if kind == "sjlt":
        return SJLT(s=spec["s"])
    if kind == "srht":
        return SRHT(block_size=spec["block_size"])
    if kind == "identity":
        return Identity()
    if kind == "factored":
        return Factored(k_in=spec["k_in"], k_out=spec["k_out"], others=spec["others"])
    raise ConfigError(f"unknown projector spec {spec!r}; kinds are {sorted(projectors())}")
