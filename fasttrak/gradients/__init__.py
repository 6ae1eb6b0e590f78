"""Per-example gradients of a task's output f with respect to the selected parameters."""

from fasttrak.gradients.selection import ParamSpec, select_parameters
from fasttrak.gradients.vmap import VmapGradients

__all__ = ["ParamSpec", "VmapGradients", "select_parameters"]
