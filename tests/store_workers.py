"""Worker processes for tests/test_store_concurrency.py: each waits at a barrier, then works
on a shared store, and writes what it did (chunks it computed, errors) to a JSON file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

import fasttrak as ft
from fasttrak.store import core

N, CHUNK, K = 96, 8, 8


class Slow(torch.utils.data.Dataset):
    """Fixed data whose items take ``delay`` seconds: chunks of workers overlap in time."""

    def __init__(self, delay: float = 0.003) -> None:
        gen = torch.Generator().manual_seed(2)
        self.x = torch.randn(N, 5, generator=gen)
        self.y = torch.randint(0, 3, (N,), generator=gen)
        self.delay = delay

    def __len__(self) -> int:
        return N

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.x[i], self.y[i]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def state(seed: int) -> dict:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    return net.state_dict()


def targets():
    data = Slow(0)
    return data.x[:5], data.y[:5]


def make_trak(store: str, **settings) -> ft.TRAK:
    settings = {"proj_dim": K, "chunk_rows": CHUNK, "batch_size": 4, **settings}
    return ft.TRAK(model(), store=store, progress=False, **settings)


def _logging_writes(log: list) -> None:
    original = core.ModelStore.write_chunk

    def write_chunk(self, c, *args, **kwargs):
        original(self, c, *args, **kwargs)
        log.append([self.model_id, c])

    core.ModelStore.write_chunk = write_chunk


def featurize(store: str, seeds: list[int], ids: list[int] | None, barrier, out: str, **kw):
    """Featurize checkpoints of ``seeds`` (as model ``ids``) after the barrier."""
    torch.set_num_threads(1)
    written: list = []
    _logging_writes(written)
    result: dict = {"written": written, "error": None}
    try:
        barrier.wait()
        trak = make_trak(store)  # the store is created at the same moment by every worker
        trak.featurize(Slow(), checkpoints=[state(s) for s in seeds], model_ids=ids, **kw)
    except ft.FastTrakError as error:
        result["error"] = [type(error).__name__, str(error)]
    Path(out).write_text(json.dumps(result))


def create(store: str, proj_dim: int, barrier, out: str) -> None:
    """Open (create) the store after the barrier."""
    result: dict = {"error": None}
    barrier.wait()
    try:
        make_trak(store, proj_dim=proj_dim)
    except ft.FastTrakError as error:
        result["error"] = [type(error).__name__, str(error)]
    Path(out).write_text(json.dumps(result))


def score(store: str, seeds: list[int], barrier, out: str) -> None:
    """Score (building the kernel factors) and save after the barrier."""
    torch.set_num_threads(1)
    trak = make_trak(store)
    barrier.wait()
    scores = trak.score(targets(), checkpoints=[state(s) for s in seeds])
    dense = np.asarray(scores)
    scores.save(Path(store).parent / "scores.zarr")
    np.save(out, dense)


def overwrite_while_writing(store: str, started: str, out: str) -> None:
    """Wait until another process has finished a chunk of model 0, then try to replace
    model 0 with other weights."""
    deadline = time.time() + 60
    done = Path(store) / "records" / "checkpoints" / "0" / "done"
    while time.time() < deadline and not (done.exists() and any(done.iterdir())):
        time.sleep(0.01)
    result: dict = {"error": None}
    try:
        make_trak(store).featurize(Slow(0), checkpoints=[state(9)], overwrite=True)
    except ft.FastTrakError as error:
        result["error"] = [type(error).__name__, str(error)]
    Path(out).write_text(json.dumps(result))
