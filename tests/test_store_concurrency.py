"""Many processes, one store: real processes started together behind a barrier. The final
store equals a single-process run, no chunk is written twice, nothing is mixed."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import store_workers as w

import fasttrak as ft
from fasttrak.store import Store


@pytest.fixture(scope="module")
def ctx():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["store_workers"])
    return context


def start(ctx, target, *args):
    process = ctx.Process(target=target, args=args)
    process.start()
    return process


def join(processes, timeout=120):
    for process in processes:
        process.join(timeout)
        assert process.exitcode == 0, f"worker exited with {process.exitcode}"


def single_process(tmp_path: Path, seeds, ids=None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    store = tmp_path / "single"
    trak = w.make_trak(str(store))
    trak.featurize(w.Slow(0), checkpoints=[w.state(s) for s in seeds], model_ids=ids)
    return stored(store)


def stored(store: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    s = Store.open_existing(store)
    return {m: (s.model(m).features(), s.model(m).q()) for m in s.model_ids()}


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for m in a:
        np.testing.assert_array_equal(a[m][0], b[m][0])
        np.testing.assert_array_equal(a[m][1], b[m][1])


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_on_the_same_checkpoint_share_the_chunks(ctx, tmp_path, workers):
    store = str(tmp_path / "shared")
    barrier = ctx.Barrier(workers)
    outs = [tmp_path / f"out{i}.json" for i in range(workers)]
    join([start(ctx, w.featurize, store, [0], None, barrier, str(o)) for o in outs])
    results = [json.loads(o.read_text()) for o in outs]
    assert all(r["error"] is None for r in results), results
    written = [tuple(c) for r in results for c in r["written"]]
    assert sorted(written) == [(0, c) for c in range(w.N // w.CHUNK)]  # each chunk once
    assert sum(1 for r in results if r["written"]) >= 2, "the workers should share the work"
    assert_same(stored(Path(store)), single_process(tmp_path, [0]))
    assert ft.verify_store(store).ok


def test_workers_on_different_checkpoints_under_their_own_ids(ctx, tmp_path):
    store = str(tmp_path / "shared")
    barrier = ctx.Barrier(3)
    outs = [tmp_path / f"out{i}.json" for i in range(3)]
    join(
        [
            start(ctx, w.featurize, store, [seed], [seed], barrier, str(out))
            for seed, out in zip((0, 1, 2), outs, strict=True)
        ]
    )
    errors = [json.loads(o.read_text())["error"] for o in outs]
    assert errors == [None] * len(outs), errors
    assert_same(stored(Path(store)), single_process(tmp_path, [0, 1, 2]))


def test_different_checkpoints_at_one_id_are_never_mixed(ctx, tmp_path):
    """The reported bug: two processes featurizing different weights as model 0."""
    store = str(tmp_path / "shared")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    join(
        [
            start(ctx, w.featurize, store, [s], None, barrier, str(o))
            for s, o in zip((0, 1), outs, strict=True)
        ]
    )
    results = [json.loads(o.read_text()) for o in outs]
    errors = [r["error"] for r in results if r["error"]]
    assert len(errors) == 1 and errors[0][0] == "CheckpointMismatchError", results
    winner = 0 if results[0]["error"] is None else 1
    loser_wrote = results[1 - winner]["written"]
    assert loser_wrote == []
    assert_same(stored(Path(store)), single_process(tmp_path, [winner]))


def test_simultaneous_creation_one_creates_the_others_join(ctx, tmp_path):
    store = str(tmp_path / "new")
    barrier = ctx.Barrier(4)
    outs = [tmp_path / f"out{i}.json" for i in range(4)]
    join([start(ctx, w.create, store, w.K, barrier, str(o)) for o in outs])
    errors = [json.loads(o.read_text())["error"] for o in outs]
    assert errors == [None] * len(outs), errors
    other = tmp_path / "other"
    barrier = ctx.Barrier(4)
    join(
        [
            start(ctx, w.create, str(other), w.K * (1 + i % 2), barrier, str(o))
            for i, o in enumerate(outs)
        ]
    )
    results = [json.loads(o.read_text())["error"] for o in outs]
    k = Store.open_existing(other).k
    for i, error in enumerate(results):
        asked = w.K * (1 + i % 2)
        assert (error is None) == (asked == k), results
        assert error is None or error[0] == "StoreMismatchError"


def test_simultaneous_kernel_builds_and_saves_agree(ctx, tmp_path):
    store = tmp_path / "s" / "store"
    w.make_trak(str(store)).featurize(w.Slow(0), checkpoints=[w.state(0), w.state(1)])
    barrier = ctx.Barrier(3)
    outs = [tmp_path / f"scores{i}.npy" for i in range(3)]
    join([start(ctx, w.score, str(store), [0, 1], barrier, str(o)) for o in outs])
    results = [np.load(o) for o in outs]
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    for m in (0, 1):
        kernels = sorted(
            p.name.split("-")[0] for p in (store / "checkpoints" / str(m) / "kernels").iterdir()
        )
        assert kernels == ["factor", "gram"]
    np.testing.assert_array_equal(ft.load_scores(tmp_path / "s" / "scores.zarr"), results[0])
    assert ft.verify_store(store).ok


def test_overwrite_while_another_process_writes_is_refused(ctx, tmp_path):
    store = str(tmp_path / "shared")
    w.make_trak(store)  # created up front, so the watcher can find its done marks
    barrier = ctx.Barrier(1)
    writer = start(ctx, w.featurize, store, [0], None, barrier, str(tmp_path / "writer.json"))
    watcher = start(ctx, w.overwrite_while_writing, store, "", str(tmp_path / "watcher.json"))
    join([writer, watcher])
    refused = json.loads((tmp_path / "watcher.json").read_text())["error"]
    assert refused is not None and refused[0] == "StoreBusyError", refused
    assert json.loads((tmp_path / "writer.json").read_text())["error"] is None
    assert_same(stored(Path(store)), single_process(tmp_path, [0]))
