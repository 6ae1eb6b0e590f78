"""Self-influence: the diagonal of the train-vs-train score matrix, streamed by row chunk.

self_i = mean_m(Q_m,i) · mean_m( φ_m,iᵀ K_m⁻¹ φ_m,i ), with K_m⁻¹ the block-diagonal inverse
of :mod:`fasttrak.scoring` (Σ_b φ_bᵀ K_bb⁻¹ φ_b / B), i.e. what ``trak.score(train_rows)``
has on its diagonal, without the n × n matrix: with K_bb = L_b L_bᵀ,
φ_bᵀ K_bb⁻¹ φ_b = ‖L_b⁻¹ φ_b‖², one triangular solve per block and row chunk. High values
flag training examples that the model fits by memorising them (mislabelled, atypical), the
usual first pass of data cleaning. Memory: one row chunk of features at a time, O(rows · k).
On a CUDA ``device`` the factors are kept there and each chunk is copied there and solved
there in float64; only the (n,) result comes back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fasttrak import kernel as kernel_ops
from fasttrak.errors import ConfigError, DataError
from fasttrak.estimator import Estimator
from fasttrak.store import ChunkRecord, ModelStore


def self_influence(
    models: Sequence[tuple[ModelStore, dict[int, ChunkRecord]]],
    factors: Sequence[np.ndarray],
    estimator: Estimator,
    device: kernel_ops.DeviceLike = kernel_ops.CPU,
) -> np.ndarray:
    """The self-influence of every training row: (n,) float32.

    Args:
        models: each model's store and the done marks of its (complete) chunks, as
            :class:`fasttrak.scoring.Scores` takes them.
        factors: each model's per-block Cholesky factors (B, s, s) from
            :func:`fasttrak.estimator.kernel_factor` for ``estimator``.
        estimator: the estimator the factors were built for (resolved here for the store);
            its number of kernel blocks B divides the sum over blocks.
        device: where the triangular solves run: the CPU (default) or a CUDA device
            (float64 there, the factors copied there once).

    Equal to the diagonal of ``np.asarray(trak.score(train_rows))`` (to float32 rounding:
    this is computed in float64) for the same models and estimator; every feature chunk is
    verified against its checksum as it is read.
    """
    device = kernel_ops.check_device(device)
    models = list(models)
    factors = list(factors)
    if not models or len(factors) != len(models):
        raise ConfigError("need one kernel factor per model, and at least one model")
    first = models[0][0]
    k, n = first.store.k, first.num_rows
    estimator = estimator.resolved(first)
    blocks = estimator.blocks
    parts = kernel_ops.block_slices(k, blocks)
    tensors = []
    for (model, _), factor in zip(models, factors, strict=True):
        size = max(part.stop - part.start for part in parts)
        if factor.ndim != 3 or factor.shape != (blocks, size, size):
            raise DataError(
                f"the kernel factor of model {model.model_id} has shape {tuple(factor.shape)}, "
                f"not ({blocks}, {size}, {size}) for k = {k} and {blocks} kernel blocks"
            )
        tensors.append(torch.from_numpy(np.asarray(factor, dtype=np.float64)).to(device))
    q = np.zeros(n, dtype=np.float64)
    for model, records in models:
        q += model.read_all("q", records).astype(np.float64)
    q /= len(models)
    out = np.empty(n, dtype=np.float32)
    for c in range(first.num_chunks):
        rows = first.chunk_slice(c)
        total = torch.zeros(rows.stop - rows.start, dtype=torch.float64, device=device)
        for (model, records), lower in zip(models, tensors, strict=True):
            block = np.asarray(model.read("features", records[c]), np.float32)
            total += _quadratic_form(lower, kernel_ops.to_device(block, device), parts)
        total *= torch.from_numpy(q[rows]).to(device) / (len(models) * blocks)
        out[rows] = total.cpu().numpy()
    return out


def _quadratic_form(factor: torch.Tensor, phi: torch.Tensor, parts: list[slice]) -> torch.Tensor:
    """Σ_b ‖L_b⁻¹ φ_b‖² per row of ``phi`` (rows, k), float64 (rows,).

    Block b of the (B, s, s) factors covers the coordinates ``parts[b]``; a block of fewer
    than s coordinates is padded with the identity, which leaves its leading (s_b, s_b)
    corner the factor of K_bb (as :func:`fasttrak.kernel.solve` pads with zeros there).
    """
    phi = phi.double()
    rows = phi.shape[0]
    blocks, size = factor.shape[0], factor.shape[1]
    if blocks * size == phi.shape[1]:  # equal blocks: one batched solve
        rhs = phi.reshape(rows, blocks, size).permute(1, 2, 0)  # (B, s, rows)
        solved = torch.linalg.solve_triangular(factor, rhs, upper=False)
        return solved.square().sum(dim=(0, 1))
    total = torch.zeros(rows, dtype=torch.float64, device=phi.device)
    for b, part in enumerate(parts):
        s = part.stop - part.start
        solved = torch.linalg.solve_triangular(factor[b, :s, :s], phi[:, part].T, upper=False)
        total += solved.square().sum(dim=0)
    return total
