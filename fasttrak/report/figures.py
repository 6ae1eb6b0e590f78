"""Figures of attribution results (needs matplotlib: ``pip install fasttrak[viz]``).

matplotlib is imported only when a figure is drawn, and through its object-oriented API
with the Agg canvas, so importing this module and drawing never touch pyplot's global state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fasttrak.errors import DataError, MissingDependencyError
from fasttrak.scoring import TopK


def _agg_figure(**kwargs: Any) -> Any:
    """A matplotlib Figure on an Agg canvas, or an ImportError that says how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingDependencyError(
            "drawing figures needs matplotlib: pip install fasttrak[viz]"
        ) from error
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_top_attributions(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    target_images: np.ndarray,
    target_labels: np.ndarray,
    topk: TopK,
    path: str | Path,
    cmap: str = "gray_r",
) -> Path:
    """Save a PNG grid: one row per target with the target image, its proponents and its
    opponents (in the order of ``topk``), each titled with its label (and score).

    train_images: (n_train, H, W) or (n_train, H, W, C); train_labels: (n_train,);
    target_images / target_labels: the same for the T targets shown;
    topk: from ``scores.topk(k)``, restricted to those T targets (arrays of shape (T, k)).
    Returns the path written.
    """
    num_targets = len(target_images)
    if topk.proponents.shape[0] != num_targets or len(target_labels) != num_targets:
        raise DataError(
            f"{num_targets} target images, {len(target_labels)} labels and "
            f"{topk.proponents.shape[0]} topk rows: they must match (one row per target)"
        )
    k = topk.proponents.shape[1]
    height = 1.25 * num_targets + 0.5
    fig = _agg_figure(figsize=(2 * k + 1.6, height), dpi=100)
    # columns: target, gap, k proponents, gap, k opponents
    grid = fig.add_gridspec(
        num_targets, 2 * k + 3, width_ratios=[1, 0.3] + [1] * k + [0.3] + [1] * k, hspace=0.5
    )
    columns = {"target": [0], "pro": list(range(2, 2 + k)), "opp": list(range(3 + k, 3 + 2 * k))}
    axes = {name: [fig.add_subplot(grid[0, c]) for c in cols] for name, cols in columns.items()}
    for row in range(num_targets):
        row_axes = (
            axes
            if row == 0
            else {
                name: [fig.add_subplot(grid[row, c]) for c in cols]
                for name, cols in columns.items()
            }
        )
        label = f"label {int(target_labels[row])}"
        _image(row_axes["target"][0], target_images[row], cmap, label, "black")
        for name, index, score, color in (
            ("pro", topk.proponents[row], topk.proponent_scores[row], "tab:green"),
            ("opp", topk.opponents[row], topk.opponent_scores[row], "tab:red"),
        ):
            for ax, i, s in zip(row_axes[name], index, score, strict=True):
                _image(ax, train_images[i], cmap, f"{int(train_labels[i])}: {float(s):+.3g}", color)
    for name, text, color in (
        ("target", "target", "black"),
        ("pro", "top proponents (label: score)", "tab:green"),
        ("opp", "top opponents (label: score)", "tab:red"),
    ):
        _header(fig, axes[name], text, color, 0.35 / height)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out


def _header(fig: Any, axes: list[Any], text: str, color: str, gap: float) -> None:
    """Write ``text`` centred above the first-row ``axes``, ``gap`` figure heights higher."""
    left, right = axes[0].get_position().x0, axes[-1].get_position().x1
    top = axes[0].get_position().y1
    fig.text((left + right) / 2, top + gap, text, ha="center", va="bottom", color=color)


def _image(ax: Any, image: np.ndarray, cmap: str, title: str, color: str) -> None:
    """Draw one (H, W) or (H, W, C) image on ``ax`` without ticks, titled in ``color``."""
    ax.imshow(np.asarray(image), cmap=cmap, interpolation="nearest")
    ax.set_title(title, fontsize=8, color=color)
    ax.set_xticks([])
    ax.set_yticks([])
