"""Turning what users pass as data (datasets, loaders, tensors) into row-addressable batches,
and fingerprinting the rows so that a store can tell when the training data changed."""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, cast, overload

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_map
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    SequentialSampler,
    Subset,
    TensorDataset,
    default_collate,
)

from fasttrak.errors import ConfigError, DataError, DataTypeError


@dataclass
class Rows:
    """A map-style dataset and how to batch it; batches can start at any row."""

    dataset: Dataset
    batch_size: int
    collate_fn: Callable[[list[Any]], Any] = default_collate
    num_workers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _fast(self) -> bool:
        return isinstance(self.dataset, TensorDataset) and self.collate_fn is default_collate

    @property
    def _tensors(self) -> tuple[Tensor, ...]:
        """The tensors of a TensorDataset (only when :meth:`_fast`)."""
        return cast(TensorDataset, self.dataset).tensors

    @overload
    def batches(
        self, rows: slice, with_hashes: Literal[False] = ...
    ) -> Iterator[tuple[slice, Any]]: ...

    @overload
    def batches(
        self, rows: slice, with_hashes: Literal[True]
    ) -> Iterator[tuple[slice, Any, np.ndarray]]: ...

    @overload
    def batches(self, rows: slice, with_hashes: bool) -> Iterator[tuple[Any, ...]]: ...

    def batches(self, rows: slice, with_hashes: bool = False) -> Iterator[tuple[Any, ...]]:
        """Yield (row slice, collated batch) covering ``rows`` in order; with ``with_hashes``,
        (row slice, batch, hashes) where hashes are the rows' fingerprints, np.uint64 (B,)."""
        if self._fast():
            # Slicing gives exactly what default_collate would stack, without a Python loop.
            # Hashes are computed for blocks of whole batches (about 4 MiB of rows) at once.
            tensors, size = self._tensors, self.batch_size
            step = size * max(1, _fast_block_rows(tensors) // size) if with_hashes else size
            for block in range(rows.start, rows.stop, step):
                block_stop = min(block + step, rows.stop)
                hashes = self.hashes(slice(block, block_stop)) if with_hashes else None
                for start in range(block, block_stop, size):
                    where = slice(start, min(start + size, block_stop))
                    sliced = tuple(t[where] for t in tensors)
                    if hashes is None:
                        yield where, sliced
                    else:
                        yield where, sliced, hashes[start - block : where.stop - block]
            return
        loader = DataLoader(
            Subset(self.dataset, range(rows.start, rows.stop)),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=HashingCollate(self.collate_fn) if with_hashes else self.collate_fn,
            num_workers=self.num_workers,
        )
        start = rows.start
        loaded: Any
        content: Any
        for loaded in loader:
            batch, content = loaded if with_hashes else (loaded, None)
            if isinstance(batch, Mapping) and not isinstance(batch, dict):
                batch = dict(batch)  # BatchEncoding: pytree sees a plain dict's tensors only
            if with_hashes:
                size = len(content)
                yield slice(start, start + size), batch, _with_rows(content, start)
            else:
                size = _leading_size(batch)
                yield slice(start, start + size), batch
            start += size

    def hashes(self, rows: slice) -> np.ndarray:
        """The fingerprints of the rows ``rows`` (np.uint64, (rows,)), as ``batches(rows,
        with_hashes=True)`` gives them, from the items alone: nothing is collated."""
        start, stop = rows.start, rows.stop
        if self._fast():
            step = _fast_block_rows(self._tensors)
            out = [
                _with_rows(
                    _tensor_content(tuple(t[a : min(a + step, stop)] for t in self._tensors)),
                    a,
                )
                for a in range(start, stop, step)
            ]
            return np.concatenate(out) if out else np.zeros(0, np.uint64)
        loader = DataLoader(
            Subset(self.dataset, range(start, stop)),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=HashingCollate(None),
            num_workers=self.num_workers,
        )
        out = list(loader)
        content = np.concatenate(out) if out else np.zeros(0, np.uint64)
        return _with_rows(content, start)


def as_rows(data: Any, batch_size: int) -> Rows:
    """A Dataset, a non-shuffling DataLoader, or a tuple of equally long tensors."""
    if isinstance(data, DataLoader):
        if not isinstance(data.sampler, SequentialSampler) or isinstance(
            data.dataset, IterableDataset
        ):
            raise ConfigError(
                "the DataLoader shuffles or samples; fasttrak needs rows in a fixed order to "
                "resume and to match scores to examples: pass the dataset itself, or a "
                "DataLoader with shuffle=False"
            )
        return Rows(data.dataset, data.batch_size or batch_size, data.collate_fn, data.num_workers)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
        if len({t.shape[0] for t in data}) != 1:
            raise DataError("tensors passed as data must all have the same first dimension")
        return Rows(TensorDataset(*data), batch_size)
    if isinstance(data, IterableDataset) or not (
        hasattr(data, "__len__") and hasattr(data, "__getitem__")
    ):
        raise DataTypeError(
            f"data must be a map-style Dataset (with __len__ and __getitem__), a DataLoader "
            f"with shuffle=False, or a tuple of tensors; got {type(data).__name__}"
        )
    return Rows(data, batch_size)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch to ``device``. Mapping batches that are not dicts (a
    tokenizer's ``BatchEncoding``, which pytree treats as one leaf) become plain dicts."""
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        batch = dict(batch)
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)


def _leading_size(batch: Any) -> int:
    sizes: list[int] = []
    tree_map(
        lambda t: sizes.append(t.shape[0]) if isinstance(t, Tensor) and t.ndim else None, batch
    )
    if not sizes:
        raise DataTypeError(
            "a batch holds no tensors; make your dataset return tensors (or numbers)"
        )
    return sizes[0]


# ---------------------------------------------------------------- row fingerprints
#
# A row's hash is fmix(sum over the item's leaves of leaf_hash + splitmix64(row index)), all
# in uint64 arithmetic with wraparound. A leaf (tensor, array, number, string) is hashed as
#     leaf_hash = fmix(tag(path, dtype, shape) + sum_j word_j * K_j)
# where word_j are its raw bytes (C order, zero-padded to a multiple of 8) read as uint64,
# K_j = splitmix64(j) | 1, and tag is a blake2b digest of the leaf's path in the item ("[0]",
# "['input_ids']"), dtype name and shape. Leaves are summed, so the order of a dict's keys
# does not matter (the path carries the key); a tuple's order does (the path carries the
# index). The same leaves give the same hash whether they come from a TensorDataset's slices,
# from items, or from numpy instead of torch.

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_S30, _S27, _S31 = _U64(30), _U64(27), _U64(31)
_FAST_BLOCK_BYTES = 1 << 22  # the fast path hashes about 4 MiB of rows at once
_INT64 = struct.Struct("=q")
_FLOAT64 = struct.Struct("=d")
_FIX = (
    "return tensors, numpy arrays, numbers or strings (or tuples, lists and dicts of them) "
    'from the dataset\'s __getitem__, or pass check_data="sample" to featurize to check '
    "only a sample of chunks"
)


def _fmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (n,); consumes x."""
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


_consts = np.zeros(0, _U64)


def _word_consts(w: int) -> np.ndarray:
    """K_j = splitmix64(j) | 1 for j < w, uint64 (w,)."""
    global _consts
    if len(_consts) < w:
        size = max(w, 2 * len(_consts), 64)
        _consts = _fmix(np.arange(1, size + 1, dtype=_U64) * _GOLDEN) | _U64(1)
    return _consts[:w]


@lru_cache(maxsize=1 << 16)
def _tag(path: str, dtype: str, shape: tuple[int, ...]) -> np.uint64:
    digest = hashlib.blake2b(f"{path}|{dtype}|{shape}".encode(), digest_size=8).digest()
    return _U64(int.from_bytes(digest, "little"))


def _leaf_hashes(buf: np.ndarray, tag: np.uint64) -> np.ndarray:
    """Hashes (n,) uint64 of n leaves of one path, dtype and shape, from their bytes (n, b)."""
    n, nbytes = buf.shape
    words = -(-nbytes // 8)
    if nbytes != 8 * words:
        padded = np.zeros((n, 8 * words), np.uint8)
        padded[:, :nbytes] = buf
        buf = padded
    elif not buf.flags.c_contiguous:
        buf = np.ascontiguousarray(buf)
    acc = buf.view(_U64) @ _word_consts(words) if words else np.zeros(n, _U64)
    acc += tag
    return _fmix(acc)


def _with_rows(content: np.ndarray, start: int) -> np.ndarray:
    """Row hashes (n,) from the items' content hashes (n,) and their rows start, start + 1..."""
    index = np.arange(start, start + len(content), dtype=_U64) * _GOLDEN
    return _fmix(content + _fmix(index))


def row_hashes(batch: Any, rows: np.ndarray) -> np.ndarray:
    """The row fingerprints (np.uint64 (B,)) of a collated batch whose examples are the
    training rows ``rows`` (B,): what ``TRAK.featurize`` records for a TensorDataset of these
    tensors (a tuple of tensors), or for a dataset whose items are the batch's rows. For
    callers that featurize batch by batch (``fasttrak.compat.trak``) into the same store."""
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, Tensor) for t in batch):
        content = _tensor_content(tuple(batch))
    else:
        size = len(rows)
        items = [
            tree_map(
                lambda t, i=i: (
                    t[i] if isinstance(t, Tensor) and t.ndim and t.shape[0] == size else t
                ),
                batch,
            )
            for i in range(size)
        ]
        content = _content_hashes(items)
    index = rows.astype(np.uint64) * _GOLDEN
    return _fmix(content + _fmix(index))


def chunk_fingerprint(hashes: np.ndarray) -> str:
    """A 16-hex-digit digest of a chunk's row hashes (uint64 (rows,)), in order."""
    data = np.ascontiguousarray(hashes, dtype="<u8").tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


# ---- the fast path: a TensorDataset's slices, vectorised over rows


def _fast_block_rows(tensors: tuple[Tensor, ...]) -> int:
    """Rows of a TensorDataset hashed at once: about _FAST_BLOCK_BYTES of them."""
    row_bytes = sum(math.prod(t.shape[1:]) * t.element_size() for t in tensors)
    return max(1, _FAST_BLOCK_BYTES // max(1, row_bytes))


def _tensor_content(tensors: tuple[Tensor, ...]) -> np.ndarray:
    """Content hashes (B,) of the rows of a TensorDataset's slices (B, ...), equal to what
    HashingCollate gives for the items (t0[i], t1[i], ...)."""
    n = len(tensors[0])
    content = np.zeros(n, _U64)
    if n == 0:
        return content
    for i, t in enumerate(tensors):
        t = t.detach().cpu()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.resolve_conj().resolve_neg().contiguous()
        shape = tuple(t.shape[1:])
        flat = t.reshape(n, math.prod(shape)).view(torch.uint8).numpy()
        content += _leaf_hashes(flat, _tag(f"[{i}]", _dtype_name(t.dtype), shape))
    return content


# ---- the item path: any dataset's items, one Python pass per item


class HashingCollate:
    """Wraps a collate_fn to return (its batch, content hashes np.uint64 (B,)) of the items;
    with no collate_fn, only the hashes. Picklable, so DataLoader workers can run it."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[Any]) -> Any:
        content = _content_hashes(items)
        if self.collate_fn is None:
            return content
        return self.collate_fn(items), content


_seq_tags: dict[tuple[str, str], np.ndarray] = {}
_SCALAR_SEQ: dict[type, tuple[str, type]] = {
    int: ("torch.int64", np.int64),
    float: ("torch.float64", np.float64),
}
_SCALAR_SEQ[bool] = ("torch.bool", np.bool_)


def _content_hashes(items: list[Any]) -> np.ndarray:
    """Content hashes (n,) uint64 of n dataset items (before the row index is mixed in)."""
    leaves: dict[tuple[str, str, tuple[int, ...]], tuple[list[int], list[bytes]]] = {}
    seqs: dict[tuple[str, str], tuple[list[int], list[np.ndarray]]] = {}
    for r, item in enumerate(items):
        _walk(item, "", r, leaves, seqs)
    content = np.zeros(len(items), _U64)
    for key, (rows, datas) in leaves.items():
        # one path, dtype and shape: the same number of bytes in every item
        buf = np.frombuffer(b"".join(datas), np.uint8).reshape(len(datas), len(datas[0]))
        content[rows] += _leaf_hashes(buf, _tag(*key))
    for (path, dtype), (rows, arrays) in seqs.items():
        content[rows] += _scalar_seq_hashes(path, dtype, arrays)
    return content


def _scalar_seq_hashes(path: str, dtype: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Per-item sums (m,) of the leaf hashes of m sequences of Python scalars at ``path``,
    each element j hashed as the leaf ``path[j]`` would be on its own."""
    lengths = np.fromiter(map(len, arrays), np.int64, len(arrays))
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    words = np.concatenate(arrays)
    position = np.arange(len(words)) - np.repeat(starts, lengths)
    tags = _seq_tags.get((path, dtype))
    if tags is None or len(tags) < lengths.max():
        size = max(int(lengths.max()), 2 * (0 if tags is None else len(tags)))
        tags = np.array([_tag(f"{path}[{j}]", dtype, ()) for j in range(size)], _U64)
        _seq_tags[(path, dtype)] = tags
    acc = words * _word_consts(1)[0]
    acc += tags[position]
    return np.add.reduceat(_fmix(acc), starts, dtype=_U64)


def _walk(x: Any, path: str, r: int, leaves: dict, seqs: dict) -> None:
    """Add the leaves of item r to ``leaves`` (by path, dtype, shape) and its sequences of
    Python scalars to ``seqs`` (by path, dtype)."""
    if isinstance(x, (tuple, list)):
        if len(x) > 1:
            kinds = set(map(type, x))
            if len(kinds) == 1 and (kind := kinds.pop()) in _SCALAR_SEQ:
                dtype, np_dtype = _SCALAR_SEQ[kind]
                try:
                    values: np.ndarray = np.array(x, np_dtype)
                except OverflowError:
                    raise DataError(_overflow(path)) from None
                rows, arrays = seqs.setdefault((path, dtype), ([], []))
                rows.append(r)
                arrays.append(values.astype(_U64) if kind is bool else values.view(_U64))
                return
        for j, v in enumerate(x):
            _walk(v, f"{path}[{j}]", r, leaves, seqs)
        return
    if not isinstance(x, Tensor) and isinstance(x, Mapping):
        for k, v in x.items():
            _walk(v, f"{path}[{_key(k, path)}]", r, leaves, seqs)
        return
    dtype, shape, data = _leaf(x, path)
    rows, datas = leaves.setdefault((path, dtype, shape), ([], []))
    rows.append(r)
    datas.append(data)


def _key(k: Any, path: str) -> str:
    if isinstance(k, str):
        return repr(k)
    if isinstance(k, (int, float, bytes, tuple)) or k is None:
        return f"{type(k).__name__}:{k!r}"
    raise DataTypeError(
        f"an item holds a dict key of type {type(k).__module__}.{type(k).__qualname__} "
        f"at item{path}; fasttrak fingerprints dict keys that are strings or numbers: {_FIX}"
    )


_dtype_names: dict[torch.dtype, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names[dtype] = str(dtype)
    return name


def _tensor_bytes(x: Tensor) -> bytes:
    """The raw bytes (C order) of any tensor: on any device, with grad, bfloat16, sparse..."""
    x = x.detach().cpu()
    if x.layout != torch.strided:
        x = x.to_dense()
    x = x.resolve_conj().resolve_neg().contiguous()
    return x.reshape(-1).view(torch.uint8).numpy().tobytes()


_torch_dtype_of: dict[np.dtype, str] = {}


def _leaf(x: Any, path: str) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype name, shape, raw bytes) of a leaf, as torch would hold it."""
    if isinstance(x, Tensor):
        try:
            data = x.numpy().tobytes()  # a CPU tensor of a numpy dtype, without grad or bits
        except (TypeError, RuntimeError, ValueError):
            data = _tensor_bytes(x)
        return _dtype_name(x.dtype), tuple(x.shape), data
    if isinstance(x, bool):
        return "torch.bool", (), b"\x01" if x else b"\x00"
    if isinstance(x, int):
        try:
            return "torch.int64", (), _INT64.pack(x)
        except struct.error:
            raise DataError(_overflow(path)) from None
    if isinstance(x, float):
        return "torch.float64", (), _FLOAT64.pack(x)
    if isinstance(x, str):
        data = x.encode("utf-8", "surrogatepass")
        return "str", (len(data),), data
    if isinstance(x, (bytes, bytearray, memoryview)):
        data = bytes(x)
        return "bytes", (len(data),), data
    if x is None:
        return "None", (), b""
    if isinstance(x, (np.ndarray, np.generic)) or (
        hasattr(x, "__array_interface__") or hasattr(x, "__array__")
    ):
        return _array_leaf(x, path)
    raise DataTypeError(
        f"cannot fingerprint an item's {type(x).__module__}.{type(x).__qualname__} at "
        f"item{path}: {_FIX}"
    )


def _array_leaf(x: Any, path: str) -> tuple[str, tuple[int, ...], bytes]:
    try:
        a = np.asarray(x)
    except Exception as e:
        raise DataTypeError(
            f"cannot read the {type(x).__module__}.{type(x).__qualname__} at item{path} as "
            f"an array ({e}): {_FIX}"
        ) from None
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    dtype = _torch_dtype_of.get(a.dtype)
    if dtype is None:
        if a.dtype.kind in "US":  # strings: torch has none, but the bytes are well defined
            dtype = f"numpy.{a.dtype.str}"
        else:
            try:
                dtype = str(torch.from_numpy(np.empty(0, a.dtype)).dtype)
            except (TypeError, ValueError, RuntimeError):
                raise DataTypeError(
                    f"cannot fingerprint a numpy array of dtype {a.dtype} (from "
                    f"{type(x).__module__}.{type(x).__qualname__}) at item{path}: {_FIX}"
                ) from None
        _torch_dtype_of[a.dtype] = dtype
    return dtype, a.shape, a.tobytes()


def _overflow(path: str) -> str:
    return (
        f"a Python int at item{path} does not fit in int64, as torch.tensor would need; "
        f"return it as a float or a string, or split it"
    )
