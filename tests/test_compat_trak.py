"""fasttrak.compat.trak: traker's TRAKer on fasttrak.

(a) with the paper's settings (no projection or a dense one, plain kernel, lambda_reg,
float32) the scores equal a float64 closed form of traker's estimator; (b) traker's parallel
pattern (one process per model id on one save_dir) equals one process; (c) bad inputs get
errors that name the fix; (d) custom AbstractModelOutput subclasses work. traker's own tests,
adapted, are in tests/trak_reference/.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import loop_gradients, make_data, make_mlp

import fasttrak as ft
from fasttrak.compat.trak import ModelIDException, TRAKer, UnfinishedFeaturesError, UsageError
from fasttrak.compat.trak.modelout_functions import (
    AbstractModelOutput,
    ImageClassificationModelOutput,
)
from fasttrak.compat.trak.projectors import BasicProjector, NoOpProjector

sys.path.insert(0, str(Path(__file__).resolve().parent / "trak_reference"))
import parallel_job  # noqa: E402
from jobs import run_jobs  # noqa: E402
from tiny_models import N_TARGETS, N_TRAIN  # noqa: E402

P = 39  # parameters of make_mlp(): 5*4 + 4 + 4*3 + 3


def traker_closed_form(models, x, y, xt, yt, lam, projection=None):
    """traker's estimator in float64, (n_train, n_targets): per model φ = Pᵀ g / √p (P the
    unscaled projection, or none), score = mean_m Q_m · mean_m Φ_m (Φ_mᵀ Φ_m + λ I)⁻¹ φ_m(t)ᵀ
    with the pseudo-inverse when λ = 0 and the kernel is singular."""
    total = np.zeros((x.shape[0], xt.shape[0]))
    q = np.zeros(x.shape[0])
    for m, model in enumerate(models):
        names = [name for name, _ in model.named_parameters()]
        phi = loop_gradients(model, x, y, names).numpy()
        phi_t = loop_gradients(model, xt, yt, names).numpy()
        if projection is not None:
            phi, phi_t = phi @ projection[m], phi_t @ projection[m]
        phi, phi_t = phi / np.sqrt(P), phi_t / np.sqrt(P)
        gram = phi.T @ phi
        if lam > 0 or np.linalg.matrix_rank(gram) == gram.shape[0]:
            total += phi @ np.linalg.solve(gram + lam * np.eye(gram.shape[0]), phi_t.T)
        else:
            total += np.linalg.pinv(phi).T @ phi_t.T
        with torch.no_grad():
            p = torch.softmax(model.double()(x.double()), 1)[torch.arange(len(y)), y].numpy()
            model.float()
        q += 1 - p
    return (q / len(models))[:, None] * total / len(models)


def run_traker(save_dir, models, x, y, xt, yt, batch=8, **options):
    traker = TRAKer(
        make_mlp(),
        "image_classification",
        len(y),
        save_dir=save_dir,
        device="cpu",
        use_half_precision=False,
        **options,
    )
    for m, model in enumerate(models):
        traker.load_checkpoint(model.state_dict(), model_id=m)
        for s in range(0, len(y), batch):
            traker.featurize(
                (x[s : s + batch], y[s : s + batch]), num_samples=len(y[s : s + batch])
            )
    traker.finalize_features()
    for m, model in enumerate(models):
        traker.start_scoring_checkpoint("exp", model.state_dict(), m, len(yt))
        traker.score((xt, yt), inds=np.arange(len(yt)))
    return traker, traker.finalize_scores("exp")


def assert_close(scores, expected):
    assert scores.shape == expected.shape and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


# ---------------------------------------------------------------- (a) traker's estimator
@pytest.mark.parametrize(
    ("n", "lam"),
    [(30, 1e-2), (20, 0.0)],  # ridge; λ = 0 with n < p: the pseudo-inverse (λ → 0 limit)
)
def test_noop_projection_equals_traker_closed_form(tmp_path, n, lam):
    models = [make_mlp(seed=s) for s in range(2)]
    x, y = make_data(n, seed=1)
    xt, yt = make_data(5, seed=2)
    traker, scores = run_traker(
        tmp_path, models, x, y, xt, yt, projector=NoOpProjector(), lambda_reg=lam
    )
    assert traker.proj_dim == P
    assert_close(scores, traker_closed_form(models, x, y, xt, yt, lam))
    # traker's orientation, saved where traker saves it (a .npy file named .mmap)
    saved = np.load(tmp_path / "scores" / "exp.mmap", mmap_mode="r")
    np.testing.assert_array_equal(saved, scores)


@pytest.mark.parametrize("lam", [0.05, 0.0])
def test_dense_projection_equals_traker_closed_form(tmp_path, lam):
    models = [make_mlp(seed=s) for s in range(2)]
    x, y = make_data(40, seed=3)
    xt, yt = make_data(4, seed=4)
    k = 16  # < rank(Φ): the kernel is invertible without a ridge
    projector = BasicProjector(grad_dim=P, proj_dim=k, seed=3, proj_type="rademacher", device="cpu")
    _, scores = run_traker(tmp_path, models, x, y, xt, yt, projector=projector, lambda_reg=lam)
    # fasttrak's dense matrix of each model id (entries ±1/√k); traker's entries are ±1
    reference = ft.TRAK(make_mlp(), projector="dense", proj_dim=k, seed=3, progress=False)
    unscaled = [reference.featurizer(m).matrix().double().numpy() * np.sqrt(k) for m in range(2)]
    assert set(np.unique(np.abs(unscaled[0])).round(6)) == {1.0}
    expected = traker_closed_form(models, x, y, xt, yt, lam, unscaled)
    assert_close(scores, expected)
    if lam > 0:
        without_ridge = traker_closed_form(models, x, y, xt, yt, 0.0, unscaled)
        assert not np.allclose(expected, without_ridge, rtol=1e-2)  # λ matters at this scale


def test_store_is_a_fasttrak_store(tmp_path):
    """The store under save_dir opens with ft.TRAK and scores the same (λ = 0)."""
    models = [make_mlp(seed=s) for s in range(2)]
    x, y = make_data(60, seed=5)
    xt, yt = make_data(3, seed=6)
    projector = BasicProjector(
        grad_dim=P, proj_dim=16, seed=3, proj_type="rademacher", device="cpu"
    )
    _, scores = run_traker(tmp_path, models, x, y, xt, yt, projector=projector)
    assert not any((tmp_path / "buffers" / "train").rglob("*.npy"))  # all published
    trak = ft.TRAK(
        make_mlp(), projector="dense", proj_dim=16, seed=3, store=tmp_path / "store", progress=False
    )
    native = trak.score(
        (xt, yt),
        checkpoints=[m.state_dict() for m in models],
        estimator=ft.Estimator(kernel="plain", ridge=0.0, kernel_blocks=1),
    )
    np.testing.assert_allclose(np.asarray(native).T, scores, rtol=1e-5, atol=1e-7)


def test_half_precision_default_and_resume(tmp_path):
    """traker's default use_half_precision stores float16 features; a second TRAKer (a
    restarted job) resumes a model from the rows the first one left."""
    x, y = make_data(40, seed=7)
    model = make_mlp(seed=1)

    def traker():
        return TRAKer(
            make_mlp(),
            "image_classification",
            40,
            save_dir=tmp_path,
            device="cpu",
            projector=NoOpProjector(),
            lambda_reg=1e-3,
        )

    first = traker()
    first.load_checkpoint(model.state_dict(), model_id=0)
    first.featurize((x[:25], y[:25]), num_samples=25)
    second = traker()
    second.load_checkpoint(model.state_dict(), model_id=0)
    assert second.featurize((x[:25], y[:25]), inds=np.arange(25)) == 0  # all done already
    second.featurize((x[25:], y[25:]), inds=np.arange(25, 40))
    second.finalize_features()
    assert ft.store_info(tmp_path / "store")  # a readable store
    second.start_scoring_checkpoint("t", model.state_dict(), 0, 2)
    second.score((x[:2], y[:2]), num_samples=2)
    scores = second.finalize_scores("t")
    expected = traker_closed_form([model], x, y, x[:2], y[:2], 1e-3)
    np.testing.assert_allclose(scores, expected, rtol=2e-2, atol=2e-3 * np.abs(expected).max())


# ---------------------------------------------------------------- (b) parallel pattern
def test_one_process_per_model_id_equals_one_process(tmp_path):
    run_jobs(*[[tmp_path / "parallel", "featurize", m, 0, N_TRAIN] for m in range(2)])
    parallel_job.score(str(tmp_path / "parallel"), [0, 1], 0, N_TARGETS)
    parallel = parallel_job.make_traker(str(tmp_path / "parallel")).finalize_scores(
        "test_experiment"
    )
    parallel_job.featurize(str(tmp_path / "one"), [0, 1], 0, N_TRAIN, -1)
    parallel_job.score(str(tmp_path / "one"), [0, 1], 0, N_TARGETS)
    one = parallel_job.make_traker(str(tmp_path / "one")).finalize_scores("test_experiment")
    assert parallel.shape == (N_TRAIN, N_TARGETS)
    np.testing.assert_allclose(parallel, one, rtol=1e-5, atol=1e-6 * np.abs(one).max())


# ---------------------------------------------------------------- (c) errors
@pytest.fixture
def small(tmp_path):
    traker = TRAKer(
        make_mlp(),
        "image_classification",
        30,
        save_dir=tmp_path,
        device="cpu",
        projector=NoOpProjector(),
        use_half_precision=False,
        lambda_reg=1e-3,
    )
    x, y = make_data(30, seed=1)
    return traker, x, y


def test_usage_order_errors(small):
    traker, x, y = small
    with pytest.raises(AssertionError, match="traker.load_checkpoint before featurizing"):
        traker.featurize((x, y), num_samples=30)
    with pytest.raises(UsageError, match="start_scoring_checkpoint"):
        traker.score((x, y), num_samples=30)
    traker.load_checkpoint(make_mlp(seed=1).state_dict(), model_id=0)
    with pytest.raises(UsageError, match="Exactly one of num_samples and inds"):
        traker.featurize((x, y))
    with pytest.raises(UsageError, match="Exactly one of num_samples and inds"):
        traker.featurize((x, y), inds=np.arange(30), num_samples=30)


def test_row_errors(small):
    traker, x, y = small
    traker.load_checkpoint(make_mlp(seed=1).state_dict(), model_id=0)
    with pytest.raises(ft.DataError, match=r"inds \[30, 31\] are outside \[0, train_set_size=30\)"):
        traker.featurize((x[:2], y[:2]), inds=np.array([30, 31]))
    with pytest.raises(ft.DataError, match="runs past train_set_size=30"):
        traker.featurize((torch.cat([x, x[:1]]), torch.cat([y, y[:1]])), num_samples=31)
    with pytest.raises(ft.DataError, match="batch holds 30 examples but 2 rows"):
        traker.featurize((x, y), inds=[0, 1])
    with pytest.raises(ft.DataError, match="repeats rows"):
        traker.featurize((x[:2], y[:2]), inds=[3, 3])
    traker.featurize((x[:10], y[:10]), num_samples=10)
    with pytest.raises(
        UnfinishedFeaturesError, match=r"training rows 10-29 of 30 have no features"
    ):
        traker.finalize_features()
    with pytest.raises(ModelIDException, match=r"Model IDs \[5\] not registered"):
        traker.finalize_features(model_ids=[5])


def test_checkpoint_errors(small):
    traker, x, y = small
    traker.load_checkpoint(make_mlp(seed=1).state_dict(), model_id=0)
    traker.featurize((x, y), num_samples=30)
    traker.finalize_features()
    with pytest.raises(ft.CheckpointMismatchError, match="use another model_id"):
        traker.load_checkpoint(make_mlp(seed=2).state_dict(), model_id=0)
    with pytest.raises(ft.CheckpointMismatchError, match="same checkpoint"):
        traker.start_scoring_checkpoint("e", make_mlp(seed=2).state_dict(), 0, 3)
    with pytest.raises(ModelIDException, match="model ID 4 is not registered"):
        traker.start_scoring_checkpoint("e", make_mlp(seed=1).state_dict(), 4, 3)
    with pytest.raises(ft.ConfigError, match="exp_name"):
        traker.start_scoring_checkpoint("a/b", make_mlp(seed=1).state_dict(), 0, 3)


def test_finalize_scores_errors(small):
    traker, x, y = small
    for m in range(2):
        traker.load_checkpoint(make_mlp(seed=m).state_dict(), model_id=m)
        traker.featurize((x, y), num_samples=30)
    traker.finalize_features()
    with pytest.raises(ft.ConfigError, match="Experiment nope does not exist"):
        traker.finalize_scores("nope")
    traker.start_scoring_checkpoint("e", make_mlp(seed=0).state_dict(), 0, 3)
    traker.score((x[:3], y[:3]), num_samples=3)
    with pytest.raises(ModelIDException, match=r"model ID 1 has no target features.*allow_skip"):
        traker.finalize_scores("e")
    skipped = traker.finalize_scores("e", allow_skip=True)
    np.testing.assert_array_equal(skipped, traker.finalize_scores("e", model_ids=[0]))
    traker.start_scoring_checkpoint("e", make_mlp(seed=1).state_dict(), 1, 3)
    traker.score((x[:2], y[:2]), num_samples=2)
    with pytest.raises(ModelIDException, match=r"target rows 2 of 3"):
        traker.finalize_scores("e")
    traker.score((x[3:4], y[3:4]), inds=[2])  # another example than model 0 scored at row 2
    with pytest.raises(ft.DataMismatchError, match="target rows 2 differ between model 0"):
        traker.finalize_scores("e")


def test_construction_errors(tmp_path):
    def make(**options):
        arguments = {
            "model": make_mlp(),
            "task": "image_classification",
            "train_set_size": 10,
            "save_dir": tmp_path,
            "device": "cpu",
            **options,
        }
        return TRAKer(**arguments)

    with pytest.raises(ft.ConfigError, match="unknown task 'image_clf'.*image_classification"):
        make(task="image_clf")
    with pytest.raises(ft.ConfigTypeError, match=r"ImageClassificationModelOutput\(\)"):
        make(task=ImageClassificationModelOutput)
    with pytest.raises(ft.ConfigError, match=f"pass grad_dim={P}"):
        make(
            projector=BasicProjector(
                grad_dim=1000, proj_dim=8, seed=0, proj_type="normal", device="cpu"
            )
        )
    with pytest.raises(ft.ConfigError, match="lambda_reg"):
        make(lambda_reg=-1.0)
    with pytest.raises(ft.ConfigError, match="train_set_size"):
        make(train_set_size=0)
    with pytest.raises(ft.ConfigError, match="get_embeddings"):
        make(task="clip").load_checkpoint(make_mlp().state_dict(), model_id=0)
    if not torch.cuda.is_available():
        with pytest.raises(ft.ConfigError, match="pass device='cpu'"):
            make(device="cuda")


def test_ignored_arguments_are_noted(tmp_path, caplog):
    from fasttrak.compat.trak.gradient_computers import IterativeGradientComputer
    from fasttrak.compat.trak.savers import MmapSaver

    with caplog.at_level(logging.INFO, logger="fasttrak.compat.trak"):
        TRAKer(
            make_mlp(),
            "image_classification",
            10,
            save_dir=tmp_path,
            device="cpu",
            gradient_computer=IterativeGradientComputer,
            saver=MmapSaver(),
            proj_max_batch_size=8,
            load_from_save_dir=False,
            proj_dim=8,
        )
    text = caplog.text
    for name in ("gradient_computer", "saver", "proj_max_batch_size", "load_from_save_dir"):
        assert f"{name}" in text and "ignored" in text


# ---------------------------------------------------------------- (d) custom model outputs
class Margin(AbstractModelOutput):
    """A user's model output, written as traker's docs show."""

    def __init__(self, q_one: bool = False) -> None:
        super().__init__()
        self.q_one = q_one

    @staticmethod
    def get_output(model, weights, buffers, image, label):
        logits = torch.func.functional_call(model, (weights, buffers), image.unsqueeze(0))
        bindex = torch.arange(logits.shape[0])
        correct = logits[bindex, label.unsqueeze(0)]
        others = logits.clone()
        others[bindex, label.unsqueeze(0)] = -torch.inf
        return (correct - others.logsumexp(dim=-1)).sum()

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        images, labels = batch
        if self.q_one:
            return torch.full((len(labels), 1), 0.9)
        logits = torch.func.functional_call(model, (weights, buffers), images)
        return (1 - torch.softmax(logits, -1)[torch.arange(len(labels)), labels]).unsqueeze(-1)


class TemperedQ(ImageClassificationModelOutput):
    """A built-in output with only its Q overridden (f stays the built-in margin)."""

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        return torch.full((len(batch[1]),), 0.5)


@pytest.mark.parametrize("task", [Margin(), Margin(q_one=True), TemperedQ()])
def test_custom_model_output(tmp_path, task):
    models = [make_mlp(seed=s) for s in range(2)]
    x, y = make_data(30, seed=8)
    xt, yt = make_data(4, seed=9)
    options = {"projector": NoOpProjector(), "lambda_reg": 1e-2}
    _, builtin = run_traker(tmp_path / "builtin", models, x, y, xt, yt, **options)
    traker = TRAKer(
        make_mlp(),
        task,
        30,
        save_dir=tmp_path / "custom",
        device="cpu",
        use_half_precision=False,
        **options,
    )
    assert traker.task is task
    for m, model in enumerate(models):
        traker.load_checkpoint(model.state_dict(), model_id=m)
        traker.featurize([x, y], num_samples=30)
    traker.finalize_features()
    for m, model in enumerate(models):
        traker.start_scoring_checkpoint("exp", model.state_dict(), m, 4)
        traker.score([xt, yt], num_samples=4)
    custom = traker.finalize_scores("exp")
    if isinstance(task, Margin) and not task.q_one:
        expected = builtin
    else:  # the same kernel part, another Q
        q = np.mean(
            [1 - torch.softmax(m(x), -1)[torch.arange(30), y].detach().numpy() for m in models],
            axis=0,
        )
        expected = builtin / q[:, None] * (0.9 if isinstance(task, Margin) else 0.5)
    np.testing.assert_allclose(custom, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


class TinyClip(torch.nn.Module):
    """open_clip's interface: model(images, texts) -> (image features, text features, scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Linear(6, 4)
        self.text = torch.nn.Embedding(10, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, image, text):
        return self.image(image), self.text(text).mean(1), self.logit_scale.exp()


def test_clip_task_with_get_embeddings(tmp_path):
    torch.manual_seed(0)
    model = TinyClip()
    images, texts = torch.randn(20, 6), torch.randint(0, 10, (20, 3))
    traker = TRAKer(
        model,
        "clip",
        20,
        save_dir=tmp_path,
        device="cpu",
        proj_dim=8,
        use_half_precision=False,
        lambda_reg=1e-3,
    )
    loader = [(images[:10], texts[:10]), (images[10:], texts[10:])]
    traker.task.get_embeddings(model, loader, batch_size=10, embedding_dim=4, size=20)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize((images, texts), num_samples=20)
    traker.finalize_features()
    traker.start_scoring_checkpoint("e", model.state_dict(), 0, 3)
    traker.score((images[:3], texts[:3]), num_samples=3)
    scores = traker.finalize_scores("e")
    assert scores.shape == (20, 3) and np.isfinite(scores).all()
