"""Per-example gradients of a task's output f with respect to the selected parameters.

Two engines with one interface (``parts(state, batch)``: one ``(B, p_i)`` block per
selected parameter): :class:`HookGradients` (one batched forward and backward with layer
hooks; unmodified Hugging Face models, any attention implementation) and
:class:`VmapGradients` (``torch.func`` vmap of grad over examples; any functional model).
:class:`FactoredFeatures` uses the same hooks to give factored (LoGra-style) projections
of the covered layers' gradients directly.

Modules, one job each: ``selection`` (``params=``), ``recording`` (the hooked forward and
backward), ``rules`` (one rule per layer type: exact gradient and factored projection),
``exact`` (:class:`HookGradients`), ``method`` (:class:`GradientMethod`: which
engine), ``factored`` (:class:`FactoredFeatures`), ``vmap``
(:class:`VmapGradients`), ``independence`` (:func:`check_examples_independent`).
"""

from fasttrak.gradients.exact import HookGradients
from fasttrak.gradients.factored import FactoredFeatures, LayerSpec, layer_spec
from fasttrak.gradients.independence import check_examples_independent
from fasttrak.gradients.method import ENGINES, GradientMethod
from fasttrak.gradients.recording import batchless_layers, split_batch
from fasttrak.gradients.rules import COVERED_TYPES, is_covered
from fasttrak.gradients.selection import ParamSpec, select_parameters
from fasttrak.gradients.vmap import VmapGradients

__all__ = [
    "COVERED_TYPES",
    "ENGINES",
    "FactoredFeatures",
    "GradientMethod",
    "HookGradients",
    "LayerSpec",
    "ParamSpec",
    "VmapGradients",
    "batchless_layers",
    "check_examples_independent",
    "is_covered",
    "layer_spec",
    "select_parameters",
    "split_batch",
]
