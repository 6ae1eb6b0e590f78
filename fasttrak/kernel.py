"""The kernel of one checkpoint, K = Φᵀ R Φ + λ I, and solves with its Cholesky factor.

R is I (``"plain"``, the paper's TRAK) or diag(p_i (1 - p_i)) (``"gauss_newton"``: the
Gauss-Newton Hessian of the loss in the model output; on logistic regression this turns the
estimator into the influence function). A block-diagonal kernel keeps only B diagonal blocks
of K, one per contiguous group of k/B coordinates, and averages the B estimates: a "virtual
ensemble" from one backward pass.
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
    """Block-diagonal lower factor (k, k): one Cholesky factor of G_bb + λ_b I per block,
    λ_b = ``ridge_value(G_bb, ridge, n)``; blocks=1 is the full kernel."""
    factor = np.zeros_like(gram_matrix)
    for part in block_slices(gram_matrix.shape[0], blocks):
        factor[part, part] = cholesky_factor(gram_matrix[part, part], ridge, num_rows)
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
    """(Φᵀ Φ + λ I)⁻¹ rhs via the Cholesky factor; rhs (k, T) -> (k, T) float64."""
    return torch.cholesky_solve(rhs.double(), torch.from_numpy(factor))
