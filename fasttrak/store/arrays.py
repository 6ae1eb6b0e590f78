"""Zarr arrays with checksummed chunks: layout checks, verified reads, atomic publishing.

Every array fasttrak writes is uncompressed, NaN-filled (an unwritten chunk never reads as
plausible data) and chunked so that one unit of work is one chunk. Arrays written whole
(kernels, saved scores) keep their per-chunk CRC32Cs in a sealed record in their own
attributes and are published by renaming a finished staging directory into place, so a
reader sees all of such an array or nothing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr
import zarr.abc.store

from fasttrak.errors import StoreCorruptError
from fasttrak.store.files import Files, os_errors
from fasttrak.store.records import DamagedRecord, checksum, seal, unseal

Index = tuple[int, ...]


def new_array(
    store: zarr.abc.store.Store, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]
) -> zarr.Array:
    """An empty array at the root of ``store`` in fasttrak's layout."""
    return zarr.create_array(
        store=store,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=np.nan,
        compressors=None,
        filters=None,
        chunk_key_encoding={"name": "default", "separator": "/"},
    )


def open_array(files: Files, key: str, what: str, fix: str) -> zarr.Array:
    """Open the array at ``key``; StoreCorruptError if its metadata is missing or unreadable."""
    try:
        return zarr.open_array(store=files.zarr_store(key), mode="r+" if files.writable else "r")
    except Exception as error:  # zarr raises many kinds for a damaged zarr.json
        raise StoreCorruptError(
            f"{what}: the metadata of array {key} is missing or damaged ({error}); {fix}"
        ) from error


def layout_problem(
    array: zarr.Array, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]
) -> str | None:
    """Why ``array`` is not laid out as fasttrak wrote it, or None."""
    found = {
        "shape": tuple(array.shape),
        "dtype": str(array.dtype),
        "chunks": tuple(array.chunks),
    }
    wanted = {"shape": tuple(shape), "dtype": str(np.dtype(dtype)), "chunks": tuple(chunks)}
    problems = [f"{k} {found[k]} (expected {wanted[k]})" for k in wanted if found[k] != wanted[k]]
    fill = array.fill_value
    if not (isinstance(fill, (float, np.floating)) and math.isnan(fill)):
        problems.append(f"fill value {fill!r} (expected NaN)")
    codecs = array.metadata.codecs  # type: ignore[union-attr]
    if len(codecs) != 1 or type(codecs[0]).__name__ != "BytesCodec":
        problems.append(f"codecs {codecs} (expected uncompressed bytes)")
    elif getattr(getattr(codecs[0], "endian", None), "value", "little") != "little":
        problems.append("big-endian bytes (expected little-endian)")
    return "; ".join(problems) or None


def chunk_grid(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[tuple[Index, tuple]]:
    """(chunk index, slices) of every chunk, in C order of the chunk grid."""
    counts = [math.ceil(s / c) if s else 0 for s, c in zip(shape, chunks, strict=True)]
    for index in itertools.product(*(range(n) for n in counts)):
        yield (
            index,
            tuple(
                slice(i * c, min((i + 1) * c, s))
                for i, c, s in zip(index, chunks, shape, strict=True)
            ),
        )


def chunk_key(key: str, index: Index) -> str:
    """The storage key of one chunk ("default" encoding, "/" separator)."""
    return f"{key}/c/" + "/".join(str(i) for i in index)


def publish_whole(
    files: Files, key: str, data: np.ndarray, chunks: tuple[int, ...], record: dict[str, Any]
) -> bool:
    """Write ``data`` as a checksummed array and publish it at ``key``; False if another
    writer published there first (its array is kept)."""
    staged = files.staging_dir()
    with os_errors(key):
        array = new_array(files.zarr_store(staged), data.shape, str(data.dtype), chunks)
        array[...] = data
    array.attrs["fasttrak"] = seal(
        {
            **record,
            "shape": list(data.shape),
            "dtype": str(data.dtype),
            "chunks": list(chunks),
            "chunk_crc32c": [checksum(data[s]) for _, s in chunk_grid(data.shape, chunks)],
        }
    )
    return files.publish(staged, key)


def read_whole(files: Files, key: str, what: str, fix: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The verified contents and record of a published array.

    Raises StoreCorruptError naming the chunk for a damaged record, layout, missing chunk
    file or checksum mismatch."""
    array = open_array(files, key, what, fix)
    try:
        record = unseal(dict(array.attrs).get("fasttrak"))
    except DamagedRecord as error:
        raise StoreCorruptError(
            f"{what}: the checksum record of array {key} is damaged ({error}); {fix}"
        ) from error
    shape, chunks = tuple(record["shape"]), tuple(record["chunks"])
    problem = layout_problem(array, shape, record["dtype"], chunks)
    if problem:
        raise StoreCorruptError(f"{what}: the metadata of array {key} changed: {problem}; {fix}")
    grid = list(chunk_grid(shape, chunks))
    if len(grid) != len(record["chunk_crc32c"]):
        raise StoreCorruptError(f"{what}: the checksum record of {key} is incomplete; {fix}")
    for index, _ in grid:
        if not files.exists(chunk_key(key, index)):
            raise StoreCorruptError(
                f"{what}: chunk {index} of array {key} is missing (its file was deleted); {fix}"
            )
    try:
        data = np.asarray(array[...])
    except Exception as error:
        raise StoreCorruptError(f"{what}: array {key} cannot be read ({error}); {fix}") from error
    for (index, slices), expected in zip(grid, record["chunk_crc32c"], strict=True):
        if checksum(data[slices]) != expected:
            raise StoreCorruptError(
                f"{what}: chunk {index} of array {key} fails its checksum (damaged on disk); {fix}"
            )
    return data, record
