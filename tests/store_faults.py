"""A small featurize -> finalize -> score -> save run that can die after any store write.

Used by tests/test_store_crash.py through this script's command line, in a process of its
own that imports torch once and forks a fresh child for every run: ``crash_run`` stops its
process with ``os._exit`` right after its N-th write to the store (every file the store's
file layer or zarr writes, renames or deletes counts); ``resume_run`` runs the pipeline to
the end in another fresh child and saves what it produced, for bitwise comparison.

    python store_faults.py crash-all WORK VARIANT REPORT.json   # every crash point
    python store_faults.py slow WORK DELAY                       # for random kill -9
    python store_faults.py resume WORK OUT.npz                   # finish a killed run
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fasttrak as ft
from fasttrak.checkpoints import fingerprint, load_state
from fasttrak.store import Store
from fasttrak.store import files as store_files

N_TRAIN, CHUNK_ROWS, K, MODELS = 24, 16, 8, 2
CRASH_CODE = 77

STEPS = ("_stage", "_link", "_replace", "_rename", "_unlink", "_rmtree", "_mkdir")


def problem() -> tuple[torch.nn.Module, list[dict], tuple, tuple]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N_TRAIN + 3, 5, generator=gen)
    y = torch.randint(0, 3, (N_TRAIN + 3,), generator=gen)
    states = []
    for seed in range(MODELS):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    return net, states, (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def make_trak(store: Path, model: torch.nn.Module) -> ft.TRAK:
    return ft.TRAK(
        model, proj_dim=K, store=store, chunk_rows=CHUNK_ROWS, batch_size=8, progress=False
    )


def pipeline(work: Path, variant: str = "plain") -> np.ndarray:
    """featurize -> finalize -> score -> save; returns the dense scores.

    ``"overwrite"``: then replace model 1 with other weights (overwrite=True), score again
    and replace the saved scores (overwrite=True). Rerunning it after any crash, or after it
    finished, ends in the same state."""
    torch.set_num_threads(1)
    model, states, train, targets = problem()
    trak = make_trak(work / "store", model)
    replaced = {k: v + 0.5 for k, v in states[1].items()}
    store = trak.store
    if variant == "plain" or store.stored_fingerprint(1) != fingerprint(
        load_state(model, replaced)
    ):
        trak.featurize(train, checkpoints=states)
        trak.finalize()
        scores = trak.score(targets)
        dense = np.asarray(scores)
        scores.save(work / "scores.zarr")
    if variant == "overwrite":
        trak.featurize(train, checkpoints=[replaced], model_ids=[1], overwrite=True)
        scores = trak.score(targets, checkpoints=[states[0], replaced])
        dense = np.asarray(scores)
        scores.save(work / "scores.zarr", overwrite=True)
    return dense


class Counter:
    """Counts store writes; exits the process right after the ``limit``-th one."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.count, self.log = limit, 0, []

    def tick(self, what: str) -> None:
        self.count += 1
        self.log.append(what)
        if self.limit is not None and self.count >= self.limit:
            sys.stdout.flush()
            os._exit(CRASH_CODE)


def install(counter: Counter) -> None:
    """Wrap every physical write step of the store and of zarr's local store."""
    for name in STEPS:
        original = getattr(store_files.DirectoryFiles, name)

        def step(self, *args, _original=original, _name=name, **kwargs):
            new = _name != "_mkdir" or not Path(args[0]).exists()  # a no-op mkdir writes nothing
            result = _original(self, *args, **kwargs)
            if new:
                counter.tick(f"{_name} {args[0] if args else ''}")
            return result

        setattr(store_files.DirectoryFiles, name, step)
    import zarr.storage._local as local

    original_put = local._put

    @functools.wraps(original_put)
    def put(path, value, exclusive=False):
        result = original_put(path, value, exclusive=exclusive)
        counter.tick(f"zarr put {path}")
        return result

    local._put = put
    for name in ("delete", "delete_dir"):
        original_async = getattr(local.LocalStore, name)

        async def deleting(self, key, _original=original_async, _name=name):
            await _original(self, key)
            counter.tick(f"zarr {_name} {key}")

        setattr(local.LocalStore, name, deleting)


def crash_run(work: str, limit: int, variant: str = "plain") -> None:
    """Run the pipeline and die right after its ``limit``-th store write (exit 77); exit 0
    with the number of writes in ``work/writes.json`` if it finishes first."""
    counter = Counter(limit)
    install(counter)
    pipeline(Path(work), variant)
    Path(work, "writes.json").write_text(json.dumps({"count": counter.count, "log": counter.log}))


def resume_run(work: str, out: str, variant: str = "plain") -> None:
    """Finish the pipeline in this fresh process; on a fasttrak error, repair and retry
    (recorded). Saves scores, saved scores, features and Q of every model to ``out``."""
    work_path = Path(work)
    outcome = {"repaired": False, "error": None}
    try:
        dense = pipeline(work_path, variant)
    except ft.FastTrakError as error:
        outcome["error"] = f"{type(error).__name__}: {error}"
        ft.repair_store(work_path / "store")
        outcome["repaired"] = True
        dense = pipeline(work_path, variant)
    store = Store.open_existing(work_path / "store")
    arrays = {"scores": dense, "saved": ft.load_scores(work_path / "scores.zarr")}
    for m in range(MODELS):
        ck = store.model(m)
        arrays[f"features{m}"] = ck.features()
        arrays[f"q{m}"] = ck.q()
    report = ft.verify_store(work_path / "store")
    outcome["verify"] = str(report) if not report.ok else ""
    np.savez(out, **arrays)
    Path(out).with_suffix(".json").write_text(json.dumps(outcome))


def slow_run(work: str, delay: float) -> None:
    """The pipeline on a dataset whose items take ``delay`` seconds (for random kills)."""
    torch.set_num_threads(1)
    model, states, train, targets = problem()

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return N_TRAIN

        def __getitem__(self, i):
            time.sleep(delay)
            return train[0][i], train[1][i]

    trak = make_trak(Path(work) / "store", model)
    trak.featurize(Slow(), checkpoints=states)
    scores = trak.score(targets)
    scores.save(Path(work) / "scores.zarr")


def in_child(function, *args) -> int:
    """Run ``function(*args)`` in a forked child (a fresh process state: nothing of an
    earlier run is in memory); its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            function(*args)
        except BaseException:  # report, then exit with a status the parent can see
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def differences(expected: dict, out: Path) -> list[str]:
    found = dict(np.load(out))
    return [
        name
        for name, a in expected.items()
        if name not in found or not np.array_equal(found[name], a)
    ]


def crash_all(work: str, variant: str, report: str) -> None:
    """Every crash point of the pipeline: crash after write N, resume, compare; for N = 1
    .. the number of writes of an uninterrupted run. Writes a JSON summary to ``report``."""
    root = Path(work)
    reference = root / "reference"
    reference.mkdir(parents=True)
    assert in_child(crash_run, str(reference), 10**9, variant) == 0
    writes = json.loads((reference / "writes.json").read_text())
    assert in_child(resume_run, str(reference), str(reference / "out.npz"), variant) == 0
    outcome = json.loads((reference / "out.json").read_text())
    assert outcome == {"repaired": False, "error": None, "verify": ""}, outcome
    expected = dict(np.load(reference / "out.npz"))
    summary = {"total": writes["count"], "identical": 0, "repaired": 0, "failures": []}
    for n in range(1, writes["count"] + 1):
        crashed = root / f"crash{n}"
        crashed.mkdir()
        what = f"write {n} ({writes['log'][n - 1][:160]})"
        code = in_child(crash_run, str(crashed), n, variant)
        if code != CRASH_CODE:
            summary["failures"].append(f"{what}: the run exited with {code}, not at the write")
            continue
        if in_child(resume_run, str(crashed), str(crashed / "out.npz"), variant) != 0:
            summary["failures"].append(f"{what}: the resumed run failed")
            continue
        outcome = json.loads((crashed / "out.json").read_text())
        wrong = differences(expected, crashed / "out.npz")
        if wrong or outcome["verify"]:
            summary["failures"].append(f"{what}: differs in {wrong} {outcome['verify']}")
        else:
            summary["repaired" if outcome["repaired"] else "identical"] += 1
        shutil.rmtree(crashed)
    summary["log"] = writes["log"]
    Path(report).write_text(json.dumps(summary))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "crash-all":
        crash_all(*arguments)
    elif command == "slow":
        slow_run(arguments[0], float(arguments[1]))
    elif command == "resume":
        resume_run(*arguments)
    else:
        raise SystemExit(f"unknown command {command}")
