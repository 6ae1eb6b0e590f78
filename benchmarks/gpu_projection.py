"""Projection speed on a GPU: each fasttrak projector against ``torch.matmul`` of the same shapes.

For each gradient layout (``256k``: one parameter of 2**18 coordinates; ``resnet18``: the 62
parameter blocks of benchmarks/gpu_featurize.py's ResNet-18, p = 11,173,962, passed as
per-parameter parts as ``ft.TRAK`` does) and k (default 2048 and 8192), at B = 128 random
float32 gradient rows already on the device, the median device time (CUDA events around each
call, after warm-up calls) of one ``project()`` of:

- ``dense``: ``ft.projection.Dense(cache_bytes=p * k * 4)``, its (p, k) matrix generated (on
  the CPU, by design: identical on every device) and moved to the device before timing, when
  p * k <= ``--dense-max`` (2**31 entries, 8 GiB); above that it is skipped: generation alone
  would take minutes, and ``dense_stream_s_est`` in the row says how long the streamed
  projection would take at the measured generation rate (``dense_build_s`` / (p k));
- ``sjlt``: ``ft.projection.SJLT()`` (s = 1); ``srht``: ``ft.projection.SRHT()`` (the default
  projector); ``srht_radixR``: the same projector with its Hadamard factors of size R
  (``--srht-radices``, default 2 and 16; the device default is 64, the CPU's 32);
- ``factored`` (its own layout: an MLP of ``Linear(d, d)`` layers, p close to the other's): one
  ``FactoredProjector.batch_features`` call, which runs the model's forward and backward
  with layer hooks and projects per layer: not a (B, p) x (p, k) product, so its rate is the
  dense-equivalent one, next to ``fwd_bwd_s``, the plain forward and backward of the batch;
- ``matmul`` (the baseline): ``torch.matmul`` of (B, p') by a (p', k) float32 random matrix
  made on the device, p' = min(p, 4 GiB / 4k); its rate (GFLOP/s) is taken as that of the
  full shape (a matmul's time grows linearly with p at fixed B and k).

Rates are ``2 B p k / seconds / 1e9`` (dense-equivalent GFLOP/s for sjlt, srht and factored:
the rate a dense projection would need to be as fast). One JSON line per (layout, k,
projector): ``"bench": "gpu_projection"``, ``gflops``, ``matmul_gflops``, ``ratio`` =
gflops / matmul_gflops, ``baseline`` "torch.matmul", ``build_s`` (building the projector).
A markdown table on stderr. See docs/gpu.md.

Usage::

    python benchmarks/gpu_projection.py                        # GPU: ~1 min on an H200
    python benchmarks/gpu_projection.py --quick --device cpu   # smoke run, ~10 s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from gpu_featurize import ResNet18, emit, env_row, fill_defaults, kernel_seconds, sync
from torch import nn

import fasttrak as ft

MATMUL_BYTES = 4 * 2**30  # largest (p', k) baseline matrix


def layouts(quick: bool) -> dict[str, dict[str, int]]:
    width = 8 if quick else 64
    resnet = {name: t.numel() for name, t in ResNet18(width).named_parameters()}
    one = 2**16 if quick else 2**18
    return {"64k" if quick else "256k": {"w": one}, f"resnet18_w{width}": resnet}


def timed(fn: Any, device: torch.device, reps: int) -> float:
    return statistics.median(kernel_seconds(fn, device, reps))


def built(fn: Any, device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def matmul_rate(batch: int, p: int, k: int, device: torch.device, reps: int) -> float:
    """GFLOP/s of torch.matmul (B, p') x (p', k), float32, operands on the device."""
    rows = max(1, min(p, MATMUL_BYTES // (4 * k)))
    gen = torch.Generator(device=device).manual_seed(1)
    grads = torch.randn(batch, rows, device=device, generator=gen)
    matrix = torch.randn(rows, k, device=device, generator=gen)
    out = torch.empty(batch, k, device=device)
    seconds = timed(lambda: torch.matmul(grads, matrix, out=out), device, reps)
    return 2 * batch * rows * k / seconds / 1e9


def projector_rows(label: str, numels: dict[str, int], k: int, args: Any) -> list[dict]:
    device, batch = args.device, args.batch
    p = sum(numels.values())
    gen = torch.Generator(device=device).manual_seed(0)
    blocks = [torch.randn(batch, n, device=device, generator=gen) for n in numels.values()]
    base = {"bench": "gpu_projection", "layout": label, "p": p, "k": k, "batch": batch}
    rate = matmul_rate(batch, p, k, device, args.reps)
    configs: dict[str, Any] = {"sjlt": ft.projection.SJLT(), "srht": ft.projection.SRHT()}
    # the default SRHT with other Hadamard radices (its device default: DEVICE_RADIX)
    variants = {f"srht_radix{r}": ("srht", r) for r in args.srht_radices}
    skipped: dict[str, Any] = {}
    if p * k <= args.dense_max:
        configs = {"dense": ft.projection.Dense(cache_bytes=p * k * 4), **configs}
    else:
        skipped["dense"] = f"p * k = {p * k:.3g} > --dense-max {args.dense_max:.3g}"
    out = []
    for name in [*configs, *variants]:
        config = configs[variants[name][0]] if name in variants else configs[name]
        projector, build_s = built(lambda c=config: c.build(numels, k, 0, 0, device), device)
        if name in variants:
            projector.radix = variants[name][1]
        if name == "dense":  # generate and move the cached matrix outside the timed calls
            _, matrix_s = built(projector.matrix, device)
            build_s += matrix_s
            args.gen_rate = p * k / build_s
        seconds = timed(lambda pr=projector: pr.project(blocks), device, args.reps)
        del projector
        gflops = 2 * batch * p * k / seconds / 1e9
        out.append(
            {
                **base,
                "projector": name,
                "seconds": round(seconds, 6),
                "gflops": round(gflops, 1),
                "matmul_gflops": round(rate, 1),
                "ratio": round(gflops / rate, 4),
                "baseline": "torch.matmul",
                "build_s": round(build_s, 3),
            }
        )
    for name, why in skipped.items():
        row = {**base, "projector": name, "seconds": None, "gflops": None}
        row.update({"matmul_gflops": round(rate, 1), "ratio": None, "baseline": "torch.matmul"})
        row["skipped"] = why
        if getattr(args, "gen_rate", None):
            row["dense_stream_s_est"] = round(p * k / args.gen_rate, 1)
        out.append(row)
    return out


def mlp(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10)).eval()


def factored_row(k: int, args: Any) -> dict[str, Any]:
    device, batch = args.device, args.batch
    model = mlp(args.mlp_width, args.mlp_depth).to(device)
    names = [name for name, _ in model.named_parameters()]
    p = sum(t.numel() for t in model.parameters())
    task = ft.tasks.ImageClassification()
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, args.mlp_width, device=device, generator=gen)
    y = torch.randint(0, 10, (batch,), device=device, generator=gen)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = {name: t.detach() for name, t in state.items()}
    config = ft.projection.Factored()
    projector, build_s = built(lambda: config.build_factored(model, names, k, 0, 0, device), device)
    seconds = timed(lambda: projector.batch_features(state, task, (x, y)), device, args.reps)

    def fwd_bwd() -> None:
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)

    fwd_bwd_s = timed(fwd_bwd, device, args.reps)
    rate = matmul_rate(batch, p, projector.k, device, args.reps)
    gflops = 2 * batch * p * projector.k / seconds / 1e9
    return {
        "bench": "gpu_projection",
        "layout": f"mlp_{args.mlp_depth}x{args.mlp_width}",
        "p": p,
        "k": projector.k,
        "k_asked": k,
        "batch": batch,
        "projector": "factored",
        "seconds": round(seconds, 6),
        "gflops": round(gflops, 1),
        "matmul_gflops": round(rate, 1),
        "ratio": round(gflops / rate, 4),
        "baseline": "torch.matmul",
        "build_s": round(build_s, 3),
        "fwd_bwd_s": round(fwd_bwd_s, 6),
        "ratio_vs_fwd_bwd": round(fwd_bwd_s / seconds, 4),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| layout | p | k | projector | ms | GFLOP/s (dense-equiv.) | matmul GFLOP/s | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = "-" if r["seconds"] is None else f"{1e3 * r['seconds']:.3f}"
        lines.append(
            f"| {r['layout']} | {r['p']:,} | {r['k']} | {r['projector']} | {ms} "
            f"| {r['gflops']} | {r['matmul_gflops']} | {r['ratio']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: small shapes")
    parser.add_argument("--ks", type=int, nargs="+", help="projection dimensions")
    parser.add_argument("--batch", type=int, help="gradient rows per project() call")
    parser.add_argument("--reps", type=int, help="timed calls per measurement (median)")
    parser.add_argument("--dense-max", type=int, help="largest p * k of a dense matrix built")
    parser.add_argument("--mlp-width", type=int, help="factored: width of the Linear layers")
    parser.add_argument("--mlp-depth", type=int, help="factored: number of Linear(d, d) layers")
    parser.add_argument(
        "--srht-radices",
        type=int,
        nargs="*",
        default=[2, 16],
        help="also time the default SRHT with these Hadamard radices (rows srht_radixR)",
    )
    args = parser.parse_args(argv)
    quick = {"ks": [256], "batch": 16, "reps": 3, "dense_max": 2**31, "mlp_width": 128}
    full = {"ks": [2048, 8192], "batch": 128, "reps": 10, "dense_max": 2**31, "mlp_width": 1024}
    quick["mlp_depth"], full["mlp_depth"] = 2, 8
    fill_defaults(args, quick, full)
    args.device = torch.device(args.device)
    emit(env_row("gpu_projection", args.device, args.quick))
    start, rows = time.perf_counter(), []
    for k in args.ks:
        for label, numels in layouts(args.quick).items():
            for row in projector_rows(label, numels, k, args):
                emit(row)
                rows.append(row)
        row = factored_row(k, args)
        emit(row)
        rows.append(row)
    seconds = round(time.perf_counter() - start, 1)
    emit({"bench": "done", "script": "gpu_projection", "seconds": seconds})
    print(table(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
