"""Saved score arrays: written block by block, resumable, published atomically, verified.

``Scores.save(path)`` writes into ``path.partial`` (a zarr array, an identity record and a
done mark per column block), then seals the per-chunk CRC32Cs into the array's attributes
and renames ``path.partial`` to ``path`` in one step. A killed save resumes from its done
blocks; a partial output never sits at ``path``; finished scores of another run at ``path``
are replaced only with ``overwrite=True``. Savers of one path take turns (a flock on the
hidden file ``.NAME.lock`` beside it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import zarr

from fasttrak.errors import ConfigError, ScoresExistError, StoreCorruptError, StoreError
from fasttrak.store.arrays import chunk_grid, new_array, read_whole
from fasttrak.store.files import DirectoryFiles, held, os_errors
from fasttrak.store.records import DamagedRecord, checksum, decode, encode, seal, unseal

Blocks = Callable[[set[int]], Iterator[tuple[int, slice, np.ndarray]]]
"""blocks(skip) yields (block index, column slice, scores (n_targets, columns)) for every
column block not in ``skip``."""

Writer = Callable[[str, list[int]], None]
"""writer(path, blocks) computes these column blocks elsewhere (a runner's workers), each
written with :func:`write_blocks` into ``path``'s partial save."""


def save_scores(
    path: str | Path,
    shape: tuple[int, int],
    block_columns: int,
    identity: str,
    blocks: Blocks,
    overwrite: bool = False,
    writer: Writer | None = None,
) -> zarr.Array:
    """Write scores of shape (n_targets, n_train) to a zarr array at ``path``; the column
    blocks are computed here, or by ``writer`` (in parallel elsewhere)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ConfigError(f"scores.save needs a directory path, got {path!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file; pass a new path (a directory) for the scores")
    path.parent.mkdir(parents=True, exist_ok=True)
    name, partial = path.name, f"{path.name}.partial"
    files = DirectoryFiles(path.parent, staging=f"{partial}/tmp")
    # One saver at a time per path (a hidden lock file beside it, kept): a second one
    # waits, then finds the scores saved.
    with held(files.lock(f".{name}.lock", wait=True)):
        return _save_locked(files, path, shape, block_columns, identity, blocks, overwrite, writer)


def _save_locked(
    files: DirectoryFiles,
    path: Path,
    shape: tuple[int, int],
    block_columns: int,
    identity: str,
    blocks: Blocks,
    overwrite: bool,
    writer: Writer | None,
) -> zarr.Array:
    name, partial = path.name, f"{path.name}.partial"
    if files.exists(name):
        existing = _finished_identity(files, name)
        if existing == identity and _intact(files, name):
            return zarr.open_array(store=files.zarr_store(name), mode="r")
        if not overwrite and existing != identity:  # (the same scores, damaged, are rewritten)
            what = "other scores" if existing else "something that is not fasttrak scores"
            raise ScoresExistError(
                f"{path} holds {what}; pass overwrite=True to replace them, or another path"
            )
    chunks = (shape[0], block_columns)
    if _partial_identity(files, partial) != identity:
        files.delete_tree(partial)
        new_array(files.zarr_store(partial), shape, "float32", chunks)
        files.create(f"{partial}/identity.json", encode({"identity": identity}))
    array = zarr.open_array(store=files.zarr_store(partial), mode="r+")
    if _finished_identity(files, partial) != identity:
        grid = [index[1] for index, _ in chunk_grid(shape, chunks)]
        done = _done_blocks(files, partial)
        if writer is None:
            done.update(_write(files, partial, array, str(path), blocks(set(done))))
        else:
            writer(str(path), [j for j in grid if j not in done])
            done = _done_blocks(files, partial)
            missing = [j for j in grid if j not in done]
            if missing:
                raise StoreError(
                    f"the parallel save of {path} left column blocks {missing[:10]} unwritten; "
                    "save again: the written blocks are kept"
                )
        array.attrs["fasttrak"] = seal(
            {
                "kind": "scores",
                "identity": identity,
                "shape": list(shape),
                "dtype": "float32",
                "chunks": list(chunks),
                "chunk_crc32c": [done[j] for j in grid],
            }
        )
    files.delete_tree(f"{partial}/blocks")
    files.delete(f"{partial}/identity.json")
    if files.exists(name):  # overwrite=True: the old scores go only now
        files.delete_tree(name)
    if not files.publish(partial, name) and _finished_identity(files, name) != identity:
        raise ScoresExistError(f"another process saved other scores at {path} meanwhile")
    return zarr.open_array(store=files.zarr_store(name), mode="r")


def write_blocks(path: str | Path, blocks: Iterator[tuple[int, slice, np.ndarray]]) -> None:
    """Write column blocks into the partial save of ``path`` that a :func:`save_scores`
    holding its lock has set up (a runner's worker does this for its blocks)."""
    path = Path(path)
    partial = f"{path.name}.partial"
    files = DirectoryFiles(path.parent, staging=f"{partial}/tmp")
    array = zarr.open_array(store=files.zarr_store(partial), mode="r+")
    _write(files, partial, array, str(path), blocks)


def _write(
    files: DirectoryFiles,
    partial: str,
    array: zarr.Array,
    where: str,
    blocks: Iterator[tuple[int, slice, np.ndarray]],
) -> dict[int, int]:
    """Write each block, then its done mark; block -> CRC32C of what was written."""
    done = {}
    for j, columns, block in blocks:
        block = np.ascontiguousarray(block, dtype=np.float32)
        with os_errors(f"block {j} of the scores at {where}"):
            array[:, columns] = block
        done[j] = checksum(block)
        files.create(f"{partial}/blocks/{j}.json", encode({"block": j, "crc": done[j]}))
    return done


def load_scores(path: str | Path) -> np.ndarray:
    """The scores saved at ``path`` (n_targets, n_train) float32, verified chunk by chunk."""
    path = Path(path)
    if not (path / "zarr.json").exists() and (path / "c").is_dir():
        raise StoreCorruptError(
            f"saved scores {path}: their metadata (zarr.json) is missing; save the scores "
            "again with scores.save(path, overwrite=True)"
        )
    if not (path / "zarr.json").exists():
        partial = path.with_name(path.name + ".partial")
        hint = " (an unfinished save is at .partial: run save again)" if partial.exists() else ""
        raise StoreError(f"no saved scores at {path}{hint}")
    files = DirectoryFiles(path.parent, staging=f"{path.name}.partial/tmp")
    fix = "save the scores again: scores.save(path) rewrites a damaged save of the same scores"
    data, record = read_whole(files, path.name, f"saved scores {path}", fix)
    if record.get("kind") != "scores":
        raise StoreCorruptError(f"{path} is not a fasttrak scores array; {fix}")
    return data


def _intact(files: DirectoryFiles, key: str) -> bool:
    try:
        read_whole(files, key, key, "")
    except StoreCorruptError:
        return False
    return True


def _finished_identity(files: DirectoryFiles, key: str) -> str | None:
    """The identity sealed into a finished scores array at ``key``, or None."""
    try:
        array = zarr.open_array(store=files.zarr_store(key), mode="r")
        record = unseal(dict(array.attrs).get("fasttrak"))
    except Exception:  # not an array, damaged metadata, no or damaged record
        return None
    return str(record.get("identity")) if record.get("kind") == "scores" else None


def _partial_identity(files: DirectoryFiles, partial: str) -> str | None:
    data = files.read(f"{partial}/identity.json")
    if data is None or not files.exists(f"{partial}/zarr.json"):
        return _finished_identity(files, partial)
    try:
        return str(decode(data)["identity"])
    except (DamagedRecord, KeyError):
        return None


def _done_blocks(files: DirectoryFiles, partial: str) -> dict[int, int]:
    """Column blocks of a partial save whose done mark is intact: block -> CRC32C."""
    done = {}
    for name in files.list(f"{partial}/blocks"):
        data = files.read(f"{partial}/blocks/{name}")
        try:
            fields = decode(data or b"")
            done[int(fields["block"])] = int(fields["crc"])
        except (DamagedRecord, KeyError, ValueError):
            files.delete(f"{partial}/blocks/{name}")  # redone
    return done
