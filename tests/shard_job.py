"""One job of an array, run as its own process by tests/test_shards.py:

python shard_job.py STORE MODEL_ID SHARD_INDEX SHARD_COUNT
"""

from __future__ import annotations

import sys

import torch
from conftest import make_data, make_mlp

import fasttrak as ft


def make_trak(store: str) -> ft.TRAK:
    return ft.TRAK(
        make_mlp(), proj_dim=32, store=store, chunk_rows=25, batch_size=10, progress=False
    )


def checkpoint(model_id: int) -> dict[str, torch.Tensor]:
    return make_mlp(seed=100 + model_id).state_dict()


if __name__ == "__main__":
    torch.set_num_threads(1)
    store, model_id, index, count = sys.argv[1], *map(int, sys.argv[2:5])
    make_trak(store).featurize(
        make_data(160),
        checkpoints=[checkpoint(model_id)],
        model_ids=[model_id],
        rows=ft.shard(index, count),
    )
