"""Names of ``trak.savers``, accepted for compatibility.

fasttrak keeps a TRAKer's work in its own store under ``save_dir`` (checksummed, resumable,
safe for many processes at once; see docs/store.md and docs/migrating_from_trak.md), so
``saver=`` is accepted and ignored. :class:`ModelIDException` is raised, as by traker, for
model ids that are not registered or not ready.
"""

from __future__ import annotations

from typing import Any

from fasttrak.errors import FastTrakError

__all__ = ["AbstractSaver", "MmapSaver", "ModelIDException"]


class ModelIDException(FastTrakError):
    """A model id is unknown, or not ready for what was asked (traker's exception)."""


class AbstractSaver:
    """Accepted for compatibility; fasttrak's store does the work."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class MmapSaver(AbstractSaver):
    """traker's default saver."""
