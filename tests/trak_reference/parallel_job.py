"""One "separate script" of traker's parallel pattern (tests/trak_reference/test_parallel.py
and tests/test_compat_trak.py run it as its own process)::

    python parallel_job.py SAVE_DIR featurize MODEL_IDS START STOP [DIE_AFTER]
    python parallel_job.py SAVE_DIR score MODEL_IDS START STOP

featurize: for each model id (comma-separated), load its checkpoint and featurize training
rows START..STOP in batches (inds=), then finalize that model's features when the rows are
all of them; DIE_AFTER=k kills the process (os._exit, no cleanup) after k batches, as a
preempted job would. score: for each model id, score target rows START..STOP (inds=).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from tiny_models import BATCH_SIZE, N_TARGETS, N_TRAIN, checkpoints, get_dataloader, tiny_cnn

from fasttrak.compat.trak import TRAKer


def make_traker(save_dir: str) -> TRAKer:
    return TRAKer(
        model=tiny_cnn(),
        task="image_classification",
        train_set_size=N_TRAIN,
        save_dir=save_dir,
        device="cpu",
    )


def featurize(save_dir: str, ids: list[int], start: int, stop: int, die_after: int) -> None:
    inds = np.arange(start, stop)
    traker = make_traker(save_dir)
    ckpts = checkpoints()
    done = 0
    for model_id in ids:
        traker.load_checkpoint(checkpoint=ckpts[model_id], model_id=model_id)
        for i, batch in enumerate(get_dataloader(split="train", indices=inds)):
            traker.featurize(batch=batch, inds=inds[i * BATCH_SIZE : (i + 1) * BATCH_SIZE])
            done += 1
            if done == die_after:
                os._exit(137)
    if (start, stop) == (0, N_TRAIN):
        traker.finalize_features(model_ids=ids)


def score(save_dir: str, ids: list[int], start: int, stop: int) -> None:
    inds = np.arange(start, stop)
    traker = make_traker(save_dir)
    ckpts = checkpoints()
    for model_id in ids:
        traker.start_scoring_checkpoint("test_experiment", ckpts[model_id], model_id, N_TARGETS)
        for i, batch in enumerate(get_dataloader(split="val", indices=inds)):
            traker.score(batch=batch, inds=inds[i * BATCH_SIZE : (i + 1) * BATCH_SIZE])


if __name__ == "__main__":
    torch.set_num_threads(1)
    save_dir, role, ids_text, start, stop = sys.argv[1:6]
    ids = [int(m) for m in ids_text.split(",")]
    if role == "featurize":
        die_after = int(sys.argv[6]) if len(sys.argv) > 6 else -1
        featurize(save_dir, ids, int(start), int(stop), die_after)
    else:
        score(save_dir, ids, int(start), int(stop))
