"""Scores: the TRAK estimator evaluated row chunk by row chunk over the training set.

score(t, i) = mean_m(Q_m,i) · mean_m( φ_m(t)ᵀ K_m⁻¹ φ_m(i) )
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import Tensor

from fasttrak import kernel as kernel_ops
from fasttrak.deprecation import deprecated
from fasttrak.errors import ConfigError, ConfigTypeError, DataError, NumericalError
from fasttrak.runners.base import Runner, check_runner
from fasttrak.shards import select_chunks
from fasttrak.store import ChunkRecord, ModelStore, Store
from fasttrak.store.core import sources_of
from fasttrak.store.records import checksum, digest
from fasttrak.store.saved import save_scores
from fasttrak.validation import positive_int

logger = logging.getLogger("fasttrak.scoring")


@dataclass(frozen=True)
class TopK:
    """Top proponents (highest scores) and opponents (lowest) per target.

    Each array has shape (n_targets, k); indices are training-set row numbers, sorted from
    the most extreme score inwards.
    """

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray

    @classmethod
    def merge(cls, parts: Sequence[TopK], k: int) -> TopK:
        """The top k of the union of ``parts``: top-k of the same targets over disjoint
        training rows (e.g. row chunks scored by different workers). Exact: the k highest
        and lowest of the union are among each part's k highest and lowest."""
        parts = list(parts)
        if not parts or not all(isinstance(p, TopK) for p in parts):
            raise ConfigTypeError("TopK.merge takes a non-empty list of ft.TopK")
        k = positive_int("k", k)
        if len({p.proponents.shape[0] for p in parts}) != 1:
            raise ConfigError("TopK.merge needs parts of the same targets (the same rows)")
        best_s, best_i = _keep_top(
            np.hstack([p.proponent_scores for p in parts]),
            np.hstack([p.proponents for p in parts]),
            k,
        )
        neg_s, worst_i = _keep_top(
            -np.hstack([p.opponent_scores for p in parts]),
            np.hstack([p.opponents for p in parts]),
            k,
        )
        return cls(best_i, best_s, worst_i, -neg_s)


class Scores:
    """Attribution scores of shape (n_targets, n_train), computed lazily per row chunk.

    ``np.asarray(scores)`` gives the dense float32 matrix (cached once computed);
    ``scores.topk(k)`` streams over training rows without building it; ``scores.save(path)``
    writes it to an on-disk zarr array chunk by chunk. Every block of stored features is
    verified against its checksum when it is read (StoreCorruptError otherwise).

    ``device``: where each chunk's product features × solved targets runs: the CPU
    (default), or a CUDA device (``TRAK.score`` passes :attr:`fasttrak.TRAK.linalg_device`):
    each chunk of features is copied there, multiplied with the solved targets (kept there)
    with TF32 off, summed over models in float64 there, and only the (n_targets, rows)
    float32 result comes back. The solved targets stay on the CPU as well (for pickling).

    ``single_model_ridge``: the targets were solved with the ``"auto"`` ridge of a model
    scored alone (:attr:`fasttrak.Estimator.single_model`); :meth:`combine` refuses to put
    such scores into an ensemble of more models.
    """

    def __init__(
        self,
        models: Sequence[tuple[ModelStore, dict[int, ChunkRecord]]],
        solved: Sequence[Tensor],
        q_mean: np.ndarray | None = None,
        device: kernel_ops.DeviceLike = kernel_ops.CPU,
        single_model_ridge: bool = False,
    ) -> None:
        self.device = kernel_ops.check_device(device)
        """Where the chunk products run (the CPU or a CUDA device)."""
        self.single_model_ridge = bool(single_model_ridge)
        """Whether the targets were solved with the single-model "auto" ridge."""
        if len(models) != len(solved) or not models:
            raise ConfigError("need one solved target block per model, and at least one")
        self._models = list(models)
        # Each (k, n_targets). Kept in float64, and multiplied with the features in float64,
        # for a model with fewer training rows than k: its kernel is λ I on the k - n
        # directions no training feature spans, so K⁻¹ φ(target) has components of size
        # |φ| / λ there which the product with Φ cancels exactly only in exact arithmetic.
        # In float32 a small ridge leaves errors of ~1e-7 |φ|² / λ: measured relative error
        # 2e-3 at ridge 1e-6 and 0.19 at 1e-8 (n = 60, k = 4096), 1e-11 and 1e-9 in float64.
        self._solved = [
            (x.double() if model.num_rows < model.store.k else x.float()).cpu()
            for x, (model, _) in zip(solved, self._models, strict=True)
        ]
        self._on_device: list[Tensor] | None = None  # the solved targets on a CUDA device
        self._dense: np.ndarray | None = None
        if q_mean is None:
            q = np.zeros(self._models[0][0].num_rows, dtype=np.float64)
            for ck, records in self._models:
                q += ck.read_all("q", records).astype(np.float64)
            q_mean = (q / len(self._models)).astype(np.float32)
        self.q_mean = q_mean
        if not self.q_mean.any():
            raise NumericalError(
                "Q = 1 - p is 0 on every training row of every model (their softmax is "
                "saturated: p = 1 in float32), so every score would be 0; use checkpoints from "
                "before the training loss reaches ~0, or models trained with weight decay or "
                "label smoothing (see docs/estimator.md, 'Saturated models')"
            )

    @classmethod
    def combine(cls, parts: Sequence[Scores]) -> Scores:
        """The ensemble over the union of the parts' models: equal to scoring with all of
        their model ids at once (the same targets and store, distinct model ids) when each
        part was scored with ``estimator=ft.Estimator(ensemble_size=M)``, M the combined
        number of models (the "auto" ridge of a model scored alone is larger: a part scored
        alone with it cannot join an ensemble, ConfigError). Lets scores of models computed
        separately (other processes, other estimators) merge."""
        parts = list(parts)
        if not parts or not all(isinstance(s, Scores) for s in parts):
            raise ConfigTypeError("Scores.combine takes a non-empty list of ft.Scores")
        first = parts[0]
        store = first._models[0][0].store.store_id
        ids: list[int] = []
        for s in parts:
            if s.shape != first.shape:
                raise ConfigError(
                    f"scores of shape {s.shape} and {first.shape} cannot be combined: they must "
                    "score the same targets against the same training set"
                )
            if any(model.store.store_id != store for model, _ in s._models):
                raise ConfigError("scores from different stores cannot be combined")
            ids.extend(model.model_id for model, _ in s._models)
        if len(set(ids)) != len(ids):
            raise ConfigError(f"scores to combine must come from distinct model ids, got {ids}")
        alone = [s.model_ids for s in parts if s.single_model_ridge]
        if len(ids) > 1 and alone:
            raise ConfigError(
                f"scores of models {alone} were solved with the 'auto' ridge of a model scored "
                f"alone (larger than an ensemble's), so they cannot join an ensemble of "
                f"{len(ids)} models; score each part with "
                f"estimator=ft.Estimator(ensemble_size={len(ids)})"
            )
        models = [m for s in parts for m in s._models]
        return cls(
            models,
            [x for s in parts for x in s._solved],
            device=first.device,
            single_model_ridge=bool(alone),  # only a single model's scores keep it
        )

    @property
    def model_ids(self) -> list[int]:
        """The model ids these scores average over."""
        return [model.model_id for model, _ in self._models]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._solved[0].shape[1]), int(self.q_mean.shape[0]))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        n_targets, n_train = self.shape
        return f"Scores(n_targets={n_targets}, n_train={n_train}, models={len(self._solved)})"

    def chunks(self, skip: Set[int] = frozenset()) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield (train row slice, scores (n_targets, rows) float32) over the training set,
        one store row chunk at a time (chunks in ``skip`` are left out)."""
        for _, rows, block in self._chunk_scores(skip):
            yield rows, block

    def blocks(self, skip: Set[int] = frozenset()) -> Iterator[tuple[slice, np.ndarray]]:
        """Deprecated name of :meth:`chunks`."""
        deprecated("Scores.blocks()", "Scores.chunks()")
        return self.chunks(skip)

    def _chunk_scores(
        self, skip: Set[int] = frozenset()
    ) -> Iterator[tuple[int, slice, np.ndarray]]:
        first = self._models[0][0]
        device = self.device
        if kernel_ops.cpu_path(device):
            solved_blocks = self._solved
        else:
            if self._on_device is None:
                self._on_device = [x.to(device) for x in self._solved]
            solved_blocks = self._on_device
        for c in range(first.num_chunks):
            if c in skip:
                continue
            rows = first.chunk_slice(c)
            if kernel_ops.cpu_path(device):
                total = torch.zeros((rows.stop - rows.start, self.shape[0]), dtype=torch.float64)
                for (ck, records), solved in zip(self._models, solved_blocks, strict=True):
                    phi = torch.from_numpy(np.asarray(ck.read("features", records[c]), np.float32))
                    total += (phi.to(solved.dtype) @ solved).double()
                total *= torch.from_numpy(self.q_mean[rows]).double()[:, None] / len(self._solved)
                yield c, rows, total.T.float().numpy()
                continue
            shape = (rows.stop - rows.start, self.shape[0])
            total = torch.zeros(shape, dtype=torch.float64, device=device)
            for (ck, records), solved in zip(self._models, solved_blocks, strict=True):
                phi = kernel_ops.to_device(ck.read("features", records[c]), device)
                with kernel_ops.full_precision_matmul(device):  # never held across the yield
                    product = phi.to(solved.dtype) @ solved
                total += product.double()
            q = torch.from_numpy(self.q_mean[rows]).to(device).double()
            total *= q[:, None] / len(self._solved)
            yield c, rows, total.T.float().cpu().numpy()

    def numpy(self, runner: Runner | None = None) -> np.ndarray:
        """The dense (n_targets, n_train) float32 matrix (computed once, then kept).
        ``runner=ft.runners.Ray(...)``: row chunks computed by workers in parallel."""
        if self._dense is None:
            if runner is not None:
                self._dense = check_runner(runner).dense(self)
            else:
                dense = np.empty(self.shape, dtype=np.float32)
                for rows, block in self.chunks():
                    dense[:, rows] = block
                self._dense = dense
        return self._dense

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        dense = self.numpy()
        return dense if dtype is None else dense.astype(dtype)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as the store's path and what was solved (CPU tensors), reopened where it
        is loaded (a runner's worker): the features are read there, verified, not shipped.
        The device travels as a name: a CUDA device is kept where the loading process sees
        that device, else the reopened scores run on the CPU (logged; a Ray task without a
        GPU sees none)."""
        location = self._models[0][0].store.location
        if location is None:
            raise ConfigError("scores of an in-memory store (store=None) cannot be shipped")
        models = [(model.model_id, model.fingerprint, records) for model, records in self._models]
        return (
            _reopen,
            (
                location,
                models,
                self._solved,
                self.q_mean,
                str(self.device),
                self.single_model_ridge,
            ),
        )

    def topk(self, k: int, rows: Sequence[int] | None = None, runner: Runner | None = None) -> TopK:
        """The k highest (proponents) and k lowest (opponents) scores of every target,
        streamed over the training rows (only the row chunks ``rows``, when given).
        ``runner=ft.runners.Ray(...)``: row chunks scored by workers, merged exactly."""
        n_targets, n = self.shape
        _check_k(k, n)
        if runner is not None:
            return check_runner(runner).topk(self, int(k))
        num_chunks = self._models[0][0].num_chunks
        chosen = select_chunks(rows, num_chunks)
        skip = frozenset(range(num_chunks)) - set(chosen)
        if self._dense is not None and rows is None:
            source: Iterable[tuple[slice, np.ndarray]] = [(slice(0, n), self._dense)]
        else:
            source = self.chunks(skip)
        return _topk_of(source, n_targets, int(k))

    @classmethod
    def load(cls, path: str | Path) -> SavedScores:
        """Scores saved by :meth:`save`, read back verified: ``numpy()``, ``chunks()`` and
        ``topk(k)`` as on computed scores (no store or model needed)."""
        return SavedScores(path)

    def identity(self) -> str:
        """A digest of everything these scores are computed from: the store, the models'
        weights and features, and the solved targets (names a save for resuming)."""
        parts = [
            [ck.store.store_id, ck.model_id, ck.fingerprint, sources_of(records)]
            for ck, records in self._models
        ]
        solved = [checksum(x.numpy()) for x in self._solved]
        return digest(parts, solved, checksum(self.q_mean), list(self.shape))

    def save(
        self, path: str | Path, overwrite: bool = False, runner: Runner | None = None
    ) -> zarr.Array:
        """Write the dense scores to a zarr array at ``path`` without holding them in memory.

        Atomic: the array appears at ``path`` only once complete (it is written at
        ``path.partial`` first); a killed save resumes where it stopped when called again;
        saving the same scores again is a no-op; other finished scores at ``path`` are
        replaced only with ``overwrite=True``. Read it back verified with
        :func:`fasttrak.load_scores`. ``runner=ft.runners.Ray(...)``: the row chunks'
        columns are computed and written by workers in parallel (then sealed here)."""
        block = self._models[0][0].store.chunk_rows
        return save_scores(
            path,
            self.shape,
            min(block, self.shape[1]),
            self.identity(),
            self._chunk_scores,
            overwrite=overwrite,
            writer=None if runner is None else check_runner(runner).save_writer(self),
        )


class SavedScores:
    """Scores read back from :meth:`Scores.save` (via :meth:`Scores.load`): the dense
    (n_targets, n_train) float32 array, verified against its checksums when loaded."""

    def __init__(self, path: str | Path) -> None:
        from fasttrak.store.saved import load_scores

        self.path = Path(path)
        self._dense = load_scores(self.path)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._dense.shape[0]), int(self._dense.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        n_targets, n_train = self.shape
        return f"SavedScores({str(self.path)!r}, n_targets={n_targets}, n_train={n_train})"

    def numpy(self) -> np.ndarray:
        """The dense (n_targets, n_train) float32 matrix."""
        return self._dense

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self._dense if dtype is None else self._dense.astype(dtype)

    def chunks(self, rows: int = 4096) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield (train row slice, scores (n_targets, rows)) over the training set."""
        rows = positive_int("rows", rows)
        for start in range(0, self.shape[1], rows):
            span = slice(start, min(start + rows, self.shape[1]))
            yield span, self._dense[:, span]

    def topk(self, k: int) -> TopK:
        """The k highest (proponents) and k lowest (opponents) scores of every target."""
        n_targets, n = self.shape
        _check_k(k, n)
        return _topk_of([(slice(0, n), self._dense)], n_targets, int(k))


def _check_k(k: object, n: int) -> None:
    """ConfigError unless k is an integer in [1, n] (n: the training examples)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ConfigError(
            f"k must be an integer in [1, {n}] (the number of training examples), got {k!r}"
        )


def _topk_of(source: Iterable[tuple[slice, np.ndarray]], n_targets: int, k: int) -> TopK:
    """Top k of each target over column blocks (train row slice, (n_targets, rows))."""
    best_s = np.full((n_targets, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((n_targets, 0), dtype=np.int64)
    worst_s, worst_i = -best_s, best_i.copy()
    for span, block in source:
        index = np.broadcast_to(np.arange(span.start, span.stop), block.shape)
        best_s, best_i = _keep_top(np.hstack([best_s, block]), np.hstack([best_i, index]), k)
        neg_s, worst_i = _keep_top(np.hstack([-worst_s, -block]), np.hstack([worst_i, index]), k)
        worst_s = -neg_s
    return TopK(best_i, best_s, worst_i, worst_s)


def _reopen(
    location: str,
    models: list[tuple[int, str, dict[int, ChunkRecord]]],
    solved: list[Tensor],
    q_mean: np.ndarray,
    device: str = "cpu",
    single_model_ridge: bool = False,
) -> Scores:
    """Scores rebuilt from :meth:`Scores.__reduce__`'s parts, on the store at ``location``
    (on ``device`` when it is the CPU or a CUDA device this process sees, else the CPU)."""
    store = Store.open_existing(location)
    stored = [(ModelStore(store, m, fingerprint), records) for m, fingerprint, records in models]
    return Scores(
        stored, solved, q_mean, device=_visible(device), single_model_ridge=single_model_ridge
    )


def _visible(name: str) -> torch.device:
    """The device named ``name`` if this process can use it, else the CPU (logged)."""
    device = torch.device(name)
    if device.type == "cuda":
        index = device.index if device.index is not None else 0
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            return device
        logger.info("scores made on %s reopened where it is not visible: on the CPU", name)
        return kernel_ops.CPU
    return kernel_ops.check_device(device)


def _keep_top(values: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest values (sorted descending) and their indices."""
    k = min(k, values.shape[1])
    part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(values, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(
        np.take_along_axis(index, part, axis=1), order, axis=1
    )


def soft_threshold(scores: np.ndarray, keep: float) -> np.ndarray:
    """The paper's optional sparsification: per target, shrink scores towards 0 by τ and zero
    those with |score| <= τ, τ being the per-target (1 - keep) quantile of |score|.

    scores: (n_targets, n_train); keep: fraction in (0, 1] of scores left nonzero per target.
    Returns a new float32 array of the same shape.
    """
    if not 0 < keep <= 1:
        raise ConfigError(f"keep must be a fraction in (0, 1], got {keep}")
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 2:
        raise DataError(f"scores must be (n_targets, n_train), got shape {scores.shape}")
    tau = np.quantile(np.abs(scores), 1 - keep, axis=1, keepdims=True) if keep < 1 else 0.0
    return (np.sign(scores) * np.maximum(np.abs(scores) - tau, 0)).astype(np.float32)
