"""Run parallel_job.py as separate processes, several at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_jobs(*jobs: list[str], expect: int = 0, timeout: float = 120) -> None:
    """Start every job (arguments of parallel_job.py) at once; each must exit with ``expect``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "parallel_job.py"), *map(str, job)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for job in jobs
    ]
    for job, proc in zip(jobs, procs, strict=True):
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == expect, f"job {job} exited {proc.returncode}:\n{out}"
