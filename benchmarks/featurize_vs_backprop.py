"""Featurize against its floor: a plain forward+backward of the same batches plus the projection.

For a small CNN (two 3x3 convolutions, 1,898 parameters, 2,000 1x16x16 images) and an MLP
(256 -> 64 -> 10), and with ``--nets cnn_rgb`` a CIFAR-shaped CNN (3x32x32 images, 16 and 32
channels), at k = 1,024 with 5 models, in one process on one thread:

* ``featurize``: ``trak.featurize(train, checkpoints=5 models)`` into an in-memory store
  (per-example gradients, Q, projection, store writes and checks);
* ``backprop``: a plain training step's forward and backward of the same batches for each
  model (``loss.sum().backward()``, parameter gradients summed over the batch);
* ``projection``: the projector's ``project`` of gradients of the same shape (B, p), per
  batch, for each model (what no engine can avoid);
* ``floor``: for each model and batch, that forward+backward followed by that projection:
  the work of an ideal featurizer (one that computes per-example gradients for the price of
  a summed one), in the order any featurizer must do it;

and prints one JSON line per model with ``ratio = featurize / floor`` (the aim: at most 1.5),
``ratio_separate = featurize / (backprop + projection)``, and the stage breakdown of
featurize from the library's profiler labels. The two floors differ: run as two separate
loops, the backward passes and the projections each keep their own working set in the
caches, which no featurizer can (it must alternate); the interleaved floor costs 11-17%
more on these models (measured). Times are CPU seconds of this process
(``time.process_time``, every thread: the store's writer thread counts). The stages run
back to back in each of ``--repeat`` rounds and each ratio is the median of the rounds'
ratios: on a shared VM the speed drifts by tens of percent from one minute to the next,
which stage-by-stage medians took for differences between the stages::

    OMP_NUM_THREADS=1 python benchmarks/featurize_vs_backprop.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import fasttrak as ft
from fasttrak.tasks.classification import margin_from_logits


def conv_net(channels: int, first: int, second: int) -> nn.Module:
    """Two 3x3 convolutions (``first`` and ``second`` channels), max- and average-pooling,
    and a linear layer to 10 classes."""
    return nn.Sequential(
        nn.Conv2d(channels, first, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(first, second, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * second, 10),
    )


def cnn() -> nn.Module:
    return conv_net(1, 8, 16)


def cnn_rgb() -> nn.Module:
    """A CIFAR-shaped CNN: 3 x 32 x 32 images, 16 and 32 channels (6,378 parameters): wider
    convolutions than ``cnn``; the second one's per-example weight gradients take the grouped
    route."""
    return conv_net(3, 16, 32)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))


NETS: dict[str, Callable[[], nn.Module]] = {"cnn": cnn, "mlp": mlp, "cnn_rgb": cnn_rgb}
SHAPES = {"cnn": (1, 16, 16), "mlp": (1, 16, 16), "cnn_rgb": (3, 32, 32)}


def cpu_seconds(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def interleaved(stages: dict[str, Callable[[], object]], repeat: int) -> list[dict[str, float]]:
    """CPU seconds of every stage, ``repeat`` rounds, the stages run back to back in each
    round (after one warm-up round): a ratio taken within a round sees the same machine
    state, where the VM's speed drifts by tens of percent between minutes."""
    for fn in stages.values():
        fn()
    return [{name: cpu_seconds(fn) for name, fn in stages.items()} for _ in range(repeat)]


def measure(name: str, make: Callable[[], nn.Module], args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, *SHAPES[name], generator=gen)
    y = torch.randint(0, 10, (args.rows,), generator=gen)
    models = []
    for s in range(args.models):
        torch.manual_seed(s)
        models.append(make())
    states = [m.state_dict() for m in models]
    p = sum(t.numel() for t in models[0].parameters())

    def featurize() -> ft.TRAK:
        trak = ft.TRAK(
            make(), proj_dim=args.k, batch_size=args.batch, progress=False, chunk_rows=512
        )
        trak.featurize((x, y), checkpoints=states)
        return trak

    def backprop() -> None:
        for model in models:
            model.eval()
            for start in range(0, args.rows, args.batch):
                xb, yb = x[start : start + args.batch], y[start : start + args.batch]
                model.zero_grad(set_to_none=True)
                margin_from_logits(model(xb), yb).sum().backward()

    projectors = []
    trak = featurize()
    for m in range(args.models):
        projectors.append(trak.featurizer(m).projector)  # type: ignore[attr-defined]
    grads = torch.randn(args.batch, p, generator=gen)

    def projection() -> None:
        for projector in projectors:
            for _ in range(0, args.rows, args.batch):
                projector.project(grads)

    def floor() -> None:
        for model, projector in zip(models, projectors, strict=True):
            model.eval()
            for start in range(0, args.rows, args.batch):
                xb, yb = x[start : start + args.batch], y[start : start + args.batch]
                model.zero_grad(set_to_none=True)
                margin_from_logits(model(xb), yb).sum().backward()
                projector.project(grads)

    stages = {"featurize": featurize, "backprop": backprop, "projection": projection}
    rounds = interleaved({**stages, "floor": floor}, args.repeat)
    seconds = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    ratios = [r["featurize"] / r["floor"] for r in rounds]
    separate = [r["featurize"] / (r["backprop"] + r["projection"]) for r in rounds]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        featurize()
    stages = {
        e.key: round(e.cpu_time_total / 1e6, 3)
        for e in prof.key_averages()
        if e.key.startswith("fasttrak.")
    }
    return {
        "bench": "featurize_vs_backprop",
        "model": name,
        "p": p,
        "k": args.k,
        "rows": args.rows,
        "models": args.models,
        "batch": args.batch,
        "seconds": {key: round(value, 3) for key, value in seconds.items()},
        "ratio": round(statistics.median(ratios), 2),
        "ratio_per_round": [round(r, 2) for r in ratios],
        "ratio_separate": round(statistics.median(separate), 2),
        "ratio_separate_per_round": [round(r, 2) for r in separate],
        "aim": 1.5,
        "profiled_stages_s": stages,
        "threads": torch.get_num_threads(),
        "clock": "process_time",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="cnn,mlp", help="comma-separated: cnn, mlp, cnn_rgb")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="500 rows, 2 models, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.models, args.repeat = 500, 2, 1
    torch.set_num_threads(1)
    for name in args.nets.split(","):
        if name not in NETS:
            parser.error(f"unknown model {name!r}; choose from {sorted(NETS)}")
    for name in args.nets.split(","):
        make = NETS[name]
        print(json.dumps(measure(name, make, args)), flush=True)


if __name__ == "__main__":
    main()
