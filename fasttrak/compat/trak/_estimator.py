"""traker's estimator on a fasttrak store: an absolute ridge λ on the plain kernel.

traker scores with φ(target)ᵀ (ΦᵀΦ + λ I)⁻¹ Φᵀ per model, λ = ``lambda_reg`` in the units of
its features (projected gradients divided by √p). fasttrak's :class:`~fasttrak.Estimator`
takes a *relative* ridge, λ = ridge · trace(ΦᵀΦ) / min(n, k, p), so an absolute λ becomes,
per model, ridge = λ · min(n, k, p) / trace(ΦᵀΦ): the gram is built (and cached in the store) first,
its trace read, then the factor built (and cached) by fasttrak's own
:func:`~fasttrak.estimator.kernel_factor`. With λ = 0 and a singular kernel (fewer training
rows than features), the solve takes the pseudo-inverse, the λ → 0 limit of the ridge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fasttrak.errors import NumericalError
from fasttrak.estimator import (
    Estimator,
    FactorCache,
    gram_groups,
    kernel_factor,
    local_partial_grams,
    solve_targets,
)
from fasttrak.kernel import NotPositiveDefiniteError, Precision, rank_bound
from fasttrak.store import ChunkRecord, ModelStore

logger = logging.getLogger("fasttrak.compat.trak")


@dataclass(frozen=True)
class Solver:
    """(ΦᵀΦ + λ I)⁻¹ of one model: a Cholesky factor, or an eigenbasis (pseudo-inverse)."""

    factor: np.ndarray | None
    basis: np.ndarray | None = None
    inverse_values: np.ndarray | None = None

    def solve(self, phi: Tensor) -> Tensor:
        """(ΦᵀΦ + λ I)⁻¹ φᵀ for target features phi (T, k): (k, T) float64."""
        if self.factor is not None:
            return solve_targets(self.factor, phi)
        assert self.basis is not None and self.inverse_values is not None
        basis = torch.from_numpy(self.basis)
        rhs = phi.cpu().double().T
        return basis @ (torch.from_numpy(self.inverse_values)[:, None] * (basis.T @ rhs))


def plain_gram(
    model: ModelStore, records: dict[int, ChunkRecord], precision: Precision
) -> np.ndarray:
    """ΦᵀΦ (k, k) float64 of one complete model, from the store's cache or built (and
    cached) exactly as fasttrak's ``kernel_factor`` builds it."""
    estimator = Estimator("plain", 0.0, 1, precision)
    settings = estimator.gram_settings()
    gram = model.read_kernel("gram", settings, records)
    if gram is not None:
        return gram
    k = model.store.k
    gram = np.zeros((k, k))
    for partial in local_partial_grams(model, records, estimator, gram_groups(model.num_chunks)):
        gram += partial
    if model.store.writable:
        rows = max(1, min(k, 2**21 // k))
        model.write_kernel("gram", settings, records, gram, (rows, k))
    return gram


def solver(
    model: ModelStore,
    records: dict[int, ChunkRecord],
    lam: float,
    precision: Precision,
    memory: FactorCache,
) -> Solver:
    """(ΦᵀΦ + lam I)⁻¹ of one complete model (lam absolute, in the store's feature units)."""
    n, k = model.num_rows, model.store.k
    if lam == 0 and n < k:  # singular: the pseudo-inverse from the n x n kernel Φ Φᵀ
        phi = model.read_all("features", records).astype(np.float64)
        values, left = np.linalg.eigh(phi @ phi.T)
        _check_trace(model, float(values.sum()))
        keep = _nonzero(np.sqrt(np.clip(values, 0, None)), n, k)  # singular values of Φ
        _warn_singular(model, int(keep.sum()), n, k)
        # Φ = U S Vᵀ: (ΦᵀΦ)⁺ = V S⁻² Vᵀ with V = Φᵀ U S⁻¹
        basis = phi.T @ left[:, keep] / np.sqrt(values[keep])
        return Solver(None, np.ascontiguousarray(basis), 1.0 / values[keep])
    gram = plain_gram(model, records, precision)
    trace = float(np.trace(gram))
    _check_trace(model, trace)
    rank = rank_bound(k, n, model.store.num_params)
    ridge = lam * rank / trace  # fasttrak's relative ridge (λ = ridge · trace / rank) for λ
    try:
        estimator = Estimator("plain", ridge, 1, precision)
        return Solver(kernel_factor(model, records, estimator, memory))
    except NotPositiveDefiniteError:
        if lam > 0:
            raise
    values, basis = np.linalg.eigh(gram)
    keep = _nonzero(values, n, k)
    _warn_singular(model, int(keep.sum()), n, k)
    return Solver(None, np.ascontiguousarray(basis[:, keep]), 1.0 / values[keep])


def _check_trace(model: ModelStore, trace: float) -> None:
    if not trace > 0:
        raise NumericalError(
            f"model {model.model_id}: every training feature is zero (the kernel's trace is "
            "0): the differentiated parameters get no gradient; check grad_wrt and the task"
        )


def _nonzero(values: np.ndarray, n: int, k: int) -> np.ndarray:
    """Values above rounding: numpy's matrix_rank rule at float32, the precision of the
    features (for the singular values of Φ) and of the products of the k x k gram (for its
    eigenvalues, whose rounding is that of the float32 products)."""
    return values > values.max() * max(n, k) * np.finfo(np.float32).eps


def _warn_singular(model: ModelStore, rank: int, n: int, k: int) -> None:
    logger.warning(
        "model %d: the kernel ΦᵀΦ is singular (rank %d < k = %d, from n = %d training rows) "
        "and lambda_reg = 0: using its pseudo-inverse (the λ → 0 limit); pass lambda_reg > 0 "
        "for a ridge",
        model.model_id,
        rank,
        k,
        n,
    )
