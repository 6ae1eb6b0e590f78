"""Text classification on Hugging Face-style models: f = margin of the sequence logits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fasttrak.errors import ConfigError, DataError
from fasttrak.tasks.base import Forward
from fasttrak.tasks.classification import margin_from_logits
from fasttrak.tasks.common import (
    check_label_range,
    check_leading_sizes,
    model_inputs,
    model_logits,
    require_integer,
    require_key,
    require_mapping,
)


@dataclass(frozen=True)
class TextClassification:
    """Sequence classifiers: any ``AutoModelForSequenceClassification``-style model.

    A batch is the dict a tokenizer produces (``input_ids`` (B, T), ``attention_mask``,
    ``token_type_ids``, ...) plus integer class labels ``(B,)`` under ``label_key``. The
    model is called as ``model(**inputs)`` with every key except the label (so it computes
    no loss of its own) and may return a ``ModelOutput`` with ``.logits`` ``(B, C)``, a
    tuple starting with the logits, or the logits tensor itself.

    f = logit_y - logsumexp(other logits) = log(p_y / (1 - p_y)) (the margin), float32;
    Q = 1 - p_y = sigmoid(-f). Padding is the model's business: with a correct
    ``attention_mask``, a padded example has the same f as the example alone.
    """

    label_key: str = "labels"
    name: str = "text_classification"

    def check_batch(self, batch: Any) -> None:
        batch = require_mapping(self.name, batch, f"input_ids, attention_mask, {self.label_key}")
        hint = (
            " (the batch has 'label': pass TextClassification(label_key='label'))"
            if "label" in batch and self.label_key != "label"
            else ""
        )
        labels = require_key(
            self.name,
            batch,
            self.label_key,
            f"Put the integer class of each example under {self.label_key!r}{hint}.",
        )
        require_integer(self.name, self.label_key, labels, "integer class indices")
        if labels.ndim != 1:
            raise DataError(
                f"{self.name}: labels must have shape (B,), got {tuple(labels.shape)}; pass "
                "one class index per example, not one-hot vectors (use labels.argmax(-1))"
            )
        if len(batch) < 2:
            raise DataError(
                f"{self.name}: the batch holds only {self.label_key!r}; add the model inputs "
                "(input_ids, attention_mask, ...)"
            )
        check_leading_sizes(self.name, batch, labels.shape[0])

    def batch_size(self, batch: Any) -> int:
        return int(batch[self.label_key].shape[0])

    def _logits(self, forward: Forward, batch: Mapping[str, Any]) -> Tensor:
        logits = model_logits(self.name, forward(**model_inputs(batch, self.label_key)), ndim=2)
        if logits.shape[1] < 2:
            raise ConfigError(
                f"{self.name}: need at least 2 classes, the model gives {logits.shape[1]} "
                "(a regression head has no margin); set num_labels >= 2"
            )
        return logits

    def output(self, forward: Forward, batch: Any) -> Tensor:
        """f = margin, shape (B,), float32."""
        labels = batch[self.label_key]
        return margin_from_logits(self._logits(forward, batch), labels.long())

    def out_to_loss(self, forward: Forward, batch: Any) -> Tensor:
        """Q = 1 - p_y = sigmoid(-f), shape (B,); also checks the labels' range."""
        labels = batch[self.label_key]
        logits = self._logits(forward, batch)
        check_label_range(self.name, labels, logits.shape[1])
        return torch.sigmoid(-margin_from_logits(logits, labels.long()))

    def out_to_loss_from_output(self, f: Tensor, batch: Any) -> Tensor:
        """Q = sigmoid(-f) from the margins f (B,) :meth:`output` returned: the same bits as
        :meth:`out_to_loss`, without a second pass over the logits."""
        return torch.sigmoid(-f.detach())

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "label_key": self.label_key}
