"""The Ray runner on a local Ray with 2 CPUs: the same bits as in-process, retried after a
worker is killed, and a task's own error when it raises."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_data, make_mlp

import fasttrak as ft

ray = pytest.importorskip("ray")
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def runner():
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]), "OMP_NUM_THREADS": "1"}
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env}
    )
    yield ft.runners.Ray(chunks_per_task=2)
    ray.shutdown()


def make_trak(store: Path) -> ft.TRAK:
    return ft.TRAK(
        make_mlp(), proj_dim=32, store=store, chunk_rows=20, batch_size=10, progress=False
    )


CHECKPOINTS = [make_mlp(seed=s).state_dict() for s in (1, 2)]


def in_process(store: Path, data) -> ft.TRAK:
    """An in-process run on one thread (Ray workers run with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trak = make_trak(store)
        trak.featurize(data, checkpoints=CHECKPOINTS)
        return trak
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    trak = in_process(tmp_path_factory.mktemp("ref") / "store", make_data(150))
    return trak, np.asarray(trak.score(make_data(4, seed=1)))


def assert_same_store(trak: ft.TRAK, reference: ft.TRAK) -> None:
    assert trak.store.model_ids() == reference.store.model_ids()
    for m in reference.store.model_ids():
        for name in ("features", "q"):
            want = getattr(reference.store.model(m), name)()
            np.testing.assert_array_equal(getattr(trak.store.model(m), name)(), want)


def test_ray_featurize_finalize_and_score_give_the_in_process_bits(runner, reference, tmp_path):
    trak = make_trak(tmp_path / "store")
    trak.featurize(make_data(150), checkpoints=CHECKPOINTS, runner=runner)
    assert_same_store(trak, reference[0])
    trak.finalize(runner=runner)
    scores = np.asarray(trak.score(make_data(4, seed=1), runner=runner))
    np.testing.assert_array_equal(scores, reference[1])
    dense = trak.score(make_data(4, seed=1)).numpy(runner=runner)  # the product on workers
    np.testing.assert_array_equal(dense, reference[1])
    top = trak.score(make_data(4, seed=1)).topk(7, runner=runner)
    want = reference[0].score(make_data(4, seed=1)).topk(7)
    np.testing.assert_array_equal(top.proponents, want.proponents)
    np.testing.assert_array_equal(top.opponent_scores, want.opponent_scores)
    saved = trak.score(make_data(4, seed=1)).save(tmp_path / "scores.zarr", runner=runner)
    np.testing.assert_array_equal(ft.load_scores(tmp_path / "scores.zarr"), reference[1])
    assert saved.shape == reference[1].shape
    plain = ft.Estimator(kernel="plain")
    np.testing.assert_allclose(
        np.asarray(trak.score(make_data(4, seed=1), runner=runner, estimator=plain)),
        np.asarray(reference[0].score(make_data(4, seed=1), estimator=plain)),
        rtol=1e-5,
        atol=1e-7,
    )


def test_a_killed_worker_is_retried_and_the_store_is_unchanged(runner, tmp_path):
    from ray_data import Rows

    x, y = make_data(150)
    hang = tmp_path / "hang.pid"
    data = Rows(x, y, hang=str(hang))
    killed = []

    def kill_when_hanging() -> None:
        for _ in range(600):
            if hang.exists() and hang.read_text():
                pid = int(hang.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_hanging)
    killer.start()
    trak = make_trak(tmp_path / "store")
    trak.featurize(data, checkpoints=CHECKPOINTS, runner=runner)
    killer.join()
    assert killed, "no worker was killed: the test did not exercise a retry"
    assert trak.progress().complete
    # The same rows through a DataLoader (this dataset) are stacked into fresh batches, not
    # sliced from one tensor: compare with an in-process run of the same dataset.
    assert_same_store(trak, in_process(tmp_path / "ref", Rows(x, y)))


def test_a_task_that_raises_stops_the_run_with_its_own_error(runner, tmp_path):
    x, y = make_data(150)
    y[130] = 7  # a label out of range, in a chunk only a worker computes
    trak = make_trak(tmp_path / "store")
    with pytest.raises(ft.DataError, match=r"labels must lie in \[0, 3\)"):
        trak.featurize((x, y), checkpoints=CHECKPOINTS, runner=runner)


def test_a_factory_takes_its_arguments_as_a_tuple():
    with pytest.raises(ft.ConfigTypeError, match="as a tuple"):
        ft.runners.Factory(make_data, "path")
    assert ft.runners.Factory(make_data, [3])().__len__() == 2  # (x, y) of 3 rows


def test_the_ray_runner_needs_a_store_path(runner):
    trak = ft.TRAK(make_mlp(), proj_dim=8, progress=False)
    with pytest.raises(ft.ConfigError, match="store= a directory"):
        trak.featurize(make_data(20), runner=runner)
    with pytest.raises(ft.ConfigTypeError, match="instance"):
        trak.featurize(make_data(20), runner=ft.runners.Ray)


def test_a_relative_store_path_reaches_the_workers_as_the_same_store(
    runner, reference, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    trak = make_trak(Path("relative") / "store")
    trak.featurize(make_data(150), checkpoints=CHECKPOINTS, runner=runner)
    assert trak.progress().complete
    assert_same_store(trak, reference[0])


def test_a_dataset_factory_is_opened_on_the_workers(runner, reference, tmp_path):
    trak = make_trak(tmp_path / "store")
    data = ft.runners.Factory(make_data, (150,))
    trak.featurize(data, checkpoints=CHECKPOINTS, runner=runner)
    assert_same_store(trak, reference[0])


def test_ray_finalize_sums_partial_grams_to_the_in_process_bits(runner, tmp_path):
    """30 row chunks: two groups of partial grams, computed by workers and summed in order
    by the driver, give the in-process gram and factor bit for bit, for both kernels."""
    from fasttrak.estimator import GRAM_GROUP_CHUNKS
    from fasttrak.store.core import complete_models

    def featurized(path: Path) -> ft.TRAK:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            trak = ft.TRAK(
                make_mlp(), proj_dim=32, store=path, chunk_rows=5, batch_size=10, progress=False
            )
            trak.featurize(make_data(150), checkpoints=CHECKPOINTS)
            return trak
        finally:
            torch.set_num_threads(threads)

    local, remote = featurized(tmp_path / "local"), featurized(tmp_path / "remote")
    assert local.store.num_chunks > GRAM_GROUP_CHUNKS
    for estimator in (ft.Estimator(), ft.Estimator(kernel="plain", ridge=0.01)):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            local.finalize(estimator=estimator)
        finally:
            torch.set_num_threads(threads)
        remote.finalize(estimator=estimator, runner=runner)
        for m in (0, 1):
            mine, theirs = local.store.model(m), remote.store.model(m)
            chosen = estimator.for_models(2).resolved(mine)
            (records,) = complete_models([mine])
            (other,) = complete_models([theirs])
            for kind, settings in (
                ("gram", chosen.gram_settings()),
                ("factor", chosen.factor_settings()),
            ):
                want = mine.read_kernel(kind, settings, records)
                got = theirs.read_kernel(kind, settings, other)
                assert want is not None and got is not None
                np.testing.assert_array_equal(got, want)
