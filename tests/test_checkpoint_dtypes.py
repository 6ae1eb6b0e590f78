"""Checkpoints whose floating tensors have another dtype than the model's are converted to the
model's dtypes (as ``load_state_dict`` does); other dtype differences are a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_data, make_mlp

import fasttrak as ft
from fasttrak.checkpoints import fingerprint, load_state


def scores_for(state: dict[str, torch.Tensor]) -> np.ndarray:
    x, y = make_data(12)
    trak = ft.TRAK(make_mlp(), proj_dim=16, progress=False)
    trak.featurize((x, y), checkpoints=[state])
    return np.asarray(trak.score((x[:3], y[:3])))


def cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in state.items()}


def test_float64_checkpoint_of_float32_model_gives_the_same_scores():
    state32 = make_mlp(seed=1).state_dict()
    state64 = cast(state32, torch.float64)
    model = make_mlp()
    converted = load_state(model, state64)
    assert all(v.dtype == torch.float32 for v in converted.values())
    for name, tensor in load_state(model, state32).items():
        torch.testing.assert_close(converted[name], tensor, rtol=0, atol=0)
    assert fingerprint(converted) == fingerprint(load_state(model, state32))
    np.testing.assert_array_equal(scores_for(state64), scores_for(state32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_of_float32_model_is_converted(dtype):
    half = cast(make_mlp(seed=1).state_dict(), dtype)
    model = make_mlp()
    converted = load_state(model, half)
    assert all(v.dtype == torch.float32 for v in converted.values())
    for name, tensor in half.items():  # bf16/fp16 -> float32 is exact
        torch.testing.assert_close(converted[name], tensor.float(), rtol=0, atol=0)
    # The half-precision checkpoint scores like its exact float32 copy.
    np.testing.assert_array_equal(scores_for(half), scores_for(cast(half, torch.float32)))


def test_integer_dtype_mismatch_names_the_key_and_the_fix():
    model = torch.nn.BatchNorm1d(3)  # num_batches_tracked: int64
    state = dict(model.state_dict())
    state["num_batches_tracked"] = state["num_batches_tracked"].to(torch.int32)
    with pytest.raises(ft.CheckpointMismatchError, match="num_batches_tracked") as info:
        load_state(model, state)
    assert "torch.int32" in str(info.value) and ".to(model.state_dict()[k].dtype)" in str(
        info.value
    )
    # A float where the model holds an integer is not cast either.
    state["num_batches_tracked"] = torch.tensor(0.0)
    with pytest.raises(ft.CheckpointMismatchError, match="num_batches_tracked"):
        load_state(model, state)
