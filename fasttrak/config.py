"""The run configuration of the ``fasttrak`` command line: a TOML file, read as data.

A config names the user's Python factories by import path (``"pkg.mod:make_model"``), the
checkpoints as paths or globs, and the options of each command; see docs/cli.md for every
key. Reading a config (:func:`load_config`) imports nothing and runs nothing: every key is
checked (an unknown key is an error naming the valid ones, a value of the wrong type says
what was expected) and every relative path is resolved against the config file's folder.
The ``build_*`` functions then import exactly the import paths the config names, and build
the model, the data, the task and the :class:`fasttrak.TRAK` object from them.
"""

from __future__ import annotations

import difflib
import glob
import importlib
import inspect
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasttrak.errors import ConfigError, DataError, MissingDependencyError

log = logging.getLogger("fasttrak.cli")


class RunConfigError(ConfigError):
    """The run config is invalid: an unknown key, a value of the wrong type, a path that does
    not exist, an import path that cannot be imported. The message names the key and the fix."""


# ---------------------------------------------------------------------- the schema

HF_KINDS = {
    "sequence_classification": ("AutoModelForSequenceClassification", "text_classification"),
    "causal_lm": ("AutoModelForCausalLM", "language_modeling"),
}
"""``model = {hf = "dir", kind = ...}``: the transformers auto class and the default task."""


@dataclass(frozen=True)
class Expect:
    """What a key takes: its Python types (TOML values) and the words an error uses."""

    types: tuple[type, ...]
    words: str
    item: type | None = None  # element type of a list

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) and bool not in self.types:
            return False  # TOML true is no integer
        if not isinstance(value, self.types):
            return False
        if isinstance(value, list) and self.item is not None:
            return all(
                isinstance(v, self.item) and not (isinstance(v, bool) and self.item is not bool)
                for v in value
            )
        return True


INT = Expect((int,), "an integer")
FLOAT = Expect((int, float), "a number")
FLOAT_OR_AUTO = Expect((int, float, str), 'a number or "auto"')
STR = Expect((str,), "a string")
BOOL = Expect((bool,), "true or false")
TABLE = Expect((dict,), "a table")
INT_LIST = Expect((list,), "a list of integers", int)
STR_LIST = Expect((list,), "a list of strings", str)
STR_OR_LIST = Expect((str, list), "a string or a list of strings", str)

TOP = {
    "store": STR,
    "model": Expect((str, dict), 'an import path "module:callable" or a table {hf = "dir", ...}'),
    "model_args": TABLE,
    "train": Expect((str, dict), 'an import path "module:name" or a data table'),
    "targets": Expect((str, dict), 'an import path "module:name" or a data table'),
    "checkpoints": Expect(
        (str, list, dict), 'a list of paths or globs, or a table {7 = "path"}', str
    ),
    "task": STR,
    "python_path": STR_LIST,
    "trak": TABLE,
    "score": TABLE,
    "report": TABLE,
    "evaluate": TABLE,
}
"""Top-level keys."""

HF_MODEL = {"hf": STR, "kind": STR}

DATA_SOURCES = ("factory", "jsonl", "load_from_disk")
DATA_KEYS = {
    "factory": {"factory": STR, "args": TABLE},
    "jsonl": {
        "jsonl": STR,
        "text": STR,
        "label": STR,
        "prompt": STR,
        "max_length": INT,
        "tokenizer": STR,
    },
    "load_from_disk": {
        "load_from_disk": STR,
        "split": STR,
        "text": STR,
        "label": STR,
        "prompt": STR,
        "max_length": INT,
        "tokenizer": STR,
    },
}

TRAK_TYPES = {
    "proj_dim": INT,
    "projector": STR,
    "device": STR,
    "seed": INT,
    "params": STR_OR_LIST,
    "batch_size": INT,
    "chunk_rows": INT,
    "feature_dtype": STR,
    "ridge": FLOAT_OR_AUTO,
    "precision": STR,
    "kernel": STR,
    "kernel_blocks": INT,
    "weight_power": FLOAT,
    "engine": STR,
    "vmap_chunk_size": INT,
    "progress": BOOL,
}
"""Types of ``[trak]`` options; the valid keys are the keyword arguments of ``ft.TRAK``
(except model, task and store, which are top-level keys), so a new option is accepted."""

SCORE = {"topk": INT, "out": STR, "save": STR, "model_ids": INT_LIST, "batch_size": INT}
REPORT = {
    "out": STR,
    "top": INT,
    "title": STR,
    "class_names": STR_LIST,
    "max_targets": INT,
    "self_influence": BOOL,
}
EVALUATE = {
    "train_fn": STR,
    "args": TABLE,
    "subsets": INT,
    "alpha": FLOAT,
    "seed": INT,
    "seeds_per_subset": INT,
    "cache": STR,
    "out": STR,
    "model_ids": INT_LIST,
}


def trak_option_names() -> list[str]:
    """The keys ``[trak]`` accepts: ``ft.TRAK``'s keyword arguments but model, task, store."""
    from fasttrak.trak import TRAK

    names = inspect.signature(TRAK).parameters
    return [name for name in names if name not in ("model", "task", "store")]


# ---------------------------------------------------------------------- the config model


@dataclass(frozen=True)
class HFModel:
    """A Hugging Face model directory: ``model = {hf = "dir", kind = "causal_lm"}``."""

    path: Path
    kind: str


@dataclass(frozen=True)
class DataSpec:
    """Where a dataset comes from: a factory (import path), a JSONL file, or a saved
    ``datasets`` dataset; text sources are tokenized with the model's tokenizer."""

    key: str  # "train" or "targets", for messages
    source: str  # "factory", "jsonl" or "load_from_disk"
    ref: str = ""  # the import path of a factory
    path: Path | None = None  # jsonl / load_from_disk
    args: dict[str, Any] = field(default_factory=dict)
    split: str | None = None
    text: str = "text"
    label: str = "label"
    prompt: str | None = None
    max_length: int | None = None
    tokenizer: Path | None = None


@dataclass(frozen=True)
class ScoreSection:
    topk: int = 10
    out: Path | None = None
    save: Path | None = None
    model_ids: list[int] | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class ReportSection:
    out: Path | None = None
    top: int = 5
    title: str = "fasttrak report"
    class_names: list[str] | None = None
    max_targets: int = 50
    self_influence: bool = True


@dataclass(frozen=True)
class EvaluateSection:
    train_fn: str
    args: dict[str, Any] = field(default_factory=dict)
    subsets: int = 100
    alpha: float = 0.5
    seed: int = 0
    seeds_per_subset: int = 1
    cache: Path | None = None
    out: Path | None = None
    model_ids: list[int] | None = None


@dataclass(frozen=True)
class RunConfig:
    """A validated run config (see docs/cli.md); paths are absolute."""

    path: Path
    store: Path
    model: str | HFModel
    model_args: dict[str, Any]
    train: DataSpec
    targets: DataSpec | None
    checkpoints: dict[int, Path | None]  # {0: None}: the model's own weights
    task: str | None
    python_path: list[Path]
    trak: dict[str, Any]
    score: ScoreSection
    report: ReportSection
    evaluate: EvaluateSection | None

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def model_ids(self) -> list[int]:
        return sorted(self.checkpoints)

    def default_out(self, name: str) -> Path:
        return self.root / name


# ---------------------------------------------------------------------- reading


def load_config(path: str | Path) -> RunConfig:
    """Read and check the TOML config at ``path``; imports nothing."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise RunConfigError(
            f"config file {path} does not exist; pass -c PATH to a TOML run config "
            "(see docs/cli.md, or examples/cli/run.toml)"
        )
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError as error:
            raise MissingDependencyError(
                "reading a TOML config on Python 3.10 needs tomli: pip install tomli"
            ) from error
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise RunConfigError(f"{path} is not valid TOML: {error}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise RunConfigError(f"cannot read config file {path}: {error}") from error
    return parse_config(raw, path)


def parse_config(raw: Mapping[str, Any], path: Path) -> RunConfig:
    """Check a parsed config (``path``: the config file, whose folder relative paths start
    from) and build the :class:`RunConfig`."""
    where = path.name
    check_table(raw, TOP, where, required=("store", "model", "train"))
    root = path.parent

    def resolve(value: str) -> Path:
        return (root / Path(value).expanduser()).resolve()

    store = raw["store"]
    if not store.strip():
        raise RunConfigError(f'{where}: store is empty; set store = "runs/name" (a directory)')
    model = _model(raw["model"], where, resolve)
    model_args = dict(raw.get("model_args", {}))
    if isinstance(model, HFModel) and model_args:
        raise RunConfigError(
            f"{where}: [model_args] is for a model factory; a Hugging Face model "
            "(model = {hf = ...}) is configured by its directory's config.json"
        )
    task = raw.get("task")
    if task is not None:
        _check_task(task, where)
    elif isinstance(model, HFModel):
        task = HF_KINDS[model.kind][1]
    trak = _trak(raw.get("trak", {}), where)
    return RunConfig(
        path=path,
        store=resolve(store),
        model=model,
        model_args=model_args,
        train=_data(raw["train"], "train", where, resolve),
        targets=_data(raw["targets"], "targets", where, resolve) if "targets" in raw else None,
        checkpoints=_checkpoints(raw.get("checkpoints"), where, resolve),
        task=task,
        python_path=[resolve(p) for p in raw.get("python_path", ["."])],
        trak=trak,
        score=_score(raw.get("score", {}), where, resolve),
        report=_report(raw.get("report", {}), where, resolve),
        evaluate=_evaluate(raw["evaluate"], where, resolve) if "evaluate" in raw else None,
    )


def check_table(
    table: Mapping[str, Any],
    schema: Mapping[str, Expect | None],
    where: str,
    required: Sequence[str] = (),
) -> None:
    """Every key of ``table`` is in ``schema`` with a value of its type (None in the schema:
    any value), and every ``required`` key is there."""
    for key, value in table.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RunConfigError(
                f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(schema)}"
            )
        expect = schema[key]
        if expect is not None and not expect.accepts(value):
            raise RunConfigError(
                f"{where}: {key} must be {expect.words}, got {_show(value)} ({_toml_type(value)})"
            )
    missing = [key for key in required if key not in table]
    if missing:
        raise RunConfigError(
            f"{where}: missing required key(s) {', '.join(missing)}; "
            + "; ".join(f"{key} = {_EXAMPLES.get(key, '...')}" for key in missing)
        )


_EXAMPLES = {
    "store": '"runs/name" (the store directory, relative to the config file)',
    "model": '"pkg.models:make_model" (a function returning the nn.Module)',
    "train": '"pkg.data:train_set" (a function returning the training data)',
    "targets": '"pkg.data:test_set" (a function returning the examples to attribute)',
    "train_fn": '"pkg.train:retrain" (train_fn(mask, seed) -> outputs on the targets)',
    "hf": '"path/to/model_dir" (a local Hugging Face model directory)',
}


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def check_import_path(value: str, key: str, where: str) -> str:
    """``value`` has the form ``module.path:attribute``."""
    module, sep, attr = value.partition(":")
    default = '"mypkg.module:function"'
    if not sep or not module.strip() or not attr.strip() or ":" in attr:
        raise RunConfigError(
            f'{where}: {key} = {value!r} is not an import path; write "module.path:name", '
            f"e.g. {_EXAMPLES.get(key, default)}"
        )
    parts = module.split(".") + attr.split(".")
    if not all(part.isidentifier() for part in parts):
        raise RunConfigError(
            f"{where}: {key} = {value!r} is not an import path: each part of "
            '"module.path:name" must be a Python identifier'
        )
    return value


def _model(value: Any, where: str, resolve: Callable[[str], Path]) -> str | HFModel:
    if isinstance(value, str):
        return check_import_path(value, "model", where)
    check_table(value, HF_MODEL, f"{where}: model", required=("hf",))
    kind = value.get("kind", "sequence_classification")
    if kind not in HF_KINDS:
        raise RunConfigError(
            f"{where}: model.kind = {kind!r} is not supported; use one of {', '.join(HF_KINDS)}"
        )
    directory = resolve(value["hf"])
    if not (directory / "config.json").is_file():
        raise RunConfigError(
            f"{where}: model.hf = {value['hf']!r}: {directory} is not a Hugging Face model "
            "directory (no config.json); save one with model.save_pretrained(dir) and "
            "tokenizer.save_pretrained(dir) (only local directories are read)"
        )
    return HFModel(directory, kind)


def _check_task(task: str, where: str) -> None:
    if ":" in task:
        check_import_path(task, "task", where)
        return
    from fasttrak.tasks import TASKS

    key = task.strip().lower().replace("-", "_")
    if key not in TASKS or key == "clip":
        names = sorted(name for name in TASKS if name != "clip")
        raise RunConfigError(
            f"{where}: unknown task {task!r}; use one of {', '.join(names)}, or an import "
            'path "pkg.mod:make_task" of a function returning a task object (e.g. '
            "ft.tasks.CLIP(negatives=...))"
        )


def _data(value: Any, key: str, where: str, resolve: Callable[[str], Path]) -> DataSpec:
    if isinstance(value, str):
        return DataSpec(key, "factory", ref=check_import_path(value, key, where))
    sources = [s for s in DATA_SOURCES if s in value]
    if len(sources) != 1:
        raise RunConfigError(
            f"{where}: {key} must name exactly one source, one of {', '.join(DATA_SOURCES)}: "
            f'{key} = "pkg.data:{key}_set", {key} = {{factory = "pkg.data:load", args = '
            f'{{split = "{key}"}}}}, {key} = {{jsonl = "{key}.jsonl", text = "text", label = '
            f'"label"}} or {key} = {{load_from_disk = "data/{key}"}}'
            + (f"; got {', '.join(sources)}" if sources else "")
        )
    source = sources[0]
    check_table(value, DATA_KEYS[source], f"{where}: {key}")
    if source == "factory":
        ref = check_import_path(value["factory"], key, where)
        return DataSpec(key, source, ref=ref, args=dict(value.get("args", {})))
    path = resolve(value[source])
    if not path.exists():
        raise RunConfigError(
            f"{where}: {key}.{source} = {value[source]!r}: {path} does not exist "
            "(relative paths start from the config file's folder)"
        )
    max_length = value.get("max_length")
    if max_length is not None and max_length < 2:
        raise RunConfigError(f"{where}: {key}.max_length must be >= 2, got {max_length}")
    tokenizer = resolve(value["tokenizer"]) if "tokenizer" in value else None
    if tokenizer is not None and not tokenizer.exists():
        raise RunConfigError(f"{where}: {key}.tokenizer: {tokenizer} does not exist")
    return DataSpec(
        key,
        source,
        path=path,
        split=value.get("split"),
        text=value.get("text", "text"),
        label=value.get("label", "label"),
        prompt=value.get("prompt"),
        max_length=max_length,
        tokenizer=tokenizer,
    )


def _checkpoints(value: Any, where: str, resolve: Callable[[str], Path]) -> dict[int, Path | None]:
    if value is None:
        return {0: None}  # the model's own weights, as the factory / directory gives them
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        if not value:
            raise RunConfigError(
                f"{where}: checkpoints is empty; list paths or globs, e.g. "
                'checkpoints = ["ckpts/model_*.pt"], or leave the key out to use the '
                "model's own weights"
            )
        paths: list[Path] = []
        for entry in value:
            paths.extend(_expand(entry, where, resolve))
        return dict(enumerate(paths))
    out: dict[int, Path | None] = {}
    for key, entry in value.items():
        if not key.strip().isdigit():
            raise RunConfigError(
                f"{where}: checkpoints table keys are model ids (integers >= 0), got {key!r}; "
                'e.g. checkpoints = {0 = "ckpts/a.pt", 7 = "ckpts/b.pt"}'
            )
        if not isinstance(entry, str):
            raise RunConfigError(
                f"{where}: checkpoints.{key} must be a path (a string), got {_show(entry)}"
            )
        found = _expand(entry, where, resolve)
        if len(found) != 1:
            raise RunConfigError(
                f"{where}: checkpoints.{key} = {entry!r} matches {len(found)} files; a model "
                "id takes exactly one checkpoint"
            )
        out[int(key)] = found[0]
    return dict(sorted(out.items()))


def _expand(entry: str, where: str, resolve: Callable[[str], Path]) -> list[Path]:
    """A checkpoint path, or the sorted files a glob matches (at least one)."""
    if not isinstance(entry, str) or not entry.strip():
        raise RunConfigError(f"{where}: checkpoints must list paths, got {_show(entry)}")
    path = resolve(entry)
    if glob.has_magic(entry):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        if not found:
            raise RunConfigError(
                f"{where}: checkpoints glob {entry!r} matches no file (looked for {path}); "
                "check the pattern (relative paths start from the config file's folder)"
            )
        return found
    if not path.exists():
        raise RunConfigError(
            f"{where}: checkpoint {entry!r} does not exist ({path}); relative paths start "
            "from the config file's folder"
        )
    return [path]


def _trak(value: Mapping[str, Any], where: str) -> dict[str, Any]:
    names = trak_option_names()
    schema = {name: TRAK_TYPES.get(name) for name in names}
    check_table(value, schema, f"{where}: [trak]")
    return dict(value)


def _positive(section: str, key: str, value: int | None, where: str) -> None:
    if value is not None and value < 1:
        raise RunConfigError(f"{where}: [{section}] {key} must be >= 1, got {value}")


def _ids(section: str, value: list[int] | None, where: str) -> list[int] | None:
    if value is None:
        return None
    if not value or any(m < 0 for m in value) or len(set(value)) != len(value):
        raise RunConfigError(
            f"{where}: [{section}] model_ids must list distinct model ids >= 0, got {value}"
        )
    return list(value)


def _score(value: Mapping[str, Any], where: str, resolve: Callable[[str], Path]) -> ScoreSection:
    check_table(value, SCORE, f"{where}: [score]")
    for key in ("topk", "batch_size"):
        _positive("score", key, value.get(key), where)
    out = resolve(value["out"]) if "out" in value else None
    if out is not None and out.suffix.lower() not in (".json", ".csv"):
        raise RunConfigError(f"{where}: [score] out = {value['out']!r} must end in .json or .csv")
    return ScoreSection(
        topk=value.get("topk", 10),
        out=out,
        save=resolve(value["save"]) if "save" in value else None,
        model_ids=_ids("score", value.get("model_ids"), where),
        batch_size=value.get("batch_size"),
    )


def _report(value: Mapping[str, Any], where: str, resolve: Callable[[str], Path]) -> ReportSection:
    check_table(value, REPORT, f"{where}: [report]")
    for key in ("top", "max_targets"):
        _positive("report", key, value.get(key), where)
    return ReportSection(
        out=resolve(value["out"]) if "out" in value else None,
        top=value.get("top", 5),
        title=value.get("title", "fasttrak report"),
        class_names=value.get("class_names"),
        max_targets=value.get("max_targets", 50),
        self_influence=value.get("self_influence", True),
    )


def _evaluate(
    value: Mapping[str, Any], where: str, resolve: Callable[[str], Path]
) -> EvaluateSection:
    check_table(value, EVALUATE, f"{where}: [evaluate]", required=("train_fn",))
    for key in ("subsets", "seeds_per_subset"):
        _positive("evaluate", key, value.get(key), where)
    if value.get("subsets", 100) < 2:
        raise RunConfigError(f"{where}: [evaluate] subsets must be >= 2 (LDS ranks subsets)")
    alpha = float(value.get("alpha", 0.5))
    if not 0 < alpha < 1 or math.isnan(alpha):
        raise RunConfigError(f"{where}: [evaluate] alpha must lie in (0, 1), got {alpha}")
    if value.get("seed", 0) < 0:
        raise RunConfigError(f"{where}: [evaluate] seed must be >= 0")
    return EvaluateSection(
        train_fn=check_import_path(value["train_fn"], "train_fn", f"{where}: [evaluate]"),
        args=dict(value.get("args", {})),
        subsets=value.get("subsets", 100),
        alpha=alpha,
        seed=value.get("seed", 0),
        seeds_per_subset=value.get("seeds_per_subset", 1),
        cache=resolve(value["cache"]) if "cache" in value else None,
        out=resolve(value["out"]) if "out" in value else None,
        model_ids=_ids("evaluate", value.get("model_ids"), where),
    )


# ---------------------------------------------------------------------- building


def import_object(ref: str, key: str, config: RunConfig) -> Any:
    """The object at import path ``ref`` ("module:attr.attr"), named by config key ``key``;
    the config's ``python_path`` folders are searched first."""
    for folder in reversed(config.python_path):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    module_name, _, attrs = ref.partition(":")
    where = config.path.name
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and not module_name.startswith(error.name):
            raise  # a module the user's module imports: their environment, shown as is
        folders = ", ".join(str(p) for p in config.python_path)
        raise RunConfigError(
            f"{where}: {key} = {ref!r}: cannot import module {module_name!r} ({error}); "
            f"check the name, and that its folder is on python_path (now: {folders}) or "
            "PYTHONPATH"
        ) from error
    obj: Any = module
    for attr in attrs.split("."):
        if not hasattr(obj, attr):
            public = sorted(n for n in dir(module) if not n.startswith("_"))[:20]
            raise RunConfigError(
                f"{where}: {key} = {ref!r}: module {module_name!r} has no attribute "
                f"{attrs!r}; it defines: {', '.join(public)}"
            )
        obj = getattr(obj, attr)
    log.debug("imported %s = %s", key, ref)
    return obj


def build_model(config: RunConfig) -> Any:
    """The model: the factory called with ``[model_args]``, or a Hugging Face model loaded
    from its local directory."""
    from torch import nn

    if isinstance(config.model, HFModel):
        transformers = _transformers("model = {hf = ...}")
        auto = getattr(transformers, HF_KINDS[config.model.kind][0])
        log.info("loading %s from %s", auto.__name__, config.model.path)
        model = auto.from_pretrained(str(config.model.path), local_files_only=True)
    else:
        factory = import_object(config.model, "model", config)
        if isinstance(factory, nn.Module):
            model = factory
        elif callable(factory):
            model = factory(**config.model_args)
        else:
            raise RunConfigError(
                f"{config.path.name}: model = {config.model!r} is a "
                f"{type(factory).__name__}; name a function (or class) returning the "
                "torch.nn.Module"
            )
    if not isinstance(model, nn.Module):
        raise RunConfigError(
            f"{config.path.name}: model = {_show(str(config.model))} returned a "
            f"{type(model).__name__}, not a torch.nn.Module"
        )
    return model


def build_task(config: RunConfig) -> Any:
    """The task: a name (``ft.TRAK`` resolves it), None (image classification), or the
    object an import path's factory returns."""
    if config.task is None or ":" not in config.task:
        return config.task
    factory = import_object(config.task, "task", config)
    return factory() if callable(factory) and not hasattr(factory, "out_to_loss") else factory


def build_trak(config: RunConfig, model: Any, progress: bool) -> Any:
    """The ``ft.TRAK`` object of the config (its store at ``config.store``)."""
    from fasttrak.trak import TRAK

    options = dict(config.trak)
    if not progress:
        options["progress"] = False
    return TRAK(model, task=build_task(config), store=config.store, **options)


def build_data(spec: DataSpec, config: RunConfig, model: Any = None) -> Any:
    """The dataset ``spec`` describes: what a factory returns, or tokenized text."""
    if spec.source == "factory":
        factory = import_object(spec.ref, spec.key, config)
        data = factory(**spec.args) if callable(factory) else factory
        if data is None:
            raise DataError(
                f"{spec.key} = {spec.ref!r} returned None; return a dataset, a DataLoader "
                "with shuffle=False, or a tuple of tensors (X, y)"
            )
        return data
    return _text_data(spec, config, model)


def build_display(spec: DataSpec, config: RunConfig, data: Any) -> Any:
    """What a report shows of a dataset: the raw records (``{"text", "label"}``) of text
    sources, else ``data`` itself."""
    if spec.source == "factory":
        return data
    shown = []
    for record in _records(spec):
        text = str(record.get(spec.text, ""))
        if spec.prompt:
            text = str(record.get(spec.prompt, "")) + text
        item: dict[str, Any] = {"text": text}
        if spec.label in record:
            item["label"] = record[spec.label]
        shown.append(item)
    return shown


# ---------------------------------------------------------------------- text data


def _transformers(what: str) -> Any:
    try:
        import transformers
    except ImportError as error:
        raise MissingDependencyError(
            f"{what} needs transformers: pip install fasttrak[hf]"
        ) from error
    return transformers


def _records(spec: DataSpec) -> list[dict[str, Any]]:
    assert spec.path is not None
    if spec.source == "jsonl":
        records = []
        with spec.path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{spec.path}:{number} is not a JSON object ({error}); a JSONL file "
                        "holds one JSON object per line"
                    ) from error
                if not isinstance(record, dict):
                    raise DataError(f"{spec.path}:{number} is not a JSON object")
                records.append(record)
        return records
    try:
        import datasets
    except ImportError as error:
        raise MissingDependencyError(
            f"{spec.key} = {{load_from_disk = ...}} needs the datasets package: "
            "pip install datasets"
        ) from error
    loaded = datasets.load_from_disk(str(spec.path))
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split is None or spec.split not in loaded:
            raise RunConfigError(
                f"{spec.key}: {spec.path} holds splits {sorted(loaded)}; choose one with "
                f'{spec.key} = {{load_from_disk = "...", split = "train"}}'
            )
        loaded = loaded[spec.split]
    return [dict(row) for row in loaded]


def _text_data(spec: DataSpec, config: RunConfig, model: Any) -> Any:
    """Records tokenized into a DataLoader of padded dict batches (``labels`` for text
    classification; for causal LMs the targets are the tokens after the prompt)."""
    import torch
    from torch.utils.data import DataLoader

    records = _records(spec)
    if not records:
        raise DataError(f"{spec.key}: {spec.path} holds no examples")
    classify = _is_classification(config)
    tokenizer = _tokenizer(spec, config)
    label2id = getattr(getattr(model, "config", None), "label2id", None) or {}
    items: list[dict[str, Any]] = []
    tokenized = {"input_ids", "attention_mask"} <= set(records[0])
    for number, record in enumerate(records):
        item: dict[str, Any]
        if tokenized:
            item = {
                key: torch.as_tensor(record[key], dtype=torch.long)
                for key in ("input_ids", "attention_mask", "token_type_ids")
                if key in record
            }
        else:
            item = _tokenize(spec, tokenizer, record, number, classify)
        if classify:
            item["labels"] = torch.tensor(_label(spec, record, number, label2id))
        items.append(item)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    batch_size = int(config.trak.get("batch_size", 64))
    return DataLoader(
        items,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        collate_fn=PadCollate(0 if pad is None else int(pad)),
    )


def _is_classification(config: RunConfig) -> bool:
    task = (config.task or "").strip().lower().replace("-", "_")
    if task in ("language_modeling", "causal_lm"):
        return False
    if task == "text_classification":
        return True
    raise RunConfigError(
        f"{config.path.name}: jsonl / load_from_disk data is tokenized for task "
        '"text_classification" or "language_modeling"; set one of them (or model = '
        "{hf = ..., kind = ...}), or give a data factory for other tasks"
    )


def _tokenizer(spec: DataSpec, config: RunConfig) -> Any:
    directory = spec.tokenizer
    if directory is None and isinstance(config.model, HFModel):
        directory = config.model.path
    if directory is None:
        raise RunConfigError(
            f"{config.path.name}: {spec.key} is text; name the tokenizer's directory with "
            f'{spec.key} = {{..., tokenizer = "path/to/tokenizer_dir"}} (a Hugging Face '
            "model directory gives its own)"
        )
    transformers = _transformers(f"tokenizing {spec.key}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True
        )
    except (OSError, ValueError) as error:
        raise RunConfigError(
            f"{config.path.name}: cannot load a tokenizer from {directory} ({error}); save "
            "one there with tokenizer.save_pretrained(dir)"
        ) from error
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token  # causal LMs often have no pad token
    return tokenizer


def _field(spec: DataSpec, record: Mapping[str, Any], name: str, number: int) -> Any:
    if name not in record:
        raise DataError(
            f"{spec.key}: example {number} of {spec.path} has no field {name!r} (it has "
            f"{sorted(record)}); name the field with {spec.key} = {{..., "
            f'{"text" if name == spec.text else "label"} = "field"}}'
        )
    return record[name]


def _tokenize(
    spec: DataSpec, tokenizer: Any, record: Mapping[str, Any], number: int, classify: bool
) -> dict[str, Any]:
    import torch

    text = _field(spec, record, spec.text, number)
    prompt = _field(spec, record, spec.prompt, number) if spec.prompt else None
    if not isinstance(text, str) or (prompt is not None and not isinstance(prompt, str)):
        raise DataError(f"{spec.key}: example {number}: the text fields must be strings")
    truncate = spec.max_length is not None
    kwargs = {"truncation": truncate, "max_length": spec.max_length}
    if classify or prompt is None:
        encoded = (
            tokenizer(prompt, text, **kwargs) if prompt is not None else tokenizer(text, **kwargs)
        )
        item = {key: torch.tensor(value, dtype=torch.long) for key, value in encoded.items()}
        return item
    # causal LM with a prompt: the targets are the completion's tokens only
    prompt_ids = tokenizer(prompt)["input_ids"]
    encoded = tokenizer(prompt + text, **kwargs)
    item = {key: torch.tensor(value, dtype=torch.long) for key, value in encoded.items()}
    labels = item["input_ids"].clone()
    labels[: len(prompt_ids)] = -100
    item["labels"] = labels
    return item


def _label(spec: DataSpec, record: Mapping[str, Any], number: int, label2id: dict) -> int:
    label = _field(spec, record, spec.label, number)
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataError(
            f"{spec.key}: example {number}: label {label!r} must be a class index or a "
            "class name of the model's config.label2id"
        )
    if isinstance(label, str):
        if label not in label2id:
            raise DataError(
                f"{spec.key}: example {number}: label {label!r} is not a class name of the "
                f"model (config.label2id: {sorted(label2id)}); use class indices or set "
                "label2id in the model's config.json"
            )
        return int(label2id[label])
    return int(label)


class PadCollate:
    """Pads a list of unpadded token dicts on the right: ``input_ids`` with ``pad_id``,
    ``attention_mask`` / ``token_type_ids`` with 0, token ``labels`` with -100."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        length = max(int(item["input_ids"].shape[0]) for item in items)
        for key in items[0]:
            values = [item[key] for item in items]
            if values[0].ndim == 0:
                out[key] = torch.stack(values)
                continue
            fill = {"input_ids": self.pad_id, "labels": -100}.get(key, 0)
            padded = torch.full((len(values), length), fill, dtype=values[0].dtype)
            for row, value in enumerate(values):
                padded[row, : value.shape[0]] = value
            out[key] = padded
        return out
