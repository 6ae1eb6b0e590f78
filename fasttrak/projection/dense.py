"""Dense random projection: features = grads @ P with P of shape (p, k).

Entries are i.i.d. Rademacher (+-1) or standard Gaussian, scaled by 1/sqrt(k) so that
E[P Pᵀ] = I: inner products and norms are preserved in expectation.

P is a pure function of (seed, model index, parameter name, coordinate): the rows of P
that belong to parameter ``name`` are generated in fixed tiles of ``TILE_ROWS`` coordinates,
each from a CPU generator seeded by a hash of (seed, model_id, name, tile index). The matrix
is therefore identical on every device and for every batch size, and can be generated in
any order or block size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from fasttrak.errors import ConfigError, DataError
from fasttrak.projection.base import GradientProjection
from fasttrak.projection.common import (
    TILE_ROWS,
    Distribution,
    generate_tile,
    projection_seed,
)


@dataclass(frozen=True)
class _Tile:
    name: str
    index: int
    start: int  # first row of this tile in the flattened gradient
    rows: int


@dataclass
class DenseProjector:
    """Projects (B, p) gradients to (B, k) with a dense random matrix.

    The matrix is generated once and kept on ``device`` when p * k * 4 bytes fit in
    ``cache_bytes``; otherwise it is generated tile by tile on every :meth:`project` call,
    and the caller gathers ``group_rows`` gradient rows per call so that generation is
    amortised over many examples (bounded by ``group_bytes`` of gradients).
    """

    param_numels: dict[str, int]
    k: int
    seed: int = 0
    model_id: int = 0
    kind: Distribution = "rademacher"
    device: torch.device | str = "cpu"
    cache_bytes: int = 2**30
    group_bytes: int = 2**30
    _matrix: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"proj_dim must be >= 1, got {self.k}")
        self.device = torch.device(self.device)
        self.num_params = sum(self.param_numels.values())
        self._tiles: list[_Tile] = []
        start = 0
        for name, numel in self.param_numels.items():
            for index in range(math.ceil(numel / TILE_ROWS)):
                rows = min(TILE_ROWS, numel - index * TILE_ROWS)
                self._tiles.append(_Tile(name, index, start, rows))
                start += rows

    @property
    def cached(self) -> bool:
        return self.num_params * self.k * 4 <= self.cache_bytes

    @property
    def group_rows(self) -> int:
        if self.cached:
            return 1
        return max(1, self.group_bytes // (4 * self.num_params))

    def _tile(self, tile: _Tile) -> Tensor:
        seed = projection_seed(self.seed, self.model_id, tile.name, tile.index)
        with record_function("fasttrak.generate"):
            return generate_tile(tile.rows, self.k, self.kind, seed)

    def _fill(self, buffer: Tensor, tiles: list[_Tile]) -> int:
        """Write the consecutive ``tiles`` into the first rows of ``buffer`` (rows, k) and
        return how many rows they fill. Tiles are drawn in parallel, one thread each on up to
        ``torch.get_num_threads()`` threads (torch releases the GIL while it draws): every
        tile has its own generator, so the bits are those of a serial loop."""
        starts = [0]
        for tile in tiles:
            starts.append(starts[-1] + tile.rows)

        def draw(i: int) -> None:
            buffer[starts[i] : starts[i + 1]] = self._tile(tiles[i])

        workers = min(torch.get_num_threads(), len(tiles))
        if workers <= 1:
            for i in range(len(tiles)):
                draw(i)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="fasttrak-dense") as pool:
                list(pool.map(draw, range(len(tiles))))
        return starts[-1]

    def matrix(self) -> Tensor:
        """The full (p, k) float32 matrix on ``device`` (built once, then cached)."""
        if self._matrix is None:
            full = torch.empty((self.num_params, self.k), dtype=torch.float32)
            self._fill(full, self._tiles)
            self._matrix = full.to(self.device)
        return self._matrix

    def project(self, grads: Tensor | Sequence[Tensor]) -> Tensor:
        """grads (B, p), or its per-parameter parts (B, p_i) in order -> features (B, k),
        float32, on ``device``. Blocks are multiplied with the matching rows of P in place
        of a concatenation (no copy of the gradients). A streamed matrix is generated block
        by block into one reused buffer of at most ``cache_bytes``."""
        parts = [grads] if isinstance(grads, Tensor) else list(grads)
        if not parts:
            raise DataError("project() got no gradient parts; pass (B, p) gradients")
        if any(g.ndim != 2 for g in parts) or sum(g.shape[1] for g in parts) != self.num_params:
            shapes = [tuple(g.shape) for g in parts]
            raise DataError(f"expected gradients of shape (B, {self.num_params}), got {shapes}")
        rows = parts[0].shape[0]
        out = torch.zeros((rows, self.k), dtype=torch.float32, device=self.device)
        if self.cached:
            self._accumulate(out, parts, self.matrix(), 0)
            return out
        rows_per_block = max(TILE_ROWS, self.cache_bytes // (4 * self.k))
        buffer = torch.empty((min(rows_per_block, self.num_params), self.k), dtype=torch.float32)
        block: list[_Tile] = []
        for tile in [*self._tiles, None]:
            if tile is not None and sum(t.rows for t in block) + tile.rows <= rows_per_block:
                block.append(tile)
                continue
            if block:
                filled = self._fill(buffer, block)
                self._accumulate(out, parts, buffer[:filled].to(self.device), block[0].start)
            block = [tile] if tile is not None else []
        return out

    def _accumulate(self, out: Tensor, parts: list[Tensor], rows_of_p: Tensor, start: int) -> None:
        """out += grads[:, start : start + len(rows_of_p)] @ rows_of_p, reading the columns
        from the per-parameter parts (no concatenated copy)."""
        stop, offset = start + rows_of_p.shape[0], 0
        for part in parts:
            lo, hi = max(start, offset), min(stop, offset + part.shape[1])
            if lo < hi:
                cols = part[:, lo - offset : hi - offset].to(self.device, torch.float32)
                out.addmm_(cols, rows_of_p[lo - start : hi - start])
            offset += part.shape[1]


@dataclass(frozen=True)
class Dense(GradientProjection):
    """Dense Rademacher (default) or Gaussian projection, the reference TRAK projection.

    ``cache_bytes``: keep the whole (p, k) matrix in memory when it fits (default 1 GiB);
    otherwise it is streamed in blocks of at most that size.
    """

    distribution: Distribution = "rademacher"
    cache_bytes: int = 2**30

    def __post_init__(self) -> None:
        if self.distribution not in ("rademacher", "gaussian"):
            raise ConfigError(
                f"unknown distribution {self.distribution!r}; use 'rademacher' or 'gaussian'"
            )

    def spec(self, k: int) -> dict[str, Any]:
        return {
            "kind": "dense",
            "distribution": self.distribution,
            "k": k,
            "tile_rows": TILE_ROWS,
            "version": 1,
        }

    def output_dim(self, k: int, num_params: int) -> int:
        return k

    def build(
        self, param_numels: dict[str, int], k: int, seed: int, model_id: int, device: torch.device
    ) -> DenseProjector:
        return DenseProjector(
            dict(param_numels),
            k=k,
            seed=seed,
            model_id=model_id,
            kind=self.distribution,
            device=device,
            cache_bytes=self.cache_bytes,
            group_bytes=self.cache_bytes,
        )
