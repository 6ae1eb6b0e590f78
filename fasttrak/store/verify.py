"""Checking a whole store, and repairing what can be repaired.

``verify`` reads every record and every chunk of a store and checks it: records against
their own checksums, arrays against the run's layout, chunks against the checksums in their
done marks, rows against the data fingerprints, kernels against their sealed checksums.
``repair`` fixes what it finds so that a later ``featurize`` recomputes only what was lost:

- a damaged or missing chunk, or a damaged done mark: the mark and the chunk's files are
  removed (the chunk is recomputed by the next featurize of that model);
- damaged array metadata: rewritten from the run's settings, then its chunks are checked;
- a damaged kernel (gram, factor): deleted (rebuilt by the next score);
- a damaged run record or its copy in zarr.json: restored from the other;
- a damaged checkpoint record: restored from its chunks' done marks when they agree;
- leftovers of interrupted work (staging of dead processes, marks of replaced weights).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from fasttrak.errors import StoreCorruptError
from fasttrak.store.arrays import new_array, open_array, read_whole
from fasttrak.store.core import (
    RUN,
    TRAIN,
    ChunkRecord,
    ModelStore,
    Store,
    _mirror_bytes,
    _read_mirror,
    array_key,
    checkpoint_dir,
    done_key,
    rows_key,
)
from fasttrak.store.files import stale_staging
from fasttrak.store.records import DamagedRecord, decode, encode


@dataclass(frozen=True)
class Problem:
    """One thing found wrong: where, what, and what ``repair`` does (or did) about it."""

    where: str
    detail: str
    action: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail} -> {self.action}"


@dataclass
class Report:
    """What ``verify`` checked and found (or ``repair`` fixed)."""

    location: str
    repaired: bool = False
    checked: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    recompute: dict[int, list[int]] = field(default_factory=dict)
    """Chunks to recompute per model (their done marks were removed by repair)."""
    pending: dict[int, list[int]] = field(default_factory=dict)
    """Chunks not finished yet per model (a run in progress or interrupted; not damage)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self, what: str, n: int = 1) -> None:
        self.checked[what] = self.checked.get(what, 0) + n

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {what}" for what, n in self.checked.items())
        lines = [f"{self.location}: checked {counts or 'nothing'}"]
        if self.ok:
            lines.append("no problems found")
        for problem in self.problems:
            lines.append(f"  {problem}")
        for m, chunks in self.pending.items():
            lines.append(f"  model {m}: {len(chunks)} chunk(s) not finished yet (featurize them)")
        if self.problems and not self.repaired:
            lines.append(f"run `fasttrak repair {self.location}` to repair")
        if self.repaired and self.recompute:
            todo = ", ".join(f"model {m}: {len(cs)} chunk(s)" for m, cs in self.recompute.items())
            lines.append(
                f"to recompute ({todo}): run trak.featurize(...) again with the same data and "
                "checkpoints"
            )
        return "\n".join(lines)


def verify(store: Store, models: Iterable[int] | None = None) -> Report:
    """Check every record and chunk of ``store`` (of ``models`` only, if given)."""
    return _Walk(store, fix=False).run(models)


def repair(store: Store, models: Iterable[int] | None = None) -> Report:
    """Check the store and repair what is damaged (see the module docstring)."""
    return _Walk(store, fix=True).run(models)


class _Walk:
    def __init__(self, store: Store, fix: bool) -> None:
        self.store = store
        self.files = store.files
        self.fix = fix
        self.report = Report(store.location or "the in-memory store", repaired=fix)

    def problem(self, where: str, detail: str, action: str) -> None:
        self.report.problems.append(Problem(where, detail, action))

    def run(self, models: Iterable[int] | None) -> Report:
        if self.fix:
            self.store._require_writable()
        self.run_record()
        n = self.train_record()
        try:
            if self.store.read_num_train() != n:  # verify only: the record is not restored yet
                n = None
        except StoreCorruptError:
            n = None
        if n is not None:
            self.rows_records()
        ids = self.model_ids() if models is None else sorted(set(models))
        for m in ids:
            if self.fix:
                with self.store.alone(m, "repair it once that process has finished"):
                    self.model(m, n)
            else:
                self.model(m, n)
        if models is None:
            for key in stale_staging(self.files):
                self.problem(key, "left by a process that died", "deleted")
                if self.fix:
                    self.files.delete_tree(key)
        return self.report

    # -------------------------------------------------------------- store-wide records
    def run_record(self) -> None:
        self.report.count("records")
        run, mirror = None, _read_mirror(self.files)
        data = self.files.read(RUN)
        try:
            run = decode(data) if data is not None else None
        except DamagedRecord as error:
            detail = f"damaged ({error})"
        else:
            detail = "missing"
        if run is None:
            action = "restored from its copy in zarr.json" if mirror else "unrecoverable"
            self.problem(RUN, detail, action)
            if self.fix and mirror is not None:
                self.files.write(RUN, encode(mirror))
            return
        if mirror != run:
            self.problem(
                "zarr.json", "its copy of the run record is missing or damaged", "rewritten"
            )
            if self.fix:
                self.files.write("zarr.json", _mirror_bytes(run))

    def train_record(self) -> int | None:
        self.report.count("records")
        try:
            n = self.store.read_num_train()
            if n is not None or not self.model_ids():
                return n
            detail = "missing though models are stored"
        except StoreCorruptError as error:
            detail = str(error).split(": ", 1)[-1].split(";")[0]
        n = self._rows_from_arrays()
        action = f"restored (n = {n}) from the feature arrays" if n else "deleted"
        self.problem(TRAIN, detail, action)
        if self.fix:
            if n:
                self.files.write(TRAIN, encode({"n": n}))
            else:
                self.files.delete(TRAIN)
        return n

    def _rows_from_arrays(self) -> int | None:
        for m in self.model_ids():
            try:
                array = open_array(self.files, array_key(m, "features"), "", "")
            except StoreCorruptError:
                continue
            return int(array.shape[0])
        return None

    def rows_records(self) -> None:
        for name in self.files.list("records/rows"):
            stem = name.removesuffix(".json")
            if not stem.isdigit():
                continue
            self.report.count("records")
            c = int(stem)
            try:
                decode(self.files.read(rows_key(c)) or b"")
            except DamagedRecord as error:
                known = self._data_fingerprint_of(c)
                action = "restored from a done mark" if known else "deleted (recorded again)"
                self.problem(rows_key(c), f"damaged ({error})", action)
                if self.fix:
                    self.files.delete(rows_key(c))
                    if known:
                        rows = self.store.chunk_slice(c)
                        self.files.create(
                            rows_key(c),
                            encode({"chunk": c, "rows": [rows.start, rows.stop], "data": known}),
                        )

    def _data_fingerprint_of(self, c: int) -> str | None:
        for m in self.model_ids():
            try:
                fields = decode(self.files.read(done_key(m, c)) or b"")
                return str(fields["data"])
            except (DamagedRecord, KeyError):
                continue
        return None

    def model_ids(self) -> list[int]:
        names = set(self.files.list("records/checkpoints")) | set(self.files.list("checkpoints"))
        return sorted(int(name) for name in names if name.isdigit())

    # -------------------------------------------------------------- one model
    def model(self, m: int, n: int | None) -> None:
        record_key = f"{checkpoint_dir(m)}/checkpoint.json"
        self.report.count("records")
        data = self.files.read(record_key)
        fingerprint = None
        if data is not None:
            try:
                fingerprint = str(decode(data)["fingerprint"])
            except (DamagedRecord, KeyError) as error:
                fingerprint = self._fingerprint_from_marks(m)
                action = (
                    "restored from its done marks"
                    if fingerprint
                    else "model deleted (featurize it again)"
                )
                self.problem(record_key, f"damaged ({error})", action)
                if self.fix:
                    self.files.delete(record_key)
                    if fingerprint:
                        self.files.create(
                            record_key, encode({"model_id": m, "fingerprint": fingerprint})
                        )
        if fingerprint is None:
            if self.files.list(f"checkpoints/{m}") or self.files.list(checkpoint_dir(m)):
                if data is None:
                    self.problem(f"model {m}", "leftovers of an interrupted overwrite", "deleted")
                if self.fix:
                    self.store._delete_checkpoint(m)
            return
        if n is None:
            return
        ck = ModelStore(self.store, m, fingerprint)
        if not self.arrays(ck):
            return
        self.chunks(ck)
        self.kernels(ck)

    def _fingerprint_from_marks(self, m: int) -> str | None:
        prints = set()
        for name in self.files.list(f"{checkpoint_dir(m)}/done"):
            try:
                prints.add(
                    str(
                        decode(self.files.read(f"{checkpoint_dir(m)}/done/{name}") or b"")[
                            "checkpoint"
                        ]
                    )
                )
            except (DamagedRecord, KeyError):
                continue
        return prints.pop() if len(prints) == 1 else None

    def arrays(self, ck: ModelStore) -> bool:
        """Check (and with fix, rewrite) the layout of the features and q arrays."""
        ok = True
        for name in ("features", "q"):
            self.report.count("arrays")
            try:
                ck.array(name)
            except StoreCorruptError as error:
                detail = str(error).split(f"array {name}", 1)[-1].split(";")[0].strip(": ")
                self.problem(f"model {ck.model_id}, array {name}", detail, "metadata rewritten")
                if self.fix:
                    self._rewrite_metadata(ck, name)
                else:
                    ok = False
        return ok

    def _rewrite_metadata(self, ck: ModelStore, name: str) -> None:
        n, k, rows = ck.num_rows, self.store.k, min(self.store.chunk_rows, ck.num_rows)
        shape, chunks, dtype = {
            "features": ((n, k), (rows, k), self.store.feature_dtype),
            "q": ((n,), (rows,), "float32"),
        }[name]
        staged = self.files.staging_dir()
        new_array(self.files.zarr_store(staged), shape, dtype, chunks)
        metadata = self.files.read(f"{staged}/zarr.json")
        assert metadata is not None
        self.files.write(f"{array_key(ck.model_id, name)}/zarr.json", metadata)
        self.files.delete_tree(staged)
        ck._arrays.pop(name, None)

    def chunks(self, ck: ModelStore) -> None:
        m = ck.model_id
        damaged: list[str] = []
        for name in self.files.list(f"{checkpoint_dir(m)}/done"):
            stem = name.removesuffix(".json")
            if not stem.isdigit() or int(stem) >= ck.num_chunks:
                self.problem(
                    f"{checkpoint_dir(m)}/done/{name}", "not a done mark of this store", "deleted"
                )
                if self.fix:
                    self.files.delete(f"{checkpoint_dir(m)}/done/{name}")
        records = ck.records(damaged=damaged)
        broken = sorted(int(key.rsplit("/", 1)[1].removesuffix(".json")) for key in damaged)
        broken = [c for c in broken if c < ck.num_chunks]  # the others are reported above
        for c in broken:
            self.report.count("chunks")
            self.problem(f"model {m}, chunk {c}", "its done mark is damaged", "chunk recomputed")
            self._unfinish(ck, c)
        for name in self.files.list(f"{checkpoint_dir(m)}/done"):
            stem = name.removesuffix(".json")
            if not stem.isdigit() or int(stem) >= ck.num_chunks:
                continue
            if int(stem) not in records and int(stem) not in broken:
                self.problem(f"model {m}, chunk {stem}", "done mark of replaced weights", "deleted")
                self._unfinish(ck, int(stem))
        for c, record in sorted(records.items()):
            self.report.count("chunks")
            problem = self._chunk_problem(ck, record)
            if problem:
                self.problem(f"model {m}, chunk {c}", problem, "chunk recomputed")
                self._unfinish(ck, c)
            elif self._rows_ok(c) and self.store.rows_fingerprint(c) is None:
                self.problem(
                    rows_key(c),
                    "missing though chunks of those rows are done",
                    "restored from a done mark",
                )
                if self.fix:
                    rows = self.store.chunk_slice(c)
                    fields = {"chunk": c, "rows": [rows.start, rows.stop], "data": record.data}
                    self.files.create(rows_key(c), encode(fields))
        pending = [c for c in range(ck.num_chunks) if c not in records]
        if pending and not self.fix:
            self.report.pending[m] = pending

    def _chunk_problem(self, ck: ModelStore, record: ChunkRecord) -> str | None:
        for name in ("features", "q"):
            try:
                ck.read(name, record)
            except StoreCorruptError as error:
                return f"{name}: " + str(error).split("): ", 1)[-1].split(";")[0]
        known = self.store.rows_fingerprint(record.chunk) if self._rows_ok(record.chunk) else None
        if known is not None and known != record.data:
            return "its rows' fingerprint differs from the store's record of those rows"
        return None

    def _rows_ok(self, c: int) -> bool:
        try:
            self.store.rows_fingerprint(c)
        except StoreCorruptError:
            return False
        return True

    def _unfinish(self, ck: ModelStore, c: int) -> None:
        self.report.recompute.setdefault(ck.model_id, []).append(c)
        if not self.fix:
            return
        self.files.delete(done_key(ck.model_id, c))
        self.files.delete(ck.chunk_file("features", c))
        self.files.delete(ck.chunk_file("q", c))

    def kernels(self, ck: ModelStore) -> None:
        base = f"checkpoints/{ck.model_id}/kernels"
        for name in self.files.list(base):
            self.report.count("kernels")
            try:
                read_whole(self.files, f"{base}/{name}", f"model {ck.model_id}, kernel {name}", "")
            except StoreCorruptError as error:
                detail = str(error).split(f"kernel {name}: ", 1)[-1].rstrip("; ")
                self.problem(
                    f"model {ck.model_id}, kernel {name}",
                    detail,
                    "deleted (rebuilt on the next score)",
                )
                if self.fix:
                    self.files.delete_tree(f"{base}/{name}")
