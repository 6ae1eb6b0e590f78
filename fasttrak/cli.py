"""The ``fasttrak`` command line."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
@click.version_option(package_name="fasttrak")
def main() -> None:
    """fasttrak: fast, resumable TRAK data attribution for PyTorch."""


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
    """Attribute digits with TRAK on a small MLP and report its LDS (offline, ~1 min on CPU)."""
    from fasttrak.demo import run_demo
    from fasttrak.errors import FastTrakError

    try:
        result = run_demo(
            out_dir,
            num_models=num_models,
            num_subsets=num_subsets,
            num_targets=num_targets,
            seed=seed,
            progress=not no_progress,
            echo=click.echo,
        )
    except (FastTrakError, ImportError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"\nfigure: {result.paths['figure']}")


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(path: Path) -> None:
    """Check every record, chunk and kernel of the store at PATH (or saved scores at PATH)
    against its checksum. Exit status 1 if anything is damaged."""
    from fasttrak.errors import FastTrakError
    from fasttrak.store.api import verify_store

    try:
        report = verify_store(path)
    except FastTrakError as error:
        raise click.ClickException(str(error)) from error
    click.echo(str(report))
    if not report.ok:
        click.get_current_context().exit(1)


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def repair(path: Path) -> None:
    """Repair the store at PATH: un-finish damaged chunks (the next featurize with the same
    data and checkpoints recomputes only them), delete damaged kernels (rebuilt on the next
    score), restore damaged records from their copies, remove leftovers of dead processes."""
    from fasttrak.errors import FastTrakError
    from fasttrak.store.api import repair_store

    try:
        report = repair_store(path)
    except FastTrakError as error:
        raise click.ClickException(str(error)) from error
    click.echo(str(report))


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def info(path: Path) -> None:
    """Show a store's settings and, per model id, which row chunks are featurized.

    Exit status 0 when every model is complete, 1 when chunks are missing or damaged (or
    nothing is featurized yet).
    """
    from fasttrak.errors import FastTrakError
    from fasttrak.store.api import store_info

    try:
        settings, done = store_info(path)
    except FastTrakError as error:
        raise click.ClickException(str(error)) from error
    for name, value in settings.items():
        click.echo(f"{name:15} {value}")
    click.echo(str(done))
    if not done.complete:
        click.get_current_context().exit(1)


if __name__ == "__main__":
    main()
