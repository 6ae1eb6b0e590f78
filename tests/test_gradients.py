"""Per-example gradients (torch.func engine) against a loop of torch.autograd.grad."""

from __future__ import annotations

import pytest
import torch
from conftest import loop_gradients, make_cnn, make_data, make_mlp
from torch import nn

from fasttrak.checkpoints import load_state
from fasttrak.gradients import VmapGradients, select_parameters
from fasttrak.tasks import ImageClassification


def engine_gradients(model, x, y, params=None, chunk_size=4):
    names = select_parameters(model, params)
    engine = VmapGradients(model, ImageClassification(), names, chunk_size=chunk_size)
    model.eval()
    return names, engine(load_state(model, None), (x, y))


def test_mlp_matches_autograd_loop():
    model = make_mlp()
    x, y = make_data(11)
    names, grads = engine_gradients(model, x, y)
    expected = loop_gradients(model, x, y, names, torch.float32)
    assert grads.shape == (11, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-6)


def test_cnn_with_batchnorm_buffers_matches_autograd_loop():
    model = make_cnn()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 1, 6, 6, generator=gen), torch.randint(0, 3, (9,), generator=gen)
    names, grads = engine_gradients(model, x, y, chunk_size=2)
    expected = loop_gradients(model, x, y, names, torch.float32)
    torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("params", ["2.*", ["0.weight", "2.bias"], nn.Linear])
def test_selection_by_glob_names_and_type(params):
    model = make_mlp()
    x, y = make_data(6)
    names, grads = engine_gradients(model, x, y, params=params)
    expected = loop_gradients(model, x, y, names, torch.float32)
    torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-6)
    assert grads.shape[1] == sum(dict(model.named_parameters())[n].numel() for n in names)


def test_selection_by_submodule():
    model = make_mlp()
    assert select_parameters(model, model[2]) == ["2.weight", "2.bias"]


class _NoBackward(torch.autograd.Function):
    """Identity whose backward fails: proves a path is never differentiated."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("differentiated a parameter that was not selected")


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        w = _NoBackward.apply(self.frozen.weight)
        return self.head(torch.tanh(x @ w.T + self.frozen.bias))


def test_unselected_parameters_are_not_differentiated():
    torch.manual_seed(0)
    model = _Frozen()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(AssertionError, match="not selected"):
        engine_gradients(model, x, y, params=None)
    names, grads = engine_gradients(model, x, y, params="head.*")
    assert names == ["head.weight", "head.bias"] and grads.shape == (5, 15)


def test_chunk_size_does_not_change_gradients():
    model = make_mlp()
    x, y = make_data(10)
    _, a = engine_gradients(model, x, y, chunk_size=1)
    _, b = engine_gradients(model, x, y, chunk_size=None)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_margin_is_stable_for_half_precision_logits(dtype):
    from fasttrak.tasks.classification import margin_from_logits

    logits = torch.tensor([[30000.0, -30000.0, 0.0], [1.0, 2.0, 3.0]]).to(dtype)
    margin = margin_from_logits(logits, torch.tensor([0, 2]))
    assert margin.dtype == torch.float32 and torch.isfinite(margin).all()
    exact = torch.tensor([30000.0, 3.0 - torch.logsumexp(torch.tensor([1.0, 2.0]), 0).item()])
    torch.testing.assert_close(margin, exact, rtol=1e-2, atol=1e-2)


def test_params_exclusions():
    model = make_mlp()
    assert select_parameters(model, "!0.bias") == ["0.weight", "2.weight", "2.bias"]
    assert select_parameters(model, ["*.weight", "!2.*"]) == ["0.weight"]
    assert select_parameters(model, [nn.Linear, "!*.bias"]) == ["0.weight", "2.weight"]
    with pytest.raises(ValueError, match="exclusion '!nope' matches no parameter"):
        select_parameters(model, ["!nope"])
    with pytest.raises(ValueError, match="leaves no parameter"):
        select_parameters(model, ["0.*", "!0.*"])


def test_public_surface():
    import fasttrak.gradients as gradients

    for name in gradients.__all__:
        assert getattr(gradients, name) is not None
    assert {"FactoredFeatures", "LayerSpec", "layer_spec", "is_covered", "COVERED_TYPES"} <= set(
        gradients.__all__
    )
    assert {"split_batch", "batchless_layers", "HookGradients", "ENGINES"} <= set(gradients.__all__)
