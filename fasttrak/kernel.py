"""The kernel of one checkpoint, K = Φᵀ R Φ + λ I, and solves with its Cholesky factor.

R is I (``"plain"``, the paper's TRAK) or diag(p_i (1 - p_i)) (``"gauss_newton"``: the
Gauss-Newton Hessian of the loss in the model output; on logistic regression this turns the
estimator into the influence function). A block-diagonal kernel keeps only B diagonal blocks
of K, one per contiguous group of k/B coordinates, and averages the B estimates: a "virtual
ensemble" from one backward pass. Its factors are kept and solved per block, (B, k/B, k/B):
B times less memory and solve work than one (k, k) block-diagonal matrix, B² less to factor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Precision = Literal["float32", "float64"]
Weighting = Literal["plain", "gauss_newton"]
WEIGHTINGS = ("plain", "gauss_newton")

DEFAULT_RIDGE = 0.1
"""Default relative ridge: λ = ridge · trace(Φᵀ Φ) / min(n, k), a fraction of the mean
*nonzero* eigenvalue of the kernel (Φᵀ Φ has at most min(n, k) of them). Scale-free: features
may be rescaled freely. Chosen from the LDS sweep in docs/estimator.md."""


def gram(blocks: Iterable[np.ndarray], k: int, precision: Precision = "float32") -> np.ndarray:
    """Φᵀ Φ from row blocks of Φ (each (rows, k)): block products in ``precision``
    (float32 or float64, never lower), summed in float64. Returns (k, k) float64."""
    dtype = {"float32": torch.float32, "float64": torch.float64}[precision]
    total = torch.zeros((k, k), dtype=torch.float64)
    for block in blocks:
        phi = torch.from_numpy(np.ascontiguousarray(block)).to(dtype)
        total += (phi.T @ phi).double()
    return total.numpy()


def ridge_value(gram_matrix: np.ndarray, ridge: float, num_rows: int) -> float:
    """λ = ridge · trace(G) / min(n, k): the absolute ridge added to the diagonal.

    G = Φᵀ Φ (k, k) built from ``num_rows`` = n rows; trace(G) / min(n, k) is the mean of its
    (at most min(n, k)) nonzero eigenvalues, so the best relative ridge does not drift with k.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    return float(ridge * np.trace(gram_matrix) / min(num_rows, gram_matrix.shape[0]))


def gauss_newton_weights(q: np.ndarray) -> np.ndarray:
    """R = p (1 - p) per example from the out-to-loss weights Q = 1 - p: (n,) float64."""
    q = np.asarray(q, dtype=np.float64)
    if q.size and (q.min() < 0 or q.max() > 1):
        raise ValueError(
            "the Gauss-Newton kernel needs out-to-loss weights Q = 1 - p in [0, 1], but the "
            f"task's Q spans [{q.min():.3g}, {q.max():.3g}]; use kernel='plain' for this task"
        )
    return q * (1.0 - q)


def block_slices(k: int, blocks: int) -> list[slice]:
    """``blocks`` contiguous, nearly equal coordinate ranges covering [0, k)."""
    if not 1 <= blocks <= k:
        raise ValueError(f"kernel_blocks must be in [1, k={k}], got {blocks}")
    edges = np.linspace(0, k, blocks + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def block_diagonal_factor(
    gram_matrix: np.ndarray, ridge: float, num_rows: int, blocks: int = 1
) -> np.ndarray:
    """Lower Cholesky factors of the B diagonal blocks G_bb + λ_b I of the kernel, one per
    :func:`block_slices` range, λ_b = ``ridge_value(G_bb, ridge, n)``; blocks=1 is the full
    kernel. Only the diagonal blocks of ``gram_matrix`` are read.

    Returns (B, m, m) float64, m the largest block size (⌈k / B⌉ or ⌊k / B⌋ + 1): a block of
    s < m coordinates is padded with the identity, so that the padded system solves to zero
    there (see :func:`solve`). k²/B entries instead of the k² of one block-diagonal (k, k)
    matrix, and B factorisations of (k/B)³/3 flops instead of one of k³/3.
    """
    parts = block_slices(gram_matrix.shape[0], blocks)
    size = max(part.stop - part.start for part in parts)
    factor = np.zeros((len(parts), size, size), dtype=np.float64)
    for b, part in enumerate(parts):
        s = part.stop - part.start
        factor[b, :s, :s] = cholesky_factor(gram_matrix[part, part], ridge, num_rows)
        factor[b, range(s, size), range(s, size)] = 1.0
    return factor


def cholesky_factor(gram_matrix: np.ndarray, ridge: float, num_rows: int) -> np.ndarray:
    """Lower Cholesky factor L of G + λ I in float64, λ = ``ridge_value(G, ridge, n)``."""
    if not np.isfinite(gram_matrix).all():
        raise FloatingPointError("the kernel has NaN/inf entries; the stored features are corrupt")
    if np.trace(gram_matrix) <= 0:
        raise FloatingPointError(
            "every training feature is zero (the kernel's trace is 0): the selected parameters "
            "get no gradient; check params= and the model's output"
        )
    lam = ridge_value(gram_matrix, ridge, num_rows)
    matrix = torch.from_numpy(gram_matrix) + lam * torch.eye(
        gram_matrix.shape[0], dtype=torch.float64
    )
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise np.linalg.LinAlgError(
            f"the kernel Φᵀ Φ + λ I is not positive definite with ridge={ridge}; "
            "increase ridge= (the kernel is singular when k exceeds the number of examples)"
        )
    return factor.numpy()


def solve(factor: np.ndarray, rhs: Tensor) -> Tensor:
    """K⁻¹ rhs via Cholesky factors; rhs (k, T) -> (k, T) float64.

    ``factor`` is either one (k, k) lower factor (:func:`cholesky_factor`), or the (B, m, m)
    per-block factors of :func:`block_diagonal_factor`: then each block of rows of ``rhs``
    (the :func:`block_slices` of k into B) is solved with its own block, i.e. K is the
    block-diagonal kernel, in B small solves of 2 (k/B)² T flops instead of one of 2 k² T.
    """
    rhs = rhs.double()
    if factor.ndim == 2:
        return torch.cholesky_solve(rhs, torch.from_numpy(factor))
    blocks, size = factor.shape[0], factor.shape[1]
    k, targets = rhs.shape
    factors = torch.from_numpy(factor)
    if blocks * size == k:  # equal blocks: the rows of rhs are already (B, m, T)
        return torch.cholesky_solve(rhs.reshape(blocks, size, targets), factors).reshape(k, -1)
    parts = block_slices(k, blocks)
    if max(part.stop - part.start for part in parts) != size:
        raise ValueError(f"factors of shape {tuple(factor.shape)} do not fit k = {k} rows")
    padded = rhs.new_zeros((blocks, size, targets))
    for b, part in enumerate(parts):
        padded[b, : part.stop - part.start] = rhs[part]
    solved = torch.cholesky_solve(padded, factors)
    return torch.cat([solved[b, : part.stop - part.start] for b, part in enumerate(parts)])
