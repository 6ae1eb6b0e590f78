"""Hugging Face tasks: text classification, causal LM, seq2seq, CLIP on tiny random models.

Each task's f and Q are checked against an independent float64 computation (token by
token, example by example, unpadded), padded batches against examples alone, the output
under torch.func.vmap (batches of one, as the vmap engine calls it) against the batched
output, and the error cases.

About vmap in transformers 5.x (5.24 here): models build their attention masks in
``transformers.masking_utils``, which reads the mask's values (``padding_mask.all()``) to
decide whether it may skip building it. Under vmap that is data-dependent control flow and
raises, with a 2-D ``attention_mask`` in the inputs:

- BERT, T5 (bidirectional masks): fail with sdpa (the default) AND with eager attention;
- GPT-2, CLIP (causal text masks): fail with sdpa, work with eager attention.

Without an attention mask every model works. The ``materialized_masks`` fixture makes
masking_utils always build the mask (``_ignore_*_mask_sdpa`` -> False, the same attention
values); with it every model above runs under vmap with sdpa and eager alike.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

transformers = pytest.importorskip("transformers")
masking_utils = pytest.importorskip("transformers.masking_utils")

import fasttrak as ft  # noqa: E402
import fasttrak.trak as fasttrak_trak  # noqa: E402
from fasttrak.gradients import VmapGradients  # noqa: E402
from fasttrak.tasks import (  # noqa: E402
    CLIP,
    LanguageModeling,
    Seq2Seq,
    TextClassification,
    labels_after_prompt,
)

# On CPU, sdpa under vmap falls back to a per-example loop and says so; that is expected.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

VOCAB = 50


# ---------------------------------------------------------------------- models and data
def bert(attn: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        attn_implementation=attn,
    )
    return transformers.BertForSequenceClassification(config).eval()


def gpt2(attn: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=attn,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def t5(attn: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        attn_implementation=attn,
    )
    return transformers.T5ForConditionalGeneration(config).eval()


CLIP_BOS, CLIP_EOS = 48, 49


def hf_clip(attn: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            bos_token_id=CLIP_BOS,
            eos_token_id=CLIP_EOS,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
        ),
        projection_dim=8,
        attn_implementation=attn,
    )
    return transformers.CLIPModel(config).eval()


class TinyOpenCLIP(nn.Module):
    """open_clip's interface: forward(image, text) -> (image_features, text_features,
    logit_scale.exp()), features normalised."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.visual = nn.Linear(12, 8)
        self.embed = nn.Embedding(VOCAB, 8)
        self.proj = nn.Linear(8, 8)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image_features = nn.functional.normalize(self.visual(image.flatten(1)), dim=-1)
        text_features = nn.functional.normalize(self.proj(self.embed(text).mean(1)), dim=-1)
        return image_features, text_features, self.logit_scale.exp()


def sequences(lengths: list[int], seed: int = 0, low: int = 3, high: int = 40) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=gen) for n in lengths]


def pad(seqs: list[Tensor], value: int = 0, left: bool = False) -> tuple[Tensor, Tensor]:
    """(B, T) ids padded with ``value`` and the attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, where] = s
        mask[i, where] = 1
    return ids, mask


def forward_of(model: nn.Module):
    def forward(*args, **kwargs):
        return model(*args, **kwargs)

    return forward


def vmapped(task, model: nn.Module, batch) -> Tensor:
    """task.output on batches of one under torch.func.vmap, as the vmap engine calls it."""
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}

    def one(example):
        single = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)

        def forward(*args, **kwargs):
            return functional_call(model, state, args, kwargs)

        return task.output(forward, single)[0]

    with torch.no_grad():
        return vmap(one)(batch)


def log_odds_and_q(logits: Tensor, target: int) -> tuple[float, float]:
    """Independent float64 oracle for one distribution: log(p / (1 - p)) and 1 - p."""
    row = [float(v) for v in logits.double()]
    top = max(row)
    total = sum(math.exp(v - top) for v in row)
    others = sum(math.exp(v - top) for j, v in enumerate(row) if j != target)
    p = math.exp(row[target] - top) / total
    return (row[target] - top) - math.log(others), 1.0 - p


@pytest.fixture
def materialized_masks(monkeypatch):
    """Make transformers always build attention masks: vmap cannot run its skip checks."""
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", lambda *a, **k: False)
    monkeypatch.setattr(masking_utils, "_ignore_bidirectional_mask_sdpa", lambda *a, **k: False)


# ---------------------------------------------------------------------- text classification
def text_batch(lengths=(5, 3, 7, 4), seed: int = 0) -> tuple[dict, list[Tensor]]:
    seqs = sequences(list(lengths), seed)
    ids, mask = pad(seqs)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, 3, (len(seqs),), generator=gen)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": labels,
    }
    return batch, seqs


def test_text_classification_matches_oracle_with_padding():
    model, task = bert(), TextClassification()
    batch, seqs = text_batch()
    task.check_batch(batch)
    with torch.no_grad():
        f = task.output(model, batch)
        q = task.out_to_loss(model, batch)
        for i, seq in enumerate(seqs):  # each example alone, unpadded, no mask
            logits = model(input_ids=seq[None]).logits[0]
            want_f, want_q = log_odds_and_q(logits, int(batch["labels"][i]))
            assert f[i].item() == pytest.approx(want_f, abs=1e-5)
            assert q[i].item() == pytest.approx(want_q, abs=1e-6)
    assert f.dtype == q.dtype == torch.float32 and f.shape == q.shape == (4,)
    assert task.batch_size(batch) == 4


def test_text_classification_under_vmap(materialized_masks):
    batch, _ = text_batch()
    for attn in ("sdpa", "eager"):
        model, task = bert(attn), TextClassification()
        with torch.no_grad():
            want = task.output(model, batch)
        torch.testing.assert_close(vmapped(task, model, batch), want, atol=1e-5, rtol=1e-5)


def test_text_classification_accepts_tensor_and_tuple_outputs():
    model, task = bert(), TextClassification(label_key="label")
    batch, _ = text_batch()
    batch["label"] = batch.pop("labels")
    with torch.no_grad():
        want = task.output(model, batch)

        def as_tensor(**inputs):
            return model(**inputs).logits

        def as_tuple(**inputs):
            return model(**inputs, return_dict=False)

        torch.testing.assert_close(task.output(as_tensor, batch), want)
        torch.testing.assert_close(task.output(as_tuple, batch), want)


def test_text_classification_errors():
    model, task = bert(), TextClassification()
    batch, _ = text_batch()
    with pytest.raises(TypeError, match="dict like a tokenizer"):
        task.check_batch((batch["input_ids"], batch["labels"]))
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(KeyError, match="no 'labels'"):
        task.check_batch(no_labels)
    with pytest.raises(KeyError, match="label_key='label'"):
        task.check_batch({**no_labels, "label": batch["labels"]})
    with pytest.raises(TypeError, match=r"\.long\(\)"):
        task.check_batch({**batch, "labels": batch["labels"].float()})
    with pytest.raises(ValueError, match="one-hot"):
        task.check_batch({**batch, "labels": nn.functional.one_hot(batch["labels"], 3)})
    with pytest.raises(ValueError, match="dimension 0"):
        task.check_batch({**batch, "labels": batch["labels"][:2]})
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[0, 3\)"):
        task.out_to_loss(model, {**batch, "labels": batch["labels"] + 3})
    with torch.no_grad(), pytest.raises(TypeError, match="cannot find logits"):
        task.output(lambda **inputs: {"hidden": inputs["input_ids"]}, batch)


# ---------------------------------------------------------------------- causal LM
def lm_batch(left: bool = False, prompt: int = 2) -> tuple[dict, list[Tensor]]:
    seqs = sequences([6, 4, 8, 5], seed=3)
    ids, mask = pad(seqs, left=left)
    batch = {"input_ids": ids, "attention_mask": mask}
    batch["labels"] = labels_after_prompt(ids, prompt, mask)
    if left:  # GPT-2 numbers positions 0..T-1 whatever the mask: give the real positions
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return batch, seqs


def lm_oracle(model: nn.Module, seq: Tensor, first_target: int) -> tuple[float, float]:
    """Σ of token log-odds and mean of 1 - p over tokens first_target.. of seq (alone)."""
    logits = model(input_ids=seq[None]).logits[0]
    odds, qs = [], []
    for t in range(first_target, len(seq)):  # the logits at t - 1 predict token t
        lo, q = log_odds_and_q(logits[t - 1], int(seq[t]))
        odds.append(lo)
        qs.append(q)
    return sum(odds), sum(qs) / len(qs)


@pytest.mark.parametrize("left", [False, True])
def test_language_modeling_matches_oracle_with_padding(left):
    model, task = gpt2(), LanguageModeling()
    batch, seqs = lm_batch(left=left, prompt=2)
    task.check_batch(batch)
    with torch.no_grad():
        f, q = task.output(model, batch), task.out_to_loss(model, batch)
        for i, seq in enumerate(seqs):
            want_f, want_q = lm_oracle(model, seq, first_target=2)
            assert f[i].item() == pytest.approx(want_f, abs=1e-4)
            assert q[i].item() == pytest.approx(want_q, abs=1e-6)
    assert f.dtype == torch.float32 and ((q >= 0) & (q <= 1)).all()


def test_language_modeling_without_labels_targets_every_real_token():
    model = gpt2()
    for left in (False, True):
        batch, seqs = lm_batch(left=left)
        del batch["labels"]
        with torch.no_grad():
            f = LanguageModeling().output(model, batch)
            every = LanguageModeling(target="all_tokens").output(
                model, {**batch, "labels": torch.full_like(batch["input_ids"], -100)}
            )
            for i, seq in enumerate(seqs):
                assert f[i].item() == pytest.approx(lm_oracle(model, seq, 1)[0], abs=1e-4)
        torch.testing.assert_close(every, f)


def test_labels_after_prompt():
    ids = torch.tensor([[5, 6, 7, 8, 0], [0, 0, 5, 6, 7]])
    mask = (ids != 0).long()
    want = torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, -100, 6, 7]])
    one = torch.tensor([[-100, 6, 7, 8, -100], [-100, -100, -100, 6, 7]])
    assert torch.equal(labels_after_prompt(ids, 1, mask), one)
    assert torch.equal(labels_after_prompt(ids, torch.tensor([2, 1]), mask), want)
    assert torch.equal(labels_after_prompt(ids[:1, :4], 3), torch.tensor([[-100, -100, -100, 8]]))


def test_language_modeling_under_vmap(materialized_masks):
    for attn in ("sdpa", "eager"):
        model, task = gpt2(attn), LanguageModeling()
        for left in (False, True):
            batch, _ = lm_batch(left=left)
            with torch.no_grad():
                want = task.output(model, batch)
            torch.testing.assert_close(vmapped(task, model, batch), want, atol=1e-5, rtol=1e-5)


def test_language_modeling_eager_gpt2_needs_no_mask_patch():
    model, task = gpt2("eager"), LanguageModeling()
    batch, _ = lm_batch()
    with torch.no_grad():
        want = task.output(model, batch)
    torch.testing.assert_close(vmapped(task, model, batch), want, atol=1e-5, rtol=1e-5)


def test_language_modeling_per_example_gradients_with_padding():
    """The vmap engine's gradients of a padded batch equal autograd on each example alone."""
    model, task = gpt2("eager"), LanguageModeling()
    batch, seqs = lm_batch()
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"]
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = {k: v.detach() for k, v in state.items()}
    got = torch.cat(VmapGradients(model, task, names).parts(state, batch), dim=1)
    params = dict(model.named_parameters())
    for i, seq in enumerate(seqs):
        alone = {"input_ids": seq[None], "labels": labels_after_prompt(seq[None], 2)}
        grads = torch.autograd.grad(task.output(model, alone)[0], [params[n] for n in names])
        want = torch.cat([g.reshape(-1) for g in grads])
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-4)


def test_language_modeling_errors():
    model, task = gpt2(), LanguageModeling()
    batch, _ = lm_batch()
    with pytest.raises(TypeError, match="dict like a tokenizer"):
        task.check_batch((batch["input_ids"], batch["labels"]))
    with pytest.raises(KeyError, match="input_ids"):
        task.check_batch({"labels": batch["labels"]})
    empty = batch["labels"].clone()
    empty[2] = -100
    empty[0, :1] = 7  # a label on the first token is never a target: nothing predicts it
    empty[0, 1:] = -100
    with pytest.raises(ValueError, match=r"example\(s\) \[0, 2\].*no target token"):
        task.check_batch({**batch, "labels": empty})
    with pytest.raises(ValueError, match="shape of input_ids"):
        task.check_batch({**batch, "labels": batch["labels"][:, :-1]})
    with pytest.raises(TypeError, match=r"\.long\(\)"):
        task.check_batch({**batch, "labels": batch["labels"].float()})
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[0, 50\)"):
        task.out_to_loss(model, {**batch, "labels": batch["labels"].clamp(min=-3) + 60})
    with pytest.raises(ValueError, match="target must be"):
        LanguageModeling(target="prompt")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- seq2seq
def seq2seq_batch() -> tuple[dict, list[Tensor], list[Tensor]]:
    sources = sequences([5, 3, 6], seed=5)
    targets = sequences([3, 4, 2], seed=6)
    ids, mask = pad(sources)
    labels, _ = pad(targets, value=-100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, sources, targets


def test_seq2seq_matches_oracle_with_padding():
    model, task = t5(), Seq2Seq()
    batch, sources, targets = seq2seq_batch()
    task.check_batch(batch)
    with torch.no_grad():
        f, q = task.output(model, batch), task.out_to_loss(model, batch)
        for i, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
            decoder = torch.cat([torch.tensor([0]), tgt[:-1]])  # start token, shifted labels
            logits = model(input_ids=src[None], decoder_input_ids=decoder[None]).logits[0]
            pairs = [log_odds_and_q(logits[t], int(tgt[t])) for t in range(len(tgt))]
            assert f[i].item() == pytest.approx(sum(p[0] for p in pairs), abs=1e-4)
            assert q[i].item() == pytest.approx(sum(p[1] for p in pairs) / len(pairs), abs=1e-6)
        # decoder_input_ids given in the batch are used as they are
        given = dict(
            batch,
            decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
        )
        torch.testing.assert_close(task.output(model, given), f)


def test_seq2seq_under_vmap(materialized_masks):
    batch, _, _ = seq2seq_batch()
    for attn in ("sdpa", "eager"):
        model, task = t5(attn), Seq2Seq()
        with torch.no_grad():
            want = task.output(model, batch)
        torch.testing.assert_close(vmapped(task, model, batch), want, atol=1e-5, rtol=1e-5)


def test_seq2seq_errors():
    task = Seq2Seq()
    batch, _, _ = seq2seq_batch()
    labels = batch["labels"].clone()
    labels[1] = -100
    with pytest.raises(ValueError, match=r"example\(s\) \[1\].*no target token"):
        task.check_batch({**batch, "labels": labels})
    with pytest.raises(KeyError, match="no 'labels'"):
        task.check_batch({"input_ids": batch["input_ids"]})
    with pytest.raises(TypeError, match="dict like a tokenizer"):
        task.check_batch([batch["input_ids"], batch["labels"]])
    with pytest.raises(ValueError, match="same shape"):
        task.check_batch({**batch, "decoder_input_ids": batch["labels"][:, :1]})


# ---------------------------------------------------------------------- CLIP
def clip_texts(lengths: list[int], seed: int) -> list[Tensor]:
    return [
        torch.cat([torch.tensor([CLIP_BOS]), s, torch.tensor([CLIP_EOS])])
        for s in sequences(lengths, seed, low=1, high=40)
    ]


def clip_batch(lengths: list[int], seed: int) -> tuple[dict, list[Tensor]]:
    texts = clip_texts(lengths, seed)
    ids, mask = pad(texts)
    gen = torch.Generator().manual_seed(seed + 100)
    pixels = torch.randn(len(texts), 3, 8, 8, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}, texts


def clip_oracle(model, images, texts, neg_images, neg_texts, scale):
    """f and Q from each pair and each negative embedded alone (float64, Python loops)."""

    def embed(pixels, text):
        out = model(input_ids=text[None], pixel_values=pixels[None])
        return out.image_embeds[0].double(), out.text_embeds[0].double()

    negs = [embed(p, t) for p, t in zip(neg_images, neg_texts, strict=True)]
    fs, qs = [], []
    for pixels, text in zip(images, texts, strict=True):
        u, v = embed(pixels, text)
        s = float(u @ v)
        img_terms = [math.exp(scale * (float(u @ vn) - s)) for _, vn in negs]
        txt_terms = [math.exp(scale * (float(v @ un) - s)) for un, _ in negs]
        fs.append(-math.log(sum(img_terms)) - math.log(sum(txt_terms)))
        qs.append((1 - 1 / (1 + sum(img_terms)) + 1 - 1 / (1 + sum(txt_terms))) / 2)
    return fs, qs


def test_clip_hf_matches_oracle_with_padding():
    model = hf_clip()
    negatives, neg_texts = clip_batch([3, 5, 2, 4, 6], seed=10)
    batch, texts = clip_batch([4, 2, 5], seed=11)
    task = CLIP(negatives, negatives_batch_size=2).bind(model)  # 3 chunks of negatives
    assert task.bound and task._bound.scale == pytest.approx(model.logit_scale.exp().item())
    task.check_batch(batch)
    with torch.no_grad():
        f, q = task.output(model, batch), task.out_to_loss(model, batch)
        scale = model.logit_scale.exp().item()
        want_f, want_q = clip_oracle(
            model, batch["pixel_values"], texts, negatives["pixel_values"], neg_texts, scale
        )
    torch.testing.assert_close(f, torch.tensor(want_f, dtype=torch.float32), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q, torch.tensor(want_q, dtype=torch.float32), atol=1e-6, rtol=1e-5)
    assert task.batch_size(batch) == 3 and ((q >= 0) & (q <= 1)).all()


def test_clip_open_clip_style_and_fixed_scale():
    model = TinyOpenCLIP()
    gen = torch.Generator().manual_seed(0)
    images, texts = torch.randn(6, 3, 2, 2, generator=gen), torch.randint(0, 50, (6, 4))
    negatives = (torch.randn(5, 3, 2, 2, generator=gen), torch.randint(0, 50, (5, 4)))
    for fixed in (None, 1.0):
        task = CLIP(negatives, logit_scale=fixed).bind(model)
        scale = 10.0 if fixed is None else fixed
        with torch.no_grad():
            f, q = task.output(model, (images, texts)), task.out_to_loss(model, (images, texts))
            u, v, _ = model(images, texts)
            un, vn, _ = model(*negatives)
            u, v, un, vn = u.double(), v.double(), un.double(), vn.double()
        s = (u * v).sum(1, keepdim=True)
        lse_img = torch.logsumexp(scale * (u @ vn.T - s), 1)
        lse_txt = torch.logsumexp(scale * (v @ un.T - s), 1)
        torch.testing.assert_close(f.double(), -lse_img - lse_txt, atol=1e-4, rtol=1e-4)
        want_q = (torch.sigmoid(lse_img) + torch.sigmoid(lse_txt)) / 2
        torch.testing.assert_close(q.double(), want_q, atol=1e-6, rtol=1e-5)


def test_clip_leaves_out_the_example_itself():
    model = TinyOpenCLIP()
    gen = torch.Generator().manual_seed(1)
    images, texts = torch.randn(4, 3, 2, 2, generator=gen), torch.randint(0, 50, (4, 4))
    # Negatives: example 0 itself, plus two other pairs.
    others = (torch.randn(2, 3, 2, 2, generator=gen), torch.randint(0, 50, (2, 4)))
    negatives = (torch.cat([images[:1], others[0]]), torch.cat([texts[:1], others[1]]))
    with torch.no_grad():
        got = CLIP(negatives).bind(model).output(model, (images, texts))
        want = CLIP(others).bind(model).output(model, (images, texts))
        kept = CLIP(negatives, duplicate_tol=0).bind(model).output(model, (images, texts))
    # Example 0 sees only the two other pairs; the others also see example 0.
    torch.testing.assert_close(got[0], want[0])
    assert (got[1:] < want[1:]).all()
    assert kept[0] < got[0]  # kept, the pair itself caps p at 1/2: f <= 0
    # an example whose only negative is itself has no negative left
    alone = CLIP((images[:1], texts[:1])).bind(model)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[0\].*no negative left"):
        alone.out_to_loss(model, (images[:2], texts[:2]))


def test_clip_under_vmap(materialized_masks):
    negatives, _ = clip_batch([3, 5, 2], seed=10)
    batch, _ = clip_batch([4, 2, 5], seed=11)
    for attn in ("sdpa", "eager"):
        model = hf_clip(attn)
        task = CLIP(negatives).bind(model)
        with torch.no_grad():
            want = task.output(model, batch)
        torch.testing.assert_close(vmapped(task, model, batch), want, atol=1e-5, rtol=1e-5)
    model = TinyOpenCLIP()
    pair = (torch.randn(3, 3, 2, 2), torch.randint(0, 50, (3, 4)))
    task = CLIP((torch.randn(4, 3, 2, 2), torch.randint(0, 50, (4, 4)))).bind(model)
    with torch.no_grad():
        want = task.output(model, pair)
    torch.testing.assert_close(vmapped(task, model, pair), want, atol=1e-5, rtol=1e-5)


def test_clip_negatives_from_a_dataset_and_spec():
    model = TinyOpenCLIP()
    images, texts = torch.randn(5, 3, 2, 2), torch.randint(0, 50, (5, 4))
    as_batch = CLIP((images, texts))
    as_items = CLIP([(images[i], texts[i]) for i in range(5)], negatives_batch_size=2)
    assert as_batch.spec() == as_items.spec()  # the same pairs, however they are given
    assert as_batch.spec()["num_negatives"] == 5
    assert CLIP((images, texts + 1)).spec() != as_batch.spec()
    bound = as_items.bind(model)
    assert bound.spec() == as_items.spec() and not as_items.bound  # bind makes a new task
    pair = (torch.randn(2, 3, 2, 2), torch.randint(0, 50, (2, 4)))
    with torch.no_grad():
        torch.testing.assert_close(
            bound.output(model, pair), as_batch.bind(model).output(model, pair)
        )


def test_clip_errors():
    model = TinyOpenCLIP()
    negatives = (torch.randn(3, 3, 2, 2), torch.randint(0, 50, (3, 4)))
    pair = (torch.randn(2, 3, 2, 2), torch.randint(0, 50, (2, 4)))
    with torch.no_grad(), pytest.raises(RuntimeError, match="bind it first"):
        CLIP(negatives).output(model, pair)
    with pytest.raises(ValueError, match="negatives="):
        CLIP(None)
    with pytest.raises(ValueError, match="no pairs"):
        CLIP((torch.randn(0, 3, 2, 2), torch.randint(0, 50, (0, 4)))).bind(model)
    with pytest.raises(TypeError, match="pair \\(images, texts\\)"):
        CLIP(negatives).check_batch((pair[0],))
    with pytest.raises(ValueError, match="dimension 0"):
        CLIP(negatives).check_batch((pair[0], pair[1][:1]))
    bound = CLIP(negatives).bind(model)
    with pytest.raises(TypeError, match="negatives were a pair"):
        bound.check_batch({"input_ids": pair[1], "pixel_values": pair[0]})
    with pytest.raises(TypeError, match="SigLIP"):
        CLIP(negatives).bind(lambda i, t: (*model(i, t), torch.zeros(())))
    with pytest.raises(ValueError, match="logit_scale must be positive"):
        CLIP(negatives, logit_scale=0.0)
    batch, _ = clip_batch([3, 4], seed=0)
    with pytest.raises(KeyError, match="pixel_values"):
        CLIP(batch).check_batch({"input_ids": batch["input_ids"]})
    hf_bound = CLIP(batch).bind(hf_clip())
    with pytest.raises(TypeError, match="negatives were a dict"):
        hf_bound.check_batch(pair)


# ---------------------------------------------------------------------- end to end
# Every gradient engine the runner offers (only the vmap engine before ``engine=`` exists).
ENGINES = (
    [{"engine": "vmap"}, {"engine": "hooks"}]
    if "engine" in inspect.signature(ft.TRAK).parameters
    else [{}]
)


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.get("engine", "default"))
def test_trak_text_classification_end_to_end(materialized_masks, engine):
    """ft.TRAK on a BERT classifier; identity projection: features are exact gradients."""
    model = bert()
    batch, seqs = text_batch(lengths=(5, 3, 7, 4, 6, 2))
    rows = [{k: v[i] for k, v in batch.items()} for i in range(6)]  # fixed padded length
    names = ["bert.encoder.layer.0.output.dense.weight", "classifier.weight"]
    task = TextClassification()
    exact = ft.TRAK(
        model, task, projector="identity", params=names, batch_size=4, progress=False, **engine
    )
    exact.featurize(rows)
    features = torch.from_numpy(exact.store.model(0).features())
    params = dict(model.named_parameters())
    for i, seq in enumerate(seqs):
        alone = {"input_ids": seq[None], "labels": batch["labels"][i : i + 1]}
        grads = torch.autograd.grad(task.output(model, alone)[0], [params[n] for n in names])
        want = torch.cat([g.reshape(-1) for g in grads])
        torch.testing.assert_close(features[i], want, atol=1e-5, rtol=1e-4)
    trak = ft.TRAK(model, task, proj_dim=32, projector="dense", progress=False, **engine)
    trak.featurize(rows)
    scores = np.asarray(trak.score(rows[:2]))
    assert scores.shape == (2, 6) and np.isfinite(scores).all()


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.get("engine", "default"))
def test_trak_language_modeling_end_to_end_with_collate(materialized_masks, engine):
    """Mixed lengths: a DataLoader whose collate_fn pads each batch to its own length."""
    model = gpt2()
    seqs = sequences([6, 4, 8, 5, 3], seed=7)

    def collate(items):
        ids, mask = pad(items)
        labels = labels_after_prompt(ids, 1, mask)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    loader = torch.utils.data.DataLoader(seqs, batch_size=2, shuffle=False, collate_fn=collate)
    task = LanguageModeling()
    trak = ft.TRAK(model, task, proj_dim=32, projector="dense", progress=False, **engine)
    trak.featurize(loader)
    scores = np.asarray(trak.score(loader))
    assert scores.shape == (5, 5) and np.isfinite(scores).all()


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.get("engine", "default"))
def test_trak_seq2seq_end_to_end(materialized_masks, engine):
    model = t5()
    batch, _, _ = seq2seq_batch()
    rows = [{k: v[i] for k, v in batch.items()} for i in range(3)]
    trak = ft.TRAK(model, Seq2Seq(), proj_dim=32, projector="dense", progress=False, **engine)
    trak.featurize(rows)
    scores = np.asarray(trak.score(rows[:2]))
    assert scores.shape == (2, 3) and np.isfinite(scores).all()


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.get("engine", "default"))
def test_trak_clip_end_to_end_bound_by_hand(materialized_masks, engine):
    """A task bound to the model's current weights runs on any runner."""
    model = hf_clip()
    negatives, _ = clip_batch([3, 5, 2, 4], seed=20)
    batch, _ = clip_batch([4, 2, 5, 3, 6], seed=21)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(5)]
    task = CLIP(negatives).bind(model)
    trak = ft.TRAK(model, task, proj_dim=32, projector="dense", progress=False, **engine)
    trak.featurize(rows)
    scores = np.asarray(trak.score(rows[:2]))
    assert scores.shape == (2, 5) and np.isfinite(scores).all()


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.get("engine", "default"))
def test_trak_clip_binds_per_checkpoint(materialized_masks, engine):
    """The runner binds an unbound CLIP task to each checkpoint's weights."""
    if "bind_task" not in vars(fasttrak_trak):
        pytest.skip("this runner does not bind tasks per checkpoint yet")
    model = TinyOpenCLIP()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    second = {k: v + 0.1 * torch.randn_like(v) for k, v in first.items()}
    gen = torch.Generator().manual_seed(3)
    images, texts = torch.randn(6, 3, 2, 2, generator=gen), torch.randint(0, 50, (6, 4))
    negatives = (torch.randn(4, 3, 2, 2, generator=gen), torch.randint(0, 50, (4, 4)))
    task = CLIP(negatives)
    trak = ft.TRAK(model, task, projector="identity", progress=False, **engine)
    trak.featurize((images, texts), checkpoints=[first, second])
    for m, state in enumerate((first, second)):
        model.load_state_dict(state)
        bound = task.bind(model)
        with torch.no_grad():
            q = bound.out_to_loss(model, (images, texts))
        stored = torch.from_numpy(trak.store.model(m).q())
        torch.testing.assert_close(stored, q)
