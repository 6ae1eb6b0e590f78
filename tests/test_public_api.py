"""The estimator as a value, public features, combined scores, and the old names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_data, make_mlp

import fasttrak as ft


def _trak(store=None, **options):
    return ft.TRAK(
        make_mlp(), proj_dim=16, projector="dense", progress=False, store=store, **options
    )


def _checkpoints(count: int = 3) -> list[dict[str, torch.Tensor]]:
    return [make_mlp(seed=s).state_dict() for s in range(count)]


@pytest.fixture
def data():
    return make_data(40), make_data(6, seed=1)


ESTIMATORS = [
    ft.Estimator(),
    ft.Estimator(kernel="plain", ridge=0.0, kernel_blocks=1),
    ft.Estimator(ridge=0.3, kernel_blocks=4, precision="float64"),
]


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_an_estimator_at_score_time_equals_the_same_options_in_the_constructor(
    data, estimator, tmp_path
):
    """One store serves every estimator, bit for bit as a TRAK built with those options."""
    train, targets = data
    shared = _trak(tmp_path / "shared")
    shared.featurize(train, checkpoints=_checkpoints())
    shared.score(targets)  # caches the default estimator's factor first
    got = np.asarray(shared.score(targets, estimator=estimator))
    own = _trak(
        kernel=estimator.kernel,
        ridge=estimator.ridge,
        kernel_blocks=estimator.kernel_blocks,
        precision=estimator.precision,
    )
    own.featurize(train, checkpoints=_checkpoints())
    np.testing.assert_array_equal(got, np.asarray(own.score(targets)))


def test_each_estimator_caches_its_own_factor_and_a_read_only_store_keeps_them_in_memory(
    data, tmp_path
):
    train, targets = data
    trak = _trak(tmp_path / "s")
    trak.featurize(train, checkpoints=_checkpoints(1))
    for estimator in ESTIMATORS:
        trak.finalize(estimator=estimator)
    kernels = sorted(p.name.split("-")[0] for p in (tmp_path / "s/checkpoints/0/kernels").iterdir())
    assert kernels.count("factor") == len(ESTIMATORS)
    first = np.asarray(trak.score(targets, estimator=ESTIMATORS[1]))
    again = np.asarray(trak.score(targets, estimator=ESTIMATORS[1]))  # from the cache
    np.testing.assert_array_equal(first, again)


def test_estimator_values_are_checked_with_the_fix():
    with pytest.raises(ft.ConfigError, match="kernel must be one of"):
        ft.Estimator(kernel="fisher")
    with pytest.raises(ft.ConfigError, match="ridge must be 'auto' or a finite number"):
        ft.Estimator(ridge=float("nan"))
    with pytest.raises(ft.ConfigError, match="precision"):
        ft.Estimator(precision="float16")
    with pytest.raises(ft.ConfigTypeError, match="kernel_blocks"):
        ft.Estimator(kernel_blocks=2.0)
    with pytest.raises(ft.ConfigError, match="kernel_blocks"):
        ft.Estimator(kernel_blocks=32).for_dim(16)  # more blocks than coordinates
    assert ft.Estimator().for_dim(2048).kernel_blocks is None  # decided with the rows
    assert ft.Estimator().for_rows(1000, 2048).kernel_blocks == 4
    assert ft.Estimator().for_rows(1024, 2048).kernel_blocks == 4  # n <= k / 2
    assert ft.Estimator().for_rows(1025, 2048).kernel_blocks == 1  # n > k / 2: no blocks
    assert ft.Estimator().for_rows(4000, 4096).kernel_blocks == 1  # mlp_heldout's case
    assert ft.Estimator().for_rows(1000, 512).kernel_blocks == 1
    assert ft.Estimator(kernel_blocks=2).for_rows(10**6, 2048).kernel_blocks == 2
    assert ft.Estimator().for_rows(1000, 2048, num_params=2048).kernel_blocks == 4
    assert ft.Estimator().for_rows(1000, 4096).kernel_blocks == 8  # blocks of 512
    assert ft.Estimator().for_rows(1000, 1024).kernel_blocks == 1  # blocks of 256 hurt
    assert ft.Estimator().for_rows(1000, 3000).kernel_blocks == 5
    assert ft.Estimator().for_rows(1000, 2048, num_params=2047).kernel_blocks == 1  # p < k
    assert ft.Estimator(kernel_blocks=4).for_rows(1000, 2048, num_params=62).kernel_blocks == 4
    assert ft.Estimator().ridge == "auto" and ft.Estimator(ridge=1).ridge == 1.0
    for bad in ("Auto", "0.1", None, [0.1], np.array([0.1, 0.2])):
        with pytest.raises(ft.ConfigError, match="'auto' or a finite number"):
            ft.Estimator(ridge=bad)
    with pytest.raises(ft.ConfigError, match="resolved"):
        _ = ft.Estimator().blocks
    with pytest.raises(ft.ConfigError, match="for_models"):
        _ = ft.Estimator().single_model
    assert not ft.Estimator(ridge=0.1).single_model  # needs no ensemble size
    assert ft.Estimator().for_models(1).single_model
    assert not ft.Estimator().for_models(5).single_model
    assert ft.Estimator(ensemble_size=5).for_models(1).ensemble_size == 5  # explicit wins
    for bad in (0, -1, 2.5, "3", True):
        with pytest.raises((ft.ConfigError, ft.ConfigTypeError), match="ensemble_size"):
            ft.Estimator(ensemble_size=bad)
    with pytest.raises(ft.ConfigTypeError, match="ft.Estimator"):
        _trak().score(torch.zeros(1, 5), estimator={"ridge": 0.1})


def test_features_of_a_dataset_equal_what_featurize_stores(data):
    train, _ = data
    trak = _trak()
    checkpoints = _checkpoints(2)
    trak.featurize(train, checkpoints=checkpoints)
    for m, checkpoint in enumerate(checkpoints):
        got = trak.features(train, checkpoint, model_id=m)  # the same batches: bit for bit
        assert got.phi.shape == (40, trak.k) and got.q.shape == (40,)
        np.testing.assert_array_equal(got.phi, trak.store.model(m).features())
        np.testing.assert_array_equal(got.q, trak.store.model(m).q())
        other_batches = trak.features(train, checkpoint, model_id=m, batch_size=7)
        np.testing.assert_allclose(other_batches.phi, got.phi, rtol=1e-5, atol=1e-6)
    other = trak.features(train, checkpoints[0], model_id=1)
    assert not np.array_equal(other.phi, trak.store.model(0).features())  # another projection
    with pytest.raises(ft.ConfigError, match="model_id"):
        trak.features(train, checkpoints[0], model_id=-1)


def test_a_single_model_ridge_flag_travels_with_pickled_scores(data, tmp_path):
    import pickle

    train, targets = data
    trak = _trak(store=tmp_path / "store")
    trak.featurize(train, checkpoints=_checkpoints(2))
    alone, pair = trak.score(targets, model_ids=[0]), trak.score(targets)
    assert pickle.loads(pickle.dumps(alone)).single_model_ridge
    assert not pickle.loads(pickle.dumps(pair)).single_model_ridge


def test_combined_scores_equal_scoring_all_model_ids_at_once(data):
    train, targets = data
    trak = _trak()
    checkpoints = _checkpoints(3)
    trak.featurize(train, checkpoints=checkpoints)
    ensemble = ft.Estimator(ensemble_size=3)  # the "auto" ridge of an ensemble of 3
    parts = [trak.score(targets, model_ids=[m], estimator=ensemble) for m in range(3)]
    combined = ft.Scores.combine(parts)
    assert combined.model_ids == [0, 1, 2]
    np.testing.assert_allclose(
        np.asarray(combined), np.asarray(trak.score(targets)), rtol=1e-6, atol=1e-7
    )
    # Scored alone, a model gets the single-model "auto" ridge: it cannot join an ensemble.
    alone = trak.score(targets, model_ids=[0])
    assert alone.single_model_ridge and not parts[0].single_model_ridge
    assert not np.allclose(np.asarray(alone), np.asarray(parts[0]))
    with pytest.raises(ft.ConfigError, match=r"ensemble_size=3"):
        ft.Scores.combine([alone, parts[1], parts[2]])
    assert np.array_equal(np.asarray(ft.Scores.combine([alone])), np.asarray(alone))
    assert ft.Scores.combine([alone]).single_model_ridge  # the flag survives a combine
    with pytest.raises(ft.ConfigError, match="ensemble_size"):
        ft.Scores.combine([ft.Scores.combine([alone]), parts[1]])
    numeric = ft.Estimator(ridge=0.1)  # a numeric ridge does not depend on the ensemble
    by_model = [trak.score(targets, model_ids=[m], estimator=numeric) for m in range(3)]
    np.testing.assert_allclose(
        np.asarray(ft.Scores.combine(by_model)),
        np.asarray(trak.score(targets, estimator=numeric)),
        rtol=1e-6,
        atol=1e-7,
    )
    with pytest.raises(ft.ConfigError, match="distinct model ids"):
        ft.Scores.combine([parts[0], parts[0]])
    with pytest.raises(ft.ConfigError, match="same targets"):
        ft.Scores.combine([parts[0], trak.score((targets[0][:2], targets[1][:2]), model_ids=[1])])
    with pytest.raises(ft.ConfigTypeError):
        ft.Scores.combine([])


def test_old_names_still_work_and_say_the_new_one(data):
    train, targets = data
    trak = _trak()
    trak.featurize(train, checkpoints=_checkpoints(2))
    new = np.asarray(trak.score(targets, model_ids=[1]))
    with pytest.warns(FutureWarning, match=r"model_ids="):
        old = np.asarray(trak.score(targets, models=[1]))
    np.testing.assert_array_equal(old, new)
    with pytest.warns(FutureWarning, match=r"model_ids="):
        trak.finalize(models=[0])
    with pytest.raises(ft.ConfigError, match="model_ids= only"):
        trak.score(targets, model_ids=[1], models=[1])
    with pytest.warns(FutureWarning, match=r"Store.model_ids\(\)"):
        assert trak.store.checkpoint_ids() == trak.store.model_ids() == [0, 1]
    with pytest.warns(FutureWarning, match=r"Store.model\(model_id\)"):
        assert trak.store.checkpoint(1).model_id == 1
    with pytest.warns(FutureWarning, match="TRAK.params"):
        assert trak.selected == trak.params
    scores = trak.score(targets)
    with pytest.warns(FutureWarning, match=r"Scores.chunks\(\)"):
        assert [r for r, _ in scores.blocks()] == [r for r, _ in scores.chunks()]
    from fasttrak.store import CheckpointStore, ModelStore

    assert CheckpointStore is ModelStore


def test_top_k_of_row_chunks_merges_exactly_and_scores_pickle_by_store_path(data, tmp_path):
    import pickle

    train, targets = data
    trak = _trak(tmp_path / "s", chunk_rows=7)  # 6 chunks of 40 rows
    trak.featurize(train, checkpoints=_checkpoints(2))
    scores = trak.score(targets)
    whole = scores.topk(5)
    parts = [scores.topk(5, rows=[0, 1]), scores.topk(5, rows=[2]), scores.topk(5, rows=[3, 4, 5])]
    merged = ft.TopK.merge(parts, 5)
    for name in ("proponents", "proponent_scores", "opponents", "opponent_scores"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
    again = pickle.loads(pickle.dumps(scores))  # reopens the store; reads verified features
    np.testing.assert_array_equal(np.asarray(again), np.asarray(scores))
    with pytest.raises(ft.ConfigError, match="in-memory store"):
        pickle.dumps(_trak_scores_in_memory(train, targets))


def _trak_scores_in_memory(train, targets):
    trak = _trak()
    trak.featurize(train, checkpoints=_checkpoints(1))
    return trak.score(targets)


def test_decisions_are_logged_and_finalize_and_score_show_progress(caplog, capsys):
    import logging

    x, y = make_data(40)
    with caplog.at_level(logging.INFO, logger="fasttrak"):
        trak = ft.TRAK(make_mlp(), proj_dim=16, chunk_rows=8, progress=True)
        trak.featurize((x, y))
        trak.finalize()
        trak.score((x[:3], y[:3]))
    logged = caplog.text
    for expected in ("k = 16 by", "engine hooks", "featurize model 0", "finalize models [0]"):
        assert expected in logged
    assert "score 3 targets against models [0]" in logged
    err = capsys.readouterr().err
    assert "finalize (gram)" in err and "score 3 targets" in err


def test_saved_scores_load_back_with_topk_and_chunks(tmp_path):
    x, y = make_data(30)
    trak = ft.TRAK(make_mlp(), proj_dim=8, chunk_rows=8, progress=False)
    trak.featurize((x, y))
    scores = trak.score((x[:4], y[:4]))
    scores.save(tmp_path / "scores")
    loaded = ft.Scores.load(tmp_path / "scores")
    assert isinstance(loaded, ft.SavedScores) and loaded.shape == (4, 30) and len(loaded) == 4
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(scores))
    want, got = scores.topk(5), loaded.topk(5)
    for field in ("proponents", "proponent_scores", "opponents", "opponent_scores"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    blocks = list(loaded.chunks(rows=7))
    assert [b.shape[1] for _, b in blocks] == [7, 7, 7, 7, 2]
    np.testing.assert_array_equal(np.hstack([b for _, b in blocks]), np.asarray(scores))
    with pytest.raises(ft.ConfigError, match="k must be an integer"):
        loaded.topk(0)
    with pytest.raises(ft.StoreError, match="no saved scores"):
        ft.Scores.load(tmp_path / "nothing")
