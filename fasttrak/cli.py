"""The ``fasttrak`` command line.

Whole runs are driven by a TOML config (``-c run.toml``, see docs/cli.md and
:mod:`fasttrak.config`): ``featurize``, ``score``, ``report``, ``evaluate``; ``info`` and
``verify`` look at a store. Exit codes, for scripts: 0 ok; 1 store incomplete or damaged
(``info``, ``verify``); 2 usage or config error; 3 features missing for scoring; 4 data
error; 5 other fasttrak errors; 6 an unexpected exception (a traceback is printed).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_NOT_FEATURIZED = 3
EXIT_DATA = 4
EXIT_FASTTRAK = 5
EXIT_UNEXPECTED = 6

log = logging.getLogger("fasttrak.cli")


class CommandError(click.ClickException):
    """An error reported as ``Error: message`` with one of the exit codes above."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]


def exit_code_of(error: BaseException) -> int:
    """The exit code of a fasttrak error: 2 for config errors, 3 for missing features, 4 for
    data errors, 5 for the others."""
    from fasttrak import errors

    if isinstance(error, errors.NotFeaturizedError):
        return EXIT_NOT_FEATURIZED
    if isinstance(
        error,
        (errors.DataError, errors.DataTypeError, errors.DataKeyError, errors.DataMismatchError),
    ):
        return EXIT_DATA
    if isinstance(
        error, (errors.ConfigError, errors.ConfigTypeError, errors.CheckpointNotFoundError)
    ):
        return EXIT_USAGE
    return EXIT_FASTTRAK


@dataclass
class Globals:
    verbose: int = 0
    quiet: bool = False
    progress: bool = True


def _globals() -> Globals:
    obj = click.get_current_context().find_root().obj
    return obj if isinstance(obj, Globals) else Globals()


def _say(message: str) -> None:
    """Print ``message`` unless --quiet."""
    if not _globals().quiet:
        click.echo(message)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Report fasttrak's errors as a message and an exit code (the traceback with -v)."""
    from fasttrak.errors import FastTrakError

    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except FastTrakError as error:
        if _globals().verbose:
            click.echo("".join(traceback.format_exception(error)), err=True)
        raise CommandError(str(error), exit_code_of(error)) from error
    except Exception as error:
        click.echo("".join(traceback.format_exception(error)), err=True)
        raise CommandError(
            f"unexpected {type(error).__name__}: {error} (traceback above; raised by your "
            "factories or a bug in fasttrak)",
            EXIT_UNEXPECTED,
        ) from error


def _configure_logging(verbose: int, quiet: bool) -> None:
    """A handler on the "fasttrak" logger only (INFO with -v, DEBUG with -vv)."""
    logger = logging.getLogger("fasttrak")
    for handler in list(logger.handlers):
        if getattr(handler, "fasttrak_cli", False):
            logger.removeHandler(handler)
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        handler.fasttrak_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
    else:
        logger.setLevel(logging.ERROR if quiet else logging.WARNING)


MAIN_EPILOG = """\b
Examples:
  fasttrak featurize -c run.toml                 # featurize every checkpoint (resumable)
  fasttrak featurize -c run.toml --shard 3/16    # one job of an array
  fasttrak info -c run.toml                      # exit 1 while chunks are missing
  fasttrak score -c run.toml --out top.csv       # top proponents/opponents per target
  fasttrak report -c run.toml                    # an HTML page to open in a browser
  fasttrak evaluate -c run.toml                  # LDS against retraining

\b
Exit codes: 0 ok, 1 store incomplete or damaged (info, verify), 2 usage or config
error, 3 features missing for scoring, 4 data error, 5 other fasttrak error,
6 unexpected exception (traceback printed). The config reference: docs/cli.md.
"""


@click.group(epilog=MAIN_EPILOG)
@click.version_option(package_name="fasttrak")
@click.option("-v", "--verbose", count=True, help="Log what fasttrak does (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors: no progress bars, no messages.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (e.g. in batch jobs).")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, no_progress: bool) -> None:
    """fasttrak: fast, resumable TRAK data attribution for PyTorch."""
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet exclude each other")
    ctx.obj = Globals(verbose, quiet, not (quiet or no_progress))
    _configure_logging(verbose, quiet)


CONFIG_HELP = "The run config (TOML; see docs/cli.md). Default: $FASTTRAK_CONFIG."


def config_option(required: bool = True) -> Any:
    return click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="FASTTRAK_CONFIG",
        required=required,
        help=CONFIG_HELP,
    )


def _load(config_path: Path) -> Any:
    from fasttrak.config import load_config

    config = load_config(config_path)
    log.info("config %s: store %s, model ids %s", config.path, config.store, config.model_ids)
    return config


def _parse_ids(text: str | None, option: str = "--model-ids") -> list[int] | None:
    """``0,3`` or ``0-2,5``: distinct model ids."""
    if text is None:
        return None
    ids: list[int] = []
    try:
        for part in text.split(","):
            first, dash, last = part.strip().partition("-")
            ids.extend(range(int(first), int(last) + 1) if dash else [int(first)])
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: list model ids like 0,3 or 0-2,5", param_hint=option
        ) from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise click.BadParameter(f"{text!r}: give distinct ids >= 0", param_hint=option)
    return ids


def _chosen_ids(config: Any, *choices: list[int] | None) -> list[int]:
    """The first of ``choices`` given (else every configured checkpoint), each of which
    must have a checkpoint in the config."""
    ids = next((c for c in choices if c is not None), config.model_ids)
    unknown = [m for m in ids if m not in config.checkpoints]
    if unknown:
        raise CommandError(
            f"model ids {unknown} have no checkpoint in {config.path.name} (it has model ids "
            f"{config.model_ids}); choose among those, or add them to checkpoints",
            EXIT_USAGE,
        )
    return ids


def _checkpoints(config: Any, ids: list[int]) -> list[Any]:
    return [config.checkpoints[m] for m in ids]


def _require_targets(config: Any) -> Any:
    if config.targets is None:
        raise CommandError(
            f'{config.path.name} has no targets: add targets = "pkg.data:test_set" (the '
            "examples to attribute)",
            EXIT_USAGE,
        )
    return config.targets


def _require_features(config: Any, ids: list[int]) -> None:
    """Exit 3, naming the missing chunks, unless every model of ``ids`` is featurized."""
    from fasttrak.store.api import store_info

    command = f"fasttrak featurize -c {config.path}"
    if not config.store.exists():
        raise CommandError(
            f"there is no store at {config.store} yet: run `{command}` first", EXIT_NOT_FEATURIZED
        )
    _, progress = store_info(config.store)
    found = {m.model_id: m for m in progress.models}
    problems = [f"model {m}: not featurized" for m in ids if m not in found]
    problems += [str(found[m]) for m in ids if m in found and not found[m].complete]
    if problems:
        raise CommandError(
            "the store is missing features needed for scoring:\n  "
            + "\n  ".join(problems)
            + f"\nrun `{command}` (it resumes: only the missing chunks are computed)",
            EXIT_NOT_FEATURIZED,
        )


def _scores(config: Any, ids: list[int], batch_size: int | None = None) -> tuple[Any, Any, Any]:
    """(trak, targets, scores) of the config's targets, scored with models ``ids``."""
    from fasttrak.config import build_data, build_model, build_trak

    spec = _require_targets(config)
    _require_features(config, ids)
    model = build_model(config)
    trak = build_trak(config, model, _globals().progress)
    targets = build_data(spec, config, model)
    log.info("scoring with model ids %s", ids)
    scores = trak.score(
        targets, checkpoints=_checkpoints(config, ids), model_ids=ids, batch_size=batch_size
    )
    return trak, targets, scores


# ---------------------------------------------------------------------- featurize


@main.command(
    epilog="""\b
Examples:
  fasttrak featurize -c run.toml
  fasttrak featurize -c run.toml --model-ids 0,3
  fasttrak featurize -c run.toml --model-ids $M --shard $S/16   # a SLURM array job
"""
)
@config_option()
@click.option("--model-ids", help="Only these model ids, e.g. 0,3 or 0-2 (default: all).")
@click.option("--shard", help="Only shard I of N of the row chunks, as I/N (0-based).")
@click.option("--repair", is_flag=True, help="First verify the store and redo damaged chunks.")
def featurize(config_path: Path, model_ids: str | None, shard: str | None, repair: bool) -> None:
    """Featurize the config's checkpoints into its store (resumable: finished chunks are
    skipped; many processes may share one store). Prints the store's progress."""
    import fasttrak as ft
    from fasttrak.config import build_data, build_model, build_trak

    ids_given = _parse_ids(model_ids)
    rows = None
    if shard is not None:
        index, slash, count = shard.partition("/")
        if not (slash and index.strip().isdigit() and count.strip().isdigit()):
            raise click.BadParameter(f"{shard!r}: write I/N, e.g. 3/16", param_hint="--shard")
        if not 0 <= int(index) < int(count):
            raise click.BadParameter(f"{shard!r}: need 0 <= I < N", param_hint="--shard")
        rows = ft.shard(int(index), int(count))
    with _errors():
        config = _load(config_path)
        ids = _chosen_ids(config, ids_given)
        model = build_model(config)
        trak = build_trak(config, model, _globals().progress)
        train = build_data(config.train, config, model)
        log.info("featurizing model ids %s%s", ids, f", shard {shard}" if shard else "")
        trak.featurize(
            train, checkpoints=_checkpoints(config, ids), model_ids=ids, rows=rows, repair=repair
        )
        _say(str(trak.progress()))


# ---------------------------------------------------------------------- score


def write_topk(path: Path, top: Any, model_ids: list[int], n_train: int) -> None:
    """Top-k as JSON (one object per target) or CSV (target, kind, rank, train_index,
    score), by the suffix of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    num_targets, k = top.proponents.shape
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["target", "kind", "rank", "train_index", "score"])
            for t in range(num_targets):
                for kind, index, score in (
                    ("proponent", top.proponents, top.proponent_scores),
                    ("opponent", top.opponents, top.opponent_scores),
                ):
                    for rank in range(k):
                        writer.writerow(
                            [t, kind, rank, int(index[t, rank]), repr(float(score[t, rank]))]
                        )
        return
    targets = [
        {
            "target": t,
            "proponents": top.proponents[t].tolist(),
            "proponent_scores": top.proponent_scores[t].tolist(),
            "opponents": top.opponents[t].tolist(),
            "opponent_scores": top.opponent_scores[t].tolist(),
        }
        for t in range(num_targets)
    ]
    head = {"k": k, "n_train": n_train, "n_targets": num_targets, "model_ids": model_ids}
    lines = ",\n  ".join(json.dumps(target) for target in targets)  # one line per target
    path.write_text(json.dumps(head)[:-1] + f', "targets": [\n  {lines}\n]}}\n')


@main.command(
    epilog="""\b
Examples:
  fasttrak score -c run.toml                       # top-k to [score] out (topk.json)
  fasttrak score -c run.toml --out top.csv --topk 20
  fasttrak score -c run.toml --save scores.zarr    # also the dense scores, on disk
"""
)
@config_option()
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Top-k file (.json or .csv). Default: [score] out, else topk.json next to the config.",
)
@click.option("--topk", type=click.IntRange(min=1), help="k (default: [score] topk, 10).")
@click.option(
    "--save",
    type=click.Path(path_type=Path),
    help="Also save the dense scores (zarr) there. Default: [score] save.",
)
@click.option("--overwrite", is_flag=True, help="Replace other scores saved at --save.")
@click.option("--model-ids", help="Score with these model ids only (default: all).")
def score(
    config_path: Path,
    out: Path | None,
    topk: int | None,
    save: Path | None,
    overwrite: bool,
    model_ids: str | None,
) -> None:
    """Score the config's targets against the training set (the store must be complete:
    exit 3 names the missing chunks) and write each target's top proponents and opponents."""
    ids_given = _parse_ids(model_ids)
    with _errors():
        config = _load(config_path)
        ids = _chosen_ids(config, ids_given, config.score.model_ids)
        _, _, scores = _scores(config, ids, config.score.batch_size)
        n_targets, n_train = scores.shape
        k = min(topk or config.score.topk, n_train)
        path = out or config.score.out or config.default_out("topk.json")
        if path.suffix.lower() not in (".json", ".csv"):
            raise CommandError(f"--out {path}: use a .json or .csv file name", EXIT_USAGE)
        write_topk(path, scores.topk(k), ids, n_train)
        _say(f"scored {n_targets} targets against {n_train} training rows (models {ids})")
        _say(f"top {k}: {path}")
        target = save or config.score.save
        if target is not None:
            scores.save(target, overwrite=overwrite)
            _say(f"scores: {target}")


# ---------------------------------------------------------------------- report


def _lds_of(path: Path | None) -> Any:
    """The LDS that ``evaluate`` wrote to ``path`` (an ft.evaluate.LDSResult), or None."""
    import numpy as np

    from fasttrak.evaluate import LDSResult

    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        per_target = np.array(
            [math.nan if v is None else v for v in saved["per_target"]], dtype=np.float64
        )
        return LDSResult(
            float(saved["lds"]),
            math.nan if saved["stderr"] is None else float(saved["stderr"]),
            per_target,
            int(saved["num_valid"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("ignoring %s (not an evaluate result: %s)", path, error)
        return None


@main.command(
    epilog="""\b
Examples:
  fasttrak report -c run.toml                    # to [report] out (report/)
  fasttrak report -c run.toml --out /tmp/report --top 10
  fasttrak report -c run.toml --scores scores.zarr   # scores saved by `score --save`
"""
)
@config_option()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Report folder. Default: [report] out, else report/ next to the config.",
)
@click.option("--top", type=click.IntRange(min=1), help="Proponents/opponents per target.")
@click.option(
    "--scores",
    "scores_path",
    type=click.Path(exists=True, path_type=Path),
    help="Load scores saved by `score --save` instead of computing them.",
)
@click.option("--model-ids", help="Score with these model ids only (default: all).")
def report(
    config_path: Path,
    out: Path | None,
    top: int | None,
    scores_path: Path | None,
    model_ids: str | None,
) -> None:
    """Write an HTML report: per target its top proponents and opponents, the suspected
    mislabels (most negative total influence, highest self-influence), the store's settings
    and the LDS (when `fasttrak evaluate` has written one)."""
    ids_given = _parse_ids(model_ids)
    with _errors():
        try:
            from fasttrak.report import html
        except ImportError as error:
            raise CommandError(
                f"this fasttrak has no HTML report (fasttrak.report.html): {error}",
                EXIT_FASTTRAK,
            ) from error
        from fasttrak.config import build_data, build_display, build_model, build_trak
        from fasttrak.store.api import store_info

        config = _load(config_path)
        ids = _chosen_ids(config, ids_given, config.score.model_ids)
        if scores_path is not None:
            import fasttrak as ft

            _require_features(config, ids)
            model = build_model(config)
            trak = build_trak(config, model, _globals().progress)
            targets = build_data(_require_targets(config), config, model)
            scores: Any = ft.Scores.load(scores_path)
        else:
            trak, targets, scores = _scores(config, ids, config.score.batch_size)
        train = build_display(config.train, config, build_data(config.train, config, trak.model))
        targets = build_display(_require_targets(config), config, targets)
        settings, _ = store_info(config.store)
        settings = {**settings, "config": str(config.path), "model ids": ids}
        self_influence = (
            trak.self_influence(model_ids=ids) if config.report.self_influence else None
        )
        evaluation = config.evaluate.out if config.evaluate else None
        path = html(
            out or config.report.out or config.default_out("report"),
            scores,
            train,
            targets,
            top=top or config.report.top,
            self_influence=self_influence,
            class_names=config.report.class_names,
            lds=_lds_of(evaluation or config.default_out("lds.json")),
            settings=settings,
            title=config.report.title,
            max_targets=config.report.max_targets,
        )
        _say(f"report: {path}")


# ---------------------------------------------------------------------- evaluate


@main.command(
    epilog="""\b
Examples:
  fasttrak evaluate -c run.toml                  # [evaluate] train_fn, subsets, alpha, ...
  fasttrak evaluate -c run.toml --subsets 20 --out lds-20.json
"""
)
@config_option()
@click.option(
    "--subsets",
    type=click.IntRange(min=2),
    help="Retrained subsets (default: [evaluate] subsets, 100).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON result. Default: [evaluate] out, else lds.json next to the config.",
)
@click.option("--model-ids", help="Score with these model ids only (default: all).")
def evaluate(
    config_path: Path, subsets: int | None, out: Path | None, model_ids: str | None
) -> None:
    """The LDS of the config's scores: retrain with [evaluate] train_fn(mask, seed) on random
    subsets of the training set (cached on disk, resumable) and correlate."""
    import functools

    import numpy as np

    import fasttrak as ft
    from fasttrak.config import import_object

    ids_given = _parse_ids(model_ids)
    with _errors():
        config = _load(config_path)
        section = config.evaluate
        if section is None:
            raise CommandError(
                f"{config.path.name} has no [evaluate] section: add one with train_fn = "
                '"pkg.train:retrain" (train_fn(mask, seed) returns the outputs on the targets)',
                EXIT_USAGE,
            )
        ids = _chosen_ids(config, ids_given, section.model_ids, config.score.model_ids)
        train_fn = import_object(section.train_fn, "train_fn", config)
        if not callable(train_fn):
            raise CommandError(
                f"[evaluate] train_fn = {section.train_fn!r} is not callable", EXIT_USAGE
            )
        if section.args:
            train_fn = functools.partial(train_fn, **section.args)
        _, _, scores = _scores(config, ids, config.score.batch_size)
        dense = scores.numpy()
        num_subsets = subsets or section.subsets
        masks = ft.evaluate.sample_subsets(dense.shape[1], num_subsets, section.alpha, section.seed)
        key = json.dumps(
            {
                "train_fn": section.train_fn,
                "args": section.args,
                "alpha": section.alpha,
                "seed": section.seed,
                "targets": dense.shape[0],
            },
            sort_keys=True,
            default=str,
        )
        cache = section.cache or config.default_out("lds_cache")
        masks, outputs = ft.evaluate.retrain(
            train_fn,
            masks,
            seeds_per_subset=section.seeds_per_subset,
            cache_dir=cache / f"{num_subsets}",
            key=key,
            progress=_globals().progress,
        )
        result = ft.evaluate.lds(dense, masks, outputs)
        path = out or section.out or config.default_out("lds.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "lds": result.mean,
            "stderr": None if math.isnan(result.stderr) else result.stderr,
            "num_valid": result.num_valid,
            "num_targets": int(dense.shape[0]),
            "per_target": [None if math.isnan(v) else float(v) for v in result.per_target],
            "subsets": num_subsets,
            "alpha": section.alpha,
            "seed": section.seed,
            "seeds_per_subset": section.seeds_per_subset,
            "model_ids": ids,
            "train_fn": section.train_fn,
            "config": str(config.path),
        }
        path.write_text(json.dumps(document, indent=1) + "\n")
        click.echo(f"{result} with {len(ids)} models, {num_subsets} subsets")
        _say(f"result: {path}")
        if not np.isfinite(result.mean):
            raise CommandError("the LDS is not finite", EXIT_DATA)


# ---------------------------------------------------------------------- demo, store tools


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("fasttrak-demo"),
    show_default=True,
    help="Output directory (store, ground-truth cache, figure); reused when rerun.",
)
@click.option(
    "--models",
    "num_models",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Attribution models, each trained on a random half.",
)
@click.option(
    "--subsets",
    "num_subsets",
    type=click.IntRange(min=2),
    default=100,
    show_default=True,
    help="Random subsets retrained for the LDS ground truth.",
)
@click.option(
    "--targets",
    "num_targets",
    type=click.IntRange(min=1, max=797),
    default=300,
    show_default=True,
    help="Test digits to attribute.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the split, the subsets and the models.",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def demo(
    out_dir: Path,
    num_models: int,
    num_subsets: int,
    num_targets: int,
    seed: int,
    no_progress: bool,
) -> None:
    """Attribute digits with TRAK on a small MLP and report its LDS (offline, ~1 min on CPU).

    \b
    Example:
      fasttrak demo --out fasttrak-demo --models 5 --subsets 100
    """
    from fasttrak.demo import run_demo
    from fasttrak.errors import FastTrakError

    try:
        result = run_demo(
            out_dir,
            num_models=num_models,
            num_subsets=num_subsets,
            num_targets=num_targets,
            seed=seed,
            progress=not no_progress and _globals().progress,
            echo=click.echo,
        )
    except (FastTrakError, ImportError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"\nfigure: {result.paths['figure']}")


def _store_path(path: Path | None, config_path: Path | None) -> Path:
    """PATH, or the store of the config given with -c (exactly one of them)."""
    if (path is None) == (config_path is None):
        raise click.UsageError("give either a store PATH or -c CONFIG (one of them)")
    if path is not None:
        if not path.is_dir():
            raise click.BadParameter(f"{path} is not a directory", param_hint="PATH")
        return path
    assert config_path is not None
    store: Path = _load(config_path).store
    if not store.is_dir():
        raise CommandError(
            f"the store {store} does not exist yet: run `fasttrak featurize -c {config_path}`",
            EXIT_INCOMPLETE,
        )
    return store


STORE_ARGUMENT = click.argument(
    "path", required=False, type=click.Path(file_okay=False, path_type=Path)
)


@main.command(
    epilog="""\b
Examples:
  fasttrak verify runs/digits
  fasttrak verify -c run.toml
  fasttrak verify runs/digits/scores.zarr       # saved scores
"""
)
@STORE_ARGUMENT
@config_option(required=False)
def verify(path: Path | None, config_path: Path | None) -> None:
    """Check every record, chunk and kernel of the store at PATH (or of the config's store,
    or saved scores at PATH) against its checksum. Exit status 1 if anything is damaged."""
    from fasttrak.store.api import verify_store

    with _errors():
        report = verify_store(_store_path(path, config_path))
    click.echo(str(report))
    if not report.ok:
        click.get_current_context().exit(EXIT_INCOMPLETE)


@main.command(
    epilog="""\b
Example:
  fasttrak repair runs/digits && fasttrak featurize -c run.toml
"""
)
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def repair(path: Path) -> None:
    """Repair the store at PATH: un-finish damaged chunks (the next featurize with the same
    data and checkpoints recomputes only them), delete damaged kernels (rebuilt on the next
    score), restore damaged records from their copies, remove leftovers of dead processes."""
    from fasttrak.store.api import repair_store

    with _errors():
        report = repair_store(path)
    click.echo(str(report))


@main.command(
    epilog="""\b
Examples:
  fasttrak info runs/digits
  fasttrak info -c run.toml || echo "not complete yet"
"""
)
@STORE_ARGUMENT
@config_option(required=False)
def info(path: Path | None, config_path: Path | None) -> None:
    """Show a store's settings (PATH, or the store of -c CONFIG) and, per model id, which row
    chunks are featurized.

    Exit status 0 when every model is complete, 1 when chunks are missing or damaged (or
    nothing is featurized yet).
    """
    from fasttrak.store.api import store_info

    with _errors():
        settings, done = store_info(_store_path(path, config_path))
    for name, value in settings.items():
        click.echo(f"{name:15} {value}")
    click.echo(str(done))
    if not done.complete:
        click.get_current_context().exit(EXIT_INCOMPLETE)


if __name__ == "__main__":
    main()
