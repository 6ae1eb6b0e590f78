"""The ``fasttrak`` command line on whole runs driven by a TOML config (docs/cli.md).

An example project is written to a temporary folder: a module of factories (a small MLP on
random data, a retraining function) and two checkpoints saved with torch.save. The commands
run in-process through click's CliRunner, and once as a real subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fasttrak as ft
from fasttrak.cli import main
from fasttrak.store.core import Store

ROOT = Path(__file__).resolve().parents[1]
MODULE = "ftcli_project"  # a name no other test imports

FACTORIES = """
import numpy as np
import torch
from torch import nn


def make_mlp(d_in=5, hidden=8, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def train_set():
    return _data(60, 0)


def test_set():
    return _data(6, 1)


def float_labels():
    x, y = _data(60, 0)
    return x, y.float()


def retrain(mask, seed, steps=30):
    x, y = train_set()
    xt, yt = test_set()
    torch.manual_seed(seed)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    keep = torch.as_tensor(np.asarray(mask, dtype=bool))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[keep]), y[keep]).backward()
        opt.step()
    with torch.no_grad():
        logits = model(xt)
    correct = logits.gather(1, yt[:, None])[:, 0]
    others = logits.scatter(1, yt[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)
"""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """A TOML file: top-level scalars (and inline tables for non-section dicts), then the
    sections trak, score, report, evaluate, model_args."""
    sections = ("trak", "score", "report", "evaluate", "model_args")
    lines = [f"{k} = {toml_value(v)}" for k, v in config.items() if k not in sections]
    for name in sections:
        if name in config:
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in config[name].items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def base_config(store: str = "runs/s") -> dict[str, Any]:
    return {
        "store": store,
        "model": f"{MODULE}:make_mlp",
        "train": f"{MODULE}:train_set",
        "targets": f"{MODULE}:test_set",
        "checkpoints": ["ckpts/m*.pt"],
        "task": "image_classification",
        "trak": {"proj_dim": 16, "chunk_rows": 16, "batch_size": 16},
        "score": {"topk": 3},
        "evaluate": {"train_fn": f"{MODULE}:retrain", "subsets": 10, "cache": "lds_cache"},
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    (root / f"{MODULE}.py").write_text(FACTORIES)
    (root / "ckpts").mkdir()
    sys.path.insert(0, str(root))
    module = __import__(MODULE)
    for m in range(2):
        model = module.make_mlp()
        torch.manual_seed(100 + m)
        for p in model.parameters():
            p.data.add_(0.3 * torch.randn_like(p))
        torch.save(model.state_dict(), root / "ckpts" / f"m{m}.pt")
    yield root
    sys.path.remove(str(root))
    sys.modules.pop(MODULE, None)


def cli(*args: str | Path) -> Any:
    result = CliRunner().invoke(main, ["--no-progress", *map(str, args)])
    return result


def features(store: Path, m: int) -> np.ndarray:
    return np.asarray(Store.open_existing(store).model(m).features())


def test_whole_run_featurize_info_score_evaluate_verify(project: Path) -> None:
    config = write_config(project / "run.toml", base_config("runs/whole"))
    store = project / "runs" / "whole"

    result = cli("featurize", "-c", config)
    assert result.exit_code == 0, result.output
    assert "model 0: 4/4 chunks (complete)" in result.output
    assert "model 1: 4/4 chunks (complete)" in result.output

    result = cli("info", "-c", config)
    assert result.exit_code == 0, result.output
    assert "num_train       60" in result.output
    assert cli("info", store).exit_code == 0

    result = cli("score", "-c", config, "--save", project / "scores.zarr")
    assert result.exit_code == 0, result.output
    top = json.loads((project / "topk.json").read_text())
    assert (top["k"], top["n_train"], top["n_targets"], top["model_ids"]) == (3, 60, 6, [0, 1])
    assert len(top["targets"]) == 6 and len(top["targets"][0]["proponents"]) == 3

    # the CLI computes what the API computes
    module = __import__(MODULE)
    trak = ft.TRAK(module.make_mlp(), proj_dim=16, batch_size=16, progress=False)
    ckpts = [project / "ckpts" / f"m{m}.pt" for m in range(2)]
    trak.featurize(module.train_set(), checkpoints=ckpts)
    expected = trak.score(module.test_set())
    saved = ft.load_scores(project / "scores.zarr")
    np.testing.assert_allclose(saved, np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert top["targets"][2]["proponents"] == expected.topk(3).proponents[2].tolist()

    result = cli("score", "-c", config, "--out", project / "top.csv", "--model-ids", "1")
    assert result.exit_code == 0, result.output
    rows = (project / "top.csv").read_text().splitlines()
    assert rows[0] == "target,kind,rank,train_index,score" and len(rows) == 1 + 6 * 2 * 3

    result = cli("evaluate", "-c", config)
    assert result.exit_code == 0, result.output
    assert "LDS" in result.output and "10 subsets" in result.output
    lds = json.loads((project / "lds.json").read_text())
    assert lds["subsets"] == 10 and lds["num_targets"] == 6 and -1 <= lds["lds"] <= 1
    assert len(list((project / "lds_cache" / "10").glob("subset_*.npy"))) == 10

    result = cli("verify", "-c", config)
    assert result.exit_code == 0, result.output
    assert cli("verify", project / "scores.zarr").exit_code == 0


def test_sharded_featurize_equals_one_call_and_scoring_waits_for_it(project: Path) -> None:
    one = write_config(project / "one.toml", base_config("runs/one"))
    sharded = write_config(project / "sharded.toml", base_config("runs/sharded"))

    missing = cli("score", "-c", sharded)
    assert missing.exit_code == 3, missing.output
    assert "no store" in missing.output and "fasttrak featurize" in missing.output

    assert cli("featurize", "-c", sharded, "--shard", "0/2").exit_code == 0
    info = cli("info", "-c", sharded)
    assert info.exit_code == 1 and "missing chunks 2-3" in info.output

    result = cli("score", "-c", sharded)
    assert result.exit_code == 3, result.output
    assert "model 0: 2/4 chunks (missing chunks 2-3)" in result.output
    assert "model 1: 2/4 chunks (missing chunks 2-3)" in result.output
    assert "fasttrak featurize -c" in result.output

    assert cli("featurize", "-c", sharded, "--shard", "1/2").exit_code == 0
    assert cli("featurize", "-c", one).exit_code == 0
    for m in range(2):
        a, b = features(project / "runs" / "one", m), features(project / "runs" / "sharded", m)
        assert a.shape == (60, 16) and a.tobytes() == b.tobytes()
    assert cli("info", "-c", sharded).exit_code == 0

    # one model at a time, as one job per model would
    per_model = write_config(project / "per_model.toml", base_config("runs/per_model"))
    assert cli("featurize", "-c", per_model, "--model-ids", "1").exit_code == 0
    result = cli("score", "-c", per_model)
    assert result.exit_code == 3 and "model 0: not featurized" in result.output
    assert features(project / "runs" / "per_model", 1).tobytes() == b.tobytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stroe": "runs/x"}, "unknown key 'stroe' (did you mean 'store'?); valid keys: store"),
        ({"trak": {"proj_dims": 16}}, "unknown key 'proj_dims' (did you mean 'proj_dim'?)"),
        ({"trak": {"proj_dim": "16"}}, "proj_dim must be an integer, got '16' (a string)"),
        ({"score": {"topk": 3, "k": 2}}, "[score]: unknown key 'k'; valid keys: topk, out"),
        ({"model": "no_such_module:make"}, "cannot import module 'no_such_module'"),
        ({"model": f"{MODULE}:make_cnn"}, f"module '{MODULE}' has no attribute 'make_cnn'"),
        ({"model": "make_mlp"}, 'is not an import path; write "module.path:name"'),
        ({"checkpoints": ["ckpts/missing.pt"]}, "checkpoint 'ckpts/missing.pt' does not exist"),
        ({"checkpoints": ["ckpts/x*.pt"]}, "glob 'ckpts/x*.pt' matches no file"),
        ({"checkpoints": {"a": "ckpts/m0.pt"}}, "checkpoints table keys are model ids"),
        ({"task": "image"}, "unknown task 'image'; use one of"),
        ({"train": {"jsonl": "nope.jsonl"}}, "nope.jsonl does not exist"),
        ({"train": {"csv": "x.csv"}}, "train must name exactly one source"),
        ({"evaluate": {"subsets": 10}}, "missing required key(s) train_fn"),
    ],
)
def test_bad_configs_exit_2_naming_the_fix(project: Path, change: dict, message: str) -> None:
    config = base_config("runs/bad")
    config.update(change)
    if "stroe" in change:
        del config["store"]
    path = write_config(project / "bad.toml", config)
    command = "evaluate" if "evaluate" in change else "featurize"
    result = cli(command, "-c", path)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (project / "runs" / "bad").exists()


def test_usage_errors_and_missing_config_exit_2(project: Path, tmp_path: Path) -> None:
    assert cli("featurize").exit_code == 2  # no -c
    result = cli("featurize", "-c", tmp_path / "none.toml")
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "broken.toml").write_text("store = \n")
    result = cli("score", "-c", tmp_path / "broken.toml")
    assert result.exit_code == 2 and "is not valid TOML" in result.output
    assert cli("info").exit_code == 2  # neither PATH nor -c
    config = write_config(project / "usage.toml", base_config("runs/usage"))
    for args in (["--shard", "2/2"], ["--shard", "x"], ["--model-ids", "a"]):
        assert cli("featurize", "-c", config, *args).exit_code == 2, args
    result = cli("featurize", "-c", config, "--model-ids", "5")
    assert result.exit_code == 2 and "model ids [5] have no checkpoint" in result.output


def test_data_errors_exit_4_with_the_message_and_a_traceback_only_with_v(project: Path) -> None:
    config = base_config("runs/data")
    config["train"] = f"{MODULE}:float_labels"
    path = write_config(project / "data.toml", config)
    result = cli("featurize", "-c", path)
    assert result.exit_code == 4, result.output
    assert "Error:" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["-v", "--no-progress", "featurize", "-c", str(path)])
    assert result.exit_code == 4 and "Traceback" in result.output


def test_every_command_help_shows_an_example() -> None:
    result = cli("--help")
    assert result.exit_code == 0 and "Exit codes" in result.output
    for command in ("featurize", "score", "report", "evaluate", "info", "verify", "repair"):
        result = cli(command, "--help")
        assert result.exit_code == 0, command
        assert "Example" in result.output and "fasttrak " in result.output, command


def test_report(project: Path) -> None:
    report = pytest.importorskip("fasttrak.report")
    if not hasattr(report, "html"):
        pytest.skip("fasttrak.report.html is not written yet (another change adds it)")
    config = base_config("runs/report")
    config["report"] = {"out": "report", "top": 2, "class_names": ["a", "b", "c"]}
    path = write_config(project / "report.toml", config)
    assert cli("featurize", "-c", path).exit_code == 0
    result = cli("report", "-c", path)
    assert result.exit_code == 0, result.output
    page = (project / "report" / "index.html").read_text()
    assert "<html" in page.lower() and "fasttrak report" in page


def test_subprocess_run_with_verbose_logging(project: Path) -> None:
    """The installed entry point in its own process: featurize one model with -v."""
    config = write_config(project / "sub.toml", base_config("runs/sub"))
    env = {**os.environ, "PYTHONPATH": str(project), "FASTTRAK_CONFIG": str(config)}
    run = subprocess.run(
        [sys.executable, "-m", "fasttrak.cli", "-v", "--no-progress", "featurize"]
        + ["--model-ids", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "fasttrak.cli INFO: featurizing model ids [0]" in run.stderr
    assert "model 0: 4/4 chunks (complete)" in run.stdout
    info = subprocess.run(
        [sys.executable, "-m", "fasttrak.cli", "info"], capture_output=True, env=env, timeout=120
    )
    assert info.returncode == 0


# ---------------------------------------------------------------------- Hugging Face

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
    "good",
    "bad",
    "fine",
    "awful",
    "movie",
    "film",
    "the",
    "a",
    "was",
    "is",
    "very",
    "not",
]

REVIEWS = [
    ("the movie was good", 1),
    ("the film was bad", 0),
    ("a very good film", 1),
    ("a very bad movie", 0),
    ("the film is fine", 1),
    ("the movie is awful", 0),
    ("not bad", 1),
    ("not good", 0),
    ("good good film", 1),
    ("awful awful movie", 0),
    ("the film was very fine", 1),
    ("the film was very awful", 0),
]


def hf_project(root: Path, kind: str) -> Path:
    transformers = pytest.importorskip("transformers")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    model_dir = root / "model"
    torch.manual_seed(0)
    if kind == "sequence_classification":
        config = transformers.BertConfig(
            vocab_size=len(VOCAB),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=2,
        )
        model = transformers.BertForSequenceClassification(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=len(VOCAB), n_positions=32, n_embd=16, n_layer=1, n_head=2
        )
        model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lines = [json.dumps({"text": text, "label": label}) for text, label in REVIEWS]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "test.jsonl").write_text("\n".join(lines[:3]) + "\n")
    config_text = f"""
        store = "runs/hf"
        model = {{hf = "model", kind = "{kind}"}}
        train = {{jsonl = "train.jsonl", text = "text", label = "label", max_length = 12}}
        targets = {{jsonl = "test.jsonl", max_length = 12}}

        [trak]
        proj_dim = 16
        chunk_rows = 8
        batch_size = 4

        [score]
        topk = 2
        out = "top.json"
    """
    path = root / "hf.toml"
    path.write_text(textwrap.dedent(config_text))
    return path


@pytest.mark.parametrize("kind", ["sequence_classification", "causal_lm"])
def test_hugging_face_model_directory_and_jsonl(tmp_path: Path, kind: str) -> None:
    config = hf_project(tmp_path, kind)
    result = cli("featurize", "-c", config)
    assert result.exit_code == 0, result.output
    assert "12 training rows" in result.output and "model 0: 2/2 chunks (complete)" in result.output
    settings, _ = ft.store_info(tmp_path / "runs" / "hf")
    expected = "text_classification" if kind == "sequence_classification" else "language_modeling"
    assert settings["task"]["name"] == expected
    result = cli("score", "-c", config)
    assert result.exit_code == 0, result.output
    top = json.loads((tmp_path / "top.json").read_text())
    assert (top["n_train"], top["n_targets"], top["k"]) == (12, 3, 2)
    # each target is a training example too: with a classifier, its own row should score high
    if kind == "sequence_classification":
        assert any(t["target"] in t["proponents"] for t in top["targets"])
        if hasattr(__import__("fasttrak.report").report, "html"):
            result = cli("report", "-c", config, "--out", tmp_path / "report")
            assert result.exit_code == 0, result.output
            assert "the film was very awful" in (tmp_path / "report" / "index.html").read_text()


def test_load_from_disk_dataset_dict_with_a_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    config = hf_project(tmp_path, "sequence_classification")
    rows = {"sentence": [t for t, _ in REVIEWS], "label": [y for _, y in REVIEWS]}
    table = datasets.table.InMemoryTable.from_pydict(rows)
    split = datasets.Dataset(table, fingerprint="reviews")  # no dill hashing of the table
    saved = datasets.DatasetDict({"train": split})
    saved.save_to_disk(str(tmp_path / "saved"))
    text = config.read_text().replace(
        'train = {jsonl = "train.jsonl", text = "text", label = "label", max_length = 12}',
        'train = {load_from_disk = "saved", text = "sentence", max_length = 12}',
    )
    config.write_text(text)
    result = cli("featurize", "-c", config)
    assert result.exit_code == 2 and "choose one with" in result.output  # no split given
    config.write_text(text.replace('"saved",', '"saved", split = "train",'))
    result = cli("featurize", "-c", config)
    assert result.exit_code == 0, result.output
    (tmp_path / "jsonl").mkdir()
    jsonl = hf_project(tmp_path / "jsonl", "sequence_classification")
    assert cli("featurize", "-c", jsonl).exit_code == 0
    from_disk, from_jsonl = (
        features(tmp_path / "runs" / "hf", 0),
        features(tmp_path / "jsonl" / "runs" / "hf", 0),
    )
    assert from_disk.tobytes() == from_jsonl.tobytes()  # the same rows, tokenized the same
