"""Exceptions raised by fasttrak. Every message says what is wrong and how to fix it."""


class FastTrakError(Exception):
    """Base class of fasttrak's own errors."""


class StoreMismatchError(FastTrakError, ValueError):
    """A store was reopened with settings that differ from the run that made it."""


class CheckpointMismatchError(FastTrakError, ValueError):
    """A checkpoint does not fit the model, or is not the checkpoint the store was built with."""


class NonFiniteGradientError(FastTrakError, FloatingPointError):
    """A per-example gradient (or model output) contains NaN or infinity."""


class NotFeaturizedError(FastTrakError, RuntimeError):
    """Scoring was asked for before the training set was featurized."""
