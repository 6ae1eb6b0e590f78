"""TRAK on a small CNN trained on scikit-learn's digits (8x8 grey images, 10 classes).

What it does: trains a few small CNNs on scikit-learn's bundled digits (no download),
featurizes the training set with ``ft.TRAK`` (task ``ImageClassification``: f is the margin
logit_y - logsumexp(other logits), Q = 1 - p_y), scores some held-out digits and prints,
for each, its top proponents (training images that most raised its margin) and opponents
(most lowered it), then how often the top proponent has the target's label.

Run it::

    python examples/image_classification.py            # ~1000 training digits, 2 models
    python examples/image_classification.py --quick    # a few seconds (used by the tests)
    python examples/image_classification.py --store runs/digits   # resumable zarr store

# ---------------------------------------------------------------------------------------
# Pointing it at a real model and dataset (comments only; nothing here is executed):
#
#   import torchvision
#   model = torchvision.models.resnet18(num_classes=10)          # the architecture
#   checkpoints = ["ckpts/resnet_seed0.pt", "ckpts/resnet_seed1.pt"]  # state-dict files,
#   #   loaded with torch.load(weights_only=True); or .safetensors
#   train_set = torchvision.datasets.CIFAR10("data", train=True, transform=to_tensor)
#   #   any map-style Dataset of (image, label) items, or a DataLoader with shuffle=False
#   trak = ft.TRAK(model, task=ft.tasks.ImageClassification(),
#                  proj_dim=4096,            # larger k for larger models
#                  store="runs/cifar",       # resumable: kill it and run again
#                  device="cuda", batch_size=256)
#   trak.featurize(train_set, checkpoints=checkpoints)
#   scores = trak.score(test_subset)        # ft.Scores; scores.topk(10), scores.save(...)
#   # For very large convolutional nets: projector="factored" (needs params= without
#   # BatchNorm, e.g. params=[torch.nn.Conv2d, torch.nn.Linear]); see docs/factored.md.
# ---------------------------------------------------------------------------------------
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import fasttrak as ft


class SmallCNN(nn.Module):
    """(B, 1, 8, 8) -> conv 3x3 (16) -> ReLU -> max-pool 2 -> linear -> (B, 10) logits."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.fc = nn.Linear(channels * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(h.flatten(1))


def load(num_train: int, num_targets: int, seed: int = 0):
    """Training and target digits as (B, 1, 8, 8) float32 in [0, 1] and int64 labels."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    labels = torch.tensor(y, dtype=torch.int64)
    train, target = order[:num_train], order[num_train : num_train + num_targets]
    return (images[train], labels[train]), (images[target], labels[target])


def train(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int) -> dict[str, torch.Tensor]:
    """Full-batch Adam on cross-entropy; returns the trained state dict."""
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"  model seed {seed}: train accuracy {accuracy:.3f}")
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--proj-dim", type=int, default=None, help="k (default 1024; quick 256)")
    parser.add_argument("--store", default=None, help="zarr store directory (default: memory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--targets", type=int, default=None, help="digits to score")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny model: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    num_train, num_models, steps = (300, 1, 60) if args.quick else (1000, 2, 120)
    num_targets = args.targets or (8 if args.quick else 20)
    proj_dim = args.proj_dim or (256 if args.quick else 1024)
    start = time.perf_counter()

    (x, y), (x_t, y_t) = load(num_train, num_targets)
    print(f"training {num_models} CNN(s) on {num_train} digits")
    checkpoints = [train(x, y, seed, steps) for seed in range(num_models)]

    trak = ft.TRAK(
        SmallCNN(),  # the architecture; weights come from the checkpoints
        task=ft.tasks.ImageClassification(),
        proj_dim=proj_dim,
        store=args.store,
        device=args.device,
        batch_size=128,
        progress=False,
    )
    p = sum(trak.param_numels.values())
    print(f"featurizing: p = {p} parameters -> k = {trak.k} ({trak.engine} engine)")
    trak.featurize((x, y), checkpoints=checkpoints)  # a tuple of tensors works as a dataset
    scores = trak.score((x_t, y_t))
    top = scores.topk(5)

    print(f"\nscores: {scores.shape[0]} targets x {scores.shape[1]} training digits")
    same = 0
    for t in range(num_targets):
        props = ", ".join(f"#{i}({int(y[i])})" for i in top.proponents[t])
        opps = ", ".join(f"#{i}({int(y[i])})" for i in top.opponents[t])
        print(f"target {t} (label {int(y_t[t])}): proponents {props} | opponents {opps}")
        same += int(y[top.proponents[t, 0]] == y_t[t])
    print(f"\ntop proponent has the target's label for {same}/{num_targets} targets")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
