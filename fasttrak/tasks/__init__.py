"""Tasks: *what* is attributed. A task maps (model, batch) to per-example outputs f and
out-to-loss weights Q, written as ordinary batched PyTorch."""

from fasttrak.tasks.base import Task
from fasttrak.tasks.classification import ImageClassification

__all__ = ["Task", "ImageClassification"]
