"""LDS of each projector on the demo (digits MLP, 5 models on random halves, 300 targets,
ground truth of 100 retrained halves, cached under --ground-truth). One JSON line each.

    python benchmarks/projection_lds.py     # ~1 min on 2 CPU cores once the ground truth exists
"""

import argparse
import json
import time

import torch

import fasttrak as ft
from fasttrak import demo

CONFIGS = [
    ("dense", 1024),
    ("sjlt", 1024),
    ("srht", 1024),
    ("factored", 1024),
    ("dense", 256),
    ("sjlt", 256),
    ("srht", 256),
    ("factored", 256),
    ("factored", 4096),
    ("sjlt", 4096),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ground-truth", default="fasttrak-demo/ground_truth")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = demo.load_data(300, 0)
    masks, outs = demo.ground_truth(data, 100, args.ground_truth, progress=False)
    states = demo.train_attribution_models(data, 5, 0, progress=False)
    for projector, proj_dim in CONFIGS:
        start = time.perf_counter()
        trak = ft.TRAK(
            demo.make_model(),
            projector=projector,
            proj_dim=proj_dim,
            batch_size=250,
            vmap_chunk_size=None,
            progress=False,
        )
        trak.featurize((data.x_train, data.y_train), checkpoints=states)
        result = ft.evaluate.lds(trak.score((data.x_target, data.y_target)), masks, outs)
        print(
            json.dumps(
                {
                    "projector": projector,
                    "proj_dim": proj_dim,
                    "k": trak.k,
                    "lds": round(result.mean, 4),
                    "stderr": round(result.stderr, 4),
                    "seconds": round(time.perf_counter() - start, 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
