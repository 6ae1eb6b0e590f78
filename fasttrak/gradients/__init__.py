"""Per-example gradients of a task's output f with respect to the selected parameters.

Two engines with one interface (``parts(state, batch)``: one ``(B, p_i)`` block per
selected parameter): :class:`HookGradients` (one batched forward and backward with layer
hooks; unmodified Hugging Face models, any attention implementation) and
:class:`VmapGradients` (``torch.func`` vmap of grad over examples; any functional model).
"""

from fasttrak.gradients.hook_engine import HookGradients, check_examples_independent
from fasttrak.gradients.hooks import (
    COVERED_TYPES,
    FactoredFeatures,
    LayerSpec,
    is_covered,
    layer_spec,
)
from fasttrak.gradients.method import ENGINES, GradientMethod
from fasttrak.gradients.selection import ParamSpec, select_parameters
from fasttrak.gradients.vmap import VmapGradients

__all__ = [
    "COVERED_TYPES",
    "FactoredFeatures",
    "LayerSpec",
    "is_covered",
    "layer_spec",
    "ENGINES",
    "GradientMethod",
    "HookGradients",
    "ParamSpec",
    "VmapGradients",
    "check_examples_independent",
    "select_parameters",
]
