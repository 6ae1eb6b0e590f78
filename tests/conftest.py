"""Small models and data shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def make_mlp(seed: int = 0, d_in: int = 5, hidden: int = 4, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


class SmallCNN(nn.Module):
    """conv -> batchnorm -> relu -> pool -> linear on (B, 1, 6, 6) inputs; has buffers."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 3 * 3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


def make_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN()
    # Non-trivial running statistics, so that buffers matter.
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model


def make_data(n: int, d_in: int = 5, classes: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def loop_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    names: list[str],
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Oracle: per-example gradients of the margin by one autograd.grad call per example."""
    from fasttrak.tasks.classification import margin_from_logits

    model = _copy(model, dtype)
    model.eval()
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        logits = model(x[i : i + 1].to(dtype))
        if dtype == torch.float64:  # margin_from_logits upcasts to float32; keep float64 here
            correct = logits[0, y[i]]
            others = torch.cat([logits[0, : y[i]], logits[0, y[i] + 1 :]])
            f = correct - torch.logsumexp(others, 0)
        else:
            f = margin_from_logits(logits, y[i : i + 1])[0]
        grads = torch.autograd.grad(f, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()
