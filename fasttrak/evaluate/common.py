"""What the evaluation modules share: input checks (integer options, subset masks) and
reading their cached outputs back."""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

import numpy as np

from fasttrak.errors import ConfigError, ConfigTypeError, DataError, DataTypeError


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an int, raising if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_masks(masks: object) -> np.ndarray:
    """Return ``masks`` as a 2-D bool array (num_subsets, n_train); accepts bool or 0/1 values."""
    arr = np.asarray(masks)
    if arr.ndim != 2:
        raise DataError(
            f"masks must be 2-D (num_subsets, n_train), got shape {arr.shape}; "
            "use sample_subsets(...) or stack one bool row per subset"
        )
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise DataTypeError(f"masks must hold bool or 0/1 values, got dtype {arr.dtype}")
    if not np.isin(arr, (0, 1)).all():
        raise DataError(
            "masks must hold only 0/1 (or bool) values; pass e.g. masks.astype(bool) "
            "if nonzero means 'in the subset'"
        )
    return arr.astype(bool)


def load_cached(path: Path, shape: tuple[int | None, ...]) -> np.ndarray | None:
    """The cached float array at ``path`` as float64, or None when there is none; DataError
    (saying to delete the file) when it is unreadable, of another shape, or not finite."""
    if not path.exists():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read cached {path} ({err}); delete that file") from err
    if arr.shape != shape or not np.isfinite(arr).all():
        raise DataError(
            f"cached {path} has shape {arr.shape} (expected {shape}, all finite); delete that file"
        )
    return arr.astype(np.float64, copy=False)


def read_manifest(path: Path, what: str) -> dict[str, Any]:
    """A cache's JSON manifest (a dict); DataError saying what to do when it is unreadable."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {path} ({err}); use another cache_dir or delete it") from err
    if not isinstance(manifest, dict):
        raise DataError(f"{path} is not a {what} manifest; use another cache_dir or delete it")
    return manifest


def check_manifest(
    recorded: dict[str, Any], request: dict[str, Any], what: str, directory: Path
) -> None:
    """ConfigError naming every field where a cache's manifest differs from the request."""
    diffs = [
        f"{name}: cache has {recorded.get(name)!r}, request has {value!r}"
        for name, value in request.items()
        if recorded.get(name) != value
    ]
    if diffs:
        raise ConfigError(
            f"{what} cache {directory} was made for another request ("
            + "; ".join(diffs)
            + "); use another cache_dir or delete it"
        )
