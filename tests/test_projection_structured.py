"""Sparse JL (SJLT) and block SRHT projections: their exact structure (SJLT buckets and
signs, the SRHT block recipe, fwht), memory chunking, the configs' errors, and end to end
through TRAK (scores close to the exact ones, a NaN gradient coordinate reported).

The tests SJLT and SRHT share with the dense projection at the Projector level (JL bound,
unbiasedness, the explicit matrix, blocks, NaN rows, batching, CUDA) are in
tests/test_projection.py, whose configs and helpers this file uses; the protocol-level
contract (purity in (seed, model, name, coordinate), seed and model_id, featurize batching,
...) is in tests/test_projector_contract.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_data, make_mlp
from test_projection import SHAPES, P, build, vectors
from torch import nn

import fasttrak as ft
from fasttrak.projection import SJLT, SRHT, fwht, projection_seed, resolve_projector
from fasttrak.projection.dense import TILE_ROWS
from fasttrak.projection.srht import (
    CPU_CHUNK_ELEMS,
    CPU_RADIX,
    DEVICE_CHUNK_ELEMS,
    DEVICE_RADIX,
    effective_block_size,
    hadamard,
)

# ------------------------------------------------------------------------ exact structure


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_sjlt_matrix_has_s_distinct_nonzeros_per_coordinate(s):
    k = 50  # not a multiple of s: ranges of unequal size
    matrix = SJLT(s=s).build(SHAPES, k, 0, 0, torch.device("cpu")).matrix()
    nonzero = matrix != 0
    assert (nonzero.sum(1) == s).all()  # s distinct buckets per coordinate
    torch.testing.assert_close(matrix[nonzero].abs(), torch.full((P * s,), 1 / math.sqrt(s)))
    for i in range(s):  # bucket i of every coordinate lies in output range i
        lo, hi = i * k // s, (i + 1) * k // s
        assert (nonzero[:, lo:hi].sum(1) == 1).all()
    # Signs and buckets are balanced (binomial: 4 standard deviations).
    signs = matrix[nonzero].sign()
    assert abs(signs.mean().item()) < 4 / math.sqrt(P * s)
    per_bucket = nonzero.sum(0).float()
    expected = P * s / k
    assert (per_bucket - expected).abs().max() < 5 * math.sqrt(expected) + s


def _tile_signs(seed, model_id, key, count):
    """The first ``count`` ±1 signs of the tiled stream of ``key``."""
    tiles = [
        torch.randint(
            0,
            2,
            (TILE_ROWS,),
            generator=torch.Generator().manual_seed(projection_seed(seed, model_id, key, tile)),
            dtype=torch.int8,
        )
        for tile in range(math.ceil(count / TILE_ROWS))
    ]
    return 1.0 - 2.0 * torch.cat(tiles)[:count].float()


def test_srht_block_size_follows_k():
    assert effective_block_size(2**16, 512) == 512
    assert effective_block_size(2**16, 1000) == 1024
    assert effective_block_size(2**16, 2**17) == 2**16
    assert effective_block_size(256, 1024) == 256
    assert effective_block_size(2**16, 1) == 1


@pytest.mark.parametrize("k", [64, 48])
def test_srht_blocks_follow_the_documented_recipe(k):
    """Block j of ``w`` (b = 64 coordinates, the smallest power of two >= k) is
    (1/sqrt(k)) diag(D) H_b[:, R] diag(E): D from the tile seeds of ``w``, E the entries
    j·k .. j·k + k - 1 of the sign stream of ``w/srht-out``, R all of the b coordinates when
    k = b, else a sorted sample without replacement from the block's seed; the rest of a
    parameter is cut into power-of-two blocks; a block smaller than k is embedded
    isometrically into distinct outputs."""
    shapes, b, seed = {"w": 2500, "bias": 5}, 64, 7
    proj = SRHT(block_size=1024).build(shapes, k, seed, 2, torch.device("cpu"))
    assert proj.block == b
    matrix = proj.matrix()
    d = _tile_signs(seed, 2, "w", 2500)
    e = _tile_signs(seed, 2, "w/srht-out", 39 * k).view(39, k)
    for j in (0, 1, 38):  # 2500 = 39 full blocks of 64 + 4 coordinates
        rows = torch.arange(b)
        if k < b:
            gen = torch.Generator().manual_seed(projection_seed(seed, 2, "w/srht", j))
            rows = torch.randperm(b, generator=gen)[:k].sort().values
        block = slice(j * b, (j + 1) * b)
        expected = d[block, None] * hadamard(b)[:, rows] * e[j] / math.sqrt(k)
        torch.testing.assert_close(matrix[block], expected, rtol=0, atol=0)
    # A full block: MᵀM = (b/k) I (orthogonal Hadamard columns); k = b: an isometry.
    block = matrix[b : 2 * b]
    torch.testing.assert_close(block.T @ block, torch.eye(k) * b / k, rtol=1e-5, atol=1e-4)
    # The rest of w, 4 rows (padded to 4 < k), is embedded isometrically into 4 outputs.
    last = matrix[2496:2500]
    assert ((last != 0).sum(1) == 4).all() and ((last != 0).any(0).sum() == 4)
    torch.testing.assert_close(last @ last.T, torch.eye(4), rtol=0, atol=1e-6)
    # bias (5 rows, padded to 8 < k): 8 nonzeros ±1/sqrt(8) per row, in the same 8 outputs,
    # and orthonormal rows: the block is embedded isometrically.
    bias = matrix[2500:]
    assert ((bias != 0).sum(1) == 8).all() and ((bias != 0).any(0).sum() == 8)
    torch.testing.assert_close(bias[bias != 0].abs(), torch.full((40,), 1 / math.sqrt(8)))
    torch.testing.assert_close(bias @ bias.T, torch.eye(5), rtol=0, atol=1e-6)


def test_srht_blocks_smaller_than_k_are_embedded():
    """block_size caps b: with b = 16 < k = 64 every block of w has 16 nonzeros ±1/4 per row
    and is an isometry into 16 distinct outputs."""
    proj = SRHT(block_size=16).build({"w": 160}, 64, 3, 0, torch.device("cpu"))
    assert proj.block == 16
    matrix = proj.matrix()
    for j in range(10):
        block = matrix[j * 16 : (j + 1) * 16]
        assert ((block != 0).sum(1) == 16).all() and ((block != 0).any(0).sum() == 16)
        torch.testing.assert_close(block[block != 0].abs(), torch.full((16 * 16,), 1 / 4))
        torch.testing.assert_close(block @ block.T, torch.eye(16), rtol=0, atol=1e-6)


@pytest.mark.parametrize("radix", [2, 4, 16, 64])
@pytest.mark.parametrize("b", [1, 2, 8, 32, 2**11, 2**15])
def test_fwht_equals_hadamard_matrix_product(b, radix):
    x = torch.randn(3, b, generator=torch.Generator().manual_seed(b))
    before = x.clone()
    out = fwht(x, radix)
    if b <= 2**11:
        expected = x @ hadamard(b)
    else:  # Sylvester: H_b = H_r ⊗ H_(b/r), applied to x viewed as (3, r, b/r)
        r = b // 2**11
        xs = x.view(3, r, 2**11)
        expected = torch.einsum("ij,njk,kl->nil", hadamard(r), xs, hadamard(2**11)).reshape(3, b)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * math.sqrt(b))
    assert torch.equal(x, before)  # the input is not modified


def test_fwht_rejects_bad_lengths():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(2, 12))
    with pytest.raises(ValueError, match="radix"):
        fwht(torch.zeros(2, 8), radix=3)


def test_srht_memory_chunks_and_radix_do_not_change_the_features():
    x = vectors(6)
    whole = build("srht-256", 40, seed=1)
    expected = whole.project(x)
    for chunk_elems in (6 * 256, 256, 7):  # one block of 6 rows; of 1 row; below one block
        chunked = SRHT(block_size=256).build(SHAPES, 40, 1, 0, torch.device("cpu"))
        chunked.chunk_elems = chunk_elems
        tol = 1e-6 * expected.abs().max().item()  # float32 rounding of another summation order
        torch.testing.assert_close(chunked.project(x), expected, rtol=0, atol=tol)
    # Radix-2 butterflies, and the GPU's defaults (radix 64, one large chunk), give the
    # same features.
    for radix, chunk_elems in ((2, CPU_CHUNK_ELEMS), (DEVICE_RADIX, DEVICE_CHUNK_ELEMS)):
        other = SRHT(block_size=256).build(SHAPES, 40, 1, 0, torch.device("cpu"))
        other.radix, other.chunk_elems = radix, chunk_elems
        tol = 1e-6 * expected.abs().max().item()  # float32 rounding of another summation order
        torch.testing.assert_close(other.project(x), expected, rtol=0, atol=tol)


def test_srht_defaults_depend_on_the_device():
    cpu = SRHT().build(SHAPES, 40, 1, 0, torch.device("cpu"))
    assert (cpu.radix, cpu.chunk_elems) == (CPU_RADIX, CPU_CHUNK_ELEMS)
    meta = SRHT().build(SHAPES, 40, 1, 0, torch.device("meta"))  # any non-CPU device
    assert (meta.radix, meta.chunk_elems) == (DEVICE_RADIX, DEVICE_CHUNK_ELEMS)
    # fewer, larger chunks off the CPU: a ResNet-18-sized batch is a few dozen chunks
    assert DEVICE_CHUNK_ELEMS // (128 * 2048) >= 128


def test_sjlt_column_slices_do_not_change_the_features(monkeypatch):
    import fasttrak.projection.sjlt as sjlt

    x = vectors(5)
    proj = build("sjlt-4", 40, seed=3)
    expected = proj.project(x)
    monkeypatch.setattr(sjlt, "_COLUMNS", 7)
    torch.testing.assert_close(proj.project(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(proj.project(list(x.split([2500, 500], 1))), expected)


# ------------------------------------------------------------------------ errors, registry
def test_configs_registry_and_errors_name_the_fix():
    assert resolve_projector("sjlt") == SJLT() and resolve_projector("srht") == SRHT()
    assert SJLT(s=2).spec(64) == {
        "kind": "sjlt",
        "s": 2,
        "k": 64,
        "tile_rows": TILE_ROWS,
        "version": 1,
    }
    assert SRHT().spec(64)["block_size"] == 2**16 and SRHT().output_dim(64, 10**6) == 64
    cpu = torch.device("cpu")
    assert SJLT().build(SHAPES, 8, 0, 0, cpu).group_rows == 1
    assert SRHT().build(SHAPES, 8, 0, 0, cpu).group_rows == 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="int >= 1"):
            SJLT(s=bad)
    with pytest.raises(ValueError, match="lower s or raise proj_dim"):
        SJLT(s=8).build(SHAPES, 4, 0, 0, cpu)
    for bad in (0, 1000, 2.0):
        with pytest.raises(ValueError, match="power of two"):
            SRHT(block_size=bad)
    for config in (SJLT(), SRHT()):
        with pytest.raises(ValueError, match="proj_dim must be >= 1"):
            config.build(SHAPES, 0, 0, 0, cpu)
        proj = config.build(SHAPES, 8, 0, 0, cpu)
        with pytest.raises(ValueError, match=r"shape \(B, 3000\).*same parameters"):
            proj.project(torch.zeros(2, 2999))
        with pytest.raises(ValueError, match="same B"):
            proj.project([torch.zeros(2, 2500), torch.zeros(3, 500)])


# ------------------------------------------------------------------------ end to end
def _scores(projector, proj_dim, x, y, xt, yt, models):
    trak = ft.TRAK(make_mlp(), projector=projector, proj_dim=proj_dim, progress=False)
    trak.featurize((x, y), checkpoints=[m.state_dict() for m in models])
    return np.asarray(trak.score((xt, yt)))


@pytest.mark.parametrize("projector", ["sjlt", "srht", SJLT(s=4), SRHT(block_size=8)])
def test_trak_scores_match_the_unprojected_scores(projector):
    """p = 39 and k = 256: the projected scores are close to the exact (identity) ones."""
    x, y = make_data(60, seed=1)
    xt, yt = make_data(8, seed=2)
    models = [make_mlp(seed=s) for s in range(2)]
    exact = _scores("identity", 1, x, y, xt, yt, models)
    projected = _scores(projector, 256, x, y, xt, yt, models)
    assert projected.shape == exact.shape == (8, 60)
    pearson = np.corrcoef(projected.ravel(), exact.ravel())[0, 1]
    ranks = [np.argsort(np.argsort(s.ravel())) for s in (projected, exact)]
    spearman = np.corrcoef(*ranks)[0, 1]
    assert pearson > 0.9 and spearman > 0.9, (pearson, spearman)


class _NaNGradient(nn.Module):
    """An MLP whose scalar parameter ``a`` gets a NaN gradient (0 · 0/0) for inputs with
    x[:, 0] == 0, while the output, the loss and every other gradient stay finite."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_mlp()
        self.a = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.mlp(x) + 0.0 * torch.sqrt(self.a * x[:, :1] ** 2)


@pytest.mark.parametrize("projector", ["sjlt", "srht"])
def test_featurize_reports_a_nan_in_a_single_gradient_coordinate(projector):
    x, y = make_data(20, seed=3)
    x[13, 0] = 0.0
    torch.manual_seed(0)
    # vmap: the NaN sits in a parameter the root module uses, whose per-example gradients the
    # hook engine gets from a batched backward that spreads 0 · NaN to every row
    # (tests/test_hook_engine.py checks the hook engine with a NaN inside a layer).
    trak = ft.TRAK(_NaNGradient(), projector=projector, proj_dim=64, engine="vmap", progress=False)
    with pytest.raises(ft.NonFiniteGradientError, match=r"rows \[13\]"):
        trak.featurize((x, y))
