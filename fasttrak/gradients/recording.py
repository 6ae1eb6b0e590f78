"""The hook-recording step of the hook engines: one batched forward, one backward to layer outputs.

Both the exact engine (:class:`~fasttrak.gradients.exact.HookGradients`) and the factored
features (:class:`~fasttrak.gradients.factored.FactoredFeatures`) run the model once on the
whole batch as ordinary PyTorch, with forward hooks on a set of layers. Each hook records the
call (detached inputs and keyword arguments, the layer tensors the rule needs). The rest of
the model continues on the output itself; should a later in-place op (``ReLU(inplace=True)``)
change a recorded output (its version counter moves), the batch is recorded again with every
output copied for the rest of the model, and so are all later batches of that recorder: the
gradient is always taken w.r.t. the layer's own output. One backward pass of ``Σ_i f_i`` to the
recorded outputs (not to the parameters: no weight gradient is computed) then gives
``g = ∂(Σ_i f_i)/∂out`` per call. When example i's output depends only on example i (see
:func:`~fasttrak.gradients.check_examples_independent`), row i of ``g`` is ``∂f_i/∂out_i``,
which the per-layer rules (:mod:`fasttrak.gradients.rules`) turn into per-example gradients.

Layers without a per-example output:

- a layer applied to a batch-less input whose output is broadcast over the batch (position
  embeddings of position ids shaped (1, T): BERT, GPT-2, CLIP): its output is expanded to one
  copy per example before the model uses it, which changes no value, so row i of its gradient
  is example i's and the rules apply (their input is expanded the same way, see
  :func:`per_example`);
- a layer whose output has no batch dimension at all (T5's relative position bias,
  (T, T, heads)): its calls are not recorded and the layer is reported in
  :attr:`Recording.unbatched`, for the engine to handle (the exact engine differentiates its
  parameters by a batched backward, the factored features refuse it). Shapes alone cannot
  tell when T equals the batch size, so such layers are found once, by a no-grad forward of
  one example (:func:`batchless_layers`).

A layer called several times (weight sharing) records every call. Calls recorded while the
backward pass runs (the replay of non-reentrant gradient checkpointing, which recomputes
inside this backward) get no gradient, and neither does a call whose output does not reach f.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from fasttrak.errors import ConfigError, ConfigTypeError, FastTrakError, UnsupportedModelError
from fasttrak.tasks.base import Forward, Task


@dataclass(frozen=True)
class Hooked:
    """A layer to record, and which of its tensors each call keeps: attribute names, or None
    for every parameter and buffer of the module (recursively), as read at call time."""

    module: nn.Module
    keep: tuple[str, ...] | None = ()


@dataclass
class Call:
    """One call of a hooked layer: its (detached) inputs, the tensors it used, and the
    gradient ``(B, *out)`` of Σ f w.r.t. its output once the backward pass reaches it."""

    layer: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tensors: dict[str, Tensor]  # the kept layer tensors at call time, detached
    output: Tensor | None = None  # as the layer returned it
    version: int = 0  # the output's version counter when recorded (an in-place op moves it)
    grad: Tensor | None = None  # None when the output did not reach f

    @property
    def input(self) -> Tensor:
        """The layer's input: its first positional argument, else its first keyword one."""
        return self.args[0] if self.args else next(iter(self.kwargs.values()))


@dataclass
class Recording:
    """What one recorded forward and backward gives.

    ``f``: the task's output, ``(B,)``. ``calls``: per hooked layer, its calls in call order.
    ``unbatched``: the layers with a call whose output has no batch dimension (not recorded),
    and the shape of the first such output."""

    f: Tensor
    calls: dict[str, list[Call]]
    unbatched: dict[str, tuple[int, ...]]


class Recorder:
    """Forward hooks on ``layers`` (name -> :class:`Hooked`), for one task.

    :meth:`record` runs the task with hooks installed and backpropagates to the recorded
    outputs; batch-less layers are looked for once, on the first batch of more than one
    example (:meth:`probe`). While :attr:`replaying` is set (a rule re-running a layer), the
    hooks record nothing. :attr:`copy_outputs` (set once a recorded output was changed in
    place) hands the rest of the model copies of the recorded outputs.
    """

    def __init__(self, task: Task, layers: dict[str, Hooked]) -> None:
        self.task = task
        self.layers = layers
        self.batchless: set[str] | None = None  # layers whose output has no batch dimension
        self.replaying = False
        self.copy_outputs = False

    def probe(self, forward: Forward, batch: Any, size: int) -> set[str]:
        """The hooked layers whose output has no batch dimension (found on the first batch of
        more than one example, then remembered; empty until then)."""
        if size > 1 and self.batchless is None:
            modules = {name: hooked.module for name, hooked in self.layers.items()}
            self.batchless = batchless_layers(modules, self.task, forward, batch)
        return set(self.batchless or ())

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Hooks record nothing inside this block (a rule re-running a hooked layer)."""
        self.replaying = True
        try:
            yield
        finally:
            self.replaying = False

    def record(
        self,
        forward: Forward,
        batch: Any,
        size: int,
        before_backward: Callable[[Tensor, dict[str, tuple[int, ...]]], None] | None = None,
    ) -> Recording:
        """Run ``task.output(forward, batch)`` (``size`` examples) under ``enable_grad`` with
        the hooks installed, then the backward of ``f.sum()`` to the recorded outputs.

        ``before_backward(f, unbatched)`` runs between the two (the graph is still whole).
        A forward that changed a recorded output in place is run again, copying outputs."""
        self.probe(forward, batch, size)
        calls: dict[str, list[Call]] = {name: [] for name in self.layers}
        unbatched: dict[str, tuple[int, ...]] = {}
        handles = [
            hooked.module.register_forward_hook(
                self._hook(name, hooked, size, calls[name], unbatched), with_kwargs=True
            )
            for name, hooked in self.layers.items()
        ]
        try:
            with torch.enable_grad():
                f = self._output(forward, batch, size)
                if not self.copy_outputs and _changed_in_place(calls):
                    self.copy_outputs = True  # from now on; this batch once more
                    for recorded in calls.values():
                        recorded.clear()
                    unbatched.clear()
                    if isinstance(forward, OutputCache):
                        forward.calls.clear()
                    f = self._output(forward, batch, size)
                if before_backward is not None:
                    before_backward(f, unbatched)
                # Gradients w.r.t. the recorded outputs only. With non-reentrant checkpointing
                # the recorded outputs are those of the first pass, which the graph keeps;
                # the replay's calls (recorded during this backward) get no gradient.
                done = [c for name in self.layers for c in calls[name] if c.output is not None]
                outputs = [c.output for c in done if c.output is not None]
                grads = torch.autograd.grad(f.sum(), outputs, allow_unused=True) if done else ()
                for call, grad in zip(done, grads, strict=True):
                    call.grad, call.output = grad, None
        finally:
            for handle in handles:
                handle.remove()
        return Recording(f, calls, unbatched)

    def _output(self, forward: Forward, batch: Any, size: int) -> Tensor:
        """``task.output(forward, batch)``, checked to be a (size,) tensor."""
        try:
            f = self.task.output(forward, batch)
        except FastTrakError:
            raise
        except Exception:
            self._explain(forward, batch)
            raise
        if not isinstance(f, Tensor) or f.shape != (size,):
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ConfigError(f"task.output returned {shape}, expected shape ({size},)")
        return f

    def _explain(self, forward: Forward, batch: Any) -> None:
        """After ``task.output`` failed: let the task's checks of the whole batch (in
        ``out_to_loss``, e.g. a label outside the model's classes) name bad input, rather
        than the indexing error it caused."""
        with torch.no_grad(), self.replay():
            self.task.out_to_loss(forward, batch)

    def _hook(
        self,
        name: str,
        hooked: Hooked,
        size: int,
        calls: list[Call],
        unbatched: dict[str, tuple[int, ...]],
    ) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
            if self.replaying:
                return None
            if not isinstance(output, Tensor):
                raise ConfigTypeError(
                    f"layer {name!r} ({type(module).__name__}) returns "
                    f"{type(output).__name__}, not a tensor; the hook engine handles parameters "
                    "of layers that return one tensor: exclude its parameters with params= or "
                    "use engine='vmap'"
                )
            if not output.requires_grad:
                # Its parameters require grad, so the layer ran under no_grad: the first pass
                # of reentrant checkpointing, which recomputes outside the engine.
                raise UnsupportedModelError(
                    f"layer {name!r} ran without autograd (torch.no_grad inside the "
                    "model, or reentrant gradient checkpointing, use_reentrant=True); the hook "
                    "engine needs non-reentrant checkpointing: torch.utils.checkpoint(..., "
                    "use_reentrant=False), or for Hugging Face models "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                    "{'use_reentrant': False}); or use engine='vmap'"
                )
            expanded = output.ndim > 0 and output.shape[0] == 1 and size > 1
            if expanded:
                # A layer on a batch-less input (position ids of shape (1, T)) whose output is
                # broadcast over the batch: hand the model one copy per example, so that row
                # i of its gradient is example i's (exactly what broadcasting computes).
                output = output.expand(size, *output.shape[1:])
            elif output.ndim == 0 or output.shape[0] != size or name in (self.batchless or ()):
                unbatched.setdefault(name, tuple(output.shape))  # the engine decides
                return None
            if hooked.keep is None:
                tensors: dict[str, Tensor] = dict(module.named_parameters())
                tensors.update(dict(module.named_buffers()))
            else:
                tensors = {attr: getattr(module, attr) for attr in hooked.keep}
            calls.append(
                Call(
                    name,
                    tuple(_detach_tree(a) for a in args),
                    {key: _detach_tree(value) for key, value in kwargs.items()},
                    {n: t.detach() for n, t in tensors.items()},
                    output,
                    output._version,
                )
            )
            if expanded or self.copy_outputs:
                # The rest of the model gets a copy (of the broadcast rows, one per example):
                # a later in-place op (ReLU(inplace=True)) cannot change the recorded output.
                return output.clone()
            return None

        return hook


def _changed_in_place(calls: dict[str, list[Call]]) -> bool:
    """True when an in-place op changed a recorded output after its layer returned it."""
    return any(
        call.output is not None and call.output._version != call.version
        for found in calls.values()
        for call in found
    )


def out_to_loss(
    task: Task,
    q_from_f: Callable[[Tensor, Any], Tensor] | None,
    forward: OutputCache,
    f: Tensor,
    batch: Any,
) -> Tensor:
    """Q (B,) float32 of a recorded batch, without autograd: from the recorded output f when
    the task says how (``q_from_f``, see :func:`~fasttrak.tasks.base.q_from_output`), else
    ``task.out_to_loss`` on the cached forward (no second model run)."""
    with torch.no_grad():
        if q_from_f is not None:
            return q_from_f(f, batch).float()
        return task.out_to_loss(forward.replay(), batch).float()


class OutputCache:
    """A forward that remembers what each of its calls returned, so that Q
    (``task.out_to_loss``) reuses the gradient pass's forward instead of running another.

    :meth:`replay` gives a forward that returns the remembered (detached) output of a call
    with the very same arguments (the same objects, as a task passes the same batch
    tensors to both methods), and runs the model, without autograd, for any other call.
    """

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.forward(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out

    def replay(self) -> Forward:
        calls = self.calls

        def forward(*args: Any, **kwargs: Any) -> Any:
            for seen_args, seen_kwargs, out in calls:
                if _same_objects(seen_args, args) and _same_objects(seen_kwargs, kwargs):
                    return tree_map(_detach, out)
            with torch.no_grad():
                return self.forward(*args, **kwargs)

        return forward


def _same_objects(a: Any, b: Any) -> bool:
    """The same container shape holding the very same objects (identity, not equality)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_objects(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_objects(x, y) for x, y in zip(a, b, strict=True))
    return a is b


def per_example(t: Tensor, size: int) -> Tensor:
    """A layer input shared by the batch (dimension 0 of 1) as one row per example."""
    return t.expand(size, *t.shape[1:]) if t.shape[0] == 1 and size > 1 else t


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


def _detach_tree(value: Any) -> Any:
    """Every tensor in ``value`` detached (a tensor itself without the pytree walk)."""
    return value.detach() if isinstance(value, Tensor) else tree_map(_detach, value)


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
