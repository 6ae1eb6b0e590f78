"""Model output functions with the interface of ``trak.modelout_functions``.

A traker *model output* says what is attributed: ``get_output`` (f, the model output
function, per example) and ``get_out_to_loss_grad`` (Q, the out-to-loss weight, per
batch). :class:`~fasttrak.compat.trak.TRAKer` maps each of these onto a fasttrak
:class:`~fasttrak.tasks.Task`:

- the built-in classes below map onto fasttrak's own tasks (``ImageClassification``,
  ``TextClassification``, ``CLIP``), which run on its fast gradient engines;
- any other subclass of :class:`AbstractModelOutput` (or a subclass of a built-in class that
  overrides either method) runs through :class:`ModelOutputTask`, which calls your methods
  exactly as traker does: ``get_output(model, weights, buffers, *example)`` for one example
  (the batch dimension removed) under ``torch.func`` transforms, and
  ``get_out_to_loss_grad(model, weights, buffers, batch)`` for a whole batch.

In both of your methods, call the model as ``torch.func.functional_call(model, (weights,
buffers), args)`` (as traker's examples do) or as ``model(*args)``: the call runs the model
with the weights fasttrak differentiates. Reading ``weights[name]`` directly is not
supported (``weights`` and ``buffers`` are empty here; the model call supplies them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from fasttrak.errors import ConfigError, ConfigTypeError, DataTypeError
from fasttrak.tasks import CLIP, ImageClassification, Task, TextClassification
from fasttrak.tasks.base import Forward
from fasttrak.tasks.classification import margin_from_logits

__all__ = [
    "AbstractModelOutput",
    "CLIPModelOutput",
    "ImageClassificationModelOutput",
    "IterativeImageClassificationModelOutput",
    "ModelOutputTask",
    "TASK_TO_MODELOUT",
    "TextClassificationModelOutput",
    "as_task",
]


class AbstractModelOutput(ABC):
    """traker's model output interface: subclass it and define

    - ``get_output(model, weights, buffers, *example) -> Tensor``: f(z; θ) of ONE example
      (each element of the batch without its batch dimension), a scalar;
    - ``get_out_to_loss_grad(model, weights, buffers, batch) -> Tensor``: Q of every example
      of a batch, shape (B,) or (B, 1).
    """

    def __init__(self) -> None:  # noqa: B027 (traker's subclasses call super().__init__())
        pass

    @abstractmethod
    def get_output(self, *args: Any, **kwargs: Any) -> Tensor:
        """f(z; θ) of one example (see the class docstring)."""

    @abstractmethod
    def get_out_to_loss_grad(self, *args: Any, **kwargs: Any) -> Tensor:
        """Q of every example of a batch (see the class docstring)."""

    def fasttrak_task(self) -> Task:
        """The fasttrak task this model output is: :class:`ModelOutputTask` (your methods,
        under the vmap engine) unless a built-in class overrides it."""
        return ModelOutputTask(self)


def _call(model: Any, weights: Any, buffers: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``model`` on the inputs with the given weights (traker's ``functional_call``)."""
    if weights is None and buffers is None:
        return model(*args, **kwargs)
    return torch.func.functional_call(model, (weights or {}, buffers or {}), args, kwargs)


def _margin_of_one(logits: Tensor, label: Tensor) -> Tensor:
    """logit_y - logsumexp(other logits) of one example's (1, C) logits, as a scalar."""
    return margin_from_logits(logits, label.reshape(1).long())[0]


def _is_overridden(obj: Any, base: type, name: str) -> bool:
    return getattr(type(obj), name) is not getattr(base, name)


class ImageClassificationModelOutput(AbstractModelOutput):
    """The margin log(p / (1 - p)) of the correct class; Q = 1 - softmax(logits / T)_y.

    Maps onto ``ft.tasks.ImageClassification()`` (T = 1). Batches are ``(images, labels)``.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise ConfigError(f"temperature must be positive, got {temperature!r}")
        self.loss_temperature = float(temperature)

    @staticmethod
    def get_output(model: Any, weights: Any, buffers: Any, image: Tensor, label: Tensor) -> Tensor:
        logits = _call(model, weights, buffers, image.unsqueeze(0))
        return _margin_of_one(logits, label)

    def get_out_to_loss_grad(
        self, model: Any, weights: Any, buffers: Any, batch: Sequence[Tensor]
    ) -> Tensor:
        images, labels = batch
        logits = _call(model, weights, buffers, images)
        p = torch.softmax(logits.float() / self.loss_temperature, dim=-1)
        return (1 - p[torch.arange(logits.shape[0]), labels.long()]).detach().unsqueeze(-1)

    def fasttrak_task(self) -> Task:
        if _is_overridden(self, ImageClassificationModelOutput, "get_output") or _is_overridden(
            self, ImageClassificationModelOutput, "get_out_to_loss_grad"
        ):
            return ModelOutputTask(self)
        if self.loss_temperature == 1.0:
            return ImageClassification()
        return TemperedImageClassification(temperature=self.loss_temperature)


class IterativeImageClassificationModelOutput(ImageClassificationModelOutput):
    """traker's loop-based variant of :class:`ImageClassificationModelOutput`: the same f
    and Q, so the same fasttrak task (fasttrak's engines need no loop)."""

    def fasttrak_task(self) -> Task:
        if _is_overridden(self, IterativeImageClassificationModelOutput, "get_output"):
            raise ConfigError(
                "an IterativeImageClassificationModelOutput with its own get_output is not "
                "supported (it is called on whole batches); subclass AbstractModelOutput "
                "with a per-example get_output instead"
            )
        return ImageClassificationModelOutput.fasttrak_task(self)


class TextClassificationModelOutput(AbstractModelOutput):
    """The margin of a sequence classifier called as ``model(input_ids=...,
    token_type_ids=..., attention_mask=...)``; batches are the tuple ``(input_ids,
    token_type_ids, attention_mask, labels)``. Maps onto ``ft.tasks.TextClassification``
    (hook engine: any attention implementation, padding masks)."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise ConfigError(f"temperature must be positive, got {temperature!r}")
        self.loss_temperature = float(temperature)

    @staticmethod
    def get_output(
        model: Any,
        weights: Any,
        buffers: Any,
        input_id: Tensor,
        token_type_id: Tensor,
        attention_mask: Tensor,
        label: Tensor,
    ) -> Tensor:
        out = _call(
            model,
            weights,
            buffers,
            input_ids=input_id.unsqueeze(0),
            token_type_ids=token_type_id.unsqueeze(0),
            attention_mask=attention_mask.unsqueeze(0),
        )
        logits = out if isinstance(out, Tensor) else out["logits"]
        return _margin_of_one(logits, label)

    def get_out_to_loss_grad(
        self, model: Any, weights: Any, buffers: Any, batch: Sequence[Tensor]
    ) -> Tensor:
        input_ids, token_type_ids, attention_mask, labels = batch
        out = _call(
            model,
            weights,
            buffers,
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            attention_mask=attention_mask,
        )
        logits = out if isinstance(out, Tensor) else out["logits"]
        p = torch.softmax(logits.float() / self.loss_temperature, dim=-1)
        return (1 - p[torch.arange(logits.shape[0]), labels.long()]).detach().unsqueeze(-1)

    def fasttrak_task(self) -> Task:
        if _is_overridden(self, TextClassificationModelOutput, "get_output") or _is_overridden(
            self, TextClassificationModelOutput, "get_out_to_loss_grad"
        ):
            return ModelOutputTask(self)
        return TupleTextClassification(temperature=self.loss_temperature)


class CLIPModelOutput(AbstractModelOutput):
    """CLIP's contrastive margin against a set of negative pairs (open_clip-style models
    called as ``model(images, texts)`` returning ``(image_features, text_features,
    logit_scale)``). Maps onto ``ft.tasks.CLIP``.

    As in traker, call :meth:`get_embeddings` (``traker.task.get_embeddings(model, loader,
    batch_size, embedding_dim)``) before featurizing. Differences (see
    docs/migrating_from_trak.md): the negatives are one fixed sample of
    ``simulated_batch_size`` of the pairs read from ``loader``, embedded again for every
    checkpoint (traker draws a new random sample per example and embeds once, with
    whichever model is loaded), and f uses the model's logit scale (traker's f uses 1; pass
    ``temperature=1.0`` to get it).
    """

    def __init__(self, temperature: float | None = None, simulated_batch_size: int = 300) -> None:
        super().__init__()
        if temperature is not None and not float(temperature) > 0:
            raise ConfigError(f"temperature must be positive or None, got {temperature!r}")
        if simulated_batch_size < 1:
            raise ConfigError(f"simulated_batch_size must be >= 1, got {simulated_batch_size}")
        self.temperature = temperature
        self.sim_batch_size = int(simulated_batch_size)
        self.negatives: tuple[Tensor, Tensor] | None = None

    def get_embeddings(
        self,
        model: Any,
        loader: Iterable[Any],
        batch_size: int,
        embedding_dim: int | None = None,
        size: int = 50_000,
        preprocess_fn_img: Any = None,
        preprocess_fn_txt: Any = None,
    ) -> None:
        """Read up to ``size`` (image, text) pairs from ``loader`` and keep a fixed sample
        of ``simulated_batch_size`` of them (seed 0) as the negatives. ``model``,
        ``batch_size`` and ``embedding_dim`` are accepted for traker's signature: fasttrak
        embeds the negatives itself, with each checkpoint's weights."""
        images: list[Tensor] = []
        texts: list[Tensor] = []
        count = 0
        for image, text in loader:
            if preprocess_fn_img is not None:
                image = preprocess_fn_img(image)
            if preprocess_fn_txt is not None:
                text = preprocess_fn_txt(text)
            images.append(image.detach().cpu())
            texts.append(text.detach().cpu())
            count += int(image.shape[0])
            if count >= size:
                break
        if not images:
            raise ConfigError("get_embeddings: the loader yielded no (image, text) pairs")
        all_images, all_texts = torch.cat(images)[:size], torch.cat(texts)[:size]
        pick = torch.randperm(len(all_images), generator=torch.Generator().manual_seed(0))
        pick = pick[: self.sim_batch_size].sort().values
        self.negatives = (all_images[pick], all_texts[pick])

    def get_output(self, *args: Any, **kwargs: Any) -> Tensor:
        raise ConfigError(
            "CLIPModelOutput is computed by fasttrak's CLIP task; its get_output is not "
            "called directly (subclass AbstractModelOutput for your own CLIP output)"
        )

    def get_out_to_loss_grad(self, *args: Any, **kwargs: Any) -> Tensor:
        raise ConfigError(
            "CLIPModelOutput is computed by fasttrak's CLIP task; its get_out_to_loss_grad "
            "is not called directly"
        )

    def fasttrak_task(self) -> Task:
        if self.negatives is None:
            raise ConfigError(
                "the clip task needs negatives: call traker.task.get_embeddings(model, loader, "
                "batch_size, embedding_dim) before featurizing or scoring (as with traker)"
            )
        return CLIP(negatives=self.negatives, logit_scale=self.temperature)


TASK_TO_MODELOUT: dict[str, type[AbstractModelOutput]] = {
    "image_classification": ImageClassificationModelOutput,
    "clip": CLIPModelOutput,
    "text_classification": TextClassificationModelOutput,
    "iterative_image_classification": IterativeImageClassificationModelOutput,
}


# ---------------------------------------------------------------- fasttrak tasks
@dataclass(frozen=True)
class TemperedImageClassification(ImageClassification):
    """``ImageClassification`` whose Q is 1 - softmax(logits / temperature)_y (traker's
    ``ImageClassificationModelOutput(temperature=...)``); f is the plain margin."""

    temperature: float = 1.0
    name: str = "image_classification"

    def out_to_loss(self, forward: Forward, batch: Any) -> Tensor:
        inputs, labels = batch
        super().out_to_loss(forward, batch)  # checks the labels' range
        logits = self._logits(forward, inputs, labels).float() / self.temperature
        return 1 - torch.softmax(logits, dim=-1)[torch.arange(len(labels)), labels.long()]

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "temperature": self.temperature}


TEXT_KEYS = ("input_ids", "token_type_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class TupleTextClassification:
    """``ft.tasks.TextClassification`` on traker's text batches: the tuple
    ``(input_ids, token_type_ids, attention_mask, labels)`` (a dict batch also works)."""

    temperature: float = 1.0
    name: str = "text_classification"
    inner: TextClassification = field(default_factory=TextClassification)

    def _as_dict(self, batch: Any) -> Any:
        if isinstance(batch, (tuple, list)):
            if len(batch) != len(TEXT_KEYS):
                raise DataTypeError(
                    f"{self.name}: a batch must be the tuple (input_ids, token_type_ids, "
                    f"attention_mask, labels), got {len(batch)} elements"
                )
            return dict(zip(TEXT_KEYS, batch, strict=True))
        return batch

    def check_batch(self, batch: Any) -> None:
        self.inner.check_batch(self._as_dict(batch))

    def batch_size(self, batch: Any) -> int:
        return self.inner.batch_size(self._as_dict(batch))

    def output(self, forward: Forward, batch: Any) -> Tensor:
        return self.inner.output(forward, self._as_dict(batch))

    def out_to_loss(self, forward: Forward, batch: Any) -> Tensor:
        batch = self._as_dict(batch)
        q = self.inner.out_to_loss(forward, batch)
        if self.temperature == 1.0:
            return q
        logits = self.inner._logits(forward, batch).float() / self.temperature
        labels = batch["labels"].long()
        return 1 - torch.softmax(logits, dim=-1)[torch.arange(len(labels)), labels]

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": self.name, "label_key": "labels", "batch": "traker tuple"}
        if self.temperature != 1.0:
            spec["temperature"] = self.temperature
        return spec


class _ModelCall(nn.Module):
    """Stands in for the model in a traker model output: calling it (directly or through
    ``torch.func.functional_call`` with empty weights) runs fasttrak's ``forward``, i.e. the
    model with the weights being differentiated."""

    _call: Forward

    def __init__(self, forward: Forward) -> None:
        super().__init__()
        object.__setattr__(self, "_call", forward)  # not a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)


class ModelOutputTask:
    """A fasttrak :class:`~fasttrak.tasks.Task` made of a traker model output object.

    Runs under fasttrak's vmap engine (each example alone, as traker's functional gradient
    computer does): :meth:`output` receives batches of one example and calls
    ``get_output(model, {}, {}, *example)`` with the batch dimension removed.
    """

    def __init__(self, modelout: Any) -> None:
        for method in ("get_output", "get_out_to_loss_grad"):
            if not callable(getattr(modelout, method, None)):
                raise ConfigTypeError(
                    f"task object {type(modelout).__name__} has no {method}() method; pass a "
                    "subclass of AbstractModelOutput, or one of the task names "
                    f"{sorted(TASK_TO_MODELOUT)}"
                )
        self.modelout = modelout

    @property
    def name(self) -> str:
        return f"traker_model_output:{_qualname(self.modelout)}"

    def check_batch(self, batch: Any) -> None:
        if not isinstance(batch, (tuple, list)) or not batch:
            raise DataTypeError(
                f"{_qualname(self.modelout)}: traker batches are sequences of tensors (e.g. "
                f"[images, labels]), got {type(batch).__name__}"
            )
        sizes = {t.shape[0] for t in batch if isinstance(t, Tensor) and t.ndim}
        if len(sizes) != 1:
            raise DataTypeError(
                f"{_qualname(self.modelout)}: every element of a batch must be a tensor with "
                f"the examples along dimension 0; got leading sizes {sorted(sizes)}"
            )

    def batch_size(self, batch: Any) -> int:
        return int(next(t.shape[0] for t in batch if isinstance(t, Tensor) and t.ndim))

    def output(self, forward: Forward, batch: Any) -> Tensor:
        model = _ModelCall(forward)
        size = self.batch_size(batch)
        outs = []
        for i in range(size):  # under the vmap engine: one example (size 1)
            example = [tree_map(lambda t, i=i: t[i], t) for t in batch]
            out = self.modelout.get_output(model, {}, {}, *example)
            outs.append(torch.as_tensor(out).reshape(()))
        return torch.stack(outs).float()

    def out_to_loss(self, forward: Forward, batch: Any) -> Tensor:
        q = self.modelout.get_out_to_loss_grad(_ModelCall(forward), {}, {}, list(batch))
        q = torch.as_tensor(q).detach().float().reshape(-1)
        if q.shape[0] != self.batch_size(batch):
            raise ConfigError(
                f"{_qualname(self.modelout)}.get_out_to_loss_grad returned {q.shape[0]} values "
                f"for a batch of {self.batch_size(batch)}; return one per example, (B,) or (B, 1)"
            )
        return q

    def spec(self) -> dict[str, Any]:
        return {"name": "traker_model_output", "class": _qualname(self.modelout)}


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def as_task(task: Any) -> tuple[AbstractModelOutput | Any, Task | None]:
    """traker's ``task=`` argument as (the model output object, its fasttrak task).

    The task is None while it cannot be built yet (CLIP before ``get_embeddings``)."""
    if isinstance(task, str):
        if task not in TASK_TO_MODELOUT:
            raise ConfigError(
                f"unknown task {task!r}; use one of {sorted(TASK_TO_MODELOUT)} or pass an "
                "instance of a subclass of AbstractModelOutput "
                "(from fasttrak.compat.trak.modelout_functions import AbstractModelOutput)"
            )
        task = TASK_TO_MODELOUT[task]()
    if isinstance(task, type):
        raise ConfigTypeError(
            f"task={task.__name__} is a class; pass an instance: {task.__name__}()"
        )
    if isinstance(task, CLIPModelOutput) and task.negatives is None:
        return task, None
    if isinstance(task, AbstractModelOutput):
        return task, task.fasttrak_task()
    if isinstance(task, Task) and not hasattr(task, "get_output"):
        return task, task  # a fasttrak task, given directly
    return task, ModelOutputTask(task)  # duck-typed traker model output (e.g. trak's own)
