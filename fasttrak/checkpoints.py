"""Loading and checking checkpoints: state dicts or paths, safely."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fasttrak.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigTypeError,
    MissingDependencyError,
)

Checkpoint = Mapping[str, Tensor] | str | Path | nn.Module


def load_state(model: nn.Module, checkpoint: Checkpoint | None) -> dict[str, Tensor]:
    """Every parameter and buffer of ``model`` by name, on the CPU, taken from ``checkpoint``.

    Paths load with ``torch.load(weights_only=True)`` (``.safetensors`` with safetensors).
    Buffers that a state dict does not hold (non-persistent ones) come from the model.

    Floating-point tensors are converted to the dtype of the model's tensor of the same name,
    as ``nn.Module.load_state_dict`` does when it copies into the model's tensors: a float64
    or bf16 checkpoint of a float32 model gives float32 tensors (and so the fingerprint of the
    float32 copy of the same weights). Integer and bool tensors (step counters, token ids...)
    must have the model's dtype already.

    Raises CheckpointMismatchError when names, shapes or non-floating dtypes do not fit the
    model; CheckpointNotFoundError for a path that does not exist.
    """
    if checkpoint is None:
        checkpoint = model
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    if isinstance(checkpoint, (str, Path)):
        checkpoint = _load_file(Path(checkpoint))
    if not isinstance(checkpoint, Mapping):
        raise ConfigTypeError(
            "a checkpoint must be a state dict, a path or a module, "
            f"got {type(checkpoint).__name__}"
        )
    expected = model.state_dict()
    non_tensor = [k for k, v in checkpoint.items() if not isinstance(v, Tensor)]
    if non_tensor:
        raise CheckpointMismatchError(
            f"checkpoint entries {non_tensor[:5]} are not tensors: this looks like a training "
            "checkpoint dict; pass the model's state dict inside it (e.g. ckpt['model'])"
        )
    missing = [k for k in expected if k not in checkpoint]
    unexpected = [k for k in checkpoint if k not in expected]
    if missing or unexpected:
        hint = ""
        if any(k.startswith("module.") for k in unexpected):
            hint = " (keys start with 'module.': strip that prefix left by DataParallel/DDP)"
        raise CheckpointMismatchError(
            f"the checkpoint does not fit the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}{hint}; pass a state dict saved from this model architecture"
        )
    wrong = [
        f"{k}: checkpoint {tuple(checkpoint[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(checkpoint[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointMismatchError(
            "the checkpoint's shapes do not fit the model: "
            + "; ".join(wrong[:5])
            + "; pass a state dict saved from this model architecture"
        )
    other_dtypes = [
        f"{k}: checkpoint {checkpoint[k].dtype} vs model {v.dtype}"
        for k, v in expected.items()
        if checkpoint[k].dtype != v.dtype
        and not (checkpoint[k].is_floating_point() and v.is_floating_point())
    ]
    if other_dtypes:
        raise CheckpointMismatchError(
            "the checkpoint's dtypes do not fit the model: "
            + "; ".join(other_dtypes[:5])
            + "; only floating-point tensors are converted to the model's dtype: convert these "
            "entries first (state[k] = state[k].to(model.state_dict()[k].dtype)) or pass a "
            "state dict saved from this model"
        )
    # Tied weights (GPT-2's lm_head.weight is wte.weight) appear under every alias in a state
    # dict; functional_call wants each tensor once, under its first name.
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    # Floating tensors take the model's dtype, as load_state_dict's copy_ into them would.
    state = {
        k: v.detach().to("cpu", expected[k].dtype)
        for k, v in checkpoint.items()
        if k not in aliases
    }
    for name, buffer in model.named_buffers():
        state.setdefault(name, buffer.detach().to("cpu"))
    return state


def fingerprint(state: Mapping[str, Tensor]) -> str:
    """A blake2b digest of names, dtypes, shapes and bytes: identifies a checkpoint's weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_file(path: Path) -> Mapping[str, Any]:
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise MissingDependencyError(
                "reading .safetensors needs `pip install safetensors`"
            ) from error
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
