"""Language modelling: causal LMs (GPT-2, Llama, ...) and encoder-decoders (T5, mT5, ...).

f is the multi-token margin: the sum over an example's target tokens of the token log-odds
log(p_t / (1 - p_t)) = logit_y - logsumexp(other logits), each computed in float32 with
the target's logit masked by the finite float32 minimum (no -inf anywhere).

Q is the mean over target tokens of 1 - p_t, in [0, 1]. Why the mean: an example's loss
is the mean token cross-entropy, whose gradient is -(1/n) Σ_t (1 - p_t) ∇m_t (m_t the
token margin). TRAK needs one scalar Q per example with loss gradient ≈ -Q ∇f (up to the
constant 1/n); with f = Σ_t m_t the best single weight is the average of the per-token
weights (1 - p_t), exact when they are equal. The Gauss-Newton kernel uses Q(1 - Q), so Q
must lie in [0, 1], which an average of probabilities does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from fasttrak.errors import ConfigError, DataError
from fasttrak.tasks.base import Forward
from fasttrak.tasks.common import (
    check_leading_sizes,
    model_inputs,
    model_logits,
    require_integer,
    require_key,
    require_mapping,
)

IGNORE_INDEX = -100
"""Hugging Face's label for tokens that are not targets (prompt, padding)."""


def token_margins(
    logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Per-token log-odds log(p / (1 - p)) and the target mask.

    logits: (B, T, V) any float dtype; targets: (B, T) integer, ``ignore_index`` where a
    position is not a target. Returns margins (B, T) float32 (arbitrary, finite, at ignored
    positions) and the mask (B, T) bool of target positions.
    """
    logits = logits.float()
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))[..., None]
    correct = torch.gather(logits, -1, safe)[..., 0]
    # One (B, T, V) copy with the target's logit replaced by the finite float32 minimum,
    # whose exp() underflows to exactly 0 (no -inf, no separate boolean mask of that size).
    others = logits.scatter(-1, safe, torch.finfo(torch.float32).min)
    return correct - torch.logsumexp(others, dim=-1), mask


def sequence_output(margins: Tensor, mask: Tensor) -> Tensor:
    """f = Σ over target tokens of the token margins: (B,) float32."""
    return torch.where(mask, margins, torch.zeros_like(margins)).sum(dim=1)


def sequence_out_to_loss(margins: Tensor, mask: Tensor) -> Tensor:
    """Q = mean over target tokens of 1 - p_t = sigmoid(-m_t): (B,) float32 in [0, 1]."""
    weights = torch.where(mask, torch.sigmoid(-margins), torch.zeros_like(margins))
    return weights.sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def labels_after_prompt(
    input_ids: Tensor,
    prompt_lengths: int | Tensor,
    attention_mask: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Labels whose targets are the tokens after each example's prompt.

    input_ids: (B, T); prompt_lengths: an int or (B,) integer tensor, counted in real
    tokens from each example's first real token (so left and right padding both work);
    attention_mask: (B, T), 1 for real tokens (None: every token is real). Returns labels
    (B, T) int64: the token id where a token is real and not part of the prompt, else
    ``ignore_index``. Use them as ``batch["labels"]`` with :class:`LanguageModeling`.
    """
    real = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask != 0
    )
    rank = real.long().cumsum(dim=1) - 1  # index of each real token among the real ones
    prompt = torch.as_tensor(prompt_lengths, device=input_ids.device)
    if prompt.ndim == 1:
        prompt = prompt[:, None]
    keep = real & (rank >= prompt)
    return torch.where(keep, input_ids.long(), torch.full_like(input_ids.long(), ignore_index))


def _empty_rows_error(name: str, rows: list[int], fix: str) -> DataError:
    return DataError(
        f"{name}: example(s) {rows[:10]} of this batch have no target token, so their output "
        f"would be an empty sum; {fix}"
    )


def _check_token_range(name: str, targets: Tensor, mask: Tensor, vocab: int, key: str) -> None:
    """Every target must be a token id of the model's vocabulary."""
    values = targets[mask]
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= vocab):
        raise DataError(
            f"{name}: targets in {key!r} must be token ids in [0, {vocab}) or "
            f"{IGNORE_INDEX} (not a target); got values in [{int(values.min())}, "
            f"{int(values.max())}]; check the tokenizer matches the model"
        )


@dataclass(frozen=True)
class LanguageModeling:
    """Causal language models (``AutoModelForCausalLM``: GPT-2, Llama, Mistral, ...).

    A batch is a dict with ``input_ids`` (B, T), usually ``attention_mask`` (B, T), and
    optionally labels (B, T) under ``label_key``, following Hugging Face: -100 marks tokens
    that are not targets (prompt, padding), and the task shifts them (the logits at t
    predict token t + 1). The model is called with every key except the label and must
    return logits (B, T, V) (``.logits``, a tuple starting with them, or a tensor).

    Targets (``target=``):

    - ``"labels"`` (default): the label tokens, as Hugging Face's loss uses them; without a
      ``label_key`` in the batch, every real token (``attention_mask == 1``) after the first.
      Build labels that target only a completion with :func:`labels_after_prompt`.
    - ``"all_tokens"``: every real token after the first, whatever labels the batch holds.

    A target predicted from a padding position (``attention_mask == 0`` at t - 1) is
    dropped: its logits are meaningless. With right padding this changes nothing; with left
    padding it drops the first real token, which Hugging Face's loss would predict from a
    pad. Note that some models (GPT-2) number positions 0..T-1 whatever the mask: with left
    padding, put ``position_ids`` in the batch for a padded example to match it alone.

    f = Σ over target tokens of log(p_t / (1 - p_t)), float32 (see the module docstring);
    Q = mean over target tokens of (1 - p_t), in [0, 1]. An example without any target token
    is an error (raised by :meth:`check_batch`), never a silent 0.
    """

    label_key: str = "labels"
    target: Literal["labels", "all_tokens"] = "labels"
    name: str = "language_modeling"

    def __post_init__(self) -> None:
        if self.target not in ("labels", "all_tokens"):
            raise ConfigError(
                f"{self.name}: target must be 'labels' or 'all_tokens', got {self.target!r}"
            )

    def check_batch(self, batch: Any) -> None:
        batch = require_mapping(self.name, batch, f"input_ids, attention_mask, {self.label_key}")
        ids = require_key(
            self.name, batch, "input_ids", "A causal LM batch needs the token ids 'input_ids'."
        )
        require_integer(self.name, "input_ids", ids, "token ids")
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise DataError(
                f"{self.name}: input_ids must have shape (B, T) with T >= 2 (a token to "
                f"predict from and one to predict), got {tuple(ids.shape)}"
            )
        check_leading_sizes(self.name, batch, ids.shape[0])
        for key in ("attention_mask", self.label_key):
            value = batch.get(key)
            if key == self.label_key and self.target != "labels":
                continue
            if value is None:
                continue
            if not isinstance(value, Tensor) or value.shape != ids.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise DataError(
                    f"{self.name}: batch[{key!r}] must have the shape of input_ids "
                    f"{tuple(ids.shape)}, got {shape}; pad it like input_ids"
                )
            require_integer(self.name, key, value, "integers")
        empty = (~self._targets(batch)[1].any(dim=1)).nonzero()[:, 0].tolist()
        if empty:
            raise _empty_rows_error(
                self.name,
                empty,
                "give each example at least one label that is not -100 after its first real "
                "token (e.g. with labels_after_prompt), or drop those examples",
            )

    def batch_size(self, batch: Any) -> int:
        return int(batch["input_ids"].shape[0])

    def _targets(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Targets (B, T - 1) for the logits at 0..T-2 (ignore_index where not a target)
        and their mask."""
        ids = batch["input_ids"]
        attention = batch.get("attention_mask")
        labels = batch.get(self.label_key) if self.target == "labels" else None
        if labels is not None:
            targets = labels[:, 1:].long()
            keep = targets != IGNORE_INDEX
        else:
            targets = ids[:, 1:].long()
            keep = torch.ones_like(targets, dtype=torch.bool)
            if attention is not None:
                keep = keep & (attention[:, 1:] != 0)
        if attention is not None:
            keep = keep & (attention[:, :-1] != 0)  # never predict from a padding position
        return torch.where(keep, targets, torch.full_like(targets, IGNORE_INDEX)), keep

    def _logits(self, forward: Forward, batch: Mapping[str, Any]) -> Tensor:
        logits = model_logits(self.name, forward(**model_inputs(batch, self.label_key)), ndim=3)
        ids = batch["input_ids"]
        if logits.shape[:2] != ids.shape:
            raise ConfigError(
                f"{self.name}: the model's logits have shape {tuple(logits.shape)}, expected "
                f"{tuple(ids.shape)} + (vocab,) for input_ids of shape {tuple(ids.shape)}"
            )
        return logits

    def output(self, forward: Forward, batch: Any) -> Tensor:
        """f = Σ_t log(p_t / (1 - p_t)) over target tokens: (B,) float32."""
        targets, _ = self._targets(batch)
        return sequence_output(*token_margins(self._logits(forward, batch)[:, :-1], targets))

    def out_to_loss(self, forward: Forward, batch: Any) -> Tensor:
        """Q = mean over target tokens of (1 - p_t): (B,) float32 in [0, 1]. Called on whole
        batches outside transforms, so it also checks the target token ids."""
        targets, mask = self._targets(batch)
        logits = self._logits(forward, batch)
        key = self.label_key if self.label_key in batch and self.target == "labels" else "input_ids"
        _check_token_range(self.name, targets, mask, logits.shape[-1], key)
        return sequence_out_to_loss(*token_margins(logits[:, :-1], targets))

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "label_key": self.label_key, "target": self.target}


def shift_right(labels: Tensor, decoder_start_token_id: int, pad_token_id: int) -> Tensor:
    """Decoder inputs from labels (B, T), as Hugging Face's T5/BART do: prepend the start
    token, drop the last label, and replace -100 by the pad id. Returns (B, T) int64."""
    labels = labels.long()
    start = torch.full_like(labels[:, :1], decoder_start_token_id)
    shifted = torch.cat([start, labels[:, :-1]], dim=1)
    return torch.where(shifted == IGNORE_INDEX, torch.full_like(shifted, pad_token_id), shifted)


@dataclass(frozen=True)
class Seq2Seq:
    """Encoder-decoder models (``AutoModelForSeq2SeqLM``: T5, mT5, BART, ...).

    A batch is a dict with the encoder's ``input_ids`` (B, T_enc) and ``attention_mask``,
    and labels (B, T_dec) under ``label_key`` with -100 for tokens that are not targets
    (padding, or a prefix you do not attribute). The decoder inputs are the labels shifted
    right, starting with ``decoder_start_token_id`` and with -100 replaced by
    ``pad_token_id`` (defaults 0 and 0, as for T5/mT5; BART uses 2 and 1): the task cannot
    see the model's config, so pass them for other models. A batch that already holds
    ``decoder_input_ids`` is used as it is. The model is called with every key except the
    label (so it computes no loss of its own) and must return logits (B, T_dec, V).

    f and Q as for :class:`LanguageModeling`, over the label tokens with no extra shift
    (the logits at t predict ``labels[t]``): f = Σ_t log(p_t / (1 - p_t)), float32;
    Q = mean over target tokens of (1 - p_t), in [0, 1]. An example without any target
    token is an error (raised by :meth:`check_batch`).
    """

    label_key: str = "labels"
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    name: str = "seq2seq"

    def check_batch(self, batch: Any) -> None:
        batch = require_mapping(self.name, batch, f"input_ids, attention_mask, {self.label_key}")
        labels = require_key(
            self.name,
            batch,
            self.label_key,
            f"Put the target token ids under {self.label_key!r}, with -100 for padding.",
        )
        require_integer(self.name, self.label_key, labels, "token ids (-100: not a target)")
        if labels.ndim != 2:
            raise DataError(
                f"{self.name}: labels must have shape (B, T_dec), got {tuple(labels.shape)}"
            )
        check_leading_sizes(self.name, batch, labels.shape[0])
        decoder = batch.get("decoder_input_ids")
        if isinstance(decoder, Tensor) and decoder.shape != labels.shape:
            raise DataError(
                f"{self.name}: decoder_input_ids {tuple(decoder.shape)} and labels "
                f"{tuple(labels.shape)} must have the same shape; or leave decoder_input_ids "
                "out and the task shifts the labels"
            )
        empty = (~(labels != IGNORE_INDEX).any(dim=1)).nonzero()[:, 0].tolist()
        if empty:
            raise _empty_rows_error(
                self.name, empty, "give each example at least one label that is not -100"
            )

    def batch_size(self, batch: Any) -> int:
        return int(batch[self.label_key].shape[0])

    def _logits(self, forward: Forward, batch: Mapping[str, Any]) -> Tensor:
        inputs = model_inputs(batch, self.label_key)
        labels = batch[self.label_key]
        if inputs.get("decoder_input_ids") is None:
            inputs["decoder_input_ids"] = shift_right(
                labels, self.decoder_start_token_id, self.pad_token_id
            )
        logits = model_logits(self.name, forward(**inputs), ndim=3)
        if logits.shape[:2] != labels.shape:
            raise ConfigError(
                f"{self.name}: the model's logits have shape {tuple(logits.shape)}, expected "
                f"{tuple(labels.shape)} + (vocab,) for labels of shape {tuple(labels.shape)}"
            )
        return logits

    def output(self, forward: Forward, batch: Any) -> Tensor:
        """f = Σ_t log(p_t / (1 - p_t)) over label tokens: (B,) float32."""
        labels = batch[self.label_key]
        return sequence_output(*token_margins(self._logits(forward, batch), labels))

    def out_to_loss(self, forward: Forward, batch: Any) -> Tensor:
        """Q = mean over label tokens of (1 - p_t): (B,) float32 in [0, 1]. Also checks the
        label token ids."""
        labels = batch[self.label_key]
        logits = self._logits(forward, batch)
        margins, mask = token_margins(logits, labels)
        _check_token_range(self.name, labels, mask, logits.shape[-1], self.label_key)
        return sequence_out_to_loss(margins, mask)

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label_key": self.label_key,
            "decoder_start_token_id": self.decoder_start_token_id,
            "pad_token_id": self.pad_token_id,
        }
