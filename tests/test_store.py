"""The store: resume after a kill, metadata checks, never losing finished work."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_data, make_mlp
from resume_child import CHUNK_ROWS, N, SlowData, make_model, make_trak

import fasttrak as ft

HERE = Path(__file__).parent


def done_chunks(store: Path) -> int:
    done = store / "records" / "checkpoints" / "0" / "done"
    return len(list(done.glob("*.json"))) if done.exists() else 0


def test_killed_featurize_resumes_to_an_identical_store(tmp_path):
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    child = subprocess.Popen(
        [sys.executable, str(HERE / "resume_child.py"), str(killed), "0.02"], cwd=HERE
    )
    deadline = time.time() + 120
    while done_chunks(killed) < 3 and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.kill()
    child.wait()
    finished_before = done_chunks(killed)
    total_chunks = N // CHUNK_ROWS
    assert 3 <= finished_before < total_chunks, "the child must die in the middle of the run"

    marks = sorted((killed / "records" / "checkpoints" / "0" / "done").glob("*.json"))
    before = {mark.name: mark.stat().st_mtime_ns for mark in marks}
    data = SlowData()
    make_trak(str(killed)).featurize(data, checkpoints=[make_model().state_dict()])
    # Every row is read once: finished chunks to check they are the same rows (no model
    # run), the others to compute them; plus the 2-row format check.
    assert sorted(data.loaded) == sorted([*range(N), 0, 1])
    # Finished chunks were not recomputed: their done marks are the same files.
    for mark in marks:
        assert mark.stat().st_mtime_ns == before[mark.name]
    make_trak(str(fresh)).featurize(SlowData(), checkpoints=[make_model().state_dict()])

    a = make_trak(str(killed)).store.model(0)
    b = make_trak(str(fresh)).store.model(0)
    np.testing.assert_array_equal(a.features(), b.features())
    np.testing.assert_array_equal(a.q(), b.q())


def test_a_finished_store_is_not_recomputed(tmp_path):
    make_trak(str(tmp_path)).featurize(SlowData(), checkpoints=[make_model().state_dict()])
    data = SlowData()
    make_trak(str(tmp_path)).featurize(data, checkpoints=[make_model().state_dict()])
    # The 2-row format check, and the first and last chunk to check they are the same rows.
    assert sorted(data.loaded) == sorted([0, 1, *range(CHUNK_ROWS), *range(N - CHUNK_ROWS, N)])


def test_score_on_a_reopened_store_with_checkpoints(tmp_path):
    x, y = make_data(30)
    model = make_mlp()
    first = ft.TRAK(model, proj_dim=16, store=tmp_path, progress=False)
    first.featurize((x, y), checkpoints=[model.state_dict()])
    expected = np.asarray(first.score((x[:3], y[:3])))
    again = ft.TRAK(model, proj_dim=16, store=tmp_path, progress=False)
    np.testing.assert_array_equal(
        np.asarray(again.score((x[:3], y[:3]), checkpoints=[model.state_dict()])), expected
    )


@pytest.mark.parametrize(
    "change, words",
    [
        ({"proj_dim": 64}, "k: store has 32"),
        ({"seed": 1}, "seed"),
        ({"projector": "identity"}, "projector"),
        ({"params": "2.*"}, "params"),
        ({"feature_dtype": "float16"}, "feature_dtype"),
    ],
)
def test_reopening_with_other_settings_is_an_error(tmp_path, change, words):
    x, y = make_data(20)
    settings = {"proj_dim": 32, "store": tmp_path, "progress": False}
    ft.TRAK(make_mlp(), **settings).featurize((x, y))
    with pytest.raises(ft.StoreMismatchError, match=words):
        ft.TRAK(make_mlp(), **{**settings, **change})


def test_reopening_with_another_model_shape_is_an_error(tmp_path):
    x, y = make_data(20)
    ft.TRAK(make_mlp(), proj_dim=32, store=tmp_path, progress=False).featurize((x, y))
    with pytest.raises(ft.StoreMismatchError, match="params"):
        ft.TRAK(make_mlp(hidden=6), proj_dim=32, store=tmp_path, progress=False)


def test_another_training_set_size_is_an_error_and_keeps_the_store(tmp_path):
    x, y = make_data(20)
    model = make_mlp()
    ft.TRAK(model, proj_dim=32, store=tmp_path, progress=False).featurize((x, y))
    trak = ft.TRAK(model, proj_dim=32, store=tmp_path, progress=False)
    before = trak.store.model(0).features()
    with pytest.raises(ft.StoreMismatchError, match="20 examples"):
        trak.featurize((x[:10], y[:10]))
    np.testing.assert_array_equal(trak.store.model(0).features(), before)


def test_other_weights_at_a_stored_index_need_overwrite(tmp_path):
    x, y = make_data(20)
    model, other = make_mlp(seed=0), make_mlp(seed=1)
    trak = ft.TRAK(model, proj_dim=32, store=tmp_path, progress=False)
    trak.featurize((x, y), checkpoints=[model.state_dict()])
    before = trak.store.model(0).features()
    with pytest.raises(ft.CheckpointMismatchError, match="overwrite=True"):
        trak.featurize((x, y), checkpoints=[other.state_dict()])
    np.testing.assert_array_equal(trak.store.model(0).features(), before)
    trak.featurize((x, y), checkpoints=[other.state_dict()], overwrite=True)
    assert not np.array_equal(trak.store.model(0).features(), before)
    with pytest.raises(ft.CheckpointMismatchError, match="same checkpoints"):
        trak.score((x[:2], y[:2]), checkpoints=[model.state_dict()])


def test_float16_feature_storage_scores_close_to_float32():
    x, y = make_data(60)
    model = make_mlp()
    results = []
    for dtype in ("float32", "float16"):
        trak = ft.TRAK(model, proj_dim=32, feature_dtype=dtype, progress=False)
        trak.featurize((x, y))
        assert trak.store.model(0).features().dtype == np.dtype(dtype)
        results.append(np.asarray(trak.score((x[:4], y[:4]))))
    scale = np.abs(results[0]).max()
    np.testing.assert_allclose(results[1], results[0], atol=2e-2 * scale)


def test_checkpoint_paths_load_safely(tmp_path):
    x, y = make_data(20)
    model = make_mlp()
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    trak = ft.TRAK(model, proj_dim=8, progress=False)
    trak.featurize((x, y), checkpoints=[path])
    by_dict = ft.TRAK(model, proj_dim=8, progress=False)
    by_dict.featurize((x, y), checkpoints=[model.state_dict()])
    np.testing.assert_array_equal(trak.store.model(0).features(), by_dict.store.model(0).features())


def test_models_under_chosen_ids_in_any_order(tmp_path):
    """One job per model: ids need not start at 0 or be featurized in order."""
    x, y = make_data(30)
    models = [make_mlp(seed=s) for s in range(3)]
    trak = ft.TRAK(models[0], proj_dim=8, store=tmp_path, progress=False)
    trak.featurize((x, y), checkpoints=[models[2]], model_ids=[7])
    trak.featurize((x, y), checkpoints=[models[0]], model_ids=[3])
    assert trak.store.model_ids() == [3, 7]
    scores = np.asarray(trak.score((x[:3], y[:3])))  # the checkpoints of the calls above
    again = ft.TRAK(models[0], proj_dim=8, store=tmp_path, progress=False)
    by_ids = again.score((x[:3], y[:3]), checkpoints=[models[0], models[2]])  # id order
    np.testing.assert_array_equal(np.asarray(by_ids), scores)
    with pytest.raises(ft.CheckpointMismatchError, match="same checkpoints"):
        again.score((x[:3], y[:3]), checkpoints=[models[2], models[0]])
    reference = ft.TRAK(models[0], proj_dim=8, progress=False)  # projections depend on the id
    reference.featurize((x, y), checkpoints=[models[0], models[2]], model_ids=[3, 7])
    np.testing.assert_allclose(np.asarray(reference.score((x[:3], y[:3]))), scores, rtol=1e-5)
    with pytest.raises(ft.ConfigError, match="one distinct id per checkpoint"):
        trak.featurize((x, y), checkpoints=[models[1]], model_ids=[4, 5])
    with pytest.raises(ft.ConfigTypeError, match=r"\[7\]"):
        trak.featurize((x, y), checkpoints=[models[1]], model_ids=7)


@pytest.mark.parametrize("feature_dtype", ["float32", "float16"])
def test_chunk_files_hold_the_bytes_zarr_would_write(tmp_path, feature_dtype):
    """Featurize writes chunk files itself (not through zarr's setitem): each must hold
    exactly what zarr writes for the same rows, the last, partial chunk padded with NaN,
    and read back through zarr as the features and Q."""
    import zarr

    from fasttrak.store.arrays import new_array

    torch.manual_seed(0)
    x, y = make_data(300)
    trak = ft.TRAK(
        make_mlp(),
        proj_dim=32,
        store=tmp_path / "s",
        chunk_rows=128,
        progress=False,
        feature_dtype=feature_dtype,
    )
    trak.featurize((x, y))
    stored = trak.store.model(0)
    features, q = stored.features(), stored.q()
    for name, data in (("features", features), ("q", q)):
        ours = zarr.open_array(store=str(tmp_path / "s" / "checkpoints" / "0" / name), mode="r")
        np.testing.assert_array_equal(np.asarray(ours[...]), data)
        reference = tmp_path / f"zarr_{name}"
        chunks = (128, 32) if name == "features" else (128,)
        written = new_array(zarr.storage.LocalStore(reference), data.shape, str(data.dtype), chunks)
        written[...] = data
        for c in range(3):
            key = f"c/{c}/0" if name == "features" else f"c/{c}"
            mine = (tmp_path / "s" / "checkpoints" / "0" / name / key).read_bytes()
            assert mine == (reference / key).read_bytes(), (name, c)
