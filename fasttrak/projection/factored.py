"""Factored per-layer projection (LoGra-style): ``P_out ⊗ P_in`` per covered layer.

Instead of forming per-example gradients ``(B, p)`` and projecting them, each covered layer
(nn.Linear, nn.Conv2d, nn.Embedding) gets two small random matrices, ``P_in`` (d_in' × k_in)
and ``P_out`` (d_out × k_out), and its feature block is the projection of the exact
per-example weight(+bias) gradient by their Kronecker product, computed from the layer's
input activations and output gradients (see :mod:`fasttrak.gradients.rules`). The total
feature dimension is ``Σ_layers k_in · k_out``. See docs/factored.md.

Both factors are Rademacher (±1/√k_in, ±1/√k_out), so ``E[(P_out ⊗ P_in)(P_out ⊗ P_in)ᵀ] = I``.
They are pure functions of (seed, model index, layer name, coordinate): rows are generated
in tiles of ``TILE_ROWS`` with :func:`~fasttrak.projection.dense.generate_tile`, seeded by
``projection_seed(seed, model_id, f"{layer}/in" | f"{layer}/out", tile)``, on the CPU, so
they are identical on every device and for every batch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from fasttrak.errors import ConfigError
from fasttrak.gradients import FactoredFeatures, GradientMethod, LayerSpec, is_covered, layer_spec
from fasttrak.projection.base import Batches, Layout
from fasttrak.projection.common import TILE_ROWS, generate_tile, projection_seed
from fasttrak.tasks.base import Task

VERSION = 1


def _factor(rows: int, k: int, seed: int, model_id: int, name: str) -> Tensor:
    """A (rows, k) Rademacher factor, built from independently seeded TILE_ROWS-row tiles."""
    tiles = [
        generate_tile(
            min(TILE_ROWS, rows - t * TILE_ROWS),
            k,
            "rademacher",
            projection_seed(seed, model_id, name, t),
        )
        for t in range(math.ceil(rows / TILE_ROWS))
    ]
    return torch.cat(tiles) if tiles else torch.empty((0, k))


@dataclass
class FactoredProjector:
    """Per-layer factors of one model id, and the featurizer that uses them.

    Implements :class:`~fasttrak.projection.base.Featurizer`: features come straight from
    layer hooks (one batch at a time; no per-example gradient is formed).
    """

    model: nn.Module
    layers: list[LayerSpec]
    p_in: dict[str, Tensor]
    p_out: dict[str, Tensor]
    sums_over_batch: bool = field(default=True, init=False)
    group_rows: int = field(default=1, init=False)
    _engine: FactoredFeatures | None = field(default=None, init=False, repr=False)
    _engine_task: int | None = field(default=None, init=False, repr=False)

    @property
    def k(self) -> int:
        return sum(self.p_in[ly.name].shape[1] * self.p_out[ly.name].shape[1] for ly in self.layers)

    @property
    def params(self) -> list[str]:
        """The parameters whose gradients the features project, in feature order."""
        return [p for ly in self.layers for p in ly.params]

    def features(
        self, state: dict[str, Tensor], task: Task, batches: Batches
    ) -> Iterator[tuple[slice, Tensor, Tensor]]:
        for rows, batch in batches:
            yield rows, *self._engine_for(task).features_and_q(state, batch)

    def batch_features(self, state: dict[str, Tensor], task: Task, batch: Any) -> Tensor:
        """(B, k) float32 features of one ``batch`` for the weights ``state`` (all parameters
        and buffers by name, on the compute device). The model must be in eval mode."""
        return self._engine_for(task).features_and_q(state, batch)[0]

    def _engine_for(self, task: Task) -> FactoredFeatures:
        if self._engine is None or self._engine_task != id(task):
            self._engine = FactoredFeatures(self.model, task, self.layers, self.p_in, self.p_out)
            self._engine_task = id(task)
        return self._engine

    def kron(self, name: str) -> Tensor:
        """The explicit (p_layer, k_layer) matrix ``P_rows ⊗ P_cols`` of one layer (tests and
        small layers only): ``features[:, block] == grads[:, layer params] @ kron(name)``
        with the gradient in ``[W | b]`` homogeneous layout (bias as the last column)."""
        layer = next(ly for ly in self.layers if ly.name == name)
        if layer.kind in ("embedding", "conv1d"):
            return torch.kron(self.p_in[name], self.p_out[name])
        return torch.kron(self.p_out[name], self.p_in[name])

    def matrix(self) -> Tensor:
        """(p, k): block diagonal over layers, rows in ``params`` order (each parameter
        flattened row-major), i.e. :meth:`kron` with its homogeneous rows reordered."""
        blocks = []
        for layer in self.layers:
            kron = self.kron(layer.name)
            blocks.append(kron[_parameter_order(layer, self.model).to(kron.device)])
        return torch.block_diag(*blocks)


def _parameter_order(layer: LayerSpec, model: nn.Module) -> Tensor:
    """Index of each [W | b] homogeneous-layout row of :meth:`FactoredProjector.kron`, in
    the order weight.flatten() then bias (the order of ``params``)."""
    if layer.kind == "embedding":
        return torch.arange(layer.d_in * layer.d_out)
    if layer.kind == "conv1d":  # homogeneous [W; b] (in + 1, out): already weight then bias
        return torch.arange(layer.d_in * layer.d_out)
    # linear / conv2d: rows = outputs, columns = d_act inputs (+ 1 for the bias)
    grid = torch.arange(layer.d_out * layer.d_in).reshape(layer.d_out, layer.d_in)
    parts = []
    if layer.weight is not None:
        parts.append(grid[:, : layer.d_act].reshape(-1))
    if layer.bias is not None:
        parts.append(grid[:, layer.d_act])
    return torch.cat(parts)


@dataclass(frozen=True)
class Factored:
    """Factored per-layer (Kronecker) projection of nn.Linear/nn.Conv2d/nn.Embedding layers.

    k_in, k_out: per-layer factor dimensions. When both are None, k_in = k_out =
        max(1, round(sqrt(proj_dim / L))) for L covered layers, so the total dimension
        L · k_in · k_out is close to proj_dim (not equal in general). When one is given,
        the other is max(1, round(proj_dim / (L · given))). No clipping: a factor may be
        wider than its layer (k_in > d_in'); it is still a random JL map, just wasteful.
    others: what to do with selected parameters outside covered layers (BatchNorm, LayerNorm,
        free tensors...): "error" (default) raises ValueError listing them; "exclude" drops
        them from the attribution (see :meth:`excluded`).

    A layer is covered when its weight or its bias is selected; exactly the selected ones are
    projected (a selected bias is the homogeneous coordinate; an unselected bias is ignored).
    """

    k_in: int | None = None
    k_out: int | None = None
    others: Literal["error", "exclude"] = "error"

    def __post_init__(self) -> None:
        if self.others not in ("error", "exclude"):
            raise ConfigError(f"others must be 'error' or 'exclude', got {self.others!r}")
        for name in ("k_in", "k_out"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive int or None, got {value!r}")

    # ------------------------------------------------------------------ layers
    def _split(self, model: nn.Module, selected: Sequence[str]) -> tuple[list[str], list[str]]:
        chosen = set(selected)
        first: dict[int, str] = {}
        shared: set[str] = set()
        for alias, param in model.named_parameters(remove_duplicate=False):
            name = first.setdefault(id(param), alias)
            if name != alias:
                shared.add(name)
        tied = sorted(shared & chosen)
        if tied:
            raise ConfigError(
                f"parameters {tied} are tied (used by several layers, like GPT-2's wte and "
                "lm_head); the factored projection covers one layer per parameter: exclude them "
                "with params=, or use projector='srht' (any projector of per-example gradients)"
            )
        covered: list[str] = []
        inside: set[str] = set()
        for name, module in model.named_modules():
            if not is_covered(module):
                continue
            prefix = f"{name}." if name else ""
            own = {f"{prefix}{p}" for p, _ in module.named_parameters(recurse=False)}
            if own & chosen:
                covered.append(name)
                inside |= own & chosen
        return covered, [n for n in selected if n not in inside]

    def layers(self, model: nn.Module, selected: Sequence[str]) -> list[str]:
        """Covered layer names (model.named_modules() order) among the selected parameters.

        Raises ValueError for selected parameters outside covered layers when
        ``others="error"``, and when no layer is covered."""
        covered, outside = self._split(model, selected)
        if outside and self.others == "error":
            raise ConfigError(
                "the factored projection covers nn.Linear, nn.Conv2d (groups=1), nn.Embedding "
                "(without max_norm, scale_grad_by_freq or sparse) and HF Conv1D layers, "
                f"but these selected parameters are outside them: {outside}; exclude them with "
                "params= (e.g. params=[nn.Linear, nn.Conv2d]) or use "
                "projector=Factored(others='exclude') to drop them from the attribution"
            )
        if not covered:
            raise ConfigError(
                "no selected parameter belongs to an nn.Linear, nn.Conv2d, nn.Embedding or Conv1D "
                "layer; the factored projection has nothing to project"
            )
        return covered

    def excluded(self, model: nn.Module, selected: Sequence[str]) -> list[str]:
        """Selected parameters that the projection drops (non-empty only with "exclude")."""
        return self._split(model, selected)[1]

    def layer_specs(self, model: nn.Module, selected: Sequence[str]) -> list[LayerSpec]:
        return [layer_spec(model, name, selected) for name in self.layers(model, selected)]

    def covered_params(self, model: nn.Module, selected: Sequence[str]) -> list[str]:
        """The parameters actually attributed, in feature order (weight then bias per layer)."""
        return [p for ly in self.layer_specs(model, selected) for p in ly.params]

    # ------------------------------------------------------------------ dims
    def dims(self, num_layers: int, proj_dim: int) -> tuple[int, int]:
        """(k_in, k_out) for every layer."""
        if proj_dim < 1:
            raise ConfigError(f"proj_dim must be >= 1, got {proj_dim}")
        if self.k_in is not None and self.k_out is not None:
            return self.k_in, self.k_out
        if self.k_in is not None:
            return self.k_in, max(1, round(proj_dim / (num_layers * self.k_in)))
        if self.k_out is not None:
            return max(1, round(proj_dim / (num_layers * self.k_out))), self.k_out
        side = max(1, round(math.sqrt(proj_dim / num_layers)))
        return side, side

    def output_dim_for(self, model: nn.Module, selected: Sequence[str], proj_dim: int) -> int:
        """The feature dimension Σ_layers k_in · k_out."""
        layers = self.layers(model, selected)
        k_in, k_out = self.dims(len(layers), proj_dim)
        return len(layers) * k_in * k_out

    def spec(self, k: int) -> dict[str, Any]:
        """Store identity (protocol form: the configured, unresolved k_in/k_out)."""
        return {
            "kind": "factored",
            "distribution": "rademacher",
            "k": k,
            "k_in": self.k_in,
            "k_out": self.k_out,
            "others": self.others,
            "tile_rows": TILE_ROWS,
            "version": VERSION,
        }

    def spec_for(self, model: nn.Module, selected: Sequence[str], proj_dim: int) -> dict[str, Any]:
        """Full store identity: :meth:`spec` plus the resolved per-layer dims and layers."""
        specs = self.layer_specs(model, selected)
        k_in, k_out = self.dims(len(specs), proj_dim)
        return {
            **self.spec(len(specs) * k_in * k_out),
            "k_in": k_in,
            "k_out": k_out,
            "layers": {ly.name: [ly.kind, ly.d_in, ly.d_out] for ly in specs},
            "excluded": self.excluded(model, selected),
        }

    # ------------------------------------------------------------------ protocol
    def layout(self, model: nn.Module, selected: Sequence[str], proj_dim: int) -> Layout:
        """k, the full store identity (:meth:`spec_for`), the covered parameters and the
        selected ones left out."""
        spec = self.spec_for(model, selected, proj_dim)
        return Layout(
            int(spec["k"]),
            spec,
            self.covered_params(model, selected),
            self.excluded(model, selected),
        )

    def featurizer(
        self,
        model: nn.Module,
        layout: Layout,
        seed: int,
        model_id: int,
        device: torch.device,
        gradients: GradientMethod,
    ) -> FactoredProjector:
        """Model ``model_id``'s factors; ``gradients`` is unused (features come from hooks)."""
        specs = self.layer_specs(model, layout.params)
        k_in, k_out = int(layout.spec["k_in"]), int(layout.spec["k_out"])
        return self._build(model, specs, k_in, k_out, seed, model_id, device)

    def build_factored(
        self,
        model: nn.Module,
        selected: Sequence[str],
        proj_dim: int,
        seed: int,
        model_id: int,
        device: torch.device | str,
    ) -> FactoredProjector:
        """Model ``model_id``'s factors for ``selected`` parameters at ``proj_dim``."""
        specs = self.layer_specs(model, selected)
        k_in, k_out = self.dims(len(specs), proj_dim)
        return self._build(model, specs, k_in, k_out, seed, model_id, device)

    @staticmethod
    def _build(
        model: nn.Module,
        specs: list[LayerSpec],
        k_in: int,
        k_out: int,
        seed: int,
        model_id: int,
        device: torch.device | str,
    ) -> FactoredProjector:
        with record_function("fasttrak.featurizer"):
            p_in = {
                ly.name: _factor(ly.d_in, k_in, seed, model_id, f"{ly.name}/in").to(device)
                for ly in specs
            }
            p_out = {
                ly.name: _factor(ly.d_out, k_out, seed, model_id, f"{ly.name}/out").to(device)
                for ly in specs
            }
        return FactoredProjector(model, specs, p_in, p_out)
