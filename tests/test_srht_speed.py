"""Structural guards of the SRHT's cost (no timing: tests never time things; the speed is
measured by benchmarks/projection.py). The work per gradient entry is the sign multiply,
log_32(b) Hadamard matmul passes and, for blocks of k coordinates, one multiply-and-sum into
the outputs: no gather or scatter. b follows k, so a small k pays for few passes."""

from __future__ import annotations

import math

import pytest
import torch

from fasttrak.projection import SRHT


def _count_matmuls(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    matmul = torch.matmul

    def counting(a, b, *args, **kwargs):
        calls.append(tuple(a.shape) + tuple(b.shape))
        return matmul(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "matmul", counting)
    return calls


@pytest.mark.parametrize("k", [64, 512, 1024, 2048, 4096])
def test_hadamard_passes_grow_with_log_k_not_with_the_block_size_cap(k, monkeypatch):
    proj = SRHT().build({"w": 4 * k}, k, 0, 0, torch.device("cpu"))
    assert proj.block == k  # not the 2**16 cap
    x = torch.randn(3, 4 * k)
    calls = _count_matmuls(monkeypatch)
    proj.project(x)
    # One chunk of 4 blocks: ceil(log2(k) / 5) radix <= 32 passes, each one matmul.
    assert len(calls) == math.ceil(math.log2(k) / 5)


def test_blocks_of_k_coordinates_need_no_gather_or_scatter(monkeypatch):
    """Power-of-two k and parameters made of whole blocks: every transformed coordinate is
    kept, so the outputs are a signed sum over blocks, without index_select / index_add_."""
    k = 256
    proj = SRHT().build({"a": 8 * k, "b": 3 * k}, k, 0, 0, torch.device("cpu"))
    x = torch.randn(5, 11 * k)
    expected = proj.project(x)

    def forbidden(*args, **kwargs):
        raise AssertionError("a gather or scatter on the blocks-of-k path")

    monkeypatch.setattr(torch, "index_select", forbidden)
    monkeypatch.setattr(torch.Tensor, "index_select", forbidden)
    monkeypatch.setattr(torch.Tensor, "index_add_", forbidden)
    torch.testing.assert_close(proj.project(x), expected, rtol=0, atol=0)


def test_cached_randomness_is_about_eight_bytes_per_parameter():
    """Input signs D (4 bytes per coordinate) and output signs E (4 bytes per output of a
    block of k): about 8 bytes per parameter, independent of k, when b = k."""
    p = 64 * 1024
    for k in (256, 1024):
        proj = SRHT().build({"w": p}, k, 0, 0, torch.device("cpu"))
        (group,) = proj._groups
        assert group.index is None
        cached = proj._signs.numel() * 4 + group.out_signs.numel() * 4
        assert cached == 8 * p
