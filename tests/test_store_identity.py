"""Data identity: a store refuses training rows other than those it was featurized with
(other data of the same size, reordered rows, one changed label), naming the first chunk
that differs, and accepts the same rows however they are batched or loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fasttrak as ft

N, CHUNK = 48, 16  # chunks 0, 1, 2


def data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, 5, generator=gen), torch.randint(0, 3, (N,), generator=gen)


def state(seed: int) -> dict:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).state_dict()


def make(store, **kw) -> ft.TRAK:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    return ft.TRAK(model, proj_dim=8, store=store, chunk_rows=CHUNK, progress=False, **kw)


@pytest.fixture
def featurized(tmp_path):
    trak = make(tmp_path / "s")
    trak.featurize(data(), checkpoints=[state(0)])
    return trak, trak.store.model(0).features()


def unfinish(trak: ft.TRAK, c: int) -> None:
    """Make chunk c of model 0 pending again, as if the run had been killed before it."""
    (trak.store.files.root / "records" / "checkpoints" / "0" / "done" / f"{c}.json").unlink()


def test_other_data_of_the_same_size_is_refused_before_anything_is_written(featurized):
    trak, before = featurized
    with pytest.raises(ft.DataMismatchError, match=r"chunk 0"):
        trak.featurize(data(seed=1), checkpoints=[state(0), state(1)])
    assert trak.store.model_ids() == [0]  # model 1 was not even created
    np.testing.assert_array_equal(trak.store.model(0).features(), before)


def test_reordered_rows_on_resume_name_the_chunk(featurized):
    trak, before = featurized
    unfinish(trak, 2)
    x, y = data()
    order = torch.arange(N)
    order[[20, 21]] = order[[21, 20]]  # two rows of chunk 1 swapped
    with pytest.raises(ft.DataMismatchError, match=r"rows 16-31 \(chunk 1\)"):
        trak.featurize((x[order], y[order]), checkpoints=[state(0)])
    assert trak.store.model(0).pending_chunks() == [2]  # nothing written


def test_one_changed_label_is_refused_when_extending(featurized):
    trak, before = featurized
    x, y = data()
    y = y.clone()
    y[20] = (y[20] + 1) % 3  # chunk 1: found when model 1 reaches it
    with pytest.raises(ft.DataMismatchError, match=r"chunk 1"):
        trak.featurize((x, y), checkpoints=[state(0), state(1)])
    np.testing.assert_array_equal(trak.store.model(0).features(), before)
    assert trak.store.model(1).pending_chunks() == [1, 2]  # chunk 1 was not written
    with pytest.raises(ft.DataMismatchError, match=r"chunk 1"):
        trak.check_data((x, y))
    y[20] = data()[1][20]
    y[40] = (y[40] + 1) % 3  # the last chunk: refused before model 2 is created
    with pytest.raises(ft.DataMismatchError, match=r"chunk 2"):
        trak.featurize((x, y), checkpoints=[state(2)], model_ids=[2])
    assert trak.store.model_ids() == [0, 1]
    assert trak.check_data(data()) == 3
    trak.featurize(data(), checkpoints=[state(0), state(1)])  # the right data finish model 1


def test_a_changed_value_in_a_finished_store(featurized):
    """A no-op featurize checks the first and last chunk ("auto"); "full" and check_data
    check every chunk."""
    trak, _ = featurized
    x, y = data()
    x = x.clone()
    x[20, 0] = torch.nextafter(x[20, 0], torch.tensor(1.0))  # one bit of one input, chunk 1
    trak.featurize((x, y), checkpoints=[state(0)])  # chunks 0 and 2 are the same
    with pytest.raises(ft.DataMismatchError, match=r"chunk 1"):
        trak.featurize((x, y), checkpoints=[state(0)], check_data="full")
    with pytest.raises(ft.DataMismatchError, match=r"chunk 1"):
        trak.check_data((x, y))
    x[0, 0] += 1  # chunk 0: caught by every featurize
    with pytest.raises(ft.DataMismatchError, match=r"chunk 0"):
        trak.featurize((x, y), checkpoints=[state(0)])


def test_the_same_rows_batched_or_loaded_otherwise_are_accepted(featurized):
    trak, before = featurized
    unfinish(trak, 1)
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=False, num_workers=2)
    trak.featurize(loader, checkpoints=[state(0)], check_data="full")
    np.testing.assert_allclose(trak.store.model(0).features(), before, rtol=1e-5, atol=1e-6)
    items = [(x[i], int(y[i])) for i in range(N)]  # Python ints: what default_collate stacks
    assert trak.check_data(items) == 3
    trak.featurize(items, checkpoints=[state(0), state(1)], batch_size=7)


def test_a_different_number_of_rows_is_refused(featurized):
    trak, _ = featurized
    x, y = data()
    with pytest.raises(ft.StoreMismatchError, match="48 examples"):
        trak.featurize((x[:-1], y[:-1]), checkpoints=[state(0)])
    with pytest.raises(ft.DataMismatchError, match="48"):
        trak.check_data((x[:-1], y[:-1]))


def test_bad_check_data_value(featurized):
    trak, _ = featurized
    with pytest.raises(ft.ConfigError, match="check_data"):
        trak.featurize(data(), checkpoints=[state(0)], check_data="none")
