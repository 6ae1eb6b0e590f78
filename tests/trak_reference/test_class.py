# Adapted from MadryLab/trak, tests/test_class.py at commit
# 35f8446f05342f116b798fcd918a0718cac0d597 (https://github.com/MadryLab/trak).
# Changes: imports (fasttrak.compat.trak instead of trak; a tiny random CNN from
# tiny_models instead of torchvision's resnet18), devices (cpu instead of cuda, so the
# cuda markers and the .cuda() calls are gone) and data sizes (3 x 8 x 8 inputs; the projector's
# grad_dim is the tiny CNN's parameter count). The test bodies are otherwise unchanged.
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

import pytest
import torch as ch
from tiny_models import num_params
from tiny_models import tiny_cnn as resnet18

from fasttrak.compat.trak import TRAKer
from fasttrak.compat.trak.modelout_functions import ImageClassificationModelOutput
from fasttrak.compat.trak.projectors import BasicProjector, NoOpProjector


@pytest.fixture
def cpu_proj():
    projector = BasicProjector(
        grad_dim=num_params(resnet18()), proj_dim=20, seed=0, proj_type="rademacher", device="cpu"
    )
    return projector


def test_class_init_cpu(tmp_path, cpu_proj):
    model = resnet18()
    TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        projector=cpu_proj,
        train_set_size=20,
        logging_level=logging.DEBUG,
        device="cpu",
    )


def test_class_init(tmp_path, cpu_proj):
    model = resnet18()
    TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        projector=cpu_proj,
        train_set_size=20,
        logging_level=logging.DEBUG,
        device="cpu",
    )


def test_load_ckpt(tmp_path, cpu_proj):
    model = resnet18()
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        projector=cpu_proj,
        train_set_size=20,
        logging_level=logging.DEBUG,
        device="cpu",
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)


def test_load_ckpt_repeat(tmp_path, cpu_proj):
    model = resnet18()
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        projector=cpu_proj,
        train_set_size=20,
        logging_level=logging.DEBUG,
        device="cpu",
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.load_checkpoint(ckpt, model_id=1)


def test_featurize(tmp_path):
    model = resnet18().eval()
    N = 32
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)


def test_max_batch_size(tmp_path):
    model = resnet18().eval()
    N = 32
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        proj_max_batch_size=16,
        device="cpu",
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)


def test_class_featurize_cpu(tmp_path, cpu_proj):
    model = resnet18()
    N = 5
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        projector=cpu_proj,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
    )

    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)


def test_class_featurize_noop(tmp_path):
    model = resnet18()
    N = 5
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        projector=NoOpProjector(device="cpu"),
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
    )

    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)


def test_forgot_loading_ckpt(tmp_path):
    model = resnet18().eval()
    N = 5
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
    )
    with pytest.raises(
        AssertionError,
        match="Load a checkpoint using traker.load_checkpoint before featurizing",
    ):
        traker.featurize(batch, num_samples=N)


def test_finalize_features(tmp_path):
    model = resnet18().eval()
    N = 5
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)
    traker.finalize_features()


def test_finalize_features_multiple_ftr(tmp_path):
    model = resnet18().eval()
    N = 10
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize([x[:3] for x in batch], num_samples=3)
    traker.featurize([x[3:6] for x in batch], num_samples=3)
    traker.featurize([x[6:] for x in batch], num_samples=4)
    traker.finalize_features()


def test_finalize_features_multiple_ftr_and_id(tmp_path):
    model = resnet18().eval()
    N = 10
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
    )
    ckpt = model.state_dict()
    for model_id in range(2):
        traker.load_checkpoint(ckpt, model_id=model_id)
        traker.featurize([x[:3] for x in batch], num_samples=3)
        traker.featurize([x[3:6] for x in batch], num_samples=3)
        traker.featurize([x[6:] for x in batch], num_samples=4)
    traker.finalize_features()


def test_score(tmp_path):
    model = resnet18().eval()
    N = 5
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)
    traker.finalize_features()
    traker.start_scoring_checkpoint("test_experiment", ckpt, 0, num_targets=N)
    traker.score(batch, num_samples=N)


def test_score_finalize(tmp_path):
    model = resnet18().eval()
    N = 5
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)
    traker.finalize_features()

    traker.start_scoring_checkpoint("test_experiment", ckpt, 0, num_targets=N)
    traker.score(batch, num_samples=N)
    traker.finalize_scores(exp_name="test_experiment")


def test_score_finalize_some_model_ids(tmp_path):
    model = resnet18().eval()
    N = 5
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)

    traker.load_checkpoint(ckpt, model_id=1)
    traker.featurize(batch, num_samples=N)
    traker.finalize_features()

    traker.start_scoring_checkpoint("test_experiment", ckpt, 0, num_targets=N)
    traker.score(batch, num_samples=N)
    traker.finalize_scores(exp_name="test_experiment", model_ids=[0])


def test_score_finalize_split(tmp_path):
    model = resnet18().eval()
    N = 5
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)

    traker.load_checkpoint(ckpt, model_id=1)
    traker.featurize(batch, num_samples=N)
    traker.finalize_features()

    traker.start_scoring_checkpoint("test_experiment", ckpt, 0, num_targets=N)
    traker.score(batch, num_samples=N)

    traker.start_scoring_checkpoint("test_experiment", ckpt, 1, num_targets=N)
    traker.score(batch, num_samples=N)

    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
    )
    traker.finalize_scores(exp_name="test_experiment")


def test_score_finalize_full_precision(tmp_path):
    model = resnet18().eval()
    N = 5
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
        use_half_precision=False,
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)
    traker.finalize_features()

    traker.start_scoring_checkpoint("test_experiment", ckpt, 0, num_targets=N)
    traker.score(batch, num_samples=N)
    traker.finalize_scores(exp_name="test_experiment")


def test_custom_model_output(tmp_path, cpu_proj):
    model = resnet18()
    TRAKer(
        model=model,
        task=ImageClassificationModelOutput(),
        save_dir=tmp_path,
        projector=cpu_proj,
        train_set_size=20,
        logging_level=logging.DEBUG,
        device="cpu",
    )


def test_iterative_gradient_computer(tmp_path, cpu_proj):
    from fasttrak.compat.trak.gradient_computers import IterativeGradientComputer
    from fasttrak.compat.trak.projectors import NoOpProjector

    model = resnet18()
    N = 5
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="iterative_image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
        use_half_precision=False,
        projector=NoOpProjector(),
        proj_dim=0,
        gradient_computer=IterativeGradientComputer,
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)


def test_grad_wrt_last_layer(tmp_path):
    model = resnet18().eval()
    N = 5
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
        use_half_precision=False,
        grad_wrt=["fc.weight", "fc.bias"],
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)
    traker.finalize_features()

    traker.start_scoring_checkpoint("test_experiment", ckpt, 0, num_targets=N)
    traker.score(batch, num_samples=N)
    traker.finalize_scores(exp_name="test_experiment")


def test_grad_wrt_last_layer_cuda(tmp_path):
    model = resnet18().eval()
    N = 5
    batch = ch.randn(N, 3, 8, 8), ch.randint(low=0, high=10, size=(N,))
    traker = TRAKer(
        model=model,
        task="image_classification",
        save_dir=tmp_path,
        train_set_size=N,
        logging_level=logging.DEBUG,
        device="cpu",
        grad_wrt=["fc.weight", "fc.bias"],
    )
    ckpt = model.state_dict()
    traker.load_checkpoint(ckpt, model_id=0)
    traker.featurize(batch, num_samples=N)
    traker.finalize_features()

    traker.start_scoring_checkpoint("test_experiment", ckpt, 0, num_targets=N)
    traker.score(batch, num_samples=N)
    traker.finalize_scores(exp_name="test_experiment")
