"""The check that the hook engines' single backward of Σ_i f_i is exact: examples independent."""

from __future__ import annotations

from typing import Any

import torch

from fasttrak.errors import ConfigError
from fasttrak.gradients.recording import split_batch
from fasttrak.tasks.base import Forward, Task


def check_examples_independent(task: Task, forward: Forward, batch: Any) -> None:
    """Raise ValueError when example outputs depend on other examples of the batch.

    Compares f on the whole batch with f on its two halves (same tensors, same padding);
    the engines that backpropagate Σ_i f_i once (hooks, factored) are exact only when
    ∂f_i/∂(example j) = 0 for i ≠ j. Costs two forward passes, on one batch per run.
    """
    size = task.batch_size(batch)
    if size < 2:
        return
    half = size // 2
    with torch.no_grad():
        whole = task.output(forward, batch).float()
        parts = torch.cat(
            [
                task.output(forward, split_batch(batch, size, slice(0, half))).float(),
                task.output(forward, split_batch(batch, size, slice(half, size))).float(),
            ]
        )
    # Non-finite outputs are reported later, with the rows named; compare the finite ones.
    finite = torch.isfinite(whole)
    same_pattern = bool((finite == torch.isfinite(parts)).all())
    scale = whole[finite].abs().max().clamp_min(1.0) if finite.any() else torch.tensor(1.0)
    gap = (whole[finite] - parts[finite]).abs().max() if finite.any() else torch.tensor(0.0)
    if not same_pattern or gap > 1e-3 * scale:
        raise ConfigError(
            f"examples interact in the model's forward pass: the outputs of a batch differ "
            f"from those of its halves by {float(gap):.3g} (e.g. BatchNorm in train mode, "
            "batch-level normalisation, or a batch-mixing layer). The hook engine and the "
            "factored projector need each example's output to depend on that example only: "
            "remove the interaction, or use engine='vmap' to differentiate each example alone"
        )
