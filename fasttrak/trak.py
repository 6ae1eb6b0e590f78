"""``TRAK``: drives featurize, finalize and score over checkpoints and row chunks.

This is the only module that knows models, tasks, projections and the store together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.profiler import record_function
from tqdm.auto import tqdm

from fasttrak import kernel as kernel_ops
from fasttrak.checkpoints import Checkpoint, fingerprint, load_state
from fasttrak.data import Rows, as_rows, chunk_fingerprint, to_device
from fasttrak.deprecation import deprecated
from fasttrak.ensembles import DropoutMask, fixed_dropout
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
from fasttrak.estimator import (
    Estimator,
    FactorCache,
    PartialGrams,
    gram_groups,
    kernel_factor,
    local_partial_grams,
    needs_gram,
    solve_targets,
)
from fasttrak.gradients import (
    GradientMethod,
    ParamSpec,
    check_examples_independent,
    select_parameters,
)
from fasttrak.influence import self_influence
from fasttrak.projection import Featurizer, ProjectorConfig, resolve_projector
from fasttrak.runners.base import Runner, as_dataset, check_runner
from fasttrak.scoring import Scores
from fasttrak.shards import RowChunks, runs, select_chunks
from fasttrak.store import FEATURE_DTYPES, ChunkRecord, ModelStore, Store
from fasttrak.store.core import complete_models
from fasttrak.store.files import held
from fasttrak.store.info import Progress
from fasttrak.store.info import progress as store_progress
from fasttrak.store.verify import repair as repair_store
from fasttrak.tasks import Task
from fasttrak.tasks.base import bind_task
from fasttrak.tasks.registry import resolve_task
from fasttrak.validation import is_int, positive_int

logger = logging.getLogger(__name__)
"""fasttrak's decisions (engine, projection, estimator, work planned) at INFO."""


class TRAK:
    """TRAK attribution for a PyTorch model.

    Args:
        model: the architecture; its weights come from the checkpoints given to
            :meth:`featurize` (the model itself is never modified).
        task: what is attributed: a task object (default
            :class:`~fasttrak.tasks.ImageClassification`) or its name,
            ``"image_classification"``, ``"text_classification"``, ``"language_modeling"``
            (``"causal_lm"``), ``"seq2seq"`` (``"clip"`` needs ``ft.tasks.CLIP(negatives=)``).
        proj_dim: k, the projected feature dimension.
        projector: ``"srht"`` (default: block subsampled randomized Hadamard), ``"sjlt"``
            (sparse JL), ``"dense"`` (Rademacher, the reference TRAK projection),
            ``"factored"`` (per-layer Kronecker, from layer hooks), ``"identity"`` (no
            projection, k = p), or a configured instance such as ``ft.projection.SJLT(s=4)``
            (see docs/projections.md; defaults chosen in docs/lds_vs_cost.md).
        store: a directory for the zarr store (resumable, checksummed, safe for many
            processes at once; see docs/store.md), or None to keep it in memory.
        device: where gradients and projections are computed; on a CUDA device also the
            kernel's linear algebra (:attr:`linalg_device`: the gram, its eigenvalues and
            Cholesky factors in :meth:`finalize`, the targets' solves and the scores'
            chunk products, self-influence), in float64 or with TF32 off; on any other
            device that runs on the CPU.
        seed: seed of the random projection (features are a pure function of it).
        params: which parameters are differentiated: None (all trainable), names or globs,
            submodules or module types.
        batch_size: examples per gradient batch.
        chunk_rows: training rows per store chunk, the unit of resumable work
            (default 512; taken from the store when it exists).
        feature_dtype: ``"float32"`` or ``"float16"`` storage of the features.
        ridge: ``"auto"`` (default: λ at a point of the kernel's spectrum, see
            :class:`~fasttrak.Estimator`) or a relative ridge, λ = ridge · trace(Φᵀ Φ) /
            min(n, k, p).
        precision: ``"float32"`` or ``"float64"`` products when building the kernel
            (always summed in float64); ``"auto"`` (default): float64 for models with
            fewer training rows than k (see :class:`~fasttrak.Estimator`).
        kernel: ``"gauss_newton"`` (default: Φᵀ R Φ with R = (p (1 - p))^γ = (Q (1 - Q))^γ
            per training example, γ = ``weight_power``) or ``"plain"`` (Φᵀ Φ, the paper's).
            Chosen at scoring time: the stored features serve both.
        kernel_blocks: B > 1 keeps B diagonal blocks of the kernel (contiguous coordinate
            groups of k / B) and averages the B estimates, a virtual ensemble. Default:
            blocks of 512 coordinates (k // 512 of them) when k >= 2048, the store has
            at most k / 2 training rows and p >= k attributed parameters, else 1
            (docs/quality.md).
        weight_power: γ in (0, 1] of the Gauss-Newton kernel (default 0.75; 1: the
            Gauss-Newton Hessian, the influence function on logistic regression; see
            :class:`~fasttrak.Estimator` and docs/quality.md, "The kernel").
        engine: how per-example gradients are computed: ``"hooks"`` (one batched forward
            and backward with layer hooks; works on unmodified Hugging Face models with any
            attention implementation; needs examples that do not interact in the forward
            pass, which is checked on the first batch), ``"vmap"`` (``torch.func`` vmap of
            grad over examples, each example alone), or ``"auto"`` (default: hooks). Both
            give the same features to float precision (tests/test_hook_engine.py).
        vmap_chunk_size: examples per vmap call inside a batch: bounds the memory of
            intermediate activations for large batches (None: the whole batch at once).
            Chunking costs speed (2x for a small MLP at chunk 32), so the default 128 leaves
            the default batch of 64 whole.
        progress: show progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task | str | None = None,
        proj_dim: int = 2048,
        projector: str | ProjectorConfig = "srht",
        store: str | Path | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        params: ParamSpec = None,
        batch_size: int = 64,
        chunk_rows: int | None = None,
        feature_dtype: str = "float32",
        ridge: kernel_ops.Ridge = kernel_ops.DEFAULT_RIDGE,
        precision: Literal["auto", "float32", "float64"] = "auto",
        kernel: kernel_ops.Weighting = "gauss_newton",
        kernel_blocks: int | None = None,
        weight_power: float = kernel_ops.DEFAULT_WEIGHT_POWER,
        engine: str = "auto",
        vmap_chunk_size: int | None = 128,
        progress: bool = True,
    ) -> None:
        self.options = {name: value for name, value in locals().items() if name != "self"}
        """The constructor's arguments (a runner rebuilds this object from them on workers)."""
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(
                f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}"
            )
        proj_dim = positive_int("proj_dim", proj_dim)
        batch_size = positive_int("batch_size", batch_size)
        if chunk_rows is not None:
            chunk_rows = positive_int("chunk_rows", chunk_rows)
        if not is_int(seed):
            raise ConfigTypeError(f"seed must be an integer, got {seed!r}")
        seed = int(seed)
        self.model = model
        self.task: Task = resolve_task(task)
        self.device = torch.device(device)
        self.seed = seed
        self.batch_size = batch_size
        estimator = Estimator(kernel, ridge, kernel_blocks, precision, weight_power)
        self.show_progress = progress
        self.projector_config = resolve_projector(projector)
        self.proj_dim = proj_dim
        self.layout = self.projector_config.layout(
            model, select_parameters(model, params), proj_dim
        )
        self.params = self.layout.params
        """The attributed parameters, in feature order."""
        self.excluded = self.layout.excluded
        """Selected parameters the projector leaves out (``Factored(others="exclude")``)."""
        named = dict(model.named_parameters())
        self.param_numels = {name: named[name].numel() for name in self.params}
        self.k = self.layout.k
        self.estimator = estimator.for_dim(self.k)
        """The default estimator of :meth:`score` (``kernel``, ``ridge``, ``kernel_blocks``,
        ``precision``, ``weight_power`` of the constructor)."""
        meta = {
            "task": self.task.spec(),
            "projector": self.layout.spec,
            "seed": seed,
            "k": self.k,
            "params": {name: list(named[name].shape) for name in self.params},
            "feature_dtype": feature_dtype,
        }
        self.gradients = GradientMethod(engine, vmap_chunk_size)
        self.engine = self.gradients.engine
        if store is not None and not isinstance(store, (str, os.PathLike)):
            raise ConfigTypeError(
                f"store= takes a directory path or None (in memory), got {type(store).__name__}"
            )
        if store is not None and not str(store).strip():
            raise ConfigError("store= is an empty path; pass a directory path or None")
        self.store = Store.open(store, meta, chunk_rows=chunk_rows)
        self._checkpoints: dict[int, _Checkpoint] = {}  # by model id, from the last featurize
        self._featurizer_of: tuple[int, Featurizer] | None = None  # only the current model's
        self._factors: FactorCache = {}  # when the store is read-only
        logger.info(
            "TRAK: %d parameters in %d tensors -> k = %d by %s; engine %s on %s; default "
            "estimator %s; store %s (%d rows per chunk, %s features)",
            sum(self.param_numels.values()),
            len(self.params),
            self.k,
            self.layout.spec,
            self.engine,
            self.device,
            self.estimator,
            self.store.location or "in memory",
            self.store.chunk_rows,
            feature_dtype,
        )
        if self.excluded:
            logger.info("parameters left out by the projector: %s", self.excluded)

    @property
    def linalg_device(self) -> torch.device:
        """Where finalize, the score products and self-influence run: :attr:`device` when it
        is a CUDA device, else the CPU (whose results are those of the CPU path bit for bit;
        see :mod:`fasttrak.kernel`)."""
        return kernel_ops.linalg_device(self.device)

    @property
    def selected(self) -> list[str]:
        """Deprecated name of :attr:`params`."""
        deprecated("TRAK.selected", "TRAK.params")
        return self.params

    # ------------------------------------------------------------------ featurize
    def featurize(
        self,
        train_set: Any,
        checkpoints: Sequence[Checkpoint | DropoutMask] | None = None,
        batch_size: int | None = None,
        overwrite: bool = False,
        model_ids: Sequence[int] | None = None,
        repair: bool = False,
        check_data: str = "auto",
        rows: RowChunks = None,
        runner: Runner | None = None,
    ) -> None:
        """Compute and store features Φ_m and Q_m of every training example for each checkpoint.

        Resumable: chunks already finished in the store are skipped. Safe to run in many
        processes at once on one store: each claims the chunks it computes (see
        docs/store.md). A model id that was featurized from other weights is an error
        unless ``overwrite=True``, which deletes those features first (features of the same
        weights are always kept and resumed).

        Args:
            model_ids: the model id each checkpoint is stored under (default 0, 1, ...):
                one job per model, in any order, e.g. ``model_ids=[7]``. The id also
                selects the model's random projection (a pure function of seed and id).
            repair: first verify this run's models in the store and recompute whatever is
                damaged (see :func:`fasttrak.verify_store`).
            check_data: how the training rows are checked against those the store was
                featurized with. ``"auto"`` (default): every chunk when this call computes
                anything (chunks it computes are checked for free, the others by a pass
                over the data without the model), else the first and last chunk; with
                ``rows=`` (a job of an array) as ``"sample"``; ``"full"``: every chunk
                always; ``"sample"``: chunks it computes, plus the first and last chunk.
                The first and last chunk are always checked before anything is written.
                :meth:`check_data` checks every chunk on demand.
            rows: only these row chunks (of ``chunk_rows`` rows each): ``ft.shard(i, n)``
                for job i of an array of n, or chunk indices (a slice, range or list).
                Pass the whole training set: the chunks are cut from it.
            runner: where the work runs: None (this process) or ``ft.runners.Ray(...)``,
                which splits it into (model id, row chunks) tasks on a Ray cluster that
                write into the same store (see docs/scale.md). Same bits either way.
        """
        plan = self._plan(
            train_set, checkpoints, batch_size, overwrite, model_ids, repair, check_data, rows
        )
        for m in plan.ids:
            todo = plan.pending[m]
            logger.info(
                "featurize model %d: %s",
                m,
                "complete"
                if todo == []
                else "pending chunks"
                if todo is None
                else f"{len(todo)} chunks",
            )
        if runner is not None:
            logger.info("featurize on %s", runner)
            check_runner(runner).featurize(self, plan)
        else:
            for m, ckpt in zip(plan.ids, plan.checkpoints, strict=True):
                if plan.pending[m] == []:  # complete from these weights (also read-only stores)
                    continue
                with self.store.writing(m, ckpt.fingerprint, overwrite) as stored:
                    todo = plan.todo(m, stored.pending_chunks)
                    if todo:
                        self._featurize_model(plan.data, stored, ckpt, todo)
        self._checkpoints.update(zip(plan.ids, plan.checkpoints, strict=True))

    def _plan(
        self,
        train_set: Any,
        checkpoints: Sequence[Checkpoint | DropoutMask] | None,
        batch_size: int | None,
        overwrite: bool,
        model_ids: Sequence[int] | None,
        repair: bool,
        check_data: str,
        rows: RowChunks,
    ) -> FeaturizePlan:
        """Check everything and record n; the chunks each model has left to compute."""
        if check_data not in CHECK_DATA:
            raise ConfigError(f"check_data must be one of {CHECK_DATA}, got {check_data!r}")
        data = as_rows(as_dataset(train_set), batch_size or self.batch_size)
        n = len(data)
        if n == 0:
            raise DataError("the training set is empty; pass a dataset with at least one example")
        loaded = self._load_checkpoints(checkpoints)
        ids = _model_ids(model_ids, len(loaded))
        self._check_first_batch(data, loaded[0].state, ids[0])
        if repair:  # first, so that a damaged record of n or of a model is restored too
            report = repair_store(self.store, models=ids)
            if report.problems:
                warnings.warn(f"repaired before featurizing:\n{report}", stacklevel=3)
        self.store.set_num_train(n)  # records n, or raises StoreMismatchError for another n
        chunks = select_chunks(rows, self.store.num_chunks)
        # Chunks left to compute per model: None for a model that is new (or replaced with
        # overwrite=True) and so has all of them. Workers claim each chunk and skip those
        # another process finished meanwhile, so the lists may go stale safely.
        pending = {m: self._pending(m, ckpt, chunks) for m, ckpt in zip(ids, loaded, strict=True)}
        if rows is not None and check_data == "auto":
            check_data = "sample"  # one job of an array: not a pass over the others' rows
        self._check_done_rows(data, pending, chunks, check_data)
        return FeaturizePlan(train_set, data, ids, loaded, pending, chunks, overwrite)

    def _pending(self, m: int, ckpt: _Checkpoint, chunks: list[int]) -> list[int] | None:
        """Model m's unfinished chunks among ``chunks`` if it is stored from these weights,
        else None."""
        if self.store.stored_fingerprint(m) != ckpt.fingerprint:
            return None
        return _among(self.store.model(m).pending_chunks(), chunks)

    def progress(self) -> Progress:
        """Per model id in the store, how many row chunks are featurized and which are
        missing (from any process; ``fasttrak info STORE`` prints the same)."""
        return store_progress(self.store)

    def check_data(self, train_set: Any, batch_size: int | None = None) -> int:
        """Check every chunk of ``train_set`` against the rows the store was featurized with,
        by a pass over the data without the model (the inputs and labels, not the weights).

        Raises DataMismatchError naming the first chunk that differs (other data, another
        order, changed labels); returns the number of chunks checked.
        """
        rows = as_rows(train_set, batch_size or self.batch_size)
        known = self.store.num_train
        if known is None:
            raise NotFeaturizedError("nothing is featurized yet: there is nothing to check")
        if len(rows) != known:
            raise DataMismatchError(
                f"{self.store.where} was featurized on {known} training rows; this data has "
                f"{len(rows)}"
            )
        chunks = self.store.recorded_chunks()
        self._check_rows(rows, chunks)
        return len(chunks)

    def _check_rows(self, rows: Rows, chunks: list[int]) -> None:
        """Fingerprint these chunks of ``rows`` (in runs of adjacent chunks, one pass over the
        data each) and compare them with the store's record, first chunk first."""
        for run in runs(chunks):
            span = slice(self.store.chunk_slice(run[0]).start, self.store.chunk_slice(run[-1]).stop)
            hashes = rows.hashes(span)
            for c in run:
                part = self.store.chunk_slice(c)
                piece = hashes[part.start - span.start : part.stop - span.start]
                self.store.check_rows(c, chunk_fingerprint(piece))

    def _featurize_model(
        self, rows: Rows, stored: ModelStore, ckpt: _Checkpoint, pending: list[int]
    ) -> None:
        """Compute every pending chunk of one model: first those no other process has
        claimed, then (waiting for their claims) those another process was computing."""
        m = stored.model_id
        size = sum(stored.chunk_slice(c).stop - stored.chunk_slice(c).start for c in pending)
        bar = tqdm(
            total=size,
            desc=f"featurize model {m}",
            unit="ex",
            disable=not self.show_progress,
            leave=False,
        )
        with bar, self._eval_mode(), fixed_dropout(self.model, ckpt.mask, self.seed):
            device_state = self._to_device(ckpt.state)
            task = self._bind(device_state)
            waiting = []
            for c in pending:
                claim = stored.claim(c, wait=False)
                if claim is None:  # another process is computing it
                    waiting.append(c)
                    continue
                with held(claim):
                    self._featurize_chunk(rows, stored, c, device_state, task, bar)
            for c in waiting:
                with held(stored.claim(c, wait=True)):
                    self._featurize_chunk(rows, stored, c, device_state, task, bar)

    def _featurize_chunk(
        self,
        rows: Rows,
        stored: ModelStore,
        c: int,
        state: dict[str, Tensor],
        task: Task,
        bar: Any,
    ) -> None:
        """Compute and write chunk c (the caller holds its claim), unless it is done."""
        chunk = stored.chunk_slice(c)
        if stored.done(c) is not None:  # finished by another process meanwhile
            bar.update(chunk.stop - chunk.start)
            return
        phi, q, hashes = self._features(rows, chunk, state, stored.model_id, task, bar)
        with record_function("fasttrak.write"):
            stored.write_chunk(c, phi.cpu().numpy(), q.cpu().numpy(), chunk_fingerprint(hashes))

    def _check_done_rows(
        self,
        data: Rows,
        pending: dict[int, list[int] | None],
        chunks: list[int],
        check_data: str,
    ) -> None:
        """Check the training rows of chunks this call will not compute against the store's
        record of them (DataMismatchError naming the first chunk that differs)."""
        recorded = self.store.recorded_chunks()
        if not recorded:
            return
        computed: set[int] = set()
        for todo in pending.values():
            computed.update(chunks if todo is None else todo)
        others = [c for c in recorded if c not in computed]
        if check_data == "sample" or (check_data == "auto" and not computed):
            others = [c for c in others if c in (recorded[0], recorded[-1])]
        # The first and last chunk are checked before anything is written, even when they
        # are recomputed (where the check is otherwise made as each chunk is written): data
        # that differ throughout are refused before a new model is created.
        others = sorted({*others, recorded[0], recorded[-1]})
        self._check_rows(data, others)

    def features(
        self,
        dataset: Any,
        checkpoint: Checkpoint | DropoutMask | None = None,
        model_id: int = 0,
        batch_size: int | None = None,
    ) -> Features:
        """Features φ (n, k) and Q (n,) of every example of ``dataset`` for one checkpoint,
        with model ``model_id``'s projection: what :meth:`featurize` stores for training
        rows and :meth:`score` computes for targets. Nothing is read from or written to
        the store."""
        if not is_int(model_id) or model_id < 0:
            raise ConfigError(f"model_id must be a non-negative integer, got {model_id!r}")
        rows = as_rows(dataset, batch_size or self.batch_size)
        if len(rows) == 0:
            raise DataError("the dataset is empty; pass at least one example")
        (ckpt,) = self._load_checkpoints([checkpoint])  # type: ignore[list-item]
        self._check_first_batch(rows, ckpt.state, int(model_id))
        with self._eval_mode(), fixed_dropout(self.model, ckpt.mask, self.seed):
            state = self._to_device(ckpt.state)
            everything = slice(0, len(rows))
            phi, q, _ = self._features(
                rows, everything, state, int(model_id), self._bind(state), hashes=False
            )
        return Features(phi.cpu().numpy(), q.cpu().numpy())

    def featurizer(self, model_id: int) -> Featurizer:
        """Model ``model_id``'s projection (built on first use). Only one is held at a
        time: a cached dense matrix can take up to ``cache_bytes`` (1 GiB by default), so
        holding one per model would not scale."""
        if self._featurizer_of is None or self._featurizer_of[0] != model_id:
            self._featurizer_of = None  # release the previous matrix before building the next
            built = self.projector_config.featurizer(
                self.model, self.layout, self.seed, model_id, self.device, self.gradients
            )
            self._featurizer_of = (model_id, built)
        return self._featurizer_of[1]

    def _features(
        self,
        rows: Rows,
        span: slice,
        state: dict[str, Tensor],
        model_id: int,
        task: Task,
        bar: Any = None,
        hashes: bool = True,
    ) -> tuple[Tensor, Tensor, np.ndarray]:
        """Features (rows, k), Q (rows,) and per-row data hashes (rows,; empty when not
        ``hashes``) of one row range for one model, whose weights are ``state`` and whose
        (bound) task is ``task``. Q and the hashes are taken as the featurizer reads each
        batch; non-finite values are errors naming the rows."""
        row_hashes: list[np.ndarray] = [np.zeros(0, dtype=np.uint64)]

        def batches() -> Iterator[tuple[slice, Any]]:
            for where, batch, *batch_hashes in rows.batches(span, with_hashes=hashes):
                row_hashes.extend(batch_hashes)
                batch = to_device(batch, self.device)
                task.check_batch(batch)
                yield where, batch
                if bar is not None:
                    bar.update(where.stop - where.start)

        feats, qs = [], []
        for _, phi, q in self.featurizer(model_id).features(state, task, batches()):
            feats.append(phi)
            qs.append(q)
        # Checked once for the whole range, not per batch: each check reads a device value
        # back (a sync that stalls a GPU between batches); nothing is written before it.
        phi_all, q_all = torch.cat(feats), torch.cat(qs)
        self._check_finite(q_all, span.start, model_id)
        self._check_finite(phi_all, span.start, model_id)
        return phi_all, q_all, np.concatenate(row_hashes)

    @staticmethod
    def _check_finite(values: Tensor, start: int, m: int) -> None:
        """Raise NonFiniteGradientError naming the training rows whose values are NaN/inf."""
        if bool(torch.isfinite(values.sum())):
            return  # one reduction: NaN and inf propagate (an overflow is checked below)
        finite = torch.isfinite(values)
        finite = finite.all(dim=1) if finite.ndim == 2 else finite
        if not finite.all():
            rows_bad = (torch.nonzero(~finite)[:, 0] + start).tolist()
            raise NonFiniteGradientError(
                f"training rows {rows_bad[:10]} have NaN or infinite outputs or gradients for "
                f"model {m}; check those examples' inputs and that the checkpoint has not "
                "diverged (its loss is finite)"
            )

    # ------------------------------------------------------------------ finalize
    def finalize(
        self,
        model_ids: Sequence[int] | None = None,
        estimator: Estimator | None = None,
        *,
        models: Sequence[int] | None = None,
        runner: Runner | None = None,
    ) -> None:
        """Build (or load) the kernel factor of every model in the store (or of
        ``model_ids``) for ``estimator`` (default :attr:`estimator`), each in one pass over
        its stored features, on :attr:`linalg_device` (a CUDA device, or the CPU); with
        ``runner=ft.runners.Ray(...)`` that pass is split into partial-gram tasks of 16 row
        chunks each, computed on the CPU of the tasks and summed in order (the same bits as
        an in-process CPU finalize). The factors are those of an ensemble of these models
        (the "auto" ridge of a single model is larger; see ``Estimator.ensemble_size``)."""
        chosen, ids = self._estimator_for(estimator, _renamed_ids(model_ids, models, "finalize"))
        if runner is not None:
            check_runner(runner).finalize(self, ids, chosen)
            return
        stored = [self.store.model(m) for m in ids]
        records = complete_models(stored)
        groups = sum(
            len(gram_groups(model.num_chunks))
            for model, done in zip(stored, records, strict=True)
            if needs_gram(model, done, chosen)
        )
        bar = tqdm(
            total=groups, desc="finalize (gram)", unit="group", disable=not self.show_progress
        )
        logger.info("finalize models %s with %s: %d partial grams to build", ids, chosen, groups)
        device = self.linalg_device
        with bar:
            for model, done in zip(stored, records, strict=True):
                kernel_factor(model, done, chosen, self._factors, _counted(bar, device), device)

    def self_influence(
        self, model_ids: Sequence[int] | None = None, estimator: Estimator | None = None
    ) -> np.ndarray:
        """(n_train,) float32: each training example's score on itself, the diagonal of
        the train-by-train scores, mean_m(Q_m,i) · mean_m(φ_m,iᵀ K_m⁻¹ φ_m,i), streamed over
        row chunks in O(chunk_rows · k) memory (never an n × n matrix). High values flag
        examples the models found hard or atypical: candidates for mislabeled data. Runs on
        :attr:`linalg_device`."""
        chosen, ids = self._estimator_for(estimator, model_ids)
        stored = [self.store.model(m) for m in ids]
        records = complete_models(stored)
        device = self.linalg_device
        factors = [
            kernel_factor(model, done, chosen, self._factors, device=device)
            for model, done in zip(stored, records, strict=True)
        ]
        models = list(zip(stored, records, strict=True))
        return self_influence(models, factors, chosen, device=device)

    def _estimator_for(
        self, estimator: Estimator | None, model_ids: Sequence[int] | None
    ) -> tuple[Estimator, list[int]]:
        """The estimator (default :attr:`estimator`) checked for k and decided for the
        ensemble of the requested stored model ids, and those ids. The estimator is checked
        first, so that a wrong one is named before the store is read."""
        if estimator is None:
            estimator = self.estimator
        elif not isinstance(estimator, Estimator):
            raise ConfigTypeError(
                f"estimator= takes an ft.Estimator(kernel=..., ridge=..., kernel_blocks=..., "
                f"precision=..., weight_power=..., ensemble_size=...), got "
                f"{type(estimator).__name__}"
            )
        chosen = estimator.for_dim(self.k)
        ids = self._stored_ids(model_ids)
        return chosen.for_models(len(ids)), ids

    def _stored_ids(self, model_ids: Sequence[int] | None) -> list[int]:
        """The requested model ids (default: all stored), each stored."""
        stored = self.store.model_ids()
        if not stored:
            raise NotFeaturizedError(
                "nothing is featurized yet: call trak.featurize(train_set, checkpoints=[...]) first"
            )
        if model_ids is None:
            return stored
        if isinstance(model_ids, (int, np.integer)):
            raise ConfigTypeError(f"model_ids= takes a list of ids: [{model_ids}]")
        ids = list(model_ids) if isinstance(model_ids, Sequence) else [model_ids]
        if not all(is_int(m) for m in ids):
            kinds = sorted({type(m).__name__ for m in ids if not is_int(m)})
            raise ConfigTypeError(
                f"model_ids= must list integer model ids, got {type(model_ids).__name__} "
                f"holding {', '.join(kinds)}; the training data is read from the store (pass "
                "no dataset here: e.g. trak.self_influence() or trak.self_influence([0, 1]))"
            )
        ids = [int(m) for m in ids]
        unknown = sorted(set(ids) - set(stored))
        if unknown or not ids or len(set(ids)) != len(ids):
            raise ConfigError(
                f"model_ids= must list distinct stored model ids {stored}; got {list(model_ids)}"
            )
        return ids

    # ------------------------------------------------------------------ score
    def score(
        self,
        targets: Any,
        checkpoints: Sequence[Checkpoint | DropoutMask] | None = None,
        batch_size: int | None = None,
        model_ids: Sequence[int] | None = None,
        estimator: Estimator | None = None,
        *,
        models: Sequence[int] | None = None,
        runner: Runner | None = None,
    ) -> Scores:
        """Scores of every training example for each target: ``(n_targets, n_train)``.

        Uses every model in the store (or the ids in ``model_ids``, e.g. ``range(5)`` of
        20, to see how LDS grows with the number of models), each of which must be fully
        featurized (the error names every missing chunk). Their checkpoints are those of
        the last :meth:`featurize` call, or ``checkpoints``: one per model id, in the order
        of the ids. ``estimator`` (default :attr:`estimator`) says how the kernel is built:
        the stored features serve every estimator, and each one's factor is cached in the
        store. ``runner``: where each model's part (its factor and the targets' features)
        is computed: None (this process) or ``ft.runners.Ray(...)``. In this process the
        factors, the targets' solves and the scores' chunk products run on
        :attr:`linalg_device` (the returned ``Scores`` keep it as their ``device``). The
        "auto" ridge is that of an ensemble of the models scored (one model scored alone gets
        a larger one): to score an ensemble's models separately and ``Scores.combine`` them,
        pass ``estimator=ft.Estimator(ensemble_size=M)``.
        """
        plan = self._score_plan(targets, checkpoints, batch_size, model_ids, estimator, models)
        logger.info(
            "score %d targets against models %s with %s",
            len(plan.target_rows),
            plan.ids,
            plan.estimator,
        )
        if runner is not None:
            return check_runner(runner).score(self, plan)
        bar = tqdm(
            total=len(plan.ids),
            desc=f"score {len(plan.target_rows)} targets",
            unit="model",
            disable=not self.show_progress,
        )
        solved = []
        with bar:
            for i in range(len(plan.ids)):
                solved.append(self._solve(plan, i))
                bar.update(1)
        parts = list(zip(plan.stored, plan.records, strict=True))
        return Scores(
            parts,
            solved,
            device=self.linalg_device,
            single_model_ridge=plan.estimator.single_model,
        )

    def _score_plan(
        self,
        targets: Any,
        checkpoints: Sequence[Checkpoint | DropoutMask] | None,
        batch_size: int | None,
        model_ids: Sequence[int] | None,
        estimator: Estimator | None,
        models: Sequence[int] | None,
    ) -> ScorePlan:
        chosen, ids = self._estimator_for(estimator, _renamed_ids(model_ids, models, "score"))
        stored = [self.store.model(m) for m in ids]
        records = complete_models(stored)
        if checkpoints is not None:
            loaded = self._load_checkpoints(checkpoints)
            if len(loaded) != len(ids):
                raise ConfigError(
                    f"the store holds features of {len(ids)} models {ids} but {len(loaded)} "
                    "checkpoints were given; pass one per model id, in the order of the ids"
                )
        elif all(m in self._checkpoints for m in ids):
            loaded = [self._checkpoints[m] for m in ids]
        else:
            raise NotFeaturizedError(
                f"this TRAK object has no checkpoints for models {ids}: pass checkpoints= "
                "(one per model id, in order) to score on an existing store"
            )
        for model, ckpt in zip(stored, loaded, strict=True):
            if model.fingerprint != ckpt.fingerprint:
                raise CheckpointMismatchError(
                    f"checkpoint of model {model.model_id} differs from the one whose training "
                    "features are stored; pass the same checkpoints, in the same order, as to "
                    "featurize"
                )
        target_rows = as_rows(as_dataset(targets), batch_size or self.batch_size)
        if len(target_rows) == 0:
            raise DataError("the target set is empty; pass at least one target example")
        self._check_first_batch(target_rows, loaded[0].state, ids[0])
        return ScorePlan(targets, target_rows, ids, stored, records, loaded, chosen)

    def _solve(self, plan: ScorePlan, i: int) -> Tensor:
        """K⁻¹ φ(targets) of the plan's i-th model, averaged over kernel blocks: (k, T)."""
        model, ckpt = plan.stored[i], plan.checkpoints[i]
        with self._eval_mode():
            with fixed_dropout(self.model, ckpt.mask, self.seed):
                state = self._to_device(ckpt.state)
                everything, task = slice(0, len(plan.target_rows)), self._bind(state)
                phi, _, _ = self._features(
                    plan.target_rows, everything, state, model.model_id, task, hashes=False
                )
            device = self.linalg_device
            records = plan.records[i]
            factor = kernel_factor(model, records, plan.estimator, self._factors, device=device)
            return solve_targets(factor, phi, device)

    # ------------------------------------------------------------------ helpers
    def _load_checkpoints(
        self, checkpoints: Sequence[Checkpoint | DropoutMask] | None
    ) -> list[_Checkpoint]:
        """The ensemble: each checkpoint's weights, dropout mask (or None) and fingerprint."""
        if checkpoints is None:
            checkpoints = [None]  # type: ignore[list-item]
        elif isinstance(checkpoints, (str, Path, dict, DropoutMask)):
            raise ConfigTypeError(
                "checkpoints= takes a list of checkpoints; wrap a single one: [ckpt]"
            )
        if len(checkpoints) == 0:
            raise ConfigError("checkpoints= is empty; pass at least one state dict or path")
        loaded = []
        for checkpoint in checkpoints:
            mask = checkpoint.mask if isinstance(checkpoint, DropoutMask) else None
            raw = checkpoint.checkpoint if isinstance(checkpoint, DropoutMask) else checkpoint
            state = load_state(self.model, raw)
            print_ = fingerprint(state) + ("" if mask is None else f"+dropout{mask}")
            loaded.append(_Checkpoint(state, mask, print_))
        if any(ckpt.mask is not None for ckpt in loaded):
            with fixed_dropout(self.model, 0, self.seed):  # raises if the model has no dropout
                pass
        return loaded

    def _to_device(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: t.to(self.device) for name, t in state.items()}

    def _forward(self, state: dict[str, Tensor]) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, state, args, kwargs)

        return forward

    def _check_first_batch(self, rows: Rows, state: dict[str, Tensor], model_id: int) -> None:
        """Validate the data's form on one small batch before anything is written, and
        that examples do not interact when an engine backpropagates the batch's sum."""
        _, batch = next(rows.batches(slice(0, min(len(rows), 2))))
        batch = to_device(batch, self.device)
        self.task.check_batch(batch)
        with torch.no_grad(), self._eval_mode():
            forward = self._forward(self._to_device(state))
            task = bind_task(self.task, forward, self.device)
            task.check_batch(batch)
            try:
                task.out_to_loss(forward, batch)
            except FastTrakError:
                raise
            except (RuntimeError, TypeError, IndexError) as error:
                raise DataError(
                    f"the model cannot run on the first batch of the data: {error}. The batch "
                    f"holds {_describe(batch)}; the model's floating parameters are "
                    f"{_float_dtypes(state)}. Check that the inputs have the shape and dtype "
                    "the model expects (e.g. float16 inputs for a float16 model, or run the "
                    "model in float32: model.float(), which fasttrak recommends for gradients)"
                ) from error
            if self.featurizer(model_id).sums_over_batch:
                check_examples_independent(task, forward, batch)

    def _bind(self, state: dict[str, Tensor]) -> Task:
        """The task for one checkpoint (``task.bind`` for per-checkpoint state, e.g. CLIP's
        negative embeddings). Call with the model in eval mode and its dropout masks on."""
        with torch.no_grad():
            return bind_task(self.task, self._forward(state), self.device)

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            yield
        finally:
            for module, training in modes.items():
                module.train(training)


@dataclass(frozen=True)
class Features:
    """Features of a dataset for one model: ``phi`` (n, k) and ``q`` (n,), float32."""

    phi: np.ndarray
    q: np.ndarray


@dataclass(frozen=True)
class _Checkpoint:
    """One model of the ensemble: weights (CPU), dropout-mask member or None, fingerprint."""

    state: dict[str, Tensor]
    mask: int | None
    fingerprint: str


@dataclass
class FeaturizePlan:
    """What one featurize call computes: per model id, its checkpoint and the row chunks
    left (None: all of ``chunks``, for a model that is new or replaced)."""

    train_set: Any  # as the caller gave it (a runner ships it, or its factory, to workers)
    data: Rows
    ids: list[int]
    checkpoints: list[_Checkpoint]
    pending: dict[int, list[int] | None]
    chunks: list[int]  # the row chunks this call covers (rows=)
    overwrite: bool

    def todo(self, m: int, pending_chunks: Callable[[], list[int]]) -> list[int]:
        """Model m's chunks to compute, reading its pending chunks when it is new."""
        known = self.pending[m]
        if known is not None:
            return known
        return _among(pending_chunks(), self.chunks)


def _among(pending: list[int], chunks: list[int]) -> list[int]:
    """The chunks of ``pending`` that this call covers (``chunks``, from ``rows=``)."""
    covered = set(chunks)
    return [c for c in pending if c in covered]


@dataclass
class ScorePlan:
    """What one score call computes: per model id, its stored features (complete), its
    checkpoint, and the targets."""

    targets: Any  # as the caller gave it
    target_rows: Rows
    ids: list[int]
    stored: list[ModelStore]
    records: list[dict[int, ChunkRecord]]
    checkpoints: list[_Checkpoint]
    estimator: Estimator


CHECK_DATA = ("auto", "full", "sample")


def _counted(bar: Any, device: torch.device = kernel_ops.CPU) -> PartialGrams:
    """In-process partial grams (on ``device``) that advance ``bar`` by one per group."""

    def partials(
        model: ModelStore,
        records: dict[int, ChunkRecord],
        estimator: Estimator,
        groups: list[range],
    ) -> Iterator[np.ndarray]:
        for partial in local_partial_grams(model, records, estimator, groups, device):
            yield partial
            bar.update(1)

    return partials


def _renamed_ids(
    model_ids: Sequence[int] | None, models: Sequence[int] | None, method: str
) -> Sequence[int] | None:
    """``model_ids``, or the deprecated ``models=`` keyword (with a warning)."""
    if models is None:
        return model_ids
    deprecated(f"TRAK.{method}(models=...)", f"TRAK.{method}(model_ids=...)", stacklevel=4)
    if model_ids is not None:
        raise ConfigError("pass model_ids= only (models= is its deprecated name)")
    return models


def _model_ids(model_ids: Sequence[int] | None, count: int) -> list[int]:
    """The model id of each checkpoint: ``model_ids`` checked, or 0, 1, ..."""
    if model_ids is None:
        return list(range(count))
    if isinstance(model_ids, (int, np.integer)):
        raise ConfigTypeError("model_ids= takes a list of ids, one per checkpoint: [7]")
    ids = list(model_ids)
    if not all(is_int(m) and m >= 0 for m in ids):
        raise ConfigError(f"model_ids must be non-negative integers, got {ids}")
    if len(ids) != count or len(set(ids)) != len(ids):
        raise ConfigError(f"model_ids= needs one distinct id per checkpoint ({count}), got {ids}")
    return [int(m) for m in ids]


def _describe(batch: Any) -> str:
    """Shapes and dtypes of a batch's tensors, for error messages."""
    parts: list[str] = []
    leaves, _ = torch.utils._pytree.tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            parts.append(f"{tuple(leaf.shape)} {str(leaf.dtype).replace('torch.', '')}")
        else:
            parts.append(type(leaf).__name__)
    return ", ".join(parts) or "nothing"


def _float_dtypes(state: dict[str, Tensor]) -> str:
    dtypes = sorted(
        {str(t.dtype).replace("torch.", "") for t in state.values() if t.is_floating_point()}
    )
    return ", ".join(sorted(dtypes)) or "none"
