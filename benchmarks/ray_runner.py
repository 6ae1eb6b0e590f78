"""The Ray runner against in-process featurize, a simulated cluster, and per-example costs.

Parts (one JSON line per measurement on stdout; ``--only`` picks some):

* ``a`` (small MLP, overhead): a 64 -> 256 -> 10 MLP (p = 19,210) on generated rows, several
  models, k = 512, featurized in this process on ONE torch thread and by
  ``ft.runners.Ray(num_cpus=1)`` on a local Ray with 2 workers (``ray.init(num_cpus=2)``),
  at ``chunk_rows=256`` (few tasks) and ``chunk_rows=16`` (many tasks, one chunk each).
  Reports the seconds of ``ray.init`` and of the first featurize on a cold Ray (worker
  processes start and import torch) apart from the warm runs, checks that every store is
  bit-identical to the in-process one, and the overhead per task::

      overhead_per_task_s = (ray_wall_s * workers - inproc_wall_s) / tasks

  i.e. the worker-seconds a Ray run spends beyond the in-process compute (one thread, so
  its wall time is its CPU time), per task. On a loaded machine this charges other jobs'
  CPU use to Ray too: read ``loadavg``. ``task_loop_s`` runs the same tasks one after
  another in this process (a fresh ``ft.TRAK`` and ``featurize(rows=[c])`` each, no Ray), to
  split the overhead into fasttrak's per-call setup and Ray's share.
* ``b`` (compute bound): a small CNN on 3x32x32 inputs (p = 97,290), k = 2048, one model,
  sized so that featurize takes >= 20 s in this process on one thread: Ray with 2 workers
  against in-process on 1 thread and on 2 torch threads (all stores compared bit for bit
  with the 1-thread one).
* ``c`` (simulated cluster, correctness): Ray with 8 and 16 workers on this machine
  (``ray.init(num_cpus=W)``, one CPU per task: oversubscribed on purpose), chunk_rows=16,
  3 models, hundreds of tasks; then the 16-worker run again while a thread SIGKILLs worker
  processes that are running a featurize task (descendants of this process whose title is
  ``ray::_featurize_task``), 0.5 s apart, from when 10% of the chunks are done. Each store
  must be bit-identical to the in-process one, ``ft.verify_store(path).ok``, every model with
  exactly one done mark per chunk, and nothing left in ``records/staging``.
* ``plan`` (per-example costs for docs/scale.md): ResNet-18 and ResNet-50 (torchvision's
  shapes, defined here: 11.7M and 25.6M parameters, 1000 classes) on random images at a
  few resolutions: per-example seconds of ``trak.features`` at k = 4096 with the default
  projector and engine, and of a plain training forward + backward (cross-entropy, train
  mode) of the same batches, in the same process on one thread, and their ratio. Then, on
  a 2,762-parameter MLP with k = 4096 float16 features: the seconds of ``finalize`` (the
  k x k gram), of one streamed pass of the scores product and of ``self_influence`` per
  training row, to scale the kernel and scoring stages.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_runner.py --quick   # ~2.5 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_runner.py           # ~10-20 min

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_runner.py --only c --workers 8 16

JSON lines go to stdout; Ray's own messages (a worker died, a task is retried) to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import fasttrak as ft

ROOT = Path(__file__).resolve().parents[1]
JSON_OUT = sys.stdout


# ---------------------------------------------------------------------- reporting
def environment() -> dict[str, Any]:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "fasttrak"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        )
    except OSError:
        rev, dirty = "?", None
    import ray

    return {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "git": rev,
        "fasttrak_dirty": dirty,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def emit(part: str, **fields: Any) -> None:
    record = {"bench": "ray_runner", "part": part, "loadavg": list(os.getloadavg()), **fields}
    print(json.dumps(record, default=_plain), file=JSON_OUT, flush=True)


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


class threads:
    """``with threads(n):`` torch runs on n threads inside."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.before)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


# ---------------------------------------------------------------------- models, data
def mlp(d_in: int, hidden: int, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 10),
    )


def states(make: Callable[[], nn.Module], count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` checkpoints: fresh initialisations from seeds 1, 2, ..."""
    out = []
    for seed in range(1, count + 1):
        torch.manual_seed(seed)
        out.append({k: v.detach().clone() for k, v in make().state_dict().items()})
    return out


def rows(n: int, shape: tuple[int, ...], classes: int = 10, seed: int = 0) -> tuple:
    """Generated (x, y): x ~ N(0, 1), y from a random linear teacher of x."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen)
    teacher = torch.randn(int(np.prod(shape)), classes, generator=gen)
    y = (x.reshape(n, -1) @ teacher).argmax(1)
    return x, y


# ---------------------------------------------------------------------- stores
def same_store(a: Path, b: Path, ids: list[int]) -> bool:
    """Features and Q of every model bit-identical in the stores at a and b."""
    from fasttrak.store import Store

    sa, sb = Store.open_existing(a), Store.open_existing(b)
    for m in ids:
        for name in ("features", "q"):
            x = getattr(sa.model(m), name)()
            y = getattr(sb.model(m), name)()
            if x.dtype != y.dtype or not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
                return False
    return True


def done_marks(path: Path, m: int) -> int:
    folder = path / "records" / "checkpoints" / str(m) / "done"
    return sum(1 for p in folder.iterdir() if p.suffix == ".json") if folder.exists() else 0


def staging_left(path: Path) -> list[str]:
    folder = path / "records" / "staging"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def check_store(path: Path, ids: list[int], reference: Path) -> dict[str, Any]:
    """The correctness checks of part c for one store."""
    report = ft.verify_store(path)
    _, done = ft.store_info(path)
    chunks = done.models[0].total if done.models else 0
    marks = {m: done_marks(path, m) for m in ids}
    return {
        "bit_identical": same_store(path, reference, ids),
        "verify_ok": report.ok,
        "verify_problems": [str(p) for p in report.problems][:5],
        "chunks_per_model": chunks,
        "done_marks": marks,
        "one_mark_per_chunk": all(v == chunks for v in marks.values()),
        "staging_left": staging_left(path),
        "complete": done.complete,
    }


# ---------------------------------------------------------------------- Ray
def ray_init(workers: int) -> float:
    """Start a local Ray with ``workers`` CPUs; returns the seconds of ``ray.init``."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    seconds, _ = timed(lambda: ray.init(**ray_options(workers)))
    return seconds


def ray_options(workers: int) -> dict[str, Any]:
    """What ``ft.runners.Ray(init=...)`` would pass (ray.init is called here, to time it)."""
    return {
        "num_cpus": workers,
        "include_dashboard": False,
        "log_to_driver": False,
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}},
    }


def featurize(
    store: Path,
    make: Callable[[], nn.Module],
    data: Any,
    checkpoints: list,
    chunk_rows: int,
    proj_dim: int,
    batch_size: int,
    runner: Any = None,
) -> float:
    """Seconds of one featurize of every checkpoint into a fresh store at ``store``."""
    shutil.rmtree(store, ignore_errors=True)
    torch.manual_seed(0)
    trak = ft.TRAK(
        make(),
        proj_dim=proj_dim,
        store=store,
        chunk_rows=chunk_rows,
        batch_size=batch_size,
        progress=False,
    )
    seconds, _ = timed(lambda: trak.featurize(data, checkpoints=checkpoints, runner=runner))
    return seconds


# ---------------------------------------------------------------------- part a
def task_loop(
    store: Path,
    make: Callable[[], nn.Module],
    data: Any,
    checkpoints: list,
    chunk_rows: int,
    proj_dim: int,
    batch_size: int,
) -> float:
    """Seconds of the Ray tasks' own work run one after another in this process: per
    (model, chunk), a fresh ``TRAK`` from the same options and a featurize of that chunk
    with ``check_data="sample"``, as each task does (public API; no Ray)."""
    shutil.rmtree(store, ignore_errors=True)
    torch.manual_seed(0)
    options = dict(proj_dim=proj_dim, store=store, chunk_rows=chunk_rows, batch_size=batch_size)
    n = len(data[0])
    start = time.perf_counter()
    for m, ckpt in enumerate(checkpoints):
        for c in range(-(-n // chunk_rows)):
            trak = ft.TRAK(make(), progress=False, **options)
            trak.featurize(data, checkpoints=[ckpt], model_ids=[m], rows=[c], check_data="sample")
    return time.perf_counter() - start


def part_a(args: argparse.Namespace, work: Path) -> None:
    n, models = (1024, 2) if args.quick else (4096, 4)

    def make() -> nn.Module:
        return mlp(64, 256)

    data = rows(n, (64,))
    ckpts = states(make, models)
    runner = ft.runners.Ray(num_cpus=1, chunks_per_task=1, init=ray_options(2))
    results: dict[int, dict[str, Any]] = {}
    for chunk_rows in (256, 16):
        with threads(1):
            inproc = featurize(
                work / f"a-inproc-{chunk_rows}", make, data, ckpts, chunk_rows, 512, 64
            )
        results[chunk_rows] = {"inproc_wall_s": inproc}
        with threads(1):
            loop = task_loop(work / f"a-loop-{chunk_rows}", make, data, ckpts, chunk_rows, 512, 64)
        results[chunk_rows]["task_loop_s"] = loop
    init_s = ray_init(2)
    cold = featurize(work / "a-cold", make, data, ckpts, 256, 512, 64, runner)
    for chunk_rows in (256, 16):
        best = min(
            featurize(work / f"a-ray-{chunk_rows}", make, data, ckpts, chunk_rows, 512, 64, runner)
            for _ in range(args.repeat)
        )
        tasks = models * -(-n // chunk_rows)
        inproc = results[chunk_rows]["inproc_wall_s"]
        loop = results[chunk_rows]["task_loop_s"]
        emit(
            "a_small_mlp",
            model="mlp 64-256-10",
            p=64 * 256 + 256 + 256 * 10 + 10,
            k=512,
            rows=n,
            models=models,
            chunk_rows=chunk_rows,
            batch_size=64,
            tasks=tasks,
            workers=2,
            inproc_threads=1,
            inproc_wall_s=round(inproc, 3),
            ray_wall_s=round(best, 3),
            ray_over_inproc=round(best / inproc, 3),
            overhead_per_task_s=round((best * 2 - inproc) / tasks, 4),
            task_loop_s=round(loop, 3),
            setup_per_task_s=round((loop - inproc) / tasks, 4),
            ray_only_per_task_s=round((best * 2 - loop) / tasks, 4),
            ray_init_s=round(init_s, 3),
            ray_cold_first_featurize_s=round(cold, 3) if chunk_rows == 256 else None,
            bit_identical=same_store(
                work / f"a-ray-{chunk_rows}", work / f"a-inproc-{chunk_rows}", list(range(models))
            ),
            cold_bit_identical=(
                same_store(work / "a-cold", work / "a-inproc-256", list(range(models)))
                if chunk_rows == 256
                else None
            ),
        )


# ---------------------------------------------------------------------- part b
def part_b(args: argparse.Namespace, work: Path) -> None:
    n = 512 if args.quick else args.cnn_rows
    data = rows(n, (3, 32, 32))
    ckpts = states(cnn, 1)
    chunk_rows, k, batch = (64 if args.quick else 128), 2048, 32
    runner = ft.runners.Ray(num_cpus=1, chunks_per_task=1, init=ray_options(2))
    with threads(1):
        one = featurize(work / "b-inproc1", cnn, data, ckpts, chunk_rows, k, batch)
    with threads(2):
        two = featurize(work / "b-inproc2", cnn, data, ckpts, chunk_rows, k, batch)
    init_s = ray_init(2)
    warm = featurize(
        work / "b-warm", cnn, rows(2 * chunk_rows, (3, 32, 32)), ckpts, chunk_rows, k, batch, runner
    )
    ray_s = featurize(work / "b-ray", cnn, data, ckpts, chunk_rows, k, batch, runner)
    emit(
        "b_compute",
        model="cnn 3x32x32 conv32-conv64-pool-conv64-pool-fc",
        p=sum(v.numel() for v in ckpts[0].values()),
        k=k,
        rows=n,
        chunk_rows=chunk_rows,
        batch_size=batch,
        tasks=-(-n // chunk_rows),
        inproc_1thread_s=round(one, 2),
        inproc_2threads_s=round(two, 2),
        ray_2workers_s=round(ray_s, 2),
        speedup_vs_1thread=round(one / ray_s, 3),
        speedup_vs_2threads=round(two / ray_s, 3),
        ray_init_s=round(init_s, 2),
        ray_warmup_s=round(warm, 2),
        bit_identical_ray_vs_1thread=same_store(work / "b-ray", work / "b-inproc1", [0]),
        bit_identical_2threads_vs_1thread=same_store(work / "b-inproc2", work / "b-inproc1", [0]),
    )


# ---------------------------------------------------------------------- part c
def featurize_tasks(me: Any) -> list[Any]:
    """Worker processes (descendants of this process) running ``_featurize_task``."""
    import psutil

    out = []
    for proc in me.children(recursive=True):
        try:
            if "ray::_featurize_task" in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.Error:
            continue
    return out


def killer(
    store: Path, ids: list[int], total: int, count: int, killed: list, stop: threading.Event
) -> None:
    """Once 10% of the chunks are done, SIGKILL ``count`` task workers, 0.5 s apart."""
    import psutil

    me = psutil.Process()
    while not stop.is_set() and sum(done_marks(store, m) for m in ids) < 0.1 * total:
        time.sleep(0.02)
    while not stop.is_set() and len(killed) < count:
        victims = featurize_tasks(me)
        if not victims:
            time.sleep(0.02)
            continue
        victim = victims[0]
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        done = sum(done_marks(store, m) for m in ids)
        killed.append({"pid": victim.pid, "done_fraction": round(done / total, 3)})
        time.sleep(0.5)


def part_c(args: argparse.Namespace, work: Path) -> None:
    n, models, chunk_rows = (512, 2, 16) if args.quick else (2048, 3, 16)
    ids = list(range(models))

    def make() -> nn.Module:
        return mlp(32, 64)

    data = rows(n, (32,))
    ckpts = states(make, models)
    reference = work / "c-inproc"
    with threads(1):
        inproc = featurize(reference, make, data, ckpts, chunk_rows, 256, 16)
    total = models * -(-n // chunk_rows)
    workers_list = sorted({min(w, 8) for w in args.workers} if args.quick else set(args.workers))
    for workers in workers_list:
        runner = ft.runners.Ray(num_cpus=1, chunks_per_task=1, max_retries=3)
        init_s = ray_init(workers)
        # Start the workers (each imports torch and fasttrak) before the timed runs.
        warm_rows = rows(4 * workers * chunk_rows, (32,))
        warm_s = featurize(work / "c-warm", make, warm_rows, ckpts[:1], chunk_rows, 256, 16, runner)
        for kill in (False, True) if workers == max(workers_list) else (False,):
            store = work / f"c-ray{workers}{'-kill' if kill else ''}"
            killed: list = []
            stop = threading.Event()
            thread = None
            if kill:
                shutil.rmtree(store, ignore_errors=True)
                thread = threading.Thread(
                    target=killer, args=(store, ids, total, args.kills, killed, stop)
                )
                thread.start()
            error = None
            try:
                seconds = featurize(store, make, data, ckpts, chunk_rows, 256, 16, runner)
            except Exception as failure:  # reported, not raised: the JSON line says so
                seconds, error = float("nan"), f"{type(failure).__name__}: {failure}"
            stop.set()
            if thread is not None:
                thread.join()
            checks = check_store(store, ids, reference) if error is None else {}
            emit(
                "c_cluster_kill" if kill else "c_cluster",
                workers=workers,
                ray_num_cpus=workers,
                task_num_cpus=1,
                rows=n,
                models=models,
                chunk_rows=chunk_rows,
                tasks=total,
                inproc_wall_s=round(inproc, 2),
                ray_wall_s=round(seconds, 2),
                ray_init_s=round(init_s, 2),
                ray_warmup_s=round(warm_s, 2),
                killed=killed if kill else None,
                error=error,
                **checks,
            )


# ---------------------------------------------------------------------- plan
class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        out = width
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.down = _down(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.down = _down(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def _down(cin: int, out: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == out:
        return None
    return nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))


def resnet(depth: int, classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18 / ResNet-50 layer shapes (11,689,512 / 25,557,032 params)."""
    block, counts = {18: (Basic, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}[depth]
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
        for i in range(count):
            layers.append(block(cin, width, 2 if i == 0 and stage > 0 else 1))
            cin = width * block.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    torch.manual_seed(0)
    return nn.Sequential(*layers)


def _r(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def per_example(depth: int, res: int, batch: int, repeats: int, device: str) -> dict[str, Any]:
    """Per-example seconds of trak.features (k = 4096, default projector and engine) and of
    a training forward + backward on the same batches; then one more features call under
    torch.profiler for the split into the library's stage labels."""
    from torch.profiler import ProfilerActivity, profile

    model = resnet(depth)
    p = sum(t.numel() for t in model.parameters())
    x, y = rows(batch * repeats, (3, res, res), classes=1000)
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    trak = ft.TRAK(
        model, proj_dim=4096, store=None, device=device, batch_size=batch, progress=False
    )

    def features(count: int) -> float:
        sync(device)
        seconds, _ = timed(lambda: trak.features((x[:count], y[:count]), ckpt))
        sync(device)
        return seconds

    train = resnet(depth).to(device)
    train.load_state_dict(ckpt)
    train.train()
    xd, yd = x.to(device), y.to(device)

    def step(i: int) -> None:
        part = slice(i * batch, (i + 1) * batch)
        train.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(train(xd[part]), yd[part]).backward()

    def fwd_bwd() -> float:
        sync(device)
        seconds, _ = timed(lambda: [step(i) for i in range(repeats)])
        sync(device)
        return seconds

    first = features(batch)  # builds the projector
    step(0)  # warm up
    # Interleaved, best of 2 each: the machine's load moves between the two measurements.
    ones, manys, backprops = [], [], []
    for _ in range(2):
        ones.append(features(batch))
        manys.append(features(batch * repeats))
        backprops.append(fwd_bwd())
    featurize = (min(manys) - min(ones)) / ((repeats - 1) * batch)
    backprop = min(backprops) / (repeats * batch)
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        profiled = features(batch * repeats)
    events = {event.key: event for event in prof.key_averages()}
    stages = {}
    for name in ("gradients", "project"):
        event = events.get(f"fasttrak.{name}")
        total = event.cpu_time_total / 1e6 if event is not None else float("nan")
        stages[f"{name}_s_per_example"] = round(total / (batch * repeats), 4)
    return {
        "model": f"resnet{depth}",
        "p": p,
        "res": res,
        "batch": batch,
        "examples_timed": (repeats - 1) * batch,
        "k": 4096,
        "projector": type(trak.projector_config).__name__,
        "engine": trak.engine,
        "device": device,
        "first_call_s": round(first, 2),
        "features_calls_s": {"one_batch": _r(ones), "all": _r(manys)},
        "fwd_bwd_calls_s": _r(backprops),
        "featurize_s_per_example": round(featurize, 4),
        "fwd_bwd_s_per_example": round(backprop, 4),
        "ratio_featurize_over_fwd_bwd": round(featurize / backprop, 2),
        "profiled_call_s_per_example": round(profiled / (batch * repeats), 4),
        **stages,
    }


def kernel_and_scores(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Per-row seconds of finalize, the streamed scores product and self_influence at
    k = 4096, float16 features (the model is tiny: these stages do not depend on it)."""
    n, targets, k = (2048, 128, 4096) if args.quick else (8192, 256, 4096)

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))

    data, target_rows = rows(n, (32,)), rows(targets, (32,), seed=1)
    ckpts = states(make, 1)
    store = work / "plan-store"
    shutil.rmtree(store, ignore_errors=True)
    trak = ft.TRAK(
        make(),
        proj_dim=k,
        store=store,
        chunk_rows=512,
        feature_dtype="float16",
        progress=False,
    )
    feat, _ = timed(lambda: trak.featurize(data, checkpoints=ckpts))
    fin, _ = timed(lambda: trak.finalize())
    setup, scores = timed(lambda: trak.score(target_rows))

    def stream() -> None:
        for _ in scores.chunks():
            pass

    product, _ = timed(stream)
    top, _ = timed(lambda: scores.topk(100))
    influence, _ = timed(lambda: trak.self_influence())
    blocks = trak.estimator.resolved(trak.store.model(0)).blocks
    return {
        "n": n,
        "k": k,
        "kernel_blocks": blocks,
        "targets": targets,
        "feature_dtype": "float16",
        "store_feature_bytes_per_row": 2 * k,
        "featurize_s": round(feat, 3),
        "finalize_s": round(fin, 3),
        "finalize_s_per_row": float(f"{fin / n:.3g}"),
        "gram_gflops": round(2 * n * k * k / fin / 1e9, 2),
        "score_setup_s": round(setup, 3),
        "score_stream_s": round(product, 3),
        "score_stream_gflops": round(2 * n * k * targets / product / 1e9, 2),
        "topk100_s": round(top, 3),
        "self_influence_s": round(influence, 3),
        "self_influence_s_per_row": float(f"{influence / n:.3g}"),
    }


def part_plan(args: argparse.Namespace, work: Path) -> None:
    configs = (
        [(18, 32, 8, 3)]
        if args.quick
        else [(18, 64, 16, 3), (50, 64, 16, 3), (50, 128, 8, 3), (50, 224, 8, 3)]
    )
    with threads(1):
        for depth, res, batch, repeats in configs:
            emit(
                "plan_per_example",
                threads=1,
                **per_example(depth, res, batch, repeats, args.device),
            )
        emit("plan_kernel_scores", threads=1, **kernel_and_scores(args, work))


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~3 min smoke run")
    parser.add_argument("--only", nargs="+", choices=("a", "b", "c", "plan"), default=None)
    parser.add_argument("--workers", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--kills", type=int, default=3, help="workers SIGKILLed in part c")
    parser.add_argument("--repeat", type=int, default=1, help="warm Ray runs in part a (best)")
    parser.add_argument("--cnn-rows", type=int, default=4096, help="rows of part b")
    parser.add_argument(
        "--device", default="cpu", help="device of the plan part (cuda: untested here)"
    )
    parser.add_argument("--out", type=Path, default=None, help="keep the stores here")
    args = parser.parse_args()
    # Ray prints its raylet messages (a worker died, a task is retried) to sys.stdout: send
    # them to stderr, so that stdout holds only the JSON lines.
    sys.stdout = sys.stderr
    emit("environment", quick=args.quick, **environment())
    work = args.out or Path(tempfile.mkdtemp(prefix="ray_runner-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = {"a": part_a, "b": part_b, "c": part_c, "plan": part_plan}
    try:
        for name in args.only or ("a", "b", "c", "plan"):
            parts[name](args, work)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
