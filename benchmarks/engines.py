"""Per-example gradient engines, same process: the hook engine vs the torch.func vmap engine.

Times ``engine.parts(state, batch)`` (per-example gradients of every parameter, batch of 64,
median of 7 after a warm-up, one thread) on an MLP, a CNN and a tiny GPT-2 (eager attention
and no padding mask, so that vmap can run it at all), and prints one JSON line per model with
the ratio vmap / hooks (> 1: the hook engine is faster)::

    python benchmarks/engines.py
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import torch
from torch import nn

from fasttrak.checkpoints import load_state
from fasttrak.gradients import HookGradients, VmapGradients, select_parameters
from fasttrak.tasks import ImageClassification, LanguageModeling


def median_seconds(engine: Any, state: dict, batch: Any, repeats: int = 7) -> float:
    engine.parts(state, batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.parts(state, batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cases() -> list[tuple[str, nn.Module, Any, Any]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10),
    )
    labels = torch.randint(0, 10, (64,))
    out = [
        ("mlp", mlp, ImageClassification(), (torch.randn(64, 64), labels)),
        ("cnn", cnn, ImageClassification(), (torch.randn(64, 1, 8, 8), labels)),
    ]
    try:
        import transformers
    except ImportError:
        return out
    config = transformers.GPT2Config(
        vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
        eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    gpt2 = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(1, 512, (64, 32))
    out.append(("gpt2", gpt2, LanguageModeling(target="all_tokens"), {"input_ids": ids}))
    return out


def main() -> None:
    torch.set_num_threads(1)
    for name, model, task, batch in cases():
        model.eval()
        names = select_parameters(model)
        state = load_state(model, None)
        hooks = median_seconds(HookGradients(model, task, names), state, batch)
        vmap = median_seconds(VmapGradients(model, task, names, chunk_size=None), state, batch)
        print(
            json.dumps(
                {
                    "benchmark": "engines",
                    "model": name,
                    "p": sum(state[n].numel() for n in names),
                    "batch": 64,
                    "hooks_s": round(hooks, 4),
                    "vmap_s": round(vmap, 4),
                    "vmap_over_hooks": round(vmap / hooks, 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
