"""ft.evaluate.removal: retrain without each target's top proponents, against random removal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_data, make_mlp

import fasttrak as ft
from fasttrak.errors import ConfigError, ConfigTypeError, DataError, DataTypeError
from fasttrak.evaluate import RemovalResult, removal

N, D, LAMBDA = 200, 3, 1e-2


def toy_problem():
    """Two overlapping Gaussian classes in 2-D (+ a bias column), labels ±1; 8 targets
    drawn from the same distribution."""
    rng = np.random.default_rng(0)
    y = rng.choice([-1.0, 1.0], N + 8)
    x = np.column_stack([rng.normal(0, 1, (N + 8, 2)) + 1.0 * y[:, None], np.ones(N + 8)])
    return x[:N], y[:N], x[N:], y[N:]


X, Y, XT, YT = toy_problem()


def fit(mask: np.ndarray) -> np.ndarray:
    """L2-regularised logistic regression on the rows in ``mask`` by Newton's method."""
    x, y = X[mask], Y[mask]
    w = np.zeros(D)
    for _ in range(25):
        p = 1.0 / (1.0 + np.exp(y * (x @ w)))  # σ(-y w·x)
        grad = -(x * (y * p)[:, None]).sum(0) + LAMBDA * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + LAMBDA * np.eye(D)
        w -= np.linalg.solve(hess, grad)
    return w


def train_fn(mask: np.ndarray, seed: int) -> np.ndarray:
    """The targets' margins y_t w·x_t, plus a little seed-dependent training noise."""
    w = fit(mask) + 1e-3 * np.random.default_rng(seed).normal(size=D)
    return YT * (XT @ w)


def influence_scores() -> np.ndarray:
    """(8, N) influence-function support of each training row for each target: minus the
    first-order change of the target's margin when the row is removed."""
    w = fit(np.ones(N, dtype=bool))
    p = 1.0 / (1.0 + np.exp(Y * (X @ w)))
    hess = (X * (p * (1 - p))[:, None]).T @ X + LAMBDA * np.eye(D)
    grads = X * (Y * p)[:, None]  # -∇ℓ_i
    return (YT[:, None] * XT) @ np.linalg.solve(hess, grads.T)


class Counting:
    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, mask: np.ndarray, seed: int) -> np.ndarray:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("stopped")
        self.calls += 1
        return train_fn(mask, seed)


def test_top_proponents_lower_the_output_more_than_random():
    scores = influence_scores()
    result = removal(train_fn, scores, k=20, num_random=4, seeds=2, progress=False)
    assert isinstance(result, RemovalResult)
    t = len(YT)
    assert result.full.shape == (2, t) and result.top.shape == (2, t)
    assert result.random.shape == (4, 2, t) and result.removed.shape == (t, 20)
    assert result.trained == 2 * (1 + t + 4)
    np.testing.assert_array_equal(result.removed[3], np.argsort(-scores[3], kind="stable")[:20])
    assert (result.top_delta < 0).all()
    assert result.fraction_lower == 1.0
    assert result.top_mean < result.random_mean - 0.5
    assert result.difference_mean < 0 and result.difference_mean + 2 * result.difference_se < 0
    # Paired by seed: the full model of seed s is the one each removal is compared with.
    np.testing.assert_allclose(result.full[0], train_fn(np.ones(N, dtype=bool), 0)[np.arange(t)])
    text = result.summary()
    assert "top-20 proponents" in text and f"{t}/{t} targets" in text and str(result) == text


def test_random_removal_is_shared_and_subset_of_targets():
    scores = influence_scores()
    result = removal(train_fn, scores, k=5, targets=[6, 1], num_random=2, seeds=[3], progress=False)
    np.testing.assert_array_equal(result.targets, [6, 1])
    assert result.seeds == (3,)
    assert result.top.shape == (1, 2) and result.random.shape == (2, 1, 2)
    full = train_fn(np.ones(N, dtype=bool), 3)
    np.testing.assert_allclose(result.full[0], full[[6, 1]])
    mask = np.ones(N, dtype=bool)
    mask[result.removed[0]] = False
    np.testing.assert_allclose(result.top[0, 0], train_fn(mask, 3)[6])
    assert np.isnan(removal(train_fn, scores, k=5, targets=[0], seeds=1, progress=False).top_se)


def test_cache_resumes_and_a_second_call_trains_nothing(tmp_path):
    scores = influence_scores()
    options = dict(k=10, targets=[0, 1, 2], num_random=2, seeds=2, cache_dir=tmp_path / "c")
    total = 2 * (1 + 3 + 2)
    stopped = Counting(fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        removal(stopped, scores, progress=False, **options)
    assert len(list((tmp_path / "c").glob("run_*.npy"))) == 4
    resumed = Counting()
    first = removal(resumed, scores, progress=False, **options)
    assert resumed.calls == total - 4 and first.trained == total - 4
    again = Counting()
    second = removal(again, scores, progress=False, **options)
    assert again.calls == 0 and second.trained == 0
    for name in ("full", "top", "random", "removed"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    # Other targets reuse the full-data and random models: only the new targets train.
    more = Counting()
    removal(more, scores, progress=False, **{**options, "targets": [0, 5]})
    assert more.calls == 2  # target 5, two seeds
    manifest = json.loads((tmp_path / "c" / "removal.json").read_text())
    assert manifest["n_train"] == N and manifest["n_targets"] == len(YT)
    with pytest.raises(ConfigError, match="another request.*key"):
        removal(train_fn, scores, progress=False, key="other", **options)


def test_scores_object_uses_its_streamed_topk(tmp_path):
    x, y = make_data(30)
    trak = ft.TRAK(make_mlp(), projector="dense", proj_dim=8, progress=False)
    trak.featurize((x, y), checkpoints=[make_mlp(seed=1).state_dict()])
    scores = trak.score((x[:4], y[:4]))

    def fn(mask, seed):
        return np.full(4, float(mask.sum()))

    result = removal(fn, scores, k=3, targets=[2, 0], num_random=1, seeds=1, progress=False)
    np.testing.assert_array_equal(result.removed, scores.topk(3).proponents[[2, 0]])
    np.testing.assert_allclose(result.top_delta, [-3.0, -3.0])
    np.testing.assert_allclose(result.random_delta, [-3.0, -3.0])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k": 0}, ConfigError, "k must be >= 1"),
        ({"k": N}, ConfigError, r"k must be in \[1, 199\]"),
        ({"k": 2.5}, ConfigTypeError, "k must be an int"),
        ({"targets": 3}, ConfigTypeError, r"\[3\]"),
        ({"targets": [0, 8]}, ConfigError, r"distinct indices in \[0, 8\)"),
        ({"targets": []}, ConfigError, "empty"),
        ({"num_random": 0}, ConfigError, "num_random must be >= 1"),
        ({"seeds": 0}, ConfigError, "seeds must be >= 1"),
        ({"seeds": [1, 1]}, ConfigError, "distinct"),
        ({"seeds": "3"}, ConfigTypeError, "count"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        removal(train_fn, influence_scores(), progress=False, **kwargs)


def test_bad_scores_and_train_fn():
    scores = influence_scores()
    with pytest.raises(ConfigTypeError, match="callable"):
        removal(None, scores)
    with pytest.raises(DataError, match="2-D"):
        removal(train_fn, scores[0], progress=False)
    with pytest.raises(DataError, match="no targets"):
        removal(train_fn, scores[:0], progress=False)
    with pytest.raises(DataTypeError, match="numeric"):
        removal(train_fn, np.array([["a", "b"]]), progress=False)
    with pytest.raises(ConfigTypeError, match="ft.Scores"):
        removal(train_fn, None, progress=False)
    bad = scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        removal(train_fn, bad, progress=False)
    # Scores of other targets than train_fn returns (here: 3 of 8 rows).
    with pytest.raises(DataError, match=r"1-D array of 3 \(scores are \(n_targets, n_train\) = "):
        removal(train_fn, scores[:3], k=2, seeds=1, num_random=1, progress=False)
    with pytest.raises(DataError, match="NaN or infinite"):
        removal(lambda m, s: np.full(8, np.inf), scores, k=2, seeds=1, progress=False)
