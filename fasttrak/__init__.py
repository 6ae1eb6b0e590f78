"""fasttrak: fast, resumable TRAK data attribution with built-in evaluation.

import fasttrak as ft
trak = ft.TRAK(model, task=ft.tasks.ImageClassification(), proj_dim=2048, store="runs/x")
trak.featurize(train_set, checkpoints=[ckpt0, ckpt1])
scores = trak.score(target_set)      # ft.Scores, np.asarray(scores): (n_targets, n_train)
"""

from fasttrak import evaluate, projection, tasks
from fasttrak.ensembles import DropoutMask, dropout_ensemble
from fasttrak.errors import (
    CheckpointMismatchError,
    FastTrakError,
    NonFiniteGradientError,
    NotFeaturizedError,
    StoreMismatchError,
)
from fasttrak.scoring import Scores, TopK, soft_threshold
from fasttrak.trak import TRAK

__version__ = "0.1.0"

__all__ = [
    "TRAK",
    "CheckpointMismatchError",
    "FastTrakError",
    "NonFiniteGradientError",
    "NotFeaturizedError",
    "Scores",
    "StoreMismatchError",
    "TopK",
    "DropoutMask",
    "dropout_ensemble",
    "evaluate",
    "projection",
    "soft_threshold",
    "tasks",
    "__version__",
]
