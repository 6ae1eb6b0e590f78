"""Small random stand-ins for what traker's tests download or build (torchvision's ResNet-18
and ResNet-9 on CIFAR, CIFAR betons, trained checkpoints): a tiny CNN on random 3 x 8 x 8
"images", random labels and independently initialised checkpoints. Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

N_TRAIN = 1000  # two store chunks of 512 rows: shards of 500 share a chunk
N_TARGETS = 40
BATCH_SIZE = 100
CLASSES = 10


class TinyCNN(nn.Module):
    """conv -> relu -> pool -> linear ``fc`` (named like ResNet's head for grad_wrt)."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1))


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyCNN()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def checkpoints(count: int = 2) -> list[dict[str, torch.Tensor]]:
    """Independently initialised models' state dicts (stand-ins for trained checkpoints)."""
    return [tiny_cnn(seed=100 + i).state_dict() for i in range(count)]


def data(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, seed = (N_TRAIN, 1) if split == "train" else (N_TARGETS, 2)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def get_dataloader(
    batch_size: int = BATCH_SIZE, split: str = "train", indices: np.ndarray | None = None
) -> list[list[torch.Tensor]]:
    """Batches ``[images, labels]`` of the split's rows ``indices`` (default all), in order."""
    x, y = data(split)
    rows = torch.arange(len(y)) if indices is None else torch.as_tensor(indices)
    return [
        [x[rows[s : s + batch_size]], y[rows[s : s + batch_size]]]
        for s in range(0, len(rows), batch_size)
    ]
