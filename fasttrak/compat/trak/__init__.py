"""A drop-in for the reference ``traker`` package (import name ``trak``).

Change ``from trak import TRAKer`` to ``from fasttrak.compat.trak import TRAKer``; the other
imports keep their module paths under ``fasttrak.compat.trak``: ``.modelout_functions``
(``AbstractModelOutput``, ``ImageClassificationModelOutput``, ...), ``.projectors``
(``BasicProjector``, ``CudaProjector``, ``NoOpProjector``, ``ProjectionType``),
``.gradient_computers``, ``.score_computers``, ``.savers``. See docs/migrating_from_trak.md.
"""

from fasttrak.compat.trak.modelout_functions import AbstractModelOutput
from fasttrak.compat.trak.savers import ModelIDException
from fasttrak.compat.trak.traker import TRAKer, UnfinishedFeaturesError, UsageError

__version__ = "0.3.2"  # the traker version whose interface this follows
VERSION = __version__

__all__ = [
    "AbstractModelOutput",
    "ModelIDException",
    "TRAKer",
    "UnfinishedFeaturesError",
    "UsageError",
    "VERSION",
    "__version__",
]
