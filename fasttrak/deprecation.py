"""Old names that keep working for a while, with a warning that names the new one."""

from __future__ import annotations

import warnings


def deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn (FutureWarning, shown to users by default) that ``old`` is now ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed; use {new}",
        FutureWarning,
        stacklevel=stacklevel,
    )
