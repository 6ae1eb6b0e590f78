"""Bad input: each raises an error that says what is wrong and how to fix it, and the store
keeps what it had."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_data, make_mlp
from torch.utils.data import DataLoader, TensorDataset

import fasttrak as ft
from fasttrak.store import Store


def untouched(path) -> bool:
    """True when the store holds no training-set size and no checkpoint."""
    store = Store.open_existing(path)
    return store.num_train is None and not store.model_ids()


@pytest.mark.parametrize(
    "labels, error, words",
    [
        (torch.zeros(10), TypeError, "labels.long()"),
        (torch.zeros(10, 3, dtype=torch.long), ValueError, "one-hot"),
        (torch.full((10,), 7), ValueError, r"\[0, 3\)"),
        (torch.full((10,), -1), ValueError, "remap"),
    ],
)
def test_bad_labels(tmp_path, labels, error, words):
    x, _ = make_data(10)
    trak = ft.TRAK(make_mlp(), proj_dim=8, store=tmp_path, progress=False)
    with pytest.raises(error, match=words):
        trak.featurize((x, labels))
    assert untouched(tmp_path)


def test_a_batch_that_is_not_a_pair():
    x, _ = make_data(10)
    trak = ft.TRAK(make_mlp(), proj_dim=8, progress=False)
    with pytest.raises(TypeError, match=r"\(input, label\)"):
        trak.featurize(TensorDataset(x))


def test_checkpoint_that_does_not_fit(tmp_path):
    x, y = make_data(10)
    trak = ft.TRAK(make_mlp(), proj_dim=8, store=tmp_path, progress=False)
    with pytest.raises(ft.CheckpointMismatchError, match="shapes do not fit"):
        trak.featurize((x, y), checkpoints=[make_mlp(hidden=6).state_dict()])
    renamed = {f"module.{k}": v for k, v in make_mlp().state_dict().items()}
    with pytest.raises(ft.CheckpointMismatchError, match="strip that prefix"):
        trak.featurize((x, y), checkpoints=[renamed])
    with pytest.raises(ft.CheckpointMismatchError, match="training checkpoint"):
        trak.featurize((x, y), checkpoints=[{**make_mlp().state_dict(), "epoch": 3}])
    with pytest.raises(FileNotFoundError):
        trak.featurize((x, y), checkpoints=[tmp_path / "missing.pt"])
    with pytest.raises(TypeError, match="wrap a single one"):
        trak.featurize((x, y), checkpoints=make_mlp().state_dict())
    assert untouched(tmp_path)


def test_nan_gradient_names_the_rows_and_writes_nothing_of_that_chunk(tmp_path):
    x, y = make_data(40)
    x[25, 2] = float("nan")
    trak = ft.TRAK(make_mlp(), proj_dim=8, store=tmp_path, chunk_rows=16, progress=False)
    with pytest.raises(ft.NonFiniteGradientError, match=r"rows \[25\]"):
        trak.featurize((x, y))
    assert trak.store.model(0).pending_chunks() == [1, 2]  # the chunk before it is kept


def test_infinite_weights_are_reported():
    x, y = make_data(8)
    model = make_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["2.weight"][0, 0] = float("inf")
    trak = ft.TRAK(model, proj_dim=8, progress=False)
    with pytest.raises(ft.NonFiniteGradientError, match="diverged"):
        trak.featurize((x, y), checkpoints=[state])


def test_empty_dataset(tmp_path):
    trak = ft.TRAK(make_mlp(), proj_dim=8, store=tmp_path, progress=False)
    with pytest.raises(ValueError, match="empty"):
        trak.featurize((torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)))
    assert untouched(tmp_path)


def test_params_that_match_nothing():
    with pytest.raises(ValueError, match="matches no parameter.*0.weight"):
        ft.TRAK(make_mlp(), params="encoder.*")
    with pytest.raises(ValueError, match="empty list"):
        ft.TRAK(make_mlp(), params=[])


def test_score_before_featurize():
    x, y = make_data(5)
    with pytest.raises(ft.NotFeaturizedError, match="featurize"):
        ft.TRAK(make_mlp(), proj_dim=8, progress=False).score((x, y))


def test_score_with_an_unfinished_store(tmp_path):
    x, y = make_data(40)
    x[30] = float("nan")
    trak = ft.TRAK(make_mlp(), proj_dim=8, store=tmp_path, chunk_rows=16, progress=False)
    with pytest.raises(ft.NonFiniteGradientError):
        trak.featurize((x, y))
    with pytest.raises(ft.NotFeaturizedError, match="unfinished"):
        trak.score((x[:2], y[:2]), checkpoints=[make_mlp().state_dict()])


def test_score_without_checkpoints_on_a_reopened_store(tmp_path):
    x, y = make_data(20)
    ft.TRAK(make_mlp(), proj_dim=8, store=tmp_path, progress=False).featurize((x, y))
    with pytest.raises(ft.NotFeaturizedError, match="pass checkpoints="):
        ft.TRAK(make_mlp(), proj_dim=8, store=tmp_path, progress=False).score((x, y))


def test_shuffling_loader_is_refused():
    x, y = make_data(20)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        ft.TRAK(make_mlp(), proj_dim=8, progress=False).featurize(loader)


def test_a_plain_loader_is_accepted():
    x, y = make_data(20)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    trak = ft.TRAK(make_mlp(), proj_dim=8, progress=False)
    trak.featurize(loader)
    assert np.asarray(trak.score(loader)).shape == (20, 20)


def test_wrong_constructor_arguments():
    with pytest.raises(TypeError, match="instance"):
        ft.TRAK(make_mlp(), task=ft.tasks.ImageClassification)
    with pytest.raises(TypeError, match="nn.Module"):
        ft.TRAK(lambda x: x)
    with pytest.raises(ValueError, match="feature_dtype"):
        ft.TRAK(make_mlp(), feature_dtype="int8")


def test_model_that_does_not_return_logits():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 1)

        def forward(self, x):
            return self.lin(x)[:, 0]

    x, y = make_data(6)
    with pytest.raises(ValueError, match=r"logits of shape \(B, C\)"):
        ft.TRAK(Flat(), proj_dim=4, progress=False).featurize((x, y))


@pytest.mark.parametrize(
    "options",
    [{"engine": "hooks"}, {"engine": "vmap"}, {"projector": "factored"}],
    ids=["hooks", "vmap", "factored"],
)
def test_a_bad_label_past_the_first_batch_is_named_by_the_task(options):
    """Q comes from the gradient pass's forward: a label outside the classes in a later
    batch is still reported by the task's own check, not as an indexing error."""
    import fasttrak as ft

    x, y = make_data(150)
    y[130] = 7
    trak = ft.TRAK(make_mlp(), proj_dim=8, progress=False, **options)
    with pytest.raises(ft.DataError, match=r"labels must lie in \[0, 3\)"):
        trak.featurize((x, y))


def test_the_finite_check_names_bad_rows_and_passes_sums_that_only_overflow():
    """The check is one sum first: a sum that overflows (finite values) must not raise,
    and NaN or inf anywhere must name its rows."""
    from fasttrak.trak import TRAK

    big = torch.full((4, 3), 3e38)
    TRAK._check_finite(big, 0, 0)  # finite, though their float32 sum is inf
    for bad in (float("nan"), float("inf"), -float("inf")):
        values = torch.ones(5, 3)
        values[3, 1] = bad
        with pytest.raises(ft.NonFiniteGradientError, match=r"rows \[13\]"):
            TRAK._check_finite(values, 10, 0)
        q = torch.ones(5)
        q[2] = bad
        with pytest.raises(ft.NonFiniteGradientError, match=r"rows \[12\]"):
            TRAK._check_finite(q, 10, 0)
