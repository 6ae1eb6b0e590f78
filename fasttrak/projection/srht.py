"""Subsampled randomized Hadamard transform (SRHT), block by block.

Block size: b = min(``block_size``, the smallest power of two >= k). A block needs b >= k
coordinates to give every one of them a dense image in all k outputs; a larger block only
costs more Hadamard passes (log b of them) for outputs that are then thrown away, so b grows
with k, not with the model (k = 512: b = 512, two radix-32 passes instead of four radix-16
passes at the 2**16 of spec version 1).

Block layout (:func:`block_layout`): each parameter's gradient, of n coordinates, is cut
from its first coordinate into ⌊n / b⌋ full blocks of b, then the rest r = n mod b into
one block per set bit of r of at least ``MIN_BLOCK`` (64) coordinates, largest first
(r = 452 → 256, 128, 64), and a last block of the r mod 64 remaining coordinates,
zero-padded to the next power of two. So at most 63 zero coordinates per parameter are
transformed, where padding the whole rest would waste up to b / 2. Block boundaries are a
fixed function of (parameter name, its size, b), never of its offset in the model, so the
map of a parameter's coordinates does not depend on the other parameters. Every block β
(padded size s) gets its own SRHT

    φ_β = (1/√r) · S_β H_s D_β x_β,    r = min(k, s) outputs,

with D_β random ±1 signs, H_s the (unnormalised, ±1) Sylvester–Hadamard matrix, applied by
a fast Walsh–Hadamard transform in O(s log s), and S_β a random map of the s transformed
coordinates into the k outputs:

* full blocks, s = b >= k: a uniformly random k-subset of the b coordinates, **without
  replacement**, in increasing order, goes to outputs 0..k-1 with independent random signs
  E_β: S_β = E_β R_β. When b = k (k a power of two) R_β is the identity, and S_β costs one
  multiply: no gather. The signs decorrelate blocks: two blocks' images share every
  output, and ⟨E_β u, E_γ v⟩ is a Rademacher sum over the k outputs (variance
  Σ_l u_l² v_l², about ‖u‖²‖v‖²/k after the Hadamard mixing), as for a dense map;
* smaller blocks (the rest of a parameter, s < k): all s coordinates go to s distinct
  outputs sampled without replacement from the k. The block is then embedded isometrically
  (‖φ_β‖ = ‖x_β‖ exactly): no error, no variance, no duplicated coordinates (sampling with
  replacement would add variance; an error would forbid every bias vector smaller than k).

The features are the sum over blocks, φ = Σ_β φ_β.

Scale: ‖H_s D_β x_β‖² = s ‖x_β‖². For s >= k each transformed coordinate is kept with
probability k/s, so E‖φ_β‖² = (1/k)(k/s) s ‖x_β‖² = ‖x_β‖² (exactly when s = k: the block
map is orthogonal); for s < k, ‖φ_β‖² = (1/s) s ‖x_β‖². Blocks have independent signs, so
E⟨φ_β, φ_γ⟩ = 0 for β ≠ γ and E‖φ‖² = Σ_β ‖x_β‖² = ‖g‖²; the same argument on x + y gives
E⟨φ(x), φ(y)⟩ = ⟨x, y⟩.

Randomness is a pure function of (seed, model index, parameter name, coordinate / block):
the input signs D of a parameter's coordinates are drawn in fixed tiles of ``TILE_ROWS``
coordinates from a CPU generator seeded by
:func:`~fasttrak.projection.dense.projection_seed` (they do not depend on b); the output
signs E of its full blocks likewise, as one stream of k signs per full block (block j:
entries j·k .. j·k + k - 1) in tiles seeded by ``projection_seed(seed, model_id,
name + "/srht-out", tile)``; the subset R_β (b > k) or the outputs of a smaller block j
(counting from 0 in the parameter's layout) from a generator seeded by
``projection_seed(seed, model_id, name + "/srht", j)``. All are generated once per
projector on the CPU and moved to ``device``.

A NaN or inf anywhere in a block reaches every transformed coordinate of that block (every
entry of H_s is ±1), hence at least min(k, s) ≥ 1 features of that example's row.

Memory: besides the cached signs (4 bytes per parameter for D, 4 bytes per full-block output
for E, i.e. about 4 k/b bytes per parameter) and sampling indices (8 bytes per sampled
coordinate, only when b > k or for the rest blocks), a projector keeps two float32 work
buffers of max(``chunk_elems``, padded block size) entries, reused by every call: rows and
blocks are processed in chunks of at most that many entries, whatever the batch size. On the
CPU the buffers hold 2 MiB each (they stay in cache) and the Hadamard factors are radix 32;
on a GPU 256 MiB each (every chunk costs the same kernel launches) and radix 64 (two matmul
passes up to k = 4096), at the float32 matmul precision the user set (see DEVICE_RADIX).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from fasttrak.errors import ConfigError, DataError
from fasttrak.projection.base import GradientProjection
from fasttrak.projection.common import TILE_ROWS, as_parts, implied_matrix, projection_seed

_HADAMARD: dict[tuple[int, torch.device], Tensor] = {}


def hadamard(n: int, device: torch.device | str = "cpu") -> Tensor:
    """The (n, n) float32 Sylvester–Hadamard matrix (entries ±1; n a power of two)."""
    device = torch.device(device)
    key = (n, device)
    if key not in _HADAMARD:
        h = torch.ones((1, 1))
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        if h.shape[0] != n:
            raise ConfigError(f"the Hadamard size must be a power of two, got {n}")
        _HADAMARD[key] = h.to(device)
    return _HADAMARD[key]


def fwht(x: Tensor, radix: int = 16) -> Tensor:
    """Unnormalised fast Walsh–Hadamard transform of the rows of ``x`` (N, b): ``x @ H_b``.

    Returns a new tensor; ``x`` is not modified. ``radix=2`` is the textbook transform: log2(b)
    butterfly steps, each a reshape to (N, b/2h, 2, h) and one pass of additions. A larger
    radix r uses H_b = H_r ⊗ H_r ⊗ ... and applies each small (r, r) Hadamard factor along
    its axis of x reshaped to (N, ..., r, ...) with one batched matmul: log_r(b) passes
    over the data instead of log2(b), about twice as fast on CPUs (the butterflies are
    memory-bound); matmul flops are 2r per coordinate and pass.
    """
    if x.ndim != 2:
        raise DataError(f"fwht expects a 2-D (N, b) tensor, got shape {tuple(x.shape)}")
    src = x.clone(memory_format=torch.contiguous_format)
    return _fwht_pair(src, torch.empty_like(src), radix)


def _fwht_pair(src: Tensor, spare: Tensor, radix: int) -> Tensor:
    """FWHT of the rows of ``src`` (N, b), contiguous, ping-ponging between ``src`` and
    ``spare`` (same shape, contiguous): both are overwritten; returns the one holding the
    result. No allocation besides the small Hadamard factors."""
    n, b = src.shape
    bits = b.bit_length() - 1
    if b < 1 or 1 << bits != b:
        raise DataError(f"fwht needs a power-of-two length, got {b}")
    if radix < 2 or radix & (radix - 1):
        raise ConfigError(f"fwht radix must be a power of two >= 2, got {radix}")
    dst = spare
    if radix == 2:
        half = 1
        while half < b:
            s4 = src.view(n, b // (2 * half), 2, half)
            d4 = dst.view(n, b // (2 * half), 2, half)
            torch.add(s4[:, :, 0], s4[:, :, 1], out=d4[:, :, 0])
            torch.sub(s4[:, :, 0], s4[:, :, 1], out=d4[:, :, 1])
            src, dst = dst, src
            half *= 2
        return src
    # Split the log2(b) bits into ceil(bits / log2(radix)) factors of (nearly) equal size,
    # smallest first: the axis a factor acts on then has >= radix trailing entries except for
    # the last factor (a plain GEMM), avoiding batched matmuls of tiny matrices.
    steps = math.ceil(bits / (radix.bit_length() - 1))
    sizes = [1 << (bits // steps + (i >= steps - bits % steps)) for i in range(steps)]
    lead = n
    for size in sizes:
        trail = b // (size * (lead // n))
        h = hadamard(size, src.device)
        if trail == 1:  # h is symmetric
            torch.matmul(src.view(-1, size), h, out=dst.view(-1, size))
        else:
            torch.matmul(h, src.view(lead, size, trail), out=dst.view(lead, size, trail))
        src, dst = dst, src
        lead *= size
    return src


@dataclass(frozen=True)
class _Run:
    """``count`` consecutive blocks of one parameter, each of ``length`` real coordinates."""

    part: int  # index of the parameter in param_numels order
    start: int  # first coordinate of the run within the parameter
    count: int
    length: int
    first: int  # index of the run's first block among its group's blocks


@dataclass
class _Group:
    """All blocks with the same padded size ``size``, processed together."""

    size: int
    runs: list[_Run] = field(default_factory=list)
    num_blocks: int = 0
    # (num_blocks, min(k, size)): the sampled coordinates (size > k, increasing) or the
    # outputs (size < k) of every block; None when size == k (every coordinate, in order).
    index: Tensor | None = None
    out_signs: Tensor | None = None  # (num_blocks, k) output signs E when size >= k


CPU_CHUNK_ELEMS = 2**19
"""Work-buffer entries on the CPU (2 MiB of float32): 2**18 .. 2**20 within noise, 2**21
slower (the buffers stay in cache)."""

DEVICE_CHUNK_ELEMS = 2**26
"""Work-buffer entries off the CPU (256 MiB of float32 each): on a GPU every chunk costs a
fixed number of kernel launches, so chunks must be large. 2**19 (the CPU's) made a
ResNet-18 batch of 128 gradients 2,700 chunks and 1.8 s on an H200, all launch overhead."""

CPU_RADIX = 32
"""Hadamard factor size on the CPU: small matmuls near the FMA peak."""

DEVICE_RADIX = 64
"""Hadamard factor size off the CPU: two matmul passes for blocks up to 2**12 (k <= 4096),
three up to 2**18; radix-2 butterflies took 11 memory-bound passes of two kernels each at
k = 2048. The matmuls run at the float32 matmul precision the user set: full float32 by
PyTorch's default; with TF32 enabled (``torch.backends.cuda.matmul.fp32_precision = "tf32"``)
each pass rounds its input to 10 mantissa bits, a relative error of about 5e-4 per feature,
the size of float16 storage's rounding. Projections follow the user's setting; only the
kernel's products switch TF32 off (:func:`fasttrak.kernel.full_precision_matmul`)."""

MIN_BLOCK = 64
"""Smallest block cut from the rest of a parameter; fewer coordinates are zero-padded."""


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def block_layout(numel: int, block_size: int) -> list[tuple[int, int, int, int]]:
    """Runs of blocks of one parameter: (start, count, length, padded size) in order."""
    full, rest = divmod(numel, block_size)
    runs = [(0, full, block_size, block_size)] if full else []
    start = full * block_size
    smallest = min(MIN_BLOCK, block_size)
    for bit in range(rest.bit_length() - 1, -1, -1):
        piece = 1 << bit
        if piece < smallest:
            break
        if rest & piece:
            runs.append((start, 1, piece, piece))
            start += piece
    if numel > start:
        runs.append((start, 1, numel - start, _next_pow2(numel - start)))
    return runs


@dataclass
class SRHTProjector:
    """Projects (B, p) gradients to (B, k) with a sum of independent per-block SRHTs."""

    param_numels: dict[str, int]
    k: int
    block_size: int = 2**16
    seed: int = 0
    model_id: int = 0
    device: torch.device | str = "cpu"
    chunk_elems: int | None = None  # None: CPU_CHUNK_ELEMS on the CPU, DEVICE_CHUNK_ELEMS elsewhere
    radix: int | None = None  # None: CPU_RADIX on the CPU, DEVICE_RADIX elsewhere
    group_rows: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        _check_block_size(self.block_size)
        if self.k < 1:
            raise ConfigError(f"proj_dim must be >= 1, got {self.k}")
        self.device = torch.device(self.device)
        on_cpu = self.device.type == "cpu"
        if self.radix is None:
            self.radix = CPU_RADIX if on_cpu else DEVICE_RADIX
        if self.chunk_elems is None:
            self.chunk_elems = CPU_CHUNK_ELEMS if on_cpu else DEVICE_CHUNK_ELEMS
        self.block = effective_block_size(self.block_size, self.k)
        self.num_params = sum(self.param_numels.values())
        self._offsets: list[int] = []
        groups: dict[int, _Group] = {}
        block_index: dict[int, list[Tensor]] = {}
        block_signs: dict[int, list[Tensor]] = {}
        bits = torch.empty(self.num_params, dtype=torch.int8)
        scales = torch.empty(self.num_params, dtype=torch.float32)
        offset = 0
        for part, (name, numel) in enumerate(self.param_numels.items()):
            self._offsets.append(offset)
            _fill_bits(bits[offset : offset + numel], self.seed, self.model_id, name)
            j = 0  # block index within the parameter
            for start, count, length, size in block_layout(numel, self.block):
                group = groups.setdefault(size, _Group(size))
                group.runs.append(_Run(part, start, count, length, group.num_blocks))
                group.num_blocks += count
                outputs = min(self.k, size)
                scale = 1.0 / math.sqrt(outputs)
                scales[offset + start : offset + start + count * length] = scale
                if size >= self.k:  # output signs E of blocks j .. j + count - 1
                    stream = _sign_stream(
                        self.seed, self.model_id, f"{name}/srht-out", j * self.k, count * self.k
                    )
                    block_signs.setdefault(size, []).append(stream.view(count, self.k))
                for i in range(count):
                    if size == self.k:
                        continue
                    gen = torch.Generator().manual_seed(
                        projection_seed(self.seed, self.model_id, f"{name}/srht", j + i)
                    )
                    if size > self.k:  # a k-subset of the block's coordinates, in order
                        chosen = torch.randperm(size, generator=gen)[:outputs].sort().values
                    else:  # outputs = size distinct outputs
                        chosen = torch.randperm(self.k, generator=gen)[:outputs]
                    block_index.setdefault(size, []).append(chosen)
                j += count
            offset += numel
        # D scaled by 1/sqrt(r): (1 - 2 bit) * scale, as one vectorised pass
        signs = bits.to(torch.float32).mul_(-2.0).add_(1.0).mul_(scales)
        self._signs = signs.to(self.device)
        self._groups = sorted(groups.values(), key=lambda g: -g.size)
        for group in self._groups:
            if group.size != self.k:
                group.index = torch.stack(block_index[group.size]).to(self.device)
            if group.size >= self.k:
                group.out_signs = torch.cat(block_signs[group.size]).to(self.device)
        self._buffers: tuple[Tensor, ...] | None = None

    def matrix(self) -> Tensor:
        """The implied dense (p, k) float32 matrix (for tests and small p only)."""
        return implied_matrix(self.project, self.num_params, self.device)

    def project(self, grads: Tensor | Sequence[Tensor]) -> Tensor:
        """grads (B, p), or its per-parameter parts (B, p_i) in order -> features (B, k),
        float32, on ``device``."""
        blocks = as_parts(grads, self.num_params)
        if [b.shape[1] for b in blocks] == list(self.param_numels.values()):
            parts = blocks
        else:  # a whole (B, p) matrix, or blocks that do not follow the parameters
            whole = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
            parts = [
                whole[:, o : o + n]
                for o, n in zip(self._offsets, self.param_numels.values(), strict=True)
            ]
        rows = blocks[0].shape[0]
        parts = [p.to(device=self.device, dtype=torch.float32) for p in parts]
        out = torch.zeros((rows, self.k), dtype=torch.float32, device=self.device)
        chunk_elems = cast(int, self.chunk_elems)  # set by __post_init__
        for group in self._groups:
            # Bound the work buffers to ~chunk_elems entries: split rows, then blocks.
            row_step = max(1, chunk_elems // group.size)
            for r0 in range(0, rows, row_step):
                r1 = min(rows, r0 + row_step)
                cap = max(1, chunk_elems // ((r1 - r0) * group.size))
                for pieces in _chunks(group.runs, cap):
                    self._project_chunk([p[r0:r1] for p in parts], group, pieces, out[r0:r1])
        return out

    def _project_chunk(
        self, parts: list[Tensor], group: _Group, pieces: list[tuple[_Run, int, int]], out: Tensor
    ) -> None:
        """Add the SRHT features of the blocks in ``pieces`` (all of padded size
        ``group.size``) to ``out`` (rows, k), in place."""
        rows, size = out.shape[0], group.size
        count = sum(c for _, _, c in pieces)
        buf, spare = self._work(rows * count * size)
        buf = buf.view(rows, count, size)
        i = 0
        for run, j0, c in pieces:  # buf = D x, zero-padded
            lo = run.start + j0 * run.length
            src = parts[run.part][:, lo : lo + c * run.length].unflatten(1, (c, run.length))
            sign = self._signs[self._offsets[run.part] + lo :][: c * run.length]
            torch.mul(src, sign.view(c, run.length), out=buf[:, i : i + c, : run.length])
            if run.length < size:
                buf[:, i : i + c, run.length :].zero_()
            i += c
        flat = buf.view(rows * count, size)
        y = _fwht_pair(flat, spare.view(rows * count, size), cast(int, self.radix))
        free = (spare if y is flat else buf).reshape(-1)  # the work buffer not holding y
        first = pieces[0][0].first + pieces[0][1]
        if size < self.k:  # every transformed coordinate goes to its own sampled output
            assert group.index is not None
            index = group.index[first : first + count]
            out.index_add_(1, index.reshape(-1), y.view(rows, count * size))
            return
        # Keep the sampled coordinates of every block (all of them when size == k), flip
        # their output signs and add the blocks up.
        assert group.out_signs is not None
        out_signs = group.out_signs[first : first + count]
        kept = free[: rows * count * self.k].view(rows, count, self.k)
        if size > self.k:
            assert group.index is not None
            offsets = torch.arange(count, device=self.device)[:, None] * size
            index = (group.index[first : first + count] + offsets).reshape(-1)
            torch.index_select(y.view(rows, count * size), 1, index, out=kept.view(rows, -1))
            kept.mul_(out_signs)
        else:
            torch.mul(y.view(rows, count, size), out_signs, out=kept)
        out.add_(kept.sum(1))

    def _work(self, numel: int) -> tuple[Tensor, Tensor]:
        """Two flat float32 work buffers of at least ``numel`` entries, kept between calls
        (fresh large allocations cost page faults comparable to the transform itself)."""
        if self._buffers is None or self._buffers[0].numel() < numel:
            self._buffers = tuple(
                torch.empty(numel, dtype=torch.float32, device=self.device) for _ in range(2)
            )
        return self._buffers[0][:numel], self._buffers[1][:numel]


def effective_block_size(block_size: int, k: int) -> int:
    """The Hadamard block size b of a projection to k: the smallest power of two >= k (a
    block needs k coordinates to fill k outputs), at most ``block_size``."""
    return min(block_size, _next_pow2(k))


def _sign_stream(seed: int, model_id: int, key: str, start: int, length: int) -> Tensor:
    """Entries start .. start + length - 1 of a stream of ±1 (float32) drawn in tiles of
    ``TILE_ROWS`` from generators seeded by ``projection_seed(seed, model_id, key, tile)``."""
    first, last = start // TILE_ROWS, (start + length - 1) // TILE_ROWS
    bits = torch.empty((last + 1 - first) * TILE_ROWS, dtype=torch.int8)
    _fill_bits(bits, seed, model_id, key, first_tile=first)
    signs = bits[start - first * TILE_ROWS :][:length].to(torch.float32)
    return signs.mul_(-2.0).add_(1.0)


def _fill_bits(bits: Tensor, seed: int, model_id: int, key: str, first_tile: int = 0) -> None:
    """Fill the int8 vector ``bits`` (its length any number of coordinates) with the random
    0/1 bits of tiles first_tile, first_tile + 1, ... of ``TILE_ROWS`` coordinates, tile t
    drawn by a CPU generator seeded by ``projection_seed(seed, model_id, key, t)`` (a last
    partial tile takes the first entries of its draw). Sign = 1 - 2 bit."""
    for i, lo in enumerate(range(0, bits.numel(), TILE_ROWS)):
        rows = min(TILE_ROWS, bits.numel() - lo)
        gen = torch.Generator().manual_seed(projection_seed(seed, model_id, key, first_tile + i))
        torch.randint(0, 2, (rows,), generator=gen, dtype=torch.int8, out=bits[lo : lo + rows])


def _chunks(runs: list[_Run], cap: int):
    """Consecutive pieces (run, first block in run, count) of at most ``cap`` blocks each."""
    pieces: list[tuple[_Run, int, int]] = []
    have = 0
    for run in runs:
        j = 0
        while j < run.count:
            take = min(run.count - j, cap - have)
            pieces.append((run, j, take))
            have += take
            j += take
            if have == cap:
                yield pieces
                pieces, have = [], 0
    if pieces:
        yield pieces


def _check_block_size(block_size: int) -> None:
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size < 1
        or block_size & (block_size - 1)
    ):
        raise ConfigError(
            f"SRHT(block_size=...) must be a power of two such as 2**16, got {block_size!r}"
        )


@dataclass(frozen=True)
class SRHT(GradientProjection):
    """Subsampled randomized Hadamard transform over blocks of b = min(``block_size``, the
    smallest power of two >= k) coordinates.

    O(B·p·log b) per batch; features are the sum of independent per-block SRHTs (see the
    module docstring). Spec version 2 (blocks sized by k, output signs); stores made with
    version 1 (blocks of ``block_size``, sampled outputs) refuse to mix with it.
    """

    block_size: int = 2**16

    def __post_init__(self) -> None:
        _check_block_size(self.block_size)

    def spec(self, k: int) -> dict[str, Any]:
        return {
            "kind": "srht",
            "block_size": self.block_size,
            "k": k,
            "tile_rows": TILE_ROWS,
            "version": 2,
        }

    def output_dim(self, k: int, num_params: int) -> int:
        return k

    def build(
        self, param_numels: dict[str, int], k: int, seed: int, model_id: int, device: torch.device
    ) -> SRHTProjector:
        return SRHTProjector(
            dict(param_numels),
            k=k,
            block_size=self.block_size,
            seed=seed,
            model_id=model_id,
            device=device,
        )
