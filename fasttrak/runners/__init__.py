"""Where featurize and score run: this process (``runner=None``, the default) or a Ray
cluster (``runner=ft.runners.Ray(...)``, the ``fasttrak[ray]`` extra). See docs/scale.md."""

from fasttrak.runners.base import Factory, Runner
from fasttrak.runners.ray import Ray

__all__ = ["Factory", "Ray", "Runner"]
