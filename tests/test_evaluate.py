"""Tests for fasttrak.evaluate: subsets, LDS and the retrain harness."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from fasttrak.evaluate import LDSResult, lds, retrain, sample_subsets

# ---------------------------------------------------------------- sample_subsets


def test_sample_subsets_shape_and_counts():
    masks = sample_subsets(101, 7, alpha=0.3, seed=1)
    assert masks.shape == (7, 101)
    assert masks.dtype == bool
    assert (masks.sum(axis=1) == round(0.3 * 101)).all()


def test_sample_subsets_deterministic_and_seed_dependent():
    a = sample_subsets(50, 10, seed=3)
    b = sample_subsets(50, 10, seed=3)
    c = sample_subsets(50, 10, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({row.tobytes() for row in a}) > 1  # rows differ from each other


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"n": 0, "num_subsets": 3}, ValueError, "n must be >= 1"),
        ({"n": 10, "num_subsets": 0}, ValueError, "num_subsets must be >= 1"),
        ({"n": 10, "num_subsets": 3, "alpha": 0.0}, ValueError, "strictly between 0 and 1"),
        ({"n": 10, "num_subsets": 3, "alpha": 1.0}, ValueError, "strictly between 0 and 1"),
        ({"n": 10, "num_subsets": 3, "alpha": 0.01}, ValueError, "increase alpha or n"),
        ({"n": 10.0, "num_subsets": 3}, TypeError, "n must be an int"),
        ({"n": 10, "num_subsets": 3, "alpha": "0.5"}, TypeError, "alpha must be a float"),
        ({"n": 10, "num_subsets": 3, "seed": -1}, ValueError, "seed must be >= 0"),
    ],
)
def test_sample_subsets_bad_args(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sample_subsets(**kwargs)


# ---------------------------------------------------------------- lds


def _oracle_lds(scores, masks, outputs):
    """Slow reference: scipy.stats.spearmanr per target."""
    preds = masks.astype(float) @ scores.T.astype(float)
    return np.array([spearmanr(preds[:, t], outputs[:, t]).statistic for t in range(len(scores))])


def test_lds_matches_spearmanr_oracle():
    rng = np.random.default_rng(0)
    masks = sample_subsets(200, 40, seed=0)
    scores = rng.normal(size=(25, 200))
    outputs = rng.normal(size=(40, 25)) + 0.1 * (masks @ scores.T)
    outputs[:5, 3] = outputs[5, 3]  # ties in the true outputs
    res = lds(scores, masks, outputs)
    expected = _oracle_lds(scores, masks, outputs)
    np.testing.assert_allclose(res.per_target, expected, rtol=1e-12, atol=1e-12)
    assert res.num_valid == 25
    assert res.mean == pytest.approx(expected.mean())
    assert res.stderr == pytest.approx(expected.std(ddof=1) / np.sqrt(25))
    assert res.per_target.dtype == np.float64


def test_lds_blocked_prediction_matches(monkeypatch):
    # fasttrak.evaluate.lds is the function (re-exported), so fetch the module explicitly.
    lds_module = importlib.import_module("fasttrak.evaluate.lds")
    rng = np.random.default_rng(8)
    masks = sample_subsets(50, 23, seed=8)
    scores = rng.normal(size=(4, 50))
    outputs = rng.normal(size=(23, 4))
    full = lds(scores, masks, outputs).per_target
    monkeypatch.setattr(lds_module, "_BLOCK_ELEMENTS", 120)  # blocks of 2 subsets
    np.testing.assert_allclose(lds(scores, masks, outputs).per_target, full, atol=1e-12)


def test_lds_ties_in_predictions_match_oracle():
    rng = np.random.default_rng(1)
    masks = sample_subsets(30, 50, seed=1)
    scores = rng.integers(-1, 2, size=(6, 30)).astype(float)  # many tied predictions
    outputs = rng.normal(size=(50, 6))
    np.testing.assert_allclose(
        lds(scores, masks, outputs).per_target, _oracle_lds(scores, masks, outputs), atol=1e-12
    )


def test_lds_perfect_and_negated():
    rng = np.random.default_rng(2)
    masks = sample_subsets(80, 30, seed=2)
    scores = rng.normal(size=(4, 80))
    outputs = np.exp(0.3 * (masks @ scores.T))  # monotone transform of a linear datamodel
    assert lds(scores, masks, outputs).mean == pytest.approx(1.0)
    assert lds(-scores, masks, outputs).mean == pytest.approx(-1.0)
    np.testing.assert_allclose(lds(-scores, masks, outputs).per_target, -1.0)


def test_lds_constant_column_is_nan_and_excluded():
    rng = np.random.default_rng(3)
    masks = sample_subsets(60, 20, seed=3)
    scores = rng.normal(size=(3, 60))
    outputs = masks @ scores.T
    outputs[:, 1] = 7.0  # constant true output
    scores[2, 0] = np.nan  # non-finite prediction
    res = lds(scores, masks, outputs)
    assert np.isnan(res.per_target[1]) and np.isnan(res.per_target[2])
    assert res.per_target[0] == pytest.approx(1.0)
    assert res.num_valid == 1
    assert res.mean == pytest.approx(1.0)
    assert np.isnan(res.stderr)
    assert str(res) == "LDS 1.000 ± nan (1 of 3 targets)"


def test_lds_constant_predictions_are_nan():
    rng = np.random.default_rng(4)
    masks = sample_subsets(20, 10, seed=4)
    scores = rng.normal(size=(2, 20))
    scores[0] = 0.0
    res = lds(scores, masks, rng.normal(size=(10, 2)))
    assert np.isnan(res.per_target[0]) and res.num_valid == 1


def test_lds_all_undefined_raises():
    masks = sample_subsets(20, 10, seed=5)
    scores = np.random.default_rng(5).normal(size=(3, 20))
    with pytest.raises(ValueError, match="undefined for all 3 targets"):
        lds(scores, masks, np.ones((10, 3)))


def test_lds_result_str_and_frozen():
    rng = np.random.default_rng(6)
    masks = sample_subsets(40, 15, seed=6)
    res = lds(rng.normal(size=(5, 40)), masks, rng.normal(size=(15, 5)))
    assert isinstance(res, LDSResult)
    assert str(res) == f"LDS {res.mean:.3f} ± {res.stderr:.3f} (5 targets)"
    with pytest.raises(AttributeError):
        res.mean = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("scores_shape", "masks_shape", "outputs_shape", "match"),
    [
        ((4, 10), (6, 9), (6, 4), "masks has 9 columns but scores has 10 train examples"),
        ((4, 10), (6, 10), (5, 4), "outputs has 5 rows but masks has 6 subsets"),
        ((4, 10), (6, 10), (6, 3), "outputs has 3 columns but scores has 4 targets"),
        ((4, 10), (1, 10), (1, 4), "at least 2 subsets"),
        ((10,), (6, 10), (6, 1), r"scores must be 2-D \(n_targets, n_train\)"),
        ((1, 10), (6, 10), (6,), r"reshape\(-1, 1\)"),
        ((1, 10), (10,), (6, 1), r"masks must be 2-D"),
    ],
)
def test_lds_shape_errors(scores_shape, masks_shape, outputs_shape, match):
    with pytest.raises(ValueError, match=match):
        lds(np.ones(scores_shape), np.ones(masks_shape, dtype=bool), np.ones(outputs_shape))


def test_lds_bad_mask_values_and_dtypes():
    scores, outputs = np.ones((2, 5)), np.ones((3, 2))
    with pytest.raises(ValueError, match="only 0/1"):
        lds(scores, np.full((3, 5), 2), outputs)
    with pytest.raises(TypeError, match="masks must hold bool or 0/1"):
        lds(scores, np.full((3, 5), "a"), outputs)
    with pytest.raises(TypeError, match="scores must be a real numeric array"):
        lds(np.ones((2, 5), dtype=complex), np.ones((3, 5), dtype=bool), outputs)


def test_lds_accepts_array_protocol_and_01_masks():
    rng = np.random.default_rng(7)
    masks = sample_subsets(30, 12, seed=7)
    scores = rng.normal(size=(3, 30)).astype(np.float32)
    outputs = rng.normal(size=(12, 3))

    class FakeScores:
        def __array__(self, dtype=None, copy=None):
            return scores if dtype is None else scores.astype(dtype)

    expected = lds(scores, masks, outputs).per_target
    np.testing.assert_array_equal(lds(FakeScores(), masks, outputs).per_target, expected)
    np.testing.assert_array_equal(lds(scores, masks.astype(np.int8), outputs).per_target, expected)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    log2_scale=st.integers(-8, 8),
    shifts=st.lists(st.integers(-1000, 1000), min_size=5, max_size=5),
)
def test_lds_invariant_to_positive_scale_and_per_target_shift(seed, log2_scale, shifts):
    # Integer scores, power-of-two scale and integer shifts keep float64 arithmetic exact,
    # so the ranks (and the LDS) must be identical, not just close.
    rng = np.random.default_rng(seed)
    masks = sample_subsets(24, 15, alpha=0.5, seed=seed)  # equal subset sizes
    scores = rng.integers(-50, 50, size=(5, 24)).astype(np.float64)
    outputs = rng.normal(size=(15, 5)) + masks @ scores.T / 100
    base = lds(scores, masks, outputs)
    moved = lds(scores * 2.0**log2_scale + np.array(shifts, float)[:, None], masks, outputs)
    np.testing.assert_array_equal(moved.per_target, base.per_target)
    assert moved.mean == base.mean


# ---------------------------------------------------------------- retrain


class CountingTrainer:
    """Deterministic fake trainer: output = mask-weighted sums + seed; records calls."""

    def __init__(self, n_targets=3, fail_on=None):
        self.calls: list[tuple[int, int]] = []
        self.n_targets = n_targets
        self.fail_on = fail_on

    def __call__(self, mask, seed):
        assert mask.dtype == bool and mask.ndim == 1
        if self.fail_on is not None and self.fail_on(seed):
            raise RuntimeError(f"boom at seed {seed}")
        self.calls.append((mask.sum(), seed))
        weights = np.arange(1, self.n_targets + 1, dtype=float)
        return weights * mask.sum() + np.arange(mask.size)[mask].sum() / 100 + seed


def test_retrain_counts_calls_and_averages_seeds():
    masks = sample_subsets(12, 5, seed=0)
    trainer = CountingTrainer()
    out_masks, outputs = retrain(trainer, masks, seeds_per_subset=3, progress=False)
    assert [seed for _, seed in trainer.calls] == list(range(15))
    np.testing.assert_array_equal(out_masks, masks)
    assert outputs.shape == (5, 3) and outputs.dtype == np.float64
    for s in range(5):
        base = np.arange(1, 4) * masks[s].sum() + np.arange(12)[masks[s]].sum() / 100
        np.testing.assert_allclose(outputs[s], base + np.mean([3 * s, 3 * s + 1, 3 * s + 2]))


def test_retrain_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    masks = sample_subsets(8, 3, seed=1)

    def train_fn(mask, seed):
        return torch.tensor([float(mask.sum()), float(seed)], requires_grad=True) * 2

    _, outputs = retrain(train_fn, masks, progress=False)
    np.testing.assert_array_equal(outputs, [[8.0, 0.0], [8.0, 2.0], [8.0, 4.0]])


def test_retrain_cache_reuse(tmp_path):
    masks = sample_subsets(12, 6, seed=0)
    first = CountingTrainer()
    _, out1 = retrain(first, masks, seeds_per_subset=2, cache_dir=tmp_path, progress=False)
    assert len(first.calls) == 12
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["n"] == 12 and manifest["num_subsets"] == 6
    assert manifest["seeds_per_subset"] == 2 and manifest["n_targets"] == 3
    assert np.load(tmp_path / "subset_000004.npy").shape == (2, 3)
    assert not list(tmp_path.glob("*.tmp"))

    second = CountingTrainer()
    masks2, out2 = retrain(second, masks, seeds_per_subset=2, cache_dir=tmp_path, progress=False)
    assert second.calls == []
    np.testing.assert_array_equal(out2, out1)
    np.testing.assert_array_equal(masks2, masks)


def test_retrain_resumes_after_failure(tmp_path):
    masks = sample_subsets(12, 6, seed=0)
    failing = CountingTrainer(fail_on=lambda seed: seed == 3)
    with pytest.raises(RuntimeError, match="boom"):
        retrain(failing, masks, cache_dir=tmp_path, progress=False)
    assert [seed for _, seed in failing.calls] == [0, 1, 2]

    rerun = CountingTrainer()
    _, outputs = retrain(rerun, masks, cache_dir=tmp_path, progress=False)
    assert [seed for _, seed in rerun.calls] == [3, 4, 5]
    _, fresh = retrain(CountingTrainer(), masks, progress=False)
    np.testing.assert_array_equal(outputs, fresh)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"masks": sample_subsets(12, 6, seed=1)}, "masks_sha256"),
        ({"masks": sample_subsets(12, 7, seed=0)}, "num_subsets"),
        ({"key": "other"}, "key: cache has ''"),
        ({"seeds_per_subset": 2}, "seeds_per_subset"),
    ],
)
def test_retrain_mismatched_cache_raises(tmp_path, change, match):
    masks = sample_subsets(12, 6, seed=0)
    retrain(CountingTrainer(), masks, cache_dir=tmp_path, progress=False)
    kwargs = {"masks": masks, "key": "", "seeds_per_subset": 1} | change
    with pytest.raises(ValueError, match=match) as info:
        retrain(CountingTrainer(), cache_dir=tmp_path, progress=False, **kwargs)
    assert str(tmp_path) in str(info.value)
    assert "use another cache_dir or delete it" in str(info.value)


def test_retrain_cache_n_targets_mismatch_raises(tmp_path):
    masks = sample_subsets(12, 4, seed=0)
    retrain(CountingTrainer(), masks, cache_dir=tmp_path, progress=False)
    (tmp_path / "subset_000002.npy").unlink()
    with pytest.raises(ValueError, match="holds 3 per subset; use another cache_dir"):
        retrain(CountingTrainer(n_targets=4), masks, cache_dir=tmp_path, progress=False)


def test_retrain_subset_files_without_manifest_raise(tmp_path):
    np.save(tmp_path / "subset_000000.npy", np.zeros((1, 3)))
    with pytest.raises(ValueError, match="no manifest.json"):
        retrain(CountingTrainer(), sample_subsets(12, 2), cache_dir=tmp_path, progress=False)


@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        (lambda s: np.array([1.0, np.nan]), ValueError, "non-finite"),
        (lambda s: np.ones(2 if s < 2 else 3), ValueError, "returned 3 outputs but earlier"),
        (lambda s: np.ones((2, 2)), ValueError, r"shape \(2, 2\)"),
        (lambda s: np.float64(1.0), ValueError, r"reshape\(1\)"),
        (lambda s: np.array(["a", "b"]), TypeError, "numeric array"),
    ],
)
def test_retrain_bad_train_fn_output_names_subset(bad, exc, match):
    masks = sample_subsets(10, 4, seed=0)
    calls = []

    def train_fn(mask, seed):
        calls.append(seed)
        return bad(seed)

    with pytest.raises(exc, match=match) as info:
        retrain(train_fn, masks, progress=False)
    assert f"masks[{calls[-1]}], seed={calls[-1]}" in str(info.value)


def test_retrain_bad_args():
    masks = sample_subsets(10, 2)
    with pytest.raises(TypeError, match="train_fn must be callable"):
        retrain(None, masks, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seeds_per_subset must be >= 1"):
        retrain(CountingTrainer(), masks, seeds_per_subset=0, progress=False)
    with pytest.raises(TypeError, match="key must be a str"):
        retrain(CountingTrainer(), masks, key=1, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="masks must be 2-D"):
        retrain(CountingTrainer(), masks[0], progress=False)
