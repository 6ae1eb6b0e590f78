"""Every script in examples/ runs with --quick, in its own process, and prints its result.

Each example trains (briefly) a tiny model, featurizes with ft.TRAK, scores a few targets
and ends with a sanity line ("top proponent ... for h/n targets") and "done in ... s".
Scripts that need transformers/peft are skipped when those are missing. Each example costs
~8-20 s on 2 CPU cores (much of it importing torch and transformers); all of them run in the
default suite (about 1 min together).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SANITY = re.compile(r"top proponent .* for (\d+)/(\d+) targets")


def run_example(script: str, *args: str) -> str:
    """Run ``examples/<script> --quick *args``; return its output (fails on a non-zero exit)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=EXAMPLES.parent,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{script} exited with {done.returncode}:\n{output[-4000:]}"
    assert "done in" in done.stdout, output[-4000:]
    return done.stdout


def sanity(output: str) -> tuple[int, int]:
    """(hits, targets) from the example's sanity line."""
    match = SANITY.search(output)
    assert match, f"no sanity line in:\n{output[-2000:]}"
    return int(match.group(1)), int(match.group(2))


def test_image_classification(tmp_path):
    pytest.importorskip("sklearn")
    output = run_example("image_classification.py", "--store", str(tmp_path / "store"))
    assert "featurizing: p = " in output and "target 0 (label" in output
    hits, total = sanity(output)
    assert total == 8 and hits >= total // 2  # 8/8 when written
    assert (tmp_path / "store" / "zarr.json").exists()


def test_text_classification():
    pytest.importorskip("transformers")
    output = run_example("text_classification.py")
    assert "(hooks engine)" in output
    hits, total = sanity(output)
    assert total == 6 and hits >= total // 2  # 6/6 when written


def test_clip():
    pytest.importorskip("transformers")
    output = run_example("clip.py")
    assert "32 negatives per checkpoint" in output
    hits, total = sanity(output)
    assert total == 4 and hits >= total // 2  # 4/4 when written


@pytest.mark.parametrize("projector", ["srht", "factored"])
def test_language_model(projector):
    pytest.importorskip("transformers")
    output = run_example("language_model.py", "--projector", projector)
    assert f"({projector})" in output
    if projector == "factored":  # Conv1D layers only: no tied wte, no wpe, no LayerNorm
        p, total = map(int, re.search(r"p = (\d+) of (\d+) parameters", output).groups())
        assert p < total
    hits, total = sanity(output)
    assert total == 4 and hits >= total // 2  # 4/4 when written


def test_seq2seq():
    pytest.importorskip("transformers")
    output = run_example("seq2seq.py")
    hits, total = sanity(output)
    assert total == 4 and hits >= total // 2  # 4/4 when written


def test_lora():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    output = run_example("lora.py")
    p, total = map(int, re.search(r"p_selected = (\d+) of (\d+) parameters", output).groups())
    assert 0 < p < total / 4  # only the adapters are differentiated
    hits, n = sanity(output)
    assert n == 4 and hits >= n // 2  # 4/4 when written
