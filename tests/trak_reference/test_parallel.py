# Adapted from MadryLab/trak, tests/test_parallel.py at commit
# 35f8446f05342f116b798fcd918a0718cac0d597 (https://github.com/MadryLab/trak): the same
# five scenarios (one TRAKer per model id, repeated scoring, scoring in shards with inds,
# featurizing in shards with inds, preemption), on CPU with small random data. Changes:
# imports; devices (cpu); data sizes (a tiny random CNN, 1000 random training examples and
# 40 targets instead of ResNet-9 on CIFAR-2); what traker's comments call "essentially
# equivalent to running each TRAKer in a separate script" runs as separate processes
# (parallel_job.py, several at once on one save_dir), the preemption kills a process midway;
# and, with no trained checkpoints or ground truth to download, the check that the
# correlation with CIFAR-2 ground truth exceeds 0.062 becomes: the scores equal those of
# the same work done in one process.
#
#
# MIT License
#
# Copyright (c) 2023 Madry Lab
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.

import logging

import numpy as np
import pytest
from jobs import run_jobs
from tiny_models import BATCH_SIZE, N_TARGETS, N_TRAIN, checkpoints, get_dataloader, tiny_cnn

from fasttrak.compat.trak import TRAKer
from fasttrak.store import Store

device = "cpu"
batch_size = BATCH_SIZE


def make_traker(save_dir):
    return TRAKer(
        model=tiny_cnn().eval(),
        task="image_classification",
        train_set_size=N_TRAIN,
        save_dir=save_dir,
        device=device,
        logging_level=logging.DEBUG,
    )


def featurize_all(traker, ckpts):
    loader_train = get_dataloader(batch_size=batch_size, split="train")
    for model_id, ckpt in enumerate(ckpts):
        traker.load_checkpoint(checkpoint=ckpt, model_id=model_id)
        for batch in loader_train:
            traker.featurize(batch=batch, num_samples=len(batch[0]))
    traker.finalize_features()


def score_all(save_dir, ckpts):
    loader_val = get_dataloader(batch_size=batch_size, split="val")
    for model_id, ckpt in enumerate(ckpts):
        traker = make_traker(save_dir)
        traker.start_scoring_checkpoint("test_experiment", ckpt, model_id, num_targets=N_TARGETS)
        for batch in loader_val:
            traker.score(batch=batch, num_samples=len(batch[0]))
    return traker.finalize_scores(exp_name="test_experiment")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The scores of all the work done by one TRAKer in this process."""
    save_dir = tmp_path_factory.mktemp("one_process")
    ckpts = checkpoints()
    featurize_all(make_traker(save_dir), ckpts)
    return score_all(save_dir, ckpts)


def assert_same(scores, expected):
    assert scores.shape == (N_TRAIN, N_TARGETS)
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_featurize_and_score_in_parallel(tmp_path, one_process):
    # one process per model id featurizes (and finalizes) it, all at once ...
    run_jobs(*[[tmp_path, "featurize", m, 0, N_TRAIN] for m in range(2)])
    # ... then one process per model id computes its target features, all at once
    run_jobs(*[[tmp_path, "score", m, 0, N_TARGETS] for m in range(2)])
    scores = make_traker(tmp_path).finalize_scores(exp_name="test_experiment")
    assert_same(scores, one_process)


def test_score_multiple(tmp_path, one_process):
    ckpts = checkpoints()
    featurize_all(make_traker(tmp_path), ckpts)
    scoring_runs = range(3)
    for _ in scoring_runs:
        scores = score_all(tmp_path, ckpts)
        assert_same(scores, one_process)


def test_score_in_shards(tmp_path, one_process):
    featurize_all(make_traker(tmp_path), checkpoints())
    # each shard of targets scored (for every model id) by its own process, at once
    half = N_TARGETS // 2
    run_jobs([tmp_path, "score", "0,1", 0, half], [tmp_path, "score", "0,1", half, N_TARGETS])
    scores = make_traker(tmp_path).finalize_scores("test_experiment")
    assert_same(scores, one_process)


def test_featurize_in_shards(tmp_path, one_process):
    # each shard of training rows featurized (for every model id) by its own process, at
    # once; the shards share the row chunk 0-511 of the store
    half = N_TRAIN // 2
    run_jobs([tmp_path, "featurize", "0,1", 0, half], [tmp_path, "featurize", "0,1", half, N_TRAIN])
    traker = make_traker(tmp_path)
    traker.finalize_features()
    assert_same(score_all(tmp_path, checkpoints()), one_process)


def test_preemption(tmp_path, one_process):
    # a job featurizing everything is killed after 7 batches of model 0 ...
    run_jobs([tmp_path, "featurize", "0,1", 0, N_TRAIN, 7], expect=137)
    store = Store.open_existing(tmp_path / "store")
    assert store.model(0).done(0) is not None  # rows 0-511 were finished: they are kept
    # ... then, as in traker's test, a shard and the whole set are featurized again
    ckpts = checkpoints()
    featurizing_shards = [np.arange(N_TRAIN // 2), np.arange(N_TRAIN)]
    for featurizing_inds in featurizing_shards:
        loader_train = get_dataloader(
            batch_size=batch_size, split="train", indices=featurizing_inds
        )
        traker = make_traker(tmp_path)
        for model_id, ckpt in enumerate(ckpts):
            traker.load_checkpoint(checkpoint=ckpt, model_id=model_id)
            for batch_idx, batch in enumerate(loader_train):
                batch_inds = featurizing_inds[batch_idx * batch_size : (batch_idx + 1) * batch_size]
                traker.featurize(batch=batch, inds=batch_inds)
    traker.finalize_features()
    assert_same(score_all(tmp_path, ckpts), one_process)
