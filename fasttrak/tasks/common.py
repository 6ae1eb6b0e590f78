"""Checks and readers the built-in tasks share: batches as dicts of tensors, labels, logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fasttrak.errors import ConfigError, ConfigTypeError, DataError, DataKeyError, DataTypeError


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


def check_label_range(name: str, labels: Tensor, num_classes: int) -> None:
    """Raise when a label is outside [0, num_classes)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"{name}: labels must lie in [0, {num_classes}) for a model with {num_classes} "
            f"outputs, got values in [{int(labels.min())}, {int(labels.max())}]; "
            "remap your class indices"
        )
