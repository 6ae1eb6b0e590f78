"""Featurizes a fixed problem slowly into a store; the resume test kills this process.

Usage: python resume_child.py STORE_DIR [DELAY_SECONDS]
"""

from __future__ import annotations

import sys
import time

import torch
from torch.utils.data import Dataset

import fasttrak as ft

N, CHUNK_ROWS, K = 160, 16, 32


class SlowData(Dataset):
    """A fixed (input, label) dataset whose items take ``delay`` seconds each; counts loads."""

    def __init__(self, delay: float = 0.0) -> None:
        gen = torch.Generator().manual_seed(11)
        self.x = torch.randn(N, 5, generator=gen)
        self.y = torch.randint(0, 3, (N,), generator=gen)
        self.delay = delay
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        time.sleep(self.delay)
        self.loaded.append(i)
        return self.x[i], self.y[i]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def make_trak(store: str) -> ft.TRAK:
    return ft.TRAK(
        make_model(), proj_dim=K, store=store, chunk_rows=CHUNK_ROWS, batch_size=8, progress=False
    )


if __name__ == "__main__":
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    trak = make_trak(sys.argv[1])
    trak.featurize(SlowData(delay), checkpoints=[make_model().state_dict()])
