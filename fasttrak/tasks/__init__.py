"""Tasks: *what* is attributed. A task maps (model, batch) to per-example outputs f and
out-to-loss weights Q, written as ordinary batched PyTorch."""

from fasttrak.tasks.base import Task, bind_task
from fasttrak.tasks.classification import ImageClassification
from fasttrak.tasks.clip import CLIP
from fasttrak.tasks.language import LanguageModeling, Seq2Seq, labels_after_prompt
from fasttrak.tasks.registry import TASKS, resolve_task
from fasttrak.tasks.text import TextClassification

__all__ = [
    "Task",
    "bind_task",
    "ImageClassification",
    "TextClassification",
    "LanguageModeling",
    "Seq2Seq",
    "labels_after_prompt",
    "CLIP",
    "TASKS",
    "resolve_task",
]
