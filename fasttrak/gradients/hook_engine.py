"""The hook engine: exact per-example gradients from ONE batched forward and backward.

The model runs once on the whole batch as ordinary PyTorch (any attention implementation,
padding masks, gradient checkpointing); forward hooks on the layers that own the selected
parameters record each call's inputs and output, and one backward pass of ``Σ_i f_i`` to
those outputs (not to the parameters: no weight gradient is computed) gives
``g = ∂(Σ_i f_i)/∂out``. Because example i's output depends only on example i (checked on
the first batch, see :func:`check_examples_independent`), row i of ``g`` is ``∂f_i/∂out_i``,
and each example's parameter gradient follows from its own rows:

- ``nn.Linear`` (W: out × in): ``∇W_i = Σ_t g_it a_itᵀ``, ``∇b_i = Σ_t g_it`` (t over
  tokens / positions; 1 for flat inputs);
- Hugging Face ``Conv1D`` (GPT-2; W: in × out, y = a W + b): ``∇W_i = Σ_t a_it g_itᵀ``;
- ``nn.Conv2d`` (groups 1, zero padding): ``∇W_i = Σ_l g_il ⊗ patch_il`` over output
  positions l, the patches from ``unfold``;
- ``nn.Embedding`` (W: vocab × dim): ``∇W_i[v] = Σ_{t: id_it = v} g_it`` (padding_idx rows 0);
- any other layer (Conv, LayerNorm, RMSNorm, GroupNorm, BatchNorm in eval mode, custom
  modules): the layer alone is re-run per example under ``torch.func.vmap`` of a
  vector-Jacobian product with ``g_i`` — cheap, since it is one layer, not the model;
- a layer applied to a batch-less input whose output is broadcast over the batch
  (position embeddings of position ids shaped (1, T): BERT, GPT-2, CLIP): its output is
  expanded to one copy per example before the model uses it, which changes no value, so
  row i of its gradient is example i's and the rules above apply;
- parameters used by the root module itself (no layer owns them, e.g. CLIP's
  ``logit_scale``), and layers whose output has no batch dimension at all (T5's relative
  position bias, (T, T, heads); found by a no-grad forward of one example, where every
  batch-first output has dimension 0 equal to 1, since shapes alone cannot tell when T
  equals the batch size): a batched backward (``is_grads_batched``) with one-hot
  output weights, i.e. B vectorised backward passes over the graph below f down to those
  parameters. Exact but up to B times slower than the rest: exclude such parameters with
  ``params=`` when the batch is large (docs/modalities).

A layer called several times (weight sharing, tied embeddings such as GPT-2's ``lm_head``
and ``wte``) gets the sum of its calls, which is the exact gradient of the shared tensor.
Only the selected parameters require gradients, so the backward pass stops at the earliest
selected layer and costs what the selected layers cost, not the whole model.

Gradient checkpointing works when it is non-reentrant (``use_reentrant=False``, recomputation
inside this engine's backward pass); reentrant checkpointing recomputes outside the
parameters the engine substitutes and is refused with an error that says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_map

from fasttrak.errors import ConfigError, ConfigTypeError, UnsupportedModelError
from fasttrak.tasks.base import Forward, Task


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 family): a linear layer with weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _rule(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if is_hf_conv1d(module):
        return "conv1d"
    if (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return "conv2d"
    if (
        isinstance(module, nn.Embedding)
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    ):
        return "embedding"
    return "local"


@dataclass
class _Call:
    """One call of a hooked layer: its (detached) inputs, the tensors it used, and the
    gradient of Σ f w.r.t. its output once the backward pass reaches it."""

    layer: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tensors: dict[str, Tensor]  # the layer's parameters and buffers (recursively) at call time
    output: Tensor | None = None  # as the layer returned it (the model continues on a copy)
    grad: Tensor | None = None


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: str
    params: dict[str, str]  # attribute name in the module -> selected (canonical) parameter name
    calls: list[_Call] = field(default_factory=list)


class HookGradients:
    """Per-example gradients of ``task.output`` w.r.t. the selected parameters, by hooks.

    ``parts(state, batch)`` returns one ``(B, p_i)`` float32 block per selected parameter
    (selection order), like :class:`~fasttrak.gradients.VmapGradients`; the model must be
    in eval mode (the TRAK runner guarantees it) and must not mix examples.
    """

    def __init__(self, model: nn.Module, task: Task, selected: Sequence[str]) -> None:
        self.model = model
        self.task = task
        self.selected = list(selected)
        chosen = set(self.selected)
        canonical: dict[int, str] = {}
        self.layers: dict[str, _Layer] = {}
        self.root_params: list[str] = []
        for alias, param in model.named_parameters(remove_duplicate=False):
            name = canonical.setdefault(id(param), alias)
            if name not in chosen:
                continue
            module_name, _, attr = alias.rpartition(".")
            if module_name == "":
                if name not in self.root_params:
                    self.root_params.append(name)
                continue
            if module_name not in self.layers:
                module = model.get_submodule(module_name)
                self.layers[module_name] = _Layer(module_name, module, _rule(module), {})
            self.layers[module_name].params[attr] = name
        self._replaying = False
        self._size = 0
        self._batchless: set[str] | None = None  # layers whose output has no batch dimension
        self._shared: set[str] = set()  # parameters of layers whose output has no batch dim

    # ------------------------------------------------------------------ public
    def parts(self, state: dict[str, Tensor], batch: Any) -> list[Tensor]:
        size = self.task.batch_size(batch)
        params = {n: t.detach() for n, t in state.items()}
        for name in self.selected:
            if not params[name].is_floating_point():
                raise ConfigTypeError(
                    f"parameter {name!r} is not a float tensor; exclude it with params="
                )
            params[name] = params[name].requires_grad_(True)
        for layer in self.layers.values():
            layer.calls = []
        self._size, self._shared = size, set()

        def forward(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, params, args, kwargs)

        if size > 1 and self._batchless is None:
            modules = {name: layer.module for name, layer in self.layers.items()}
            self._batchless = batchless_layers(modules, self.task, forward, batch)
        handles = [
            layer.module.register_forward_hook(self._hook(layer), with_kwargs=True)
            for layer in self.layers.values()
        ]
        try:
            with torch.enable_grad():
                f = self.task.output(forward, batch)
                if not isinstance(f, Tensor) or f.shape != (size,):
                    shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                    raise ConfigError(f"task.output returned {shape}, expected shape ({size},)")
                if not f.requires_grad:
                    raise ConfigError(
                        "the task's output does not depend on the selected parameters; check "
                        "params= and that task.output uses the model's output"
                    )
                batched = self.root_params + sorted(self._shared - set(self.root_params))
                root = self._batched_backward(f, params, batched, size)
                # Gradients w.r.t. the recorded outputs only. With non-reentrant checkpointing
                # the recorded outputs are those of the first pass, which the graph keeps;
                # the replay's calls (recorded during this backward) get no gradient.
                calls = [c for ly in self.layers.values() for c in ly.calls if c.output is not None]
                outputs = [c.output for c in calls]
                found = torch.autograd.grad(f.sum(), outputs, allow_unused=True) if calls else ()
                for call, grad in zip(calls, found, strict=True):
                    call.grad, call.output = grad, None
        finally:
            for handle in handles:
                handle.remove()
        grads: dict[str, Tensor] = dict(root)
        for layer in self.layers.values():
            if set(layer.params.values()) <= self._shared:
                layer.calls = []
                continue
            for call in layer.calls:
                if call.grad is None:
                    continue  # a call whose output did not reach f (or a checkpointing replay)
                for attr, part in self._layer_gradients(layer, call, size).items():
                    name = layer.params[attr]
                    if name in self._shared:
                        continue  # its batched backward already covers every use
                    grads[name] = part if name not in grads else grads[name] + part
            layer.calls = []
        out = []
        for name in self.selected:
            grad = grads.get(name)
            if grad is None:
                grad = torch.zeros((size, params[name].numel()), device=f.device)
            out.append(grad.reshape(size, -1).float())
        return out

    # ------------------------------------------------------------------ forward hooks
    def _hook(self, layer: _Layer) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
            if self._replaying:
                return
            if not isinstance(output, Tensor):
                raise ConfigTypeError(
                    f"layer {layer.name!r} ({type(module).__name__}) returns "
                    f"{type(output).__name__}, not a tensor; the hook engine handles parameters "
                    "of layers that return one tensor: exclude its parameters with params= or "
                    "use engine='vmap'"
                )
            if not output.requires_grad:
                # Its selected parameters require grad, so the layer ran under no_grad: the
                # first pass of reentrant checkpointing, which recomputes outside the engine.
                raise UnsupportedModelError(
                    f"layer {layer.name!r} ran without autograd (torch.no_grad inside the "
                    "model, or reentrant gradient checkpointing, use_reentrant=True); the hook "
                    "engine needs non-reentrant checkpointing: torch.utils.checkpoint(..., "
                    "use_reentrant=False), or for Hugging Face models "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                    "{'use_reentrant': False}); or use engine='vmap'"
                )
            if output.ndim > 0 and output.shape[0] == 1 and self._size > 1:
                # A layer on a batch-less input (position ids of shape (1, T)) whose output is
                # broadcast over the batch: hand the model one copy per example, so that row
                # i of its gradient is example i's (exactly what broadcasting computes).
                output = output.expand(self._size, *output.shape[1:])
            elif (
                output.ndim == 0
                or output.shape[0] != self._size
                or layer.name in (self._batchless or ())
            ):
                self._shared.update(layer.params.values())  # no batch dimension: shared
                return
            tensors = {}
            if layer.rule == "local":
                tensors = dict(module.named_parameters())
                tensors.update(dict(module.named_buffers()))
            else:
                tensors = {attr: getattr(module, attr) for attr in layer.params}
            call = _Call(
                layer.name,
                tree_map(_detach, args),
                tree_map(_detach, kwargs),
                {n: t.detach() for n, t in tensors.items()},
            )
            layer.calls.append(call)
            call.output = output
            # The rest of the model gets a copy: a later in-place op (ReLU(inplace=True)) on
            # it cannot change the tensor whose gradient is taken.
            return output.clone()

        return hook

    # ------------------------------------------------------------------ per-layer rules
    def _layer_gradients(self, layer: _Layer, call: _Call, size: int) -> dict[str, Tensor]:
        """Per-example gradients ``(B, *shape)`` of the layer's selected tensors, one call."""
        grad = call.grad
        assert grad is not None
        if grad.shape[0] != size:
            raise ConfigError(
                f"layer {layer.name!r}: dimension 0 of its output is {grad.shape[0]}, not the "
                f"batch size {size}; the hook engine needs layers applied with the batch first "
                "(use engine='vmap' for models that reshape the batch dimension away)"
            )
        if layer.rule == "local":
            return self._local_gradients(layer, call)
        out: dict[str, Tensor] = {}
        if layer.rule == "embedding":
            module = layer.module
            assert isinstance(module, nn.Embedding)
            ids = _per_example(call.args[0], size).reshape(size, -1)
            g = grad.reshape(size, ids.shape[1], -1).float()
            if module.padding_idx is not None:
                g = g * (ids != module.padding_idx)[..., None]
            weight = torch.zeros(
                (size, module.num_embeddings, g.shape[2]), device=g.device, dtype=g.dtype
            )
            rows = torch.arange(size, device=g.device)[:, None].expand_as(ids)
            out["weight"] = weight.index_put_((rows, ids), g, accumulate=True)
            return out
        a = call.args[0] if call.args else next(iter(call.kwargs.values()))
        if layer.rule == "conv2d":
            return self._conv2d_gradients(layer, _per_example(a, size), grad, size)
        a = _per_example(a, size).reshape(size, -1, a.shape[-1]).float()
        g = grad.reshape(size, -1, grad.shape[-1]).float()
        if "weight" in layer.params:
            spec = "bto,bti->boi" if layer.rule == "linear" else "bto,bti->bio"
            out["weight"] = torch.einsum(spec, g, a)
        if "bias" in layer.params:
            out["bias"] = g.sum(1)
        unknown = set(layer.params) - {"weight", "bias"}
        if unknown:
            raise ConfigError(f"layer {layer.name!r} has unexpected parameters {sorted(unknown)}")
        return out

    @staticmethod
    def _conv2d_gradients(layer: _Layer, a: Tensor, grad: Tensor, size: int) -> dict[str, Tensor]:
        """∇W_i = Σ_l g_il ⊗ patch_il over output positions l (patches by unfold)."""
        module = layer.module
        assert isinstance(module, nn.Conv2d)
        g = grad.reshape(size, grad.shape[1], -1).float()  # (B, O, L)
        out: dict[str, Tensor] = {}
        if "weight" in layer.params:
            patches = nn.functional.unfold(
                a.float(),
                module.kernel_size,
                dilation=module.dilation,
                padding=module.padding,
                stride=module.stride,
            )  # (B, C·kh·kw, L)
            out["weight"] = torch.einsum("bol,bil->boi", g, patches)
        if "bias" in layer.params:
            out["bias"] = g.sum(2)
        return out

    def _local_gradients(self, layer: _Layer, call: _Call) -> dict[str, Tensor]:
        """Re-run one layer per example under vmap: vjp of its own selected tensors with g_i."""
        assert call.grad is not None
        size = call.grad.shape[0]
        own = {attr: call.tensors[attr] for attr in layer.params}
        constants = {n: t for n, t in call.tensors.items() if n not in own}

        def batched(t: Any) -> bool:
            return isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == size

        def split(t: Any) -> Any:  # (B, ...) -> (B, 1, ...): each example keeps a batch of 1
            return t.unsqueeze(1) if batched(t) else t

        def dims(t: Any) -> Any:
            return 0 if batched(t) else None

        inputs = (tree_map(split, call.args), tree_map(split, call.kwargs))
        in_dims = (tree_map(dims, call.args), tree_map(dims, call.kwargs))

        def one(args: tuple, kwargs: dict, g: Tensor) -> dict[str, Tensor]:
            def run(p: dict[str, Tensor]) -> Tensor:
                return functional_call(layer.module, {**constants, **p}, args, kwargs)

            _, pullback = vjp(run, own)
            return pullback(g)[0]

        self._replaying = True
        try:
            return vmap(one, in_dims=(*in_dims, 0))(*inputs, call.grad.unsqueeze(1))
        finally:
            self._replaying = False

    def _batched_backward(
        self, f: Tensor, params: dict[str, Tensor], names: list[str], size: int
    ) -> dict[str, Tensor]:
        """Per-example gradients of ``names`` (parameters used outside any batch-first layer):
        one backward per example, vectorised (``is_grads_batched``)."""
        if not names:
            return {}
        inputs = [params[n] for n in names]
        eye = torch.eye(size, device=f.device, dtype=f.dtype)
        try:
            grads = torch.autograd.grad(
                f, inputs, eye, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
        except RuntimeError as error:
            raise UnsupportedModelError(
                f"the hook engine could not differentiate {names}, which the model uses "
                "outside batch-first layers; exclude them with params= or use engine='vmap'"
            ) from error
        return {
            n: (torch.zeros((size, params[n].numel()), device=f.device) if g is None else g)
            for n, g in zip(names, grads, strict=True)
        }


def _per_example(t: Tensor, size: int) -> Tensor:
    """A layer input shared by the batch (dimension 0 of 1) as one row per example."""
    return t.expand(size, *t.shape[1:]) if t.shape[0] == 1 and size > 1 else t


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


def batchless_layers(
    modules: dict[str, nn.Module], task: Task, forward: Forward, batch: Any
) -> set[str]:
    """Names of ``modules`` whose output has no batch dimension (T5's (T, T, heads) relative
    position bias), found by a no-grad forward of ONE example, where every batch-first
    output has dimension 0 equal to 1. Shapes on the real batch cannot tell when such an
    output's dimension 0 happens to equal the batch size."""
    dims: dict[str, set[int]] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            shape = output.shape if isinstance(output, Tensor) and output.ndim else (-1,)
            dims.setdefault(name, set()).add(int(shape[0]))

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            task.output(forward, split_batch(batch, task.batch_size(batch), slice(0, 1)))
    finally:
        for handle in handles:
            handle.remove()
    return {name for name, seen in dims.items() if seen != {1}}


def split_batch(batch: Any, size: int, rows: slice) -> Any:
    """The rows ``rows`` of a collated batch (every tensor whose dimension 0 is ``size``)."""
    return tree_map(
        lambda t: t[rows] if isinstance(t, Tensor) and t.ndim and t.shape[0] == size else t, batch
    )


def check_examples_independent(task: Task, forward: Forward, batch: Any) -> None:
    """Raise ValueError when example outputs depend on other examples of the batch.

    Compares f on the whole batch with f on its two halves (same tensors, same padding);
    the engines that backpropagate Σ_i f_i once (hooks, factored) are exact only when
    ∂f_i/∂(example j) = 0 for i ≠ j. Costs two forward passes, on one batch per run.
    """
    size = task.batch_size(batch)
    if size < 2:
        return
    half = size // 2
    with torch.no_grad():
        whole = task.output(forward, batch).float()
        parts = torch.cat(
            [
                task.output(forward, split_batch(batch, size, slice(0, half))).float(),
                task.output(forward, split_batch(batch, size, slice(half, size))).float(),
            ]
        )
    # Non-finite outputs are reported later, with the rows named; compare the finite ones.
    finite = torch.isfinite(whole)
    same_pattern = bool((finite == torch.isfinite(parts)).all())
    scale = whole[finite].abs().max().clamp_min(1.0) if finite.any() else torch.tensor(1.0)
    gap = (whole[finite] - parts[finite]).abs().max() if finite.any() else torch.tensor(0.0)
    if not same_pattern or gap > 1e-3 * scale:
        raise ConfigError(
            f"examples interact in the model's forward pass: the outputs of a batch differ "
            f"from those of its halves by {float(gap):.3g} (e.g. BatchNorm in train mode, "
            "batch-level normalisation, or a batch-mixing layer). The hook engine and the "
            "factored projector need each example's output to depend on that example only: "
            "remove the interaction, or use engine='vmap' to differentiate each example alone"
        )
