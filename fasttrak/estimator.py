"""The estimator's settings as one value, and the kernel factor they key in the store.

score(z, i) = mean_m(Q_m,i) · mean_m( φ_m(z)ᵀ K_m⁻¹ φ_m(z_i) ), with K_m built from the
stored features Φ_m as the :class:`Estimator` says. The features do not depend on it, so
one store serves every estimator: pass ``estimator=`` to :meth:`fasttrak.TRAK.score`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor

from fasttrak import kernel as kernel_ops
from fasttrak.errors import ConfigError
from fasttrak.store import ChunkRecord, ModelStore
from fasttrak.store.core import sources_of
from fasttrak.validation import positive_int

DEFAULT_BLOCK_SIZE = 512
"""Default kernel blocks: k // DEFAULT_BLOCK_SIZE blocks (of about 512 coordinates) when
k >= 4 · DEFAULT_BLOCK_SIZE, n <= BLOCKS_MAX_ROWS_PER_DIM · k and p >= k; else one block.
Measured on the quality suite (docs/quality.md, default estimator, 5 projection draws):
blocks of 512 help where the kernel is badly under-determined, n <= k/2 (text_bag, n =
2,000, at k = 4096: +0.022 with 5 models, +0.007 with one); with n between k/2 and 2k their
effect flips sign with the number of models and between cases (mlp_heldout, n = 4,000: -0.022
at k = 4096 and -0.006 at k = 2048 with 5 models, +0.010 and +0.015 with one; text_bag at k =
2048: +0.011 with 5 models, -0.013 with one), and one block has the smaller worst regret
against the suite's best estimator (5 models: 0.014 against 0.022). Blocks of 256 lost up
to 0.1 (the digits models at k = 1024). With many more rows than coordinates the kernel is
well determined and blocks only drop its cross-block part (-0.05 at n = 4.9k and 9.8k).
Where p < k (logistic regression, p = 62) every block sees the same p coordinates at a
fraction of the rank: 0.919 against 0.942 with one block, whatever the ridge."""

BLOCKS_MAX_ROWS_PER_DIM = 0.5
"""Default kernel blocks only while n <= this · k (see :data:`DEFAULT_BLOCK_SIZE`)."""


@dataclass(frozen=True)
class Estimator:
    """How scores are computed from stored features (chosen at scoring time).

    kernel: ``"gauss_newton"`` (default: Φᵀ R Φ with R = (Q (1 - Q))^γ per training
        example, γ = ``weight_power``) or ``"plain"`` (Φᵀ Φ, the paper's).
    ridge: ``"auto"`` (default): λ = c · e_j, the kernel's j-th largest eigenvalue with
        j = 3% of min(n, p) (p: the attributed parameters), per kernel block
        (:func:`fasttrak.kernel.auto_ridge`); c = 0.14, raised for a model scored alone
        (``ensemble_size`` 1) when its kernel's spectrum is flat
        (:func:`fasttrak.kernel.single_model_factor`); or a number, the relative ridge
        λ = ridge · trace(Φᵀ R Φ) / min(n, k, p), a fraction of the kernel's mean nonzero
        eigenvalue. Why "auto": the best relative ridge runs from 0.1 to 3 across the
        quality suite (docs/quality.md), following how fast the spectrum decays.
    kernel_blocks: B > 1 keeps B diagonal blocks of the kernel (contiguous coordinate
        groups of k / B) and averages the B estimates, a virtual ensemble. None: blocks of
        512 coordinates (k // 512 of them) when k >= 2048, n <= k / 2 and p >= k, else 1.
    precision: ``"float32"`` or ``"float64"`` products when building the kernel (always
        summed in float64); ``"auto"`` (default): float64 for a model with fewer training
        rows than k, float32 otherwise. With n < k the kernel is λ I on the k - n
        directions no training feature spans; float32 rounding of the weighted rows leaks
        into them and a small ridge amplifies it (relative error ~1e-8 / ridge: 1e-4 at
        ridge 1e-4, 1e-2 at 1e-6; float64: 5e-8 at every ridge, tests/test_oracle.py), at
        twice the cost of a gram that is then small (n k² flops with n < k).
    weight_power: γ in (0, 1], the power of the (guarded) Gauss-Newton weights; used by
        ``kernel="gauss_newton"`` only. 1 is the Gauss-Newton Hessian of the loss in the
        model output (the influence function on logistic regression); the default 0.75
        tempers it towards the plain kernel and had the smaller worst-case regret on the
        quality suite (with 5 models at every k; with 1 over all k together; docs/quality.md,
        "The kernel").
    ensemble_size: how many models' scores are averaged, which the ``"auto"`` ridge depends
        on (one model alone gets a larger one where its spectrum is flat). None (default):
        the number of models scored, decided by :meth:`fasttrak.TRAK.score` (and
        ``finalize``, ``self_influence``). Set it when scoring the models of one ensemble
        separately for :meth:`fasttrak.Scores.combine`: ``ft.Estimator(ensemble_size=M)``.
    """

    kernel: kernel_ops.Weighting = "gauss_newton"
    ridge: kernel_ops.Ridge = kernel_ops.DEFAULT_RIDGE
    kernel_blocks: int | None = None
    precision: Literal["auto", "float32", "float64"] = "auto"
    weight_power: float = kernel_ops.DEFAULT_WEIGHT_POWER
    ensemble_size: int | None = None

    def __post_init__(self) -> None:
        if self.kernel not in kernel_ops.WEIGHTINGS:
            raise ConfigError(f"kernel must be one of {kernel_ops.WEIGHTINGS}, got {self.kernel!r}")
        if self.precision not in ("auto", "float32", "float64"):
            raise ConfigError(
                f"precision must be 'auto', 'float32' or 'float64', got {self.precision!r}"
            )
        ridge = self.ridge
        if not (isinstance(ridge, str) and ridge == "auto"):
            if (
                isinstance(ridge, bool)
                or not isinstance(ridge, (int, float, np.integer, np.floating))
                or not math.isfinite(ridge)
                or ridge < 0
            ):
                raise ConfigError(
                    f"ridge must be 'auto' or a finite number >= 0 (a fraction of the kernel's "
                    f"mean eigenvalue), got {ridge!r}"
                )
            object.__setattr__(self, "ridge", float(ridge))
        power = self.weight_power
        if (
            isinstance(power, bool)
            or not isinstance(power, (int, float, np.integer, np.floating))
            or not 0 < power <= 1
        ):
            raise ConfigError(
                f"weight_power must be a number in (0, 1] (the power γ of the Gauss-Newton "
                f"weights; 1: the Gauss-Newton kernel itself; for γ = 0 use kernel='plain'), "
                f"got {power!r}"
            )
        object.__setattr__(self, "weight_power", float(power))
        if self.kernel_blocks is not None:
            object.__setattr__(
                self, "kernel_blocks", positive_int("kernel_blocks", self.kernel_blocks)
            )
        if self.ensemble_size is not None:
            object.__setattr__(
                self, "ensemble_size", positive_int("ensemble_size", self.ensemble_size)
            )

    def for_dim(self, k: int) -> Estimator:
        """This estimator checked for feature dimension ``k``: raises ConfigError when k
        cannot be split into ``kernel_blocks`` blocks. The default (None) is decided with
        the number of training rows, by :meth:`for_rows`."""
        if self.kernel_blocks is not None:
            kernel_ops.block_slices(k, self.kernel_blocks)  # raises for a bad number
        return self

    def for_rows(self, num_rows: int, k: int, num_params: int | None = None) -> Estimator:
        """This estimator with its defaults decided for a model of ``num_rows`` training
        rows, feature dimension ``k`` and ``num_params`` attributed parameters (None:
        unknown, taken as >= k): ``precision="auto"`` is float64 when num_rows < k;
        ``kernel_blocks=None`` is k // :data:`DEFAULT_BLOCK_SIZE` when that is at least
        4, num_rows <= :data:`BLOCKS_MAX_ROWS_PER_DIM` · k and num_params >= k, else 1."""
        chosen = self.for_dim(k)
        if chosen.kernel_blocks is None:
            many_rows = num_rows > BLOCKS_MAX_ROWS_PER_DIM * k
            few_params = num_params is not None and num_params < k
            blocks = k // DEFAULT_BLOCK_SIZE
            if blocks < 4 or many_rows or few_params:
                blocks = 1
            chosen = replace(chosen, kernel_blocks=blocks)
        if chosen.precision == "auto":
            chosen = replace(chosen, precision="float64" if num_rows < k else "float32")
        return chosen

    def for_models(self, count: int) -> Estimator:
        """This estimator for scores averaged over ``count`` models: ``ensemble_size=None``
        becomes ``count`` (an explicit ensemble_size is kept)."""
        if self.ensemble_size is not None:
            return self
        return replace(self, ensemble_size=positive_int("number of models", count))

    @property
    def single_model(self) -> bool:
        """Whether the ``"auto"`` ridge is the single-model one (ensemble_size 1); False for a
        numeric ridge, which does not depend on the ensemble."""
        if not (isinstance(self.ridge, str) and self.ridge == "auto"):
            return False
        if self.ensemble_size is None:
            raise ConfigError(
                "ensemble_size is not decided yet: call estimator.for_models(number of models) "
                "first (TRAK.score, finalize and self_influence do)"
            )
        return self.ensemble_size == 1

    def resolved(self, model: ModelStore) -> Estimator:
        """:meth:`for_rows` for one stored model."""
        return self.for_rows(model.num_rows, model.store.k, model.store.num_params)

    @property
    def blocks(self) -> int:
        """The number of kernel blocks (call :meth:`resolved` first when it is None)."""
        if self.kernel_blocks is None:
            raise ConfigError(
                "kernel_blocks is not decided yet: call estimator.resolved(model) (or "
                "for_rows(n, k)) first"
            )
        return self.kernel_blocks

    def gram_settings(self) -> dict[str, Any]:
        """What keys a cached gram: it is rebuilt when any of it changes."""
        if self.precision == "auto":
            raise ConfigError(
                "precision='auto' is not decided yet: call estimator.resolved(model) first"
            )
        gram: dict[str, Any] = {"kernel": self.kernel, "precision": self.precision}
        if self.kernel == "gauss_newton":  # grams of other guards (or none) are not reused
            gram["guard"] = kernel_ops.GAUSS_NEWTON_GUARD
            if self.weight_power != 1:  # γ = 1 keeps the key of grams cached before γ existed
                gram["power"] = self.weight_power
        return gram

    def factor_settings(self) -> dict[str, Any]:
        """What keys a cached factor."""
        if self.ridge == "auto":
            relative_to = (
                f"{kernel_ops.AUTO_RIDGE_SCALE}*eig[{kernel_ops.AUTO_RIDGE_QUANTILE}*min(n,p)]"
                f">={kernel_ops.AUTO_RIDGE_MIN}*trace/min(n,k,p)"
            )
            if self.single_model:  # ensembles keep the key factors had before the rule
                relative_to += (
                    f";one model: scale*max(1,s/{kernel_ops.SINGLE_MODEL_RANK})"
                    f"**{kernel_ops.SINGLE_MODEL_POWER},s=trace^2/|G|_F^2/min(n,k,p)"
                )
        else:
            relative_to = "trace/min(n,k,p)"
        return {
            **self.gram_settings(),
            "ridge": self.ridge,
            "relative_to": relative_to,
            "blocks": self.blocks,
        }


FactorCache = dict[tuple[int, str, str], np.ndarray]
"""Factors kept in memory, for stores that cannot cache them (read-only)."""


GRAM_GROUP_CHUNKS = 16
"""Row chunks per partial gram. The gram Φᵀ R Φ is summed (float64) as a fixed sequence of
partial grams, one per group of this many consecutive chunks: any runner may compute the
partials (in any order, on any worker) and their in-order sum has the same bits."""

PartialGrams = Callable[
    [ModelStore, dict[int, ChunkRecord], Estimator, list[range]], Iterable[np.ndarray]
]
"""How a runner computes the partial grams of one model: (model, records, estimator,
groups) -> one (k, k) float64 partial per group, in the groups' order."""


def gram_groups(num_chunks: int) -> list[range]:
    """The consecutive chunk ranges whose partial grams sum to a model's gram."""
    step = GRAM_GROUP_CHUNKS
    return [range(c, min(c + step, num_chunks)) for c in range(0, num_chunks, step)]


def kernel_factor(
    model: ModelStore,
    records: dict[int, ChunkRecord],
    estimator: Estimator,
    memory: FactorCache,
    partial_grams: PartialGrams | None = None,
    device: kernel_ops.DeviceLike = kernel_ops.CPU,
) -> np.ndarray:
    """Per-block Cholesky factors (B, s, s) of one model's kernel, built from these chunks
    and cached in the store (in ``memory`` when the store is read-only). The gram, when not
    cached, is the in-order sum of the partial grams of :func:`gram_groups`, computed here
    or by ``partial_grams`` (a runner's workers).

    ``device``: where the partial grams computed here (not ``partial_grams``'), the ridge and
    the factors are computed: the CPU (default) or a CUDA device (float64 there, see
    :mod:`fasttrak.kernel`). The cache does not record the device: a gram or factor built on
    one serves the others."""
    k = model.store.k
    estimator = estimator.resolved(model)
    gram_settings, factor_settings = estimator.gram_settings(), estimator.factor_settings()
    memory_key = (model.model_id, sources_of(records), str(sorted(factor_settings.items())))
    if memory_key in memory:
        return memory[memory_key]
    factor = model.read_kernel("factor", factor_settings, records)
    if factor is not None:
        return factor
    gram = model.read_kernel("gram", gram_settings, records)
    writable = model.store.writable
    if gram is None:
        groups = gram_groups(model.num_chunks)
        if partial_grams is not None:
            partials = partial_grams(model, records, estimator, groups)
        else:
            partials = local_partial_grams(model, records, estimator, groups, device)
        gram = np.zeros((k, k))
        for partial in partials:
            gram += partial
        if writable:
            rows = max(1, min(k, 2**21 // k))  # chunks of <= 16 MiB
            model.write_kernel("gram", gram_settings, records, gram, (rows, k))
    factor = kernel_ops.block_diagonal_factor(
        gram,
        estimator.ridge,
        model.num_rows,
        estimator.blocks,
        weighting=estimator.kernel,
        num_params=model.store.num_params,
        device=device,
        single_model=estimator.single_model,
    )
    if writable:
        model.write_kernel("factor", factor_settings, records, factor, (1, *factor.shape[1:]))
    else:
        memory[memory_key] = factor
    return factor


def needs_gram(model: ModelStore, records: dict[int, ChunkRecord], estimator: Estimator) -> bool:
    """True when neither this estimator's factor nor its gram is cached in the store
    (looked up, not read: :func:`kernel_factor` reads and verifies what it uses)."""
    estimator = estimator.resolved(model)
    return not (
        model.has_kernel("factor", estimator.factor_settings(), records)
        or model.has_kernel("gram", estimator.gram_settings(), records)
    )


def local_partial_grams(
    model: ModelStore,
    records: dict[int, ChunkRecord],
    estimator: Estimator,
    groups: list[range],
    device: kernel_ops.DeviceLike = kernel_ops.CPU,
) -> Iterator[np.ndarray]:
    """The partial grams of ``groups``, computed in this process one after another (on
    ``device``, see :func:`partial_gram`)."""
    weights = kernel_weights(model, records, estimator)
    for chunks in groups:
        yield partial_gram(model, records, estimator, chunks, weights, device)


def partial_gram(
    model: ModelStore,
    records: dict[int, ChunkRecord],
    estimator: Estimator,
    chunks: range,
    weights: np.ndarray | None,
    device: kernel_ops.DeviceLike = kernel_ops.CPU,
) -> np.ndarray:
    """Σ over ``chunks`` of Φ_cᵀ R_c Φ_c, (k, k) float64 numpy (products in the estimator's
    precision); ``weights``: R^½ per training row from :func:`kernel_weights`.

    ``device``: the CPU (default), or a CUDA device: each chunk is copied there as stored
    (float16 or float32), converted and weighted there (the same elementwise rounding as on
    the CPU), and multiplied there with TF32 off (:func:`fasttrak.kernel.gram`)."""
    precision = cast(kernel_ops.Precision, estimator.resolved(model).precision)
    dtype = np.float64 if precision == "float64" else np.float32
    device = kernel_ops.check_device(device)
    if not kernel_ops.cpu_path(device):
        blocks = _device_kernel_rows(model, records, chunks, weights, dtype, device)
        return kernel_ops.gram(blocks, model.store.k, precision, device)
    rows = kernel_rows(model, records, chunks, weights, dtype)
    return kernel_ops.gram(rows, model.store.k, precision)


def _device_kernel_rows(
    model: ModelStore,
    records: dict[int, ChunkRecord],
    chunks: Iterable[int],
    weights: np.ndarray | None,
    dtype: type[np.floating],
    device: torch.device,
) -> Iterator[Tensor]:
    """:func:`kernel_rows` as tensors on ``device``, one chunk there at a time."""
    torch_dtype = torch.float64 if dtype is np.float64 else torch.float32
    for c in chunks:
        block = kernel_ops.to_device(model.read("features", records[c]), device).to(torch_dtype)
        if weights is not None:
            rows = model.chunk_slice(c)
            scale = torch.from_numpy(weights[rows].astype(dtype)).to(device, non_blocking=True)
            block = block * scale[:, None]
        yield block


def kernel_weights(
    model: ModelStore, records: dict[int, ChunkRecord], estimator: Estimator
) -> np.ndarray | None:
    """R^½ = w^(γ/2) (n,) float64 for the Gauss-Newton kernel, w its weights Q (1 - Q) guarded
    against saturation (warns when the guard acts) and γ the estimator's ``weight_power``;
    None for the plain kernel (which warns when Q is saturated)."""
    q = model.read_all("q", records)
    if estimator.kernel == "gauss_newton":
        w = kernel_ops.gauss_newton_weights(q, k=model.store.k, model=model.model_id)
        power = estimator.weight_power
        return np.sqrt(w) if power == 1 else np.power(w, power / 2)
    kernel_ops.warn_if_saturated(q, model=model.model_id)
    return None


def kernel_rows(
    model: ModelStore,
    records: dict[int, ChunkRecord],
    chunks: Iterable[int],
    weights: np.ndarray | None,
    dtype: type[np.floating] = np.float32,
) -> Iterator[np.ndarray]:
    """Verified row chunks of Φ, or of R^½ Φ when ``weights`` (R^½ per row) are given, in
    ``dtype`` (float64 keeps R^½ Φ in the row space of Φ to float64 rounding: with k > n and
    a tiny ridge, float32 rounding of the weighted rows leaks into the null space)."""
    for c in chunks:
        block = np.asarray(model.read("features", records[c]), dtype=dtype)
        if weights is not None:
            rows = model.chunk_slice(c)
            block = block * weights[rows].astype(dtype)[:, None]
        yield block


def solve_targets(
    factor: np.ndarray, phi: Tensor, device: kernel_ops.DeviceLike = kernel_ops.CPU
) -> Tensor:
    """K⁻¹ φ(targets) averaged over the kernel's blocks: (k, n_targets) float64 on the CPU
    from phi (n_targets, k), i.e. Σ_b K_bb⁻¹ φ_b / B, B the blocks of ``factor`` (B, s, s).
    ``device``: where the solve runs (the CPU, or a CUDA device: float64 there)."""
    blocks = factor.shape[0] if factor.ndim == 3 else 1
    device = kernel_ops.check_device(device)
    if not kernel_ops.cpu_path(device):
        return (kernel_ops.solve(factor, phi.to(device).T, device) / blocks).cpu()
    return kernel_ops.solve(factor, phi.cpu().T) / blocks
