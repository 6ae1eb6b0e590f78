"""Exceptions raised by fasttrak. Every message says what is wrong and how to fix it.

Every error fasttrak raises derives from :class:`FastTrakError`, and also from the built-in
exception that fits it (``ValueError``, ``TypeError``, ...), so ``except ft.FastTrakError``
catches all of fasttrak's errors and ``except ValueError`` keeps working.
"""


class FastTrakError(Exception):
    """Base class of fasttrak's own errors."""


# ---------------------------------------------------------------- arguments and inputs
class ConfigError(FastTrakError, ValueError):
    """An argument has a value fasttrak cannot use (a negative ridge, an unknown name...)."""


class ConfigTypeError(FastTrakError, TypeError):
    """An argument has the wrong type (a class where an instance is needed, a float k...)."""


class DataError(FastTrakError, ValueError):
    """The data does not fit the task or the model (label dtype, input shape, empty set)."""


class DataTypeError(FastTrakError, TypeError):
    """The data is of a kind fasttrak cannot read (an iterable dataset, a batch of strings)."""


class DataKeyError(FastTrakError, KeyError):
    """A batch (a dict) lacks a key the task needs; the message names the keys it has."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument (quoted); show the message as written.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class MissingDependencyError(FastTrakError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


# ---------------------------------------------------------------- models and tasks
class UnsupportedModelError(FastTrakError, RuntimeError):
    """The gradient engine cannot run this model as it is (reentrant gradient checkpointing,
    control flow vmap cannot trace); the message names the engine or ``params=`` that works."""


class TaskNotBoundError(FastTrakError, RuntimeError):
    """A task that needs per-checkpoint state (CLIP's negative embeddings) was used before
    ``task.bind(model)``."""


# ---------------------------------------------------------------- numerics
class NonFiniteGradientError(FastTrakError, FloatingPointError):
    """A per-example gradient (or model output) contains NaN or infinity."""


class NumericalError(FastTrakError, FloatingPointError):
    """A numerical stage failed (a kernel that is not positive definite, an overflow)."""


# ---------------------------------------------------------------- checkpoints and runs
class CheckpointMismatchError(FastTrakError, ValueError):
    """A checkpoint does not fit the model, or is not the checkpoint the store was built with."""


class CheckpointNotFoundError(FastTrakError, FileNotFoundError):
    """A checkpoint path does not exist."""


class NotFeaturizedError(FastTrakError, RuntimeError):
    """Scoring was asked for before the training set was featurized."""


# ---------------------------------------------------------------- the store
class StoreError(FastTrakError, OSError):
    """The store cannot be used at this path (a file, a foreign directory, read-only)."""


class StoreMismatchError(FastTrakError, ValueError):
    """A store was reopened with settings that differ from the run that made it."""


class DataMismatchError(StoreMismatchError):
    """The training rows differ from the rows a store was featurized with."""


class StoreCorruptError(FastTrakError, RuntimeError):
    """Stored data failed its integrity check: a checksum, a missing chunk file, damaged
    metadata. The message names the checkpoint, array and chunk, and the command that
    repairs it (``fasttrak repair STORE``, or ``featurize(..., repair=True)``)."""


class StoreBusyError(FastTrakError, RuntimeError):
    """Another process holds what this operation needs (e.g. overwrite=True while another
    process featurizes that checkpoint)."""


class ReadOnlyStoreError(StoreError):
    """A write was needed in a store this process cannot write to."""


class ScoresExistError(FastTrakError, FileExistsError):
    """``Scores.save`` found finished scores of another run at the path."""


class RunnerError(FastTrakError, RuntimeError):
    """A distributed runner (Ray) gave up on a task (its worker died more often than the
    retries allow, or the cluster failed); rerunning the call resumes the work."""
