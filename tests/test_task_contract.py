"""The Task contract, one suite for every built-in task.

Every case is (task, model, batch): ImageClassification on an MLP, a CNN with BatchNorm and
an MLP with saturated logits; TextClassification on a tiny BERT; LanguageModeling on a tiny
GPT-2 (right and left padding); Seq2Seq on a tiny T5; CLIP on a tiny Hugging Face CLIPModel
and on an open_clip-style model. For each case:

- f = task.output and Q = task.out_to_loss are (B,) float32 and finite;
- Q lies in [0, 1]: the Gauss-Newton kernel weighs an example by Q(1 - Q). Classification:
  Q = 1 - p_y = sigmoid(-f). Language modelling and seq2seq: the mean over target tokens of
  1 - p_t. CLIP: the mean of the two directions' 1 - p. All are averages of probabilities,
  so no built-in task's Q can leave [0, 1];
- every example alone (the batch cut along dimension 0, so padded text keeps its padding)
  gives the batched f and Q: outputs are per example;
- the float64 model gives the float32 model's f and Q to ~1e-4 relative;
- spec() is JSON-able, stable across calls, equal for equal tasks, unchanged by bind;
- check_batch accepts the batch and each example alone; batch_size counts the rows;
- f is differentiable in the parameters (the gradient engines' input) with finite gradients.

The model is called as the engines call it: ``functional_call(model, state, args, kwargs)``
with every parameter and buffer in ``state``; tasks with per-checkpoint state (CLIP) are
bound with :func:`fasttrak.tasks.bind_task` under ``torch.no_grad()``, in eval mode.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import pytest
import torch
from conftest import make_cnn, make_data, make_mlp
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

import fasttrak as ft
from fasttrak.tasks import (
    CLIP,
    ImageClassification,
    LanguageModeling,
    Seq2Seq,
    Task,
    TextClassification,
    bind_task,
)
from fasttrak.tasks.base import q_from_output
from fasttrak.tasks.classification import margin_from_logits

# On CPU, sdpa may warn about a fallback; irrelevant here.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@dataclasses.dataclass
class Case:
    task: Task
    model: nn.Module
    batch: Any
    q_is_sigmoid_of_minus_f: bool  # classification: Q = 1 - p_y = sigmoid(-f) exactly


def _hf():
    return pytest.importorskip("test_tasks_hf")  # tiny HF configs and batches


def _mlp() -> Case:
    x, y = make_data(6, seed=1)
    return Case(ImageClassification(), make_mlp(), (x, y), True)


def _cnn() -> Case:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 1, 6, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    return Case(ImageClassification(), make_cnn(), (x, y), True)


def _mlp_saturated() -> Case:
    """Logits of order 1e3: p_y rounds to 0 or 1 in float32; f and Q must stay finite."""
    model = make_mlp(d_in=5, hidden=4)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(40.0)
    x, y = make_data(6, seed=3)
    return Case(ImageClassification(), model, (x * 10, y), True)


def _bert() -> Case:
    hf = _hf()
    batch, _ = hf.text_batch()
    return Case(TextClassification(), hf.bert(), batch, True)


def _gpt2(left: bool) -> Case:
    hf = _hf()
    batch, _ = hf.lm_batch(left=left)
    return Case(LanguageModeling(), hf.gpt2(), batch, False)


def _t5() -> Case:
    hf = _hf()
    batch, _, _ = hf.seq2seq_batch()
    return Case(Seq2Seq(), hf.t5(), batch, False)


def _hf_clip() -> Case:
    hf = _hf()
    negatives, _ = hf.clip_batch([3, 5, 2, 4], seed=10)
    batch, _ = hf.clip_batch([4, 2, 5], seed=11)
    return Case(CLIP(negatives, negatives_batch_size=3), hf.hf_clip(), batch, False)


def _open_clip() -> Case:
    hf = _hf()
    gen = torch.Generator().manual_seed(4)
    batch = (torch.randn(4, 3, 2, 2, generator=gen), torch.randint(0, 50, (4, 4), generator=gen))
    negatives = (
        torch.randn(5, 3, 2, 2, generator=gen),
        torch.randint(0, 50, (5, 4), generator=gen),
    )
    return Case(CLIP(negatives), hf.TinyOpenCLIP(), batch, False)


CASES = {
    "image-mlp": _mlp,
    "image-cnn": _cnn,
    "image-saturated": _mlp_saturated,
    "text-bert": _bert,
    "lm-gpt2-right": lambda: _gpt2(left=False),
    "lm-gpt2-left": lambda: _gpt2(left=True),
    "seq2seq-t5": _t5,
    "clip-hf": _hf_clip,
    "clip-open": _open_clip,
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> Case:
    built = CASES[request.param]()
    built.model.eval()
    return built


# ---------------------------------------------------------------------- helpers
def forward_of(model: nn.Module):
    """The model under ``functional_call`` with its own parameters and buffers."""
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}

    def forward(*args, **kwargs):
        return functional_call(model, state, args, kwargs)

    return forward


def bound(task: Task, forward) -> Task:
    with torch.no_grad():
        return bind_task(task, forward, device="cpu")


def f_and_q(task: Task, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    forward = forward_of(model)
    task = bound(task, forward)
    with torch.no_grad():
        return task.output(forward, batch), task.out_to_loss(forward, batch)


def example(batch: Any, i: int) -> Any:
    """Example i alone: every tensor cut to rows i:i+1 (padding kept as it is)."""
    return tree_map(lambda t: t[i : i + 1] if isinstance(t, Tensor) else t, batch)


def as_float64(batch: Any) -> Any:
    return tree_map(
        lambda t: t.double() if isinstance(t, Tensor) and t.is_floating_point() else t, batch
    )


# ---------------------------------------------------------------------- contract
def test_is_a_task_and_checks_its_batch(case):
    task, batch = case.task, case.batch
    assert isinstance(task, Task) and isinstance(task.name, str) and task.name
    task.check_batch(batch)
    size = task.batch_size(batch)
    assert isinstance(size, int) and size >= 2
    for i in range(size):
        task.check_batch(example(batch, i))
        assert task.batch_size(example(batch, i)) == 1


def test_output_and_out_to_loss_shapes_dtypes_and_ranges(case):
    size = case.task.batch_size(case.batch)
    f, q = f_and_q(case.task, case.model, case.batch)
    for value in (f, q):
        assert value.shape == (size,) and value.dtype == torch.float32
        assert torch.isfinite(value).all(), value
    # Q in [0, 1] for every built-in task (see the module docstring): an average of 1 - p.
    assert ((q >= 0) & (q <= 1)).all(), q
    if case.q_is_sigmoid_of_minus_f:
        torch.testing.assert_close(q, torch.sigmoid(-f), rtol=1e-6, atol=1e-7)


def test_every_example_alone_gives_the_batched_result(case):
    f, q = f_and_q(case.task, case.model, case.batch)
    forward = forward_of(case.model)
    task = bound(case.task, forward)
    with torch.no_grad():
        for i in range(len(f)):
            one = example(case.batch, i)
            f_one, q_one = task.output(forward, one), task.out_to_loss(forward, one)
            assert f_one.shape == q_one.shape == (1,)
            scale = max(1.0, f[i].abs().item())
            torch.testing.assert_close(f_one[0], f[i], rtol=1e-5, atol=1e-5 * scale)
            torch.testing.assert_close(q_one[0], q[i], rtol=1e-5, atol=1e-6)


def test_float64_model_agrees_with_float32(case):
    f32, q32 = f_and_q(case.task, case.model, case.batch)
    model64 = copy.deepcopy(case.model).double()
    task64 = case.task
    if isinstance(task64, CLIP):  # negatives are model inputs: give them in the model's dtype
        task64 = dataclasses.replace(task64, negatives=as_float64(task64.negatives))
    f64, q64 = f_and_q(task64, model64, as_float64(case.batch))
    assert f64.shape == f32.shape and torch.isfinite(f64).all() and torch.isfinite(q64).all()
    assert ((q64 >= 0) & (q64 <= 1)).all()
    f_scale = max(1.0, f64.abs().max().item())
    torch.testing.assert_close(f32.double(), f64.double(), rtol=1e-4, atol=1e-4 * f_scale)
    torch.testing.assert_close(q32.double(), q64.double(), rtol=1e-4, atol=1e-6)


def test_output_is_differentiable_with_finite_gradients(case):
    forward = forward_of(case.model)
    task = bound(case.task, forward)
    f = task.output(forward, case.batch)
    assert f.requires_grad
    params = [p for p in case.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(f.sum(), params, allow_unused=True)
    used = [g for g in grads if g is not None]
    assert used and all(torch.isfinite(g).all() for g in used)
    assert any(g.abs().max() > 0 for g in used)


def test_spec_is_json_able_stable_and_unchanged_by_bind(case):
    task = case.task
    spec = task.spec()
    assert isinstance(spec, dict) and spec.get("name") == task.name
    assert json.loads(json.dumps(spec, allow_nan=False)) == spec  # strict JSON, lossless
    assert task.spec() == spec  # stable across calls
    assert copy.deepcopy(task).spec() == spec  # equal tasks, equal specs
    rebound = bound(task, forward_of(case.model))
    assert rebound.spec() == spec
    if not callable(getattr(task, "bind", None)):
        assert rebound is task  # bind_task leaves tasks without state as they are


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("image_classification", ft.tasks.ImageClassification),
        ("text_classification", ft.tasks.TextClassification),
        ("Text-Classification", ft.tasks.TextClassification),
        ("language_modeling", ft.tasks.LanguageModeling),
        ("causal_lm", ft.tasks.LanguageModeling),
        ("seq2seq", ft.tasks.Seq2Seq),
    ],
)
def test_a_task_name_builds_its_task(name, kind):
    trak = ft.TRAK(torch.nn.Linear(3, 2), task=name, progress=False)
    assert type(trak.task) is kind


def test_bad_task_names_and_objects_say_what_to_pass():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ft.ConfigError, match="unknown task 'regression'.*image_classification"):
        ft.TRAK(model, task="regression")
    with pytest.raises(ft.ConfigError, match=r"CLIP\(negatives="):
        ft.TRAK(model, task="clip")
    with pytest.raises(ft.ConfigTypeError, match="is a class; pass an instance"):
        ft.TRAK(model, task=ft.tasks.ImageClassification)
    with pytest.raises(ft.ConfigTypeError, match="lacks"):
        ft.TRAK(model, task=object())


def test_q_from_the_output_equals_out_to_loss_bit_for_bit(case):
    """A task that says how Q follows from f (classification) gives, from the f of
    ``output``, exactly the Q that ``out_to_loss`` computes; the hook engines rely on it."""
    q_of_f = q_from_output(case.task)
    assert (q_of_f is not None) == case.q_is_sigmoid_of_minus_f
    if q_of_f is None:
        return
    forward = forward_of(case.model)
    task = bound(case.task, forward)
    with torch.enable_grad():  # as the hook engine records f
        f = task.output(forward, case.batch)
    with torch.no_grad():
        q = q_from_output(task)(f, case.batch)
        expected = task.out_to_loss(forward, case.batch)
    assert not q.requires_grad
    assert q.dtype == expected.dtype and torch.equal(q, expected)


def test_a_subclass_that_changes_q_does_not_inherit_q_from_the_output():
    @dataclasses.dataclass(frozen=True)
    class Tempered(ImageClassification):
        def out_to_loss(self, forward, batch):
            return super().out_to_loss(forward, batch) / 2

    @dataclasses.dataclass(frozen=True)
    class Renamed(ImageClassification):  # Q unchanged: keeps the formula
        name: str = "renamed"

    @dataclasses.dataclass(frozen=True)
    class Both(Tempered):
        def out_to_loss_from_output(self, f, batch):
            return torch.sigmoid(-f.detach()) / 2

    assert q_from_output(Tempered()) is None
    assert q_from_output(Renamed()) is not None
    assert q_from_output(Both()) is not None
    assert q_from_output(LanguageModeling()) is None


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e30])
def test_margin_is_logit_y_minus_logsumexp_of_the_others_bit_for_bit(scale):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(50, 7, generator=gen) * scale
    labels = torch.randint(0, 7, (50,), generator=gen)
    others = logits.clone()
    others[torch.arange(50), labels] = torch.finfo(torch.float32).min
    expected = logits[torch.arange(50), labels] - torch.logsumexp(others, dim=1)
    got = margin_from_logits(logits, labels)
    assert torch.isfinite(got).all() and torch.equal(got, expected)
