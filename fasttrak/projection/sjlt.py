"""Sparse Johnson–Lindenstrauss transform (SJLT): each gradient coordinate goes to ``s`` buckets.

features[:, h_i(j)] += sign_i(j) * grads[:, j] / sqrt(s) for i = 1..s.

The k outputs are split into ``s`` contiguous ranges of (almost) equal size and each
coordinate j gets one uniform bucket h_i(j) in range i (the "block" construction of Kane &
Nelson), so its ``s`` buckets are always distinct at no extra cost, with an independent random
sign each. Each column of the implied (p, k) matrix therefore has exactly ``s`` nonzeros
+-1/sqrt(s): ``E[P Pᵀ] = I`` (different coordinates have independent signs), so norms and inner
products are preserved in expectation. ``s = 1`` is CountSketch.

Buckets and signs are a pure function of (seed, model index, parameter name, coordinate):
they are drawn in fixed tiles of ``TILE_ROWS`` coordinates from a CPU generator seeded by
:func:`~fasttrak.projection.dense.projection_seed`, exactly like the dense projection, then
cached on ``device`` (as int32 indices, ``4 * s * p`` bytes, widened to int64 one parameter
block at a time when used).

The cost of :meth:`SJLTProjector.project` is O(B · p · s) additions (``index_add_``), never
O(B · p · k). The sign is folded into the bucket index (bucket + k for a negative sign, into a
(B, 2k) accumulator; the result is the difference of the two halves), so the gradients are
added as they are, without a multiplied copy; per-parameter gradient parts are added one by
one, without concatenating them. On CUDA ``index_add_`` uses atomics: features are equal to
the CPU ones up to float32 summation order, not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fasttrak.errors import ConfigError
from fasttrak.projection.base import GradientProjection
from fasttrak.projection.common import TILE_ROWS, as_parts, implied_matrix, projection_seed

_COLUMNS = 2**20
"""Gradient columns added per ``index_add_`` call."""


def generate_buckets(rows: int, k: int, s: int, seed: int) -> tuple[Tensor, Tensor]:
    """Buckets (s, rows) int64 in [0, k) and signs (s, rows) bool (True: negative) of one tile.

    Bucket i of a coordinate lies in output range i, ``[i*k//s, (i+1)*k//s)``, so the s buckets
    of a coordinate are distinct.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    buckets = torch.empty((s, rows), dtype=torch.int64)
    for i in range(s):
        lo, hi = i * k // s, (i + 1) * k // s
        buckets[i] = torch.randint(lo, hi, (rows,), generator=gen)
    negative = torch.randint(0, 2, (s, rows), generator=gen, dtype=torch.int8).bool()
    return buckets, negative


@dataclass
class SJLTProjector:
    """Projects (B, p) gradients to (B, k) with a sparse sign matrix (s nonzeros per coordinate)."""

    param_numels: dict[str, int]
    k: int
    s: int = 1
    seed: int = 0
    model_id: int = 0
    device: torch.device | str = "cpu"
    group_rows: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        _check_s(self.s)
        if self.k < 1:
            raise ConfigError(f"proj_dim must be >= 1, got {self.k}")
        if self.s > self.k:
            raise ConfigError(
                f"SJLT(s={self.s}) hashes every coordinate to s distinct outputs, so it needs "
                f"proj_dim >= s; got proj_dim={self.k}: lower s or raise proj_dim"
            )
        self.device = torch.device(self.device)
        self.num_params = sum(self.param_numels.values())
        # index[i, j]: the accumulator column (in [0, 2k)) of coordinate j's i-th bucket.
        index = torch.empty((self.s, self.num_params), dtype=torch.int32)
        start = 0
        for name, numel in self.param_numels.items():
            for tile in range(math.ceil(numel / TILE_ROWS)):
                rows = min(TILE_ROWS, numel - tile * TILE_ROWS)
                seed = projection_seed(self.seed, self.model_id, name, tile)
                buckets, negative = generate_buckets(rows, self.k, self.s, seed)
                index[:, start : start + rows] = buckets + self.k * negative
                start += rows
        self._index = index.to(self.device)

    def matrix(self) -> Tensor:
        """The implied dense (p, k) float32 matrix (for tests and small p only)."""
        return implied_matrix(self.project, self.num_params, self.device)

    def project(self, grads: Tensor | Sequence[Tensor]) -> Tensor:
        """grads (B, p), or its per-parameter parts (B, p_i) in order -> features (B, k),
        float32, on ``device``."""
        blocks = as_parts(grads, self.num_params)
        rows = blocks[0].shape[0]
        acc = torch.zeros((rows, 2 * self.k), dtype=torch.float32, device=self.device)
        start = 0
        for block in blocks:
            block = block.to(device=self.device, dtype=torch.float32)
            # Column slices bound the int64 copy of the indices (index_add_ is ~20x slower
            # with int32 indices on CPU) to 8 * s * _COLUMNS bytes.
            for lo in range(0, block.shape[1], _COLUMNS):
                cols = block[:, lo : lo + _COLUMNS]
                index = self._index[:, start + lo : start + lo + cols.shape[1]].long()
                for i in range(self.s):
                    acc.index_add_(1, index[i], cols)
            start += block.shape[1]
        out = acc[:, : self.k] - acc[:, self.k :]
        if self.s > 1:
            out.mul_(1.0 / math.sqrt(self.s))
        return out


def _check_s(s: int) -> None:
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ConfigError(
            f"SJLT(s=...) is the number of nonzeros per coordinate, an int >= 1; got {s!r}"
        )


@dataclass(frozen=True)
class SJLT(GradientProjection):
    """Sparse JL projection with ``s`` nonzeros +-1/sqrt(s) per gradient coordinate.

    O(B·p·s) per batch instead of O(B·p·k). ``s=1`` (CountSketch) is fastest; larger ``s``
    gives lighter tails for gradients whose mass sits in a few coordinates.
    """

    s: int = 1

    def __post_init__(self) -> None:
        _check_s(self.s)

    def spec(self, k: int) -> dict[str, Any]:
        return {"kind": "sjlt", "s": self.s, "k": k, "tile_rows": TILE_ROWS, "version": 1}

    def output_dim(self, k: int, num_params: int) -> int:
        return k

    def build(
        self, param_numels: dict[str, int], k: int, seed: int, model_id: int, device: torch.device
    ) -> SJLTProjector:
        return SJLTProjector(
            dict(param_numels), k=k, s=self.s, seed=seed, model_id=model_id, device=device
        )
