"""What a runner is, and datasets that are opened where the work runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fasttrak.errors import ConfigTypeError

if TYPE_CHECKING:
    import numpy as np

    from fasttrak.estimator import Estimator
    from fasttrak.scoring import Scores, TopK
    from fasttrak.trak import TRAK, FeaturizePlan, ScorePlan


@runtime_checkable
class Runner(Protocol):
    """Runs the work of a featurize or score call somewhere else (e.g. Ray workers), with
    the same bits as in this process."""

    def featurize(self, trak: TRAK, plan: FeaturizePlan) -> None: ...

    def score(self, trak: TRAK, plan: ScorePlan) -> Scores: ...

    def finalize(self, trak: TRAK, model_ids: list[int], estimator: Estimator) -> None: ...

    def topk(self, scores: Scores, k: int) -> TopK: ...

    def dense(self, scores: Scores) -> np.ndarray:
        """The dense (n_targets, n_train) float32 scores, computed by the runner."""
        ...

    def save_writer(self, scores: Scores) -> Callable[[str, list[int]], None]:
        """A writer for ``Scores.save``: computes and writes these column blocks."""
        ...


def check_runner(runner: Any) -> Runner:
    if isinstance(runner, type):
        raise ConfigTypeError(
            f"runner={runner.__name__} is a class; pass an instance: {runner.__name__}()"
        )
    if not isinstance(runner, Runner):
        raise ConfigTypeError(
            f"runner= takes None (this process) or a runner such as ft.runners.Ray(), "
            f"got {type(runner).__name__}"
        )
    return runner


@dataclass(frozen=True)
class Factory:
    """A dataset made by calling ``function(*args, **kwargs)``: where the work runs (each
    worker opens its own, e.g. files on shared storage) and once in the driver, which
    needs its length and checks its rows. ``featurize(ft.runners.Factory(open_data, path))``."""

    function: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not callable(self.function):
            raise ConfigTypeError(
                f"Factory needs a callable that returns the dataset, got "
                f"{type(self.function).__name__}"
            )
        if not isinstance(self.args, (tuple, list)):
            raise ConfigTypeError(
                f"Factory(function, args) takes the arguments as a tuple: "
                f"Factory(open_data, ({self.args!r},)), got {type(self.args).__name__}"
            )
        object.__setattr__(self, "args", tuple(self.args))

    def __call__(self) -> Any:
        return self.function(*self.args, **self.kwargs)


def as_dataset(data: Any) -> Any:
    """The dataset itself (a :class:`Factory` is called)."""
    return data() if isinstance(data, Factory) else data
