"""The kernel of one checkpoint, K = Φᵀ R Φ + λ I, and solves with its Cholesky factor.

R is I (``"plain"``, the paper's TRAK) or diag(w_i^γ) with w_i = p_i (1 - p_i)
(``"gauss_newton"``; γ = 1 is the Gauss-Newton Hessian of the loss in the model output, which
on logistic regression turns the estimator into the influence function; the default γ is
:data:`DEFAULT_WEIGHT_POWER`). A block-diagonal kernel keeps only B diagonal blocks
of K, one per contiguous group of k/B coordinates, and averages the B estimates: a "virtual
ensemble" from one backward pass. Its factors are kept and solved per block, (B, k/B, k/B):
B times less memory and solve work than one (k, k) block-diagonal matrix, B² less to factor.

A saturated model (p = 1 - Q ≈ 1 on most training rows: trained to near-zero loss, or with
huge logits) leaves the Gauss-Newton weights on a handful of rows; :func:`gauss_newton_weights`
then floors them (the effective-rows guard, measured in docs/estimator.md) and warns.

Where it runs: every function here that costs O(n k²), O(k³) or O(k² T) takes a ``device``
(default the CPU, whose results are bit for bit those of fasttrak before it had one). On a
CUDA device the row blocks are copied there one at a time (never more of Φ than one block),
products run in the requested precision with TF32 off (:func:`full_precision_matmul`), the
gram is summed in float64 there, and eigenvalues, Cholesky factors and solves are float64
there; what is returned as numpy today is still returned as numpy. Any other device is a
ConfigError here (:func:`linalg_device` maps a model's device to the one to use); a failure
on CUDA raises, it never falls back to the CPU.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fasttrak.errors import ConfigError, DataError, NumericalError

Precision = Literal["float32", "float64"]
Weighting = Literal["plain", "gauss_newton"]
WEIGHTINGS = ("plain", "gauss_newton")

SATURATED_Q = 1e-6
"""A training row is saturated when its softmax probability of the label is within this of 1
(Q = 1 - p < 1e-6) or of 0 (p < 1e-6): its Gauss-Newton weight p (1 - p) is then < 1e-6."""

GUARD_FRACTION = 0.1
"""The Gauss-Newton weights must rest on at least ``GUARD_FRACTION · min(n, k)`` effective rows
(see :func:`effective_rows`), else :func:`gauss_newton_weights` floors them. Chosen by its worst
case over 21 trained models in docs/estimator.md ("Saturated models"): 0.05 to 0.2 are within
0.03 of each other there; 0.03 leaves a degenerate digits MLP unguarded (-0.11 LDS)."""

DEFAULT_WEIGHT_POWER = 0.75
"""γ of the default Gauss-Newton kernel Φᵀ R Φ with R = w^γ, w the guarded weights Q (1 - Q)
of :func:`gauss_newton_weights` (γ = 1: the Gauss-Newton Hessian itself; γ = 0: the plain
kernel). Chosen on the quality suite (docs/quality.md, "The kernel"): γ = 0.75 is never more
than 0.006 LDS below the better of the plain and Gauss-Newton kernels and beats both where
neither fits (the CNN and the text model with 5 models: +0.005-0.013). Worst regret over the 8
cases (mean of 3 projection draws): with 5 models below γ = 1's at every k (0.009-0.014
against 0.013-0.021); with 1 model below it over k = 256-4096 together (0.030 against 0.039,
the text model) but 0.003-0.005 above it at k = 256, 2048 and 4096 (two MLPs whose single-model
ridge :data:`SINGLE_MODEL_POWER` raises). γ = 0.5-0.6 lose 0.01-0.025 on the logistic
regression, where γ = 1 is the exact Hessian."""

GAUSS_NEWTON_GUARD = {"guard": "effective_rows", "fraction": GUARD_FRACTION}
"""What identifies the guard in a cache key: a Gauss-Newton gram built with other weights
(e.g. by a fasttrak without the guard) must not be reused."""

Ridge = float | Literal["auto"]
"""A relative ridge (a number: a fraction of the kernel's mean nonzero eigenvalue, see
:func:`ridge_value`) or ``"auto"`` (a point of the kernel's spectrum, see :func:`auto_ridge`)."""

DEFAULT_RIDGE: Ridge = "auto"
"""The default ridge: ``"auto"``, λ = AUTO_RIDGE_SCALE · e_j(G), the kernel's j-th largest
eigenvalue, j = AUTO_RIDGE_QUANTILE · min(n, p) (per kernel block, see :func:`auto_ridge`).
Chosen by its worst case on the quality suite (docs/quality.md): every fixed relative ridge
lost more than 0.02 LDS on some case, because the best one follows how fast the spectrum
decays (0.1 on the digits models, whose kernels have an effective rank of 6-10; 1 to 3 where
it is 50-570)."""

AUTO_RIDGE_QUANTILE = 0.03
"""``"auto"``: λ sits at the eigenvalue of rank round(0.03 · min(n, p)), the kernel's rank
before projection (at least the first, at most the min(n, k, p)-th)."""

AUTO_RIDGE_SCALE = 0.14
"""``"auto"``: λ is this fraction of that eigenvalue. AUTO_RIDGE_QUANTILE was fitted with a
scale of 0.07 on the 8 cases of the quality suite at k = 2048 and M = 5 models (worst regret
0.012; refitted on 7 cases, worst on the 8th 0.013); the scale was then chosen from 0.07,
0.1, 0.14, 0.2 and 0.3 by the worst regret over k = 256 to 4096 and M = 1 and 5
(docs/quality.md): 0.14 keeps M = 5 within 0.022 and brings M = 1 from 0.044 to 0.031."""

SINGLE_MODEL_RANK = 0.1
"""``"auto"`` for a model scored alone (ensemble size 1): the scale is raised when the gram's
relative effective rank s = trace(G)² / ‖G‖²_F / min(n, k, p) exceeds this (see
:func:`single_model_factor`)."""

SINGLE_MODEL_POWER = 1.5
"""``"auto"`` for a model scored alone: the scale is multiplied by (s / SINGLE_MODEL_RANK) to
this power where s exceeds SINGLE_MODEL_RANK. Both constants were fitted on the quality suite
(``benchmarks/quality/single_model_ridge_study.py``, docs/quality.md "One model"): with one
model, the cases whose kernel spectrum is flat (s of 0.13-0.76: many rows, noisy training)
want a 2-30 times larger scale, those with steep spectra (s < 0.1) want 0.14 or less, and
with 5 models every case wants about 0.14 (the average over models damps what the larger
ridge damps for one). Worst regret with one model 0.028 -> 0.020 over 8 cases x 4 k, 0.021
with the constants refitted without the case judged; any constants in [0.085, 0.12] x
[1.25, 2] give the same worst case."""

AUTO_RIDGE_MIN = 1e-3
"""``"auto"``: λ is at least this fraction of the mean nonzero eigenvalue trace / min(n, k, p),
so that a kernel of numerical rank below j (all-equal features) still gets a ridge."""


CPU = torch.device("cpu")

DeviceLike = torch.device | str


def linalg_device(device: DeviceLike) -> torch.device:
    """Where the kernel's linear algebra runs for a model on ``device``: that device when it
    is a CUDA device, else the CPU (MPS and others lack float64, which the factors need)."""
    device = torch.device(device)
    return device if device.type == "cuda" else CPU


def check_device(device: DeviceLike) -> torch.device:
    """``device`` as a torch.device; ConfigError unless it is the CPU or a CUDA device."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device must be 'cpu' or a CUDA device, got {device!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"the kernel's linear algebra runs on the CPU or a CUDA device, not {device} "
            "(float64 is needed); use fasttrak.kernel.linalg_device(device)"
        )
    return device


def cpu_path(device: torch.device) -> bool:
    """Whether work for ``device`` takes the CPU path (numpy and CPU torch, the bits of
    fasttrak before devices) rather than the device path (float64 tensors on the device).
    True exactly for the CPU; tests replace it to run the device path on CPU tensors."""
    return device.type == "cpu"


def _matmul_precision_attributes() -> list[Any]:
    """The per-backend float32 matmul settings of torch >= 2.9 (``fp32_precision``)."""
    owners = [torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)]
    found = []
    for owner in owners:
        try:
            if owner is not None and isinstance(owner.fp32_precision, str):
                found.append(owner)
        except (AttributeError, RuntimeError):
            pass
    return found


@contextlib.contextmanager
def full_precision_matmul(device: DeviceLike = CPU) -> Iterator[None]:
    """Within the block, float32 matrix products on a CUDA ``device`` use full float32
    (no TF32, whatever the user set with ``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.set_float32_matmul_precision`` or ``torch.backends.cuda.matmul.fp32_precision``);
    the previous settings are restored on exit, even on an error. On the CPU it does nothing
    (the CPU path keeps today's bits).

    The settings are process-wide: float32 CUDA matmuls of other threads running at the
    same moment are also exact. fasttrak enters it around each block product only (never
    across a ``yield``), so user code never runs inside it."""
    if torch.device(device).type != "cuda":
        yield
        return
    try:
        legacy: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch >= 2.9 with the new per-backend API in use: none to restore
        legacy = None
    saved = [(owner, owner.fp32_precision) for owner in _matmul_precision_attributes()]
    torch.set_float32_matmul_precision("highest")  # cuBLAS: ieee float32, consistently
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for owner, value in saved:
            owner.fp32_precision = value


def gram(
    blocks: Iterable[np.ndarray | Tensor],
    k: int,
    precision: Precision = "float32",
    device: DeviceLike = CPU,
) -> np.ndarray:
    """Φᵀ Φ from row blocks of Φ (each (rows, k)): block products in ``precision``
    (float32 or float64, never lower), summed in float64. Returns (k, k) float64 numpy.

    ``device``: the CPU (default; numpy blocks) or a CUDA device: each block (numpy, or a
    tensor already there) is copied to it, multiplied there with TF32 off, and summed in
    float64 there; only the (k, k) sum comes back."""
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if precision not in dtypes:
        raise ConfigError(f"precision must be 'float32' or 'float64', got {precision!r}")
    dtype = dtypes[precision]
    device = check_device(device)
    if cpu_path(device):
        total = torch.zeros((k, k), dtype=torch.float64)
        for block in blocks:
            phi = torch.from_numpy(np.ascontiguousarray(block)).to(dtype)
            total += (phi.T @ phi).double()
        return total.numpy()
    total = torch.zeros((k, k), dtype=torch.float64, device=device)
    for block in blocks:
        phi = to_device(block, device).to(dtype)
        with full_precision_matmul(device):
            product = phi.T @ phi
        total += product.double()
    return total.cpu().numpy()


def to_device(block: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """A block of rows on ``device`` (copied without waiting: a pageable source is staged
    before the copy returns, so the numpy buffer may be freed at once)."""
    tensor = block if isinstance(block, Tensor) else torch.from_numpy(np.ascontiguousarray(block))
    return tensor.to(device, non_blocking=True)


class NotPositiveDefiniteError(NumericalError, np.linalg.LinAlgError):
    """The kernel G + λ I has no Cholesky factor (a NumericalError that is also numpy's
    LinAlgError, which fasttrak raised before its error classes)."""


class SaturationWarning(UserWarning):
    """The model's softmax is saturated on so many training rows that the kernel or the
    scores degenerate; the message says how many rows and what to do."""


@dataclass(frozen=True)
class Saturation:
    """How saturated one model is on its n training rows (from its Q = 1 - p).

    rows: n; confident: rows with Q < SATURATED_Q (p = 1 to within 1e-6), of which
    ``zero_q`` have Q exactly 0; wrong: rows with p < SATURATED_Q (confidently wrong);
    effective_rows: :func:`effective_rows` of the Gauss-Newton weights Q (1 - Q).
    """

    rows: int
    confident: int
    zero_q: int
    wrong: int
    effective_rows: float

    @property
    def saturated(self) -> int:
        """Rows whose Gauss-Newton weight p (1 - p) is below ~SATURATED_Q."""
        return self.confident + self.wrong

    def describe(self, model: int | None = None) -> str:
        """'the model's softmax is saturated: p = 1 (to within 1e-06) for N of n training
        rows (exactly, Q = 0, for M), p = 0 (to within 1e-06) for W'."""
        which = "the model's" if model is None else f"model {model}'s"
        within = f"(to within {SATURATED_Q:g})"
        if self.confident or not self.wrong:
            text = f"p = 1 {within} for {self.confident} of {self.rows} training rows"
            if self.zero_q:
                text += f" (exactly, Q = 0, for {self.zero_q})"
            if self.wrong:
                text += f", p = 0 {within} for {self.wrong}"
        else:
            text = f"p = 0 {within} for {self.wrong} of {self.rows} training rows"
        return f"{which} softmax is saturated: {text}"


def effective_rows(weights: np.ndarray) -> float:
    """(Σ w)² / Σ w²: n for equal weights, 1 when one row carries all the weight, 0 for none."""
    w = np.asarray(weights, dtype=np.float64)
    square = float(np.dot(w, w))
    return float(w.sum()) ** 2 / square if square > 0 else 0.0


def saturation(q: np.ndarray) -> Saturation:
    """Count the saturated training rows of one model from its out-to-loss weights Q = 1 - p."""
    q = np.asarray(q, dtype=np.float64)
    return Saturation(
        rows=int(q.size),
        confident=int((q < SATURATED_Q).sum()),
        zero_q=int((q == 0).sum()),
        wrong=int((1.0 - q < SATURATED_Q).sum()),
        effective_rows=effective_rows(q * (1.0 - q)),
    )


SATURATION_FIX = (
    "attribute checkpoints from before the training loss reaches ~0 (earlier epochs), or "
    "models trained with weight decay or label smoothing, or without a temperature that "
    "scales up the logits"
)


def warn_if_saturated(q: np.ndarray, model: int | None = None) -> Saturation:
    """Warn (:class:`SaturationWarning`) when at least half of one model's training rows are
    saturated, or when its Q = 1 - p is 0 on every row (TRAK's scores, which are multiplied by
    the mean of Q over the models, are then 0 for this model's part). For any kernel; with
    ``kernel="gauss_newton"``, :func:`gauss_newton_weights` also warns when the kernel itself
    degenerates. Returns the counts."""
    sat = saturation(q)
    if sat.rows and sat.zero_q == sat.rows:
        warnings.warn(
            f"{sat.describe(model)}: Q = 1 - p is 0 on every training row, so this model adds "
            f"nothing to the scores' Q factor (all scores are 0 if every model is like it); "
            f"{SATURATION_FIX}",
            SaturationWarning,
            stacklevel=2,
        )
    elif sat.rows and 2 * sat.saturated >= sat.rows:
        warnings.warn(
            f"{sat.describe(model)}: the scores are weighted by Q = 1 - p, which spans many "
            "orders of magnitude on such rows, and attribution quality (LDS) fell on every "
            f"saturated model measured in docs/estimator.md; {SATURATION_FIX}",
            SaturationWarning,
            stacklevel=2,
        )
    return sat


def ridge_value(
    gram_matrix: np.ndarray,
    ridge: Ridge,
    num_rows: int,
    num_params: int | None = None,
    device: DeviceLike = CPU,
    *,
    single_model: bool = False,
) -> float:
    """The absolute ridge λ added to the diagonal of G: ``ridge · trace(G) / min(n, k, p)``
    for a number, :func:`auto_ridge` for ``"auto"``.

    G = Φᵀ Φ (k, k) built from ``num_rows`` = n rows of features projected from ``num_params``
    = p gradient coordinates (None: unknown, taken as >= k). G has at most min(n, k, p)
    nonzero eigenvalues (a projection to k > p adds none), and trace(G) / min(n, k, p) is
    their mean, so the best relative ridge drifts neither with k nor with n when p is small.
    ``device``: where the trace and eigenvalues are computed (float64), see :func:`gram`.
    ``single_model``: the model is scored alone (see :func:`auto_ridge`; only "auto" uses it).
    """
    device = check_device(device)
    if not cpu_path(device):
        matrix = _float64_on(gram_matrix, device)
        return _ridge_on_device(matrix, ridge, num_rows, num_params, single_model=single_model)
    if isinstance(ridge, str) and ridge == "auto":
        return auto_ridge(gram_matrix, num_rows, num_params, single_model=single_model)
    if isinstance(ridge, str) or ridge < 0:
        raise ConfigError(f"ridge must be a number >= 0 or 'auto', got {ridge!r}")
    rank = rank_bound(gram_matrix.shape[0], num_rows, num_params)
    return float(ridge * np.trace(gram_matrix) / rank)


def _float64_on(matrix: np.ndarray, device: torch.device) -> Tensor:
    """A numpy matrix as a float64 tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float64)).to(device)


def _ridge_on_device(
    matrix: Tensor,
    ridge: Ridge,
    num_rows: int,
    num_params: int | None = None,
    *,
    single_model: bool = False,
) -> float:
    """:func:`ridge_value` of a float64 (k, k) gram already on its (CUDA) device."""
    rank = rank_bound(matrix.shape[0], num_rows, num_params)
    trace = float(torch.trace(matrix))
    if isinstance(ridge, str) and ridge == "auto":
        j = _auto_ridge_rank(rank, num_rows, num_params)
        eigenvalues = torch.linalg.eigvalsh(matrix)  # ascending
        scale = AUTO_RIDGE_SCALE
        if single_model:
            scale *= single_model_factor(trace, float(torch.sum(matrix * matrix)), rank)
        return max(scale * float(eigenvalues[-j]), AUTO_RIDGE_MIN * trace / rank)
    if isinstance(ridge, str) or ridge < 0:
        raise ConfigError(f"ridge must be a number >= 0 or 'auto', got {ridge!r}")
    return float(ridge * trace / rank)


def _auto_ridge_rank(rank: int, num_rows: int, num_params: int | None) -> int:
    """j of :func:`auto_ridge`: round(AUTO_RIDGE_QUANTILE · min(n, p)) within [1, rank]."""
    return min(rank, max(1, round(AUTO_RIDGE_QUANTILE * min(num_rows, num_params or num_rows))))


def single_model_factor(trace: float, frobenius_squared: float, rank: int) -> float:
    """How much larger the ``"auto"`` ridge's scale is for a model scored alone:
    max(1, s / SINGLE_MODEL_RANK) ** SINGLE_MODEL_POWER, s = trace² / ‖G‖²_F / rank the
    gram's effective rank over its rank bound min(n, k, p) (in (0, 1]: 1 for a flat spectrum,
    1 / rank for a single direction); 1 for a zero kernel (no spectrum to judge)."""
    if frobenius_squared <= 0:
        return 1.0
    relative_rank = trace * trace / frobenius_squared / rank
    return max(1.0, relative_rank / SINGLE_MODEL_RANK) ** SINGLE_MODEL_POWER


def auto_ridge(
    gram_matrix: np.ndarray,
    num_rows: int,
    num_params: int | None = None,
    device: DeviceLike = CPU,
    *,
    single_model: bool = False,
) -> float:
    """λ = c · e_j, e_j the j-th largest eigenvalue of G (k, k), j =
    round(AUTO_RIDGE_QUANTILE · min(n, p)) within [1, min(n, k, p)]; at least AUTO_RIDGE_MIN ·
    trace / min(n, k, p). ``num_params`` None: p unknown, taken as >= n. c = AUTO_RIDGE_SCALE,
    times :func:`single_model_factor` when ``single_model`` (the model's scores are not
    averaged with other models': an ensemble of one).

    The ridge damps the directions below the top few percent of the spectrum of the
    gradient kernel, however fast it decays: a fraction of the mean eigenvalue (a relative
    ridge) is dominated by the top eigenvalues, too large for a flat spectrum and too small for
    a steep one. j counts in the unprojected kernel's rank min(n, p), not in k: a projection
    (or a kernel block) of k coordinates keeps the top of that spectrum, so the same j finds
    the same point of it at every k (3% of min(n, k, p) instead put λ in the steep top of a
    digits model's spectrum at k = 256 and lost 0.09-0.11 LDS there). Costs one symmetric
    eigenvalue decomposition of G (0.6 s for k = 2048 on one CPU core, 0.05 s for four blocks
    of 512; on a CUDA ``device``, computed there in float64)."""
    device = check_device(device)
    if not cpu_path(device):
        matrix = _float64_on(gram_matrix, device)
        return _ridge_on_device(matrix, "auto", num_rows, num_params, single_model=single_model)
    rank = rank_bound(gram_matrix.shape[0], num_rows, num_params)
    j = _auto_ridge_rank(rank, num_rows, num_params)
    eigenvalues = np.linalg.eigvalsh(gram_matrix)  # ascending
    trace = float(np.trace(gram_matrix))
    scale = AUTO_RIDGE_SCALE
    if single_model:
        scale *= single_model_factor(trace, float(np.sum(gram_matrix * gram_matrix)), rank)
    return max(scale * float(eigenvalues[-j]), AUTO_RIDGE_MIN * trace / rank)


def rank_bound(k: int, num_rows: int, num_params: int | None) -> int:
    """min(n, k, p): how many nonzero eigenvalues a (k, k) gram of n rows of features
    projected from p coordinates can have (p None: unknown, taken as >= k). A relative ridge
    is a fraction of trace / rank_bound, the mean of those eigenvalues."""
    return min(num_rows, k, num_params or k)


def gauss_newton_weights(
    q: np.ndarray, k: int | None = None, *, model: int | None = None
) -> np.ndarray:
    """Gauss-Newton weights R of one model's n training rows from its out-to-loss weights
    Q = 1 - p (all n rows at once): (n,) float64.

    R = p (1 - p) = Q (1 - Q), guarded against saturation: when R rests on fewer than
    ``GUARD_FRACTION · min(n, k)`` effective rows (:func:`effective_rows`, (Σ R)² / Σ R²),
    every R_i is raised to a floor f, the smallest with ``effective_rows(max(R, f))`` at that
    target (found by bisection; it only grows with f, and at f = max R it is n). Otherwise R
    is returned untouched, bit for bit today's Gauss-Newton kernel. The floor is a multiple of
    R's own scale, so multiplying every R by a constant changes nothing but the scale.

    Why: a saturated model (trained to near-zero loss, or with large logits) has R ≈ 0 on
    most rows; Φᵀ R Φ is then built from a few rows, its relative ridge shrinks with its
    trace, the scores are inflated (on the digits MLP at temperature 64: 3.6·10⁵ times the
    plain kernel's, 81 times the 1 / mean(R) that uniform weights would give) and the LDS
    collapses (0.694 at temperature 1; 0.134 at 64, where the plain kernel keeps 0.435).
    Measured on 21 trained models of 3 problems (docs/estimator.md, "Saturated models";
    ``benchmarks/saturation.py``) with 14 other candidate guards: this one leaves 13 models
    untouched (all 3 unsaturated ones), brings every digits MLP to within 0.023 of the
    better kernel (guarded scores ≤ 0.9 / mean(R) times the plain kernel's), and its worst
    case is 0.096 LDS below the better of the plain and Gauss-Newton kernels, against 0.301
    for the unguarded Gauss-Newton kernel and 0.213 for the plain one.

    Args:
        q: Q = 1 - p of every training row of one model, in [0, 1].
        k: the projected dimension k (with kernel blocks too: not the block size, so that
            one gram serves every number of blocks); None when unknown: the target is then
            ``GUARD_FRACTION · n`` as if k >= n, stricter than needed when k < n.
        model: the model's index, named in the warning.

    Warns :class:`SaturationWarning` when the floor is applied; raises
    :class:`~fasttrak.errors.NumericalError` when p is exactly 0 or 1 on every row (every
    weight is 0: there is no Gauss-Newton kernel) and :class:`~fasttrak.errors.ConfigError`
    when Q is not in [0, 1] (a task whose Q is not 1 - p: use ``kernel="plain"``).
    """
    q = np.asarray(q, dtype=np.float64)
    if not np.isfinite(q).all():
        raise NumericalError(
            f"{int((~np.isfinite(q)).sum())} out-to-loss weights Q are NaN or infinite; the "
            "stored Q is corrupt or the model's outputs are not finite: featurize again"
        )
    if q.size and (q.min() < 0 or q.max() > 1):
        raise ConfigError(
            "the Gauss-Newton kernel needs out-to-loss weights Q = 1 - p in [0, 1], but the "
            f"task's Q spans [{q.min():.3g}, {q.max():.3g}]; use kernel='plain' for this task"
        )
    r = q * (1.0 - q)
    if r.size == 0:
        return r
    if not (r > 0).any():
        sat = saturation(q)
        raise NumericalError(
            f"{sat.describe(model)}; p is exactly 0 or 1 on every row, so every Gauss-Newton "
            "weight p (1 - p) is 0 and the kernel Φᵀ R Φ is empty. To fix: "
            + SATURATION_FIX
            + (
                "; TRAK's scores are multiplied by Q, which is 0 on every row, so no kernel helps"
                if sat.zero_q == sat.rows
                else "; or use kernel='plain'"
            )
        )
    want = GUARD_FRACTION * min(r.size, r.size if k is None else k)
    have = effective_rows(r)
    if have >= want:
        return r
    floor = _effective_rows_floor(r, want)
    sat = saturation(q)
    warnings.warn(
        f"{sat.describe(model)}: the Gauss-Newton weights p (1 - p) rest on {have:.1f} "
        f"effective rows, fewer than {GUARD_FRACTION:g} min(n, k) = {want:.0f}, so fasttrak "
        f"floors them at {floor:.3g} (without the floor the kernel is nearly singular and "
        "the scores are inflated). Attribution quality falls on such models whatever the "
        f"kernel (docs/estimator.md, 'Saturated models'). To fix: {SATURATION_FIX}",
        SaturationWarning,
        stacklevel=2,
    )
    return np.maximum(r, floor)


def _effective_rows_floor(r: np.ndarray, want: float) -> float:
    """The smallest f in [0, max r] with effective_rows(max(r, f)) >= want (<= n), to float
    precision: effective_rows(max(r, f)) never decreases in f, and is n at f = max r."""
    lo, hi = 0.0, float(r.max())
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if effective_rows(np.maximum(r, mid)) >= want:
            hi = mid
        else:
            lo = mid
    return hi


def block_slices(k: int, blocks: int) -> list[slice]:
    """``blocks`` contiguous, nearly equal coordinate ranges covering [0, k)."""
    if not 1 <= blocks <= k:
        raise ConfigError(f"kernel_blocks must be in [1, k={k}], got {blocks}")
    edges = np.linspace(0, k, blocks + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def block_diagonal_factor(
    gram_matrix: np.ndarray,
    ridge: Ridge,
    num_rows: int,
    blocks: int = 1,
    weighting: Weighting | None = None,
    num_params: int | None = None,
    device: DeviceLike = CPU,
    *,
    single_model: bool = False,
) -> np.ndarray:
    """Lower Cholesky factors of the B diagonal blocks G_bb + λ_b I of the kernel, one per
    :func:`block_slices` range, λ_b = ``ridge_value(G_bb, ridge, n, p)``; blocks=1 is the full
    kernel. Only the diagonal blocks of ``gram_matrix`` are read.

    Returns (B, s, s) float64, s the largest block size (⌈k / B⌉ or ⌊k / B⌋ + 1): a block of
    fewer than s coordinates is padded with the identity, so that the padded system solves to zero
    there (see :func:`solve`). k²/B entries instead of the k² of one block-diagonal (k, k)
    matrix, and B factorisations of (k/B)³/3 flops instead of one of k³/3.

    ``device``: a CUDA device copies the gram there once and computes every block's ridge
    and factor there in float64 (see :func:`gram`); the result is numpy either way.
    ``single_model``: the model is scored alone (the "auto" ridge, :func:`auto_ridge`).
    """
    parts = block_slices(gram_matrix.shape[0], blocks)
    size = max(part.stop - part.start for part in parts)
    device = check_device(device)
    if not cpu_path(device):
        matrix = _float64_on(gram_matrix, device)
        _check_kernel_on_device(matrix, weighting)
        factors = torch.zeros((len(parts), size, size), dtype=torch.float64, device=device)
        for b, part in enumerate(parts):
            s = part.stop - part.start
            factors[b, :s, :s] = _cholesky_on_device(
                matrix[part, part], ridge, num_rows, weighting, num_params, single_model
            )
            factors[b, range(s, size), range(s, size)] = 1.0
        return factors.cpu().numpy()
    factor = np.zeros((len(parts), size, size), dtype=np.float64)
    for b, part in enumerate(parts):
        s = part.stop - part.start
        factor[b, :s, :s] = cholesky_factor(
            gram_matrix[part, part],
            ridge,
            num_rows,
            weighting,
            num_params,
            single_model=single_model,
        )
        factor[b, range(s, size), range(s, size)] = 1.0
    return factor


def cholesky_factor(
    gram_matrix: np.ndarray,
    ridge: Ridge,
    num_rows: int,
    weighting: Weighting | None = None,
    num_params: int | None = None,
    device: DeviceLike = CPU,
    *,
    single_model: bool = False,
) -> np.ndarray:
    """Lower Cholesky factor L of G + λ I in float64, λ = ``ridge_value(G, ridge, n, p)``.

    ``weighting``: the kernel G was built for (``"plain"``: Φᵀ Φ, ``"gauss_newton"``: Φᵀ R Φ),
    or None if unknown; it only makes the error for a zero kernel name the right cause.
    ``device``: where the ridge and the factor are computed (float64, see :func:`gram`);
    the factor is returned as numpy either way.
    """
    device = check_device(device)
    if not cpu_path(device):
        matrix = _float64_on(gram_matrix, device)
        _check_kernel_on_device(matrix, weighting)
        factor = _cholesky_on_device(matrix, ridge, num_rows, weighting, num_params, single_model)
        return factor.cpu().numpy()
    _check_kernel(gram_matrix, weighting)
    lam = ridge_value(gram_matrix, ridge, num_rows, num_params, single_model=single_model)
    matrix = torch.from_numpy(gram_matrix) + lam * torch.eye(
        gram_matrix.shape[0], dtype=torch.float64
    )
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise _not_positive_definite(ridge, lam)
    return factor.numpy()


def _check_kernel(gram_matrix: np.ndarray, weighting: Weighting | None) -> None:
    """NumericalError for a gram with NaN/inf entries or a zero trace."""
    if not np.isfinite(gram_matrix).all():
        raise NumericalError("the kernel has NaN/inf entries; the stored features are corrupt")
    if np.trace(gram_matrix) <= 0:
        raise NumericalError(_zero_kernel_message(weighting))


def _check_kernel_on_device(matrix: Tensor, weighting: Weighting | None) -> None:
    """:func:`_check_kernel` of a float64 gram on its (CUDA) device."""
    if not bool(torch.isfinite(matrix).all()):
        raise NumericalError("the kernel has NaN/inf entries; the stored features are corrupt")
    if float(torch.trace(matrix)) <= 0:
        raise NumericalError(_zero_kernel_message(weighting))


def _not_positive_definite(ridge: Ridge, lam: float) -> NotPositiveDefiniteError:
    return NotPositiveDefiniteError(
        f"the kernel Φᵀ Φ + λ I is not positive definite with ridge={ridge!r} (λ = {lam:.3g}); "
        "pass a larger relative ridge=, e.g. 0.1 (the kernel is singular when k exceeds "
        "the number of examples)"
    )


def _cholesky_on_device(
    matrix: Tensor,
    ridge: Ridge,
    num_rows: int,
    weighting: Weighting | None,
    num_params: int | None,
    single_model: bool = False,
) -> Tensor:
    """The lower factor of ``matrix`` + λ I, all float64 on the matrix's (CUDA) device."""
    if float(torch.trace(matrix)) <= 0:  # a diagonal block of a gram with a nonzero trace
        raise NumericalError(_zero_kernel_message(weighting))
    lam = _ridge_on_device(matrix, ridge, num_rows, num_params, single_model=single_model)
    shifted = matrix.clone()
    shifted.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(shifted)
    if int(info) != 0:
        raise _not_positive_definite(ridge, lam)
    return factor


_NO_GRADIENT = (
    "every training feature is zero: the selected parameters get no gradient; check params= "
    "and the model's output"
)
_ZERO_WEIGHTS = (
    "every training row with a nonzero feature has Gauss-Newton weight p (1 - p) = 0: the "
    "model's softmax is saturated (p = 0 or 1) on those rows; "
    + SATURATION_FIX
    + ", or use kernel='plain'"
)


def _zero_kernel_message(weighting: Weighting | None) -> str:
    """Why a kernel's trace is 0, by kernel: zero features, or zero Gauss-Newton weights."""
    if weighting == "plain":
        return f"the kernel Φᵀ Φ is zero (its trace is 0): {_NO_GRADIENT}"
    if weighting == "gauss_newton":
        return (
            f"the Gauss-Newton kernel Φᵀ R Φ is zero (its trace is 0): either {_NO_GRADIENT} "
            f"(if kernel='plain' fails too), or {_ZERO_WEIGHTS}"
        )
    return (
        f"the kernel is zero (its trace is 0): either {_NO_GRADIENT}, or, with "
        f"kernel='gauss_newton', {_ZERO_WEIGHTS}"
    )


def solve(factor: np.ndarray, rhs: Tensor, device: DeviceLike = CPU) -> Tensor:
    """K⁻¹ rhs via Cholesky factors; rhs (k, T) -> (k, T) float64, on ``device`` (default the
    CPU; a CUDA device: ``factor`` and ``rhs`` are copied there and solved in float64 there).

    ``factor`` is either one (k, k) lower factor (:func:`cholesky_factor`), or the (B, s, s)
    per-block factors of :func:`block_diagonal_factor`: then each block of rows of ``rhs``
    (the :func:`block_slices` of k into B) is solved with its own block, i.e. K is the
    block-diagonal kernel, in B small solves of 2 (k/B)² T flops instead of one of 2 k² T.
    """
    device = check_device(device)
    rhs = rhs.to(device).double()
    if factor.ndim == 2:
        return torch.cholesky_solve(rhs, torch.from_numpy(factor).to(device))
    blocks, size = factor.shape[0], factor.shape[1]
    k, targets = rhs.shape
    factors = torch.from_numpy(factor).to(device)
    if blocks * size == k:  # equal blocks: the rows of rhs are already (B, s, T)
        return torch.cholesky_solve(rhs.reshape(blocks, size, targets), factors).reshape(k, -1)
    parts = block_slices(k, blocks)
    if max(part.stop - part.start for part in parts) != size:
        raise DataError(
            f"factors of shape {tuple(factor.shape)} do not fit k = {k} rows; the factors "
            "were built for another k or number of kernel blocks"
        )
    padded = rhs.new_zeros((blocks, size, targets))
    for b, part in enumerate(parts):
        padded[b, : part.stop - part.start] = rhs[part]
    solved = torch.cholesky_solve(padded, factors)
    return torch.cat([solved[b, : part.stop - part.start] for b, part in enumerate(parts)])
