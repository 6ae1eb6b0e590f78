"""The Ray runner: featurize and score as tasks on a Ray cluster, writing into one store.

A featurize call becomes (model id, row chunks) tasks: each worker rebuilds the ``TRAK``
object from its constructor's arguments and runs ``featurize`` on its chunks with the same
checkpoint, which claims them through the store (docs/store.md), so a retried or duplicated
task never writes a chunk twice and the store holds the same bits as an in-process run. A
score call becomes one task per model id: its kernel factor (cached in the store) and the
targets' features, solved; the driver averages them as ``Scores``. A finalize call becomes
(model id, group of row chunks) tasks, each a partial gram that the driver sums in order.
Ray retries a task whose worker dies; a task that raises (bad input) stops the run with its
own error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from fasttrak.ensembles import DropoutMask
from fasttrak.errors import ConfigError, FastTrakError, MissingDependencyError, RunnerError
from fasttrak.validation import positive_int

if TYPE_CHECKING:
    from torch import Tensor

    from fasttrak.estimator import Estimator
    from fasttrak.scoring import Scores, TopK
    from fasttrak.trak import TRAK, FeaturizePlan, ScorePlan, _Checkpoint


def _ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise MissingDependencyError(
            "ft.runners.Ray needs Ray: pip install 'fasttrak[ray]' (or pip install ray)"
        ) from error
    return ray


@dataclass(frozen=True)
class Ray:
    """Run featurize and score on Ray.

    address: the cluster to join (``"auto"``, ``"ray://host:10001"``); None starts (or
        reuses) a local Ray on this machine.
    num_cpus, num_gpus: resources of each task (a GPU per task: ``num_gpus=1``; the model
        then runs on the device the ``TRAK`` object was built with, e.g. ``"cuda"``).
    max_retries: how often Ray reruns a task whose worker died.
    chunks_per_task: row chunks per featurize, top-k or save task (more: less overhead
        per task).
    init: further keywords of ``ray.init`` (e.g. ``num_cpus=2`` for a local Ray,
        ``runtime_env``).
    The store must be a path every worker can reach (local disk for a local Ray, shared
    storage such as NFS for a cluster).
    """

    address: str | None = None
    num_cpus: float = 1
    num_gpus: float = 0
    max_retries: int = 3
    chunks_per_task: int = 1
    init: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive_int("chunks_per_task", self.chunks_per_task)
        if self.max_retries < 0 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("max_retries, num_cpus and num_gpus must be >= 0")

    # ------------------------------------------------------------------ featurize
    def featurize(self, trak: TRAK, plan: FeaturizePlan) -> None:
        ray = self._connect(trak.store.location)
        store = trak.store
        tasks: list[tuple[int, list[int]]] = []
        for m, ckpt in zip(plan.ids, plan.checkpoints, strict=True):
            if plan.pending[m] == []:
                continue
            # Create (or, with overwrite=True, replace) the model here, once: workers then
            # only resume features of these weights.
            with store.writing(m, ckpt.fingerprint, plan.overwrite) as stored:
                todo = plan.todo(m, stored.pending_chunks)
            tasks.extend((m, group) for group in self._groups(todo))
        if not tasks:
            return
        options = ray.put(_worker_options(trak))
        data = ray.put(plan.train_set)
        checkpoints = {
            m: ray.put(_portable(ckpt)) for m, ckpt in zip(plan.ids, plan.checkpoints, strict=True)
        }
        remote = self._remote(ray, _featurize_task)
        batch_size = plan.data.batch_size
        refs = {}
        for m, chunks in tasks:
            ref = remote.remote(options, data, checkpoints[m], m, chunks, batch_size)
            refs[ref] = sum(_rows(store, c) for c in chunks)
        bar = tqdm(
            total=sum(refs.values()),
            desc=f"featurize ({len(tasks)} Ray tasks)",
            unit="ex",
            disable=not trak.show_progress,
        )
        with bar:
            self._gather(ray, refs, bar.update)

    # ------------------------------------------------------------------ score
    def score(self, trak: TRAK, plan: ScorePlan) -> Scores:
        from fasttrak.scoring import Scores

        ray = self._connect(trak.store.location)
        if trak.store.writable:  # the grams as parallel partials, cached for the solve tasks
            self.finalize(trak, list(plan.ids), plan.estimator)
        options = ray.put(_worker_options(trak))
        targets = ray.put(plan.targets)
        remote = self._remote(ray, _solve_task)
        refs = {
            remote.remote(
                options,
                targets,
                _portable(ckpt),
                m,
                plan.estimator,
                plan.target_rows.batch_size,
            ): i
            for i, (m, ckpt) in enumerate(zip(plan.ids, plan.checkpoints, strict=True))
        }
        solved: dict[int, Tensor] = {}
        bar = tqdm(
            total=len(refs), desc="score (Ray tasks)", unit="model", disable=not trak.show_progress
        )
        with bar:
            self._gather(ray, refs, lambda i: bar.update(1), results=solved)
        return Scores(
            list(zip(plan.stored, plan.records, strict=True)),
            [solved[i] for i in range(len(plan.ids))],
            single_model_ridge=plan.estimator.single_model,
        )

    # ------------------------------------------------------------------ top-k
    def topk(self, scores: Scores, k: int) -> TopK:
        """Top-k over row chunks in parallel: each task scores ``chunks_per_task`` chunks
        (reading the features on the worker) and keeps their top k; merged exactly."""
        from fasttrak.scoring import TopK

        store = scores._models[0][0].store
        ray = self._connect(store.location)
        shipped, remote = ray.put(scores), self._remote(ray, _topk_task)
        groups = self._groups(list(range(store.num_chunks)))
        refs = {remote.remote(shipped, k, group): i for i, group in enumerate(groups)}
        parts: dict[int, TopK] = {}
        self._gather(ray, refs, lambda i: None, results=parts)
        return TopK.merge([parts[i] for i in sorted(parts)], k)

    def dense(self, scores: Scores) -> np.ndarray:
        """The dense (n_targets, n_train) float32 scores, row chunks computed by workers in
        groups of ``chunks_per_task`` (each reading its features), assembled here."""
        store = scores._models[0][0].store
        ray = self._connect(store.location)
        shipped, remote = ray.put(scores), self._remote(ray, _dense_task)
        groups = self._groups(list(range(store.num_chunks)))
        tasks = [remote.remote(shipped, group) for group in groups]
        refs = {ref: i for i, ref in enumerate(tasks)}
        out = np.empty(scores.shape, dtype=np.float32)

        def fill(i: int) -> None:  # as each task finishes: its blocks into place
            for rows, block in ray.get(tasks[i]):
                out[:, rows] = block

        self._gather(ray, refs, fill)
        return out

    def save_writer(self, scores: Scores) -> Callable[[str, list[int]], None]:
        def write(path: str, blocks: list[int]) -> None:
            ray = self._connect(scores._models[0][0].store.location)
            shipped, remote = ray.put(scores), self._remote(ray, _save_task)
            groups = self._groups(blocks)
            refs = {remote.remote(shipped, path, group): i for i, group in enumerate(groups)}
            self._gather(ray, refs, lambda i: None)

        return write

    # ------------------------------------------------------------------ finalize
    def finalize(self, trak: TRAK, model_ids: list[int], estimator: Estimator) -> None:
        """Every model's gram as partial grams over groups of row chunks (one task each,
        :func:`fasttrak.estimator.gram_groups`), summed in order by the driver, which then
        factors and caches it: the same bits as an in-process finalize."""
        from fasttrak.estimator import gram_groups, kernel_factor, kernel_weights, needs_gram
        from fasttrak.store.core import complete_models

        ray = self._connect(trak.store.location)
        remote = self._remote(ray, _gram_task)
        location = os.path.abspath(str(trak.store.location))
        stored = [trak.store.model(m) for m in model_ids]
        records = complete_models(stored)
        partials: dict[int, list[Any]] = {}
        refs: dict[Any, int] = {}
        for model, done in zip(stored, records, strict=True):
            if not needs_gram(model, done, estimator):
                continue
            weights = ray.put(kernel_weights(model, done, estimator))  # R^½ (n,), or None
            for chunks in gram_groups(model.num_chunks):
                part = {c: done[c] for c in chunks}
                ref = remote.remote(
                    location, model.model_id, model.fingerprint, part, estimator, chunks, weights
                )
                partials.setdefault(model.model_id, []).append(ref)
                refs[ref] = model.model_id
        bar = tqdm(
            total=len(refs),
            desc="finalize (Ray tasks)",
            unit="task",
            disable=not trak.show_progress,
        )
        with bar:
            self._gather(ray, refs, lambda m: bar.update(1))
        for model, done in zip(stored, records, strict=True):
            mine = partials.get(model.model_id)

            def fetched(*_: Any, mine: list[Any] | None = mine) -> Any:
                return (ray.get(ref) for ref in mine or ())

            kernel_factor(model, done, estimator, trak._factors, fetched if mine else None)

    # ------------------------------------------------------------------ helpers
    def _connect(self, location: str | None) -> Any:
        """Ray, started (or joined) for a store at ``location``, which workers must reach."""
        if location is None:
            raise ConfigError(
                "ft.runners.Ray writes into the store from its workers: build the TRAK object "
                "with store= a directory every worker can reach (not store=None)"
            )
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.address, **{"log_to_driver": False, **self.init})
        return ray

    def _remote(self, ray: Any, function: Callable[..., Any]) -> Any:
        """``function`` as a Ray task with this runner's resources and retries."""
        return ray.remote(function).options(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries
        )

    def _groups(self, items: list[int]) -> list[list[int]]:
        """``items`` in runs of ``chunks_per_task``: one task each."""
        step = self.chunks_per_task
        return [items[i : i + step] for i in range(0, len(items), step)]

    @staticmethod
    def _gather(
        ray: Any, refs: dict[Any, Any], done: Any, results: dict[Any, Any] | None = None
    ) -> None:
        """Wait for every task; on the first failure cancel the rest and raise its cause
        (the task's own error), or RunnerError when Ray itself gave up."""
        pending = dict(refs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                key = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except Exception as error:
                    for other in pending:
                        ray.cancel(other, force=True)
                    cause = getattr(error, "cause", None)
                    if isinstance(cause, Exception):
                        # Re-raise the error the task raised, as it raised it (a DataError of
                        # the user's rows, say), not Ray's wrapper around its traceback.
                        error = cause
                        raise error from None
                    if isinstance(error, FastTrakError):
                        raise
                    raise RunnerError(
                        f"a Ray task failed and was not retried further: {error}. Rerun the "
                        "same call: finished chunks are kept and only the rest is computed"
                    ) from error
                if results is not None:
                    results[key] = value
                done(key)


def _rows(store: Any, c: int) -> int:
    rows = store.chunk_slice(c)
    return rows.stop - rows.start


def _portable(ckpt: _Checkpoint) -> Any:
    """A checkpoint a worker loads to the same weights (and dropout member)."""
    return ckpt.state if ckpt.mask is None else DropoutMask(ckpt.state, ckpt.mask)


def _worker_options(trak: TRAK) -> dict[str, Any]:
    """The constructor's arguments for a worker: the store as an absolute path (a worker's
    working directory is not the driver's), no progress bars."""
    store = os.path.abspath(str(trak.store.location))
    return {**trak.options, "store": store, "progress": False}


def _featurize_task(
    options: dict[str, Any],
    data: Any,
    checkpoint: Any,
    model_id: int,
    chunks: list[int],
    batch_size: int,
) -> int:
    """One Ray task: featurize ``chunks`` of one model into the shared store."""
    from fasttrak.trak import TRAK

    trak = TRAK(**options)
    trak.featurize(
        data,
        checkpoints=[checkpoint],
        model_ids=[model_id],
        rows=chunks,
        batch_size=batch_size,
        check_data="sample",
    )
    return len(chunks)


def _gram_task(
    location: str,
    model_id: int,
    fingerprint: str,
    records: dict[int, Any],
    estimator: Estimator,
    chunks: range,
    weights: Any,
) -> Any:
    """One Ray task: the partial gram (k, k) float64 of some row chunks of one model, read
    (and verified against the driver's chunk records) from the store at ``location``."""
    from fasttrak.estimator import partial_gram
    from fasttrak.store.core import ModelStore, Store

    model = ModelStore(Store.open_existing(location), model_id, fingerprint)
    return partial_gram(model, records, estimator.for_dim(model.store.k), chunks, weights)


def _topk_task(scores: Scores, k: int, chunks: list[int]) -> TopK:
    """One Ray task: the top k of some row chunks (all their rows when they have fewer)."""
    return scores.topk(k, rows=chunks)


def _dense_task(scores: Scores, chunks: list[int]) -> list[tuple[slice, Any]]:
    """One Ray task: the score columns (n_targets, rows) of some row chunks."""
    skip = set(range(scores._models[0][0].num_chunks)) - set(chunks)
    return list(scores.chunks(skip))


def _save_task(scores: Scores, path: str, blocks: list[int]) -> int:
    """One Ray task: compute and write these column blocks of a parallel ``Scores.save``."""
    from fasttrak.store.saved import write_blocks

    skip = set(range(scores._models[0][0].num_chunks)) - set(blocks)
    write_blocks(path, scores._chunk_scores(skip))
    return len(blocks)


def _solve_task(
    options: dict[str, Any],
    targets: Any,
    checkpoint: Any,
    model_id: int,
    estimator: Any,
    batch_size: int,
) -> Tensor:
    """One Ray task: one model's factor (built or read from the store) and solved targets."""
    from fasttrak.trak import TRAK

    trak = TRAK(**options)
    plan = trak._score_plan(targets, [checkpoint], batch_size, [model_id], estimator, None)
    return trak._solve(plan, 0)
