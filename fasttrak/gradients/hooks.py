"""The hooks engine: factored (LoGra-style) projected per-example gradients of covered layers.

For a covered layer with input activations ``a_t`` and output gradients ``g_t`` (t over
positions: 1 for flat inputs, tokens for sequences, output pixels for convolutions), example
i's weight gradient is ``Σ_t g_t a_tᵀ``. Its projection by ``P_rows ⊗ P_cols`` is computed
from the projected factors without ever forming the gradient::

    feature_i = Σ_t (P_rowsᵀ r_t) ⊗ (P_colsᵀ c_t)      # (k_rows · k_cols,), row-major

where ``r_t`` / ``c_t`` are the row-side / column-side factors of the weight's row-major
layout: for nn.Linear and nn.Conv2d the rows are outputs (``r = g``) and the columns are
inputs (``c = a``, the unfolded patch for a convolution); for nn.Embedding the weight is
``(vocab, dim)``, so the rows are the token ids (``r = onehot(idx)``, projected by gathering
rows of ``P_in``) and the columns are the output dimension (``c = g``, projected by
``P_out``). Hence the flattened feature equals ``(P_rows ⊗ P_cols)ᵀ vec(∇W)`` with
``vec`` the row-major flattening PyTorch uses, for every layer kind.

A selected bias is a homogeneous coordinate: a constant 1 is appended to ``a`` (a last
row of ``P_in``), so weight and bias are projected together and the bias gradient
``Σ_t g_t`` is the last column of the ``[W | b]`` gradient.

Cost: one batched forward with forward hooks and one backward of ``f.sum()`` to the covered
layers' outputs (no parameter gradient is computed). Memory is that of the activations,
``O(B · T · (d_in + d_out))`` plus ``O(B · k)``; nothing of size ``B × p`` is created.

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
from fasttrak.gradients.hook_engine import batchless_layers, is_hf_conv1d
from fasttrak.tasks.base import Task

COVERED_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)
"""Layer types the factored projection supports (and Hugging Face ``Conv1D``, see
:func:`is_covered`)."""


def is_covered(module: nn.Module) -> bool:
    """True for the layers the factored projection covers: nn.Linear, nn.Conv2d,
    nn.Embedding and Hugging Face's ``Conv1D`` (GPT-2's linear layers, weight (in, out))."""
    return isinstance(module, COVERED_TYPES) or is_hf_conv1d(module)


@dataclass(frozen=True)
class LayerSpec:
    """One covered layer: which of its parameters are selected, and the factor sizes.

    ``d_in`` counts the homogeneous bias coordinate when the bias is selected: it is the
    number of rows of ``P_in``. ``d_out`` is the number of rows of ``P_out``.
    For nn.Embedding, ``d_in`` is the vocabulary size and ``d_out`` the embedding dim.
    """

    name: str
    kind: str  # "linear" | "conv1d" (HF, weight (in, out)) | "conv2d" | "embedding"
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

    Raises ValueError for layer configurations the factored form cannot represent.
    """
    module = model.get_submodule(name)
    prefix = f"{name}." if name else ""
    chosen = set(selected)
    weight = f"{prefix}weight" if f"{prefix}weight" in chosen else None
    bias = f"{prefix}bias" if f"{prefix}bias" in chosen else None
    if weight is None and bias is None:
        raise ConfigError(f"layer {name!r} has no selected parameter")
    extra = 1 if bias is not None else 0
    if isinstance(module, nn.Linear):
        d_act = module.in_features if weight is not None else 0
        return LayerSpec(name, "linear", weight, bias, d_act + extra, module.out_features)
    if is_hf_conv1d(module):
        # y = a W + b with W (in, out): the homogeneous layout is [W; b], (in + 1, out), whose
        # row-major flattening is weight.flatten() followed by bias.
        d_act = module.weight.shape[0] if weight is not None else 0
        return LayerSpec(name, "conv1d", weight, bias, d_act + extra, module.weight.shape[1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ConfigError(
                f"layer {name!r} is a grouped convolution (groups={module.groups}); the "
                "factored projection supports groups=1 only: exclude it with params= or use "
                "another projector"
            )
        kh, kw = module.kernel_size
        d_act = module.in_channels * kh * kw if weight is not None else 0
        return LayerSpec(name, "conv2d", weight, bias, d_act + extra, module.out_channels)
    if isinstance(module, nn.Embedding):
        if module.scale_grad_by_freq or module.max_norm is not None or module.sparse:
            raise ConfigError(
                f"embedding {name!r} uses scale_grad_by_freq, max_norm or sparse gradients, "
                "which the factored projection does not support: exclude it with params="
            )
        return LayerSpec(
            name, "embedding", weight, None, module.num_embeddings, module.embedding_dim
        )
    raise ConfigError(
        f"layer {name!r} is a {type(module).__name__}; the factored projection covers "
        "nn.Linear, nn.Conv2d, nn.Embedding and Hugging Face Conv1D"
    )


class FactoredFeatures:
    """Factored projected per-example gradients of ``task.output`` for covered layers.

    ``p_in[name]``: ``(layer.d_in, k_in)``; ``p_out[name]``: ``(layer.d_out, k_out)``, both
    float32 on the compute device. Calling the engine returns ``(B, Σ k_in · k_out)``
    float32 features, layers in ``layers`` order, each block row-major as described in the
    module docstring ((k_out, k_in) for Linear/Conv2d, (k_in, k_out) for Embedding).

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
        self.layers = list(layers)
        self._probed = False  # batch-less layers are looked for once, on the first batch
        self.p_in = p_in
        self.p_out = p_out
        for layer in self.layers:
            if p_in[layer.name].shape[0] != layer.d_in or p_out[layer.name].shape[0] != layer.d_out:
                raise ConfigError(
                    f"projection of layer {layer.name!r} has shapes "
                    f"{tuple(p_in[layer.name].shape)}, {tuple(p_out[layer.name].shape)}; "
                    f"expected ({layer.d_in}, k_in), ({layer.d_out}, k_out)"
                )

    @property
    def k(self) -> int:
        return sum(self.p_in[ly.name].shape[1] * self.p_out[ly.name].shape[1] for ly in self.layers)

    def __call__(self, state: dict[str, Tensor], batch: Any) -> Tensor:
        """state: every parameter and buffer by name; batch: a collated batch."""
        size = self.task.batch_size(batch)
        # Only the covered layers' parameters require grad (so that their outputs do); the
        # backward pass asks for the outputs' gradients only, so no parameter gradient and
        # no gradient of the model inputs is computed.
        params = {n: t.detach() for n, t in state.items()}
        for layer in self.layers:
            for p in layer.params:
                if params[p].is_floating_point():
                    params[p] = params[p].requires_grad_(True)
        calls: dict[str, list[tuple[Tensor, Tensor]]] = {ly.name: [] for ly in self.layers}
        handles = []

        def forward(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, params, args, kwargs)

        if size > 1 and not self._probed:
            modules = {ly.name: self.model.get_submodule(ly.name) for ly in self.layers}
            batchless = sorted(batchless_layers(modules, self.task, forward, batch))
            if batchless:
                raise ConfigError(
                    f"layers {batchless} compute one output for the whole batch (no batch "
                    "dimension, e.g. T5's relative position bias); the factored projection "
                    "needs per-example layer outputs: exclude their parameters with params= "
                    "(e.g. '!*relative_attention_bias*'), or use projector='srht'"
                )
            self._probed = True

        def make_hook(layer_name: str):
            def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
                inp = args[0].detach()
                if output.ndim and output.shape[0] == 1 and inp.shape[0] == 1 and size > 1:
                    # A layer on a batch-less input (position ids (1, T)) whose output is
                    # broadcast: one copy per example, so row i of its gradient is example i's.
                    output = output.expand(size, *output.shape[1:])
                    inp = inp.expand(size, *inp.shape[1:])
                calls[layer_name].append((inp, output))
                # The output we differentiate against must stay untouched by later in-place
                # operations (e.g. ReLU(inplace=True)): hand the rest of the model a copy.
                return output.clone()

            return hook

        try:
            for layer in self.layers:
                module = self.model.get_submodule(layer.name)
                handles.append(module.register_forward_hook(make_hook(layer.name)))

            with torch.enable_grad():
                f = self.task.output(forward, batch)
                if f.shape != (size,):
                    raise ConfigError(
                        f"task.output returned shape {tuple(f.shape)}, expected ({size},)"
                    )
                outputs = [out for ly in self.layers for _, out in calls[ly.name]]
                grads = torch.autograd.grad(f.sum(), outputs, allow_unused=True) if outputs else ()
        finally:
            for handle in handles:
                handle.remove()
        grads_iter = iter(grads)
        device = self.p_in[self.layers[0].name].device if self.layers else f.device
        feats = []
        for layer in self.layers:
            k_in = self.p_in[layer.name].shape[1]
            k_out = self.p_out[layer.name].shape[1]
            total = None
            for inp, out in calls[layer.name]:
                grad = next(grads_iter)
                if grad is None:
                    continue
                part = self._layer_feature(layer, inp, out, grad, size)
                total = part if total is None else total + part
            if total is None:
                total = torch.zeros((size, k_in * k_out), device=device)
            feats.append(total)
        if not feats:
            return torch.zeros((size, 0), device=device)
        return torch.cat(feats, dim=1)

    def _layer_feature(
        self, layer: LayerSpec, inp: Tensor, out: Tensor, grad: Tensor, size: int
    ) -> Tensor:
        p_in = self.p_in[layer.name]
        p_out = self.p_out[layer.name]
        if inp.shape[0] != size or grad.shape[0] != size:
            raise ConfigError(
                f"layer {layer.name!r}: dimension 0 of its input/output is "
                f"{inp.shape[0]}/{grad.shape[0]}, not the batch size {size}; the factored "
                "projection needs layers applied per example with the batch first (a layer "
                "shared by the whole batch, such as a position embedding, must be excluded: "
                "params= without it)"
            )
        if layer.kind == "embedding":
            module = self.model.get_submodule(layer.name)
            idx = inp.reshape(size, -1)  # (B, T)
            g = grad.reshape(size, idx.shape[1], layer.d_out).float().to(p_out.device)
            rows = p_in[idx.to(p_in.device)]  # (B, T, k_in): gathered rows, no one-hot
            if module.padding_idx is not None:
                keep = (idx != module.padding_idx).to(rows.device, rows.dtype)
                rows = rows * keep[..., None]
            pg = g @ p_out  # (B, T, k_out)
            return torch.einsum("bti,bto->bio", rows, pg).reshape(size, -1)
        if layer.kind in ("linear", "conv1d"):
            a = inp.reshape(size, -1, inp.shape[-1]).float().to(p_in.device)  # (B, T, d_in)
            g = grad.reshape(size, -1, grad.shape[-1]).float().to(p_out.device)  # (B, T, d_out)
            pa = self._project_act(layer, a, p_in)
            pg = g @ p_out
            spec = "bto,bti->boi" if layer.kind == "linear" else "bto,bti->bio"
            return torch.einsum(spec, pg, pa).reshape(size, -1)
        # conv2d: P_inᵀ of every unfolded patch = a convolution of the input with P_in
        # reshaped as k_in filters (same stride/padding/dilation/padding_mode): no unfold.
        module = self.model.get_submodule(layer.name)
        g = grad.float().to(p_out.device).flatten(2).transpose(1, 2)  # (B, L, d_out)
        pg = g @ p_out  # (B, L, k_out)
        k_in = p_in.shape[1]
        if layer.weight is not None:
            filters = p_in[: layer.d_act].t().reshape(k_in, *module.weight.shape[1:])
            pa = module._conv_forward(inp.float().to(p_in.device), filters, None)
            pa = pa.flatten(2).transpose(1, 2)  # (B, L, k_in)
            if layer.bias is not None:
                pa = pa + p_in[layer.d_act]
        else:
            pa = p_in[0].expand(size, pg.shape[1], k_in)
        return torch.einsum("blo,bli->boi", pg, pa).reshape(size, -1)

    @staticmethod
    def _project_act(layer: LayerSpec, a: Tensor, p_in: Tensor) -> Tensor:
        """P_inᵀ [a | 1] per position, (B, T, k_in), without concatenating the 1."""
        if layer.weight is None:  # bias only: the homogeneous coordinate alone
            return p_in[0].expand(a.shape[0], a.shape[1], p_in.shape[1])
        pa = a @ p_in[: layer.d_act]
        if layer.bias is not None:
            pa = pa + p_in[layer.d_act]
        return pa
