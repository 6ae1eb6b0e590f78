"""Crash consistency: a run killed right after any one of its store writes, or by kill -9 at
random moments, resumes to the same bits as an uninterrupted run, or to a clear error that
``fasttrak repair`` fixes; never to silently wrong scores."""

from __future__ import annotations

import json
import multiprocessing
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import store_faults

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ctx():
    """Fresh processes forked from a server that has imported torch and fasttrak once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["store_faults"])
    return context


def run(ctx, target, *args, timeout=120) -> int:
    process = ctx.Process(target=target, args=args)
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        raise AssertionError(f"{target.__name__}{args} hung")
    return process.exitcode


def reference(ctx, tmp_path: Path, variant: str = "plain") -> tuple[int, list[str], dict]:
    work = tmp_path / "reference"
    work.mkdir()
    assert run(ctx, store_faults.crash_run, str(work), 10**9, variant) == 0
    writes = json.loads((work / "writes.json").read_text())
    assert run(ctx, store_faults.resume_run, str(work), str(work / "out.npz"), variant) == 0
    outcome = json.loads((work / "out.json").read_text())
    assert outcome == {"repaired": False, "error": None, "verify": ""}
    return writes["count"], writes["log"], dict(np.load(work / "out.npz"))


def differences(expected: dict, out: Path) -> list[str]:
    found = dict(np.load(out))
    return [
        name
        for name, array in expected.items()
        if name not in found or not np.array_equal(found[name], array)
    ]


@pytest.mark.parametrize("variant", ["plain", "overwrite"])
def test_a_crash_after_any_store_write_resumes_to_the_same_bits(ctx, tmp_path, variant):
    """Every write of featurize -> finalize -> score -> save (and, in the "overwrite"
    variant, of replacing a model's weights and the saved scores) is a crash point."""
    total, log, expected = reference(ctx, tmp_path, variant)
    assert total > 60, log  # every kind of write is in the run: records, chunks, kernels, save
    identical, repaired, failures = 0, 0, []
    for n in range(1, total + 1):
        work = tmp_path / f"crash{n}"
        work.mkdir()
        code = run(ctx, store_faults.crash_run, str(work), n, variant)
        assert code == store_faults.CRASH_CODE
        if run(ctx, store_faults.resume_run, str(work), str(work / "out.npz"), variant) != 0:
            failures.append(f"write {n} ({log[n - 1]}): the resumed run failed")
            continue
        outcome = json.loads((work / "out.json").read_text())
        wrong = differences(expected, work / "out.npz")
        if wrong or outcome["verify"]:
            failures.append(f"write {n} ({log[n - 1]}): differs in {wrong} {outcome['verify']}")
        elif outcome["repaired"]:
            repaired += 1
        else:
            identical += 1
    print(
        f"{variant}: {identical} crash points resumed identically, {repaired} repaired, of {total}"
    )
    assert not failures, "\n".join(failures)
    # Crashes never need a repair: every write is atomic and ordered.
    assert identical == total


def test_repeated_kill_9_resumes_to_the_same_bits(ctx, tmp_path):
    _, _, expected = reference(ctx, tmp_path)
    work = tmp_path / "killed"
    work.mkdir()
    rng = random.Random(0)
    kills = 0
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, str(HERE / "store_faults.py"), str(work), "0.02"], cwd=HERE
        )
        time.sleep(rng.uniform(1.0, 4.0))  # import takes ~1-2 s; a run ~2-3 s more
        if child.poll() is None:
            child.kill()
            kills += 1
        child.wait()
    assert kills >= 3
    assert run(ctx, store_faults.resume_run, str(work), str(work / "out.npz")) == 0
    outcome = json.loads((work / "out.json").read_text())
    assert not outcome["repaired"] and not outcome["verify"], outcome
    assert differences(expected, work / "out.npz") == []
