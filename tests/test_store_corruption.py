"""Integrity: damage to any stored array or record is detected when read (StoreCorruptError
naming the model, array and chunk), reported by verify, and repaired by repair (plus a
featurize or save that recomputes only what was lost), back to the same bits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import fasttrak as ft

N, CHUNK, K = 40, 16, 8  # chunks of 16, 16 and 8 rows


def problem():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N + 4, 5, generator=gen)
    y = torch.randint(0, 3, (N + 4,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    return model, (x[:N], y[:N]), (x[N:], y[N:])


def make_trak(store: Path) -> ft.TRAK:
    model, _, _ = problem()
    return ft.TRAK(model, proj_dim=K, store=store, chunk_rows=CHUNK, progress=False)


def run(work: Path) -> tuple[ft.TRAK, np.ndarray]:
    """featurize -> score -> save in ``work``; the dense scores."""
    model, train, targets = problem()
    trak = make_trak(work / "store")
    trak.featurize(train, checkpoints=[model.state_dict()])
    scores = trak.score(targets)
    scores.save(work / "scores.zarr")
    return trak, np.asarray(scores)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    work = tmp_path_factory.mktemp("pristine")
    _, expected = run(work)
    return work, expected


@pytest.fixture
def work(pristine, tmp_path):
    source, _ = pristine
    shutil.copytree(source, tmp_path / "w")
    return tmp_path / "w"


def array_dir(work: Path, kind: str) -> Path:
    if kind == "saved":
        return work / "scores.zarr"
    if kind in ("features", "q"):
        return work / "store" / "checkpoints" / "0" / kind
    (found,) = (work / "store" / "checkpoints" / "0" / "kernels").glob(f"{kind}-*")
    return found


CHUNK_FILE = {
    "features": "c/1/0",
    "q": "c/1",
    "gram": "c/0/0",
    "factor": "c/0/0/0",
    "saved": "c/0/1",
}
ELEMENT = {"features": (17, 3), "q": 17, "gram": (2, 3), "factor": (0, 2, 1), "saved": (1, 20)}
WORDS = {
    "features": ["model 0", "array features", "chunk 1"],
    "q": ["model 0", "array q", "chunk 1"],
    "gram": ["model 0", "gram"],
    "factor": ["model 0", "factor"],
    "saved": ["scores.zarr"],
}


def flip_byte(work, kind):
    path = array_dir(work, kind) / CHUNK_FILE[kind]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def write_nan(work, kind):
    array = zarr.open_array(str(array_dir(work, kind)), mode="r+")
    array[ELEMENT[kind]] = np.nan


def delete_chunk(work, kind):
    (array_dir(work, kind) / CHUNK_FILE[kind]).unlink()


def edit_metadata(change):
    def mutate(work, kind):
        path = array_dir(work, kind) / "zarr.json"
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))

    return mutate


def set_fill(meta):
    meta["fill_value"] = 0.0


def set_dtype(meta):
    meta["data_type"] = "float16" if meta["data_type"] != "float16" else "float32"


def grow_shape(meta):
    meta["shape"][0] += 1


def halve_chunks(meta):
    shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    shape[-1] = max(1, shape[-1] // 2)


def big_endian(meta):
    meta["codecs"][0]["configuration"]["endian"] = "big"


def garbage_metadata(work, kind):
    (array_dir(work, kind) / "zarr.json").write_bytes(b'{"shape": [1, 2')


def delete_metadata(work, kind):
    (array_dir(work, kind) / "zarr.json").unlink()


MUTATIONS = {
    "flip a byte": flip_byte,
    "write a NaN": write_nan,
    "delete a chunk file": delete_chunk,
    "fill value": edit_metadata(set_fill),
    "dtype": edit_metadata(set_dtype),
    "shape": edit_metadata(grow_shape),
    "chunk shape": edit_metadata(halve_chunks),
    "byte order": edit_metadata(big_endian),
    "garbage metadata": garbage_metadata,
    "deleted metadata": delete_metadata,
}


def read_back(work: Path, kind: str) -> np.ndarray:
    """Read what ``kind`` feeds: scores from the store, or the saved scores."""
    if kind == "saved":
        return ft.load_scores(work / "scores.zarr")
    if kind == "gram":  # the gram is read only when the factor must be built
        for factor in (work / "store" / "checkpoints" / "0" / "kernels").glob("factor-*"):
            shutil.rmtree(factor)
    model, _, targets = problem()
    trak = make_trak(work / "store")
    return np.asarray(trak.score(targets, checkpoints=[model.state_dict()]))


@pytest.mark.parametrize("kind", ["features", "q", "gram", "factor", "saved"])
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_damage_is_detected_reported_and_repaired(work, pristine, kind, mutation):
    _, expected = pristine
    MUTATIONS[mutation](work, kind)
    with pytest.raises(ft.StoreCorruptError) as caught:
        read_back(work, kind)
    data_damage = mutation in ("flip a byte", "write a NaN", "delete a chunk file")
    for word in WORDS[kind]:
        if word.startswith("chunk") and not data_damage:
            continue  # metadata damage concerns the whole array
        assert word in str(caught.value), str(caught.value)
    assert "repair" in str(caught.value) or "save" in str(caught.value)
    if kind == "saved":
        report = ft.verify_store(work / "scores.zarr")
        assert not report.ok
        model, train, targets = problem()
        trak = make_trak(work / "store")
        scores = trak.score(targets, checkpoints=[model.state_dict()])
        # Saving the same scores again replaces a damaged save; when the damage hides whose
        # scores they are (their metadata is gone), only overwrite=True replaces them.
        unknown = mutation in ("garbage metadata", "deleted metadata")
        if unknown:
            with pytest.raises(ft.ScoresExistError, match="overwrite=True"):
                scores.save(work / "scores.zarr")
        scores.save(work / "scores.zarr", overwrite=unknown)
        np.testing.assert_array_equal(ft.load_scores(work / "scores.zarr"), expected)
        assert ft.verify_store(work / "scores.zarr").ok
        return
    report = ft.verify_store(work / "store")
    assert not report.ok and any("model 0" in p.where for p in report.problems), str(report)
    repaired = ft.repair_store(work / "store")
    assert repaired.problems == report.problems
    assert ft.verify_store(work / "store").ok
    if kind in ("features", "q") and mutation in (
        "flip a byte",
        "write a NaN",
        "delete a chunk file",
    ):
        assert repaired.recompute == {0: [1]}  # only the damaged chunk is recomputed
    _, again = run(work)
    np.testing.assert_array_equal(again, expected)
    assert ft.verify_store(work / "store").ok


def test_featurize_repair_recomputes_only_the_damaged_chunks(work, pristine):
    _, expected = pristine
    flip_byte(work, "features")
    model, train, targets = problem()
    trak = make_trak(work / "store")
    with pytest.raises(ft.StoreCorruptError, match="chunk 1"):
        np.asarray(trak.score(targets, checkpoints=[model.state_dict()]))
    loaded = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            loaded.append(i)
            return train[0][i], train[1][i]

    with pytest.warns(UserWarning, match="chunk recomputed"):
        trak.featurize(Counting(), checkpoints=[model.state_dict()], repair=True)
    # Rows 16-31 recomputed, the others checked against the store's fingerprints: each row
    # is read once (plus the 2-row format check).
    assert sorted(loaded) == sorted([0, 1, *range(N)])
    np.testing.assert_array_equal(np.asarray(trak.score(targets)), expected)


# ---------------------------------------------------------------- records
def record_path(work: Path, which: str) -> Path:
    base = work / "store" / "records"
    return {
        "run": base / "run.json",
        "train": base / "train.json",
        "rows": base / "rows" / "1.json",
        "checkpoint": base / "checkpoints" / "0" / "checkpoint.json",
        "done": base / "checkpoints" / "0" / "done" / "1.json",
        "mirror": work / "store" / "zarr.json",
    }[which]


@pytest.mark.parametrize("which", ["run", "train", "rows", "checkpoint", "done", "mirror"])
@pytest.mark.parametrize("how", ["flip a byte", "edit a value", "delete"])
def test_damaged_records_are_detected_and_repaired(work, pristine, which, how):
    _, expected = pristine
    path = record_path(work, which)
    if how == "delete":
        path.unlink()
    elif how == "flip a byte":
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0x01
        path.write_bytes(bytes(data))
    else:  # valid JSON with one value changed, its checksum left as it was
        text = path.read_text()
        for old, new in (
            ('"n": 40', '"n": 41'),
            ('"k": 8', '"k": 9'),
            ('"chunk": 1', '"chunk": 2'),
            ('"model_id": 0', '"model_id": 3'),
            ('"features": ', '"features": 1'),
        ):
            if old in text:
                path.write_text(text.replace(old, new, 1))
                break
        else:
            pytest.fail(f"nothing to edit in {path}")
    report = ft.verify_store(work / "store")
    if which == "done" and how == "delete":  # a chunk without a done mark is unfinished
        assert report.ok and report.pending == {0: [1]}, str(report)
    else:
        assert not report.ok, f"{which} {how} went unnoticed"
    ft.repair_store(work / "store")
    assert ft.verify_store(work / "store").ok
    _, again = run(work)
    np.testing.assert_array_equal(again, expected)


@pytest.mark.parametrize("which", ["run", "train", "rows", "checkpoint", "done"])
def test_damaged_records_stop_a_run_with_a_clear_error(work, which):
    path = record_path(work, which)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ft.StoreCorruptError, match="repair"):
        run(work)


def test_a_deleted_checkpoint_record_is_not_a_missing_model(work):
    """Done marks without their checkpoint record: scoring must not silently drop the model."""
    record_path(work, "checkpoint").unlink()
    model, _, targets = problem()
    with pytest.raises(ft.StoreCorruptError, match="model 0"):
        make_trak(work / "store").score(targets, checkpoints=[model.state_dict()])


@pytest.mark.parametrize("which", ["train", "checkpoint", "done", "rows"])
def test_featurize_with_repair_restores_damaged_records(work, pristine, which):
    _, expected = pristine
    path = record_path(work, which)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    model, train, targets = problem()
    trak = make_trak(work / "store")
    with pytest.warns(UserWarning, match="repaired before featurizing"):
        trak.featurize(train, checkpoints=[model.state_dict()], repair=True)
    np.testing.assert_array_equal(np.asarray(trak.score(targets)), expected)
    assert ft.verify_store(work / "store").ok
