"""Factored (LoGra-style) projected per-example gradients of covered layers.

For each covered layer (nn.Linear, nn.Conv2d with groups=1, nn.Embedding, Hugging Face
Conv1D: the layers whose rule in :mod:`fasttrak.gradients.rules` has a factored form), the
feature block of example i is the projection of its exact weight(+bias) gradient by
``P_rows ⊗ P_cols``, computed from the layer's input activations and output gradients
without forming the gradient (the maths is in :mod:`fasttrak.gradients.rules`).

Cost: one batched forward with forward hooks and one backward of ``f.sum()`` to the covered
layers' outputs (:mod:`fasttrak.gradients.recording`; no parameter gradient is computed).
Memory is that of the activations, ``O(B · T · (d_in + d_out))`` plus ``O(B · k)``; nothing of
size ``B × p`` is created.

Independence assumption: ``∂(Σ_j f_j)/∂out_i = ∂f_i/∂out_i`` only if example i's output
does not depend on other examples' activations. The model must be in eval mode (no
BatchNorm batch statistics; the TRAK runner guarantees it) and must not mix examples
(dimension 0 of every covered layer's input and output is the example index).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fasttrak.errors import ConfigError
from fasttrak.gradients.recording import Hooked, OutputCache, Recorder, out_to_loss, per_example
from fasttrak.gradients.rules import rule_for, why_not_covered
from fasttrak.tasks.base import Task, q_from_output


@dataclass(frozen=True)
class LayerSpec:
    """One covered layer: which of its parameters are selected, and the factor sizes.

    ``d_in`` counts the homogeneous bias coordinate when the bias is selected: it is the
    number of rows of ``P_in``. ``d_out`` is the number of rows of ``P_out``.
    For nn.Embedding, ``d_in`` is the vocabulary size and ``d_out`` the embedding dim.
    """

    name: str
    kind: str  # its rule: "linear" | "conv1d" (HF, weight (in, out)) | "conv2d" | "embedding"
    weight: str | None  # full parameter name when selected
    bias: str | None  # full parameter name when selected
    d_in: int
    d_out: int

    @property
    def params(self) -> list[str]:
        return [p for p in (self.weight, self.bias) if p is not None]

    @property
    def d_act(self) -> int:
        """Width of the layer's input activation (without the bias coordinate)."""
        return self.d_in - (1 if self.bias is not None else 0)


def layer_spec(model: nn.Module, name: str, selected: Sequence[str]) -> LayerSpec:
    """The LayerSpec of covered layer ``name``, given the selected parameter names.

    Raises ValueError for layers the factored form cannot represent.
    """
    module = model.get_submodule(name)
    prefix = f"{name}." if name else ""
    chosen = set(selected)
    weight = f"{prefix}weight" if f"{prefix}weight" in chosen else None
    bias = f"{prefix}bias" if f"{prefix}bias" in chosen else None
    if weight is None and bias is None:
        raise ConfigError(f"layer {name!r} has no selected parameter")
    rule = rule_for(module)
    if not rule.projects:
        raise ConfigError(f"layer {name!r} is {why_not_covered(module)}")
    if rule.kind == "embedding":
        bias = None  # an embedding has no bias
    d_in, d_out = rule.factor_sizes(module, weight is not None, bias is not None)
    return LayerSpec(name, rule.kind, weight, bias, d_in, d_out)


class FactoredFeatures:
    """Factored projected per-example gradients of ``task.output`` for covered layers.

    ``p_in[name]``: ``(layer.d_in, k_in)``; ``p_out[name]``: ``(layer.d_out, k_out)``, both
    float32 on the compute device. Calling the engine returns ``(B, Σ k_in · k_out)``
    float32 features, layers in ``layers`` order, each block row-major as described in
    :mod:`fasttrak.gradients.rules` ((k_out, k_in) for Linear/Conv2d, (k_in, k_out) for
    Embedding and Conv1D).

    A layer called several times in one forward (weight sharing) gets the sum over calls,
    which is its exact gradient's projection.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        layers: Sequence[LayerSpec],
        p_in: dict[str, Tensor],
        p_out: dict[str, Tensor],
    ) -> None:
        self.model = model
        self.task = task
        self._q_from_output = q_from_output(task)  # Q from f, when the task says how
        self.layers = list(layers)
        self.p_in = p_in
        self.p_out = p_out
        for layer in self.layers:
            if p_in[layer.name].shape[0] != layer.d_in or p_out[layer.name].shape[0] != layer.d_out:
                raise ConfigError(
                    f"projection of layer {layer.name!r} has shapes "
                    f"{tuple(p_in[layer.name].shape)}, {tuple(p_out[layer.name].shape)}; "
                    f"expected ({layer.d_in}, k_in), ({layer.d_out}, k_out)"
                )
        modules = {ly.name: model.get_submodule(ly.name) for ly in self.layers}
        self.rules = {name: rule_for(module) for name, module in modules.items()}
        # Batch-less layers are looked for once, on the first batch.
        self.recorder = Recorder(task, {n: Hooked(m) for n, m in modules.items()})

    @property
    def k(self) -> int:
        return sum(self.p_in[ly.name].shape[1] * self.p_out[ly.name].shape[1] for ly in self.layers)

    def __call__(self, state: dict[str, Tensor], batch: Any) -> Tensor:
        """state: every parameter and buffer by name; batch: a collated batch."""
        return self.features_and_q(state, batch)[0]

    def features_and_q(self, state: dict[str, Tensor], batch: Any) -> tuple[Tensor, Tensor]:
        """The features, and Q = ``task.out_to_loss`` (B,) float32 from the same forward."""
        size = self.task.batch_size(batch)
        # Only the covered layers' parameters require grad (so that their outputs do); the
        # backward pass asks for the outputs' gradients only, so no parameter gradient and
        # no gradient of the model inputs is computed.
        params = {n: t.detach() for n, t in state.items()}
        for layer in self.layers:
            for p in layer.params:
                if params[p].is_floating_point():
                    params[p] = params[p].requires_grad_(True)

        def run(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, params, args, kwargs)

        batchless = sorted(self.recorder.probe(run, batch, size))
        if batchless:
            raise ConfigError(
                f"layers {batchless} compute one output for the whole batch (no batch "
                "dimension, e.g. T5's relative position bias); the factored projection "
                "needs per-example layer outputs: exclude their parameters with params= "
                "(e.g. '!*relative_attention_bias*'), or use projector='srht'"
            )
        forward = OutputCache(run)
        recording = self.recorder.record(forward, batch, size)
        q = out_to_loss(self.task, self._q_from_output, forward, recording.f, batch)
        del forward
        device = self.p_in[self.layers[0].name].device if self.layers else recording.f.device
        feats = []
        for layer in self.layers:
            if layer.name in recording.unbatched:
                _not_batch_first(layer.name, "output", recording.unbatched[layer.name], size)
            module, rule = self.recorder.layers[layer.name].module, self.rules[layer.name]
            p_in, p_out = self.p_in[layer.name], self.p_out[layer.name]
            total = None
            for call in recording.calls.pop(layer.name):
                if call.grad is None:
                    continue
                a = per_example(call.input, size)
                if a.shape[0] != size:
                    _not_batch_first(layer.name, "input", tuple(a.shape), size)
                weight, bias = layer.weight is not None, layer.bias is not None
                part = rule.project(module, a, call.grad, p_in, p_out, weight, bias)
                total = part if total is None else total + part
            if total is None:
                total = torch.zeros((size, p_in.shape[1] * p_out.shape[1]), device=device)
            feats.append(total)
        if not feats:
            return torch.zeros((size, 0), device=device), q
        return torch.cat(feats, dim=1), q


def _not_batch_first(name: str, what: str, shape: tuple[int, ...], size: int) -> None:
    raise ConfigError(
        f"layer {name!r}: its {what} has shape {shape}, not starting with the batch size "
        f"{size}; the factored projection needs layers applied per example with the batch "
        "first (a layer shared by the whole batch, such as a position embedding, must be "
        "excluded: params= without it)"
    )
