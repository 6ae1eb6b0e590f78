"""Pieces every projection shares: the seeding of its randomness and input checks.

Every projection is a pure function of (seed, model id, parameter name, coordinate): its
random numbers come in tiles of ``TILE_ROWS`` coordinates, each from a CPU generator seeded
by :func:`projection_seed`, so they are the same on every device and for every batch size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from fasttrak.errors import ConfigError, DataError

TILE_ROWS = 1024
"""Parameter coordinates per independently seeded tile of P (part of the projection's identity)."""

Distribution = Literal["rademacher", "gaussian"]


def projection_seed(seed: int, model_id: int, name: str, tile: int) -> int:
    """A stable 63-bit seed for one tile of P (blake2b; independent of Python's hash salt)."""
    digest = hashlib.blake2b(f"{seed}/{model_id}/{name}/{tile}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generate_tile(rows: int, k: int, distribution: Distribution, seed: int) -> Tensor:
    """One (rows, k) float32 tile of P on the CPU, already scaled by 1/sqrt(k)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if distribution == "rademacher":
        tile = torch.randint(0, 2, (rows, k), generator=gen, dtype=torch.int8).float()
        tile.mul_(2.0 / math.sqrt(k)).sub_(1.0 / math.sqrt(k))
    elif distribution == "gaussian":
        tile = torch.randn((rows, k), generator=gen).mul_(1.0 / math.sqrt(k))
    else:
        raise ConfigError(f"unknown distribution {distribution!r}; use 'rademacher' or 'gaussian'")
    return tile


def implied_matrix(project: Callable[[Tensor], Tensor], num_params: int, device: Any) -> Tensor:
    """The (p, k) float32 matrix a linear projection implies: the projection of the
    identity (for tests and small p only)."""
    return project(torch.eye(num_params, dtype=torch.float32, device=device))


def as_parts(grads: Tensor | Sequence[Tensor], num_params: int) -> list[Tensor]:
    """Gradients (B, p), or their per-parameter parts (B, p_i), as a checked list of parts."""
    parts = [grads] if isinstance(grads, Tensor) else list(grads)
    check_parts(parts, num_params)
    return parts


def check_parts(parts: list[Tensor], num_params: int) -> None:
    """Raise DataError unless ``parts`` are 2-D (B, p_i) pieces of one (B, num_params) gradient."""
    if not parts:
        raise DataError(f"expected gradients of shape (B, {num_params}), got an empty list")
    if any(b.ndim != 2 or b.shape[0] != parts[0].shape[0] for b in parts):
        shapes = [tuple(b.shape) for b in parts]
        raise DataError(f"expected 2-D gradient parts (B, p_i) with the same B, got {shapes}")
    width = sum(b.shape[1] for b in parts)
    if width != num_params:
        raise DataError(
            f"expected gradients of shape (B, {num_params}) (or parts whose widths sum to "
            f"{num_params}), got width {width}: build the projector with the same parameters "
            "as the gradients"
        )
