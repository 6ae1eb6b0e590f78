"""The hook engine: per-example gradients from one batched forward/backward, against loops of
torch.autograd.grad (one example at a time, unpadded) and against the vmap engine."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import loop_gradients, make_cnn, make_data, make_mlp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import fasttrak as ft
from fasttrak.checkpoints import load_state
from fasttrak.gradients import HookGradients, VmapGradients, select_parameters
from fasttrak.gradients.rules import (
    DEVICE_PATCH_BYTES,
    PATCH_COLUMNS,
    _padded,
    _weight_grads_by_grouped_conv,
    _weight_grads_by_patches,
    rule_for,
    takes_patches,
)
from fasttrak.tasks import ImageClassification


def hook_parts(model, task, batch, params=None):
    names = select_parameters(model, params)
    model.eval()
    engine = HookGradients(model, task, names)
    return names, torch.cat(engine.parts(load_state(model, None), batch), dim=1)


def loop_task(model, task, batch, names):
    """Oracle: task.output on each example alone (a batch of one), one autograd.grad each."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    rows = []
    for i in range(task.batch_size(batch)):
        one = tuple(t[i : i + 1] for t in batch)
        f = task.output(model, one)[0]
        grads = torch.autograd.grad(f, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def vmap_parts(model, task, batch, names):
    model.eval()
    engine = VmapGradients(model, task, names, chunk_size=None)
    return torch.cat(engine.parts(load_state(model, None), batch), dim=1)


# ---------------------------------------------------------------------- plain PyTorch models
def test_mlp_and_cnn_match_the_autograd_loop():
    for model, x in [
        (make_mlp(), make_data(9)[0]),
        (make_cnn(), torch.randn(7, 1, 6, 6, generator=torch.Generator().manual_seed(2))),
    ]:
        y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(1))
        names, grads = hook_parts(model, ImageClassification(), (x, y))
        expected = loop_gradients(model, x, y, names, torch.float32)
        torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-5)


class SequenceModel(nn.Module):
    """Embedding (padding_idx) -> LayerNorm -> Linear -> in-place ReLU -> Conv1d over tokens
    -> masked mean -> tied output layer (weight shared with a second Linear call)."""

    def __init__(self, vocab: int = 11, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.group = nn.GroupNorm(2, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).float()[..., None]
        h = torch.relu_(self.proj(self.norm(self.embed(ids))))
        h = self.proj(h) + h  # the same layer twice: gradients of both calls add up
        h = self.group(self.conv(h.transpose(1, 2))).transpose(1, 2)
        pooled = (h * mask).sum(1) / mask.sum(1)
        return self.head(pooled)


def _sequence_batch(sizes=(5, 3, 6, 1), length=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(sizes), length, dtype=torch.long)
    for i, n in enumerate(sizes):
        ids[i, :n] = torch.randint(1, 11, (n,), generator=gen)
    return ids, torch.randint(0, 3, (len(sizes),), generator=gen)


class _InPlaceOnlyWhenNegative(nn.Module):
    """Changes its input in place on a batch whose first value is negative, else not: an
    in-place op that some batches take and others do not."""

    def forward(self, x):
        return x.mul_(0.5) if bool(x.flatten()[0] < 0) else x * 0.5


@pytest.mark.parametrize(
    "inplace",
    [nn.ReLU(inplace=True), nn.Hardtanh(-0.3, 0.4, inplace=True), _InPlaceOnlyWhenNegative()],
    ids=["relu", "hardtanh", "some_batches"],
)
def test_in_place_ops_after_a_recorded_layer_match_the_loop(inplace):
    """A recorded output changed in place later (ReLU(inplace=True) after a Linear and a
    Conv2d) must not change the gradient: the engine records the batch again with copies,
    and keeps copying for later batches."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), inplace, nn.Flatten(), nn.Linear(3 * 16, 5), inplace
    )
    model.append(nn.Linear(5, 3))
    model.eval()
    names = select_parameters(model, None)
    engine = HookGradients(model, ImageClassification(), names)
    state = load_state(model, None)
    gen = torch.Generator().manual_seed(3)
    for batch in range(3):
        x = torch.randn(4, 1, 4, 4, generator=gen) + (1.0 if batch == 0 else -1.0)
        y = torch.randint(0, 3, (4,), generator=gen)
        grads = torch.cat(engine.parts(state, (x, y)), dim=1)
        expected = loop_gradients(model, x, y, names, torch.float32)
        torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-5)
    assert engine.recorder.copy_outputs


def test_a_model_without_in_place_ops_hands_on_its_own_outputs():
    """No copies of the recorded outputs when nothing changes them in place."""
    model = make_mlp().eval()
    names = select_parameters(model, None)
    engine = HookGradients(model, ImageClassification(), names)
    x, y = make_data(6)[0], torch.randint(0, 3, (6,))
    for _ in range(2):
        engine.parts(load_state(model, None), (x, y))
    assert not engine.recorder.copy_outputs


def test_sequence_model_with_padding_shared_layers_and_local_rules():
    torch.manual_seed(0)
    model = SequenceModel()
    ids, y = _sequence_batch()
    names, grads = hook_parts(model, ImageClassification(), (ids, y))
    assert set(names) >= {"embed.weight", "norm.weight", "conv.weight", "group.bias"}
    expected = loop_task(model, ImageClassification(), (ids, y), names)
    torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        vmap_parts(model, ImageClassification(), (ids, y), names), grads, rtol=1e-4, atol=1e-5
    )


class RootParam(nn.Module):
    """A parameter the root module uses itself (like CLIP's logit_scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_mlp()
        self.scale = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        return self.mlp(x) * self.scale


def test_parameters_outside_layers_use_a_batched_backward():
    model = RootParam()
    x, y = make_data(6)
    names, grads = hook_parts(model, ImageClassification(), (x, y))
    assert "scale" in names
    torch.testing.assert_close(
        grads, loop_gradients(model, x, y, names, torch.float32), rtol=1e-4, atol=1e-5
    )


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.checkpointing = True
        self.inner = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = x + 0.0 * x.sum()  # no-op on values; gives reentrant checkpointing an input with grad
        if not self.checkpointing:
            return self.head(self.inner(x))
        return self.head(checkpoint(self.inner, x, use_reentrant=self.reentrant))


def test_non_reentrant_gradient_checkpointing_matches_the_loop():
    torch.manual_seed(0)
    model = Checkpointed(reentrant=False)
    x, y = make_data(5)
    names, grads = hook_parts(model, ImageClassification(), (x, y))
    plain = copy.deepcopy(model)
    plain.checkpointing = False  # the same function, for an oracle that autograd can follow
    expected = loop_gradients(plain, x, y, names, torch.float32)
    torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-5)


def test_reentrant_gradient_checkpointing_is_refused_with_the_fix():
    x, y = make_data(5)
    x.requires_grad_(True)  # reentrant checkpoints only backpropagate to inputs with grad
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        hook_parts(Checkpointed(reentrant=True), ImageClassification(), (x, y))


class Mixing(nn.Module):
    """Subtracts the batch mean: example outputs depend on the other examples."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(x - x.mean(0, keepdim=True))


def test_a_forward_that_mixes_examples_is_an_error():
    x, y = make_data(8)
    with pytest.raises(ValueError, match="examples interact"):
        ft.TRAK(Mixing(), proj_dim=8, progress=False).featurize((x, y))
    # vmap differentiates each example alone: it runs (with batch-of-one semantics)
    ft.TRAK(Mixing(), proj_dim=8, engine="vmap", progress=False).featurize((x, y))


def test_batchnorm_in_eval_mode_is_independent_and_train_mode_is_restored():
    model = make_cnn()
    model.train()
    x = torch.randn(6, 1, 6, 6)
    y = torch.randint(0, 3, (6,))
    trak = ft.TRAK(model, proj_dim=16, progress=False)
    trak.featurize((x, y))  # the runner uses eval mode: no interaction through BatchNorm
    assert model.training and model.bn.training


class NaNInLayer(nn.Module):
    """A layer whose parameter gets a NaN gradient (0 · 0/0) for inputs with x[:, 0] == 0."""

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return 0.0 * torch.sqrt(self.a * x[:, :1] ** 2)

    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_mlp()
        self.root = NaNInLayer.Root()

    def forward(self, x):
        return self.mlp(x) + self.root(x)


def test_a_nan_gradient_inside_a_layer_is_reported_on_its_row():
    x, y = make_data(20, seed=3)
    x[13, 0] = 0.0
    trak = ft.TRAK(NaNInLayer(), projector="sjlt", proj_dim=64, progress=False)
    with pytest.raises(ft.NonFiniteGradientError, match=r"rows \[13\]"):
        trak.featurize((x, y))


def test_engines_give_the_same_scores():
    x, y = make_data(40)
    model = make_mlp()
    scores = {}
    for engine in ("hooks", "vmap"):
        trak = ft.TRAK(model, proj_dim=32, projector="dense", engine=engine, progress=False)
        trak.featurize((x, y))
        scores[engine] = torch.from_numpy(trak.score((x[:5], y[:5])).numpy())
    torch.testing.assert_close(scores["hooks"], scores["vmap"], rtol=1e-3, atol=1e-4)


def test_unknown_engine_is_an_error():
    with pytest.raises(ValueError, match="engine must be one of"):
        ft.TRAK(make_mlp(), engine="autograd")


# ---------------------------------------------------------------------- Hugging Face models
transformers = pytest.importorskip("transformers")


@dataclass(frozen=True)
class FnTask:
    """A test task: f = fn(model outputs, batch), the model called with ``inputs`` keys."""

    fn: Any
    inputs: tuple[str, ...]
    name: str = "fn"

    def check_batch(self, batch):
        pass

    def batch_size(self, batch):
        return int(batch[self.inputs[0]].shape[0])

    def output(self, forward, batch):
        return self.fn(forward(**{k: batch[k] for k in self.inputs}), batch)

    def out_to_loss(self, forward, batch):
        return torch.full((self.batch_size(batch),), 0.5)

    def spec(self):
        return {"name": self.name}


def loop_hf(model, task, batch, lengths, names, trim_keys):
    """Oracle: each example alone, its padding cut off, one autograd.grad per example."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    rows = []
    for i, n in enumerate(lengths):
        one = {
            k: (v[i : i + 1, :n] if k in trim_keys else v[i : i + 1])
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
        }
        f = task.output(lambda **kw: model(**kw), one)[0]
        grads = torch.autograd.grad(f, [params[n] for n in names], allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                    for n, g in zip(names, grads, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def padded_ids(lengths, vocab, seed=0, pad=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=gen)
        mask[i, :n] = 1
    return ids, mask


LENGTHS = (5, 3, 7, 4)  # batch of 4, max length 7: no dimension coincides with the batch


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def tiny_t5():
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=30, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def bert_margin(out, batch):
    return out.logits[:, 0] - out.logits[:, 1]


def lm_logprob(out, batch):
    """Σ over real next tokens of log p(next token)."""
    logp = out.logits[:, :-1].float().log_softmax(-1)
    target = batch["input_ids"][:, 1:]
    token = logp.gather(2, target[..., None])[..., 0]
    return (token * batch["attention_mask"][:, 1:]).sum(1)


def test_bert_with_padding_matches_the_loop_and_vmap():
    model = tiny_bert()
    ids, mask = padded_ids(LENGTHS, 30)
    batch = {"input_ids": ids, "attention_mask": mask}
    task = FnTask(bert_margin, ("input_ids", "attention_mask"))
    names, grads = hook_parts(model, task, batch)
    expected = loop_hf(model, task, batch, LENGTHS, names, ("input_ids", "attention_mask"))
    torch.testing.assert_close(grads, expected, rtol=1e-3, atol=1e-5)


def test_gpt2_conv1d_and_tied_embeddings_match_the_loop():
    model = tiny_gpt2()
    ids, mask = padded_ids(LENGTHS, 30)
    batch = {"input_ids": ids, "attention_mask": mask}
    task = FnTask(lm_logprob, ("input_ids", "attention_mask"))
    names, grads = hook_parts(model, task, batch)
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # tied
    expected = loop_hf(model, task, batch, LENGTHS, names, ("input_ids", "attention_mask"))
    torch.testing.assert_close(grads, expected, rtol=1e-3, atol=1e-5)


def test_gpt2_vmap_engine_agrees_with_eager_attention():
    model = tiny_gpt2()
    model.config._attn_implementation = "eager"
    ids, mask = padded_ids(LENGTHS, 30)
    batch = {"input_ids": ids, "attention_mask": mask}
    task = FnTask(lm_logprob, ("input_ids", "attention_mask"))
    names, grads = hook_parts(model, task, batch, params=["transformer.h.1.*"])
    torch.testing.assert_close(vmap_parts(model, task, batch, names), grads, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "lengths, label_lengths",
    [(LENGTHS, (2, 3, 1, 3)), ((4, 3, 4, 2), (2, 3, 1, 4))],
    ids=["T != B", "T == B"],  # T == B: the (T, T, heads) bias looks batch-first by shape
)
def test_t5_relative_position_bias_and_padding_match_the_loop(lengths, label_lengths):
    model = tiny_t5()
    ids, mask = padded_ids(lengths, 30, seed=1)
    labels, label_mask = padded_ids(label_lengths, 30, seed=2)
    decoder_ids = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], dim=1)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "decoder_input_ids": decoder_ids,
        "decoder_attention_mask": label_mask,
        "labels": labels,
    }

    def seq_logprob(out, batch):
        logp = out.logits.float().log_softmax(-1)
        token = logp.gather(2, batch["labels"][..., None])[..., 0]
        return (token * batch["decoder_attention_mask"]).sum(1)

    task = FnTask(
        seq_logprob, ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    )
    names, grads = hook_parts(model, task, batch)
    assert any("relative_attention_bias" in n for n in names)
    # Trimming the encoder only (decoder lengths vary too but are masked in f).
    expected = loop_hf(model, task, batch, lengths, names, ("input_ids", "attention_mask"))
    torch.testing.assert_close(grads, expected, rtol=1e-3, atol=1e-5)


def test_clip_with_logit_scale_matches_the_loop():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            image_size=8, patch_size=4,
        ),
        projection_dim=8,
    )  # fmt: skip
    model = transformers.CLIPModel(config)
    ids, mask = padded_ids(LENGTHS, 30, seed=3, pad=1)
    for i, n in enumerate(LENGTHS):
        ids[i, n - 1] = 2  # eos: CLIP pools the text at the eos token
    pixels = torch.randn(len(LENGTHS), 3, 8, 8, generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}

    def scaled_similarity(out, batch):
        # logits_per_image[i, i] = exp(logit_scale) <image_i, text_i>: per example, and it
        # uses logit_scale, a parameter of the root module (batched-backward path).
        return out.logits_per_image.diagonal()

    task = FnTask(scaled_similarity, ("input_ids", "attention_mask", "pixel_values"))
    names, grads = hook_parts(model, task, batch)
    assert "logit_scale" in names
    expected = loop_hf(model, task, batch, LENGTHS, names, ("input_ids", "attention_mask"))
    torch.testing.assert_close(grads, expected, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------- LoRA (peft)
class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("a frozen base weight was differentiated")


def test_lora_only_differentiates_the_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_gpt2(),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.0),
    )
    names = select_parameters(model, "lora")
    assert names and all("lora_" in n for n in names)
    lora_numel = sum(dict(model.named_parameters())[n].numel() for n in names)
    # Every frozen base layer's weight passes through a function whose backward raises.
    for module in model.modules():
        if transformers.pytorch_utils.Conv1D is type(module):
            module.register_forward_hook(lambda m, a, out: out + 0.0 * _Boom.apply(m.weight).sum())
    ids, mask = padded_ids(LENGTHS, 30)
    data = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(len(LENGTHS))]
    task = FnTask(lm_logprob, ("input_ids", "attention_mask"))
    trak = ft.TRAK(model, task=task, params="lora", projector="identity", progress=False)
    assert trak.k == lora_numel
    trak.featurize(data)
    batch = {"input_ids": ids, "attention_mask": mask}
    expected = loop_hf(model, task, batch, LENGTHS, names, ("input_ids", "attention_mask"))
    stored = torch.from_numpy(trak.store.model(0).features())
    torch.testing.assert_close(stored, expected, rtol=1e-3, atol=1e-5)


def test_lora_selection_without_adapters_is_an_error():
    with pytest.raises(ValueError, match="peft.get_peft_model"):
        select_parameters(make_mlp(), "lora")


# ---------------------------------------------------------------------- factored on GPT-2
def test_factored_conv1d_features_equal_the_projected_hook_gradients():
    from fasttrak.projection import Factored

    model = tiny_gpt2().eval()
    ids, mask = padded_ids(LENGTHS, 30)
    batch = {"input_ids": ids, "attention_mask": mask}
    task = FnTask(lm_logprob, ("input_ids", "attention_mask"))
    params = ["transformer.h.*.attn.c_attn.*", "transformer.h.1.mlp.c_fc.weight"]
    names = select_parameters(model, params)
    projector = Factored(k_in=3, k_out=4).build_factored(model, names, 24, seed=1, model_id=0,
                                                         device="cpu")  # fmt: skip
    state = load_state(model, None)
    feats = projector.batch_features(state, task, batch)
    grads = dict(zip(names, HookGradients(model, task, names).parts(state, batch), strict=True))
    start = 0
    for layer in projector.layers:
        block = torch.cat([grads[p] for p in layer.params], dim=1) @ projector.kron(layer.name)
        torch.testing.assert_close(feats[:, start : start + block.shape[1]], block, atol=1e-4,
                                   rtol=1e-4)  # fmt: skip
        start += block.shape[1]
    assert start == feats.shape[1]


def test_factored_refuses_tied_weights():
    with pytest.raises(ValueError, match="tied"):
        ft.TRAK(tiny_gpt2(), projector="factored", params=[nn.Embedding], progress=False)


def test_batch_encoding_batches_are_plain_dicts():
    from collections import UserDict

    from torch.utils.data import DataLoader

    class Encoding(UserDict):  # like transformers.BatchEncoding: a Mapping, not a dict
        pass

    model = tiny_bert()
    ids, mask = padded_ids(LENGTHS, 30)
    items = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(len(LENGTHS))]

    def collate(rows):
        return Encoding({k: torch.stack([r[k] for r in rows]) for k in rows[0]})

    task = FnTask(bert_margin, ("input_ids", "attention_mask"))
    loader = DataLoader(items, batch_size=2, shuffle=False, collate_fn=collate)
    trak = ft.TRAK(model, task=task, proj_dim=16, projector="dense", progress=False)
    trak.featurize(loader)
    assert trak.store.model(0).features().shape == (len(LENGTHS), 16)


@pytest.mark.parametrize(
    "conv",
    [
        dict(stride=2, padding=1),
        dict(dilation=2, padding=2, bias=False),
        dict(padding="same"),
        dict(padding=1, padding_mode="reflect"),
        dict(groups=2, padding=1),
        dict(padding="same", padding_mode="reflect"),
        dict(padding="same", padding_mode="circular"),
        dict(padding="same", padding_mode="replicate", dilation=2),
        dict(padding="valid", bias=False),
        dict(padding=(1, 2), padding_mode="circular", stride=2),
        dict(stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
    ],
)
@pytest.mark.parametrize("channels", [2, 8])  # the patches route, the grouped convolution
def test_conv2d_variants_match_the_autograd_loop(conv, channels):
    torch.manual_seed(0)
    layer = nn.Conv2d(channels, 4, 3, **conv)
    assert (channels * 9 <= PATCH_COLUMNS) == (channels == 2)
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(5, channels, 7, 7)
    model(x)  # materialise the lazy layer
    y = torch.randint(0, 3, (5,))
    names, grads = hook_parts(model, ImageClassification(), (x, y))
    torch.testing.assert_close(
        grads, loop_gradients(model, x, y, names, torch.float32), rtol=1e-4, atol=1e-5
    )


def test_conv2d_route_depends_on_the_layer_and_device_never_the_batch():
    cpu, gpu = torch.device("cpu"), torch.device("meta")  # meta: any device but the CPU
    wide, narrow = nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(2, 4, 3)
    # CPU: few input channels and outputs only
    assert takes_patches(narrow, 25, cpu) and not takes_patches(wide, 32 * 32, cpu)
    # off the CPU: whenever one example's patches fit DEVICE_PATCH_BYTES
    assert 64 * 9 * 32 * 32 * 4 <= DEVICE_PATCH_BYTES < 64 * 9 * 224 * 224 * 4
    assert takes_patches(wide, 32 * 32, gpu) and not takes_patches(wide, 224 * 224, gpu)
    assert takes_patches(narrow, 25, gpu)


def per_example_weight_grads(layer: nn.Conv2d, x: Tensor, grad: Tensor) -> Tensor:
    """The oracle: one autograd call per example, in float64 on the CPU."""
    layer = copy.deepcopy(layer).double().cpu()
    rows = []
    for xi, gi in zip(x.double().cpu(), grad.double().cpu(), strict=True):
        out = layer(xi[None])
        (weight_grad,) = torch.autograd.grad((out * gi[None]).sum(), layer.weight)
        rows.append(weight_grad)
    return torch.stack(rows)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "conv",
    [
        dict(padding=1),
        dict(stride=2, padding=1, bias=False),
        dict(dilation=2, padding="same", padding_mode="reflect"),
        dict(stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
    ],
)
def test_conv2d_weight_grads_on_cuda_match_the_loop_by_both_routes(conv):
    """On a GPU a 64-channel layer takes the patches route (the CPU would take the grouped
    convolution); both routes agree with a float64 per-example loop there. The patches route
    is a cuBLAS matmul (float32 unless the user enables TF32 matmuls); the grouped route is a
    cuDNN convolution, which PyTorch runs in TF32 by default, so it is checked with cuDNN's
    TF32 off (scoped by torch.backends.cudnn.flags)."""
    torch.manual_seed(0)
    layer = nn.Conv2d(64, 32, 3, **conv).cuda()
    x = torch.randn(6, 64, 12, 12, device="cuda")
    with torch.no_grad():
        grad = torch.randn_like(layer(x))
    assert takes_patches(layer, grad.shape[2] * grad.shape[3], x.device)
    expected = per_example_weight_grads(layer, x, grad).float()
    scale = expected.abs().max().item()
    by_patches = _weight_grads_by_patches(layer, _padded(layer, x), grad)
    torch.testing.assert_close(by_patches.cpu(), expected, rtol=0, atol=1e-5 * scale)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        by_groups = _weight_grads_by_grouped_conv(layer, x, grad)
    torch.testing.assert_close(by_groups.cpu(), expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("channels", [2, 8])
def test_conv2d_on_a_slice_of_a_larger_batch_matches_the_loop(channels):
    """An unpadded input that is rows 4.. of a larger tensor (a storage offset, as the
    batches of a tuple of tensors are): the patches view must start at the slice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(channels, 4, 3, stride=2), nn.Tanh(), nn.Flatten())
    model.append(nn.Linear(4 * 3 * 3, 3))
    x = torch.randn(9, channels, 7, 7)[4:]
    y = torch.randint(0, 3, (5,))
    names, grads = hook_parts(model, ImageClassification(), (x, y))
    torch.testing.assert_close(
        grads, loop_gradients(model, x, y, names, torch.float32), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular", "replicate"])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_same_padding_matches_the_vmap_engine(mode, groups):
    """'same' padding with an even kernel (asymmetric padding) in every padding mode: the
    conv2d rule pads explicitly; a grouped convolution takes the local rule."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, (2, 3), padding="same", padding_mode=mode, groups=groups)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 6, 3))
    assert rule_for(conv).kind == ("conv2d" if groups == 1 else "local")
    x, y = torch.randn(6, 2, 5, 6), torch.randint(0, 3, (6,))
    names, grads = hook_parts(model, ImageClassification(), (x, y))
    expected = vmap_parts(model, ImageClassification(), (x, y), names)
    torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        grads, loop_gradients(model, x, y, names, torch.float32), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("channels", [3, 8])  # the patches route, the grouped convolution
def test_conv2d_on_channels_last_input_matches_the_loop(rows, channels):
    """The batch folded into channels, and the patches' strides, must follow the logical
    layout, not the memory one."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )
    x = torch.randn(rows, channels, 4, 4).to(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (rows,))
    names, grads = hook_parts(model, ImageClassification(), (x, y))
    torch.testing.assert_close(
        grads, loop_gradients(model, x, y, names, torch.float32), rtol=1e-4, atol=1e-5
    )


def test_special_embeddings_take_the_local_rule_and_match_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(5, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(16, 3)
    )
    assert rule_for(model[0]).kind == "local" and rule_for(nn.Embedding(3, 2)).kind == "embedding"
    ids, y = torch.randint(0, 5, (6, 4)), torch.randint(0, 3, (6,))  # repeated ids
    names, grads = hook_parts(model, ImageClassification(), (ids, y))
    expected = loop_task(model, ImageClassification(), (ids, y), names)
    torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-5)


def test_factored_covers_position_embeddings_shared_by_the_batch():
    from fasttrak.projection import Factored

    model = tiny_gpt2().eval()
    ids, mask = padded_ids(LENGTHS, 30)
    batch = {"input_ids": ids, "attention_mask": mask}
    task = FnTask(lm_logprob, ("input_ids", "attention_mask"))
    names = ["transformer.wpe.weight", "transformer.h.0.mlp.c_fc.weight"]
    projector = Factored(k_in=3, k_out=4).build_factored(model, names, 24, seed=2, model_id=0,
                                                         device="cpu")  # fmt: skip
    state = load_state(model, None)
    feats = projector.batch_features(state, task, batch)
    grads = dict(zip(names, HookGradients(model, task, names).parts(state, batch), strict=True))
    start = 0
    for layer in projector.layers:
        block = torch.cat([grads[p] for p in layer.params], dim=1) @ projector.kron(layer.name)
        torch.testing.assert_close(feats[:, start : start + block.shape[1]], block, atol=1e-4,
                                   rtol=1e-4)  # fmt: skip
        start += block.shape[1]


def test_vmap_engine_failure_on_masked_hugging_face_batches_names_the_fix():
    model = tiny_bert()
    ids, mask = padded_ids(LENGTHS, 30)
    batch = {"input_ids": ids, "attention_mask": mask}
    task = FnTask(bert_margin, ("input_ids", "attention_mask"))
    names = select_parameters(model, "classifier.*")
    with pytest.raises(RuntimeError, match="engine='hooks'"):
        vmap_parts(model, task, batch, names)


def test_factored_refuses_layers_without_a_batch_dimension():
    from fasttrak.projection import Factored

    model = tiny_t5().eval()
    ids, mask = padded_ids((4, 3, 4, 2), 30, seed=1)  # T == B: the shapes cannot tell
    labels, _ = padded_ids((2, 3, 1, 4), 30, seed=2)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    names = select_parameters(model, "*relative_attention_bias*")
    projector = Factored(k_in=2, k_out=2).build_factored(model, names, 8, seed=0, model_id=0,
                                                         device="cpu")  # fmt: skip
    with pytest.raises(ValueError, match="no batch dimension"):
        projector.batch_features(load_state(model, None), ft.tasks.Seq2Seq(), batch)


@dataclass
class _PassThrough:
    """A projector that returns its input: features alias the gradient parts."""

    k: int
    group_rows: int = 1

    def project(self, grads):
        return grads[0] if isinstance(grads, list) and len(grads) == 1 else torch.cat(grads, 1)

    def matrix(self):
        return torch.eye(self.k)


@pytest.mark.parametrize("group_rows", [1, 3, 8])
def test_reused_gradient_buffers_never_leak_into_features(group_rows):
    """Batches projected at once reuse the engine's buffers: every batch's features must
    still be its own, also when a projector hands back its input and when rows are grouped."""
    from fasttrak.projection.base import GradientFeaturizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False)).eval()
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    state = load_state(model, None)
    task = ImageClassification()
    featurizer = GradientFeaturizer(
        _PassThrough(15, group_rows), model, ["0.weight"], ft.gradients.GradientMethod()
    )
    batches = [(slice(i, min(i + 3, 10)), (x[i : i + 3], y[i : i + 3])) for i in range(0, 10, 3)]
    got = torch.cat([phi for _, phi, _ in featurizer.features(state, task, batches)])
    expected = torch.cat(HookGradients(model, task, ["0.weight"]).parts(state, (x, y)), 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class TiedModel(nn.Module):
    """Two Linear layers holding one weight (``second.weight`` is ``first.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def test_tied_weights_take_the_given_tensor_under_every_name_and_batches_share_it():
    """The engine prepares the substituted tensors once per state (functional_call's
    tie_weights work, done once): every alias of a tied weight gets the given tensor, the
    gradients match the loop on every batch, and a state that gives two different tensors
    for tied names is refused with the fix."""
    torch.manual_seed(0)
    model = TiedModel().eval()
    names = select_parameters(model, None)
    assert "second.weight" not in names  # one canonical name per tensor
    engine = HookGradients(model, ImageClassification(), names)
    state = load_state(model, None)
    x, y = make_data(6, d_in=4, seed=2)
    for rows in (slice(0, 4), slice(4, 6)):
        grads = torch.cat(engine.parts(state, (x[rows], y[rows])), dim=1)
        expected = loop_gradients(model, x[rows], y[rows], names, torch.float32)
        torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-5)
    other = TiedModel()
    both = {**state, "second.weight": other.first.weight.detach()}
    with pytest.raises(ft.errors.ConfigError, match="ties"):
        HookGradients(model, ImageClassification(), names).parts(both, (x, y))
