"""Bad input around the store: each gets a fasttrak error that names the fix, and whatever
the path held is left as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import make_data, make_mlp

import fasttrak as ft


def contents(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("ridge", [float("nan"), float("inf"), -1.0, "0.1", None, True])
def test_ridge_must_be_a_finite_number(ridge):
    with pytest.raises(ft.FastTrakError, match="ridge must be 'auto' or a finite number >= 0"):
        ft.TRAK(make_mlp(), ridge=ridge)


@pytest.mark.parametrize("value", [512.0, "512", True, 0, -3, None])
@pytest.mark.parametrize("name", ["proj_dim", "batch_size", "chunk_rows", "kernel_blocks"])
def test_sizes_must_be_positive_integers(name, value):
    if value is None and name in ("chunk_rows", "kernel_blocks"):
        return  # None means the default there
    with pytest.raises(ft.FastTrakError, match=f"{name} must be a positive integer"):
        ft.TRAK(make_mlp(), **{name: value})


def test_numpy_integers_are_accepted():
    trak = ft.TRAK(make_mlp(), proj_dim=np.int64(16), batch_size=np.int32(8), progress=False)
    assert trak.k == 16


def test_an_input_of_the_wrong_feature_size(tmp_path):
    x, y = make_data(10)
    trak = ft.TRAK(make_mlp(), proj_dim=8, store=tmp_path / "s", progress=False)
    with pytest.raises(ft.DataError, match=r"cannot run on the first batch.*\(2, 7\) float32"):
        trak.featurize((torch.randn(10, 7), y))
    assert trak.store.num_train is None  # nothing written


def test_a_float16_model_fed_float32_inputs_is_explained():
    x, y = make_data(10)
    model = make_mlp().half()
    trak = ft.TRAK(model, proj_dim=8, progress=False)
    with pytest.raises(ft.DataError, match="float16 inputs for a float16 model"):
        trak.featurize((x, y))
    trak.featurize((x.half(), y))  # the fix works
    assert np.isfinite(trak.store.model(0).features()).all()


def test_a_store_path_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("mine")
    with pytest.raises(ft.StoreError, match="is a file"):
        ft.TRAK(make_mlp(), store=path)
    assert path.read_text() == "mine"


def test_a_directory_of_other_files_is_never_written_to(tmp_path):
    path = tmp_path / "mine"
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    (path / "records").mkdir()  # even a folder called like fasttrak's
    (path / "records" / "x.json").write_text("{}")
    before = contents(path)
    with pytest.raises(ft.StoreError, match="not empty and is not a fasttrak store"):
        ft.TRAK(make_mlp(), store=path)
    assert contents(path) == before


def test_an_empty_directory_becomes_a_store(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    ft.TRAK(make_mlp(), proj_dim=8, store=path, progress=False).featurize(make_data(10))


@pytest.mark.parametrize("kind", ["empty group", "group with an array", "array"])
def test_a_foreign_zarr_hierarchy(tmp_path, kind):
    path = tmp_path / "z"
    if kind == "array":
        zarr.create_array(str(path), shape=(3,), dtype="float32")
    else:
        group = zarr.open_group(str(path), mode="w")
        if kind == "group with an array":
            group.create_array("a", shape=(2,), dtype="int8")
    before = contents(path)
    with pytest.raises(ft.StoreError, match="zarr hierarchy that fasttrak did not make"):
        ft.TRAK(make_mlp(), store=path)
    assert contents(path) == before


def test_a_store_of_an_older_format(tmp_path):
    path = tmp_path / "old"
    group = zarr.open_group(str(path), mode="w")
    group.attrs["fasttrak"] = {"format_version": 1, "k": 8}
    with pytest.raises(ft.StoreMismatchError, match="older fasttrak"):
        ft.TRAK(make_mlp(), store=path)


def test_scores_exist_at_the_save_path(tmp_path):
    x, y = make_data(20)
    model = make_mlp()
    trak = ft.TRAK(model, proj_dim=8, progress=False)
    trak.featurize((x, y))
    first = trak.score((x[:2], y[:2]))
    first.save(tmp_path / "scores.zarr")
    first.save(tmp_path / "scores.zarr")  # the same scores: a no-op
    other = trak.score((x[2:4], y[2:4]))
    with pytest.raises(ft.ScoresExistError, match="overwrite=True"):
        other.save(tmp_path / "scores.zarr")
    np.testing.assert_array_equal(ft.load_scores(tmp_path / "scores.zarr"), np.asarray(first))
    other.save(tmp_path / "scores.zarr", overwrite=True)
    np.testing.assert_array_equal(ft.load_scores(tmp_path / "scores.zarr"), np.asarray(other))
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ft.StoreError, match="is a file"):
        other.save(tmp_path / "plain")
    with pytest.raises(ft.StoreError, match="no saved scores"):
        ft.load_scores(tmp_path / "nothing.zarr")


READ_ONLY_CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import numpy as np, torch
    from conftest import make_data, make_mlp
    import fasttrak as ft
    os.setgid(65534); os.setuid(65534)  # nobody: the store's files are read-only for us
    x, y = make_data(30)
    model = make_mlp()
    trak = ft.TRAK(model, proj_dim=8, store={store!r}, progress=False)
    assert not trak.store.writable
    trak.featurize((x, y), checkpoints=[model.state_dict()])  # finished: nothing to write
    scores = np.asarray(trak.score((x[:3], y[:3])))
    np.save({out!r}, scores)
    try:
        trak.featurize((x, y), checkpoints=[make_mlp(seed=1).state_dict()], model_ids=[1])
    except ft.ReadOnlyStoreError as error:
        print("refused:", error)
    """
)


@pytest.mark.skipif(not hasattr(os, "setuid"), reason="POSIX only")
def test_a_read_only_store_can_be_scored(tmp_path):
    """The kernel factor is kept in memory when it cannot be cached in the store."""
    x, y = make_data(30)
    model = make_mlp()
    root = Path(tempfile.mkdtemp())
    try:
        store = root / "store"
        trak = ft.TRAK(model, proj_dim=8, store=store, progress=False)
        trak.featurize((x, y), checkpoints=[model.state_dict()])  # no kernel cached yet
        expected = np.asarray(trak.score((x[:3], y[:3])))
        for kernels in store.glob("checkpoints/*/kernels"):
            shutil.rmtree(kernels)
        out = root / "out.npy"
        os.chmod(root, 0o777)
        subprocess.run(["chmod", "-R", "a+rX,a-w", str(store)], check=True)
        if os.geteuid() != 0:
            pytest.skip("needs root to run the reader as another user")
        tests = str(Path(__file__).parent)
        code = READ_ONLY_CHILD.format(tests=tests, store=str(store), out=str(out))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "refused:" in result.stdout and "read-only" in result.stdout
        np.testing.assert_array_equal(np.load(out), expected)
        assert not list(store.glob("checkpoints/*/kernels"))  # nothing was written
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_every_fasttrak_error_is_caught_by_fasttrak_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    for attempt in (
        lambda: ft.TRAK(make_mlp(), store=path),
        lambda: ft.TRAK(make_mlp(), ridge=float("nan")),
        lambda: ft.TRAK(make_mlp(), proj_dim=1.5),
        lambda: ft.load_scores(tmp_path / "none"),
    ):
        with pytest.raises(ft.FastTrakError):
            attempt()
    assert json.dumps({"ok": True})


def test_a_full_disk_is_a_store_error_and_the_run_resumes(tmp_path, monkeypatch):
    import errno

    from fasttrak.store.files import DirectoryFiles

    x, y = make_data(40)
    model = make_mlp()
    stage = DirectoryFiles._stage
    calls = []

    def full_after_some(self, data):
        calls.append(1)
        if len(calls) > 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return stage(self, data)

    monkeypatch.setattr(DirectoryFiles, "_stage", full_after_some)
    trak = ft.TRAK(model, proj_dim=8, store=tmp_path / "s", chunk_rows=8, progress=False)
    with pytest.raises(ft.StoreError, match="No space left on device"):
        trak.featurize((x, y), checkpoints=[model.state_dict()])
    monkeypatch.setattr(DirectoryFiles, "_stage", stage)
    trak.featurize((x, y), checkpoints=[model.state_dict()])
    fresh = ft.TRAK(model, proj_dim=8, store=tmp_path / "f", chunk_rows=8, progress=False)
    fresh.featurize((x, y), checkpoints=[model.state_dict()])
    np.testing.assert_array_equal(trak.store.model(0).features(), fresh.store.model(0).features())


@pytest.mark.parametrize("during", [1, 2])
def test_a_store_created_while_another_process_checks_the_path(tmp_path, monkeypatch, during):
    """The creation race, made deterministic: another process creates the store while
    this one lists the directory (call 1) or its records folder (call 2); this one must join
    it, not call it foreign."""
    from fasttrak.store import core

    path = tmp_path / "s"
    (path / "records" / "staging").mkdir(parents=True)  # the other process has begun
    listdir = core.os.listdir
    calls, created = [], []

    def listdir_while_created(where):
        calls.append(where)
        if len(calls) == during and not created:
            created.append(None)  # the other process runs its own check undisturbed
            created[0] = ft.TRAK(make_mlp(), proj_dim=8, store=path, progress=False)
        return listdir(where)

    monkeypatch.setattr(core.os, "listdir", listdir_while_created)
    joined = ft.TRAK(make_mlp(), proj_dim=8, store=path, progress=False)
    assert created and joined.store.store_id == created[0].store.store_id


@pytest.mark.parametrize("store, error", [(123, ft.ConfigTypeError), ("", ft.ConfigError)])
def test_a_store_that_is_not_a_path(store, error):
    with pytest.raises(error, match="store="):
        ft.TRAK(make_mlp(), store=store)


def test_bad_model_ids_and_save_paths(tmp_path):
    x, y = make_data(20)
    trak = ft.TRAK(make_mlp(), proj_dim=8, progress=False)
    trak.featurize((x, y))
    with pytest.raises(ft.ConfigTypeError, match="integer model ids"):
        trak.score((x[:2], y[:2]), model_ids=[0.5])
    with pytest.raises(ft.ConfigError, match="distinct stored model ids"):
        trak.score((x[:2], y[:2]), model_ids=[3])
    with pytest.raises(ft.ConfigError, match="directory path"):
        trak.score((x[:2], y[:2])).save("")


def test_scores_of_a_model_overwritten_meanwhile_say_so(tmp_path):
    x, y = make_data(30)
    model, other = make_mlp(seed=0), make_mlp(seed=1)
    trak = ft.TRAK(model, proj_dim=8, store=tmp_path, progress=False)
    trak.featurize((x, y), checkpoints=[model.state_dict()])
    scores = trak.score((x[:2], y[:2]))  # lazy: features are read when the scores are
    ft.TRAK(model, proj_dim=8, store=tmp_path, progress=False).featurize(
        (x, y), checkpoints=[other.state_dict()], overwrite=True
    )
    with pytest.raises(ft.StoreCorruptError, match="overwritten or repaired"):
        np.asarray(scores)
