"""The factories that examples/cli/run.toml names: scikit-learn's digits and a small MLP.

The fasttrak command line imports exactly these functions (by their import paths in
run.toml) and nothing else. Run this file once to train the checkpoints the config lists::

    python examples/cli/digits_project.py          # writes examples/cli/ckpts/model_*.pt
    fasttrak featurize -c examples/cli/run.toml
    fasttrak score -c examples/cli/run.toml
    fasttrak evaluate -c examples/cli/run.toml
    fasttrak report -c examples/cli/run.toml

The pieces come from fasttrak's own demo (``fasttrak.demo``): 1000 training digits, the
next ``NUM_TARGETS`` digits as targets, a 64 -> 128 -> 10 ReLU MLP trained full-batch.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fasttrak import demo

NUM_TARGETS = 100
HERE = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def _data() -> demo.DigitsData:
    return demo.load_data(num_targets=NUM_TARGETS, seed=0)


def make_mlp(hidden: int = 128) -> nn.Module:
    """model = "digits_project:make_mlp", called with [model_args] (hidden = 128)."""
    return demo.make_model(demo.TrainConfig(hidden=hidden))


def train_set() -> tuple[Tensor, Tensor]:
    """train = "digits_project:train_set": (pixels (1000, 64), labels (1000,))."""
    data = _data()
    return data.x_train, data.y_train


def test_set() -> tuple[Tensor, Tensor]:
    """targets = "digits_project:test_set": the digits to attribute."""
    data = _data()
    return data.x_target, data.y_target


def retrain_margins(mask: np.ndarray, seed: int, steps: int = 200) -> Tensor:
    """[evaluate] train_fn: train a fresh MLP on the rows where ``mask`` is True and return
    its margin on every target (the output TRAK attributes)."""
    data = _data()
    config = demo.TrainConfig(steps=steps)
    return demo.target_margins(demo.train(data, mask, seed, config), data)


def main(num_models: int = 3) -> None:
    """Train ``num_models`` MLPs, each on a random half, and save them as ckpts/model_<m>.pt."""
    out = HERE / "ckpts"
    out.mkdir(exist_ok=True)
    states = demo.train_attribution_models(_data(), num_models, seed=0)
    for m, state in enumerate(states):
        torch.save(state, out / f"model_{m}.pt")
        print(out / f"model_{m}.pt")


if __name__ == "__main__":
    main()
