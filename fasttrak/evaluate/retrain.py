"""Ground-truth harness: retrain a model on each subset and record its outputs (with caching)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from fasttrak.errors import ConfigTypeError, DataError, DataTypeError
from fasttrak.evaluate.common import (
    check_int,
    check_manifest,
    check_masks,
    load_cached,
    read_manifest,
)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

TrainFn = Callable[[np.ndarray, int], Any]


def retrain(
    train_fn: TrainFn,
    masks: Any,
    *,
    seeds_per_subset: int = 1,
    cache_dir: str | Path | None = None,
    key: str = "",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Train on every subset and return ``(masks, outputs)`` for :func:`lds`.

    train_fn(mask, seed) gets a (n,) bool mask (True = train on that example) and an int seed
    and returns the model output on each target as a 1-D (n_targets,) array or tensor.
    masks: (num_subsets, n) bool or 0/1, e.g. from :func:`sample_subsets`.
    Subset s is trained with seeds ``s * seeds_per_subset + j`` for j in range(seeds_per_subset)
    and ``outputs[s]`` is the mean over those seeds.

    With ``cache_dir``, each finished subset is saved as ``subset_{s:06d}.npy``, a
    (seeds_per_subset, n_targets) array, next to a ``manifest.json``; a rerun loads finished
    subsets and trains only the missing ones. ``key`` is an arbitrary string (e.g. a config
    name) stored in the manifest; a cache whose masks, seeds_per_subset, key or n_targets differ
    from the request raises ValueError.

    Returns masks as a (num_subsets, n) bool array and outputs as (num_subsets, n_targets)
    float64.
    """
    if not callable(train_fn):
        raise ConfigTypeError(
            f"train_fn must be callable (mask, seed) -> outputs, got {train_fn!r}"
        )
    masks_arr = check_masks(masks)
    seeds_per_subset = check_int("seeds_per_subset", seeds_per_subset, minimum=1)
    if not isinstance(key, str):
        raise ConfigTypeError(f"key must be a str, got {type(key).__name__}")
    num_subsets, n = masks_arr.shape
    if num_subsets == 0 or n == 0:
        raise DataError(
            f"masks must have at least one subset and one example, got {masks_arr.shape}"
        )

    cache = None if cache_dir is None else _Cache(Path(cache_dir), masks_arr, seeds_per_subset, key)
    results: list[np.ndarray | None] = [None] * num_subsets
    n_targets = None if cache is None else cache.n_targets
    if cache is not None:
        for s in range(num_subsets):
            results[s] = cache.load(s)
    missing = [s for s in range(num_subsets) if results[s] is None]

    with tqdm(
        total=num_subsets,
        initial=num_subsets - len(missing),
        disable=not progress,
        desc="retrain",
        unit="subset",
    ) as bar:
        for s in missing:
            per_seed = []
            for j in range(seeds_per_subset):
                seed = s * seeds_per_subset + j
                out = _as_output(train_fn(masks_arr[s].copy(), seed), s, seed, n_targets, cache)
                n_targets = out.shape[0]
                per_seed.append(out)
            results[s] = np.stack(per_seed)
            if cache is not None:
                cache.save(s, np.stack(per_seed))
            bar.update(1)

    outputs = np.stack([r.mean(axis=0) for r in results if r is not None])
    return masks_arr.copy(), outputs


def _as_output(
    value: Any, subset: int, seed: int, n_targets: int | None, cache: _Cache | None
) -> np.ndarray:
    """Convert one train_fn result to a finite (n_targets,) float64 array or raise."""
    where = f"train_fn(masks[{subset}], seed={seed})"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise DataTypeError(
            f"{where} returned dtype {arr.dtype}; return a numeric array (n_targets,)"
        )
    if arr.ndim != 1:
        raise DataError(
            f"{where} returned shape {arr.shape}; return a 1-D array (n_targets,)"
            + (" (use .reshape(1) for a single target)" if arr.ndim == 0 else "")
        )
    arr = arr.astype(np.float64)
    if n_targets is not None and arr.shape[0] != n_targets:
        if cache is not None:
            raise DataError(
                f"{where} returned {arr.shape[0]} outputs but the cache in {cache.dir} holds "
                f"{n_targets} per subset; use another cache_dir or delete it"
            )
        raise DataError(
            f"{where} returned {arr.shape[0]} outputs but earlier calls returned {n_targets}; "
            "train_fn must return the same number of targets every time"
        )
    if arr.shape[0] == 0:
        raise DataError(f"{where} returned an empty array; return one output per target")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DataError(
            f"{where} returned {bad} non-finite value(s) (NaN/inf); check that training "
            "converged on this subset"
        )
    return arr


class _Cache:
    """On-disk per-subset results plus a manifest describing the request."""

    def __init__(self, directory: Path, masks: np.ndarray, seeds_per_subset: int, key: str):
        self.dir = directory
        self.seeds_per_subset = seeds_per_subset
        self.dir.mkdir(parents=True, exist_ok=True)
        request = {
            "format_version": FORMAT_VERSION,
            "n": int(masks.shape[1]),
            "num_subsets": int(masks.shape[0]),
            "seeds_per_subset": seeds_per_subset,
            "masks_sha256": hashlib.sha256(np.ascontiguousarray(masks).tobytes()).hexdigest(),
            "key": key,
        }
        manifest_path = self.dir / MANIFEST_NAME
        if manifest_path.exists():
            manifest = read_manifest(manifest_path, "retrain")
            check_manifest(manifest, request, "retrain", self.dir)
            self.n_targets: int | None = manifest.get("n_targets")
        else:
            if any(self.dir.glob("subset_*.npy")):
                raise DataError(
                    f"retrain cache {self.dir} holds subset files but no {MANIFEST_NAME}; "
                    "use another cache_dir or delete it"
                )
            self.n_targets = None
        self._manifest = {**request, "n_targets": self.n_targets}
        if not manifest_path.exists():
            self._write_manifest()

    def path(self, subset: int) -> Path:
        return self.dir / f"subset_{subset:06d}.npy"

    def load(self, subset: int) -> np.ndarray | None:
        """Return the cached (seeds_per_subset, n_targets) array of ``subset``, or None."""
        return load_cached(self.path(subset), (self.seeds_per_subset, self.n_targets))

    def save(self, subset: int, arr: np.ndarray) -> None:
        """Atomically write the (seeds_per_subset, n_targets) results of ``subset``."""
        if self.n_targets is None:
            self.n_targets = int(arr.shape[1])
            self._manifest["n_targets"] = self.n_targets
            self._write_manifest()
        with _atomic_write(self.path(subset)) as f:
            np.save(f, arr, allow_pickle=False)

    def _write_manifest(self) -> None:
        with _atomic_write(self.dir / MANIFEST_NAME) as f:
            f.write(json.dumps(self._manifest, indent=2).encode())


@contextmanager
def _atomic_write(target: Path) -> Iterator[BinaryIO]:
    """Yield a temp file in ``target``'s directory; on success fsync it and os.replace it."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
