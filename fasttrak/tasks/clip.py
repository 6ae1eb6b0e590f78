"""CLIP: image-text contrastive models (Hugging Face ``CLIPModel``, open_clip).

For a pair z = (x, y) with normalised image and text embeddings u(x), v(y), and a fixed
set of N negative pairs (x'_j, y'_j) embedded once per checkpoint (u'_j, v'_j)::

    s = cos(u, v)                         the pair's similarity
    f_img = -logsumexp_j( τ (u·v'_j - s) )   = log(p_img / (1 - p_img))
    f_txt = -logsumexp_j( τ (v·u'_j - s) )   = log(p_txt / (1 - p_txt))
    f = f_img + f_txt
    Q = ((1 - p_img) + (1 - p_txt)) / 2   in [0, 1]

p_img is the softmax probability that image x picks its own caption among {y} ∪ {y'_j}
(and p_txt the same from the caption's side): CLIP's training loss restricted to a batch
made of the pair and the negatives, so each direction's loss is -log sigmoid(f_dir) and
f_dir is the margin of the paper's classification output. This is the output function of
the TRAK paper (Section 5.1 and the reference ``CLIPModelOutput``), with three choices:

- τ is the model's logit scale (exp of the learned temperature parameter), held fixed per
  checkpoint. With τ the margins are the log-odds of the probabilities the model was
  trained on, and Q = 1 - p is the same probability's out-to-loss term; the reference uses
  τ = 1 in f but τ in Q, which with cosine similarities in [-1, 1] turns the margin into
  an almost uniform average over negatives. ``logit_scale=1.0`` gives the reference's f.
  τ is a constant of the checkpoint (like the negatives), so f has no gradient through the
  temperature parameter.
- The negatives are one fixed set per checkpoint (no random subsample per example, no
  global RNG or state), so an example's output depends only on the example and the
  checkpoint, and Q uses the same negatives as f (the reference's Q uses the other pairs
  of the current batch, which makes an example's Q depend on its batch).
- A negative that is the pair itself (or an exact duplicate: image and text cosines both
  above 1 - ``duplicate_tol``) is left out: it is no negative, and keeping it would cap
  p at 1/2 for exactly the training examples that were drawn as negatives.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten

from fasttrak.data import as_rows, to_device
from fasttrak.errors import (
    ConfigError,
    ConfigTypeError,
    DataError,
    DataKeyError,
    DataTypeError,
    TaskNotBoundError,
)
from fasttrak.tasks.base import Forward


@dataclass(frozen=True)
class _Negatives:
    """One checkpoint's negative embeddings (N, D), normalised float32, and its scale τ."""

    image: Tensor
    text: Tensor
    scale: float
    kind: str  # "dict" (Hugging Face) or "pair" (open_clip style)


@dataclass(frozen=True, eq=False)
class CLIP:
    """Image-text contrastive output (see the module docstring for f and Q).

    Args:
        negatives: N image-text pairs in the same form as the batches: a dict batch for
            Hugging Face ``CLIPModel`` (``input_ids``, ``attention_mask``, ``pixel_values``),
            a pair ``(images, texts)`` of tensors for open_clip-style models, or a map-style
            dataset / non-shuffling DataLoader of such items (e.g. a fixed sample of a few
            hundred training pairs; the paper samples 300 per example from 50k).
        logit_scale: τ; None (default) reads the checkpoint's own: the third output of an
            open_clip model, or, for ``CLIPModel``, the ratio of ``logits_per_text`` to the
            cosine similarities. A float fixes it (1.0: the reference's f).
        duplicate_tol: a negative whose image and text cosines with the example both exceed
            1 - duplicate_tol is the example itself and is left out (0 keeps everything).
        negatives_batch_size: pairs per forward pass when embedding the negatives.

    Batches: a dict (model called as ``model(**batch)``, returning ``image_embeds`` and
    ``text_embeds``: Hugging Face ``CLIPModel``) or a pair ``(images, texts)`` (called as
    ``model(images, texts)``, returning ``(image_features, text_features, logit_scale)``
    as open_clip does, or open_clip's dict of those names). Embeddings are normalised here
    whether or not the model does. f and Q have shape (B,), float32.

    The task needs each checkpoint's negative embeddings: the runner calls
    :meth:`bind` once per checkpoint (by hand: ``task.bind(model)``), which returns a new
    task holding them; :meth:`output` of an unbound task raises.
    """

    negatives: Any = field(repr=False)
    logit_scale: float | None = None
    duplicate_tol: float = 1e-4
    negatives_batch_size: int = 256
    name: str = "clip"
    _bound: _Negatives | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.negatives is None:
            raise ConfigError(
                f"{self.name}: pass negatives=, a fixed sample of image-text pairs "
                "(a batch, or a dataset of pairs) to contrast each example with"
            )
        if self.logit_scale is not None and not (0 < float(self.logit_scale) < float("inf")):
            raise ConfigError(f"{self.name}: logit_scale must be positive, got {self.logit_scale}")
        if not 0 <= self.duplicate_tol < 1:
            raise ConfigError(f"{self.name}: duplicate_tol must be in [0, 1)")
        if self.negatives_batch_size < 1:
            raise ConfigError(f"{self.name}: negatives_batch_size must be positive")

    # ------------------------------------------------------------------ batches
    def check_batch(self, batch: Any) -> None:
        kind = _kind(batch)
        if kind is None:
            raise DataTypeError(
                f"{self.name}: a batch must be a dict with input_ids and pixel_values "
                "(Hugging Face CLIPModel) or a pair (images, texts) of tensors (open_clip), "
                f"got {type(batch).__name__}"
                f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}"
            )
        if kind == "dict":
            missing = [k for k in ("input_ids", "pixel_values") if k not in batch]
            if missing:
                raise DataKeyError(
                    f"{self.name}: the batch has no {missing}; its keys are {sorted(batch)}. "
                    "Use the CLIP processor's output (input_ids, attention_mask, pixel_values)"
                )
            tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
        else:
            tensors = {"images": batch[0], "texts": batch[1]}
        sizes = {k: v.shape[0] if v.ndim else None for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(
                f"{self.name}: the batch's tensors disagree on the number of examples "
                f"(dimension 0): {sizes}"
            )
        if self._bound is not None and self._bound.kind != kind:
            raise DataTypeError(
                f"{self.name}: the negatives were {_KIND_WORDS[self._bound.kind]} but this "
                f"batch is {_KIND_WORDS[kind]}; give both in the form the model takes"
            )

    def batch_size(self, batch: Any) -> int:
        first = batch["input_ids"] if _kind(batch) == "dict" else batch[0]
        return int(first.shape[0])

    # ------------------------------------------------------------------ binding
    def bind(self, forward: Forward, device: str | torch.device | None = None) -> CLIP:
        """A new task holding the negatives' embeddings under ``forward`` (one checkpoint's
        weights; a model works too). ``device``: where to move the negatives first (None:
        leave them where they are)."""
        images, texts = [], []
        scale = None if self.logit_scale is None else float(self.logit_scale)
        model_scale: float | None = None
        fit = [0.0, 0.0]  # least squares: logits ≈ τ · cosines, for Hugging Face CLIPModel
        kind = None
        with torch.no_grad():
            for chunk in self._negative_batches():
                chunk = to_device(chunk, torch.device(device)) if device is not None else chunk
                self.check_batch(chunk)
                kind = _kind(chunk)
                out = _call(forward, chunk)
                image, text = _embeddings(self.name, out)
                images.append(image)
                texts.append(text)
                if scale is None:
                    found = _scale_of(out)
                    if found is not None:
                        model_scale = float(found)
                    elif _get(out, "logits_per_text") is not None:
                        cosines = text @ image.T
                        fit[0] += float((out["logits_per_text"].float() * cosines).sum())
                        fit[1] += float((cosines * cosines).sum())
        if not images:
            raise ConfigError(f"{self.name}: negatives= holds no pairs; pass at least one")
        if scale is None:
            scale = model_scale if model_scale is not None else _ratio(fit)
        if scale is None or not 0 < scale < float("inf"):
            raise ConfigError(
                f"{self.name}: cannot read the logit scale from the model's output (got "
                f"{scale}); pass CLIP(..., logit_scale=<the model's exp(logit_scale)>)"
            )
        bound = copy.copy(self)
        assert kind is not None
        negatives = _Negatives(torch.cat(images), torch.cat(texts), scale, kind)
        object.__setattr__(bound, "_bound", negatives)
        return bound

    @property
    def bound(self) -> bool:
        """Whether this task holds a checkpoint's negative embeddings."""
        return self._bound is not None

    # ------------------------------------------------------------------ f and Q
    def _directions(self, forward: Forward, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """f_img, f_txt (B,) float32 and the number of negatives each example keeps (B,)."""
        negatives = self._bound
        if negatives is None:
            raise TaskNotBoundError(
                f"{self.name}: the task holds no negative embeddings yet; they depend on the "
                "checkpoint, so bind it first: task = task.bind(model) (fasttrak's runner "
                "does this for every checkpoint)"
            )
        image, text = _embeddings(self.name, _call(forward, batch))
        neg_image = negatives.image.to(image.device)
        neg_text = negatives.text.to(image.device)
        positive = (image * text).sum(dim=1, keepdim=True)  # (B, 1)
        # The example itself among the negatives: both cosines ~1 (no gradient needed).
        duplicate = (image.detach() @ neg_image.T > 1 - self.duplicate_tol) & (
            text.detach() @ neg_text.T > 1 - self.duplicate_tol
        )
        if self.duplicate_tol == 0:
            duplicate = torch.zeros_like(duplicate)
        low = torch.finfo(torch.float32).min  # exp() underflows to exactly 0: no -inf
        scale = negatives.scale
        img_side = (scale * (image @ neg_text.T - positive)).masked_fill(duplicate, low)
        txt_side = (scale * (text @ neg_image.T - positive)).masked_fill(duplicate, low)
        kept = (~duplicate).sum(dim=1)
        return -torch.logsumexp(img_side, dim=1), -torch.logsumexp(txt_side, dim=1), kept

    def output(self, forward: Forward, batch: Any) -> Tensor:
        """f = f_img + f_txt: (B,) float32."""
        f_img, f_txt, _ = self._directions(forward, batch)
        return f_img + f_txt

    def out_to_loss(self, forward: Forward, batch: Any) -> Tensor:
        """Q = ((1 - p_img) + (1 - p_txt)) / 2: (B,) float32 in [0, 1]. Also checks that
        every example keeps at least one negative."""
        f_img, f_txt, kept = self._directions(forward, batch)
        alone = (kept == 0).nonzero()[:, 0].tolist()
        if alone:
            raise ConfigError(
                f"{self.name}: example(s) {alone[:10]} of this batch have no negative left: "
                "every negative pair is a duplicate of them; give more (distinct) negatives"
            )
        return (torch.sigmoid(-f_img) + torch.sigmoid(-f_txt)) / 2

    def spec(self) -> dict[str, Any]:
        count, digest = self._negatives_digest
        return {
            "name": self.name,
            "num_negatives": count,
            "negatives": digest,
            "logit_scale": self.logit_scale,
            "duplicate_tol": self.duplicate_tol,
        }

    # ------------------------------------------------------------------ helpers
    def _negative_batches(self) -> Iterator[Any]:
        """The negatives in batches of at most ``negatives_batch_size`` pairs, in order."""
        negatives, size = self.negatives, self.negatives_batch_size
        kind = _kind(negatives)
        if kind is not None:  # one collated batch: slice its rows
            count = self.batch_size(negatives)
            for start in range(0, count, size):
                rows = slice(start, min(start + size, count))
                if kind == "dict":
                    yield {k: v[rows] if isinstance(v, Tensor) else v for k, v in negatives.items()}
                else:
                    yield (negatives[0][rows], negatives[1][rows])
            return
        loaded = as_rows(negatives, size)
        for _, batch in loaded.batches(slice(0, len(loaded))):
            yield batch

    @functools.cached_property
    def _negatives_digest(self) -> tuple[int, str]:
        """(N, digest of the negatives' contents): identical for any negatives_batch_size,
        so that a store made with other negatives is told apart from this one."""
        digests: list[Any] = []  # one per leaf: its bytes, in row order over all chunks
        headers: list[str] = []  # one per leaf: dtype and row shape
        structure = None
        count = 0
        for batch in self._negative_batches():
            self.check_batch(batch)
            count += self.batch_size(batch)
            plain = dict(batch) if isinstance(batch, Mapping) else tuple(batch)
            leaves, treespec = tree_flatten(plain)
            structure = structure or str(treespec)
            for i, leaf in enumerate(leaves):
                if i == len(digests):
                    digests.append(hashlib.blake2b(digest_size=16))
                    headers.append(
                        f"{leaf.dtype}|{tuple(leaf.shape[1:])}"
                        if isinstance(leaf, Tensor)
                        else type(leaf).__name__
                    )
                if isinstance(leaf, Tensor):
                    flat = leaf.detach().to("cpu").contiguous().reshape(-1)
                    digests[i].update(flat.view(torch.uint8).numpy().tobytes())
                else:
                    digests[i].update(repr(leaf).encode())
        if count == 0:
            raise ConfigError(f"{self.name}: negatives= holds no pairs; pass at least one")
        total = hashlib.blake2b(f"{structure}|{count}|{headers}".encode(), digest_size=16)
        for digest in digests:
            total.update(digest.digest())
        return count, total.hexdigest()


_KIND_WORDS = {"dict": "a dict (Hugging Face CLIPModel)", "pair": "a pair (images, texts)"}


def _kind(batch: Any) -> str | None:
    """ "dict", "pair" (two tensors), or None for something that is not one batch."""
    if isinstance(batch, Mapping):
        return "dict"
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and all(isinstance(t, Tensor) for t in batch)
    ):
        return "pair"
    return None


def _call(forward: Forward, batch: Any) -> Any:
    return forward(**batch) if isinstance(batch, Mapping) else forward(*batch)


def _get(out: Any, key: str) -> Any:
    return out.get(key) if isinstance(out, Mapping) else None


def _embeddings(name: str, out: Any) -> tuple[Tensor, Tensor]:
    """Normalised float32 image and text embeddings (B, D) from a model's output."""
    if _get(out, "image_embeds") is not None and _get(out, "text_embeds") is not None:
        image, text = out["image_embeds"], out["text_embeds"]  # Hugging Face CLIPModel
    elif _get(out, "image_features") is not None and _get(out, "text_features") is not None:
        image, text = out["image_features"], out["text_features"]  # open_clip, output_dict
    elif isinstance(out, (tuple, list)) and len(out) == 3:
        image, text = out[0], out[1]  # open_clip: (image_features, text_features, scale)
    else:
        what = str(sorted(out)) if isinstance(out, Mapping) else type(out).__name__
        if isinstance(out, (tuple, list)):
            what += f" of length {len(out)}"
        raise ConfigTypeError(
            f"{name}: cannot find image and text embeddings in the model's output ({what}); "
            "the model must return image_embeds/text_embeds (Hugging Face CLIPModel) or "
            "(image_features, text_features, logit_scale) (open_clip). Models with a sigmoid "
            "loss (SigLIP: a 4th output, logit_bias) need another task."
        )
    if not (isinstance(image, Tensor) and isinstance(text, Tensor)) or image.ndim != 2:
        raise ConfigError(f"{name}: embeddings must be tensors of shape (B, D)")
    if image.shape != text.shape:
        raise ConfigError(
            f"{name}: image embeddings {tuple(image.shape)} and text embeddings "
            f"{tuple(text.shape)} must have the same shape"
        )
    return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


def _scale_of(out: Any) -> Tensor | None:
    """The logit scale an open_clip-style model returns (already exponentiated)."""
    if isinstance(out, (tuple, list)) and len(out) == 3:
        return out[2]
    return _get(out, "logit_scale")


def _ratio(fit: list[float]) -> float | None:
    return fit[0] / fit[1] if fit[1] > 0 else None
