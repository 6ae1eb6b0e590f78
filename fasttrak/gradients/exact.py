"""The hook engine: exact per-example gradients from ONE batched forward and backward.

The model runs once on the whole batch as ordinary PyTorch (any attention implementation,
padding masks, gradient checkpointing); forward hooks on the layers that own the selected
parameters record each call, and one backward pass of ``Σ_i f_i`` to those outputs gives
``g = ∂(Σ_i f_i)/∂out`` (:mod:`fasttrak.gradients.recording`). Because example i's output
depends only on example i (checked on the first batch, see
:func:`~fasttrak.gradients.check_examples_independent`), row i of ``g`` is ``∂f_i/∂out_i``,
and each example's parameter gradient follows from its own rows by the layer's rule
(:mod:`fasttrak.gradients.rules`: Linear, Hugging Face Conv1D, Conv2d, Embedding, and the
per-layer vmap "local" rule for any other layer).

Parameters used by the root module itself (no layer owns them, e.g. CLIP's ``logit_scale``),
and those of layers whose output has no batch dimension at all (T5's relative position bias,
(T, T, heads)), get a batched backward (``is_grads_batched``) with one-hot output weights,
i.e. B vectorised backward passes over the graph below f down to those parameters. Exact but
up to B times slower than the rest: exclude such parameters with ``params=`` when the batch
is large (docs/modalities).

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fasttrak.errors import ConfigError, ConfigTypeError, UnsupportedModelError
from fasttrak.gradients.recording import Hooked, OutputCache, Recorder, out_to_loss
from fasttrak.gradients.rules import Rule, rule_for
from fasttrak.tasks.base import Task, q_from_output


@dataclass
class _Layer:
    """A layer that owns selected parameters, and its rule."""

    module: nn.Module
    rule: Rule
    params: dict[str, str]  # attribute name in the module -> selected (canonical) parameter name


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
                self.layers[module_name] = _Layer(module, rule_for(module), {})
            self.layers[module_name].params[attr] = name
        hooked = {
            name: Hooked(ly.module, None if ly.rule.keeps_all else ())
            for name, ly in self.layers.items()
        }
        self.recorder = Recorder(task, hooked)  # probes for batch-less layers once
        self._buffers: dict[str, Tensor] = {}  # per parameter: (B_max, *shape), for reuse=True
        self._q_from_output = q_from_output(task)  # Q from f, when the task says how
        self._aliases = tied_names(model)
        self._prepared: tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]] | None = None

    def parts(self, state: dict[str, Tensor], batch: Any) -> list[Tensor]:
        """One (B, p_i) float32 block per selected parameter, in selection order."""
        return self.parts_and_q(state, batch)[0]

    def parts_and_q(
        self, state: dict[str, Tensor], batch: Any, reuse: bool = False
    ) -> tuple[list[Tensor], Tensor]:
        """:meth:`parts`, and Q = ``task.out_to_loss`` (B,) float32 from the same forward.

        reuse: the parts may be written into buffers that this engine keeps and overwrites
        on its next ``reuse=True`` call (the caller consumes them before that). Fresh
        multi-megabyte tensors per batch cost a page fault per 4 KiB page on every
        allocation (measured: half the time of a wide nn.Linear's per-example gradients)."""
        size = self.task.batch_size(batch)
        params, every_name = self._substitutes(state)

        def run(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, every_name, args, kwargs, tie_weights=False)

        forward = OutputCache(run)
        root: dict[str, Tensor] = {}

        def before_backward(f: Tensor, unbatched: dict[str, tuple[int, ...]]) -> None:
            if not f.requires_grad:
                raise ConfigError(
                    "the task's output does not depend on the selected parameters; check "
                    "params= and that task.output uses the model's output"
                )
            shared = self._shared(unbatched)
            batched = self.root_params + sorted(shared - set(self.root_params))
            root.update(self._batched_backward(f, params, batched, size))

        recording = self.recorder.record(forward, batch, size, before_backward)
        q = out_to_loss(self.task, self._q_from_output, forward, recording.f, batch)
        del forward
        shared = self._shared(recording.unbatched)
        grads: dict[str, Tensor] = dict(root)
        for layer_name, layer in self.layers.items():
            calls = recording.calls.pop(layer_name)
            if set(layer.params.values()) <= shared:
                continue
            for call in calls:
                if call.grad is None:
                    continue  # a call whose output did not reach f (or a checkpointing replay)
                buffers: dict[str, Tensor] = {}
                if reuse:  # a buffer for the first call's gradient of each tensor
                    for attr, name in layer.params.items():
                        if name not in grads:
                            shape = (size, *params[name].shape)
                            buffers[attr] = self._buffer(name, shape, call.grad.device)
                with self.recorder.replay():  # a rule may re-run the layer: record nothing
                    found = layer.rule.gradients(
                        layer.module, call, list(layer.params), size, buffers
                    )
                for attr, part in found.items():
                    name = layer.params[attr]
                    if name in shared:
                        continue  # its batched backward already covers every use
                    grads[name] = part if name not in grads else grads[name] + part
        out = []
        for name in self.selected:
            grad = grads.get(name)
            if grad is None:
                grad = torch.zeros((size, params[name].numel()), device=recording.f.device)
            out.append(grad.reshape(size, -1).float())
        return out, q

    def _substitutes(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The tensors substituted for ``state`` (detached; the selected parameters require
        grad), by state name and by every name the model has for them (tied aliases too: what
        ``functional_call(tie_weights=True)`` works out on each call). Prepared once per
        state object, so that the batches of one checkpoint share them."""
        if self._prepared is not None and self._prepared[0] is state:
            return self._prepared[1], self._prepared[2]
        params = {n: t.detach() for n, t in state.items()}
        for name in self.selected:
            if not params[name].is_floating_point():
                raise ConfigTypeError(
                    f"parameter {name!r} is not a float tensor; exclude it with params="
                )
            params[name] = params[name].requires_grad_(True)
        every_name = dict(params)
        for name, value in params.items():
            for alias in self._aliases.get(name, ()):
                if alias in params and params[alias] is not value:
                    raise ConfigError(
                        f"the state gives different tensors for {name!r} and {alias!r}, which "
                        "the model ties; give one of them"
                    )
                every_name[alias] = value
        self._prepared = (state, params, every_name)
        return params, every_name

    def _buffer(self, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """The first ``shape[0]`` rows of parameter ``name``'s reusable float32 buffer."""
        held = self._buffers.get(name)
        if (
            held is None
            or held.shape[0] < shape[0]
            or held.shape[1:] != shape[1:]
            or (held.device != device)
        ):
            held = torch.empty(shape, device=device)
            self._buffers[name] = held
        return held[: shape[0]]

    def _shared(self, unbatched: dict[str, tuple[int, ...]]) -> set[str]:
        """The selected parameters of layers whose output has no batch dimension."""
        return {name for layer in unbatched for name in self.layers[layer].params.values()}

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


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Each name of a parameter or buffer the model holds under several names (tied
    weights, such as GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) -> its other
    names."""
    by_tensor: dict[int, list[str]] = {}
    named: list[tuple[str, Tensor]] = [*model.named_parameters(remove_duplicate=False)]
    named += [*model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        by_tensor.setdefault(id(tensor), []).append(name)
    return {
        name: [other for other in names if other != name]
        for names in by_tensor.values()
        if len(names) > 1
        for name in names
    }
