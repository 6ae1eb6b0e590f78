"""fasttrak: fast, resumable TRAK data attribution with built-in evaluation.

import fasttrak as ft
trak = ft.TRAK(model, task=ft.tasks.ImageClassification(), proj_dim=2048, store="runs/x")
trak.featurize(train_set, checkpoints=[ckpt0, ckpt1])
scores = trak.score(target_set)      # ft.Scores, np.asarray(scores): (n_targets, n_train)
"""

from fasttrak import cleaning, evaluate, projection, report, runners, tasks
from fasttrak.ensembles import DropoutMask, dropout_ensemble
from fasttrak.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    ConfigTypeError,
    DataError,
    DataKeyError,
    DataMismatchError,
    DataTypeError,
    FastTrakError,
    MissingDependencyError,
    NonFiniteGradientError,
    NotFeaturizedError,
    NumericalError,
    ReadOnlyStoreError,
    RunnerError,
    ScoresExistError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    TaskNotBoundError,
    UnsupportedModelError,
)
from fasttrak.estimator import Estimator
from fasttrak.kernel import SaturationWarning
from fasttrak.scoring import SavedScores, Scores, TopK, soft_threshold
from fasttrak.shards import Shard, shard
from fasttrak.store.api import load_scores, repair_store, store_info, verify_store
from fasttrak.trak import TRAK, Features

__version__ = "0.1.0"

__all__ = [
    "TRAK",
    "Estimator",
    "Features",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ConfigTypeError",
    "DataError",
    "DataKeyError",
    "DataMismatchError",
    "DataTypeError",
    "FastTrakError",
    "MissingDependencyError",
    "NonFiniteGradientError",
    "NotFeaturizedError",
    "NumericalError",
    "ReadOnlyStoreError",
    "RunnerError",
    "SaturationWarning",
    "SavedScores",
    "Scores",
    "ScoresExistError",
    "Shard",
    "StoreBusyError",
    "StoreCorruptError",
    "StoreError",
    "StoreMismatchError",
    "TaskNotBoundError",
    "TopK",
    "UnsupportedModelError",
    "DropoutMask",
    "dropout_ensemble",
    "cleaning",
    "evaluate",
    "report",
    "load_scores",
    "projection",
    "repair_store",
    "runners",
    "shard",
    "store_info",
    "soft_threshold",
    "tasks",
    "verify_store",
    "__version__",
]
