"""Text classification on Hugging Face-style models: f = margin of the sequence logits.

Also holds the helpers the other Hugging Face tasks share: reading a tokenizer-style batch
(a dict of tensors) and getting the logits out of whatever the model returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fasttrak.errors import ConfigError, ConfigTypeError, DataError, DataKeyError, DataTypeError
from fasttrak.tasks.base import Forward
from fasttrak.tasks.classification import _check_label_range, margin_from_logits


def require_mapping(name: str, batch: Any, keys: str) -> Mapping[str, Any]:
    """``batch`` as a Mapping (a dict, a tokenizer's BatchEncoding), or a TypeError.

    ``keys`` describes what the batch should hold, for the message.
    """
    if not isinstance(batch, Mapping):
        raise DataTypeError(
            f"{name}: a batch must be a dict like a tokenizer's output ({keys}), got "
            f"{type(batch).__name__}; make your dataset return dicts of tensors "
            "(a list of such dicts collates into one)"
        )
    return batch


def require_key(name: str, batch: Mapping[str, Any], key: str, fix: str) -> Tensor:
    """``batch[key]`` as a tensor, or an error naming the keys present and the fix."""
    if key not in batch:
        raise DataKeyError(f"{name}: the batch has no {key!r}; its keys are {sorted(batch)}. {fix}")
    value = batch[key]
    if not isinstance(value, Tensor):
        raise DataTypeError(
            f"{name}: batch[{key!r}] must be a torch.Tensor, got {type(value).__name__}; "
            "return tensors from your dataset (or collate with return_tensors='pt')"
        )
    return value


def require_integer(name: str, key: str, value: Tensor, what: str) -> None:
    """Raise a TypeError when ``value`` is not an integer tensor."""
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise DataTypeError(
            f"{name}: batch[{key!r}] has dtype {value.dtype}, expected {what}; "
            f"convert it with .long()"
        )


def check_leading_sizes(name: str, batch: Mapping[str, Any], size: int) -> None:
    """Every tensor of the batch must have ``size`` rows (dimension 0)."""
    for key, value in batch.items():
        if isinstance(value, Tensor) and (value.ndim == 0 or value.shape[0] != size):
            shape = tuple(value.shape)
            raise DataError(
                f"{name}: batch[{key!r}] has shape {shape}, but the batch has {size} examples; "
                "every tensor of a batch needs the examples along dimension 0"
            )


def model_logits(name: str, out: Any, ndim: int) -> Tensor:
    """The logits in what a model returned: a tensor, a Hugging Face ``ModelOutput`` (or any
    mapping) with ``logits``, or a tuple whose first element is the logits (Hugging Face's
    ``return_dict=False``). Raises when they do not have ``ndim`` dimensions."""
    if isinstance(out, Tensor):
        logits = out
    elif isinstance(out, Mapping) and out.get("logits") is not None:
        logits = out["logits"]
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    else:
        raise ConfigTypeError(
            f"{name}: cannot find logits in the model's output ({type(out).__name__}); the "
            "model must return a tensor, an object with .logits (Hugging Face), or a tuple "
            "whose first element is the logits. Do not pass labels to the model."
        )
    if logits.ndim != ndim:
        layout = "(B, C)" if ndim == 2 else "(B, T, V)"
        raise ConfigError(
            f"{name}: the model's logits have shape {tuple(logits.shape)}, expected {layout}; "
            "use a model with the matching head (e.g. AutoModelForSequenceClassification for "
            "text classification, AutoModelForCausalLM for language modelling)"
        )
    return logits


def model_inputs(batch: Mapping[str, Any], label_key: str) -> dict[str, Any]:
    """Every entry of the batch except the label: what the model is called with."""
    return {key: value for key, value in batch.items() if key != label_key}


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
        _check_label_range(self.name, labels, logits.shape[1])
        return torch.sigmoid(-margin_from_logits(logits, labels.long()))

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "label_key": self.label_key}
