"""Dropout-mask ensembles: one checkpoint, several fixed dropout masks, exact gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_data
from torch import nn

import fasttrak as ft
from fasttrak.ensembles import keep_mask
from fasttrak.gradients import select_parameters


def dropout_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))


def masked_loop_gradients(model, x, y, mask_index, seed):
    """Oracle: the dropout layer replaced by a fixed multiplication, autograd per example."""
    keep = keep_mask(seed, mask_index, "2", (8,), 0.5).double()
    model = model.double().eval()
    names = select_parameters(model)
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(y)):
        hidden = model[1](model[0](x[i : i + 1].double())) * keep
        logits = model[3](hidden)[0]
        others = torch.cat([logits[: y[i]], logits[y[i] + 1 :]])
        f = logits[y[i]] - torch.logsumexp(others, 0)
        grads = torch.autograd.grad(f, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    model.float()
    return torch.stack(rows).numpy()


def test_members_use_their_own_fixed_mask_exactly():
    model = dropout_mlp()
    x, y = make_data(12)
    trak = ft.TRAK(model, projector="identity", progress=False)
    trak.featurize((x, y), checkpoints=ft.dropout_ensemble(model.state_dict(), 3))
    assert trak.store.model_ids() == [0, 1, 2]
    assert model[2].training is True  # the user's model is left as it was
    features = [trak.store.model(m).features() for m in range(3)]
    for m in range(3):
        expected = masked_loop_gradients(model, x, y, m, seed=0)
        np.testing.assert_allclose(features[m], expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(features[0], features[1])
    assert len({trak.store.model(m).fingerprint for m in range(3)}) == 3


def test_dropout_ensemble_scores_are_reproducible(tmp_path):
    model = dropout_mlp()
    x, y = make_data(30)
    runs = []
    for path in (tmp_path / "a", tmp_path / "b"):
        trak = ft.TRAK(model, proj_dim=16, store=path, progress=False)
        trak.featurize((x, y), checkpoints=ft.dropout_ensemble(model, 4))
        runs.append(np.asarray(trak.score((x[:3], y[:3]))))
    np.testing.assert_array_equal(runs[0], runs[1])
    plain = ft.TRAK(model, proj_dim=16, progress=False)
    plain.featurize((x, y), checkpoints=[model])
    assert not np.allclose(np.asarray(plain.score((x[:3], y[:3]))), runs[0])


def test_dropout_ensemble_needs_dropout_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = make_data(6)
    with pytest.raises(ValueError, match="no"):
        ft.TRAK(model, proj_dim=4, progress=False).featurize(
            (x, y), checkpoints=ft.dropout_ensemble(model, 2)
        )
    with pytest.raises(ValueError, match="size >= 1"):
        ft.dropout_ensemble(model, 0)
