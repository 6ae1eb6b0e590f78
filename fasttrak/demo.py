"""End-to-end demo: TRAK on an MLP trained on scikit-learn's digits, evaluated with the LDS.

Run it with ``fasttrak demo`` (or ``python -m fasttrak.cli demo``); everything is offline
and takes about a minute on 2 CPU cores. The pieces (data, model, training, ground truth,
baselines) are public so that benchmarks can reuse them on the same ground truth::

    from fasttrak.demo import run_demo
    result = run_demo("fasttrak-demo")
    print(result.lds)          # LDS 0.534 ± 0.011 (300 targets)

Outputs in ``out_dir``: ``store/`` (the TRAK features, resumable), ``ground_truth/``
(margins of models retrained on random halves, cached), ``top_attributions.png`` and
``demo.json`` (the options the directory was made with).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import fasttrak as ft
from fasttrak.errors import ConfigError, DataError, MissingDependencyError
from fasttrak.evaluate import LDSResult
from fasttrak.tasks.classification import margin_from_logits

NUM_TRAIN = 1000
"""Training examples drawn from the 1797 digits; the targets come from the rest."""
IMAGE_SHAPE = (8, 8)
DEFAULT_PROJ_DIM = 1024
"""k, chosen by measurement (benchmarks/ridge.py, docs/estimator.md): with a well-chosen ridge
k = 1024 is as good as 2048 on this ~10k-parameter MLP (1000 training rows) and 3x faster to
score; 512 is slightly worse."""
CONFIG_NAME = "demo.json"


@dataclass(frozen=True)
class DigitsData:
    """The digits split into a training set and a target set, pixels scaled to [0, 1].

    x_train: (n_train, 64) float32; y_train: (n_train,) int64;
    x_target: (n_targets, 64) float32; y_target: (n_targets,) int64.
    """

    x_train: Tensor
    y_train: Tensor
    x_target: Tensor
    y_target: Tensor

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.x_target.shape[0])


@dataclass(frozen=True)
class TrainConfig:
    """Full-batch Adam on cross-entropy for a 64 -> hidden -> 10 ReLU MLP."""

    hidden: int = 128
    steps: int = 200
    lr: float = 1e-2
    weight_decay: float = 1e-3


class DemoOptionsError(ConfigError):
    """``out_dir`` holds a demo run made with other options."""


@dataclass
class DemoResult:
    """What :func:`run_demo` measured.

    lds: TRAK's LDS; baselines: LDS of trivial attributions on the same ground truth;
    seconds: wall time per stage; paths: store, ground truth cache and figure;
    options: the run's options (as in ``demo.json``); table: the printed summary.
    """

    lds: LDSResult
    baselines: dict[str, LDSResult]
    seconds: dict[str, float]
    paths: dict[str, Path]
    options: dict[str, Any] = field(default_factory=dict)
    table: str = ""


# ---------------------------------------------------------------------- data and model


def load_data(num_targets: int = 300, seed: int = 0, num_train: int = NUM_TRAIN) -> DigitsData:
    """Split sklearn's 1797 digits by a seeded permutation: the first ``num_train`` rows are
    the training set, the next ``num_targets`` the targets (so the training set does not
    depend on ``num_targets``)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise MissingDependencyError(
            "the demo needs scikit-learn: pip install fasttrak[demo]"
        ) from error
    x, y = load_digits(return_X_y=True)
    if num_train < 1 or num_targets < 1 or num_train + num_targets > len(x):
        raise ConfigError(
            f"need 1 <= num_train, 1 <= num_targets and num_train + num_targets <= {len(x)}, "
            f"got num_train={num_train}, num_targets={num_targets}"
        )
    order = np.random.default_rng(seed).permutation(len(x))
    train, target = order[:num_train], order[num_train : num_train + num_targets]
    pixels = torch.tensor(x / 16.0, dtype=torch.float32)
    labels = torch.tensor(y, dtype=torch.int64)
    return DigitsData(pixels[train], labels[train], pixels[target], labels[target])


def make_model(config: TrainConfig = TrainConfig()) -> nn.Module:
    """The MLP: (B, 64) pixels -> (B, 10) logits."""
    return nn.Sequential(nn.Linear(64, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 10))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous setting.

    Training uses one thread: the matrices are tiny (thread start-up costs more than it
    saves) and a fixed thread count keeps the floating-point reductions, hence the trained
    weights, bit-identical from run to run.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    data: DigitsData, mask: np.ndarray | Tensor, seed: int, config: TrainConfig = TrainConfig()
) -> nn.Module:
    """Train a fresh MLP full-batch on the training rows where ``mask`` (n_train,) is True.

    Deterministic: the same mask and seed give bit-identical weights.
    """
    mask_t = torch.as_tensor(np.asarray(mask, dtype=bool))
    if mask_t.shape != (data.num_train,):
        raise DataError(f"mask must have shape ({data.num_train},), got {tuple(mask_t.shape)}")
    x, y = data.x_train[mask_t], data.y_train[mask_t]
    with torch_threads(1):
        torch.manual_seed(seed)
        model = make_model(config)
        fit(model, x, y, config.steps, config.lr, config.weight_decay)
    return model.eval()


def fit(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float, weight_decay: float) -> None:
    """Full-batch Adam on the cross-entropy of ``model(x)`` against labels ``y``, in place."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def target_margins(model: nn.Module, data: DigitsData) -> Tensor:
    """The model's margin on every target: (n_targets,) float32."""
    with torch.no_grad(), torch_threads(1):
        return margin_from_logits(model(data.x_target), data.y_target)


def half_masks(n: int, num_models: int, seed: int) -> np.ndarray:
    """(num_models, n) bool: the random halves the attribution models are trained on
    (drawn from another seed stream than the ground-truth subsets)."""
    return ft.evaluate.sample_subsets(n, num_models, 0.5, seed=10_000 + seed)


def train_attribution_models(
    data: DigitsData,
    num_models: int,
    seed: int = 0,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> list[dict[str, Tensor]]:
    """State dicts of ``num_models`` MLPs, model m trained on a random half with seed
    ``10_000 + seed * 1_000 + m`` (disjoint from the ground-truth seeds)."""
    masks = half_masks(data.num_train, num_models, seed)
    states = []
    for m in tqdm(range(num_models), desc="train models", unit="model", disable=not progress):
        model = train(data, masks[m], 10_000 + seed * 1_000 + m, config)
        states.append({name: t.detach().clone() for name, t in model.state_dict().items()})
    return states


# ---------------------------------------------------------------------- TRAK and evaluation


def make_trak(
    store: str | Path | None,
    proj_dim: int = DEFAULT_PROJ_DIM,
    ridge: float | None = None,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
    **options: Any,
) -> ft.TRAK:
    """A TRAK object for the demo MLP (featurized in batches of 250 rows); ``options`` are
    further ``ft.TRAK`` keywords (projector, kernel, ...)."""
    kwargs: dict[str, Any] = dict(options) if ridge is None else {**options, "ridge": ridge}
    return ft.TRAK(
        make_model(config),
        task=ft.tasks.ImageClassification(),
        proj_dim=proj_dim,
        store=store,
        batch_size=250,
        vmap_chunk_size=None,
        progress=progress,
        **kwargs,
    )


def ground_truth(
    data: DigitsData,
    num_subsets: int,
    cache_dir: str | Path | None,
    seed: int = 0,
    seeds_per_subset: int = 1,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Retrain on ``num_subsets`` random halves: masks (num_subsets, n_train) bool and
    outputs (num_subsets, n_targets) float64, the target margins (cached in ``cache_dir``).

    One seed per subset by default: averaging two raised the demo's LDS by only 0.008
    (less than its stderr) for 1.75x the retraining time.
    """
    masks = ft.evaluate.sample_subsets(data.num_train, num_subsets, 0.5, seed)

    def margins(mask: np.ndarray, s: int) -> Tensor:
        return target_margins(train(data, mask, s, config), data)

    key = json.dumps(
        {"demo": "digits-mlp", "seed": seed, "targets": data.num_targets, **asdict(config)},
        sort_keys=True,
    )
    return ft.evaluate.retrain(
        margins,
        masks,
        seeds_per_subset=seeds_per_subset,
        cache_dir=cache_dir,
        key=key,
        progress=progress,
    )


def pixel_baselines(data: DigitsData) -> dict[str, np.ndarray]:
    """Trivial attributions, each (n_targets, n_train): cosine similarity of the raw pixels,
    and the same signed +1 when the labels agree and -1 when they differ."""
    train_unit = nn.functional.normalize(data.x_train, dim=1)
    target_unit = nn.functional.normalize(data.x_target, dim=1)
    cosine = (target_unit @ train_unit.T).numpy().astype(np.float64)
    same = (data.y_target[:, None] == data.y_train[None, :]).numpy()
    return {"pixel cosine": cosine, "pixel cosine x label sign": np.where(same, cosine, -cosine)}


# ---------------------------------------------------------------------- the demo


def run_demo(
    out_dir: str | Path = "fasttrak-demo",
    num_models: int = 5,
    num_subsets: int = 100,
    num_targets: int = 300,
    seed: int = 0,
    progress: bool = True,
    proj_dim: int = DEFAULT_PROJ_DIM,
    show: int = 5,
    echo: Callable[[str], None] | None = print,
) -> DemoResult:
    """Train ``num_models`` MLPs on random halves of 1000 digits, attribute ``num_targets``
    test digits with TRAK, evaluate with the LDS over ``num_subsets`` retrained models,
    print a summary table (through ``echo``; None for silence) and draw the top proponents
    and opponents of ``show`` targets.

    Rerunning on the same ``out_dir`` with the same options reuses the store and the cached
    ground truth; other options raise DemoOptionsError (use another ``out_dir``).
    """
    from fasttrak.report import plot_top_attributions

    out = Path(out_dir)
    options = {
        "num_models": num_models,
        "num_subsets": num_subsets,
        "num_targets": num_targets,
        "seed": seed,
        "proj_dim": proj_dim,
        "train": asdict(TrainConfig()),
    }
    _check_options(out, options)
    paths = {
        "store": out / "store",
        "ground_truth": out / "ground_truth",
        "figure": out / "top_attributions.png",
    }
    _drop_old_store(paths["store"], echo)
    seconds: dict[str, float] = {}
    clock = _Clock(seconds)
    data = load_data(num_targets, seed)

    scores, k = attribute(data, num_models, paths["store"], seed, proj_dim, clock, progress)
    dense = np.asarray(scores)
    with clock("ground truth"):
        masks, outputs = ground_truth(
            data, num_subsets, paths["ground_truth"], seed, progress=progress
        )
    with clock("LDS"):
        result = ft.evaluate.lds(dense, masks, outputs)
        baselines = {
            name: ft.evaluate.lds(attribution, masks, outputs)
            for name, attribution in pixel_baselines(data).items()
        }
    with clock("figure"):
        shown = list(range(min(show, data.num_targets)))
        plot_top_attributions(
            data.x_train.reshape(-1, *IMAGE_SHAPE).numpy(),
            data.y_train.numpy(),
            data.x_target[shown].reshape(-1, *IMAGE_SHAPE).numpy(),
            data.y_target[shown].numpy(),
            _subset_topk(scores.topk(5), shown),
            paths["figure"],
        )
    demo = DemoResult(result, baselines, seconds, paths, options)
    demo.table = format_table(demo, k)
    if echo is not None:
        echo(demo.table)
    return demo


def attribute(
    data: DigitsData,
    num_models: int,
    store: str | Path | None,
    seed: int = 0,
    proj_dim: int = DEFAULT_PROJ_DIM,
    clock: _Clock | None = None,
    progress: bool = True,
) -> tuple[ft.Scores, int]:
    """Train the attribution models, featurize the training set and score the targets.

    Returns the scores (n_targets, n_train) and k. Runs on one thread: for this tiny MLP
    extra threads gain little and lose a lot when the cores are shared.
    """
    clock = clock or _Clock({})
    with torch_threads(1):
        with clock("train models"):
            states = train_attribution_models(data, num_models, seed, progress=progress)
        trak = make_trak(store, proj_dim, progress=progress)
        with clock("featurize"):
            trak.featurize((data.x_train, data.y_train), checkpoints=states)
        with clock("score"):
            scores = trak.score((data.x_target, data.y_target))
            scores.numpy()
    return scores, trak.k


def format_table(result: DemoResult, k: int) -> str:
    """The printed summary: LDS rows (TRAK, then the baselines), sizes and stage seconds."""
    opts = result.options
    lines = [
        f"fasttrak demo: MLP on sklearn digits ({NUM_TRAIN} train, {opts['num_targets']} targets)",
        "",
        f"{'attribution':<38}{'LDS':>7}{'stderr':>9}",
        _lds_row(f"TRAK ({opts['num_models']} models, k={k})", result.lds),
    ]
    lines += [_lds_row(f"baseline: {name}", lds) for name, lds in result.baselines.items()]
    lines += [
        "",
        f"targets {opts['num_targets']} | models {opts['num_models']} | "
        f"subsets {opts['num_subsets']} | k {k}",
        "",
        f"{'stage':<16}{'seconds':>9}",
    ]
    lines += [f"{stage:<16}{secs:>9.2f}" for stage, secs in result.seconds.items()]
    lines.append(f"{'total':<16}{sum(result.seconds.values()):>9.2f}")
    return "\n".join(lines)


def _lds_row(name: str, lds: LDSResult) -> str:
    return f"{name:<38}{lds.mean:>7.3f}{lds.stderr:>9.3f}"


def _subset_topk(topk: ft.TopK, rows: list[int]) -> ft.TopK:
    """The TopK of some targets only (each array (len(rows), k))."""
    return ft.TopK(
        topk.proponents[rows],
        topk.proponent_scores[rows],
        topk.opponents[rows],
        topk.opponent_scores[rows],
    )


def _drop_old_store(store: Path, echo: Callable[[str], None] | None) -> None:
    """The demo's store is a cache: one made by an older fasttrak (store format 1, before
    records/run.json) is rebuilt, saying so, rather than refused."""
    if (store / "zarr.json").exists() and not (store / "records" / "run.json").exists():
        if echo is not None:
            echo(f"{store} was made by an older fasttrak (another store format): rebuilding it")
        shutil.rmtree(store)


def _check_options(out: Path, options: dict[str, Any]) -> None:
    """Record the options in ``out/demo.json``, or check them against the recorded ones."""
    path = out / CONFIG_NAME
    if path.exists():
        stored = json.loads(path.read_text())
        diffs = [
            f"{name}: {stored.get(name)!r} there, {value!r} now"
            for name, value in options.items()
            if stored.get(name) != value
        ]
        if diffs:
            raise DemoOptionsError(
                f"{out} holds a demo run with other options ({'; '.join(diffs)}); "
                "choose another output directory or delete it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(options, indent=2) + "\n")


class _Clock:
    """Context manager factory that adds each block's wall time to ``seconds[stage]``."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
