"""The store: features, out-to-loss weights and kernels of every model, on disk or in memory.

Layout of a store directory (see docs/store.md for the guarantees)::

    zarr.json                           zarr group; attrs["fasttrak"]: a copy of the run record
    checkpoints/{m}/features            (n, k) float32/float16, one zarr chunk per row chunk
    checkpoints/{m}/q                   (n,) float32 out-to-loss weights Q
    checkpoints/{m}/kernels/{name}      derived (gram, factor), published whole, checksummed
    records/run.json                    the run's settings (written once: creates the store)
    records/train.json                  n, the number of training rows (written once)
    records/rows/{c}.json               fingerprint of the training rows of chunk c (once)
    records/checkpoints/{m}/checkpoint.json   the weights' fingerprint of model m (once)
    records/checkpoints/{m}/done/{c}.json     done mark of chunk c: CRC32Cs of its features
                                              and Q, its rows' and weights' fingerprints
    records/locks/...                   flock files: chunk claims, writers of a model
    records/staging/...                 work in progress, moved into place when finished

Every record is sealed JSON (its own CRC32C), written with a temporary name and linked into
place only if absent, so it is never half-written and never replaced. A chunk counts as
done only once its done mark exists, and its data are trusted only while their CRC32C
matches the mark. Metadata of the run is checked on every reopen.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from fasttrak.deprecation import deprecated
from fasttrak.errors import (
    CheckpointMismatchError,
    ConfigError,
    DataError,
    DataMismatchError,
    NotFeaturizedError,
    NumericalError,
    ReadOnlyStoreError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
)
from fasttrak.shards import ranges
from fasttrak.store.arrays import (
    chunk_key,
    layout_problem,
    new_array,
    open_array,
    publish_whole,
    read_whole,
)
from fasttrak.store.files import Files, Lock, held, open_files, os_errors, stale_staging
from fasttrak.store.records import (
    DamagedRecord,
    checksum,
    checksum_bytes,
    decode,
    digest,
    encode,
    seal,
    unseal,
)

FORMAT_VERSION = 2
DEFAULT_CHUNK_ROWS = 512
FEATURE_DTYPES = ("float32", "float16")

RUN = "records/run.json"
TRAIN = "records/train.json"
GROUP_JSON = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()

REPAIR = "run `fasttrak repair {where}` (or featurize(..., repair=True)) and featurize again"


def checkpoint_dir(m: int) -> str:
    return f"records/checkpoints/{m}"


def done_key(m: int, c: int) -> str:
    return f"{checkpoint_dir(m)}/done/{c}.json"


def rows_key(c: int) -> str:
    return f"records/rows/{c}.json"


def lock_key(m: int, c: int | None = None) -> str:
    return f"records/locks/{m}/{'writers' if c is None else c}.lock"


def array_key(m: int, name: str) -> str:
    return f"checkpoints/{m}/{name}"


@dataclass(frozen=True)
class ChunkRecord:
    """The done mark of one chunk: what was written and from what."""

    model_id: int
    chunk: int
    start: int
    stop: int
    checkpoint: str
    data: str
    features: int
    q: int

    def fields(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "chunk": self.chunk,
            "rows": [self.start, self.stop],
            "checkpoint": self.checkpoint,
            "data": self.data,
            "features": self.features,
            "q": self.q,
        }

    @classmethod
    def parse(cls, fields: dict[str, Any]) -> ChunkRecord:
        try:
            start, stop = fields["rows"]
            return cls(
                int(fields["model_id"]),
                int(fields["chunk"]),
                int(start),
                int(stop),
                str(fields["checkpoint"]),
                str(fields["data"]),
                int(fields["features"]),
                int(fields["q"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DamagedRecord(f"a field is missing or malformed ({error})") from error


# ---------------------------------------------------------------- the store
class Store:
    """A run's store. ``meta`` (the run's settings) is checked on every reopen."""

    def __init__(self, files: Files, location: str | None, run: dict[str, Any]) -> None:
        self.files = files
        self.location = location
        self._run = run
        self._num_train: int | None = None  # written once: cached once read

    # -------------------------------------------------------------- opening
    @classmethod
    def open(
        cls, location: str | Path | None, meta: dict[str, Any], chunk_rows: int | None = None
    ) -> Store:
        """Open the store at ``location`` (a directory; None: in memory), creating it if it
        does not exist. Raises StoreMismatchError if it was made with other settings,
        StoreError if the path is not a store and not an empty directory."""
        if chunk_rows is not None and (
            isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1
        ):
            raise ConfigError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        if location is not None:
            _prepare_location(Path(location))
        files = open_files(location)
        where = _where(location)
        run = _read_run(files, where)
        if run is None:
            if not files.writable:
                raise ReadOnlyStoreError(f"{where} has no store and is read-only")
            settings = {**meta, "chunk_rows": chunk_rows or DEFAULT_CHUNK_ROWS}
            fields = {
                "format_version": FORMAT_VERSION,
                "store_id": uuid.uuid4().hex,
                "meta": settings,
            }
            files.create(RUN, encode(fields))  # False: another process created it first
            run = _read_run(files, where)
            if run is None:
                raise StoreCorruptError(
                    f"{where}: the run record vanished right after it was written; check the "
                    "filesystem (is another process deleting the store?)"
                )
        store = cls(files, None if location is None else str(location), run)
        store._check_meta(meta, chunk_rows)
        if files.writable:
            store._complete_layout()
        return store

    @classmethod
    def open_existing(cls, location: str | Path) -> Store:
        """Open an existing store directory without knowing its settings (verify, repair,
        info). A damaged run record is replaced by its copy in zarr.json when intact."""
        path = Path(location)
        if not (path / RUN).exists() and not (path / "zarr.json").exists():
            raise StoreError(f"{path} is not a fasttrak store (no {RUN})")
        files = open_files(path)
        try:
            run = _read_run(files, _where(path))
        except StoreCorruptError:
            run = _read_mirror(files)
            if run is None:
                raise
        if run is None:
            run = _read_mirror(files)
        if run is None:
            raise StoreCorruptError(
                f"{path}: the run record {RUN} and its copy in zarr.json are both missing or "
                "damaged; the store cannot be trusted: featurize into a new path"
            )
        return cls(files, str(path), run)

    def _check_meta(self, meta: dict[str, Any], chunk_rows: int | None) -> None:
        version = self._run.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreMismatchError(
                f"{self.where} has store format {version}, this fasttrak writes format "
                f"{FORMAT_VERSION}; featurize into a new store path"
            )
        stored = self.meta
        wanted = dict(meta)
        if chunk_rows is not None:
            wanted["chunk_rows"] = chunk_rows
        problems = [
            f"{key}: store has {stored.get(key)!r}, you asked for {value!r}"
            for key, value in wanted.items()
            if _jsonish(stored.get(key)) != _jsonish(value)
        ]
        if problems:
            raise StoreMismatchError(
                f"{self.where} was made by a different run ("
                + "; ".join(problems)
                + "); use a new store path, or the same settings as the run that made it"
            )

    def _complete_layout(self) -> None:
        """Write what follows the run record (idempotent: completes a half-created store)."""
        mirror = self.files.read("zarr.json")
        wanted = _mirror_bytes(self._run)
        if mirror != wanted:
            self.files.write("zarr.json", wanted)
        if self.files.read("checkpoints/zarr.json") != GROUP_JSON:
            self.files.write("checkpoints/zarr.json", GROUP_JSON)
        for leftover in stale_staging(self.files):  # of processes that died mid-write
            self.files.delete_tree(leftover)

    # -------------------------------------------------------------- settings
    @property
    def where(self) -> str:
        """How messages name this store."""
        return _where(self.location)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._run["meta"])

    @property
    def num_params(self) -> int:
        """p: the number of attributed gradient coordinates the features are projected from."""
        return sum(math.prod(shape) for shape in self.meta["params"].values())

    @property
    def format_version(self) -> int:
        return int(self._run.get("format_version", 0))

    @property
    def store_id(self) -> str:
        return str(self._run["store_id"])

    @property
    def writable(self) -> bool:
        return self.files.writable

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def chunk_rows(self) -> int:
        return int(self.meta["chunk_rows"])

    @property
    def feature_dtype(self) -> str:
        return str(self.meta["feature_dtype"])

    def repair_hint(self) -> str:
        return REPAIR.format(where=self.location or "STORE")

    def read_record(self, key: str, what: str) -> dict[str, Any] | None:
        """A sealed record's fields, None if absent; StoreCorruptError if damaged."""
        data = self.files.read(key)
        if data is None:
            return None
        try:
            return decode(data)
        except DamagedRecord as error:
            raise StoreCorruptError(
                f"{self.where}: {what} ({key}) is damaged: {error}; {self.repair_hint()}"
            ) from error

    # -------------------------------------------------------------- training rows
    @property
    def num_train(self) -> int | None:
        """n, once recorded (read from disk until then; the record is written once)."""
        if self._num_train is None:
            self._num_train = self.read_num_train()
        return self._num_train

    def read_num_train(self) -> int | None:
        """n as recorded on disk now (StoreCorruptError if its record is damaged)."""
        record = self.read_record(TRAIN, "the training-set record")
        return None if record is None else int(record["n"])

    def recorded_chunks(self) -> list[int]:
        """Chunks whose training rows' fingerprint is recorded (each record is read, so a
        damaged one raises StoreCorruptError here rather than passing unseen)."""
        names = (name.removesuffix(".json") for name in self.files.list("records/rows"))
        chunks = sorted(int(name) for name in names if name.isdigit())
        return [c for c in chunks if self.rows_fingerprint(c) is not None]

    def set_num_train(self, n: int) -> None:
        """Record the training-set size, or check it against the one recorded."""
        if n < 1:
            raise DataError("the training set is empty; pass a dataset with at least one example")
        known = self.num_train
        if known is None:
            self._require_writable()
            self.files.create(TRAIN, encode({"n": n}))
            known = self.read_num_train()
        if known != n:
            raise StoreMismatchError(
                f"{self.where} was built for a training set of {known} examples, "
                f"this one has {n}; use a new store path for another training set"
            )

    @property
    def num_chunks(self) -> int:
        n = self.num_train
        return 0 if n is None else math.ceil(n / self.chunk_rows)

    def chunk_slice(self, c: int) -> slice:
        n = self.num_train or 0
        return slice(c * self.chunk_rows, min((c + 1) * self.chunk_rows, n))

    def rows_fingerprint(self, c: int) -> str | None:
        """The recorded fingerprint of chunk c's training rows, if any."""
        record = self.read_record(rows_key(c), f"the fingerprint record of row chunk {c}")
        return None if record is None else str(record["data"])

    def check_rows(self, c: int, fingerprint: str, record: bool = False) -> None:
        """Raise DataMismatchError if chunk c's rows differ from those recorded; with
        ``record``, record them if nothing is recorded yet (written once)."""
        rows = self.chunk_slice(c)
        if record and self.rows_fingerprint(c) is None:
            self._require_writable()
            self.files.create(
                rows_key(c),
                encode({"chunk": c, "rows": [rows.start, rows.stop], "data": fingerprint}),
            )
        known = self.rows_fingerprint(c)
        if known is not None and known != fingerprint:
            raise DataMismatchError(
                f"training rows {rows.start}-{rows.stop - 1} (chunk {c}) differ from the rows "
                f"{self.where} was featurized with (other data, another order, or changed "
                "labels); pass the same dataset in the same order, or use a new store path "
                "for other data"
            )

    # -------------------------------------------------------------- models
    def model_ids(self) -> list[int]:
        """Model ids that have a checkpoint record or done marks (featurized, being
        featurized, or damaged: :meth:`model` says which)."""
        ids = []
        for name in self.files.list("records/checkpoints"):
            if name.isdigit() and (
                self.files.exists(f"{checkpoint_dir(int(name))}/checkpoint.json")
                or self.files.list(f"{checkpoint_dir(int(name))}/done")
            ):
                ids.append(int(name))
        return sorted(ids)

    def model(self, m: int) -> ModelStore:
        """Model m's part of the store; NotFeaturizedError if it has none."""
        record = self.read_record(
            f"{checkpoint_dir(m)}/checkpoint.json", f"the checkpoint record of model {m}"
        )
        if record is None:
            if self.files.list(f"{checkpoint_dir(m)}/done"):
                raise StoreCorruptError(
                    f"{self.where}: model {m} has done marks but no checkpoint record (it was "
                    f"deleted, or an overwrite was interrupted); {self.repair_hint()}"
                )
            raise NotFeaturizedError(
                f"{self.where} holds no features of model {m} (stored: {self.model_ids()}); "
                "featurize it first"
            )
        return ModelStore(self, m, str(record["fingerprint"]))

    def checkpoint_ids(self) -> list[int]:
        """Deprecated name of :meth:`model_ids`."""
        deprecated("Store.checkpoint_ids()", "Store.model_ids()")
        return self.model_ids()

    def checkpoint(self, m: int) -> ModelStore:
        """Deprecated name of :meth:`model`."""
        deprecated("Store.checkpoint(m)", "Store.model(model_id)")
        return self.model(m)

    @contextlib.contextmanager
    def writing(self, m: int, fingerprint: str, overwrite: bool = False) -> Iterator[ModelStore]:
        """Model m's store, created if new, for as long as the block writes to it.

        Many processes may write the same model at once (they claim chunks). Features of
        other weights at m are refused, unless ``overwrite``: then they are deleted first,
        which is refused while another process writes model m. Features of the same weights
        are always kept and resumed, with or without ``overwrite``."""
        self._require_writable()
        if overwrite and self.stored_fingerprint(m) not in (None, fingerprint):
            with self.alone(m, "overwrite=True would delete its work"):
                if self.stored_fingerprint(m) not in (None, fingerprint):
                    self._delete_checkpoint(m)
                self._create_checkpoint(m, fingerprint)
        with held(self.files.lock(lock_key(m), shared=True, wait=True)):
            yield self._create_checkpoint(m, fingerprint)

    @contextlib.contextmanager
    def alone(self, m: int, because: str) -> Iterator[None]:
        """Hold model m's writers lock exclusively for the block: no other process writes
        model m meanwhile. StoreBusyError (saying ``because``) if one is writing it now."""
        lock = self.files.lock(lock_key(m), shared=False, wait=False)
        if lock is None:
            raise StoreBusyError(
                f"another process is featurizing model {m} in {self.where}; {because}: wait "
                "for it to finish (or stop it), then retry"
            )
        with held(lock):
            yield

    def stored_fingerprint(self, m: int) -> str | None:
        """The weights' fingerprint recorded for model m (None: no record, or a damaged
        one, which the overwrite replaces)."""
        try:
            record = self.read_record(f"{checkpoint_dir(m)}/checkpoint.json", "")
        except StoreCorruptError:
            return "damaged"
        return None if record is None else str(record["fingerprint"])

    def _create_checkpoint(self, m: int, fingerprint: str) -> ModelStore:
        """Model m's arrays and record (idempotent); CheckpointMismatchError if model m was
        featurized from other weights."""
        record_key = f"{checkpoint_dir(m)}/checkpoint.json"
        record = self.read_record(record_key, f"the checkpoint record of model {m}")
        if record is None:
            n = self.num_train
            if n is None:
                raise NotFeaturizedError("set_num_train before creating a checkpoint")
            rows = min(self.chunk_rows, n)
            for name, shape, chunks, dtype in (
                ("features", (n, self.k), (rows, self.k), self.feature_dtype),
                ("q", (n,), (rows,), "float32"),
            ):
                key = array_key(m, name)
                if not self.files.exists(f"{key}/zarr.json"):
                    staged = self.files.staging_dir()
                    new_array(self.files.zarr_store(staged), shape, dtype, chunks)
                    self.files.publish(staged, key)
            if self.files.read(f"checkpoints/{m}/zarr.json") != GROUP_JSON:
                self.files.write(f"checkpoints/{m}/zarr.json", GROUP_JSON)
            self.files.create(record_key, encode({"model_id": m, "fingerprint": fingerprint}))
            record = self.read_record(record_key, f"the checkpoint record of model {m}")
            if record is None:
                raise StoreCorruptError(
                    f"{self.where}: the checkpoint record of model {m} vanished right after it "
                    "was written; check the filesystem (is another process deleting it?)"
                )
        if record["fingerprint"] != fingerprint:
            raise CheckpointMismatchError(
                f"model {m} in {self.where} was featurized from other weights; pass "
                "overwrite=True to replace its features, another model id (model_ids=), "
                "or a new store"
            )
        return ModelStore(self, m, fingerprint)

    def _delete_checkpoint(self, m: int) -> None:
        """Remove model m: its record first (nothing of it is trusted after that step)."""
        self.files.delete(f"{checkpoint_dir(m)}/checkpoint.json")
        self.files.delete_tree(f"{checkpoint_dir(m)}/done")
        self.files.delete_tree(f"checkpoints/{m}")

    def _require_writable(self) -> None:
        if not self.files.writable:
            raise ReadOnlyStoreError(
                f"{self.where} is read-only for this process; scoring works on a read-only "
                "store, but featurizing or repairing needs write access"
            )


# ---------------------------------------------------------------- one model
class ModelStore:
    """Features, Q, done marks and kernels of one model id (the features of one checkpoint)."""

    def __init__(self, store: Store, model_id: int, fingerprint: str) -> None:
        self.store = store
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.files = store.files
        self._arrays: dict[str, zarr.Array] = {}

    # -------------------------------------------------------------- geometry
    @property
    def num_rows(self) -> int:
        n = self.store.num_train
        if n is None:
            raise NotFeaturizedError(f"{self.store.where} records no training set yet")
        return n

    @property
    def num_chunks(self) -> int:
        return self.store.num_chunks

    def chunk_slice(self, c: int) -> slice:
        return self.store.chunk_slice(c)

    def _where(self, name: str, c: int | None = None) -> str:
        chunk = "" if c is None else f", chunk {c} (rows {self._rows_text(c)})"
        return f"{self.store.where}: model {self.model_id}, array {name}{chunk}"

    def _rows_text(self, c: int) -> str:
        rows = self.chunk_slice(c)
        return f"{rows.start}-{rows.stop - 1}"

    def array(self, name: str) -> zarr.Array:
        """The features or q array, opened once and checked against the run's layout."""
        if name not in self._arrays:
            n, rows, k = self.num_rows, min(self.store.chunk_rows, self.num_rows), self.store.k
            expected = {
                "features": ((n, k), self.store.feature_dtype, (rows, k)),
                "q": ((n,), "float32", (rows,)),
            }[name]
            fix = self.store.repair_hint()
            array = open_array(self.files, array_key(self.model_id, name), self._where(name), fix)
            problem = layout_problem(array, *expected)
            if problem:
                raise StoreCorruptError(
                    f"{self._where(name)}: its metadata changed: {problem}; {fix}"
                )
            self._arrays[name] = array
        return self._arrays[name]

    # -------------------------------------------------------------- done marks
    def records(self, damaged: list[str] | None = None) -> dict[int, ChunkRecord]:
        """Done marks of this model's chunks, by chunk. A damaged mark raises
        StoreCorruptError, or is listed in ``damaged`` when a list is given; marks of other
        weights (left by an interrupted overwrite) do not count."""
        found: dict[int, ChunkRecord] = {}
        for name in self.files.list(f"{checkpoint_dir(self.model_id)}/done"):
            stem = name.removesuffix(".json")
            if not (name.endswith(".json") and stem.isdigit()):
                continue
            c = int(stem)
            try:
                record = self._read_done(c)
            except StoreCorruptError:
                if damaged is None:
                    raise
                damaged.append(done_key(self.model_id, c))
                continue
            if record is not None and record.checkpoint == self.fingerprint:
                found[c] = record
        return found

    def _read_done(self, c: int) -> ChunkRecord | None:
        key = done_key(self.model_id, c)
        data = self.files.read(key)
        if data is None:
            return None
        try:
            record = ChunkRecord.parse(decode(data))
            rows = self.chunk_slice(c)
            if (record.chunk, record.start, record.stop) != (c, rows.start, rows.stop):
                raise DamagedRecord("it describes other rows")
        except DamagedRecord as error:
            raise StoreCorruptError(
                f"{self._where('done marks', c)}: its done mark is damaged ({error}); "
                f"{self.store.repair_hint()}"
            ) from error
        return record

    def done(self, c: int) -> ChunkRecord | None:
        """Chunk c's done mark if it is finished with these weights (damaged: an error)."""
        record = self._read_done(c)
        return record if record is not None and record.checkpoint == self.fingerprint else None

    def pending_chunks(self) -> list[int]:
        done = self.records()
        return [c for c in range(self.num_chunks) if c not in done]

    def is_complete(self) -> bool:
        return not self.pending_chunks()

    def claim(self, c: int, wait: bool) -> Lock | None:
        """Claim chunk c for writing: a held lock, or None if another process holds it."""
        return self.files.lock(lock_key(self.model_id, c), wait=wait)

    # -------------------------------------------------------------- writing
    def write_chunk(self, c: int, features: np.ndarray, q: np.ndarray, data: str) -> None:
        """Write one finished chunk, then its done mark (a crash never marks half a chunk).

        The caller holds the chunk's claim. ``data`` is the fingerprint of the chunk's
        training rows; rows that differ from those recorded raise DataMismatchError."""
        rows = self.chunk_slice(c)
        expected = rows.stop - rows.start
        if features.shape != (expected, self.store.k) or q.shape != (expected,):
            raise DataError(f"chunk {c} needs {expected} rows, got {features.shape}, {q.shape}")
        existing = self._read_done(c)
        if existing is not None and existing.checkpoint == self.fingerprint:
            raise StoreBusyError(
                f"{self._where('features', c)} is already finished; refusing to overwrite it"
            )
        if existing is not None:  # left by weights this model id held before an overwrite
            self.files.delete(done_key(self.model_id, c))
        stored = np.ascontiguousarray(features.astype(self.store.feature_dtype, copy=False))
        if not np.isfinite(stored).all():
            raise NumericalError(
                f"features of chunk {c} overflow {stored.dtype}; "
                "use feature_dtype='float32' (the default)"
            )
        q32 = np.ascontiguousarray(q.astype(np.float32))
        self.store.check_rows(c, data, record=True)
        with os_errors(self._where("features", c)):
            features_crc = self._put_chunk("features", c, stored)
            q_crc = self._put_chunk("q", c, q32)
        record = ChunkRecord(
            self.model_id, c, rows.start, rows.stop, self.fingerprint, data, features_crc, q_crc
        )
        if not self.files.create(done_key(self.model_id, c), encode(record.fields())):
            raise StoreBusyError(
                f"{self._where('features', c)} was finished by another process while this one "
                "held its claim: file locks do not work on this filesystem; "
                "run `fasttrak verify` and use a filesystem with working flock"
            )

    def _put_chunk(self, name: str, c: int, data: np.ndarray) -> int:
        """Write chunk c of array ``name`` (its rows, ``data``) and return their CRC32C.

        The chunk file gets the bytes zarr's uncompressed little-endian codec stores, the
        layout :meth:`array` checks: the whole chunk in C order, the last chunk's missing
        rows filled with the fill value NaN. Reads go through zarr. Written through the file
        layer (atomically, by a staged rename on disk) rather than ``zarr.Array.__setitem__``,
        whose codec pipeline costs 0.5 to 1 ms per call whatever the size (measured: about
        half of featurize's store writes on a small MLP), and with one copy that the
        checksum shares."""
        array = self.array(name)
        data = np.ascontiguousarray(data, dtype=np.dtype(array.dtype).newbyteorder("<"))
        raw = data.tobytes()
        crc = checksum_bytes(raw)
        if data.shape != tuple(array.chunks):
            whole = np.full(array.chunks, np.nan, dtype=data.dtype)
            whole[: data.shape[0]] = data
            raw = whole.tobytes()
        self.files.write(self.chunk_file(name, c), raw)
        return crc

    def chunk_file(self, name: str, c: int) -> str:
        """The storage key of chunk c of array ``features`` or ``q``."""
        return chunk_key(array_key(self.model_id, name), (c, 0) if name == "features" else (c,))

    # -------------------------------------------------------------- verified reading
    def read(self, name: str, record: ChunkRecord) -> np.ndarray:
        """One chunk of ``features`` (rows, k) or ``q`` (rows,), verified against its done
        mark; StoreCorruptError naming the model, array and chunk otherwise."""
        c = record.chunk
        if record.checkpoint != self.fingerprint:
            raise StoreCorruptError(
                f"{self._where(name, c)}: written from other weights than the ones being "
                f"scored (the model was overwritten meanwhile?); score again"
            )
        array = self.array(name)
        fix = self.store.repair_hint()
        if not self.files.exists(self.chunk_file(name, c)):
            raise StoreCorruptError(
                f"{self._where(name, c)}: the chunk file is missing though the chunk is marked "
                f"done; {fix}"
            )
        try:
            data = np.asarray(array[self.chunk_slice(c)])
        except Exception as error:
            raise StoreCorruptError(
                f"{self._where(name, c)}: unreadable ({error}); {fix}"
            ) from error
        expected = record.features if name == "features" else record.q
        if checksum(data) != expected:
            try:
                now = self._read_done(c)
            except StoreCorruptError:
                now = record
            if now != record:  # not damage: rewritten since ``record`` was read
                raise StoreCorruptError(
                    f"{self._where(name, c)}: changed since these scores were set up (the "
                    "model was overwritten or repaired by another process meanwhile); score again"
                )
            raise StoreCorruptError(
                f"{self._where(name, c)}: fails its checksum (damaged on disk); {fix}"
            )
        return data

    def read_all(self, name: str, records: dict[int, ChunkRecord]) -> np.ndarray:
        """A whole verified array (every chunk must be done)."""
        return np.concatenate([self.read(name, records[c]) for c in range(self.num_chunks)])

    def features(self) -> np.ndarray:
        """All of this model's features (n, k), verified; the model must be complete."""
        return self.read_all("features", complete_records(self))

    def q(self) -> np.ndarray:
        """All of this model's out-to-loss weights Q (n,), verified."""
        return self.read_all("q", complete_records(self))

    # -------------------------------------------------------------- kernels
    def kernel_key(self, kind: str, settings: dict[str, Any], sources: str) -> str:
        return f"checkpoints/{self.model_id}/kernels/{kind}-{digest(kind, settings, sources)}"

    def has_kernel(
        self, kind: str, settings: dict[str, Any], records: dict[int, ChunkRecord]
    ) -> bool:
        """Whether a kernel artefact of these chunks and settings is cached (not read: a
        damaged one is found by :meth:`read_kernel`)."""
        return self.files.exists(self.kernel_key(kind, settings, sources_of(records)))

    def read_kernel(
        self, kind: str, settings: dict[str, Any], records: dict[int, ChunkRecord]
    ) -> np.ndarray | None:
        """A cached kernel artefact built from exactly these chunks with these settings,
        verified; None if there is none."""
        key = self.kernel_key(kind, settings, sources_of(records))
        if not self.files.exists(key):
            return None
        fix = (
            f"run `fasttrak repair {self.store.location or 'STORE'}` to delete it "
            "(it is rebuilt from the features on the next score)"
        )
        data, record = read_whole(self.files, key, self._where(kind), fix)
        if record.get("settings") != _jsonish(settings):
            raise StoreCorruptError(f"{self._where(kind)}: its settings record changed; {fix}")
        return data

    def write_kernel(
        self,
        kind: str,
        settings: dict[str, Any],
        records: dict[int, ChunkRecord],
        data: np.ndarray,
        chunks: tuple[int, ...],
    ) -> None:
        """Publish a kernel artefact (a no-op if another process published it first), and
        delete those built from chunks that have since been recomputed (stale)."""
        sources = sources_of(records)
        record = {"kind": kind, "settings": _jsonish(settings), "sources": sources}
        publish_whole(self.files, self.kernel_key(kind, settings, sources), data, chunks, record)
        base = f"checkpoints/{self.model_id}/kernels"
        for name in self.files.list(base):
            try:
                array = zarr.open_array(store=self.files.zarr_store(f"{base}/{name}"), mode="r")
                stale = unseal(dict(array.attrs).get("fasttrak"))["sources"] != sources
            except Exception:  # damaged: left for verify to report and repair to delete
                continue
            if stale:
                self.files.delete_tree(f"{base}/{name}")


def sources_of(records: dict[int, ChunkRecord]) -> str:
    """A digest of the chunks a derived artefact is built from (their checksums)."""
    return digest([[c, r.features, r.q] for c, r in sorted(records.items())])


# ---------------------------------------------------------------- helpers
def _where(location: Any) -> str:
    return "the in-memory store" if location is None else f"the store at {location}"


def _prepare_location(path: Path) -> None:
    """Refuse paths that are not a store and not an empty directory; create a new one."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"store={str(path)!r} is a file; pass a directory path (new or empty)")
    if not path.exists():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create the store directory {path}: {error}") from error
        return
    # List everything first, then look for the run record: the record is the first thing a
    # creator writes (besides records/staging and records/locks), so if it exists now,
    # whatever the listings showed belongs to a store another process was creating meanwhile.
    entries = set(os.listdir(path))
    leftovers = set(os.listdir(path / "records")) if "records" in entries else set()
    if (path / RUN).exists():
        return
    if "zarr.json" in entries:
        try:
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError, AttributeError):
            attrs = {}
        ours = attrs.get("fasttrak") if isinstance(attrs, dict) else None
        if isinstance(ours, dict) and "crc32c" in ours:
            raise StoreCorruptError(
                f"the store at {path} lost its run record {RUN}; run `fasttrak repair {path}` "
                "to restore it from its copy in zarr.json"
            )
        if isinstance(ours, dict) and "format_version" in ours:
            raise StoreMismatchError(
                f"{path} is a store of an older fasttrak (format {ours['format_version']}); "
                f"this fasttrak writes format {FORMAT_VERSION}: featurize into a new store path"
            )
        raise StoreError(
            f"{path} holds a zarr hierarchy that fasttrak did not make; choose a new or empty "
            "directory for store="
        )
    foreign = sorted(entries - {"records"})
    if foreign or leftovers - {"staging", "locks"}:
        shown = foreign or sorted(f"records/{e}" for e in leftovers)
        raise StoreError(
            f"{path} is not empty and is not a fasttrak store (it holds {shown[:5]}); fasttrak "
            "does not write among other files: choose a new or empty directory for store="
        )


def _read_run(files: Files, where: str) -> dict[str, Any] | None:
    data = files.read(RUN)
    if data is None:
        return None
    try:
        return decode(data)
    except DamagedRecord as error:
        raise StoreCorruptError(
            f"{where}: the run record {RUN} is damaged ({error}); run `fasttrak repair` on the "
            "store to restore it from its copy in zarr.json"
        ) from error


def _mirror_bytes(run: dict[str, Any]) -> bytes:
    """Root zarr.json: a zarr group whose attributes carry a sealed copy of the run record."""
    group = {"zarr_format": 3, "node_type": "group", "attributes": {"fasttrak": seal(run)}}
    return json.dumps(group, indent=1, sort_keys=True).encode()


def _read_mirror(files: Files) -> dict[str, Any] | None:
    data = files.read("zarr.json")
    if data is None:
        return None
    try:
        return unseal(json.loads(data.decode())["attributes"]["fasttrak"])
    except (ValueError, KeyError, TypeError, DamagedRecord):
        return None


def _jsonish(value: Any) -> Any:
    """Normalise tuples to lists so that JSON round trips compare equal."""
    if isinstance(value, dict):
        return {k: _jsonish(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    return value


def complete_records(ck: ModelStore) -> dict[int, ChunkRecord]:
    """The done marks of a model whose every chunk is done; NotFeaturizedError otherwise."""
    return complete_models([ck])[0]


def complete_models(models: list[ModelStore]) -> list[dict[int, ChunkRecord]]:
    """The done marks of each model, all of whose chunks must be done; otherwise one
    NotFeaturizedError naming every model's missing row chunks (and how to finish them)."""
    out, missing = [], []
    for model in models:
        records = model.records()
        left = [c for c in range(model.num_chunks) if c not in records]
        if left:
            missing.append(f"model {model.model_id}: chunks {ranges(left)} of {model.num_chunks}")
        out.append(records)
    if missing:
        raise NotFeaturizedError(
            "training features are unfinished (" + "; ".join(missing) + "); finish them with "
            "trak.featurize(train_set, checkpoints=[...], model_ids=[...]) (rows= to run only "
            "those chunks), from any process, then score again"
        )
    return out
