"""Classification: f = margin = logit_y - logsumexp(other logits) = log(p_y / (1 - p_y))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fasttrak.errors import ConfigError, DataError, DataTypeError
from fasttrak.tasks.base import Forward
from fasttrak.tasks.common import check_label_range


def margin_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Margin log(p_y / (1 - p_y)) per example, computed in float32 without any -inf.

    logits: (B, C) in any float dtype; labels: (B,) int64 in [0, C). Returns (B,) float32.
    """
    logits = logits.float()
    index = labels[:, None]
    correct = torch.gather(logits, 1, index)[:, 0]
    # The finite float32 minimum instead of -inf: exp() of it underflows to exactly 0.
    others = logits.scatter(1, index, torch.finfo(torch.float32).min)
    return correct - torch.logsumexp(others, dim=1)


@dataclass(frozen=True)
class ImageClassification:
    """Any model mapping inputs to logits ``(B, C)``: images, flat vectors, tabular rows.

    A batch is ``(inputs, labels)`` with integer labels of shape ``(B,)``. The output is
    the margin f = logit_y - logsumexp(others) and Q = 1 - p_y = sigmoid(-f).
    Works for fp16/bf16 models: logits are upcast to float32 before any arithmetic.
    """

    name: str = "image_classification"

    def check_batch(self, batch: Any) -> None:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise DataTypeError(
                f"{self.name}: a batch must be a pair (inputs, labels), got {type(batch).__name__}"
                f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}; "
                "make your dataset return (input, label) items"
            )
        inputs, labels = batch
        if not isinstance(labels, Tensor):
            raise DataTypeError(
                f"{self.name}: labels must be a torch.Tensor, got {type(labels).__name__}; "
                "return labels as Python ints or tensors from your dataset"
            )
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise DataTypeError(
                f"{self.name}: labels have dtype {labels.dtype}, expected an integer class index; "
                "convert them with labels.long() (one-hot or soft labels are not supported)"
            )
        if labels.ndim != 1:
            raise DataError(
                f"{self.name}: labels must have shape (B,), got {tuple(labels.shape)}; "
                "pass class indices, not one-hot vectors (use labels.argmax(-1))"
            )
        if isinstance(inputs, Tensor) and inputs.shape[0] != labels.shape[0]:
            raise DataError(
                f"{self.name}: {inputs.shape[0]} inputs but {labels.shape[0]} labels in a batch"
            )

    def batch_size(self, batch: Any) -> int:
        return int(batch[1].shape[0])

    def _logits(self, forward: Forward, inputs: Any, labels: Tensor) -> Tensor:
        logits = forward(inputs)
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ConfigError(
                f"{self.name}: the model must return logits of shape (B, C), got {shape}; "
                "wrap the model so that forward(inputs) returns the logits"
            )
        if logits.shape[1] < 2:
            raise ConfigError(
                f"{self.name}: need at least 2 classes, model gives {logits.shape[1]}"
            )
        return logits

    def output(self, forward: Forward, batch: Any) -> Tensor:
        inputs, labels = batch
        return margin_from_logits(self._logits(forward, inputs, labels), labels.long())

    def out_to_loss(self, forward: Forward, batch: Any) -> Tensor:
        """Q = 1 - p_y = sigmoid(-margin). Called on whole batches, outside torch.func
        transforms, so it also checks that every label is a valid class index."""
        inputs, labels = batch
        logits = self._logits(forward, inputs, labels)
        check_label_range(self.name, labels, logits.shape[1])
        return torch.sigmoid(-margin_from_logits(logits, labels.long()))

    def out_to_loss_from_output(self, f: Tensor, batch: Any) -> Tensor:
        """Q = sigmoid(-f) from the margins f (B,) :meth:`output` returned: the same bits as
        :meth:`out_to_loss`, without a second pass over the logits."""
        return torch.sigmoid(-f.detach())

    def spec(self) -> dict[str, Any]:
        return {"name": self.name}
