"""Row fingerprints: the same per-row hashes from every way of reading the same rows, at any
batch size, and a changed chunk fingerprint for any change to a chunk's rows."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from fasttrak import data
from fasttrak.data import HashingCollate, Rows, as_rows, chunk_fingerprint
from fasttrak.errors import ConfigError, DataError, DataTypeError

N, CHUNK = 200, 64


def make_xy(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 5, (n,), generator=gen)


class Items(Dataset):
    """Items built by ``make(i)``; module-level so that DataLoader workers can pickle it."""

    def __init__(self, n: int, make) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.make(i)


class Pairs:
    """``make`` for Items: (x[i], y[i]) as tensors, or as numpy, or with a Python int label."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, kind: str = "tensor") -> None:
        self.x, self.y, self.kind = x, y, kind

    def __call__(self, i: int):
        if self.kind == "numpy":
            return self.x[i].numpy(), self.y[i].numpy()
        if self.kind == "int":
            return self.x[i], int(self.y[i])
        return self.x[i], self.y[i]


def all_hashes(rows: Rows, n: int) -> np.ndarray:
    return rows.hashes(slice(0, n))


def fingerprints(rows: Rows, n: int) -> list[str]:
    h = all_hashes(rows, n)
    return [chunk_fingerprint(h[a : a + CHUNK]) for a in range(0, n, CHUNK)]


def changed_chunks(a: list[str], b: list[str]) -> list[int]:
    return [c for c, (fa, fb) in enumerate(zip(a, b, strict=True)) if fa != fb]


# ---------------------------------------------------------------- the same rows, the same hashes
def test_fast_path_equals_item_path_and_workers():
    x, y = make_xy()
    fast = all_hashes(Rows(TensorDataset(x, y), 16), N)
    assert fast.dtype == np.uint64 and fast.shape == (N,)
    assert len(set(fast.tolist())) == N
    for kind in ("tensor", "numpy", "int"):
        items = Rows(Items(N, Pairs(x, y, kind)), 7)
        assert np.array_equal(all_hashes(items, N), fast), kind
    # a DataLoader with worker processes: hashed in the workers, batches unchanged
    loader = DataLoader(Items(N, Pairs(x, y)), batch_size=7, num_workers=2)
    rows = as_rows(loader, 99)
    got = list(rows.batches(slice(0, N), with_hashes=True))
    assert np.array_equal(np.concatenate([h for _, _, h in got]), fast)
    assert np.array_equal(rows.hashes(slice(0, N)), fast)
    for (where, batch, h), plain in zip(got, DataLoader(Items(N, Pairs(x, y)), 7), strict=True):
        assert len(h) == where.stop - where.start == len(plain[0])
        assert torch.equal(batch[0], plain[0]) and torch.equal(batch[1], plain[1])


@settings(max_examples=25, deadline=None)
@given(
    batch_size=st.integers(1, 70),
    start=st.integers(0, N - 1),
    length=st.integers(1, N),
    fast=st.booleans(),
)
def test_hashes_do_not_depend_on_batch_size_or_chunk_bounds(batch_size, start, length, fast):
    x, y = make_xy()
    stop = min(N, start + length)
    reference = all_hashes(Rows(TensorDataset(x, y), 512), N)
    data = TensorDataset(x, y) if fast else Items(N, Pairs(x, y))
    rows = Rows(data, batch_size)
    parts = list(rows.batches(slice(start, stop), with_hashes=True))
    assert parts[0][0].start == start and parts[-1][0].stop == stop
    assert all(len(h) == w.stop - w.start for w, _, h in parts)
    got = np.concatenate([h for _, _, h in parts])
    assert np.array_equal(got, reference[start:stop])
    assert np.array_equal(rows.hashes(slice(start, stop)), got)
    assert chunk_fingerprint(got) == chunk_fingerprint(reference[start:stop])


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_fast_path_blocks(monkeypatch, batch_size):
    """The fast path hashes blocks of rows at once; any block size gives the same hashes."""
    x, y = make_xy()
    reference = all_hashes(Rows(TensorDataset(x, y), 512), N)
    monkeypatch.setattr(data, "_FAST_BLOCK_BYTES", 100)  # 3 rows of 32 bytes
    rows = Rows(TensorDataset(x, y), batch_size)
    parts = list(rows.batches(slice(3, N), with_hashes=True))
    assert [w.start for w, *_ in parts] == list(range(3, N, batch_size))
    assert np.array_equal(np.concatenate([h for *_, h in parts]), reference[3:])
    assert np.array_equal(rows.hashes(slice(3, N)), reference[3:])


def test_the_row_index_is_part_of_the_hash():
    same = Rows(Items(10, lambda i: (torch.zeros(3), 0)), 4)
    h = all_hashes(same, 10)
    assert len(set(h.tolist())) == 10
    assert np.array_equal(same.hashes(slice(4, 10)), h[4:])


def test_plain_batches_are_unchanged():
    x, y = make_xy(20)
    rows = Rows(TensorDataset(x, y), 8)
    plain = list(rows.batches(slice(3, 20)))
    hashed = list(rows.batches(slice(3, 20), with_hashes=True))
    assert [len(p) for p in plain] == [2] * 3 and [w for w, _ in plain] == [w for w, *_ in hashed]
    for (_, a), (_, b, _) in zip(plain, hashed, strict=True):
        assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


# ---------------------------------------------------------------- any change shows, in its chunk
def change(what: str, x: torch.Tensor, y: torch.Tensor):
    x, y = x.clone(), y.clone()
    if what == "label":
        y[70] = (y[70] + 1) % 5
    elif what == "bit":
        x.view(torch.int32)[130, 3] ^= 1  # the lowest mantissa bit of one input value
    elif what == "swap":
        x[[10, 11]], y[[10, 11]] = x[[11, 10]], y[[11, 10]]
    elif what == "dtype":
        y = y.int()  # the same labels as int32
    return x, y


@pytest.mark.parametrize(
    "what, chunks", [("label", [1]), ("bit", [2]), ("swap", [0]), ("dtype", [0, 1, 2, 3])]
)
@pytest.mark.parametrize("fast", [True, False])
def test_a_change_changes_its_chunk_only(what, chunks, fast):
    x, y = make_xy()

    def rows(x, y):
        return Rows(TensorDataset(x, y) if fast else Items(N, Pairs(x, y)), 16)

    assert (
        changed_chunks(fingerprints(rows(x, y), N), fingerprints(rows(*change(what, x, y)), N))
        == chunks
    )


def test_a_different_dtype_of_the_same_values():
    x, y = make_xy(8)
    base = all_hashes(Rows(TensorDataset(x, y), 4), 8)
    for other in [(x.double(), y), (x, y.float()), (x.bfloat16().float(), y)]:
        assert not np.isin(all_hashes(Rows(TensorDataset(*other), 4), 8), base).any()
    # bf16 and fp16 with the same bits are different rows
    bits = torch.randint(0, 1 << 14, (8, 3), dtype=torch.int16)
    bf, hf = bits.view(torch.bfloat16), bits.view(torch.float16)
    assert not np.isin(
        all_hashes(Rows(TensorDataset(bf), 4), 8), all_hashes(Rows(TensorDataset(hf), 4), 8)
    ).any()


# ---------------------------------------------------------------- kinds of items
def item_hashes(items: list, batch_size: int = 3) -> np.ndarray:
    return all_hashes(Rows(Items(len(items), items.__getitem__), batch_size), len(items))


def test_dict_key_order_does_not_matter_but_keys_do():
    ids = [[5, 6, 7], [8, 9]]
    a = [{"input_ids": i, "labels": i[0]} for i in ids]
    b = [{"labels": i[0], "input_ids": i} for i in ids]
    c = [{"input_idz": i, "labels": i[0]} for i in ids]
    assert np.array_equal(item_hashes(a), item_hashes(b))
    assert not np.isin(item_hashes(c), item_hashes(a)).any()


def test_python_scalars_are_what_default_collate_makes_of_them():
    # int -> int64, float -> float64, bool -> bool; lists of them hash element by element
    py = [
        (3, 2.5, True, [1, 2, 3], [0.5, 1.5], [True, False]),
        (-(2**62), -0.0, False, [7], [], []),
    ]

    def as_tensor(v):
        return torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else None)

    def each(item, leaf):
        return tuple([leaf(e) for e in v] if isinstance(v, list) else leaf(v) for v in item)

    tensors = [each(item, as_tensor) for item in py]
    arrays = [each(item, np.asarray) for item in py]
    assert np.array_equal(item_hashes(py), item_hashes(tensors))
    assert np.array_equal(item_hashes(py), item_hashes(arrays))
    assert not np.array_equal(item_hashes([(3,)]), item_hashes([(3.0,)]))
    with pytest.raises(DataError, match="int64"):
        item_hashes([(2**64,)])
    with pytest.raises(DataError, match="int64"):
        item_hashes([([1, 2**64],)])


def test_strings_and_bytes():
    a = [("a cat", 1), ("a dog", 0), ("ünïcode", 1), ("", 0)]
    h = item_hashes(a)
    assert len(set(h.tolist())) == 4
    assert np.array_equal(h, item_hashes(list(a)))  # deterministic
    assert not np.array_equal(item_hashes([("a cat", 1)]), item_hashes([("a cau", 1)]))
    assert not np.array_equal(item_hashes([("ab",)]), item_hashes([(b"ab",)]))
    assert not np.array_equal(item_hashes([("ab", None)]), item_hashes([("ab",)]))
    strings = np.array(["x", "yy"])
    assert item_hashes([(strings,)])[0] != item_hashes([(np.array(["x", "yz"]),)])[0]


def test_bf16_fast_path_equals_items():
    x, y = make_xy(30)
    xb = x.bfloat16()
    fast = all_hashes(Rows(TensorDataset(xb, y), 4), 30)
    assert np.array_equal(fast, all_hashes(Rows(Items(30, Pairs(xb, y)), 7), 30))
    assert not np.isin(fast, all_hashes(Rows(TensorDataset(x, y), 4), 30)).any()


def test_array_like_objects_and_noncontiguous_tensors():
    image = pytest.importorskip("PIL.Image")
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    assert np.array_equal(
        item_hashes([(image.fromarray(pixels), 1)]), item_hashes([(torch.from_numpy(pixels), 1)])
    )
    x = torch.randn(6, 4)
    assert np.array_equal(item_hashes([(x.T,)]), item_hashes([(x.T.contiguous(),)]))
    assert np.array_equal(item_hashes([(x.requires_grad_(),)]), item_hashes([(x.detach(),)]))


class Opaque:
    pass


def test_unsupported_objects_raise_data_type_error():
    with pytest.raises(DataTypeError, match=r"test_data_fingerprint\.Opaque.*check_data"):
        item_hashes([(torch.zeros(2), {"meta": Opaque()})])
    with pytest.raises(DataTypeError, match="object"):
        item_hashes([(np.array([Opaque()], dtype=object),)])
    with pytest.raises(DataTypeError, match="Opaque"):
        item_hashes([({Opaque(): 1},)])
    rows = Rows(Items(4, lambda i: (torch.zeros(2), Opaque())), 2)
    with pytest.raises(DataTypeError, match="Opaque"):
        next(rows.batches(slice(0, 4), with_hashes=True))


def test_the_collate_wrapper_pickles_and_keeps_the_batch():
    wrapper = pickle.loads(pickle.dumps(HashingCollate(default_collate)))
    items = [(torch.ones(2), 1), (torch.zeros(2), 0)]
    batch, content = wrapper(items)
    assert torch.equal(batch[0], default_collate(items)[0]) and content.shape == (2,)
    assert np.array_equal(pickle.loads(pickle.dumps(HashingCollate(None)))(items), content)


def test_chunk_fingerprint():
    h = np.array([1, 2, 3], np.uint64)
    fp = chunk_fingerprint(h)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp != chunk_fingerprint(h[::-1]) and fp != chunk_fingerprint(h[:2])
    assert fp == chunk_fingerprint(np.array([1, 2, 3], np.uint64))


def test_errors_are_fasttrak_errors():
    x, y = make_xy(4)
    with pytest.raises(ConfigError, match="shuffle"):
        as_rows(DataLoader(TensorDataset(x, y), shuffle=True), 2)
    with pytest.raises(DataError, match="first dimension"):
        as_rows((x, y[:3]), 2)
    with pytest.raises(DataTypeError, match="map-style"):
        as_rows(iter([1, 2]), 2)
    rows = Rows(Items(2, lambda i: "text"), 2, collate_fn=lambda items: items)
    with pytest.raises(DataTypeError, match="holds no tensors"):
        next(rows.batches(slice(0, 2)))
