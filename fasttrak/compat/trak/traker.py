"""``TRAKer``: traker's class, computed by fasttrak.

Change ``from trak import TRAKer`` to ``from fasttrak.compat.trak import TRAKer``: the same
arguments, methods and save directory semantics; underneath, fasttrak's gradient engines,
projections, store and estimator. See docs/migrating_from_trak.md.

How traker's per-batch calls map onto fasttrak's store (whose unit is a row chunk, written
whole with its data fingerprint, checksums and a done mark):

- ``load_checkpoint(ckpt, model_id)`` registers the model in the store under ``save_dir``
  (its weights' fingerprint: other weights under that id are refused);
- ``featurize(batch, inds=...)`` computes φ and Q of the batch's rows not done yet and writes
  them into a per-(model, chunk) row buffer (:mod:`._buffers`); a chunk whose rows are all
  done is published into the store at once (under the chunk's claim) and its buffer deleted,
  so at most the partly filled chunks live outside the store;
- ``finalize_features`` publishes what is left, names any row that has no features, and
  builds each model's kernel factor (cached in the store);
- ``start_scoring_checkpoint`` / ``score`` fill a per-(experiment, model) target buffer;
  ``finalize_scores`` solves and averages over the models, writes traker's
  ``save_dir/scores/{exp_name}.mmap`` and returns the scores, (n_train, n_targets).

Processes may share one ``save_dir``: one per model id, shards of rows of one model (by
``inds``), shards of targets; every write is either a chunk under its claim or rows of a
buffer, and a killed process loses only the rows it had not flagged done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from fasttrak.checkpoints import fingerprint, load_state
from fasttrak.data import (
    chunk_fingerprint,
    row_hashes,
    to_device,
)
from fasttrak.errors import (
    CheckpointMismatchError,
    ConfigError,
    ConfigTypeError,
    DataError,
    DataMismatchError,
    FastTrakError,
    NonFiniteGradientError,
    NotFeaturizedError,
)
from fasttrak.estimator import FactorCache
from fasttrak.gradients import check_examples_independent
from fasttrak.projection import Identity, ProjectorConfig, resolve_projector
from fasttrak.projection.dense import Dense
from fasttrak.scoring import Scores
from fasttrak.shards import ranges
from fasttrak.store import ModelStore, Store
from fasttrak.store.files import held
from fasttrak.tasks import Task
from fasttrak.tasks.base import bind_task
from fasttrak.trak import TRAK
from fasttrak.validation import is_int

from ._buffers import RowBuffer, locked, remove, write_json_atomic
from ._estimator import Solver, solver
from .gradient_computers import FunctionalGradientComputer
from .modelout_functions import AbstractModelOutput, ModelOutputTask, as_task
from .projectors import AbstractProjector, NoOpProjector
from .savers import ModelIDException

logger = logging.getLogger("fasttrak.compat.trak")

STORE = "store"
BUFFERS = "buffers"
EXPERIMENTS = "experiments.json"


class UsageError(FastTrakError, AssertionError):
    """A TRAKer method called out of order or with arguments traker asserts against
    (an AssertionError, as traker raises, and a fasttrak error)."""


class UnfinishedFeaturesError(ModelIDException, NotFeaturizedError):
    """A model's training rows are not all featurized (names the rows)."""


@dataclass
class _Loaded:
    """The checkpoint a TRAKer works with: model id, weights on the device, fingerprint,
    the task bound to them, and whether the first batch was checked."""

    model_id: int
    state: dict[str, Tensor]
    fingerprint: str
    task: Task
    checked: bool = False


class TRAKer:
    """traker's ``TRAKer`` on fasttrak (same arguments and methods; see the module doc).

    Arguments with no meaning here are accepted and noted in the log (logger
    ``fasttrak.compat.trak``): ``gradient_computer``, ``saver``, ``score_computer``,
    ``proj_max_batch_size``, ``load_from_save_dir=False``. ``use_half_precision=True``
    (traker's default) stores the features as float16; kernels and scores are always
    computed in float32 products summed in float64. ``projector=None`` is a dense Rademacher
    projection (traker's on GPU; traker uses a Gaussian one on CPU); a fasttrak projector
    name or config (``"srht"``) may be given instead of traker's projector objects.
    """

    def __init__(
        self,
        model: nn.Module,
        task: AbstractModelOutput | str,
        train_set_size: int,
        save_dir: str | Path = "./trak_results",
        load_from_save_dir: bool = True,
        device: str | torch.device = "cuda",
        gradient_computer: Any = FunctionalGradientComputer,
        projector: AbstractProjector | str | ProjectorConfig | None = None,
        saver: Any = None,
        score_computer: Any = None,
        proj_dim: int = 2048,
        logging_level: int = logging.INFO,
        use_half_precision: bool = True,
        proj_max_batch_size: int = 32,
        projector_seed: int = 0,
        grad_wrt: Sequence[str] | None = None,
        lambda_reg: float = 0.0,
    ) -> None:
        logger.setLevel(logging_level)
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not is_int(train_set_size) or train_set_size < 1:
            raise ConfigError(
                f"train_set_size must be a positive integer (the number of training examples), "
                f"got {train_set_size!r}"
            )
        if (
            isinstance(lambda_reg, bool)
            or not isinstance(lambda_reg, (int, float, np.integer, np.floating))
            or not math.isfinite(lambda_reg)
            or lambda_reg < 0
        ):
            raise ConfigError(f"lambda_reg must be a finite number >= 0, got {lambda_reg!r}")
        if not is_int(projector_seed):
            raise ConfigTypeError(f"projector_seed must be an integer, got {projector_seed!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"device={str(device)!r} but torch finds no CUDA device; pass device='cpu' "
                "(traker's default device is 'cuda')"
            )
        _note_ignored(
            gradient_computer, saver, score_computer, proj_max_batch_size, load_from_save_dir
        )
        self.model = model
        self.train_set_size = int(train_set_size)
        self.lambda_reg = float(lambda_reg)
        self.grad_wrt = None if grad_wrt is None else list(grad_wrt)
        self.use_half_precision = bool(use_half_precision)
        self.dtype = torch.float16 if use_half_precision else torch.float32
        self.task, self._task = as_task(task)
        self.projector = projector
        self._projection, self.proj_dim, self._random = _projection(projector, proj_dim)
        self.proj_seed = int(
            getattr(projector, "seed", projector_seed)
            if projector is not None and not isinstance(projector, (str, ProjectorConfig))
            else projector_seed
        )
        self.save_dir = Path(save_dir).resolve()
        self.load_from_save_dir = load_from_save_dir
        try:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create save_dir {self.save_dir}: {error}") from error
        self._engine: TRAK | None = None
        self._current: _Loaded | None = None
        self._scoring: tuple[str, int, _Loaded, RowBuffer] | None = None
        self._published: dict[int, set[int]] = {}
        self._factors: FactorCache = {}
        self._solvers: dict[tuple[int, str], Solver] = {}
        self._last_ind = 0
        self._last_ind_target = 0
        self.ckpt_loaded: Any = "no ckpt loaded"
        self.scores: np.ndarray | None = None
        if self._task is not None:
            self._build_engine()

    # ------------------------------------------------------------------ set-up
    def _build_engine(self) -> TRAK:
        if self._task is None:
            self._task = self.task.fasttrak_task()  # raises naming the fix (CLIP negatives)
        engine = TRAK(
            self.model,
            task=self._task,
            proj_dim=self.proj_dim,
            projector=self._projection,
            store=self.save_dir / STORE,
            device=self.device,
            seed=self.proj_seed,
            params=self.grad_wrt,
            feature_dtype="float16" if self.use_half_precision else "float32",
            kernel="plain",
            ridge=0.0,
            kernel_blocks=1,
            engine="vmap" if isinstance(self._task, ModelOutputTask) else "auto",
            progress=False,
        )
        engine.store.set_num_train(self.train_set_size)
        self.num_params_for_grad = sum(engine.param_numels.values())
        grad_dim = getattr(self.projector, "grad_dim", 0)
        if (
            isinstance(self.projector, AbstractProjector)
            and grad_dim
            and grad_dim != self.num_params_for_grad
        ):
            raise ConfigError(
                f"{type(self.projector).__name__}(grad_dim={grad_dim}) but the model has "
                f"{self.num_params_for_grad} parameters to differentiate"
                f"{'' if self.grad_wrt is None else ' (grad_wrt)'}; pass "
                f"grad_dim={self.num_params_for_grad}"
            )
        self.proj_dim = engine.k
        self._engine = engine
        logger.info(
            "fasttrak TRAKer: k = %d, %s projection, p = %d, store %s",
            engine.k,
            engine.layout.spec.get("kind"),
            self.num_params_for_grad,
            engine.store.location,
        )
        return engine

    def _require_engine(self) -> TRAK:
        return self._engine if self._engine is not None else self._build_engine()

    def _store(self) -> Store:
        if self._engine is not None:
            return self._engine.store
        path = self.save_dir / STORE
        if not path.exists():
            raise ModelIDException(
                f"nothing is featurized in {self.save_dir}: call traker.load_checkpoint(...) and "
                "traker.featurize(...) first"
            )
        return Store.open_existing(path)

    @property
    def lambda_store(self) -> float:
        """``lambda_reg`` in the units of the stored features. traker's features are the
        projected gradients divided by √p (p: parameters differentiated), its random
        projections unscaled (±1 or N(0, 1) entries), while fasttrak's are scaled by 1/√k
        (and ``"identity"`` is the gradient itself): traker's φ = c · fasttrak's φ with c² = k/p
        for a projection and 1/p without one; the estimator is the same with λ / c²."""
        engine = self._require_engine()
        p = self.num_params_for_grad
        scale = engine.k / p if self._random else 1.0 / p
        return self.lambda_reg / scale

    # ------------------------------------------------------------------ featurize
    def load_checkpoint(
        self,
        checkpoint: Any,
        model_id: int,
        _allow_featurizing_already_registered: bool = False,
    ) -> None:
        """Load ``checkpoint`` (a state dict, path or module) as model ``model_id``: later
        :meth:`featurize` calls compute its features. Like traker, the weights are also
        loaded into ``traker.model`` (in eval mode). Reloading a registered model id resumes
        it; other weights under a registered id are an error."""
        m = _model_id(model_id)
        engine = self._require_engine()
        loaded = self._load(checkpoint, m)
        try:
            with engine.store.writing(m, loaded.fingerprint):
                pass
        except CheckpointMismatchError as error:
            raise CheckpointMismatchError(
                f"model id {m} in {self.save_dir} was featurized from other weights; use another "
                "model_id for these weights, or a new save_dir"
            ) from error
        self._current = loaded
        self._last_ind = 0
        self.ckpt_loaded = m

    def featurize(self, batch: Any, inds: Any = None, num_samples: int | None = None) -> int | None:
        """Compute φ and Q of a batch of training examples for the loaded checkpoint and keep
        them at rows ``inds`` (or the next ``num_samples`` rows). Rows already featurized for
        this model are skipped (returns 0 when all are)."""
        if self._current is None:
            raise UsageError(
                "Load a checkpoint using traker.load_checkpoint before featurizing: "
                "traker.load_checkpoint(checkpoint, model_id=...)"
            )
        current = self._current
        engine = self._require_engine()
        rows, self._last_ind = _rows(
            inds, num_samples, self._last_ind, self.train_set_size, "train_set_size", "featurize"
        )
        batch = self._check(batch, len(rows), current, "featurize")
        m, store = current.model_id, engine.store
        todo = self._train_todo(m, rows)
        if not todo.any():
            logger.debug("all rows of this batch are featurized already")
            return 0
        if not todo.all():
            batch, rows = _take(batch, len(todo), todo), rows[todo]
        phi, q = self._features(current, batch, rows)
        hashes = row_hashes(batch, rows)
        chunk_rows = store.chunk_rows
        chunks = rows // chunk_rows
        finished = []
        for c in np.unique(chunks):
            c = int(c)
            span = store.chunk_slice(c)
            where = chunks == c
            buffer = RowBuffer.open(
                self._train_buffer(m, c), span.stop - span.start, engine.k, create=True
            )
            assert buffer is not None
            buffer.write(rows[where] - span.start, phi[where], q[where], hashes[where])
            if buffer.complete():
                finished.append(c)
            buffer.close()
        if finished:
            self._publish(m, current.fingerprint, finished, wait=False)
        return None

    def finalize_features(
        self, model_ids: Sequence[int] | None = None, del_grads: bool = False
    ) -> None:
        """Publish every model's remaining rows into the store, check that every training
        row is featurized (the error names the rows that are not), and build each model's
        kernel factor (cached in the store). ``del_grads`` is accepted: row buffers are
        deleted as soon as their chunk is published."""
        store = self._store()
        ids = self._ids(store, model_ids, "finalizing")
        problems = []
        for m in ids:
            try:
                self._finalize_model(store, m)
            except UnfinishedFeaturesError as error:
                problems.append(str(error))
        self._last_ind = 0
        if problems:
            raise UnfinishedFeaturesError(
                "; ".join(problems) + ". Featurize those rows (traker.load_checkpoint(checkpoint, "
                "model_id=...) then traker.featurize(batch, inds=...)) and finalize again"
            )

    def _finalize_model(self, store: Store, m: int) -> tuple[ModelStore, dict[int, Any], Solver]:
        stored = store.model(m)
        self._publish(m, stored.fingerprint, stored.pending_chunks(), wait=True)
        records = stored.records()
        pending = [c for c in range(stored.num_chunks) if c not in records]
        if pending:
            missing: list[int] = []
            for c in pending:
                span = stored.chunk_slice(c)
                buffer = RowBuffer.open(
                    self._train_buffer(m, c), span.stop - span.start, store.k, create=False
                )
                if buffer is None:
                    missing.extend(range(span.start, span.stop))
                else:
                    missing.extend((buffer.missing() + span.start).tolist())
                    buffer.close()
            raise UnfinishedFeaturesError(
                f"Model ID {m} not fully featurized, not ready for finalizing: training rows "
                f"{ranges(missing)} of {stored.num_rows} have no features"
            )
        key = (m, stored.fingerprint)
        if key not in self._solvers:
            self._solvers[key] = solver(
                stored, records, self.lambda_store, "float32", self._factors
            )
        return stored, records, self._solvers[key]

    # ------------------------------------------------------------------ score
    def start_scoring_checkpoint(
        self, exp_name: str, checkpoint: Any, model_id: int, num_targets: int
    ) -> None:
        """Start (or resume) computing target features of experiment ``exp_name`` for model
        ``model_id``, whose checkpoint must be the one it was featurized with."""
        exp = _exp_name(exp_name)
        if not is_int(num_targets) or num_targets < 1:
            raise ConfigError(f"num_targets must be a positive integer, got {num_targets!r}")
        m = _model_id(model_id)
        engine = self._require_engine()
        if m not in engine.store.model_ids():
            raise ModelIDException(
                f"model ID {m} is not registered in {self.save_dir}, cannot start scoring: "
                f"featurize it first (registered: {engine.store.model_ids()})"
            )
        loaded = self._load(checkpoint, m)
        if engine.store.model(m).fingerprint != loaded.fingerprint:
            raise CheckpointMismatchError(
                f"the checkpoint given for model ID {m} differs from the one its training "
                "features were computed with; pass the same checkpoint to "
                "start_scoring_checkpoint as to load_checkpoint"
            )
        with locked(self.save_dir / BUFFERS / "experiments.lock"):
            experiments = self._experiments()
            known = experiments.get(exp)
            if known is not None and int(known["num_targets"]) != int(num_targets):
                raise ConfigError(
                    f"experiment {exp!r} was started with num_targets={known['num_targets']}, "
                    f"not {num_targets}; use the same number or another exp_name"
                )
            experiments[exp] = {
                "num_targets": int(num_targets),
                "scores_path": str(self._scores_path(exp)),
                "scores_finalized": 0,
            }
            write_json_atomic(self.save_dir / EXPERIMENTS, experiments)
        buffer = RowBuffer.open(
            self._target_buffer(exp, m), int(num_targets), engine.k, create=True
        )
        assert buffer is not None
        self._scoring = (exp, int(num_targets), loaded, buffer)
        self._last_ind_target = 0

    def score(self, batch: Any, inds: Any = None, num_samples: int | None = None) -> None:
        """Compute target features of a batch for the current scoring checkpoint, kept at
        target rows ``inds`` (or the next ``num_samples`` rows)."""
        if self._scoring is None:
            raise UsageError(
                "Start scoring with traker.start_scoring_checkpoint(exp_name, checkpoint, "
                "model_id, num_targets) before traker.score(...)"
            )
        exp, total, current, buffer = self._scoring
        rows, self._last_ind_target = _rows(
            inds, num_samples, self._last_ind_target, total, "num_targets", "score"
        )
        batch = self._check(batch, len(rows), current, "score")
        phi, q = self._features(current, batch, rows)
        buffer.write(rows, phi, q, row_hashes(batch, rows))

    def finalize_scores(
        self, exp_name: str, model_ids: Sequence[int] | None = None, allow_skip: bool = False
    ) -> np.ndarray:
        """Scores of experiment ``exp_name``: (n_train, n_targets) float32, traker's
        orientation, averaged over ``model_ids`` (default: every registered model), also
        saved as ``save_dir/scores/{exp_name}.mmap`` (a .npy file, as traker writes it).
        ``allow_skip``: models without complete target features are skipped with a warning
        instead of an error."""
        exp = _exp_name(exp_name)
        self._last_ind_target = 0
        experiments = self._experiments()
        if exp not in experiments:
            raise ConfigError(
                f"Experiment {exp} does not exist in {self.save_dir}: create it with "
                "traker.start_scoring_checkpoint(exp_name, ...) and traker.score(...) before "
                f"finalizing (experiments: {sorted(experiments)})"
            )
        total = int(experiments[exp]["num_targets"])
        store = self._store()
        ids = self._ids(store, model_ids, "scoring")
        used, solved, first_hashes = [], [], None
        for m in ids:
            buffer = RowBuffer.open(self._target_buffer(exp, m), total, store.k, create=False)
            missing = np.arange(total) if buffer is None else buffer.missing()
            if missing.size:
                message = (
                    f"model ID {m} has no target features of experiment {exp!r} for target rows "
                    f"{ranges(missing.tolist())} of {total}: call traker.start_scoring_checkpoint("
                    f"{exp!r}, checkpoint, {m}, {total}) and traker.score(...) for them"
                )
                if allow_skip:
                    logger.warning("%s; skipping model %d (allow_skip=True)", message, m)
                    continue
                raise ModelIDException(
                    message + ", or pass model_ids= without it (or allow_skip=True)"
                )
            assert buffer is not None
            hashes = np.array(buffer.hashes)
            if first_hashes is None:
                first_hashes = (m, hashes)
            elif not np.array_equal(first_hashes[1], hashes):
                bad = np.flatnonzero(first_hashes[1] != hashes).tolist()
                raise DataMismatchError(
                    f"experiment {exp!r}: target rows {ranges(bad)} differ between model "
                    f"{first_hashes[0]} and model {m} (other data or another order); score the "
                    "same targets at the same rows for every model"
                )
            try:
                stored, records, solve = self._finalize_model(store, m)
            except UnfinishedFeaturesError:
                if not allow_skip:
                    raise
                logger.warning("model %d is not fully featurized; skipping it (allow_skip=True)", m)
                continue
            used.append((stored, records))
            solved.append(solve.solve(torch.from_numpy(np.array(buffer.features))))
            buffer.close()
        if not used:
            raise ModelIDException(f"no model has complete target features of experiment {exp!r}")
        scores = np.ascontiguousarray(np.asarray(Scores(used, solved)).T)
        self._save_scores(exp, scores)
        self.scores = scores
        return scores

    # ------------------------------------------------------------------ helpers
    def _load(self, checkpoint: Any, m: int) -> _Loaded:
        if checkpoint is None:
            raise ConfigError(
                "checkpoint is None; pass a state dict (model.state_dict()) or a path"
            )
        state = load_state(self.model, checkpoint)
        with torch.no_grad():
            self.model.load_state_dict(state, strict=False)
        self.model.eval()
        device_state = {name: t.to(self.device) for name, t in state.items()}
        with torch.no_grad(), _eval(self.model):
            task = bind_task(self._task_or_fail(), self._forward(device_state), self.device)
        return _Loaded(m, device_state, fingerprint(state), task)

    def _task_or_fail(self) -> Task:
        if self._task is None:
            self._require_engine()
        assert self._task is not None
        return self._task

    def _forward(self, state: dict[str, Tensor]) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, state, args, kwargs)

        return forward

    def _check(self, batch: Any, rows: int, current: _Loaded, method: str) -> Any:
        batch = to_device(batch, self.device)
        current.task.check_batch(batch)
        size = current.task.batch_size(batch)
        if size != rows:
            raise DataError(
                f"{method}: the batch holds {size} examples but {rows} rows were given "
                "(inds= or num_samples=); give one row index per example"
            )
        if not current.checked:
            engine = self._require_engine()
            if engine.featurizer(current.model_id).sums_over_batch:
                with torch.no_grad(), _eval(self.model):
                    check_examples_independent(current.task, self._forward(current.state), batch)
            current.checked = True
        return batch

    def _features(
        self, current: _Loaded, batch: Any, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        engine = self._require_engine()
        featurizer = engine.featurizer(current.model_id)
        size = len(rows)
        with _eval(self.model):
            parts = list(
                featurizer.features(current.state, current.task, [(slice(0, size), batch)])
            )
        phi = torch.cat([part[1] for part in parts]).float().cpu()
        q = torch.cat([part[2] for part in parts]).float().cpu()
        for values in (q, phi):
            finite = torch.isfinite(values)
            finite = finite.all(dim=1) if finite.ndim == 2 else finite
            if not finite.all():
                bad = rows[(~finite).numpy()].tolist()
                raise NonFiniteGradientError(
                    f"rows {bad[:10]} have NaN or infinite outputs or gradients for model "
                    f"{current.model_id}; check those examples' inputs and that the checkpoint "
                    "has not diverged"
                )
        return phi.numpy(), q.numpy()

    def _train_todo(self, m: int, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` still need features for model m."""
        engine = self._require_engine()
        store = engine.store
        published = self._published.setdefault(m, set())
        todo = np.ones(len(rows), dtype=bool)
        chunks = rows // store.chunk_rows
        stored = store.model(m)
        for c in np.unique(chunks):
            c = int(c)
            where = chunks == c
            if c not in published and stored.done(c) is not None:
                published.add(c)
            if c in published:
                todo[where] = False
                continue
            span = store.chunk_slice(c)
            buffer = RowBuffer.open(
                self._train_buffer(m, c), span.stop - span.start, store.k, create=False
            )
            if buffer is not None:
                todo[where] = np.asarray(buffer.done)[rows[where] - span.start] == 0
                buffer.close()
        return todo

    def _publish(self, m: int, fp: str, chunks: Sequence[int], wait: bool) -> None:
        """Write the finished buffers of these chunks of model m into the store."""
        store = self._store()
        published = self._published.setdefault(m, set())
        with store.writing(m, fp) as stored:
            for c in chunks:
                path = self._train_buffer(m, c)
                if stored.done(c) is not None:
                    published.add(c)
                    remove(path)
                    continue
                span = stored.chunk_slice(c)
                buffer = RowBuffer.open(path, span.stop - span.start, store.k, create=False)
                if buffer is None or not buffer.complete():
                    continue
                claim = stored.claim(c, wait=wait)
                if claim is None:  # another process is publishing it
                    continue
                with held(claim):
                    if stored.done(c) is None:
                        stored.write_chunk(
                            c,
                            np.array(buffer.features),
                            np.array(buffer.q),
                            chunk_fingerprint(np.array(buffer.hashes)),
                        )
                buffer.close()
                remove(path)
                published.add(c)

    def _ids(self, store: Store, model_ids: Sequence[int] | None, what: str) -> list[int]:
        registered = store.model_ids()
        if model_ids is None:
            if not registered:
                raise ModelIDException(
                    f"no model is registered in {self.save_dir}: call traker.load_checkpoint("
                    "checkpoint, model_id) and traker.featurize(...) first"
                )
            return registered
        if isinstance(model_ids, (int, np.integer)):
            raise ConfigTypeError(f"model_ids takes a list of model ids: [{model_ids}]")
        ids = [_model_id(m) for m in model_ids]
        unknown = [m for m in ids if m not in registered]
        if unknown:
            raise ModelIDException(
                f"Model IDs {unknown} not registered in {self.save_dir}, not ready for {what} "
                f"(registered: {registered}); featurize them first"
            )
        if not ids:
            raise ConfigError("model_ids is empty; pass at least one model id (or None for all)")
        return ids

    def _experiments(self) -> dict[str, Any]:
        path = self.save_dir / EXPERIMENTS
        if not path.exists():
            return {}
        try:
            value = json.loads(path.read_text())
        except ValueError as error:
            raise ConfigError(f"{path} is not valid JSON ({error}); delete it") from error
        return value if isinstance(value, dict) else {}

    def _scores_path(self, exp: str) -> Path:
        return self.save_dir / "scores" / f"{exp}.mmap"

    def _save_scores(self, exp: str, scores: np.ndarray) -> None:
        path = self._scores_path(exp)
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.parent / f".{path.name}.{id(scores)}.partial"
        out = open_memmap(staged, mode="w+", dtype=np.float32, shape=scores.shape)
        out[:] = scores
        out.flush()
        del out
        staged.replace(path)
        with locked(self.save_dir / BUFFERS / "experiments.lock"):
            experiments = self._experiments()
            if exp in experiments:
                experiments[exp]["scores_finalized"] = 1
                write_json_atomic(self.save_dir / EXPERIMENTS, experiments)
        logger.info("Saving scores in %s", path)

    def _train_buffer(self, m: int, c: int) -> Path:
        return self.save_dir / BUFFERS / "train" / str(m) / str(c)

    def _target_buffer(self, exp: str, m: int) -> Path:
        return self.save_dir / BUFFERS / "targets" / exp / str(m)


# ---------------------------------------------------------------- functions
def _note_ignored(
    gradient_computer: Any, saver: Any, score_computer: Any, proj_max_batch_size: int, load: bool
) -> None:
    name = getattr(gradient_computer, "__name__", type(gradient_computer).__name__)
    if name != "FunctionalGradientComputer":
        logger.info(
            "gradient_computer=%s is ignored: fasttrak picks its gradient engine (hooks for "
            "built-in tasks, torch.func vmap for custom model outputs)",
            name,
        )
    if saver is not None:
        logger.info("saver= is ignored: fasttrak keeps its work in its store under save_dir")
    if score_computer is not None:
        logger.info("score_computer= is ignored: fasttrak computes traker's estimator itself")
    if proj_max_batch_size != 32:
        logger.info("proj_max_batch_size is ignored: fasttrak's projection needs no CUDA batch")
    if not load:
        logger.info(
            "load_from_save_dir=False is ignored: the store under save_dir is always reopened, "
            "checked, and safe for many processes at once"
        )


def _projection(projector: Any, proj_dim: int) -> tuple[ProjectorConfig, int, bool]:
    """(fasttrak projection, proj_dim, whether it is a random projection) of ``projector``."""
    if projector is None:
        return Dense(), _proj_dim(proj_dim), True
    if isinstance(projector, type):
        raise ConfigTypeError(
            f"projector={projector.__name__} is a class; pass an instance, e.g. "
            f"{projector.__name__}(grad_dim=..., proj_dim=..., seed=0, proj_type='rademacher', "
            "device=...)"
        )
    if isinstance(projector, (str, ProjectorConfig)):
        config = resolve_projector(projector)
        return config, _proj_dim(proj_dim), not isinstance(config, Identity)
    if isinstance(projector, NoOpProjector) or type(projector).__name__ == "NoOpProjector":
        return Identity(), 1, False
    if isinstance(projector, AbstractProjector):
        return projector.fasttrak_projector(), _proj_dim(projector.proj_dim), True
    kind = type(projector).__name__  # a projector of the traker package itself
    if kind in (
        "BasicProjector",
        "BasicSingleBlockProjector",
        "CudaProjector",
        "ChunkedCudaProjector",
    ):
        value = getattr(projector, "proj_type", "rademacher")
        value = getattr(value, "value", value)
        return (
            Dense(distribution="gaussian" if value == "normal" else "rademacher"),
            _proj_dim(projector.proj_dim),
            True,
        )
    raise ConfigTypeError(
        f"projector of type {kind} is not supported; pass one of fasttrak.compat.trak."
        "projectors' classes, a fasttrak projector name ('dense', 'srht', 'identity'), or None"
    )


def _proj_dim(proj_dim: Any) -> int:
    if not is_int(proj_dim) or proj_dim < 1:
        raise ConfigError(f"proj_dim must be a positive integer, got {proj_dim!r}")
    return int(proj_dim)


def _model_id(model_id: Any) -> int:
    if not is_int(model_id) or model_id < 0:
        raise ConfigError(f"model_id must be a non-negative integer, got {model_id!r}")
    return int(model_id)


def _exp_name(exp_name: Any) -> str:
    if not isinstance(exp_name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", exp_name):
        raise ConfigError(
            f"exp_name must be a non-empty name of letters, digits, '_', '-' and '.' (it names "
            f"files under save_dir), got {exp_name!r}"
        )
    return exp_name


def _rows(
    inds: Any, num_samples: Any, cursor: int, total: int, size_name: str, method: str
) -> tuple[np.ndarray, int]:
    """The rows of a batch (from ``inds`` or ``num_samples`` after ``cursor``), checked,
    and the cursor after them."""
    if (inds is None) == (num_samples is None):
        raise UsageError(
            f"{method}: Exactly one of num_samples and inds should be specified "
            f"({method}(batch, num_samples=len(batch[0])) or {method}(batch, inds=row_indices))"
        )
    if num_samples is not None:
        if not is_int(num_samples) or num_samples < 1:
            raise ConfigError(
                f"{method}: num_samples must be a positive integer, got {num_samples!r}"
            )
        if cursor + num_samples > total:
            raise DataError(
                f"{method}: num_samples={num_samples} after row {cursor} runs past {size_name}="
                f"{total}; check {size_name}, or pass inds= to place rows explicitly"
            )
        return np.arange(cursor, cursor + int(num_samples)), cursor + int(num_samples)
    if isinstance(inds, Tensor):
        inds = inds.detach().cpu().numpy()
    rows = np.asarray(inds).reshape(-1)
    if rows.size == 0:
        raise ConfigError(f"{method}: inds is empty; give one row index per example of the batch")
    if not np.issubdtype(rows.dtype, np.integer):
        raise ConfigTypeError(f"{method}: inds must be integers, got dtype {rows.dtype}")
    bad = rows[(rows < 0) | (rows >= total)]
    if bad.size:
        raise DataError(
            f"{method}: inds {bad[:10].tolist()} are outside [0, {size_name}={total}); give row "
            f"indices below {total} (or a larger {size_name})"
        )
    if np.unique(rows).size != rows.size:
        raise DataError(f"{method}: inds repeats rows; give each example its own row")
    return rows.astype(np.int64), cursor


def _take(batch: Any, size: int, mask: np.ndarray) -> Any:
    """The rows of a collated batch where ``mask`` is True."""
    index = torch.from_numpy(np.flatnonzero(mask))
    return tree_map(
        lambda t: (
            t[index.to(t.device)] if isinstance(t, Tensor) and t.ndim and t.shape[0] == size else t
        ),
        batch,
    )


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)
