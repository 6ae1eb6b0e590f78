"""Tests for the demo (fasttrak.demo), its figure (fasttrak.report) and the CLI."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fasttrak import demo
from fasttrak.checkpoints import fingerprint
from fasttrak.cli import main

TINY = {"num_models": 2, "num_subsets": 10, "num_targets": 20, "seed": 0}
TINY_CLI = ["--models", "2", "--subsets", "10", "--targets", "20", "--seed", "0", "--no-progress"]
STAGES = ("train models", "featurize", "score", "ground truth", "LDS", "figure")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoResult:
    out = tmp_path_factory.mktemp("demo")
    return demo.run_demo(out, progress=False, echo=None, **TINY)


def test_demo_writes_outputs_and_finite_lds(first_run: demo.DemoResult) -> None:
    for name in ("store", "ground_truth", "figure"):
        assert first_run.paths[name].exists(), name
    assert first_run.paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(first_run.paths["ground_truth"].glob("subset_*.npy"))) == 10
    assert math.isfinite(first_run.lds.mean) and math.isfinite(first_run.lds.stderr)
    assert first_run.lds.per_target.shape == (20,)
    assert set(first_run.baselines) == {"pixel cosine", "pixel cosine x label sign"}
    assert all(math.isfinite(b.mean) for b in first_run.baselines.values())
    assert tuple(first_run.seconds) == STAGES


def test_demo_table_rows(first_run: demo.DemoResult) -> None:
    lines = first_run.table.splitlines()
    k = demo.DEFAULT_PROJ_DIM
    trak_row = next(line for line in lines if line.startswith("TRAK (2 models"))
    assert f"{first_run.lds.mean:.3f}" in trak_row and f"k={k}" in trak_row
    assert any(line.startswith("baseline: pixel cosine ") for line in lines)
    assert any(line.startswith("baseline: pixel cosine x label sign") for line in lines)
    assert f"targets 20 | models 2 | subsets 10 | k {k}" in lines
    for stage in (*STAGES, "total"):
        assert any(line.startswith(stage) for line in lines), stage


def test_rerun_reuses_store_and_ground_truth(
    first_run: demo.DemoResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    train = demo.train

    def counting_train(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return train(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(demo, "train", counting_train)
    out = first_run.paths["store"].parent
    again = demo.run_demo(out, progress=False, echo=None, **TINY)
    assert len(calls) == TINY["num_models"]  # only the attribution models, no retraining
    assert again.seconds["ground truth"] < 1.0
    # deterministic training: same checkpoints, so the store was reused and gives same scores
    assert again.lds.mean == pytest.approx(first_run.lds.mean, abs=1e-6)


def test_rerun_with_other_options_is_refused(first_run: demo.DemoResult) -> None:
    out = first_run.paths["store"].parent
    with pytest.raises(demo.DemoOptionsError, match="num_subsets"):
        demo.run_demo(out, progress=False, echo=None, **{**TINY, "num_subsets": 11})


def test_train_is_deterministic() -> None:
    data = demo.load_data(num_targets=5, seed=0)
    mask = demo.half_masks(data.num_train, 1, seed=0)[0]
    config = demo.TrainConfig(steps=20)
    a = demo.train(data, mask, seed=3, config=config).state_dict()
    b = demo.train(data, mask, seed=3, config=config).state_dict()
    c = demo.train(data, mask, seed=4, config=config).state_dict()
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_cli_demo(first_run: demo.DemoResult) -> None:
    out = first_run.paths["store"].parent
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["demo", "--out", str(out), *TINY_CLI])
    assert result.exit_code == 0, result.output
    assert "TRAK (2 models" in result.output
    assert "baseline: pixel cosine" in result.output
    assert str(Path(out) / "top_attributions.png") in result.output
    assert time.perf_counter() - start < 30


def test_cli_demo_reports_option_mismatch(first_run: demo.DemoResult) -> None:
    out = first_run.paths["store"].parent
    args = ["demo", "--out", str(out), *TINY_CLI[:-3], "--seed", "1", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "other options" in result.output and "seed" in result.output


def test_cli_help_lists_demo() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output


def test_report_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fasttrak import TopK
    from fasttrak.report import plot_top_attributions

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    top = TopK(*(np.zeros((1, 1), dtype=dtype) for dtype in (int, float, int, float)))
    with pytest.raises(ImportError, match=r"pip install fasttrak\[viz\]"):
        plot_top_attributions(
            np.zeros((1, 8, 8)), np.zeros(1), np.zeros((1, 8, 8)), np.zeros(1), top, tmp_path
        )


def test_a_store_of_an_older_fasttrak_is_rebuilt_with_a_message(tmp_path):
    import zarr

    store = tmp_path / "out" / "store"
    zarr.open_group(str(store), mode="w").attrs["fasttrak"] = {"format_version": 1}
    lines = []
    demo._drop_old_store(store, lines.append)
    assert not store.exists() and "older fasttrak" in lines[0]
