"""The block-diagonal kernel kept and solved per block: the same numbers as one (k, k)
block-diagonal factor, B times less stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_data, make_mlp

import fasttrak as ft
from fasttrak import kernel
from fasttrak.store import complete_records


def old_full_factor(gram, ridge, n, blocks):
    """The layout before per-block factors: one (k, k) lower factor, zeros off the blocks."""
    factor = np.zeros_like(gram)
    for part in kernel.block_slices(gram.shape[0], blocks):
        factor[part, part] = kernel.cholesky_factor(gram[part, part], ridge, n)
    return factor


def problem(n, k, targets, seed=0):
    gen = np.random.default_rng(seed)
    # Correlated, unevenly scaled columns: blocks with different ridges λ_b.
    phi = gen.standard_normal((n, k)) @ (np.eye(k) + 0.3 * gen.standard_normal((k, k)))
    phi *= gen.uniform(0.2, 3.0, size=k)
    return phi, gen.standard_normal((k, targets))


@pytest.mark.parametrize(
    "n, k, blocks", [(50, 12, 1), (50, 12, 4), (50, 37, 4), (20, 37, 3), (80, 30, 7), (9, 5, 5)]
)
def test_per_block_solve_equals_the_full_block_diagonal_solve(n, k, blocks):
    """Σ_b Φ_b K_bb⁻¹ φ_b / B, in float64, for k divisible by B or not, n < k or n > k."""
    phi, rhs = problem(n, k, 6)
    gram = phi.T @ phi
    factor = kernel.block_diagonal_factor(gram, 0.1, n, blocks)
    size = max(p.stop - p.start for p in kernel.block_slices(k, blocks))
    assert factor.shape == (blocks, size, size) and factor.dtype == np.float64
    solved = kernel.solve(factor, torch.from_numpy(rhs))
    old = kernel.solve(old_full_factor(gram, 0.1, n, blocks), torch.from_numpy(rhs))
    assert solved.shape == (k, 6) and solved.dtype == torch.float64
    torch.testing.assert_close(solved, old, rtol=1e-10, atol=1e-12 * old.abs().max().item())
    # The closed form: each block solved with its own ridge λ_b = 0.1 trace(G_bb) / min(n, s_b).
    expected = np.zeros_like(rhs)
    for part in kernel.block_slices(k, blocks):
        g = gram[part, part]
        s = g.shape[0]
        lam = 0.1 * np.trace(g) / min(n, s)
        expected[part] = np.linalg.solve(g + lam * np.eye(s), rhs[part])
    np.testing.assert_allclose(solved.numpy(), expected, rtol=1e-8, atol=1e-10)
    # The scores of a block-diagonal kernel: mean over blocks of Φ_b K_bb⁻¹ φ_b.
    scores = phi @ solved.numpy() / blocks
    np.testing.assert_allclose(scores, phi @ old.numpy() / blocks, rtol=1e-9, atol=1e-9)


def test_blocks_of_one_is_the_full_kernel_and_padding_is_the_identity():
    phi, rhs = problem(40, 10, 3, seed=1)
    gram = phi.T @ phi
    one = kernel.block_diagonal_factor(gram, 0.1, 40, 1)
    np.testing.assert_array_equal(one[0], kernel.cholesky_factor(gram, 0.1, 40))
    torch.testing.assert_close(
        kernel.solve(one, torch.from_numpy(rhs)),
        kernel.solve(one[0], torch.from_numpy(rhs)),
    )
    three = kernel.block_diagonal_factor(gram, 0.1, 40, 3)  # blocks of 3, 4, 3
    assert three.shape == (3, 4, 4)
    assert three[0, 3, 3] == 1.0 and not three[0, 3, :3].any() and not three[0, :3, 3].any()
    with pytest.raises(ValueError, match="do not fit"):
        kernel.solve(three, torch.zeros(14, 2, dtype=torch.float64))


def test_stored_factor_is_per_block(tmp_path):
    x, y = make_data(40)
    trak = ft.TRAK(make_mlp(), proj_dim=30, store=tmp_path, kernel_blocks=4, progress=False)
    trak.featurize((x, y))
    trak.finalize()
    ck = trak.store.model(0)
    factor = ck.read_kernel(
        "factor", trak.estimator.for_models(1).resolved(ck).factor_settings(), complete_records(ck)
    )
    assert factor.shape == (4, 8, 8)  # 30 = 8 + 7 + 7 + 8 coordinates: 256 entries, not 900


def test_changing_the_number_of_blocks_reuses_the_gram(tmp_path, monkeypatch):
    x, y = make_data(40)
    model = make_mlp()
    first = ft.TRAK(model, proj_dim=16, store=tmp_path, kernel_blocks=2, progress=False)
    first.featurize((x, y), checkpoints=[model.state_dict()])
    two = np.asarray(first.score((x[:3], y[:3])))

    def no_gram(*args, **kwargs):
        raise AssertionError("the stored gram should be reused")

    monkeypatch.setattr(kernel, "gram", no_gram)
    four = ft.TRAK(model, proj_dim=16, store=tmp_path, kernel_blocks=4, progress=False)
    scores4 = np.asarray(four.score((x[:3], y[:3]), checkpoints=[model.state_dict()]))
    assert not np.allclose(scores4, two)
    back = ft.TRAK(model, proj_dim=16, store=tmp_path, kernel_blocks=2, progress=False)
    np.testing.assert_allclose(
        np.asarray(back.score((x[:3], y[:3]), checkpoints=[model.state_dict()])), two
    )
