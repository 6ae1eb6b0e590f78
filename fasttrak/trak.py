"""``TRAK``: drives featurize, finalize and score over checkpoints and row chunks.

This is the only module that knows models, tasks, projections and the store together.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from fasttrak import kernel as kernel_ops
from fasttrak.checkpoints import Checkpoint, fingerprint, load_state
from fasttrak.data import Rows, as_rows, chunk_fingerprint, to_device
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
from fasttrak.gradients import (
    ENGINES,
    HookGradients,
    ParamSpec,
    VmapGradients,
    check_examples_independent,
    select_parameters,
)
from fasttrak.projection import Projector, ProjectorConfig, resolve_projector
from fasttrak.projection.factored import Factored, FactoredProjector
from fasttrak.scoring import Scores
from fasttrak.store import FEATURE_DTYPES, CheckpointStore, ChunkRecord, Store, complete_records
from fasttrak.store.core import sources_of
from fasttrak.store.files import held
from fasttrak.store.verify import repair as repair_store
from fasttrak.tasks import ImageClassification, Task
from fasttrak.tasks.base import bind_task

DEFAULT_KERNEL_BLOCKS = 4
"""Kernel blocks when k >= 1024. Measured (docs/lds_vs_cost.md): with Gauss-Newton at
k = 1024, 4 blocks add ~0.04 LDS at 5 models on an MLP and a CNN; blocks of 64 coordinates
(k = 256) lose 0.05-0.17, hence no blocks below k = 1024."""


class TRAK:
    """TRAK attribution for a PyTorch model.

    Args:
        model: the architecture; its weights come from the checkpoints given to
            :meth:`featurize` (the model itself is never modified).
        task: what is attributed (default :class:`~fasttrak.tasks.ImageClassification`).
        proj_dim: k, the projected feature dimension.
        projector: ``"srht"`` (default: block subsampled randomized Hadamard), ``"sjlt"``
            (sparse JL), ``"dense"`` (Rademacher, the reference TRAK projection),
            ``"factored"`` (per-layer Kronecker, from layer hooks), ``"identity"`` (no
            projection, k = p), or a configured instance such as ``ft.projection.SJLT(s=4)``
            (see docs/projections.md; defaults chosen in docs/lds_vs_cost.md).
        store: a directory for the zarr store (resumable, checksummed, safe for many
            processes at once; see docs/store.md), or None to keep it in memory.
        device: where gradients and projections are computed.
        seed: seed of the random projection (features are a pure function of it).
        params: which parameters are differentiated: None (all trainable), names or globs,
            submodules or module types.
        batch_size: examples per gradient batch.
        chunk_rows: training rows per store chunk, the unit of resumable work
            (default 512; taken from the store when it exists).
        feature_dtype: ``"float32"`` or ``"float16"`` storage of the features.
        ridge: relative ridge, λ = ridge · trace(Φᵀ Φ) / min(n, k) (default
            :data:`fasttrak.kernel.DEFAULT_RIDGE`).
        precision: ``"float32"`` or ``"float64"`` products when building the kernel
            (always summed in float64).
        kernel: ``"gauss_newton"`` (default: Φᵀ R Φ with R = p (1 - p) = Q (1 - Q) per
            training example; influence functions on convex models) or ``"plain"`` (Φᵀ Φ,
            the paper's). Chosen at scoring time: the stored features serve both.
        kernel_blocks: B > 1 keeps B diagonal blocks of the kernel (contiguous coordinate
            groups of k / B) and averages the B estimates, a virtual ensemble. Default:
            4 when k >= 1024 (blocks of >= 256 coordinates), else 1.
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
        task: Task | None = None,
        proj_dim: int = 2048,
        projector: str | ProjectorConfig = "srht",
        store: str | Path | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        params: ParamSpec = None,
        batch_size: int = 64,
        chunk_rows: int | None = None,
        feature_dtype: str = "float32",
        ridge: float = kernel_ops.DEFAULT_RIDGE,
        precision: kernel_ops.Precision = "float32",
        kernel: kernel_ops.Weighting = "gauss_newton",
        kernel_blocks: int | None = None,
        engine: str = "auto",
        vmap_chunk_size: int | None = 128,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(task, type):
            raise ConfigTypeError(
                f"task={task.__name__} is a class; pass an instance: {task.__name__}()"
            )
        if feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(
                f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}"
            )
        proj_dim = _positive_int("proj_dim", proj_dim)
        batch_size = _positive_int("batch_size", batch_size)
        if chunk_rows is not None:
            chunk_rows = _positive_int("chunk_rows", chunk_rows)
        if not _is_int(seed):
            raise ConfigTypeError(f"seed must be an integer, got {seed!r}")
        seed = int(seed)
        self.model = model
        self.task: Task = task if task is not None else ImageClassification()
        self.device = torch.device(device)
        self.seed = seed
        self.batch_size = batch_size
        if kernel not in kernel_ops.WEIGHTINGS:
            raise ConfigError(f"kernel must be one of {kernel_ops.WEIGHTINGS}, got {kernel!r}")
        if precision not in ("float32", "float64"):
            raise ConfigError(f"precision must be 'float32' or 'float64', got {precision!r}")
        if (
            isinstance(ridge, bool)
            or not isinstance(ridge, (int, float, np.integer, np.floating))
            or not math.isfinite(ridge)
            or ridge < 0
        ):
            raise ConfigError(
                f"ridge must be a finite number >= 0 (a fraction of the kernel's scale), "
                f"got {ridge!r}"
            )
        self.ridge = float(ridge)
        self.precision = precision
        self.kernel = kernel
        self.progress = progress
        self.selected = select_parameters(model, params)
        named = dict(model.named_parameters())
        self.param_numels = {name: named[name].numel() for name in self.selected}
        self.projector_config = resolve_projector(projector)
        self.proj_dim = proj_dim
        self.excluded: list[str] = []
        """Selected parameters a factored projector leaves out (``Factored(others="exclude")``)."""
        if isinstance(self.projector_config, Factored):
            factored = self.projector_config
            projector_spec = factored.spec_for(model, self.selected, proj_dim)
            self.excluded = factored.excluded(model, self.selected)
            self.selected = factored.covered_params(model, self.selected)
            self.param_numels = {name: named[name].numel() for name in self.selected}
            self.k = int(projector_spec["k"])
        else:
            self.k = self.projector_config.output_dim(proj_dim, sum(self.param_numels.values()))
            projector_spec = self.projector_config.spec(self.k)
        if kernel_blocks is None:
            kernel_blocks = DEFAULT_KERNEL_BLOCKS if self.k >= 1024 else 1
        kernel_blocks = _positive_int("kernel_blocks", kernel_blocks)
        self.kernel_blocks = kernel_blocks
        kernel_ops.block_slices(self.k, kernel_blocks)  # raises for a bad number of blocks
        meta = {
            "task": self.task.spec(),
            "projector": projector_spec,
            "seed": seed,
            "k": self.k,
            "params": {name: list(named[name].shape) for name in self.selected},
            "feature_dtype": feature_dtype,
        }
        if engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
        if store is not None and not isinstance(store, (str, os.PathLike)):
            raise ConfigTypeError(
                f"store= takes a directory path or None (in memory), got {type(store).__name__}"
            )
        if store is not None and not str(store).strip():
            raise ConfigError("store= is an empty path; pass a directory path or None")
        self.store = Store.open(store, meta, chunk_rows=chunk_rows)
        self.engine = "hooks" if engine == "auto" else engine
        self.vmap_chunk_size = vmap_chunk_size
        self._members: dict[int, _Member] = {}  # by model id, from the last featurize
        self._projector_of: tuple[int, Projector] | None = None  # only the current model's
        self._factors: dict[tuple[int, str, str], np.ndarray] = {}  # when the store is read-only

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
                over the data without the model), else the first and last chunk;
                ``"full"``: every chunk always; ``"sample"``: chunks it computes, plus the
                first and last chunk. The first and last chunk are always checked before
                anything is written. :meth:`check_data` checks every chunk on demand.
        """
        if check_data not in CHECK_DATA:
            raise ConfigError(f"check_data must be one of {CHECK_DATA}, got {check_data!r}")
        rows = as_rows(train_set, batch_size or self.batch_size)
        n = len(rows)
        if n == 0:
            raise DataError("the training set is empty; pass a dataset with at least one example")
        members = self._load_members(checkpoints)
        ids = _model_ids(model_ids, len(members))
        self._check_first_batch(rows, members[0].state)
        if repair:  # first, so that a damaged record of n or of a model is restored too
            report = repair_store(self.store, models=ids)
            if report.problems:
                warnings.warn(f"repaired before featurizing:\n{report}", stacklevel=2)
        self.store.set_num_train(n)  # records n, or raises StoreMismatchError for another n
        # Chunks left to compute per model: None for a model that is new (or replaced with
        # overwrite=True) and so has all of them. Workers claim each chunk and skip those
        # another process finished meanwhile, so the lists may go stale safely.
        pending = {m: self._pending(m, member) for m, member in zip(ids, members, strict=True)}
        self._check_done_rows(rows, pending, check_data)
        for m, member in zip(ids, members, strict=True):
            if pending[m] == []:  # stored complete from these weights (also read-only stores)
                continue
            with self.store.writing(m, member.fingerprint, overwrite) as ck:
                todo = pending[m] if pending[m] is not None else ck.pending_chunks()
                if todo:
                    self._featurize_model(rows, ck, member, todo)
        self._members.update(zip(ids, members, strict=True))

    def _pending(self, m: int, member: _Member) -> list[int] | None:
        """Model m's unfinished chunks if it is stored from these weights, else None."""
        if self.store.stored_fingerprint(m) != member.fingerprint:
            return None
        return self.store.checkpoint(m).pending_chunks()

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
        runs: list[list[int]] = []
        for c in sorted(chunks):
            if runs and runs[-1][-1] == c - 1:
                runs[-1].append(c)
            else:
                runs.append([c])
        for run in runs:
            span = slice(self.store.chunk_slice(run[0]).start, self.store.chunk_slice(run[-1]).stop)
            hashes = rows.hashes(span)
            for c in run:
                part = self.store.chunk_slice(c)
                piece = hashes[part.start - span.start : part.stop - span.start]
                self.store.check_rows(c, chunk_fingerprint(piece))

    def _featurize_model(
        self, rows: Rows, ck: CheckpointStore, member: _Member, pending: list[int]
    ) -> None:
        """Compute every pending chunk of one model: first those no other process has
        claimed, then (waiting for their claims) those another process was computing."""
        m = ck.model_id
        size = sum(ck.chunk_slice(c).stop - ck.chunk_slice(c).start for c in pending)
        bar = tqdm(
            total=size,
            desc=f"featurize model {m}",
            unit="ex",
            disable=not self.progress,
            leave=False,
        )
        with bar, self._eval_mode(), fixed_dropout(self.model, member.mask, self.seed):
            device_state = self._to_device(member.state)
            task = self._bind(device_state)
            waiting = []
            for c in pending:
                claim = ck.claim(c, wait=False)
                if claim is None:  # another process is computing it
                    waiting.append(c)
                    continue
                with held(claim):
                    self._featurize_chunk(rows, ck, c, device_state, task, bar)
            for c in waiting:
                with held(ck.claim(c, wait=True)):
                    self._featurize_chunk(rows, ck, c, device_state, task, bar)

    def _featurize_chunk(
        self,
        rows: Rows,
        ck: CheckpointStore,
        c: int,
        state: dict[str, Tensor],
        task: Task,
        bar: Any,
    ) -> None:
        """Compute and write chunk c (the caller holds its claim), unless it is done."""
        chunk = ck.chunk_slice(c)
        if ck.done(c) is not None:  # finished by another process meanwhile
            bar.update(chunk.stop - chunk.start)
            return
        phi, q, hashes = self._features(rows, chunk, state, ck.model_id, task, bar)
        ck.write_chunk(c, phi.cpu().numpy(), q.cpu().numpy(), chunk_fingerprint(hashes))

    def _check_done_rows(
        self, rows: Rows, pending: dict[int, list[int] | None], check_data: str
    ) -> None:
        """Check the training rows of chunks this call will not compute against the store's
        record of them (DataMismatchError naming the first chunk that differs)."""
        recorded = self.store.recorded_chunks()
        if not recorded:
            return
        computed: set[int] = set()
        for chunks in pending.values():
            computed.update(range(self.store.num_chunks) if chunks is None else chunks)
        others = [c for c in recorded if c not in computed]
        if check_data == "sample" or (check_data == "auto" and not computed):
            others = [c for c in others if c in (recorded[0], recorded[-1])]
        # The first and last chunk are checked before anything is written, even when they
        # are recomputed (where the check is otherwise made as each chunk is written): data
        # that differ throughout are refused before a new model is created.
        others = sorted({*others, recorded[0], recorded[-1]})
        self._check_rows(rows, others)

    def _features(
        self,
        rows: Rows,
        chunk: slice,
        state: dict[str, Tensor],
        m: int,
        task: Task,
        bar: Any = None,
        hashes: bool = True,
    ) -> tuple[Tensor, Tensor, np.ndarray]:
        """Features (rows, k), Q (rows,) and per-row data hashes (rows,; empty when not
        ``hashes``) of one row range for model m, whose weights are ``state`` and whose
        (bound) task is ``task``.

        Gradients are projected per batch when the projection is cached, or gathered into
        groups of ``projector.group_rows`` rows when it is generated block by block.
        """
        projector = self._projector(m)
        engine = self._gradient_engine(task)
        feats: list[Tensor] = []
        qs: list[Tensor] = []
        row_hashes: list[np.ndarray] = [np.zeros(0, dtype=np.uint64)]
        group: list[list[Tensor]] = []  # per batch: per-parameter gradient blocks (B, p_i)
        group_start, group_size = chunk.start, 0
        for where, batch, *batch_hashes in rows.batches(chunk, with_hashes=hashes):
            row_hashes.extend(batch_hashes)
            batch = to_device(batch, self.device)
            task.check_batch(batch)
            with torch.no_grad():
                qs.append(task.out_to_loss(self._forward(state), batch).float())
            self._check_finite(qs[-1], where.start, m)
            if isinstance(projector, FactoredProjector):  # features straight from layer hooks
                feats.append(projector.features(self.model, task, state, batch))
                self._check_finite(feats[-1], where.start, m)
                if bar is not None:
                    bar.update(where.stop - where.start)
                continue
            group.append(engine.parts(state, batch))
            group_size += where.stop - where.start
            if group_size >= projector.group_rows:
                feats.append(self._project(projector, group, group_start, m))
                group, group_start, group_size = [], where.stop, 0
            if bar is not None:
                bar.update(where.stop - where.start)
        if group:
            feats.append(self._project(projector, group, group_start, m))
        return torch.cat(feats), torch.cat(qs), np.concatenate(row_hashes)

    def _project(
        self, projector: Projector, group: list[list[Tensor]], start: int, m: int
    ) -> Tensor:
        """Project a group of batches. Non-finite gradients show as non-finite features: every
        projector sends each gradient coordinate to at least one output with a nonzero weight."""
        if len(group) == 1:
            parts = group[0]
        else:  # per parameter, releasing each batch's piece once copied: one copy at a time
            parts = []
            for i in range(len(group[0])):
                parts.append(torch.cat([batch[i] for batch in group]))
                for batch in group:
                    batch[i] = None  # type: ignore[call-overload]
        group.clear()
        features = projector.project(parts)
        self._check_finite(features, start, m)
        return features

    @staticmethod
    def _check_finite(values: Tensor, start: int, m: int) -> None:
        """Raise NonFiniteGradientError naming the training rows whose values are NaN/inf."""
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
    def finalize(self, models: Sequence[int] | None = None) -> None:
        """Build (or load) the kernel factor of every model in the store (or of ``models``)."""
        ids = self._stored_ids(models)
        for m in ids:
            ck = self.store.checkpoint(m)
            self._factor(ck, complete_records(ck))

    def _kernel_settings(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What keys the cached gram and factor: they are rebuilt when any of it changes."""
        gram: dict[str, Any] = {"kernel": self.kernel, "precision": self.precision}
        if self.kernel == "gauss_newton":  # grams of other guards (or none) are not reused
            gram["guard"] = kernel_ops.GAUSS_NEWTON_GUARD
        factor = {
            **gram,
            "ridge": self.ridge,
            "relative_to": "trace/min(n,k)",
            "blocks": self.kernel_blocks,
        }
        return gram, factor

    def _factor(self, ck: CheckpointStore, records: dict[int, ChunkRecord]) -> np.ndarray:
        """Per-block Cholesky factors (B, s, s) of model m's kernel, built from these chunks,
        cached in the store (or in memory, for a read-only store)."""
        gram_settings, factor_settings = self._kernel_settings()
        memory_key = (ck.model_id, sources_of(records), str(sorted(factor_settings.items())))
        if memory_key in self._factors:
            return self._factors[memory_key]
        factor = ck.read_kernel("factor", factor_settings, records)
        if factor is not None:
            return factor
        gram = ck.read_kernel("gram", gram_settings, records)
        if gram is None:
            gram = kernel_ops.gram(self._kernel_rows(ck, records), self.k, self.precision)
            if self.store.writable:
                rows = max(1, min(self.k, 2**21 // self.k))  # chunks of <= 16 MiB
                ck.write_kernel("gram", gram_settings, records, gram, (rows, self.k))
        factor = kernel_ops.block_diagonal_factor(
            gram, self.ridge, ck.num_rows, self.kernel_blocks, weighting=self.kernel
        )
        if self.store.writable:
            ck.write_kernel("factor", factor_settings, records, factor, (1, *factor.shape[1:]))
        else:
            self._factors[memory_key] = factor
        return factor

    def _kernel_rows(
        self, ck: CheckpointStore, records: dict[int, ChunkRecord]
    ) -> Iterator[np.ndarray]:
        """Verified row blocks of Φ, or of R^½ Φ for the Gauss-Newton kernel."""
        weights = None
        q = ck.read_all("q", records)
        if self.kernel == "gauss_newton":  # guarded against saturation; warns when it acts
            r = kernel_ops.gauss_newton_weights(q, k=self.k, model=ck.model_id)
            weights = np.sqrt(r)
        else:
            kernel_ops.warn_if_saturated(q, model=ck.model_id)
        for c in range(ck.num_chunks):
            block = np.asarray(ck.read("features", records[c]), dtype=np.float32)
            if weights is not None:
                rows = ck.chunk_slice(c)
                block = block * weights[rows].astype(np.float32)[:, None]
            yield block

    def _stored_ids(self, models: Sequence[int] | None) -> list[int]:
        """The requested model ids (default: all stored), each stored."""
        stored = self.store.checkpoint_ids()
        if not stored:
            raise NotFeaturizedError(
                "nothing is featurized yet: call trak.featurize(train_set, checkpoints=[...]) first"
            )
        if models is None:
            return stored
        ids = list(models)
        if not all(_is_int(m) for m in ids):
            raise ConfigTypeError(f"models= must list integer model ids, got {ids}")
        ids = [int(m) for m in ids]
        unknown = sorted(set(ids) - set(stored))
        if unknown or not ids or len(set(ids)) != len(ids):
            raise ConfigError(
                f"models= must list distinct stored model ids {stored}; got {list(models)}"
            )
        return ids

    # ------------------------------------------------------------------ score
    def score(
        self,
        targets: Any,
        checkpoints: Sequence[Checkpoint | DropoutMask] | None = None,
        batch_size: int | None = None,
        models: Sequence[int] | None = None,
    ) -> Scores:
        """Scores of every training example for each target: ``(n_targets, n_train)``.

        Uses every model in the store (or the model ids in ``models``, e.g. ``range(5)`` of
        20, to see how LDS grows with the number of models), each of which must be fully
        featurized. Their checkpoints are those of the last :meth:`featurize` call, or
        ``checkpoints``: one per model id, in the order of the ids.
        """
        ids = self._stored_ids(models)
        cks = [self.store.checkpoint(m) for m in ids]
        records = [complete_records(ck) for ck in cks]
        if checkpoints is not None:
            members = self._load_members(checkpoints)
            if len(members) != len(ids):
                raise ConfigError(
                    f"the store holds features of {len(ids)} models {ids} but {len(members)} "
                    "checkpoints were given; pass one per model id, in the order of the ids"
                )
        elif all(m in self._members for m in ids):
            members = [self._members[m] for m in ids]
        else:
            raise NotFeaturizedError(
                f"this TRAK object has no checkpoints for models {ids}: pass checkpoints= "
                "(one per model id, in order) to score on an existing store"
            )
        for ck, member in zip(cks, members, strict=True):
            if ck.fingerprint != member.fingerprint:
                raise CheckpointMismatchError(
                    f"checkpoint of model {ck.model_id} differs from the one whose training "
                    "features are stored; pass the same checkpoints, in the same order, as to "
                    "featurize"
                )
        target_rows = as_rows(targets, batch_size or self.batch_size)
        if len(target_rows) == 0:
            raise DataError("the target set is empty; pass at least one target example")
        self._check_first_batch(target_rows, members[0].state)
        solved = []
        with self._eval_mode():
            for ck, done, member in zip(cks, records, members, strict=True):
                with fixed_dropout(self.model, member.mask, self.seed):
                    state = self._to_device(member.state)
                    everything, task = slice(0, len(target_rows)), self._bind(state)
                    phi, _, _ = self._features(
                        target_rows, everything, state, ck.model_id, task, hashes=False
                    )
                # Mean over the kernel's blocks: Σ_b Φ_b K_bb⁻¹ φ_b / B.
                factor = self._factor(ck, done)
                solved.append(kernel_ops.solve(factor, phi.cpu().T) / self.kernel_blocks)
        return Scores(list(zip(cks, records, strict=True)), solved)

    # ------------------------------------------------------------------ helpers
    def _projector(self, m: int) -> Projector:
        """Model m's projector. Only one is held at a time: a cached dense matrix can take
        up to ``cache_bytes`` (1 GiB by default), so holding one per model would not scale."""
        if self._projector_of is None or self._projector_of[0] != m:
            self._projector_of = None  # release the previous matrix before building the next
            config = self.projector_config
            if isinstance(config, Factored):
                built: Projector = config.build_factored(
                    self.model, self.selected, self.proj_dim, self.seed, m, self.device
                )
            else:
                built = config.build(self.param_numels, self.k, self.seed, m, self.device)
            self._projector_of = (m, built)
        return self._projector_of[1]

    def _load_members(
        self, checkpoints: Sequence[Checkpoint | DropoutMask] | None
    ) -> list[_Member]:
        """The ensemble: each checkpoint's weights, dropout mask (or None) and fingerprint."""
        if checkpoints is None:
            checkpoints = [None]  # type: ignore[list-item]
        elif isinstance(checkpoints, (str, Path, dict, DropoutMask)):
            raise ConfigTypeError(
                "checkpoints= takes a list of checkpoints; wrap a single one: [ckpt]"
            )
        if len(checkpoints) == 0:
            raise ConfigError("checkpoints= is empty; pass at least one state dict or path")
        members = []
        for checkpoint in checkpoints:
            mask = checkpoint.mask if isinstance(checkpoint, DropoutMask) else None
            raw = checkpoint.checkpoint if isinstance(checkpoint, DropoutMask) else checkpoint
            state = load_state(self.model, raw)
            print_ = fingerprint(state) + ("" if mask is None else f"+dropout{mask}")
            members.append(_Member(state, mask, print_))
        if any(member.mask is not None for member in members):
            with fixed_dropout(self.model, 0, self.seed):  # raises if the model has no dropout
                pass
        return members

    def _to_device(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: t.to(self.device) for name, t in state.items()}

    def _forward(self, state: dict[str, Tensor]) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, state, args, kwargs)

        return forward

    def _check_first_batch(self, rows: Rows, state: dict[str, Tensor]) -> None:
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
            if self.engine == "hooks" or isinstance(self.projector_config, Factored):
                check_examples_independent(task, forward, batch)

    def _bind(self, state: dict[str, Tensor]) -> Task:
        """The task for one checkpoint (``task.bind`` for per-checkpoint state, e.g. CLIP's
        negative embeddings). Call with the model in eval mode and its dropout masks on."""
        with torch.no_grad():
            return bind_task(self.task, self._forward(state), self.device)

    def _gradient_engine(self, task: Task) -> HookGradients | VmapGradients:
        if self.engine == "hooks":
            return HookGradients(self.model, task, self.selected)
        return VmapGradients(self.model, task, self.selected, self.vmap_chunk_size)

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
class _Member:
    """One model of the ensemble: weights (CPU), dropout-mask member or None, fingerprint."""

    state: dict[str, Tensor]
    mask: int | None
    fingerprint: str


CHECK_DATA = ("auto", "full", "sample")


def _is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool or a float."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> int:
    """``value`` as an int if it is a positive integer (not a bool or a float)."""
    if not _is_int(value):
        raise ConfigTypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _model_ids(model_ids: Sequence[int] | None, count: int) -> list[int]:
    """The model id of each checkpoint: ``model_ids`` checked, or 0, 1, ..."""
    if model_ids is None:
        return list(range(count))
    if isinstance(model_ids, (int, np.integer)):
        raise ConfigTypeError("model_ids= takes a list of ids, one per checkpoint: [7]")
    ids = list(model_ids)
    if not all(_is_int(m) and m >= 0 for m in ids):
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
