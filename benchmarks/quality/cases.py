"""The cases of the quality suite: data, model, training and targets, all seeded.

Each :class:`Case` is a small classification problem that fasttrak attributes with its
default task (``ft.tasks.ImageClassification``: the output is the margin
logit_y - logsumexp(other logits)). The data are scikit-learn's bundled sets (digits,
breast_cancer) or generated (``make_classification``, a Gaussian mixture, synthetic token
sequences), so everything runs offline. Training is full-batch Adam with weight decay on
one torch thread: the same (mask, seed) gives bit-identical weights.

    from benchmarks.quality.cases import CASES
    case = CASES["mlp_heldout"]
    data = case.data()                     # tensors: x_train, y_train, x_target, y_target
    model = case.train(mask, seed)         # trained on the rows where mask is True
    margins = case.margins(model)          # (n_targets,) float64, what fasttrak attributes

``python -m benchmarks.quality.cases`` prints every case's n, p, targets and the seconds to
train one model on half of its rows and on all of them (about 1 minute in all).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fasttrak.tasks.classification import margin_from_logits

NUM_TARGETS = 200
"""Held-out targets per case (fewer where the data run out)."""


@dataclass(frozen=True)
class Data:
    """Training rows and held-out targets: inputs (float32, or int64 tokens) and labels."""

    x_train: Tensor
    y_train: Tensor
    x_target: Tensor
    y_target: Tensor

    @property
    def n(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.x_target.shape[0])

    def train_set(self) -> TensorDataset:
        return TensorDataset(self.x_train, self.y_train)

    def target_set(self) -> TensorDataset:
        return TensorDataset(self.x_target, self.y_target)


@dataclass(frozen=True)
class Case:
    """One problem of the suite.

    build: makes the data (deterministic); model: a fresh, untrained module (weights drawn
    from torch's global generator, seeded by :meth:`train`); steps, lr, weight_decay:
    full-batch Adam on the cross-entropy; num_models: attribution checkpoints trained on
    all rows (seeds 1000, 1001, ...), the most any grid configuration uses.
    """

    name: str
    family: str
    description: str
    build: Callable[[], Data]
    model: Callable[[], nn.Module]
    steps: int
    lr: float
    weight_decay: float
    num_models: int = 5

    @functools.cached_property
    def _data(self) -> Data:
        return self.build()

    def data(self) -> Data:
        return self._data

    @property
    def p(self) -> int:
        return sum(t.numel() for t in self.model().parameters())

    def train(self, mask: np.ndarray, seed: int) -> nn.Module:
        """A fresh model trained on the training rows where ``mask`` (n,) is True."""
        data = self.data()
        keep = torch.as_tensor(np.asarray(mask, dtype=bool))
        x, y = data.x_train[keep], data.y_train[keep]
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.manual_seed(seed)
            model = self.model()
            opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        finally:
            torch.set_num_threads(before)
        return model.eval()

    def margins(self, model: nn.Module) -> np.ndarray:
        """The model's margin on every target, (n_targets,) float64."""
        data = self.data()
        with torch.no_grad():
            return margin_from_logits(model(data.x_target), data.y_target).double().numpy()

    def train_fn(self, seed_offset: int = 0) -> Callable[[np.ndarray, int], np.ndarray]:
        """``(mask, seed) -> margins`` for ``fasttrak.evaluate.retrain``; the model is
        trained with seed ``seed + seed_offset``."""

        def fn(mask: np.ndarray, seed: int) -> np.ndarray:
            return self.margins(self.train(mask, seed + seed_offset))

        return fn


# ---------------------------------------------------------------------- data


def _split(x: np.ndarray, y: np.ndarray, n: int, seed: int, tokens: bool = False) -> Data:
    """A seeded permutation: the first n rows train, the next NUM_TARGETS are targets."""
    order = np.random.default_rng(seed).permutation(len(x))
    train, target = order[:n], order[n : n + NUM_TARGETS]
    xt = torch.tensor(x, dtype=torch.int64 if tokens else torch.float32)
    yt = torch.tensor(y, dtype=torch.int64)
    return Data(xt[train], yt[train], xt[target], yt[target])


def digits(n: int, seed: int, image: bool = False) -> Data:
    """sklearn's 1797 handwritten 8x8 digits, pixels in [0, 1] (flat, or (1, 8, 8))."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return _split(x, y, n, seed)


def breast_cancer(n: int, seed: int) -> Data:
    """sklearn's 569 breast-cancer rows (30 features, standardized), 2 classes."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    return _split(x, y, n, seed)


def synthetic(n: int, features: int, classes: int, informative: int, seed: int) -> Data:
    """``make_classification`` with 5% flipped labels, standardized."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n + NUM_TARGETS,
        n_features=features,
        n_informative=informative,
        n_redundant=0,
        n_classes=classes,
        n_clusters_per_class=2,
        flip_y=0.05,
        class_sep=1.0,
        random_state=seed,
    )
    x = (x - x.mean(0)) / x.std(0)
    return _split(x, y, n, seed)


def gaussian_mixture(n: int, dims: int, classes: int, seed: int) -> Data:
    """Two Gaussian clusters per class in ``dims`` dimensions, overlapping (noise 1.5)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, 2, dims))
    total = n + NUM_TARGETS
    y = rng.integers(classes, size=total)
    cluster = rng.integers(2, size=total)
    x = centers[y, cluster] + 1.5 * rng.normal(size=(total, dims))
    return _split(x, y, n, seed)


def token_sequences(
    n: int, vocab: int, length: int, classes: int, keywords: int, seed: int
) -> Data:
    """Synthetic text: sequences of ``length`` tokens. Tokens [0, classes·keywords) are
    keywords, ``keywords`` per class; the rest are filler. A sequence of class c holds 2-4
    of c's keywords and 0-2 of one other class's (fewer than of c), the rest filler, in a
    random order; 5% of the labels are then flipped at random."""
    rng = np.random.default_rng(seed)
    total = n + NUM_TARGETS
    first_filler = classes * keywords
    x = rng.integers(first_filler, vocab, size=(total, length))
    y = rng.integers(classes, size=total)
    for i in range(total):
        own = int(rng.integers(2, 5))
        other = int(rng.integers(0, min(own, 3)))
        rival = (y[i] + 1 + rng.integers(classes - 1)) % classes
        words = np.concatenate(
            [
                y[i] * keywords + rng.integers(keywords, size=own),
                rival * keywords + rng.integers(keywords, size=other),
            ]
        )
        slots = rng.choice(length, size=len(words), replace=False)
        x[i, slots] = words
    flip = rng.random(total) < 0.05
    y[flip] = rng.integers(classes, size=int(flip.sum()))
    return _split(x, y, n, seed, tokens=True)


# ---------------------------------------------------------------------- models


def mlp(inputs: int, hidden: int, classes: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    return make


def linear(inputs: int, classes: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(inputs, classes))

    return make


class SmallCNN(nn.Module):
    """(B, 1, 8, 8) -> conv 3x3 (6) -> ReLU -> conv 3x3 (12) -> ReLU -> 2x2 max pool ->
    linear (10): 2,650 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class BagOfEmbeddings(nn.Module):
    """(B, L) tokens -> embedding (vocab, dim) -> mean over positions -> linear (classes)."""

    def __init__(self, vocab: int, dim: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.embed(x).mean(dim=1))


# ---------------------------------------------------------------------- the suite

_CASES = [
    Case(
        "lr_cancer",
        "logistic regression",
        "logistic regression on breast_cancer (30 features, 2 classes), n=369",
        lambda: breast_cancer(369, seed=1),
        linear(30, 2),
        steps=150,
        lr=0.05,
        weight_decay=1e-2,
    ),
    Case(
        "mlp_gauss_300",
        "MLP",
        "MLP 20-64-5 on a 5-class Gaussian mixture, n=300 (k > n at every k >= 512)",
        lambda: gaussian_mixture(300, 20, 5, seed=2),
        mlp(20, 64, 5),
        steps=150,
        lr=0.01,
        weight_decay=1e-2,
    ),
    Case(
        "mlp_narrow_digits",
        "MLP",
        "narrow MLP 64-16-10 on digits, n=1000",
        lambda: digits(1000, seed=3),
        mlp(64, 16, 10),
        steps=200,
        lr=0.02,
        weight_decay=1e-3,
    ),
    Case(
        "mlp_wide_digits",
        "MLP",
        "wide MLP 64-1536-10 on digits (p = 115k), n=500",
        lambda: digits(500, seed=4),
        mlp(64, 1536, 10),
        steps=100,
        lr=2e-3,
        weight_decay=1e-3,
    ),
    Case(
        "cnn_digits",
        "CNN",
        "small CNN (2 conv + linear) on 8x8 digit images, n=1000",
        lambda: digits(1000, seed=5, image=True),
        SmallCNN,
        steps=100,
        lr=0.01,
        weight_decay=1e-3,
    ),
    Case(
        "text_bag",
        "text",
        "bag of embeddings (vocab 256, dim 16) + linear on synthetic 4-class token "
        "sequences (24 tokens), n=2000",
        lambda: token_sequences(2000, 256, 24, 4, 8, seed=6),
        lambda: BagOfEmbeddings(256, 16, 4),
        steps=150,
        lr=0.05,
        weight_decay=1e-4,
    ),
    Case(
        "mlp_heldout",
        "MLP",
        "MLP 64-175-10 (13,135 parameters) on make_classification (10 classes, 64 "
        "features), n=4000: resembles issue 11's held-out case",
        lambda: synthetic(4000, 64, 10, 24, seed=7),
        mlp(64, 175, 10),
        steps=150,
        lr=0.01,
        weight_decay=1e-3,
    ),
    Case(
        "mlp_large_n",
        "MLP",
        "MLP 32-128-10 on make_classification (10 classes, 32 features), n=10000",
        lambda: synthetic(10_000, 32, 10, 16, seed=8),
        mlp(32, 128, 10),
        steps=120,
        lr=0.01,
        weight_decay=1e-3,
    ),
]

CASES: dict[str, Case] = {case.name: case for case in _CASES}


def select(names: str | None) -> list[Case]:
    """The cases named in a comma-separated list (all when None or empty)."""
    if not names:
        return list(CASES.values())
    unknown = [name for name in names.split(",") if name not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    return [CASES[name] for name in names.split(",")]


def main() -> None:
    torch.set_num_threads(1)
    print("case                n      p  targets  half_s  full_s  train_acc  target_acc")
    for case in CASES.values():
        data = case.data()
        half = np.zeros(data.n, dtype=bool)
        half[: data.n // 2] = True
        start = time.perf_counter()
        case.train(half, 0)
        half_s = time.perf_counter() - start
        start = time.perf_counter()
        model = case.train(np.ones(data.n, dtype=bool), 0)
        full_s = time.perf_counter() - start
        with torch.no_grad():
            train_acc = (model(data.x_train).argmax(1) == data.y_train).float().mean()
            target_acc = (model(data.x_target).argmax(1) == data.y_target).float().mean()
        print(
            f"{case.name:18s} {data.n:5d} {case.p:6d} {data.num_targets:8d} {half_s:7.2f} "
            f"{full_s:7.2f} {float(train_acc):10.3f} {float(target_acc):11.3f}"
        )


if __name__ == "__main__":
    main()
