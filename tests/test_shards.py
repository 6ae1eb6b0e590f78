"""Job arrays: model ids and row shards from separate processes make the store of one run."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_data, make_mlp
from shard_job import checkpoint, make_trak

import fasttrak as ft

HERE = Path(__file__).parent


def test_shards_cover_every_chunk_once():
    for chunks in (1, 5, 7, 64):
        for count in (1, 2, 3, 8):
            got = [c for i in range(count) for c in ft.shard(i, count).chunks(chunks)]
            assert got == list(range(chunks)), (chunks, count)
    with pytest.raises(ft.ConfigError, match="0 <= i < n"):
        ft.shard(3, 3)
    with pytest.raises(ft.ConfigTypeError, match="integers"):
        ft.shard(0.5, 2)


def test_jobs_in_separate_processes_in_any_order_make_the_store_of_one_run(tmp_path):
    """2 models x 3 shards as 6 processes, shuffled, 2 at a time: the same bits as one
    in-process featurize; score works once all are done."""
    jobs = [(m, i) for m in (0, 4) for i in range(3)]
    random.Random(0).shuffle(jobs)
    store = tmp_path / "array"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    for pair in (jobs[0:2], jobs[2:4], jobs[4:6]):
        running = [
            subprocess.Popen(
                [sys.executable, str(HERE / "shard_job.py"), str(store), str(m), str(i), "3"],
                env=env,
            )
            for m, i in pair
        ]
        assert all(p.wait(timeout=120) == 0 for p in running)
    torch.set_num_threads(1)
    single = make_trak(str(tmp_path / "single"))
    single.featurize(make_data(160), checkpoints=[checkpoint(0), checkpoint(4)], model_ids=[0, 4])
    array = make_trak(str(store))
    assert array.progress().complete
    for m in (0, 4):
        for name in ("features", "q"):
            want = getattr(single.store.model(m), name)()
            np.testing.assert_array_equal(getattr(array.store.model(m), name)(), want)
    targets = make_data(5, seed=1)
    np.testing.assert_array_equal(
        np.asarray(array.score(targets, checkpoints=[checkpoint(0), checkpoint(4)])),
        np.asarray(single.score(targets)),
    )


def test_score_names_every_missing_chunk_and_progress_reports_them(tmp_path):
    trak = make_trak(str(tmp_path / "s"))
    data = make_data(160)  # 7 chunks of 25 rows
    trak.featurize(data, checkpoints=[checkpoint(0)], model_ids=[0], rows=ft.shard(0, 2))
    trak.featurize(data, checkpoints=[checkpoint(1)], model_ids=[1], rows=[0, 2, 6])
    done = trak.progress()
    assert [(p.model_id, p.done, p.missing) for p in done.models] == [
        (0, 3, [3, 4, 5, 6]),
        (1, 3, [1, 3, 4, 5]),
    ]
    assert not done.complete and "missing chunks 3-6" in str(done)
    with pytest.raises(
        ft.NotFeaturizedError, match=r"model 0: chunks 3-6 of 7; model 1: chunks 1, 3-5 of 7"
    ):
        trak.score(make_data(3, seed=1))
    trak.featurize(data, checkpoints=[checkpoint(0)], model_ids=[0], rows=slice(3, None))
    trak.featurize(data, checkpoints=[checkpoint(1)], model_ids=[1], rows=range(1, 6))
    assert trak.progress().complete
    assert np.isfinite(np.asarray(trak.score(make_data(3, seed=1)))).all()


def test_rows_are_checked_with_the_fix(tmp_path):
    trak = make_trak(str(tmp_path / "s"))
    data = make_data(160)
    with pytest.raises(ft.ConfigError, match="outside the store's 7 chunks"):
        trak.featurize(data, rows=[0, 7])
    with pytest.raises(ft.ConfigTypeError, match="ft.shard"):
        trak.featurize(data, rows="all")
    with pytest.raises(ft.ConfigTypeError, match="integer row-chunk"):
        trak.featurize(data, rows=[0.5])


def test_a_shard_job_checks_only_its_chunks_and_the_ends(tmp_path):
    """A job of an array does not read the other jobs' rows (check_data='auto' acts as
    'sample'), but changed rows at the ends are refused before anything is written, and
    check_data() finds the rest."""
    x, y = make_data(160)  # 7 chunks of 25 rows: shards of 3 are chunks 0-1, 2-3, 4-6
    trak = make_trak(str(tmp_path / "s"))
    for i in (0, 2):
        trak.featurize((x, y), checkpoints=[checkpoint(0)], model_ids=[0], rows=ft.shard(i, 3))
    at_end, inside = y.clone(), y.clone()
    at_end[155] = (at_end[155] + 1) % 3  # chunk 6: the last recorded chunk
    inside[105] = (inside[105] + 1) % 3  # chunk 4: recorded, neither end, not computed
    with pytest.raises(ft.DataMismatchError, match="chunk 6"):
        trak.featurize((x, at_end), checkpoints=[checkpoint(0)], model_ids=[0], rows=ft.shard(1, 3))
    with pytest.raises(ft.DataMismatchError, match="chunk 0"):  # first and last always
        bad = y.clone()
        bad[0] = (bad[0] + 1) % 3
        trak.featurize((x, bad), checkpoints=[checkpoint(0)], model_ids=[0], rows=ft.shard(1, 3))
    trak.featurize((x, inside), checkpoints=[checkpoint(0)], model_ids=[0], rows=ft.shard(1, 3))
    with pytest.raises(ft.DataMismatchError, match="chunk 4"):
        trak.check_data((x, inside))


def test_trak_progress_and_fasttrak_info(tmp_path):
    from click.testing import CliRunner

    from fasttrak.cli import main

    trak = make_trak(str(tmp_path / "s"))
    trak.featurize(make_data(160), checkpoints=[checkpoint(3)], model_ids=[3], rows=[1, 2])
    result = CliRunner().invoke(main, ["info", str(tmp_path / "s")])
    assert result.exit_code == 1, result.output
    assert "model 3: 2/7 chunks (missing chunks 0, 3-6)" in result.output
    assert "num_train" in result.output and "160" in result.output
    trak.featurize(make_data(160), checkpoints=[checkpoint(3)], model_ids=[3])
    result = CliRunner().invoke(main, ["info", str(tmp_path / "s")])
    assert result.exit_code == 0 and "model 3: 7/7 chunks (complete)" in result.output
    settings, progress = ft.store_info(tmp_path / "s")
    assert settings["k"] == 32 and progress.complete


def test_model_id_picks_the_projection_whatever_the_process(tmp_path):
    """A checkpoint stored under id 7 by one job has the features of model 7 of a run."""
    alone = make_trak(str(tmp_path / "alone"))
    alone.featurize(make_data(160), checkpoints=[checkpoint(0)], model_ids=[7])
    run = ft.TRAK(make_mlp(), proj_dim=32, chunk_rows=25, batch_size=10, progress=False)
    run.featurize(make_data(160), checkpoints=[checkpoint(0)] * 8)
    np.testing.assert_array_equal(alone.store.model(7).features(), run.store.model(7).features())


def test_empty_and_out_of_range_chunk_lists_are_refused_but_an_empty_shard_is_a_no_op(tmp_path):
    trak = make_trak(str(tmp_path / "s"))
    data = make_data(40)  # 2 chunks of 25 rows
    with pytest.raises(ft.ConfigError, match="lists no row chunk"):
        trak.featurize(data, rows=[])
    trak.featurize(data, rows=ft.shard(0, 4))  # 2 chunks over 4 jobs: job 0 has none
    assert trak.progress().models[0].done == 0
    trak.featurize(data, rows=ft.shard(3, 4))
    scores = trak.score(make_data(3, seed=1)) if trak.progress().complete else None
    assert scores is None  # chunk 0 is job 1's
    trak.featurize(data, rows=ft.shard(1, 4))
    scores = trak.score(make_data(3, seed=1))
    with pytest.raises(ft.ConfigError, match="outside the store's 2 chunks"):
        scores.topk(3, rows=[5])
    with pytest.raises(ft.ConfigError, match="k must be a positive integer"):
        ft.TopK.merge([scores.topk(3)], 0)
