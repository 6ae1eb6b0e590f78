"""ft.cleaning.suspected_mislabels: self-influence, total influence and Q ranked together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_mlp
from scipy.stats import rankdata
from torch import nn

import fasttrak as ft
from fasttrak import cleaning
from fasttrak.cleaning import Ranking, rank_average, suspected_mislabels, total_influence
from fasttrak.errors import ConfigError, ConfigTypeError, DataError, NotFeaturizedError

N, FLIPS, CLASSES, DIM = 150, 15, 3, 5


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Three Gaussian classes; 15 of 150 training labels flipped to another class; an MLP
    trained on the noisy labels (checkpoints after 100, 200, 400 Adam steps, weight decay
    so that part of the noise is fitted), featurized, and scored on 60 clean targets."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2.0, (CLASSES, DIM))
    y = rng.integers(0, CLASSES, N + 60)
    x = centers[y] + rng.normal(0, 1.0, (N + 60, DIM))
    flipped = rng.choice(N, FLIPS, replace=False)
    noisy = y[:N].copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, CLASSES, FLIPS)) % CLASSES
    x_t = torch.tensor(x, dtype=torch.float32)
    train = (x_t[:N], torch.tensor(noisy))
    targets = (x_t[N:], torch.tensor(y[N:]))
    torch.manual_seed(0)
    model = make_mlp(d_in=DIM, hidden=32, classes=CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    snaps = []
    for step in range(1, 401):
        opt.zero_grad()
        nn.functional.cross_entropy(model(train[0]), train[1]).backward()
        opt.step()
        if step in (100, 200, 400):
            snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    trak = ft.TRAK(
        make_mlp(d_in=DIM, hidden=32, classes=CLASSES),
        proj_dim=64,
        store=tmp_path_factory.mktemp("cleaning") / "store",
        chunk_rows=64,  # 3 row chunks: the streaming crosses chunk boundaries
        progress=False,
    )
    trak.featurize(train, checkpoints=snaps)
    scores = trak.score(targets)
    is_flipped = np.zeros(N, dtype=bool)
    is_flipped[flipped] = True
    return trak, scores, is_flipped, targets


def auroc(score, positive):
    ranks = rankdata(score)
    pos = positive.sum()
    return (ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * (~positive).sum())


@pytest.mark.parametrize("method", cleaning.METHODS)
def test_planted_flips_rank_high(planted, method):
    trak, scores, flipped, _ = planted
    ranking = suspected_mislabels(trak, scores, method=method)
    assert isinstance(ranking, Ranking) and len(ranking) == N
    assert sorted(ranking.order.tolist()) == list(range(N))
    # Each signal finds the planted flips; total influence (on 60 targets) is the weakest.
    assert auroc(ranking.score, flipped) > (0.8 if method == "total_influence" else 0.95)
    found = flipped[ranking.top(FLIPS)].mean()
    assert found >= (0.5 if method == "total_influence" else 0.7), found


def test_components_equal_their_definitions(planted):
    trak, scores, _, _ = planted
    dense = np.asarray(scores)
    q = np.stack([trak.store.model(m).q() for m in trak.store.model_ids()]).astype(np.float64)
    expected = {
        "self_influence": trak.self_influence(),
        "total_influence": dense.sum(0),
        "q": q.mean(0),
        "loss": (-np.log(1 - q)).mean(0),
    }
    for name, want in expected.items():
        got = suspected_mislabels(trak, scores, method=name)
        assert set(got.components) == {name}
        np.testing.assert_allclose(got.components[name], want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.score, cleaning.SIGNS[name] * got.components[name])
        assert (np.diff(got.score[got.order]) <= 0).all()
    np.testing.assert_allclose(total_influence(dense), dense.sum(0, dtype=np.float64), rtol=1e-12)


def test_combined_is_the_rank_average_of_its_components(planted):
    trak, scores, _, _ = planted
    assert suspected_mislabels(trak).method == "self_influence"  # the default
    ranking = suspected_mislabels(trak, scores, method="combined")
    assert ranking.method == "combined" and ranking.combined == cleaning.COMBINED
    want = np.mean(
        [
            (rankdata(cleaning.SIGNS[c] * ranking.components[c]) - 1) / (N - 1)
            for c in cleaning.COMBINED
        ],
        axis=0,
    )
    np.testing.assert_allclose(ranking.score, want)
    np.testing.assert_array_equal(ranking.order, np.argsort(-want, kind="stable"))
    np.testing.assert_array_equal(ranking.rank_of(ranking.order[:5]), np.arange(5))
    # Without scores: only the components that need none are combined.
    alone = suspected_mislabels(trak, method="combined")
    assert "total_influence" not in alone.combined and alone.combined
    # A component's rank average with itself is its own ranking.
    single = rank_average({"q": ranking.components["q"]})
    assert single.max() == 1.0 and single.min() == 0.0


def test_total_influence_streams_without_the_dense_matrix(planted, monkeypatch):
    trak, scores, _, targets = planted
    want = np.asarray(scores).sum(0)
    fresh = trak.score(targets)  # a Scores that never computed its dense matrix

    def refuse(*args, **kwargs):
        raise AssertionError("the dense score matrix was built")

    monkeypatch.setattr(ft.Scores, "numpy", refuse)
    monkeypatch.setattr(ft.Scores, "__array__", refuse)
    got = suspected_mislabels(trak, fresh, method="total_influence")
    np.testing.assert_allclose(got.components["total_influence"], want, rtol=1e-5, atol=1e-7)
    suspected_mislabels(trak, fresh, method="combined")


def test_model_ids_select_the_models(planted):
    trak, scores, _, _ = planted
    got = suspected_mislabels(trak, method="q", model_ids=[2])
    np.testing.assert_allclose(got.components["q"], trak.store.model(2).q())
    got = suspected_mislabels(trak, method="self_influence", model_ids=[0, 1])
    np.testing.assert_allclose(got.components["self_influence"], trak.self_influence([0, 1]))


def test_bad_inputs(planted):
    trak, scores, _, _ = planted
    with pytest.raises(ConfigTypeError, match="ft.TRAK"):
        suspected_mislabels(scores)
    with pytest.raises(ConfigError, match="method must be one of"):
        suspected_mislabels(trak, scores, method="margin")
    with pytest.raises(ConfigError, match=r"needs scores: pass scores=trak.score\(targets\)"):
        suspected_mislabels(trak, method="total_influence")
    with pytest.raises(DataError, match="against 100 training rows but the store holds 150"):
        suspected_mislabels(trak, np.zeros((4, 100)), method="total_influence")
    with pytest.raises(DataError, match="2-D"):
        suspected_mislabels(trak, np.zeros(N), method="total_influence")
    with pytest.raises(DataError, match="no targets"):
        suspected_mislabels(trak, np.zeros((0, N)), method="total_influence")
    with pytest.raises(ConfigTypeError, match="ft.Scores"):
        suspected_mislabels(trak, "scores.zarr", method="total_influence")
    with pytest.raises(ConfigError, match="model_ids"):
        suspected_mislabels(trak, model_ids=[7])
    ranking = suspected_mislabels(trak, method="q")
    with pytest.raises(ConfigError, match=r"k must be an integer in \[1, 150\]"):
        ranking.top(0)


def test_nothing_featurized_names_the_fix():
    trak = ft.TRAK(make_mlp(), proj_dim=8, progress=False)
    with pytest.raises(NotFeaturizedError, match="featurize"):
        suspected_mislabels(trak)
