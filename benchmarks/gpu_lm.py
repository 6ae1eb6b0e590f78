"""LM featurize on a GPU: a GPT-2-small-sized model, tokens/s against a plain training step.

Model: ``GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
n_positions=1024))`` with random weights (``torch.manual_seed(0)``), sdpa attention: 124M
parameters, of which the 48 ``Conv1D`` layers (attention ``c_attn``/``c_proj``, MLP
``c_fc``/``c_proj``, weights and biases) hold p = 85,017,600. Data: ``--n`` sequences of
``--seq-len`` uniformly random token ids, no padding (every token is real), task
``ft.tasks.LanguageModeling()``.

Configurations, each timed from constructing ``ft.TRAK`` (``store=None``, ``params=[Conv1D]``;
the projector is built inside the timed run) to the last feature, CUDA synchronized before the
clock is read; ``--repeat`` runs interleaved after one warm-up batch each, median. The models
are made once, before any timing (a GPT-2 of random weights takes seconds to initialise on
the CPU; fasttrak never moves or changes the model it is given):

- ``factored``: ``projector=ft.projection.Factored()`` (per-layer Kronecker projection from
  layer hooks; k = 48 * k_in * k_out close to ``--k``);
- ``hooks_srht``: ``engine="hooks"``, the default SRHT projector of per-example gradients of
  the same parameters (B * p floats per batch);
- ``train_step`` (the baseline): the same batches through a plain training step without the
  optimizer: ``model.train()`` (dropout on), ``model(input_ids, labels=input_ids).loss``,
  ``backward()`` to every parameter, gradients cleared.

``tokens_per_s`` counts every token of the featurized sequences. One ``"bench": "gpu_lm"``
JSON line per configuration, and a ``"bench": "gpu_lm_ratio"`` line: ``ratio`` = factored
tokens/s over train_step tokens/s (``baseline`` "train_step"; 0.5: featurizing costs two
training steps), ``ratio_srht``, the same for hooks_srht. ``peak_gib``: peak device memory
of the run (CUDA only). A markdown table on stderr. See docs/gpu.md.

Usage::

    python benchmarks/gpu_lm.py                        # GPU: ~1 min on an H200
    python benchmarks/gpu_lm.py --quick --device cpu   # smoke run: a tiny GPT-2, ~10 s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from gpu_featurize import emit, env_row, fill_defaults, sync, wall

import fasttrak as ft

try:
    import transformers
    from transformers.pytorch_utils import Conv1D
except ImportError as error:  # pragma: no cover - the hf extra is needed
    raise SystemExit(f"gpu_lm needs transformers (pip install fasttrak[hf]): {error}") from error

SHAPES = {
    "full": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257},
    "quick": {"n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 1000},
}


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        **SHAPES["quick" if args.quick else "full"],
        n_positions=max(1024, args.seq_len),
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    return transformers.GPT2LMHeadModel(config).eval()


def make_data(args: argparse.Namespace, vocab: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.n, args.seq_len), generator=gen)
    mask = torch.ones_like(ids)
    return [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(args.n)]


def featurize(args: argparse.Namespace, data: list, name: str, projector: Any) -> None:
    model = args.model
    trak = ft.TRAK(
        model,
        task=ft.tasks.LanguageModeling(),
        proj_dim=args.k,
        projector=projector,
        engine="hooks",
        params=[Conv1D],
        store=None,
        device=args.device,
        batch_size=args.batch,
        progress=False,
    )
    trak.featurize(data, checkpoints=[model.state_dict()])
    args.k_of[name] = trak.k


def train_step(args: argparse.Namespace, data: list) -> None:
    model = args.train_model
    for start in range(0, len(data), args.batch):
        rows = data[start : start + args.batch]
        ids = torch.stack([row["input_ids"] for row in rows]).to(args.device)
        mask = torch.stack([row["attention_mask"] for row in rows]).to(args.device)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)


def peak(args: argparse.Namespace, fn: Any) -> float | None:
    if args.device.type != "cuda":
        fn()
        return None
    sync(args.device)
    torch.cuda.reset_peak_memory_stats(args.device)
    before = torch.cuda.memory_allocated(args.device)
    fn()
    sync(args.device)
    return round((torch.cuda.max_memory_allocated(args.device) - before) / 2**30, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny GPT-2")
    parser.add_argument("--n", type=int, help="sequences")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence")
    parser.add_argument("--batch", type=int, help="sequences per batch")
    parser.add_argument("--k", type=int, help="projection dimension asked for")
    parser.add_argument("--repeat", type=int, help="timed runs per configuration")
    parser.add_argument("--no-srht", action="store_true", help="skip the hooks_srht run")
    args = parser.parse_args(argv)
    quick = {"n": 8, "seq_len": 32, "batch": 4, "k": 256, "repeat": 1}
    full = {"n": 128, "seq_len": 512, "batch": 8, "k": 4096, "repeat": 3}
    fill_defaults(args, quick, full)
    args.device = torch.device(args.device)
    args.k_of = {}
    env = env_row("gpu_lm", args.device, args.quick)
    env["transformers"] = transformers.__version__
    emit(env)
    start = time.perf_counter()
    model = make_model(args)
    params = sum(t.numel() for t in model.parameters())
    attributed = sum(
        t.numel()
        for m in model.modules()
        if isinstance(m, Conv1D)
        for t in m.parameters(recurse=False)
    )
    data = make_data(args, model.config.vocab_size)
    args.model = model  # every fasttrak run reads it (on the CPU; its state goes to the device)
    args.train_model = make_model(args).to(args.device).train()
    runs = {
        "factored": lambda rows: featurize(args, rows, "factored", ft.projection.Factored()),
        "hooks_srht": lambda rows: featurize(args, rows, "hooks_srht", "srht"),
        "train_step": lambda rows: train_step(args, rows),
    }
    if args.no_srht:
        del runs["hooks_srht"]
    peaks = {name: peak(args, lambda fn=fn: fn(data[: args.batch])) for name, fn in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, fn in runs.items():
            times[name].append(wall(lambda fn=fn: fn(data), args.device))
    tokens = args.n * args.seq_len
    rate, rows = {}, []
    for name, runs_s in times.items():
        rate[name] = tokens / statistics.median(runs_s)
        row = {"bench": "gpu_lm", "config": name, "n": args.n, "seq_len": args.seq_len}
        row.update({"batch": args.batch, "params": params, "p_attributed": attributed})
        row["k"] = args.k_of.get(name)
        row["tokens_per_s"] = round(rate[name], 1)
        row["runs_s"] = [round(t, 3) for t in runs_s]
        row["peak_gib_one_batch"] = peaks[name]
        emit(row)
        rows.append(row)
    srht = rate.get("hooks_srht")
    ratio_row = {
        "bench": "gpu_lm_ratio",
        "baseline": "train_step",
        "ratio": round(rate["factored"] / rate["train_step"], 4),
        "ratio_srht": None if srht is None else round(srht / rate["train_step"], 4),
    }
    emit(ratio_row)
    emit({"bench": "done", "script": "gpu_lm", "seconds": round(time.perf_counter() - start, 1)})
    lines = ["| config | k | tokens/s | runs (s) |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['k']} | {r['tokens_per_s']} | {r['runs_s']} |" for r in rows]
    lines.append(f"| ratio factored / train_step | | {ratio_row['ratio']} | |")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
