"""Datasets for tests/test_ray.py, importable by Ray workers (PYTHONPATH is set for them)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset


class Rows(Dataset):
    """(x, y) rows; ``hang``: the first worker (not the driver) to read a row writes its
    pid there and sleeps, so that a test can kill it mid-task."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, hang: str | None = None) -> None:
        self.x, self.y, self.hang = x, y, hang
        self.driver = os.getpid()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hang and os.getpid() != self.driver:
            flag = Path(self.hang)
            try:
                with open(flag.with_suffix(".claimed"), "x"):
                    pass
            except FileExistsError:
                pass
            else:
                flag.write_text(str(os.getpid()))
                time.sleep(60)  # killed meanwhile
        return self.x[i], self.y[i]
