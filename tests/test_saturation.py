"""Saturated models: the guard on the Gauss-Newton weights, its warning, and the errors that
name the real cause (docs/estimator.md, "Saturated models"; benchmarks/saturation.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fasttrak as ft
from fasttrak import kernel
from fasttrak.errors import ConfigError, DataError, FastTrakError, NumericalError

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import load_breast_cancer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402


@pytest.fixture(scope="module")
def logreg():
    """Breast-cancer logistic regression (C=0.1) as in tests/test_quality.py: nn.Linear(30, 2)
    with logits (0, w·x + b), unprojected. The margin of label y is s (l_1 - l_0), s = ±1,
    so its gradient in (weight rows 0 and 1, bias) is φ = s (-x, x, -1, 1): TRAK's features
    with projector="identity", k = 62. Returns train features (400, 62), target features
    (40, 62) and the train margins."""
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    order = np.random.default_rng(0).permutation(len(x))
    train, target = order[:400], order[400:440]
    clf = LogisticRegression(C=0.1, max_iter=1000, tol=1e-10).fit(x[train], y[train])

    def features(rows):
        sign = np.where(y[rows] == 1, 1.0, -1.0)
        ones = np.ones((len(rows), 1))
        phi = sign[:, None] * np.hstack([-x[rows], x[rows], -ones, ones])
        return phi, sign * clf.decision_function(x[rows])

    (phi, margin), (phi_t, _) = features(train), features(target)
    return phi, phi_t, margin


def out_to_loss(margin: np.ndarray, temperature: float) -> np.ndarray:
    """Q = sigmoid(-margin) of the model with its logits times ``temperature``, in float32
    as the task computes and the store keeps it."""
    return torch.sigmoid(-torch.tensor(temperature * margin, dtype=torch.float32)).double().numpy()


def scores(phi, phi_t, q, weights) -> np.ndarray:
    """Q_i φ(t)ᵀ (Φᵀ W Φ + λ I)⁻¹ φ_i with the library's kernel functions: (targets, n)."""
    rows = phi * np.sqrt(weights)[:, None]
    factor = kernel.block_diagonal_factor(kernel.gram([rows], phi.shape[1], "float64"), 0.1, len(q))
    return q[None, :] * (phi @ kernel.solve(factor, torch.from_numpy(phi_t.T)).numpy()).T


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


# ---------------------------------------------------------------- the guard


def test_guard_leaves_unsaturated_weights_bit_for_bit(logreg):
    """The model of tests/test_quality.py (1% of rows saturated): R = Q (1 - Q) exactly, with
    or without k, and no warning; so its Gauss-Newton kernel is today's, bit for bit."""
    phi, _, margin = logreg
    q = out_to_loss(margin, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in (phi.shape[1], None):
            np.testing.assert_array_equal(kernel.gauss_newton_weights(q, k), q * (1.0 - q))
        assert kernel.effective_rows(q * (1 - q)) < 0.5 * len(q)  # not a trivially flat R
        # Typical unsaturated weights, n = 2000 rows, k = 1024: untouched too.
        q_wide = np.random.default_rng(0).uniform(1e-4, 0.6, 2000).astype(np.float32)
        r = kernel.gauss_newton_weights(q_wide, 1024)
    np.testing.assert_array_equal(r, q_wide.astype(np.float64) * (1 - q_wide.astype(np.float64)))
    rows = phi * np.sqrt(kernel.gauss_newton_weights(q, 62))[:, None]
    np.testing.assert_array_equal(
        kernel.gram([rows], 62), kernel.gram([phi * np.sqrt(q * (1 - q))[:, None]], 62)
    )


def test_saturated_scores_stay_within_a_bounded_factor_of_the_plain_kernels(logreg):
    """Logits x 30 (97% of rows saturated; the weights rest on ~2 rows): unguarded, the
    Gauss-Newton scores exceed the plain kernel's by ~18 / mean(R) (a kernel with uniform
    weights mean(R) would give 1 / mean(R)); guarded, by less than 2 / mean(R), as on the
    unsaturated model (1.2 / mean(R)). Every guarded model of the benchmark stays below 1.5."""
    phi, phi_t, margin = logreg
    k = phi.shape[1]
    q = out_to_loss(margin, 30.0)
    r = q * (1.0 - q)
    assert kernel.saturation(q).saturated > 0.9 * len(q) and kernel.effective_rows(r) < 3
    with pytest.warns(kernel.SaturationWarning):
        guarded = kernel.gauss_newton_weights(q, k)
    plain = rms(scores(phi, phi_t, q, np.ones_like(q)))
    unguarded_factor = rms(scores(phi, phi_t, q, r)) / plain * r.mean()
    guarded_factor = rms(scores(phi, phi_t, q, guarded)) / plain * r.mean()
    assert unguarded_factor > 10, unguarded_factor
    assert guarded_factor < 2, guarded_factor
    # The floor is the smallest that gives GUARD_FRACTION * min(n, k) effective rows.
    want = kernel.GUARD_FRACTION * min(len(q), k)
    floor = guarded.min()
    assert kernel.effective_rows(guarded) >= want
    assert kernel.effective_rows(np.maximum(r, 0.999 * floor)) < want
    np.testing.assert_array_equal(guarded, np.maximum(r, floor))


def test_guard_is_scale_free():
    """Multiplying every weight by c multiplies the floor by c: only the kernel's scale moves."""
    r = np.exp(-np.random.default_rng(1).uniform(0, 40, 500))
    floor = kernel._effective_rows_floor(r, 50.0)
    np.testing.assert_allclose(kernel._effective_rows_floor(1e-9 * r, 50.0), 1e-9 * floor)
    assert kernel.effective_rows(np.maximum(r, floor)) >= 50.0
    assert kernel.effective_rows(r) < 50.0


def test_guard_warning_names_the_cause_and_the_fix(logreg):
    _, _, margin = logreg
    q = out_to_loss(margin, 100.0)
    with pytest.warns(kernel.SaturationWarning) as caught:
        kernel.gauss_newton_weights(q, 62, model=3)
    message = str(caught[0].message)
    assert "model 3's softmax is saturated: p = 1" in message
    assert f"for {kernel.saturation(q).confident} of 400" in message
    assert "effective rows" in message and "floors them" in message
    assert "before the training loss reaches" in message and "weight decay" in message


def test_warn_if_saturated():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel.warn_if_saturated(np.full(10, 0.3))  # not saturated: silent
    with pytest.warns(kernel.SaturationWarning, match="p = 1 .* for 6 of 10"):
        kernel.warn_if_saturated(np.r_[np.zeros(3), np.full(3, 1e-8), np.full(4, 0.3)])
    with pytest.warns(kernel.SaturationWarning, match="Q = 1 - p is 0 on every training row"):
        sat = kernel.warn_if_saturated(np.zeros(5), model=2)
    assert (sat.rows, sat.confident, sat.zero_q, sat.wrong) == (5, 5, 5, 0)


# ---------------------------------------------------------------- errors that name the cause


@pytest.mark.parametrize(
    "q, expected",
    [
        (np.zeros(40), "no kernel helps"),  # p = 1 everywhere: Q = 0, the scores are 0
        (np.ones(40), "use kernel='plain'"),  # p = 0 everywhere
        (np.r_[np.zeros(20), np.ones(20)], "use kernel='plain'"),
    ],
)
def test_all_saturated_model_says_so_not_check_params(q, expected):
    with pytest.raises(NumericalError) as info:
        kernel.gauss_newton_weights(q, 8, model=1)
    message = str(info.value)
    assert "model 1's softmax is saturated" in message and "of 40 training rows" in message
    assert "p is exactly 0 or 1 on every row" in message and expected in message
    assert "every Gauss-Newton weight p (1 - p) is 0" in message
    assert "check params" not in message
    assert isinstance(info.value, FloatingPointError)


def test_zero_kernel_message_distinguishes_features_from_weights():
    zero = np.zeros((4, 4))
    with pytest.raises(NumericalError, match="every training feature is zero.*check params="):
        kernel.cholesky_factor(zero, 0.1, 10, "plain")
    with pytest.raises(NumericalError) as info:
        kernel.block_diagonal_factor(zero, 0.1, 10, 2, weighting="gauss_newton")
    assert "Gauss-Newton weight p (1 - p) = 0" in str(info.value)
    assert "saturated" in str(info.value)
    with pytest.raises(NumericalError, match="kernel='gauss_newton'"):
        kernel.cholesky_factor(zero, 0.1, 10)


def saturated_linear_model(margin: float, n: int = 60):
    """A linear model whose margin is about ``margin`` on every row (one-hot inputs)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.nn.functional.one_hot(y, 3).float() + 0.1 * torch.rand(n, 3, generator=gen)
    model = torch.nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(margin * torch.eye(3))
        model.bias.zero_()
    return model, (x, y)


def test_trak_on_a_fully_saturated_model_names_the_cause():
    """Margin ~500 on every row: Q = 0 in float32, every Gauss-Newton weight is 0."""
    model, data = saturated_linear_model(500.0)
    trak = ft.TRAK(model, projector="identity", progress=False)
    trak.featurize(data)
    with pytest.raises(NumericalError, match="softmax is saturated") as info:
        trak.score((data[0][:2], data[1][:2]))
    assert "check params" not in str(info.value)


def test_trak_warns_on_a_saturated_model():
    """Margin ~30: Q ~ 1e-13 on every row but one. The guard floors the weights and warns."""
    model, (x, y) = saturated_linear_model(30.0)
    x[0] = torch.tensor([0.5, 0.45, 0.4])  # one row the model is unsure of
    trak = ft.TRAK(model, projector="identity", progress=False)
    trak.featurize((x, y))
    with pytest.warns(kernel.SaturationWarning, match="softmax is saturated"):
        result = np.asarray(trak.score((x[:2], y[:2])))
    assert np.isfinite(result).all()


# ---------------------------------------------------------------- error classes


def test_kernel_errors_are_fasttrak_errors_with_builtin_bases():
    with pytest.raises(ConfigError, match="ridge must be a number >= 0"):
        kernel.ridge_value(np.eye(2), -1.0, 5)
    with pytest.raises(ConfigError, match="kernel_blocks"):
        kernel.block_slices(5, 6)
    with pytest.raises(ConfigError, match="kernel='plain'"):
        kernel.gauss_newton_weights(np.array([0.2, 1.5]))
    with pytest.raises(ConfigError, match="precision"):
        kernel.gram([np.ones((2, 2))], 2, "float16")  # type: ignore[arg-type]
    with pytest.raises(NumericalError, match="NaN"):
        kernel.gauss_newton_weights(np.array([0.2, np.nan]))
    with pytest.raises(NumericalError, match="NaN/inf"):
        kernel.cholesky_factor(np.full((2, 2), np.nan), 0.1, 5)
    with pytest.raises(np.linalg.LinAlgError, match="larger relative ridge") as info:
        kernel.cholesky_factor(np.array([[1.0, 2.0], [2.0, 1.0]]), 0.0, 5)
    assert isinstance(info.value, NumericalError)
    with pytest.raises(DataError, match="do not fit"):
        kernel.solve(np.ones((3, 4, 4)), torch.zeros(13, 1))  # k = 13 needs blocks of 5
    for error in (ConfigError, DataError, NumericalError, kernel.NotPositiveDefiniteError):
        assert issubclass(error, FastTrakError)
    assert issubclass(ConfigError, ValueError) and issubclass(NumericalError, FloatingPointError)
