"""CPU vs. CUDA: features, Q and scores of every projector with both gradient engines.

For each model (an MLP; a CNN with BatchNorm; a tiny GPT-2 with sdpa attention when
transformers is installed; eager attention for vmap), projector (dense, sjlt, srht, identity,
factored) and engine (hooks, vmap; the factored projection has its own hooks and runs once),
``ft.TRAK(...).features`` of the same examples on the CPU and on CUDA, and the scores of a few
targets after ``featurize``.
Prints one JSON line per case (``"bench": "gpu_agreement"``): the relative errors
``|cuda - cpu|_F / |cpu|_F`` of the features, Q and scores, the largest absolute difference of
the features, and ``ok`` (every relative error under ``tol``). The tolerance is float32's
(1e-4); cuDNN may run convolutions in TF32 (``cudnn_tf32`` in the env line), which can put the
CNN near 1e-3: such a case is flagged ``ok: false`` with the number, for a reader to judge.

Usage: python scripts/gpu/agreement.py [--device cuda] [--quick]  (``--device cpu`` compares
the CPU with itself: a smoke run of this script.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

import fasttrak as ft

TOL = 1e-4


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5)).eval()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def vision_data(model: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 20) if model == "mlp" else (n, 3, 8, 8)
    return torch.randn(*shape, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def gpt2(attn: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=100,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def text_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, 12:] = 0  # some right padding
    return [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(n)]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_case(model_name: str, projector: str, engine: str, device: str, n: int) -> dict:
    if model_name == "gpt2":
        from transformers.pytorch_utils import Conv1D

        # vmap needs eager attention (GPT-2's sdpa mask does not run under vmap)
        attn = "eager" if engine == "vmap" else "sdpa"
        make, task, params = (lambda: gpt2(attn)), ft.tasks.LanguageModeling(), [Conv1D]
        train, targets = text_data(n, 0), text_data(4, 1)
    else:
        make = mlp if model_name == "mlp" else cnn
        task, params = ft.tasks.ImageClassification(), None
        train, targets = vision_data(model_name, n, 0), vision_data(model_name, 4, 1)
    if projector == "factored":
        config: Any = ft.projection.Factored(others="exclude")
    else:
        config = projector
    out: dict[str, Any] = {}
    for label, dev in (("cpu", "cpu"), ("dev", device)):
        model = make()
        trak = ft.TRAK(
            model,
            task=task,
            proj_dim=64,
            projector=config,
            engine=engine,
            params=params,
            store=None,
            device=dev,
            batch_size=8,
            progress=False,
        )
        feats = trak.features(train, checkpoint=model.state_dict())
        trak.featurize(train, checkpoints=[model.state_dict()])
        scores = np.asarray(trak.score(targets))
        out[label] = (feats.phi, feats.q, scores)
    (phi0, q0, s0), (phi1, q1, s1) = out["cpu"], out["dev"]
    errors = {"features": rel(phi1, phi0), "q": rel(q1, q0), "scores": rel(s1, s0)}
    return {
        "k": int(phi0.shape[1]),
        "rel_features": errors["features"],
        "rel_q": errors["q"],
        "rel_scores": errors["scores"],
        "max_abs_features": float(np.abs(phi1 - phi0).max()),
        "ok": all(e < TOL for e in errors.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer examples and cases")
    args = parser.parse_args(argv)
    env = {"bench": "env", "script": "agreement", "device": args.device, "tol": TOL}
    env["torch"], env["cudnn_tf32"] = torch.__version__, torch.backends.cudnn.allow_tf32
    env["matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
    print(json.dumps(env), flush=True)
    models = ["mlp", "cnn"]
    try:
        import transformers  # noqa: F401

        models.append("gpt2")
    except ImportError:
        print(json.dumps({"bench": "gpu_agreement", "model": "gpt2", "skipped": "no transformers"}))
    projectors = ["dense", "srht"] if args.quick else ["dense", "sjlt", "srht", "identity"]
    start, bad = time.perf_counter(), 0
    for model_name in models[:1] if args.quick else models:
        cases = [(p, e) for p in projectors for e in ("hooks", "vmap")] + [("factored", "hooks")]
        for projector, engine in cases:
            if model_name == "gpt2" and projector == "identity":
                continue  # k = p: large, and identity has nothing device-specific
            row: dict[str, Any] = {"bench": "gpu_agreement", "model": model_name}
            row.update({"projector": projector, "engine": engine, "device": args.device})
            try:
                row.update(run_case(model_name, projector, engine, args.device, 24))
            except Exception as exc:  # noqa: BLE001 - every case is reported, none stops the run
                row.update({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]})
            bad += row.get("ok") is False
            print(json.dumps(row), flush=True)
    done = {"bench": "done", "script": "agreement", "not_ok": bad}
    done["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(done), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
