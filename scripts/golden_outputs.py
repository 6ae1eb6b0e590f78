"""Hashes of features, Q and scores on small models: proof that a refactor changed no bit.

    python scripts/golden_outputs.py --write golden.json   # before the change
    python scripts/golden_outputs.py --check golden.json   # after: exits 1 on any difference

Bit-identity holds on one machine and one torch build (BLAS kernels differ between CPUs), so
the file is made and checked on the same machine; it is not a test of the suite. Only public
API and the store's on-disk arrays are used, so the script runs unchanged on both sides.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

import fasttrak as ft


def digest(array: Any) -> str:
    array = np.ascontiguousarray(np.asarray(array))
    return hashlib.sha256(array.tobytes()).hexdigest()[:16] + f"/{array.dtype}{array.shape}"


def stored(store: Path) -> dict[str, str]:
    """Hashes of every model's features and Q, read from the store's directory."""
    out = {}
    root = store / "checkpoints"
    dirs = [p for p in root.iterdir() if p.name.isdigit()]
    for model_dir in sorted(dirs, key=lambda p: int(p.name)):
        for name in ("features", "q"):
            out[f"{name}{model_dir.name}"] = digest(zarr.open_array(model_dir / name, mode="r")[:])
    return out


def run(
    model: nn.Module,
    train: Any,
    targets: Any,
    checkpoints: list[Any] | None = None,
    score_options: list[dict[str, Any]] | None = None,
    **options: Any,
) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out: dict[str, str] = {}
        for i, extra in enumerate(score_options or [{}]):
            path = Path(tmp) / f"store{i}"
            trak = ft.TRAK(model, store=path, progress=False, **options, **extra)
            trak.featurize(train, checkpoints=checkpoints)
            out[f"scores{i}"] = digest(np.asarray(trak.score(targets)))
            if i == 0:
                out.update(stored(path))
        return out


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))


def perturbed(model: nn.Module, count: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return [
        {
            k: v + 0.05 * i * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for i in range(count)
    ]


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.reflect = nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect", bias=False)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.grouped(torch.relu(self.reflect(x))))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))


class Bag(nn.Module):
    """Embedding (with padding_idx) -> mean -> Linear, on (B, T) token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=0)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(1))


def cases() -> dict[str, Callable[[], dict[str, str]]]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=gen), torch.randint(0, 3, (300,), generator=gen)
    xt, yt = torch.randn(20, 8, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    images = torch.randn(120, 1, 6, 6, generator=gen)
    labels = torch.randint(0, 3, (120,), generator=gen)
    ids = torch.randint(0, 30, (150, 7), generator=gen)
    ids[::3, 5:] = 0
    ids_y = torch.randint(0, 3, (150,), generator=gen)
    torch.manual_seed(0)
    cnn = CNN().eval()
    cnn.bn.running_mean.uniform_(-0.5, 0.5)
    cnn.bn.running_var.uniform_(0.5, 2.0)
    torch.manual_seed(0)
    bag = Bag()
    kernels = [
        {},
        {"kernel": "plain", "kernel_blocks": 2, "ridge": 0.01},
        {"precision": "float64", "kernel_blocks": 4},
    ]
    out: dict[str, Callable[[], dict[str, str]]] = {}
    model = mlp()
    for projector in ("dense", "sjlt", "srht", "identity", "factored"):
        for engine in ("hooks", "vmap"):
            if projector == "factored" and engine == "vmap":
                continue
            out[f"mlp/{projector}/{engine}"] = lambda projector=projector, engine=engine: run(
                model,
                (x, y),
                (xt, yt),
                perturbed(model, 2),
                kernels,
                proj_dim=64,
                projector=projector,
                engine=engine,
                chunk_rows=128,
                batch_size=50,
            )
    configured = {
        "dense-streamed": ft.projection.Dense(distribution="gaussian", cache_bytes=4096),
        "sjlt-s4": ft.projection.SJLT(s=4),
        "srht-small-blocks": ft.projection.SRHT(block_size=64),
        "factored-kin": ft.projection.Factored(k_in=3),
    }
    for name, config in configured.items():
        out[f"mlp/{name}"] = lambda config=config: run(
            model,
            (x, y),
            (xt, yt),
            perturbed(model, 2),
            kernels[:1],
            proj_dim=128,
            projector=config,
            batch_size=32,
        )
    out["mlp/dropout-ensemble"] = lambda: run(
        model,
        (x, y),
        (xt, yt),
        ft.dropout_ensemble(model.state_dict(), size=3),
        kernels[:1],
        proj_dim=64,
        vmap_chunk_size=None,
    )
    out["mlp/float16-store"] = lambda: run(
        model,
        (x, y),
        (xt, yt),
        None,
        kernels[:1],
        proj_dim=64,
        feature_dtype="float16",
    )
    out["mlp/params"] = lambda: run(
        model,
        (x, y),
        (xt, yt),
        None,
        kernels[:1],
        proj_dim=32,
        params=["0.weight", "!*.bias"],
    )
    for projector in ("srht", "dense", "factored"):
        for engine in ("hooks", "vmap"):
            if projector == "factored" and engine == "vmap":
                continue
            extra = {"params": ["conv.*", "reflect.*", "fc.*"]} if projector == "factored" else {}
            out[f"cnn/{projector}/{engine}"] = lambda p=projector, e=engine, extra=extra: run(
                cnn,
                (images, labels),
                (images[:10], labels[:10]),
                perturbed(cnn, 2),
                kernels[:2],
                proj_dim=48,
                projector=p,
                engine=e,
                batch_size=40,
                **extra,
            )
    for projector in ("srht", "factored"):
        for engine in ("hooks", "vmap"):
            if projector == "factored" and engine == "vmap":
                continue
            out[f"bag/{projector}/{engine}"] = lambda p=projector, e=engine: run(
                bag,
                (ids, ids_y),
                (ids[:10], ids_y[:10]),
                None,
                kernels[:1],
                proj_dim=48,
                projector=p,
                engine=e,
                batch_size=32,
            )
    try:
        import transformers
    except ImportError:
        return out
    out.update(hf_cases(transformers))
    out["demo"] = demo
    return out


def hf_cases(transformers: Any) -> dict[str, Callable[[], dict[str, str]]]:
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    ).eval()
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=3,
        )
    ).eval()
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=50,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    gen = torch.Generator().manual_seed(5)
    n, t = 24, 8
    ids = torch.randint(3, 50, (n, t), generator=gen)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[::2, 6:] = 0
    lm_rows = [
        {
            "input_ids": ids[i],
            "attention_mask": mask[i],
            "labels": torch.where(mask[i].bool() & (torch.arange(t) >= 2), ids[i], -100),
        }
        for i in range(n)
    ]
    cls_rows = [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": torch.tensor(i % 3)}
        for i in range(n)
    ]
    s2s_rows = [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i, :4]} for i in range(n)
    ]
    conv1d = transformers.pytorch_utils.Conv1D
    factored = {"projector": "factored"}
    table = {  # name: (model, rows, task, extra options)
        "gpt2/srht/hooks": (gpt2, lm_rows, ft.tasks.LanguageModeling(), {}),
        "gpt2/factored/hooks": (
            gpt2,
            lm_rows,
            ft.tasks.LanguageModeling(),
            {**factored, "params": [conv1d]},
        ),
        "bert/srht/hooks": (bert, cls_rows, ft.tasks.TextClassification(), {}),
        "bert/factored/hooks": (
            bert,
            cls_rows,
            ft.tasks.TextClassification(),
            {**factored, "params": [nn.Linear]},
        ),
        "t5/srht/hooks": (t5, s2s_rows, ft.tasks.Seq2Seq(), {}),
    }
    return {
        name: lambda model=model, rows=rows, task=task, extra=extra: run(
            model, rows, rows[:4], None, None, task=task, proj_dim=64, batch_size=8, **extra
        )
        for name, (model, rows, task, extra) in table.items()
    }


def demo() -> dict[str, str]:
    from fasttrak import demo as ft_demo

    with tempfile.TemporaryDirectory() as tmp:
        data = ft_demo.load_data()
        scores, _ = ft_demo.attribute(data, 3, Path(tmp) / "store", progress=False)
        return {"scores": digest(np.asarray(scores)), **stored(Path(tmp) / "store")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path)
    group.add_argument("--check", type=Path)
    parser.add_argument("--only", default="", help="run cases whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name, case in cases().items():
        if args.only in name:
            results[name] = case()
            print(name, "done", file=sys.stderr)
    if args.write:
        args.write.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(results)} cases to {args.write}")
        return 0
    golden = json.loads(args.check.read_text())
    differ = [
        f"{name}/{key}: {golden.get(name, {}).get(key)} -> {value}"
        for name, result in results.items()
        for key, value in result.items()
        if golden.get(name, {}).get(key) != value
    ]
    missing = sorted(set(golden) - set(results)) if not args.only else []
    print(json.dumps({"cases": len(results), "differ": len(differ), "missing": missing}))
    for line in differ:
        print("DIFFERS", line)
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main())
