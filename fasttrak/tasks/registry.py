"""Tasks by name: ``ft.TRAK(model, task="text_classification")`` (the reference ``trak``'s
task strings, plus fasttrak's language-model tasks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fasttrak.errors import ConfigError, ConfigTypeError
from fasttrak.tasks.base import Task
from fasttrak.tasks.classification import ImageClassification
from fasttrak.tasks.language import LanguageModeling, Seq2Seq
from fasttrak.tasks.text import TextClassification


def _clip() -> Task:
    raise ConfigError(
        "task='clip' needs the negative pairs each example is contrasted with: pass "
        "task=ft.tasks.CLIP(negatives=...), a fixed sample of a few hundred training pairs"
    )


TASKS: dict[str, Callable[[], Task]] = {
    "image_classification": ImageClassification,
    "text_classification": TextClassification,
    "language_modeling": LanguageModeling,
    "causal_lm": LanguageModeling,
    "seq2seq": Seq2Seq,
    "clip": _clip,
}
"""Task names and what they build, with default options."""


def resolve_task(task: Any) -> Task:
    """A task object from a name in :data:`TASKS`, a task object, or None (image
    classification: any model mapping inputs to logits)."""
    if task is None:
        return ImageClassification()
    if isinstance(task, str):
        key = task.strip().lower().replace("-", "_")
        if key not in TASKS:
            raise ConfigError(
                f"unknown task {task!r}; use one of {sorted(TASKS)} or a task object such as "
                "ft.tasks.TextClassification(label_key=...)"
            )
        return TASKS[key]()
    if isinstance(task, type):
        raise ConfigTypeError(
            f"task={task.__name__} is a class; pass an instance: {task.__name__}()"
        )
    missing = [m for m in ("output", "out_to_loss", "spec") if not callable(getattr(task, m, None))]
    if missing:
        raise ConfigTypeError(
            f"task= takes a task name ({', '.join(sorted(TASKS))}) or a task object with "
            f"output, out_to_loss and spec methods; {type(task).__name__} lacks {missing}"
        )
    return task
