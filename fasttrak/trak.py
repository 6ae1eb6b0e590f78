"""``TRAK``: drives featurize, finalize and score over checkpoints and row chunks.

This is the only module that knows models, tasks, projections and the store together.
"""

from __future__ import annotations

import contextlib
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
from fasttrak.data import Rows, as_rows, to_device
from fasttrak.ensembles import DropoutMask, fixed_dropout
from fasttrak.errors import CheckpointMismatchError, NonFiniteGradientError, NotFeaturizedError
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
from fasttrak.store import FEATURE_DTYPES, CheckpointStore, Store
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
        store: a directory for the zarr store (resumable), or None to keep it in memory.
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
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(task, type):
            raise TypeError(f"task={task.__name__} is a class; pass an instance: {task.__name__}()")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(
                f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}"
            )
        if batch_size < 1 or proj_dim < 1:
            raise ValueError("batch_size and proj_dim must be positive")
        self.model = model
        self.task: Task = task if task is not None else ImageClassification()
        self.device = torch.device(device)
        self.seed = seed
        self.batch_size = batch_size
        if kernel not in kernel_ops.WEIGHTINGS:
            raise ValueError(f"kernel must be one of {kernel_ops.WEIGHTINGS}, got {kernel!r}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0 (a fraction of the kernel's scale), got {ridge}")
        self.ridge = ridge
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
        existing = Store.open(store, meta) if store is not None and _has_store(store) else None
        rows = chunk_rows if chunk_rows is not None else (existing.chunk_rows if existing else 512)
        self.store = Store.open(store, {**meta, "chunk_rows": rows})
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.engine = "hooks" if engine == "auto" else engine
        self.vmap_chunk_size = vmap_chunk_size
        self._members: list[_Member] = []
        self._projector_of: tuple[int, Projector] | None = None  # only the current model's

    # ------------------------------------------------------------------ featurize
    def featurize(
        self,
        train_set: Any,
        checkpoints: Sequence[Checkpoint | DropoutMask] | None = None,
        batch_size: int | None = None,
        overwrite: bool = False,
    ) -> None:
        """Compute and store features Φ_m and Q_m of every training example for each checkpoint.

        Resumable: chunks already finished in the store are skipped. A checkpoint index that
        was featurized from other weights is an error unless ``overwrite=True``.
        """
        rows = as_rows(train_set, batch_size or self.batch_size)
        n = len(rows)
        if n == 0:
            raise ValueError("the training set is empty; pass a dataset with at least one example")
        members = self._load_members(checkpoints)
        self._check_first_batch(rows, members[0].state)
        self.store.set_num_train(n)  # records n, or raises StoreMismatchError for another n
        for m, member in enumerate(members):
            ck = self.store.open_checkpoint(m, member.fingerprint, overwrite)
            pending = ck.pending_chunks()
            if not pending:
                continue
            total = sum(ck.chunk_slice(c).stop - ck.chunk_slice(c).start for c in pending)
            bar = tqdm(
                total=total,
                desc=f"featurize model {m + 1}/{len(members)}",
                unit="ex",
                disable=not self.progress,
                leave=False,
            )
            with bar, self._eval_mode(), fixed_dropout(self.model, member.mask, self.seed):
                device_state = self._to_device(member.state)
                task = self._bind(device_state)
                for c in pending:
                    phi, q = self._features(rows, ck.chunk_slice(c), device_state, m, task, bar)
                    ck.write_chunk(c, phi.cpu().numpy(), q.cpu().numpy())
        self._members = members

    def _features(
        self,
        rows: Rows,
        chunk: slice,
        state: dict[str, Tensor],
        m: int,
        task: Task,
        bar: Any = None,
    ) -> tuple[Tensor, Tensor]:
        """Features (rows, k) and Q (rows,) of one row range for checkpoint m, whose
        weights are ``state`` and whose (bound) task is ``task``.

        Gradients are projected per batch when the projection is cached, or gathered into
        groups of ``projector.group_rows`` rows when it is generated block by block.
        """
        projector = self._projector(m)
        engine = self._gradient_engine(task)
        feats: list[Tensor] = []
        qs: list[Tensor] = []
        group: list[list[Tensor]] = []  # per batch: per-parameter gradient blocks (B, p_i)
        group_start, group_size = chunk.start, 0
        for where, batch in rows.batches(chunk):
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
        return torch.cat(feats), torch.cat(qs)

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
    def finalize(self) -> None:
        """Build (or load) the kernel factor of every checkpoint in the store."""
        for m in self._complete_checkpoints():
            self._factor(m)

    def _factor(self, m: int) -> np.ndarray:
        """Per-block Cholesky factors (B, m, m) of checkpoint m's kernel, cached in the store
        (an old-layout or other-settings factor is rebuilt from the stored gram)."""
        ck = self.store.checkpoint(m)
        assert ck is not None
        key = {
            "ridge": self.ridge,
            "relative_to": "trace/min(n,k)",
            "kernel": self.kernel,
            "blocks": self.kernel_blocks,
        }
        factor = ck.read_factor(key)
        if factor is None:
            name = "gram" if self.kernel == "plain" else "gram_gauss_newton"
            gram = ck.read_gram(name)
            if gram is None:
                gram = kernel_ops.gram(self._kernel_rows(ck), self.k, self.precision)
                ck.write_gram(gram, name)
            n = ck.features.shape[0]
            factor = kernel_ops.block_diagonal_factor(gram, self.ridge, n, self.kernel_blocks)
            ck.write_factor(factor, key)
        return factor

    def _kernel_rows(self, ck: CheckpointStore) -> Iterator[np.ndarray]:
        """Row blocks of Φ, or of R^½ Φ for the Gauss-Newton kernel."""
        for c in range(ck.num_chunks):
            rows = ck.chunk_slice(c)
            block = np.asarray(ck.features[rows], dtype=np.float32)
            if self.kernel == "gauss_newton":
                weights = kernel_ops.gauss_newton_weights(ck.q[rows])
                block = block * np.sqrt(weights).astype(np.float32)[:, None]
            yield block

    def _complete_checkpoints(self) -> list[int]:
        ids = self.store.checkpoint_ids()
        if not ids:
            raise NotFeaturizedError(
                "nothing is featurized yet: call trak.featurize(train_set, checkpoints=[...]) first"
            )
        for m in ids:
            ck = self.store.checkpoint(m)
            assert ck is not None
            left = len(ck.pending_chunks())
            if left:
                raise NotFeaturizedError(
                    f"model {m} has {left} unfinished chunk(s) of training features; rerun "
                    "trak.featurize(...) with the same data and checkpoints to finish them"
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

        Uses the checkpoints of the last :meth:`featurize` call, or ``checkpoints`` (which
        must be the ones the store was featurized with, in the same order). ``models``
        restricts the ensemble to some stored model indices (e.g. ``range(5)`` of 20, to see
        how LDS grows with the number of models); ``checkpoints`` then lists just those.
        """
        stored = self._complete_checkpoints()
        ids = stored if models is None else [int(m) for m in models]
        unknown = sorted(set(ids) - set(stored))
        if unknown or not ids or len(set(ids)) != len(ids):
            raise ValueError(
                f"models= must list distinct stored model indices {stored}; got {list(ids)}"
            )
        if checkpoints is not None:
            members = self._load_members(checkpoints)
        elif self._members:
            members = self._members if models is None else [self._members[m] for m in ids]
        else:
            raise NotFeaturizedError(
                "this TRAK object has not featurized anything: pass checkpoints= to score on an "
                "existing store, or call featurize first"
            )
        if len(members) != len(ids):
            raise ValueError(
                f"the store holds features of {len(ids)} models but {len(members)} checkpoints "
                "were given; pass all of them, in the order they were featurized"
            )
        for m, member in zip(ids, members, strict=True):
            ck = self.store.checkpoint(m)
            assert ck is not None
            if ck.fingerprint != member.fingerprint:
                raise CheckpointMismatchError(
                    f"checkpoint {m} differs from the one whose training features are stored; "
                    "pass the same checkpoints, in the same order, as to featurize"
                )
        target_rows = as_rows(targets, batch_size or self.batch_size)
        if len(target_rows) == 0:
            raise ValueError("the target set is empty; pass at least one target example")
        self._check_first_batch(target_rows, members[0].state)
        solved = []
        with self._eval_mode():
            for m, member in zip(ids, members, strict=True):
                with fixed_dropout(self.model, member.mask, self.seed):
                    state = self._to_device(member.state)
                    phi, _ = self._features(
                        target_rows, slice(0, len(target_rows)), state, m, self._bind(state)
                    )
                # Mean over the kernel's blocks: Σ_b Φ_b K_bb⁻¹ φ_b / B.
                solved.append(kernel_ops.solve(self._factor(m), phi.cpu().T) / self.kernel_blocks)
        cks = [self.store.checkpoint(m) for m in ids]
        return Scores(cks, solved, block_rows=self.store.chunk_rows)  # type: ignore[arg-type]

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
            raise TypeError("checkpoints= takes a list of checkpoints; wrap a single one: [ckpt]")
        if len(checkpoints) == 0:
            raise ValueError("checkpoints= is empty; pass at least one state dict or path")
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
            task.out_to_loss(forward, batch)
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


def _has_store(location: str | Path) -> bool:
    return (Path(location) / "zarr.json").exists()
