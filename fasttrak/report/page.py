"""A self-contained static HTML report of attribution scores: :func:`html`.

One page, ``index.html``, that opens offline in any browser: inline CSS, a few lines of
inline JavaScript (a filter), inline SVG histograms and images as base64 PNG data URIs.
A Content-Security-Policy forbids every network request, so the page is provably
self-contained. Needs only numpy; Pillow (shipped with matplotlib) encodes and downscales
the PNGs when installed, else they are written with zlib.
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fasttrak.errors import ConfigError, ConfigTypeError, DataError, DataTypeError
from fasttrak.scoring import Scores
from fasttrak.validation import is_int

THUMB_SIDE = 96
"""Largest side, in pixels, of an embedded image: bigger images are downscaled."""
DISPLAY_SIDE = 72
"""Largest side, in CSS pixels, of a thumbnail on the page (small images are upscaled
pixelated, so 8 x 8 digits stay sharp)."""
TEXT_CHARS = 240
"""Characters of a text item shown in its card (up to FULL_TEXT_CHARS in its tooltip)."""
FULL_TEXT_CHARS = 2000
LABEL_CHARS = 60
SETTING_CHARS = 400
"""Characters of one setting's value shown (a model's repr is cut here)."""
MIN_SUSPECTS = 10
"""Suspected mislabels listed per ranking: max(MIN_SUSPECTS, top), at most n_train."""
HIST_BINS = 30

TEXT_KEYS = ("text", "sentence", "content", "document", "prompt", "question", "caption")
IMAGE_KEYS = ("image", "img", "pixel_values", "pixels")
LABEL_KEYS = ("label", "labels", "y", "target", "class")

Render = Callable[[Any], dict]


# ---------------------------------------------------------------------- public function


def html(
    path: str | Path,
    scores: Scores | np.ndarray,
    train: Any,
    targets: Any,
    *,
    top: int = 5,
    self_influence: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    lds: Any = None,
    settings: dict[str, Any] | None = None,
    render: Callable[[Any], dict] | None = None,
    title: str = "fasttrak report",
    max_targets: int = 50,
) -> Path:
    """Write a self-contained HTML report of ``scores`` to ``path/index.html``; returns it.

    path: a folder (created if needed); a path ending in ``.html`` is written as that file.
    scores: ``(n_targets, n_train)``, an ``ft.Scores`` (streamed chunk by chunk) or an array.
    train, targets: the training set and the targets, in the order of the scores' columns
        and rows: a map-style Dataset, a tuple of tensors/arrays/lists ``(X, y)``, a list
        of items (``(x, y)`` pairs, dicts, strings), a tensor/array of inputs, or None
        (items then shown by index only).
    top: proponents and opponents shown per target (at most n_train).
    self_influence: ``(n_train,)`` from ``trak.self_influence()``: adds its ranking to the
        suspected mislabels.
    class_names: names of integer labels (``class_names[y]``).
    lds: an ``ft.evaluate.LDSResult`` (mean, stderr and its per-target histogram) or a float.
    settings: the run's settings, shown as a table: a dict (``trak.options``), or
        ``ft.store_info(store)`` as it is (its settings and progress).
    render: ``item -> {"image": HxW / HxWxC / CxHxW array} or {"text": str}``, plus an
        optional ``"label"``; default: detected from the data (2D/3D arrays and flat
        square vectors as images, normalised per image; strings and dicts with a text key
        as text; labels from ``(x, y)`` pairs and dicts' ``label``).
    title: the page's title.
    max_targets: targets shown (the first ones); totals still use every target.

    The page shows, per target, the target and its top proponents and opponents with their
    scores and labels (a green or red edge: same label as the target or not), a histogram of
    its scores; an overall histogram; the suspected mislabels (most negative total influence
    over all targets, highest self-influence); the settings and the LDS.
    """
    top = _positive("top", top)
    max_targets = _positive("max_targets", max_targets)
    if not isinstance(title, str):
        raise ConfigTypeError(f"title must be a string, got {type(title).__name__}")
    names = _class_names(class_names)
    lds_info = _lds(lds)
    settings_rows = _settings(settings)
    if render is not None and not callable(render):
        raise ConfigTypeError(
            f"render must be a function item -> {{'image': array}} or {{'text': str}}, "
            f"got {type(render).__name__}"
        )
    out = _output_path(path)

    n_targets, n_train = _shape(scores)
    train_items = _Items("train", train, n_train, "columns of scores (n_train)")
    target_items = _Items("targets", targets, n_targets, "rows of scores (n_targets)")
    self_inf = _self_influence(self_influence, n_train)
    top = min(top, n_train)
    shown = min(max_targets, n_targets)
    rows, total = _read_scores(scores, shown, n_train)

    renderer = _Renderer(render, names)
    page = _Page(title)
    page.header(n_targets, n_train, shown, top)
    page.overview(rows, lds_info, n_targets)
    page.suspects(total, self_inf, train_items, renderer, n_targets, max(MIN_SUSPECTS, top))
    page.settings(settings_rows)
    page.targets(rows, top, train_items, target_items, renderer, n_targets)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(page.finish(), encoding="utf-8")
    os.replace(partial, out)  # a reader never sees half a page
    return out


# ---------------------------------------------------------------------- argument checks


def _positive(name: str, value: Any) -> int:
    if not is_int(value):
        raise ConfigTypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer (1 or more), got {value!r}")
    return int(value)


def _class_names(class_names: Sequence[str] | None) -> list[str] | None:
    if class_names is None:
        return None
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
        raise ConfigTypeError(
            "class_names must be a list of strings, one per integer label (e.g. "
            f"['cat', 'dog']), got {type(class_names).__name__}"
        )
    return [str(name) for name in class_names]


@dataclass(frozen=True)
class _LDSInfo:
    mean: float
    stderr: float | None
    num_valid: int | None
    per_target: np.ndarray | None


def _lds(lds: Any) -> _LDSInfo | None:
    if lds is None:
        return None
    if isinstance(lds, (int, float, np.integer, np.floating)) and not isinstance(lds, bool):
        return _LDSInfo(float(lds), None, None, None)
    if all(hasattr(lds, name) for name in ("mean", "stderr", "per_target", "num_valid")):
        per_target = np.asarray(lds.per_target, dtype=np.float64).reshape(-1)
        return _LDSInfo(float(lds.mean), float(lds.stderr), int(lds.num_valid), per_target)
    raise ConfigTypeError(
        "lds= takes the result of ft.evaluate.lds(...) (an LDSResult), a float, or None; "
        f"got {type(lds).__name__}"
    )


def _settings(settings: Any) -> list[tuple[str, str]]:
    """Rows (name, value text) of the settings table. Also takes ``ft.store_info(path)``
    as it is: a (settings dict, progress) pair, the progress shown as one more row."""
    if settings is None:
        return []
    extra: list[tuple[str, str]] = []
    if isinstance(settings, tuple) and len(settings) == 2 and isinstance(settings[0], Mapping):
        settings, progress = settings
        extra = [("progress", _cut(str(progress), SETTING_CHARS))]
    if not isinstance(settings, Mapping):
        raise ConfigTypeError(
            "settings= takes a dict of name -> value (e.g. ft.store_info(store) or "
            f"trak.options), got {type(settings).__name__}"
        )
    rows = [(str(name), _setting_text(value)) for name, value in settings.items()]
    return rows + extra


def _setting_text(value: Any) -> str:
    if value is None or isinstance(value, (str, int, float, bool, np.generic)):
        text = str(value)
    elif isinstance(value, (Mapping, list, tuple)):
        try:
            text = json.dumps(value, default=repr, sort_keys=False)
        except (TypeError, ValueError):
            text = repr(value)
    else:
        text = repr(value)
    return _cut(text, SETTING_CHARS)


def _output_path(path: str | Path) -> Path:
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ConfigTypeError(f"path must be a folder path (str or Path), got {path!r}")
    p = Path(path)
    if p.suffix.lower() in (".html", ".htm"):
        return p
    if p.exists() and not p.is_dir():
        raise ConfigError(
            f"{p} is a file; html() writes a folder (PATH/index.html): pass a folder path "
            "or a path ending in .html"
        )
    return p / "index.html"


def _self_influence(values: np.ndarray | None, n_train: int) -> np.ndarray | None:
    if values is None:
        return None
    arr = _to_numpy(values)
    if arr.ndim != 1 or arr.shape[0] != n_train:
        raise DataError(
            f"self_influence must have shape (n_train,) = ({n_train},), one value per column "
            f"of scores (from trak.self_influence()); got shape {arr.shape}"
        )
    arr = _numeric("self_influence", arr)
    if not np.isfinite(arr).all():
        raise DataError("self_influence contains NaN or infinity; recompute it")
    return arr


def _to_numpy(value: Any) -> np.ndarray:
    """An array from a numpy array, a torch tensor (any device, any dtype) or a list."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in _NUMPY_FLOATS:
            tensor = tensor.float()  # bfloat16 and friends have no numpy dtype
        return np.asarray(tensor.numpy())
    return np.asarray(value)


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _numeric(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise DataTypeError(f"{name} must hold numbers, got an array of dtype {arr.dtype}")
    return arr.astype(np.float64)


# ---------------------------------------------------------------------- scores


def _shape(scores: Any) -> tuple[int, int]:
    if isinstance(scores, Scores):
        return scores.shape
    if not hasattr(scores, "shape") and not isinstance(scores, (list, tuple)):
        raise DataTypeError(
            "scores must be an ft.Scores (from trak.score(...)) or an array of shape "
            f"(n_targets, n_train), got {type(scores).__name__}"
        )
    shape = tuple(int(d) for d in np.shape(scores))
    if len(shape) != 2 or min(shape) < 1:
        raise DataError(
            f"scores must be a 2D array of shape (n_targets, n_train), got shape {shape}; "
            "for a single target pass scores[None, :] (or scores.reshape(1, -1))"
        )
    return shape[0], shape[1]


def _read_scores(scores: Any, shown: int, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the ``shown`` first targets (shown, n_train) float64 and each training
    example's total over all targets (n_train,) float64, streamed for ``ft.Scores``."""
    if isinstance(scores, Scores) and scores._dense is None:
        rows = np.empty((shown, n_train), dtype=np.float64)
        total = np.empty(n_train, dtype=np.float64)
        for span, block in scores.chunks():
            rows[:, span] = block[:shown]
            total[span] = block.sum(axis=0, dtype=np.float64)
    else:
        dense = np.asarray(scores) if isinstance(scores, Scores) else _to_numpy(scores)
        dense = _numeric("scores", dense)
        rows = dense[:shown]
        total = dense.sum(axis=0)
    bad = int((~np.isfinite(rows)).sum()) + int((~np.isfinite(total)).sum())
    if bad:
        raise DataError(
            f"scores contain NaN or infinity ({bad} values); they come from non-finite "
            "features or a failed solve: check the store with `fasttrak verify STORE` and "
            "rescore"
        )
    return rows, total


def _top(row: np.ndarray, k: int, highest: bool) -> np.ndarray:
    """Indices of the k highest (or lowest) values of ``row``, most extreme first."""
    keyed = -row if highest else row
    if k < row.shape[0]:
        part = np.argpartition(keyed, k - 1)[:k]
    else:
        part = np.arange(row.shape[0])
    return part[np.argsort(keyed[part], kind="stable")]


# ---------------------------------------------------------------------- data access


class _Items:
    """Random access to the items of a dataset of any supported kind."""

    def __init__(self, name: str, data: Any, expected: int, what: str) -> None:
        self.name = name
        self._get: Callable[[int], Any] | None
        if data is None:
            self._get = None
            return
        data = getattr(data, "dataset", data) if _is_loader(data) else data
        if isinstance(data, (str, bytes)):
            raise DataTypeError(
                f"{name} is a single string; pass a list of strings, one per example"
            )
        columns = _columns(data)
        if columns is not None:
            count, self._get = columns
        elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            count = len(data)
            self._get = data.__getitem__
        else:
            raise DataTypeError(
                f"{name} must give random access to its items: a map-style Dataset, a list, "
                f"a tuple of tensors (X, y), or None; got {type(data).__name__} (for an "
                "iterable dataset, pass list(dataset))"
            )
        if count != expected:
            raise DataError(
                f"{name} has {count} examples but scores have {expected} {what}: pass the "
                f"same {name} the scores were computed with, in the same order (scores are "
                "(n_targets, n_train), as from trak.score(targets))"
            )

    def __getitem__(self, index: int) -> Any:
        return None if self._get is None else self._get(int(index))

    @property
    def present(self) -> bool:
        return self._get is not None


def _is_loader(data: Any) -> bool:
    return isinstance(data, torch.utils.data.DataLoader)


def _is_column(value: Any) -> bool:
    return isinstance(value, (np.ndarray, list, torch.Tensor)) and np.ndim(value) > 0


def _columns(data: Any) -> tuple[int, Callable[[int], Any]] | None:
    """A tuple of equal-length columns ``(X, y)`` or a dict of columns, else None."""
    if isinstance(data, tuple) and data and all(_is_column(c) for c in data):
        lengths = {len(c) for c in data}
        if len(lengths) != 1:
            raise DataError(
                f"the columns of a tuple (X, y) must have the same length, got lengths "
                f"{[len(c) for c in data]}"
            )
        if len(data) == 1:
            only = data[0]
            return len(only), lambda i: only[i]
        return lengths.pop(), lambda i: tuple(c[i] for c in data)
    if isinstance(data, Mapping):
        lengths = {len(c) if _is_column(c) else -1 for c in data.values()}
        if len(lengths) != 1 or -1 in lengths:
            raise DataTypeError(
                "a dict is read as columns of equal length ({'text': [...], 'label': [...]}); "
                f"got keys {sorted(map(str, data))[:8]} with values of other kinds or lengths"
            )
        return lengths.pop(), lambda i: {k: c[i] for k, c in data.items()}
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if np.ndim(data) == 0:
            raise DataError("a 0-dimensional array is not a dataset: pass one item per row")
        return len(data), lambda i: data[i]
    return None


# ---------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Shown:
    """One item as the page shows it: an image (data URI and display size) or a text."""

    image: str | None = None
    size: tuple[int, int] = (0, 0)
    pixelated: bool = False
    text: str | None = None
    label: str | None = None
    label_key: Any = None


class _Renderer:
    """Items to :class:`_Shown`, cached by (dataset, index)."""

    def __init__(self, render: Render | None, class_names: list[str] | None) -> None:
        self.render = render
        self.class_names = class_names
        self._cache: dict[tuple[str, int], _Shown] = {}

    def __call__(self, items: _Items, index: int) -> _Shown:
        key = (items.name, int(index))
        if key not in self._cache:
            self._cache[key] = self._make(items, int(index))
        return self._cache[key]

    def _make(self, items: _Items, index: int) -> _Shown:
        if not items.present:
            return _Shown()
        item = items[index]
        if self.render is not None:
            try:
                spec = self.render(item)
            except Exception as error:
                raise DataError(
                    f"render({items.name}[{index}]) raised {type(error).__name__}: {error}"
                ) from error
            return self._from_spec(spec, f"render({items.name}[{index}])")
        content, label = _split(item)
        return self._content(content, label)

    def _from_spec(self, spec: Any, where: str) -> _Shown:
        if not isinstance(spec, Mapping) or not ("image" in spec or "text" in spec):
            raise DataError(
                f"{where} returned {type(spec).__name__}; render must return a dict "
                "{'image': HxW or HxWxC array} or {'text': str}, plus an optional 'label'"
            )
        label = spec.get("label")
        if "image" in spec:
            pixels = _image_array(_to_array(spec["image"]))
            if pixels is None:
                raise DataError(
                    f"{where} returned an image of shape {np.shape(spec['image'])}; an image "
                    "is HxW, HxWxC or CxHxW with C in (1, 3, 4)"
                )
            return self._image(pixels, label)
        return _Shown(text=str(spec["text"]), **self._label(label))

    def _content(self, content: Any, label: Any) -> _Shown:
        if isinstance(content, str):
            return _Shown(text=content, **self._label(label))
        if isinstance(content, bytes):
            return _Shown(text=content.decode("utf-8", "replace"), **self._label(label))
        arr = _to_array(content)
        if arr is None:
            return _Shown(text=repr(content), **self._label(label))
        pixels = _image_array(arr)
        if pixels is not None:
            return self._image(pixels, label)
        return _Shown(text=_array_text(arr), **self._label(label))

    def _image(self, pixels: np.ndarray, label: Any) -> _Shown:
        pixels = _downscale(pixels, THUMB_SIDE)
        h, w = pixels.shape[:2]
        scale = DISPLAY_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        uri = "data:image/png;base64," + base64.b64encode(_png(pixels)).decode("ascii")
        return _Shown(image=uri, size=size, pixelated=scale > 1, **self._label(label))

    def _label(self, label: Any) -> dict[str, Any]:
        key = _scalar(label)
        if key is None:
            return {"label": None, "label_key": None}
        names = self.class_names
        if names is not None and is_int(key) and 0 <= int(key) < len(names):
            return {"label": f"{names[int(key)]} ({int(key)})", "label_key": int(key)}
        if isinstance(key, float):
            return {"label": f"{key:.4g}", "label_key": key}
        return {"label": _cut(str(key), LABEL_CHARS), "label_key": key}


def _scalar(value: Any) -> Any:
    """A label as a Python scalar (int, float, str, bool), or None if it is not one."""
    if isinstance(value, (str, int, float)):
        return value
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        arr = _to_numpy(value)
        if arr.size == 1 and arr.dtype.kind in "biufU":
            return arr.reshape(()).item()
    return None


def _is_number(value: Any) -> bool:
    scalar = _scalar(value)
    return scalar is not None and not isinstance(scalar, str)


def _split(item: Any) -> tuple[Any, Any]:
    """(content, label) of an item: ``(x, y, ...)`` pairs, dicts, or the item itself."""
    if isinstance(item, Mapping):
        label = next((item[k] for k in LABEL_KEYS if k in item), None)
        for key in TEXT_KEYS:
            if key in item and isinstance(item[key], (str, bytes)):
                return item[key], label
        for key in IMAGE_KEYS:
            if key in item:
                return item[key], label
        if "input_ids" in item:
            return item["input_ids"], label
        rest = {k: v for k, v in item.items() if k not in LABEL_KEYS}
        if len(rest) == 1:
            return next(iter(rest.values())), label
        return "{" + ", ".join(sorted(map(str, rest))) + "}", label
    if isinstance(item, (tuple, list)) and len(item) >= 2 and not _is_number(item[0]):
        if _scalar(item[1]) is not None:
            return item[0], item[1]
    return item, None


def _to_array(value: Any) -> np.ndarray | None:
    """An array of numbers from a tensor, an array, a PIL image or a list; else None."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        arr = _to_numpy(value)
    elif hasattr(value, "getbands") and hasattr(value, "size"):  # a PIL image
        arr = np.asarray(value)
    elif isinstance(value, (list, tuple, int, float, np.generic)):
        try:
            arr = np.asarray(value)
        except ValueError:
            return None
    else:
        return None
    return arr if arr.dtype.kind in "biuf" else None


def _image_array(arr: np.ndarray | None) -> np.ndarray | None:
    """(H, W) or (H, W, 3) uint8 pixels if ``arr`` looks like an image, else None.

    2D: an image. 3D: HWC when the last axis has 1, 3 or 4 channels, else CHW when the
    first has. 1D: a flattened square image (64 -> 8x8) when floating point or uint8 and
    at least 16 values (integer vectors are token ids, shown as text). Leading axes of
    size 1 are dropped. Values are scaled per image to [0, 255] (uint8 is kept as is).
    """
    if arr is None or arr.size == 0:
        return None
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 1:
        side = math.isqrt(arr.shape[0])
        if side < 4 or side * side != arr.shape[0] or arr.dtype.kind not in "fu":
            return None
        if arr.dtype.kind == "u" and arr.dtype != np.uint8:
            return None
        arr = arr.reshape(side, side)
    elif arr.ndim == 3:
        if arr.shape[-1] in (1, 3, 4):
            pass
        elif arr.shape[0] in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)
        else:
            return None
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr[..., :3]
    elif arr.ndim != 2:
        return None
    if min(arr.shape[:2]) < 1:
        return None
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    values = arr.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    scaled = (values - lo) / (hi - lo) if hi > lo else np.full(values.shape, 0.5)
    scaled = np.where(finite, scaled, 0.0)
    return np.ascontiguousarray(np.round(scaled * 255).astype(np.uint8))


def _array_text(arr: np.ndarray) -> str:
    """A numeric array that is not an image, as text: token ids or a vector's values."""
    if arr.ndim == 0:
        return str(arr.item())
    flat = arr.reshape(-1)
    if arr.dtype.kind in "iu" and arr.ndim == 1:
        head = " ".join(str(int(v)) for v in flat[:64])
        return f"token ids ({flat.shape[0]}): {head}" + (" …" if flat.shape[0] > 64 else "")
    head = ", ".join(f"{float(v):.3g}" for v in flat[:16])
    more = ", …" if flat.shape[0] > 16 else ""
    return f"array {tuple(arr.shape)}: [{head}{more}]"


def _downscale(pixels: np.ndarray, side: int) -> np.ndarray:
    """``pixels`` with its longer side at most ``side`` (Pillow's box filter when it is
    installed, else every n-th pixel)."""
    h, w = pixels.shape[:2]
    if max(h, w) <= side:
        return pixels
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    try:
        from PIL import Image
    except ImportError:
        step = math.ceil(max(h, w) / side)
        return np.ascontiguousarray(pixels[::step, ::step])
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))


def _png(pixels: np.ndarray) -> bytes:
    """PNG bytes of (H, W) or (H, W, 3) uint8 pixels (Pillow when installed, else zlib)."""
    try:
        from PIL import Image
    except ImportError:
        return _png_zlib(pixels)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _png_zlib(pixels: np.ndarray) -> bytes:
    """A PNG written by hand: 8-bit grayscale or RGB, no filtering, one zlib IDAT chunk."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    h, w = pixels.shape[:2]
    color = 0 if pixels.ndim == 2 else 2
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------- SVG


def _histogram_svg(
    values: np.ndarray, width: int, height: int, label: str, bins: int = HIST_BINS
) -> str:
    """An inline SVG histogram of ``values`` (bar heights ∝ √count, so tails show), with
    its range under it and a dashed line at 0."""
    values = values[np.isfinite(values)]
    axis = 14
    plot_h = height - axis
    esc = _esc(label)
    if values.size == 0:
        return (
            f'<svg class="hist" width="{width}" height="{height}" role="img" '
            f'aria-label="{esc}"><text x="4" y="14">no values</text></svg>'
        )
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, _ = np.histogram(values, bins=bins, range=(lo, hi))
    peak = math.sqrt(float(counts.max())) or 1.0
    bar_w = width / bins
    parts = [
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{esc}"><title>{esc}</title>'
    ]
    for i, count in enumerate(counts):
        if count == 0:
            continue
        bar_h = max(1.0, plot_h * math.sqrt(float(count)) / peak)
        x0 = lo + (hi - lo) * i / bins
        x1 = lo + (hi - lo) * (i + 1) / bins
        parts.append(
            f'<rect x="{i * bar_w:.2f}" y="{plot_h - bar_h:.2f}" width="{max(bar_w - 1, 1):.2f}" '
            f'height="{bar_h:.2f}"><title>[{x0:.3g}, {x1:.3g}): {int(count)}</title></rect>'
        )
    if lo < 0 < hi:
        x = width * (0 - lo) / (hi - lo)
        parts.append(f'<line class="zero" x1="{x:.2f}" y1="0" x2="{x:.2f}" y2="{plot_h}"></line>')
    parts.append(f'<line class="axis" x1="0" y1="{plot_h}" x2="{width}" y2="{plot_h}"></line>')
    parts.append(f'<text x="0" y="{height - 2}">{lo:.3g}</text>')
    parts.append(f'<text x="{width}" y="{height - 2}" text-anchor="end">{hi:.3g}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------- the page


def _esc(text: Any) -> str:
    return html_lib.escape(str(text), quote=True)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt(value: float) -> str:
    return f"{value:+.4g}"


class _Page:
    """The HTML of the report, built section by section."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.summary = ""
        self.body: list[str] = []
        self.nav: list[tuple[str, str]] = []

    def section(self, anchor: str, heading: str, content: str) -> None:
        self.nav.append((anchor, heading))
        self.body.append(f'<section id="{anchor}"><h2>{_esc(heading)}</h2>{content}</section>')

    def header(self, n_targets: int, n_train: int, shown: int, top: int) -> None:
        from fasttrak import __version__

        more = f" (the first {shown} of {n_targets} are shown)" if shown < n_targets else ""
        self.summary = (
            f"{n_targets} targets scored against {n_train} training examples{more}; "
            f"top {top} proponents and opponents per target. fasttrak {__version__}."
        )

    def overview(self, rows: np.ndarray, lds: _LDSInfo | None, n_targets: int) -> None:
        parts = []
        if lds is not None:
            value = f"{lds.mean:.3f}"
            if lds.stderr is not None and math.isfinite(lds.stderr):
                value += f" ± {lds.stderr:.3f}"
            detail = ""
            if lds.num_valid is not None and lds.per_target is not None:
                detail = f" over {lds.num_valid} of {lds.per_target.shape[0]} targets"
            parts.append(
                f'<p class="lds">Linear datamodeling score (LDS): <b>{_esc(value)}</b>'
                f"{_esc(detail)}: the Spearman correlation between the outputs the scores "
                "predict for models retrained on random subsets and the outputs measured "
                "(1 is perfect, 0 is chance).</p>"
            )
            if lds.per_target is not None and np.isfinite(lds.per_target).any():
                parts.append(
                    "<figure>"
                    + _histogram_svg(lds.per_target, 480, 110, "LDS per target", bins=20)
                    + "<figcaption>LDS per target</figcaption></figure>"
                )
        else:
            parts.append(
                '<p class="lds">No LDS given (evaluate with <code>ft.evaluate.lds</code> '
                "and pass <code>lds=</code>).</p>"
            )
        what = "all" if rows.shape[0] == n_targets else f"the {rows.shape[0]} shown"
        parts.append(
            "<figure>"
            + _histogram_svg(rows.reshape(-1), 640, 140, "scores of the shown targets")
            + f"<figcaption>Scores of {what} targets against every training example "
            f"({rows.size} values; bar heights ∝ √count; dashed line: 0)</figcaption></figure>"
        )
        self.section("overview", "Overview", "".join(parts))

    def suspects(
        self,
        total: np.ndarray,
        self_inf: np.ndarray | None,
        train: _Items,
        render: _Renderer,
        n_targets: int,
        count: int,
    ) -> None:
        count = min(count, total.shape[0])
        negative = _top(total, count, highest=False)
        lists = [("total", negative, total)]
        if self_inf is not None:
            lists.append(("self", _top(self_inf, count, highest=True), self_inf))
        both = set(negative.tolist()) & set(lists[-1][1].tolist()) if len(lists) > 1 else set()
        parts = [
            "<p>Training examples that the scores suggest may be mislabeled or harmful. "
            "Check them by eye; none is proven wrong.</p>",
            f"<h3>Most negative total influence</h3><p>The sum of each training example's "
            f"scores over all {n_targets} targets: examples that, on balance, push the model "
            "away from the targets' labels.</p>",
            _histogram_svg(total, 480, 90, "total influence per training example"),
        ]
        parts.append(self._cards(negative, total, train, render, both, "total"))
        if self_inf is not None:
            parts += [
                "<h3>Highest self-influence</h3><p>Each example's score on itself "
                "(<code>trak.self_influence()</code>): examples the models can only fit by "
                "memorising them, often atypical or mislabeled.</p>",
                _histogram_svg(self_inf, 480, 90, "self-influence per training example"),
                self._cards(lists[1][1], self_inf, train, render, both, "self"),
            ]
            if both:
                parts.append(
                    f"<p>{len(both)} example(s) are in both lists (marked "
                    '<span class="badge">both</span>).</p>'
                )
        else:
            parts.append(
                "<p>Pass <code>self_influence=trak.self_influence()</code> to add the "
                "self-influence ranking.</p>"
            )
        self.section("suspects", "Suspected mislabels", "".join(parts))

    def _cards(
        self,
        indices: np.ndarray,
        values: np.ndarray,
        train: _Items,
        render: _Renderer,
        both: set[int],
        kind: str,
    ) -> str:
        cards = [
            self._card(
                render(train, int(i)),
                f"train #{int(i)}",
                float(values[i]),
                "",
                badge="both" if int(i) in both else None,
            )
            for i in indices
        ]
        return f'<div class="items {kind}">' + "".join(cards) + "</div>"

    def settings(self, rows: list[tuple[str, str]]) -> None:
        if not rows:
            content = (
                "<p>No settings given (pass <code>settings=ft.store_info(store)</code> or "
                "<code>trak.options</code>).</p>"
            )
        else:
            content = (
                '<table class="settings"><tbody>'
                + "".join(
                    f"<tr><th>{_esc(name)}</th><td><code>{_esc(value)}</code></td></tr>"
                    for name, value in rows
                )
                + "</tbody></table>"
            )
        self.section("settings", "Settings", content)

    def targets(
        self,
        rows: np.ndarray,
        top: int,
        train: _Items,
        targets: _Items,
        render: _Renderer,
        n_targets: int,
    ) -> None:
        parts = [
            '<div class="filters"><label>Filter by label or index '
            '<input id="filter" type="search" placeholder="e.g. 7"></label> '
            '<label><input id="disagree" type="checkbox"> only targets whose top proponent '
            'has another label</label> <span id="count"></span></div>',
            '<p class="legend"><span class="same">green edge</span>: same label as the target; '
            '<span class="diff">red edge</span>: another label. Scores: positive = the '
            "training example raises the target's output (proponent), negative = lowers it "
            "(opponent).</p>",
        ]
        for t in range(rows.shape[0]):
            parts.append(self._target(t, rows[t], top, train, targets, render))
        more = rows.shape[0] < n_targets
        heading = f"Targets ({rows.shape[0]} of {n_targets})" if more else "Targets"
        self.section("targets", heading, "".join(parts))

    def _target(
        self,
        t: int,
        row: np.ndarray,
        top: int,
        train: _Items,
        targets: _Items,
        render: _Renderer,
    ) -> str:
        target = render(targets, t)
        pro = _top(row, top, highest=True)
        opp = _top(row, top, highest=False)
        pro_cards: list[str] = []
        opp_cards: list[str] = []
        for indices, cards in ((pro, pro_cards), (opp, opp_cards)):
            for i in indices:
                shown = render(train, int(i))
                cards.append(
                    self._card(shown, f"train #{int(i)}", float(row[i]), _agreement(target, shown))
                )
        first = render(train, int(pro[0]))
        disagree = _agreement(target, first) == "diff"
        label = target.label if target.label is not None else ""
        search = f"{t} {label}".strip()
        return (
            f'<article class="target" id="target-{t}" data-search="{_esc(search.lower())}" '
            f'data-disagree="{int(disagree)}">'
            f"<h3>Target {t}"
            + (f' <span class="label">{_esc(target.label)}</span>' if target.label else "")
            + "</h3>"
            '<div class="head">'
            + self._card(target, f"target {t}", None, "")
            + "<figure>"
            + _histogram_svg(row, 300, 80, f"scores of target {t}")
            + f"<figcaption>its {row.shape[0]} scores</figcaption></figure></div>"
            '<div class="pair"><div><h4 class="pro">Top proponents</h4><div class="items">'
            + "".join(pro_cards)
            + '</div></div><div><h4 class="opp">Top opponents</h4><div class="items">'
            + "".join(opp_cards)
            + "</div></div></div></article>"
        )

    def _card(
        self,
        shown: _Shown,
        name: str,
        score: float | None,
        agreement: str,
        badge: str | None = None,
    ) -> str:
        if shown.image is not None:
            w, h = shown.size
            pixel = ' class="pixelated"' if shown.pixelated else ""
            body = f'<img src="{shown.image}" width="{w}" height="{h}" alt="{_esc(name)}"{pixel}>'
        elif shown.text is not None:
            body = (
                f'<div class="text" title="{_esc(_cut(shown.text, FULL_TEXT_CHARS))}">'
                f"{_esc(_cut(shown.text, TEXT_CHARS))}</div>"
            )
        else:
            body = '<div class="text none">(no data)</div>'
        caption = [f'<span class="name">{_esc(name)}</span>']
        if shown.label is not None:
            caption.append(f'<span class="label" title="label">{_esc(shown.label)}</span>')
        if score is not None:
            sign = "pos" if score > 0 else "neg" if score < 0 else ""
            caption.append(f'<span class="score {sign}">{_esc(_fmt(score))}</span>')
        if badge:
            caption.append(f'<span class="badge">{_esc(badge)}</span>')
        kind = "image" if shown.image is not None else "text"
        return (
            f'<figure class="item {kind} {agreement}">{body}'
            f"<figcaption>{' '.join(caption)}</figcaption></figure>"
        )

    def finish(self) -> str:
        nav = " · ".join(f'<a href="#{a}">{_esc(h)}</a>' for a, h in self.nav)
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            '<link rel="icon" href="data:,">'
            f"<title>{_esc(self.title)}</title><style>{_CSS}</style></head>"
            f'<body><header><h1>{_esc(self.title)}</h1><p class="summary">'
            f"{_esc(self.summary)}</p><nav>{nav}</nav></header><main>"
            + "".join(self.body)
            + f"</main><script>{_JS}</script></body></html>\n"
        )


def _agreement(target: _Shown, item: _Shown) -> str:
    if target.label_key is None or item.label_key is None:
        return ""
    return "same" if target.label_key == item.label_key else "diff"


_CSS = """
:root { --pro: #1a7f37; --opp: #cf222e; --muted: #57606a; --line: #d0d7de; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  margin: 0; color: #1f2328; background: #f6f8fa; }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 12px 24px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
.summary { margin: 0 0 6px; color: var(--muted); }
nav a { color: #0969da; text-decoration: none; }
main { padding: 8px 24px 48px; max-width: 1400px; }
section { margin-top: 16px; }
h2 { font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 12px 0 6px; }
h4 { font-size: 13px; margin: 8px 0 4px; }
h4.pro { color: var(--pro); } h4.opp { color: var(--opp); }
figure { margin: 0; }
figcaption { font-size: 12px; color: var(--muted); }
.items { display: flex; flex-wrap: wrap; gap: 6px; }
.item { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 4px;
  display: flex; flex-direction: column; align-items: center; max-width: 220px; }
.item.image { width: 96px; }
.item.text { width: 220px; align-items: stretch; }
.item.same { border: 2px solid var(--pro); } .item.diff { border: 2px solid var(--opp); }
.item img { display: block; background: #000; }
.item img.pixelated { image-rendering: pixelated; }
.item figcaption { display: flex; flex-wrap: wrap; gap: 4px; justify-content: center;
  margin-top: 3px; text-align: center; }
.text { font-size: 12px; white-space: pre-wrap; overflow-wrap: anywhere; max-height: 9em;
  overflow: hidden; }
.text.none { color: var(--muted); }
.label { background: #eaeef2; border-radius: 8px; padding: 0 6px; font-size: 12px; }
.score { font-variant-numeric: tabular-nums; font-weight: 600; }
.score.pos { color: var(--pro); } .score.neg { color: var(--opp); }
.badge { background: #bf8700; color: #fff; border-radius: 8px; padding: 0 6px; font-size: 11px; }
article.target { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 8px 12px 12px; margin: 12px 0; }
article.target .item { background: #fafbfc; }
.head { display: flex; gap: 16px; align-items: flex-end; }
.pair { display: flex; flex-wrap: wrap; gap: 8px 32px; }
svg.hist { display: block; background: #fff; }
svg.hist rect { fill: #8c959f; } svg.hist rect:hover { fill: #0969da; }
svg.hist line.axis { stroke: #57606a; } svg.hist line.zero { stroke: #cf222e;
  stroke-dasharray: 3 2; }
svg.hist text { font-size: 10px; fill: #57606a; }
table.settings { border-collapse: collapse; background: #fff; }
table.settings th, table.settings td { border: 1px solid var(--line); padding: 3px 8px;
  text-align: left; vertical-align: top; }
table.settings code { white-space: pre-wrap; overflow-wrap: anywhere; }
.filters { margin: 8px 0; display: flex; flex-wrap: wrap; gap: 6px 24px; }
#count { color: var(--muted); } .legend { color: var(--muted); font-size: 12px; }
.legend .same { color: var(--pro); } .legend .diff { color: var(--opp); }
.hidden { display: none; }
"""

_JS = """
(function () {
  "use strict";
  var filter = document.getElementById("filter");
  var disagree = document.getElementById("disagree");
  var count = document.getElementById("count");
  if (!filter || !disagree || !count) { return; }
  var targets = Array.prototype.slice.call(document.querySelectorAll("article.target"));
  function apply() {
    var words = filter.value.toLowerCase().trim().split(/\\s+/).filter(Boolean);
    var shown = 0;
    targets.forEach(function (t) {
      var text = t.getAttribute("data-search") || "";
      var ok = words.every(function (w) { return text.indexOf(w) >= 0; });
      if (disagree.checked && t.getAttribute("data-disagree") !== "1") { ok = false; }
      t.classList.toggle("hidden", !ok);
      if (ok) { shown += 1; }
    });
    count.textContent = shown + " of " + targets.length + " targets shown";
  }
  filter.addEventListener("input", apply);
  disagree.addEventListener("change", apply);
  apply();
})();
"""
