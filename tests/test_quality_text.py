"""Quality on a text task: TRAK's LDS for a fine-tuned Hugging Face BERT classifier (issue 4).

Task: procedurally generated "sentiment". A sequence is [CLS] followed by 3 to 15
tokens: filler with 1 to 3 marker tokens planted; its label is the polarity (positive
markers 2, 3; negative markers 4, 5) of the majority of its markers, flipped for 10% of
the sequences. Lengths are mixed and padded to 16 with an attention mask.

Model: ``transformers.BertForSequenceClassification`` with 1 layer, hidden 16, 2 heads,
intermediate 32, no dropout (3,362 parameters), randomly initialised with
``initializer_range=0.2`` from a fixed seed. Its head is first fitted on the frozen encoder
(a linear probe: a convex problem) on 400 separate sequences; then every parameter is
fine-tuned from there on the training rows with 40 steps of full-batch Adam (lr 3e-3).
That recipe has no randomness left (one starting checkpoint, full batch, no dropout), so
each retrained subset is one run (``seeds_per_subset=1``: a second seed would repeat it).

Why this recipe (measured 2026-11-29, details in docs/estimator.md, "Quality on a text
task"): training this BERT from its default initialisation (``initializer_range=0.02``),
from scratch or as a pretraining stage, is chaotic. Two runs that differ only in float
rounding (1 vs 2 threads, or eager vs sdpa attention) ended with target margins up to 7
apart, and the LDS of one data draw moved from 0.43 to 0.58 and 0.75 with the rounding
alone: no threshold could be both tight and reproducible on other hardware. The
probe-then-fine-tune recipe is not chaotic: margins from 1 vs 2 threads differ by < 1e-4,
and the LDS and baselines of seeds 0 and 9 are identical to 4 decimals under either change.
The fine-tuning still teaches the task: target accuracy 0.68 after the probe, 0.83 after
fine-tuning (means over 10 seeds; the 10% label noise caps it near 0.9).

TRAK: ``ft.TRAK(model, task=ft.tasks.TextClassification())`` with its defaults (SRHT
projection, Gauss-Newton kernel with weight power 0.75, ridge "auto", engine "auto" which
runs the hook engine) on
models fine-tuned on random halves of the 200 training sequences, scoring 100 target
sequences. Ground truth: ``ft.evaluate.sample_subsets(200, S, alpha=0.5)``, one
fine-tuning per subset, output = the margin of each target; ``ft.evaluate.lds``.
``engine="vmap"`` fails on this model (transformers' mask code branches on the mask's
values, see tests/test_tasks_hf.py), so "auto" choosing hooks matters here. Training and
TRAK run on one thread: the matrices are tiny, and on 2 shared cores two threads made
featurize + score 10-20x slower (0.8 s -> 11-20 s).

The measured numbers and the thresholds are in the docstrings of the tests below.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import fasttrak as ft
from fasttrak.tasks.classification import margin_from_logits

transformers = pytest.importorskip("transformers")

VOCAB = 32
MAX_LEN = 16
PAD, CLS = 0, 1
POSITIVE, NEGATIVE = (2, 3), (4, 5)
"""Marker tokens; tokens 6..31 are neutral filler."""
LABEL_NOISE = 0.1
NUM_PROBE, NUM_TRAIN, NUM_TARGETS = 400, 200, 100
INIT_RANGE = 0.2
PROBE_STEPS, PROBE_LR = 200, 0.1
FINETUNE_STEPS, FINETUNE_LR = 40, 3e-3

Batch = dict[str, Tensor]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_sentences(n: int, seed: int) -> Batch:
    """``n`` sequences: input_ids and attention_mask (n, MAX_LEN) int64, labels (n,) int64."""
    rng = np.random.default_rng(seed)
    ids = np.full((n, MAX_LEN), PAD, dtype=np.int64)
    mask = np.zeros((n, MAX_LEN), dtype=np.int64)
    labels = rng.integers(0, 2, size=n)
    for i in range(n):
        length = int(rng.integers(4, MAX_LEN + 1))
        markers = int(rng.integers(1, 4))
        majority = markers if markers < 3 else int(rng.integers(2, 4))
        own, other = (POSITIVE, NEGATIVE) if labels[i] == 1 else (NEGATIVE, POSITIVE)
        tokens = rng.integers(6, VOCAB, size=length - 1)
        where = rng.choice(length - 1, size=markers, replace=False)
        tokens[where[:majority]] = rng.choice(own, size=majority)
        tokens[where[majority:]] = rng.choice(other, size=markers - majority)
        ids[i, 0], ids[i, 1:length], mask[i, :length] = CLS, tokens, 1
    labels = np.where(rng.random(n) < LABEL_NOISE, 1 - labels, labels)
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(labels.astype(np.int64)),
    }


def make_model(seed: int = 0) -> nn.Module:
    """The 1-layer BERT classifier, randomly initialised from ``seed`` (default sdpa attention)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=MAX_LEN,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=INIT_RANGE,
    )
    return transformers.BertForSequenceClassification(config).eval()


def inputs_of(data: Batch) -> Batch:
    return {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}


def probe(model: nn.Module, data: Batch) -> nn.Module:
    """Fit only the head on the frozen encoder's pooled output (logistic regression), in place."""
    with torch.no_grad(), one_thread():
        pooled = model.bert(**inputs_of(data)).pooler_output
    opt = torch.optim.Adam(model.classifier.parameters(), lr=PROBE_LR)
    with one_thread():
        for _ in range(PROBE_STEPS):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model.classifier(pooled), data["labels"]).backward()
            opt.step()
    return model


def fine_tune(start: dict[str, Tensor], data: Batch) -> nn.Module:
    """A model with weights ``start``, all of them trained on ``data`` with full-batch Adam."""
    model = make_model()
    model.load_state_dict(start)
    opt = torch.optim.Adam(model.parameters(), lr=FINETUNE_LR)
    model.train()
    with one_thread():
        for _ in range(FINETUNE_STEPS):
            opt.zero_grad(set_to_none=True)
            logits = model(**inputs_of(data)).logits
            nn.functional.cross_entropy(logits, data["labels"]).backward()
            opt.step()
    return model.eval()


def rows_of(data: Batch, mask: np.ndarray | None = None) -> Batch:
    """The rows of ``data`` where ``mask`` (n,) is True."""
    if mask is None:
        return data
    keep = torch.from_numpy(np.asarray(mask, dtype=bool))
    return {key: value[keep] for key, value in data.items()}


def as_dataset(data: Batch) -> list[Batch]:
    """One dict per example: what ft.TRAK reads (default_collate stacks them into batches)."""
    return [{key: value[i] for key, value in data.items()} for i in range(len(data["labels"]))]


def margins(model: nn.Module, data: Batch) -> Tensor:
    """(n,) float32 margins of ``model`` on ``data``, as TextClassification computes them."""
    with torch.no_grad(), one_thread():
        return margin_from_logits(model(**inputs_of(data)).logits, data["labels"])


@dataclass(frozen=True)
class Config:
    num_subsets: int = 40
    """Ground-truth subsets (one fine-tuning each)."""
    num_models: int = 5
    """Attribution models, each fine-tuned on a random half."""
    proj_dim: int = 512
    seed: int = 0
    """Seeds the data, the subsets, the halves and the projection."""


@dataclass
class Measured:
    lds: ft.evaluate.LDSResult
    baselines: dict[str, ft.evaluate.LDSResult]
    engine: str
    seconds: dict[str, float]
    probe_accuracy: float
    accuracy: float

    def summary(self) -> str:
        lines = [f"TRAK ({self.engine} engine): {self.lds}"]
        lines += [f"baseline {name}: {lds}" for name, lds in self.baselines.items()]
        lines.append(f"target accuracy {self.probe_accuracy:.2f} -> {self.accuracy:.2f}")
        lines.append(", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def measure(config: Config) -> Measured:
    """Build the task, retrain the ground truth, run TRAK and the baselines, time each."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        seconds[stage], clock = time.perf_counter() - clock, time.perf_counter()

    s = config.seed
    train = make_sentences(NUM_TRAIN, 3 * s + 2)
    targets = make_sentences(NUM_TARGETS, 3 * s + 3)
    start = probe(make_model(s), make_sentences(NUM_PROBE, 3 * s + 1)).state_dict()
    lap("probe")

    masks = ft.evaluate.sample_subsets(NUM_TRAIN, config.num_subsets, alpha=0.5, seed=s)
    masks, outputs = ft.evaluate.retrain(
        lambda mask, _seed: margins(fine_tune(start, rows_of(train, mask)), targets),
        masks,
        progress=False,
    )
    lap("ground truth")

    halves = ft.evaluate.sample_subsets(NUM_TRAIN, config.num_models, 0.5, seed=10_000 + s)
    states = [fine_tune(start, rows_of(train, half)).state_dict() for half in halves]
    lap("train models")

    trak = ft.TRAK(
        make_model(),
        task=ft.tasks.TextClassification(),
        proj_dim=config.proj_dim,
        seed=s,
        batch_size=NUM_TRAIN,
        progress=False,
    )
    with one_thread():
        trak.featurize(as_dataset(train), checkpoints=states)
        scores = np.asarray(trak.score(as_dataset(targets)))
    lap("TRAK")

    lds = ft.evaluate.lds(scores, masks, outputs)
    full = fine_tune(start, train)
    baselines = {
        name: ft.evaluate.lds(attribution, masks, outputs)
        for name, attribution in baseline_attributions(full, train, targets).items()
    }
    lap("baselines")
    probed = make_model()
    probed.load_state_dict(start)
    return Measured(
        lds,
        baselines,
        trak.engine,
        seconds,
        probe_accuracy=float((margins(probed, targets) > 0).float().mean()),
        accuracy=float((margins(full, targets) > 0).float().mean()),
    )


def baseline_attributions(model: nn.Module, train: Batch, targets: Batch) -> dict[str, np.ndarray]:
    """Trivial attributions, each (n_targets, n_train): +1 where the labels agree and -1
    where they differ; the cosine similarity of bags of words, and of mean token embeddings
    (of ``model``, fine-tuned on all training rows), each signed by label agreement."""
    sign = np.where(targets["labels"][:, None] == train["labels"][None, :], 1.0, -1.0)
    table = model.bert.embeddings.word_embeddings.weight.detach()

    def bag(data: Batch) -> Tensor:
        counts = torch.zeros(len(data["labels"]), VOCAB)
        counts.scatter_add_(1, data["input_ids"], data["attention_mask"].float())
        counts[:, [PAD, CLS]] = 0
        return nn.functional.normalize(counts, dim=1)

    def mean_embedding(data: Batch) -> Tensor:
        weight = data["attention_mask"].float()[..., None]
        mean = (table[data["input_ids"]] * weight).sum(1) / weight.sum(1)
        return nn.functional.normalize(mean, dim=1)

    bow = (bag(targets) @ bag(train).T).double().numpy()
    emb = (mean_embedding(targets) @ mean_embedding(train).T).double().numpy()
    return {
        "label agreement": sign,
        "bag-of-words cosine x label": bow * sign,
        "mean-embedding cosine x label": emb * sign,
    }


def best_baseline_gap(result: Measured) -> tuple[float, float]:
    """TRAK's LDS minus the best baseline's, over the same targets: (mean, paired stderr)."""
    diffs = [result.lds.per_target - b.per_target for b in result.baselines.values()]
    worst = min(diffs, key=lambda d: float(np.nanmean(d)))
    worst = worst[np.isfinite(worst)]
    return float(worst.mean()), float(worst.std(ddof=1) / np.sqrt(len(worst)))


@pytest.fixture(scope="module")
def default_run() -> Measured:
    return measure(Config())


def test_trak_on_a_finetuned_bert_clears_its_measured_lds(default_run):
    """Seed 0, 40 ground-truth subsets, 5 attribution models, k = 512: 20 s for both
    default tests on 2 shared cores (10 s of it the ground truth). Measured (2026-11-30, the
    defaults of that evening): LDS 0.638 ± 0.012 (stderr over the 100 targets), hook engine.
    Over 10 seeds (data, subsets, halves, projection): 0.635 ± 0.019 (SD 0.061, min 0.481);
    with weight power 1, 0.632 on seed 0 and 0.628 over the 10 seeds.

    The threshold 0.50 is 11 stderrs below this seed's value, and 2.2 SD of the seed-to-seed
    spread below the 10-seed mean. The run is reproducible to 4 decimals under other float
    rounding, so it moves only if the random draws change (another torch RNG or transformers
    init order); such a redraw falls below 0.50 about 1 time in 10-20 (1 of the 10 measured
    seeds). What it catches, on the same ground truth: a relative ridge of 0.01 scores 0.482,
    no kernel (ridge 1e4) 0.113 (both re-measured with these defaults), random scores 0.025,
    a sign error the LDS negated."""
    result = default_run
    assert result.lds.num_valid == NUM_TARGETS, result.summary()
    assert result.lds.mean > 0.50, result.summary()


def test_trak_on_a_finetuned_bert_beats_the_baselines(default_run):
    """The best trivial attribution on seed 0 (bag-of-words cosine x label sign) scores
    0.238; label agreement alone 0.000, mean-embedding cosine x label 0.228. TRAK's lead over
    the best one, paired over the same targets: 0.401 ± 0.017; over 10 seeds 0.306 ± 0.028
    (SD 0.087, min 0.137). The threshold 0.15 is 15 paired stderrs below this seed's lead and
    1.8 SD of the seed spread below the 10-seed mean."""
    lead, stderr = best_baseline_gap(default_run)
    assert lead > 0.15, f"lead {lead:.3f} ± {stderr:.3f}\n{default_run.summary()}"


@pytest.mark.slow
def test_trak_on_a_finetuned_bert_thorough():
    """Seeds 0, 1, 2, each with 100 ground-truth subsets, 10 attribution models, k = 1024
    (about 30 s per seed). Measured LDS 0.684, 0.705, 0.658: mean 0.683 (2026-11-30 evening
    defaults; weight power 1: 0.681, 0.700, 0.647; with the defaults of 2026-11-29, 0.664, and
    over 10 seeds 0.658 ± 0.016, SD 0.050, min 0.535). Lead over the best baseline 0.403,
    0.328, 0.343: mean 0.358 (2026-11-29: 0.340; over 10 seeds 0.323 ± 0.030, SD 0.094, min
    0.139).

    Thresholds on the 3-seed means: LDS > 0.60 and lead > 0.22, each about 2 standard
    errors of a 3-seed mean (SD / sqrt(3): 0.029 and 0.054) below the 10-seed means."""
    runs = [
        measure(Config(num_subsets=100, num_models=10, proj_dim=1024, seed=s)) for s in range(3)
    ]
    report = "\n\n".join(run.summary() for run in runs)
    assert all(run.lds.num_valid == NUM_TARGETS for run in runs), report
    assert np.mean([run.lds.mean for run in runs]) > 0.60, report
    assert np.mean([best_baseline_gap(run)[0] for run in runs]) > 0.22, report
