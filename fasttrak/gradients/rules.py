"""Per-layer gradient rules: one per layer type, each giving the exact and the factored form.

A rule turns one recorded call of a layer (its input ``a``, and ``g = ∂(Σ_j f_j)/∂out``, whose
row i is example i's, see :mod:`fasttrak.gradients.recording`) into

- :meth:`Rule.gradients`: the exact per-example gradients ``(B, *shape)`` of the layer's
  selected tensors (the hook engine, :class:`~fasttrak.gradients.HookGradients`);
- :meth:`Rule.project`: their factored projection ``(B, k_in · k_out)`` (the factored
  features, :class:`~fasttrak.gradients.FactoredFeatures`), with :meth:`Rule.factor_sizes`
  the rows ``(d_in, d_out)`` of its two factors ``P_in`` and ``P_out``.

Exact gradients (t over tokens / positions; 1 for flat inputs):

- ``nn.Linear`` (W: out × in): ``∇W_i = Σ_t g_it a_itᵀ``, ``∇b_i = Σ_t g_it``;
- Hugging Face ``Conv1D`` (GPT-2; W: in × out, y = a W + b): ``∇W_i = Σ_t a_it g_itᵀ``;
- ``nn.Conv2d`` (groups 1): ``∇W_i = Σ_l g_il ⊗ patch_il`` over output positions l,
  computed for all examples at once: for few input channels as one batched matmul with the
  input's patches (a strided view), otherwise as the weight gradient of one convolution with
  groups = B (a padding mode other than zeros, and ``padding="same"``/``"valid"``, are
  applied to the input first, as ``nn.Conv2d`` does);
- ``nn.Embedding`` (W: vocab × dim): ``∇W_i[v] = Σ_{t: id_it = v} g_it`` (padding_idx rows 0);
- any other layer (grouped Conv2d, Conv1d, LayerNorm, RMSNorm, GroupNorm, BatchNorm in eval
  mode, embeddings with max_norm / scale_grad_by_freq / sparse, custom modules): the "local"
  rule re-runs the layer alone per example under ``torch.func.vmap`` of a vector-Jacobian
  product with ``g_i`` — cheap, since it is one layer, not the model. It has no factored form.

Factored projection (LoGra-style). Example i's weight gradient is ``Σ_t g_t a_tᵀ``; its
projection by ``P_rows ⊗ P_cols`` is computed from the projected factors without ever forming
the gradient::

    feature_i = Σ_t (P_rowsᵀ r_t) ⊗ (P_colsᵀ c_t)      # (k_rows · k_cols,), row-major

where ``r_t`` / ``c_t`` are the row-side / column-side factors of the weight's row-major
layout: for nn.Linear and nn.Conv2d the rows are outputs (``r = g``) and the columns are
inputs (``c = a``, the unfolded patch for a convolution); for Hugging Face Conv1D (W: in ×
out) the rows are inputs and the columns outputs; for nn.Embedding the weight is
``(vocab, dim)``, so the rows are the token ids (``r = onehot(idx)``, projected by gathering
rows of ``P_in``) and the columns are the output dimension (``c = g``, projected by
``P_out``). Hence the flattened feature equals ``(P_rows ⊗ P_cols)ᵀ vec(∇W)`` with ``vec``
the row-major flattening PyTorch uses, for every layer kind.

A selected bias is a homogeneous coordinate: a constant 1 is appended to ``a`` (a last row of
``P_in``), so weight and bias are projected together and the bias gradient ``Σ_t g_t`` is the
last column of the ``[W | b]`` gradient.

A new layer type is one :class:`Rule` subclass, added to :data:`RULES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_map

from fasttrak.errors import ConfigError
from fasttrak.gradients.recording import Call, per_example


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 family): a linear layer with weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class Rule:
    """The per-example gradients of one layer type. Subclasses set :attr:`kind` and
    override the methods; :attr:`projects` says whether there is a factored form."""

    kind = "local"
    projects = False
    keeps_all = False  # a call must keep every tensor of the layer, not only the selected ones

    def claims(self, module: nn.Module) -> bool:
        """True for the layer type this rule is written for."""
        return True

    def refusal(self, module: nn.Module) -> str | None:
        """Why a claimed layer's configuration is left to the local rule (None: it is not)."""
        return None

    def gradients(
        self,
        module: nn.Module,
        call: Call,
        attrs: Sequence[str],
        size: int,
        out: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Per-example gradients ``(B, *shape)`` of ``module``'s tensors ``attrs``, one call.
        ``out``: float32 buffers ``(B, *shape)`` a rule may write into (or ignore)."""
        raise ConfigError(f"the {self.kind!r} rule has no exact gradient")

    def factor_sizes(self, module: nn.Module, weight: bool, bias: bool) -> tuple[int, int]:
        """Rows ``(d_in, d_out)`` of ``P_in`` and ``P_out``; ``d_in`` counts the homogeneous
        bias coordinate when the bias is selected."""
        raise ConfigError(f"the {self.kind!r} rule has no factored projection")

    def project(
        self,
        module: nn.Module,
        a: Tensor,
        grad: Tensor,
        p_in: Tensor,
        p_out: Tensor,
        weight: bool,
        bias: bool,
    ) -> Tensor:
        """The factored projection ``(B, k_in · k_out)`` of one call's gradient of the
        selected weight and/or bias, from its input ``a`` (batch first) and output gradient
        ``grad``; ``p_in``: ``(d_in, k_in)``, ``p_out``: ``(d_out, k_out)``."""
        raise ConfigError(f"the {self.kind!r} rule has no factored projection")


class LinearRule(Rule):
    """nn.Linear, W (out, in): ``∇W_i = Σ_t g_it a_itᵀ``; rows outputs, columns inputs."""

    kind = "linear"
    projects = True
    spec = "bto,bti->boi"  # g (B, T, out), a (B, T, in) -> the weight's layout

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def gradients(
        self,
        module: nn.Module,
        call: Call,
        attrs: Sequence[str],
        size: int,
        out: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        assert call.grad is not None
        a = _tokens(per_example(call.input, size), size)  # (B, T, d_in)
        g = _tokens(call.grad, size)  # (B, T, d_out)
        found: dict[str, Tensor] = {}
        buffers = out or {}
        if "weight" in attrs:
            if a.shape[1] == 1:  # one position: an outer product, cheaper than a bmm
                g1, a1 = g[:, 0], a[:, 0]
                rows, cols = (g1, a1) if self.spec.endswith("boi") else (a1, g1)
                product = (rows[:, :, None], cols[:, None, :])
                if "weight" in buffers:
                    found["weight"] = torch.mul(*product, out=buffers["weight"])
                else:
                    found["weight"] = torch.mul(*product)
            else:
                found["weight"] = torch.einsum(self.spec, g, a)
        if "bias" in attrs:
            found["bias"] = g[:, 0] if g.shape[1] == 1 else g.sum(1)
        unknown = set(attrs) - {"weight", "bias"}
        if unknown:
            raise ConfigError(f"layer {call.layer!r} has unexpected parameters {sorted(unknown)}")
        return found

    def factor_sizes(self, module: nn.Module, weight: bool, bias: bool) -> tuple[int, int]:
        assert isinstance(module, nn.Linear)
        return (module.in_features if weight else 0) + int(bias), module.out_features

    def project(
        self,
        module: nn.Module,
        a: Tensor,
        grad: Tensor,
        p_in: Tensor,
        p_out: Tensor,
        weight: bool,
        bias: bool,
    ) -> Tensor:
        size = a.shape[0]
        a = _tokens(a, size).to(p_in.device)  # (B, T, d_in)
        g = _tokens(grad, size).to(p_out.device)  # (B, T, d_out)
        pa = _homogeneous(p_in, weight, bias, lambda rows: a @ rows, (size, a.shape[1]))
        pg = g @ p_out  # (B, T, k_out)
        return torch.einsum(self.spec, pg, pa).reshape(size, -1)


class HFConv1DRule(LinearRule):
    """Hugging Face Conv1D, y = a W + b with W (in, out): ``∇W_i = Σ_t a_it g_itᵀ``; its
    homogeneous layout is ``[W; b]``, (in + 1, out): rows inputs, columns outputs."""

    kind = "conv1d"
    spec = "bto,bti->bio"

    def claims(self, module: nn.Module) -> bool:
        return is_hf_conv1d(module)

    def factor_sizes(self, module: nn.Module, weight: bool, bias: bool) -> tuple[int, int]:
        rows, cols = cast(Tensor, module.weight).shape
        return (rows if weight else 0) + int(bias), cols


class Conv2dRule(Rule):
    """nn.Conv2d with groups=1: ``∇W_i = Σ_l g_il ⊗ patch_il`` over output positions l."""

    kind = "conv2d"
    projects = True

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    def refusal(self, module: nn.Module) -> str | None:
        assert isinstance(module, nn.Conv2d)
        if module.groups == 1:
            return None
        return (
            f"a grouped convolution (groups={module.groups}); the factored projection "
            "supports groups=1 only: exclude it with params= or use another projector"
        )

    def gradients(
        self,
        module: nn.Module,
        call: Call,
        attrs: Sequence[str],
        size: int,
        out: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """The weight gradients of all B examples at once, by one of two exact routes
        chosen by :func:`takes_patches` from the layer's shape, one example's input size and
        the device, never the batch size (so every process computes the same bits):

        - patches (on the CPU: few input channels, ``in_channels · kh · kw <= PATCH_COLUMNS``
          and ``out_channels <= PATCH_OUTPUTS``; off the CPU: whenever one example's patches
          take at most ``DEVICE_PATCH_BYTES``): one batched matmul of ``g`` (B, O, L) with the
          input's patches (B, L, C·kh·kw), a strided view of the padded input copied once;
        - otherwise: ONE grouped convolution's weight gradient, the batch folded into the
          channels, (1, B·C, H, W), with groups = B, so that group i sees only example i's
          input and output gradient (the convolution backward's own kernel).

        Measured on one CPU thread, B = 64 (µs, patches vs grouped): C=1, O=8, 16x16: 132
        vs 257; C=3, O=16, 32x32: 2678 vs 5156; C=4, O=8: 383 vs 913; C=8, O=16, 8x8: 353
        vs 209; C=16, O=32: 4563 vs 3256; C=3, O=64, 32x32: 8429 vs 7798. The grouped
        kernel also has a fixed cost of about 90 µs per call on tiny inputs."""
        assert isinstance(module, nn.Conv2d) and call.grad is not None
        grad = call.grad.float()  # (B, O, H', W')
        result: dict[str, Tensor] = {}
        if "weight" in attrs:
            x = per_example(call.input, size).float()
            if takes_patches(module, grad.shape[2] * grad.shape[3], x.device):
                result["weight"] = _weight_grads_by_patches(module, _padded(module, x), grad)
            else:
                result["weight"] = _weight_grads_by_grouped_conv(module, x, grad)
        if "bias" in attrs:
            result["bias"] = grad.sum((2, 3))
        return result

    def factor_sizes(self, module: nn.Module, weight: bool, bias: bool) -> tuple[int, int]:
        assert isinstance(module, nn.Conv2d)
        kh, kw = module.kernel_size
        return (module.in_channels * kh * kw if weight else 0) + int(bias), module.out_channels

    def project(
        self,
        module: nn.Module,
        a: Tensor,
        grad: Tensor,
        p_in: Tensor,
        p_out: Tensor,
        weight: bool,
        bias: bool,
    ) -> Tensor:
        """P_inᵀ of every unfolded patch = a convolution of the input with P_in reshaped as
        k_in filters (same stride/padding/dilation/padding_mode): no unfold."""
        assert isinstance(module, nn.Conv2d)
        size = a.shape[0]
        g = grad.float().to(p_out.device).flatten(2).transpose(1, 2)  # (B, L, d_out)
        pg = g @ p_out  # (B, L, k_out)
        k_in = p_in.shape[1]

        def patches(rows: Tensor) -> Tensor:  # (B, L, k_in)
            filters = rows.t().reshape(k_in, *module.weight.shape[1:])
            pa = module._conv_forward(a.float().to(p_in.device), filters, None)
            return pa.flatten(2).transpose(1, 2)

        pa = _homogeneous(p_in, weight, bias, patches, (size, pg.shape[1]))
        return torch.einsum("blo,bli->boi", pg, pa).reshape(size, -1)


PATCH_COLUMNS = 36
"""Largest ``in_channels · kh · kw`` whose per-example weight gradients take the patches route."""

PATCH_OUTPUTS = 32
"""Largest ``out_channels`` whose per-example weight gradients take the patches route."""

DEVICE_PATCH_BYTES = 2**23
"""Off the CPU, the largest copy of one example's patches (``in_channels · kh · kw · L``
float32 entries, L output positions) for which the patches route is taken, whatever the
channels: a GPU runs the batched matmul at its matmul rate, and the copy is transient (8 MiB
per example: 1 GiB at B = 128). A ResNet-18 layer on 32x32 images needs at most 2.4 MiB."""


def takes_patches(module: nn.Conv2d, positions: int, device: torch.device) -> bool:
    """Whether the per-example weight gradients of ``module`` take the patches route (else
    the grouped convolution), from its shape, its ``positions`` = L output positions per
    example and the device (see :meth:`Conv2dRule.gradients`)."""
    kh, kw = module.kernel_size
    columns = module.in_channels * kh * kw
    if device.type == "cpu":
        return columns <= PATCH_COLUMNS and module.out_channels <= PATCH_OUTPUTS
    return columns * positions * 4 <= DEVICE_PATCH_BYTES


def _padded(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The input as the convolution sees it: padded explicitly (any padding mode, and the
    possibly asymmetric ``padding="same"``), as ``nn.Conv2d._conv_forward`` does."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    padding = list(module._reversed_padding_repeated_twice)
    return nn.functional.pad(x, padding, mode=mode) if any(padding) else x


def _weight_grads_by_patches(module: nn.Conv2d, x: Tensor, grad: Tensor) -> Tensor:
    """(B, O, C, kh, kw) per-example weight gradients ``Σ_l g_il ⊗ patch_il`` from the
    padded input ``x`` (B, C, H, W) and ``grad`` (B, O, H', W'): the patches are a strided
    view of ``x`` (stride and dilation in its strides), copied once into (B, C·kh·kw, L)."""
    size, channels = x.shape[:2]
    kh, kw = module.kernel_size
    (sh, sw), (dh, dw) = module.stride, module.dilation
    oh, ow = grad.shape[2:]
    x = x.contiguous()
    s0, s1, s2, s3 = x.stride()
    patches = x.as_strided(
        (size, channels, kh, kw, oh, ow),
        (s0, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw),
        x.storage_offset(),
    ).reshape(size, channels * kh * kw, oh * ow)
    g = grad.reshape(size, module.out_channels, oh * ow)
    return torch.bmm(g, patches.transpose(1, 2)).view(size, *module.weight.shape)


def _weight_grads_by_grouped_conv(module: nn.Conv2d, x: Tensor, grad: Tensor) -> Tensor:
    """(B, O, C, kh, kw) per-example weight gradients as the weight gradient of one
    convolution with groups = B over the batch folded into the channels, from the input
    ``x`` (B, C, H, W) and ``grad`` (B, O, H', W')."""
    size = x.shape[0]
    padding: Any = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):
        x, padding = _padded(module, x), (0, 0)
    shape = (size * module.out_channels, *module.weight.shape[1:])
    weight = torch.zeros((), device=x.device).expand(shape)  # only its shape is read
    weight_grad = torch.ops.aten.convolution_backward(
        grad.reshape(1, -1, *grad.shape[2:]),
        x.reshape(1, -1, *x.shape[2:]),
        weight,
        None,
        list(module.stride),
        list(padding),
        list(module.dilation),
        False,
        [0, 0],
        size,
        [False, True, False],
    )[1]
    return weight_grad.view(size, *module.weight.shape)


class EmbeddingRule(Rule):
    """nn.Embedding, W (vocab, dim): ``∇W_i[v] = Σ_{t: id_it = v} g_it``; rows the token
    ids, columns the embedding dimension. No bias."""

    kind = "embedding"
    projects = True

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def refusal(self, module: nn.Module) -> str | None:
        assert isinstance(module, nn.Embedding)
        if module.max_norm is None and not module.scale_grad_by_freq and not module.sparse:
            return None
        return (
            "an embedding that uses scale_grad_by_freq, max_norm or sparse gradients, which "
            "the factored projection does not support: exclude it with params="
        )

    def gradients(
        self,
        module: nn.Module,
        call: Call,
        attrs: Sequence[str],
        size: int,
        out: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        assert isinstance(module, nn.Embedding) and call.grad is not None
        ids = per_example(call.input, size).reshape(size, -1)  # (B, T)
        g = call.grad.reshape(size, ids.shape[1], -1).float()  # (B, T, dim)
        if module.padding_idx is not None:
            g = g * (ids != module.padding_idx)[..., None]
        weight = torch.zeros(
            (size, module.num_embeddings, g.shape[2]), device=g.device, dtype=g.dtype
        )
        rows = torch.arange(size, device=g.device)[:, None].expand_as(ids)
        return {"weight": weight.index_put_((rows, ids), g, accumulate=True)}

    def factor_sizes(self, module: nn.Module, weight: bool, bias: bool) -> tuple[int, int]:
        assert isinstance(module, nn.Embedding)
        return module.num_embeddings, module.embedding_dim

    def project(
        self,
        module: nn.Module,
        a: Tensor,
        grad: Tensor,
        p_in: Tensor,
        p_out: Tensor,
        weight: bool,
        bias: bool,
    ) -> Tensor:
        assert isinstance(module, nn.Embedding)
        size = a.shape[0]
        idx = a.reshape(size, -1)  # (B, T)
        g = grad.reshape(size, idx.shape[1], module.embedding_dim).float().to(p_out.device)
        rows = p_in[idx.to(p_in.device)]  # (B, T, k_in): gathered rows, no one-hot
        if module.padding_idx is not None:
            keep = (idx != module.padding_idx).to(rows.device, rows.dtype)
            rows = rows * keep[..., None]
        pg = g @ p_out  # (B, T, k_out)
        return torch.einsum("bti,bto->bio", rows, pg).reshape(size, -1)


class LocalRule(Rule):
    """Any other layer: re-run it alone per example under vmap, a vjp of its own selected
    tensors with ``g_i``. Needs every tensor of the layer at call time; no factored form."""

    keeps_all = True

    def gradients(
        self,
        module: nn.Module,
        call: Call,
        attrs: Sequence[str],
        size: int,
        out: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        assert call.grad is not None
        size = call.grad.shape[0]
        own = {attr: call.tensors[attr] for attr in attrs}
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
                return functional_call(module, {**constants, **p}, args, kwargs)

            pullback = vjp(run, own)[1]
            return pullback(g)[0]

        return vmap(one, in_dims=(*in_dims, 0))(*inputs, call.grad.unsqueeze(1))


RULES: tuple[Rule, ...] = (LinearRule(), HFConv1DRule(), Conv2dRule(), EmbeddingRule())
"""The layer-specific rules, tried in order; :data:`LOCAL` takes every other layer."""

LOCAL = LocalRule()

COVERED_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)
"""Layer types the factored projection supports (and Hugging Face ``Conv1D``, see
:func:`is_covered`), in the configurations :func:`rule_for` gives them a projecting rule."""


def rule_for(module: nn.Module) -> Rule:
    """The rule of ``module``: the first of :data:`RULES` that claims it and does not refuse
    its configuration, else :data:`LOCAL`."""
    for rule in RULES:
        if rule.claims(module) and rule.refusal(module) is None:
            return rule
    return LOCAL


def is_covered(module: nn.Module) -> bool:
    """True for the layers the factored projection covers: nn.Linear, nn.Conv2d with
    groups=1, nn.Embedding without max_norm / scale_grad_by_freq / sparse, and Hugging Face's
    ``Conv1D`` (GPT-2's linear layers, weight (in, out)): those whose rule projects."""
    return rule_for(module).projects


def why_not_covered(module: nn.Module) -> str:
    """What ``module`` is, and why the factored projection does not cover it."""
    for rule in RULES:
        if rule.claims(module):
            return rule.refusal(module) or f"covered by the {rule.kind!r} rule"
    return (
        f"a {type(module).__name__}; the factored projection covers nn.Linear, nn.Conv2d "
        "(groups=1), nn.Embedding and Hugging Face Conv1D"
    )


def _tokens(t: Tensor, size: int) -> Tensor:
    """(B, ..., d) -> (B, T, d) float32: every position of example i in row i."""
    return t.reshape(size, -1, t.shape[-1]).float()


def _homogeneous(
    p_in: Tensor,
    weight: bool,
    bias: bool,
    project: Callable[[Tensor], Tensor],
    positions: tuple[int, int],
) -> Tensor:
    """P_inᵀ [a | 1] per position, ``(B, T, k_in)``, without concatenating the 1:
    ``project(rows)`` applies the activation rows of ``P_in`` to the layer's input."""
    if not weight:  # bias only: the homogeneous coordinate alone
        return p_in[0].expand(*positions, p_in.shape[1])
    d_act = p_in.shape[0] - (1 if bias else 0)
    pa = project(p_in[:d_act])
    if bias:
        pa = pa + p_in[d_act]
    return pa
