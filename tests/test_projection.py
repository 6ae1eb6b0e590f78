"""Dense projection: JL properties, purity in (seed, model, name, coordinate), determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_data, make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st

import fasttrak as ft
from fasttrak.projection import Dense, DenseProjector, resolve_projector
from fasttrak.projection.dense import TILE_ROWS

P = 3000
SHAPES = {"a.weight": 2500, "a.bias": 500}


def vectors(count: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Heavy-tailed, correlated rows: harder than isotropic Gaussians.
    base = torch.randn(count, P, generator=gen) * torch.rand(P, generator=gen) ** 3
    return base + 0.5 * base[:1]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("k", [256, 1024])
def test_norms_and_inner_products_within_jl_bound(kind, k):
    x = vectors(40)
    proj = DenseProjector(SHAPES, k=k, seed=3, kind=kind)
    px = proj.project(x).double()
    x = x.double()
    pairs = 40 * 41 / 2
    # JL: with probability >= 1 - 1/pairs every pairwise distortion is <= eps,
    # eps = sqrt(8 ln(pairs²) / k).
    eps = math.sqrt(8 * math.log(pairs**2) / k)
    norms = (px**2).sum(1) / (x**2).sum(1)
    assert (norms - 1).abs().max() < eps
    inner = px @ px.T - x @ x.T
    scale = x.norm(dim=1)[:, None] * x.norm(dim=1)[None, :]
    assert (inner / scale).abs().max() < eps
    # Unbiased: over 20 independent projections the mean squared-norm ratio of one vector is
    # within 4 standard errors (variance of one ratio ≤ 2/k) of 1.
    ratios = [
        (DenseProjector(SHAPES, k=k, seed=100 + s, kind=kind).project(x[:1].float()).double() ** 2)
        .sum()
        .item()
        / (x[0] ** 2).sum().item()
        for s in range(20)
    ]
    assert abs(sum(ratios) / 20 - 1) < 4 * math.sqrt(2 / k / 20)


def test_matrix_entries_and_scale():
    proj = DenseProjector(SHAPES, k=64, seed=0)
    matrix = proj.matrix()
    assert matrix.shape == (P, 64)
    assert torch.allclose(matrix.abs(), torch.full_like(matrix, 1 / 8))
    assert abs(matrix.sign().mean().item()) < 0.01


def test_projection_equals_explicit_matrix_product():
    x = vectors(5)
    proj = DenseProjector(SHAPES, k=32, seed=1)
    torch.testing.assert_close(proj.project(x), x @ proj.matrix())


def test_streamed_projection_equals_cached():
    x = vectors(6)
    cached = DenseProjector(SHAPES, k=48, seed=2)
    streamed = DenseProjector(SHAPES, k=48, seed=2, cache_bytes=TILE_ROWS * 48 * 4)
    assert cached.cached and not streamed.cached and streamed.group_rows >= 1
    torch.testing.assert_close(streamed.project(x), cached.project(x), rtol=1e-5, atol=1e-5)


def test_a_parameter_block_depends_only_on_its_name_not_on_its_neighbours():
    """P is a pure function of (seed, model, name, coordinate)."""
    alone = DenseProjector({"a.bias": 500}, k=16, seed=4).matrix()
    within = DenseProjector(SHAPES, k=16, seed=4).matrix()[2500:]
    torch.testing.assert_close(alone, within, rtol=0, atol=0)
    other_model = DenseProjector({"a.bias": 500}, k=16, seed=4, model_id=1).matrix()
    other_seed = DenseProjector({"a.bias": 500}, k=16, seed=5).matrix()
    assert not torch.equal(alone, other_model) and not torch.equal(alone, other_seed)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_features_do_not_depend_on_how_rows_are_batched(batch, seed):
    x = vectors(9, seed=seed % 100)
    proj = DenseProjector(SHAPES, k=24, seed=seed)
    whole = proj.project(x)
    parts = torch.cat([proj.project(x[i : i + batch]) for i in range(0, 9, batch)])
    # Equal up to float32 summation order inside the matmul.
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5 * whole.abs().max().item())


def test_featurize_is_deterministic_across_batch_sizes_and_runs():
    x, y = make_data(37, seed=7)
    model = make_mlp()

    def features(batch_size):
        trak = ft.TRAK(model, proj_dim=32, batch_size=batch_size, chunk_rows=10, progress=False)
        trak.featurize((x, y))
        return trak.store.checkpoint(0).features()

    first = features(8)
    np.testing.assert_array_equal(first, features(8))  # two runs: bit-identical
    np.testing.assert_allclose(first, features(3), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first, features(37), rtol=1e-5, atol=1e-6)


def test_resolve_projector_errors_name_the_fix():
    assert isinstance(resolve_projector("dense"), Dense)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_projector("fast")
    with pytest.raises(TypeError, match="pass an instance"):
        resolve_projector(Dense)
    with pytest.raises(ValueError, match="distribution"):
        Dense(distribution="uniform")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_equal_cpu_features():
    x = vectors(8)
    cpu = DenseProjector(SHAPES, k=128, seed=9, device="cpu")
    gpu = DenseProjector(SHAPES, k=128, seed=9, device="cuda")
    torch.testing.assert_close(gpu.matrix().cpu(), cpu.matrix(), rtol=0, atol=0)
    torch.testing.assert_close(gpu.project(x.cuda()).cpu(), cpu.project(x), rtol=1e-4, atol=1e-4)
    xs, ys = make_data(20, seed=1)
    model = make_mlp()
    feats = {}
    for device in ("cpu", "cuda"):
        trak = ft.TRAK(model, proj_dim=32, device=device, progress=False)
        trak.featurize((xs, ys))
        feats[device] = trak.store.checkpoint(0).features()
    np.testing.assert_allclose(feats["cuda"], feats["cpu"], rtol=1e-4, atol=1e-5)


def test_streamed_projection_of_parameter_blocks_equals_the_matrix_product():
    from fasttrak.projection.dense import DenseProjector

    numels = {"a": 3000, "b": 700, "c": 2500}
    cached = DenseProjector(numels, k=16, seed=4, model_id=1, kind="rademacher")
    streamed = DenseProjector(
        numels, k=16, seed=4, model_id=1, kind="rademacher", cache_bytes=4 * 16 * 1500
    )
    assert cached.cached and not streamed.cached
    grads = torch.randn(5, 6200, generator=torch.Generator().manual_seed(0))
    blocks = list(grads.split([3000, 700, 2500], dim=1))
    want = grads @ cached.matrix()
    for projector in (cached, streamed):
        torch.testing.assert_close(projector.project(blocks), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(projector.project(grads), want, rtol=1e-5, atol=1e-4)
