"""LoRA adapters (peft) end to end for every Hugging Face task: only the adapters are
differentiated, featurize and score run, and the features are the adapters' exact gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fasttrak as ft

peft = pytest.importorskip("peft")
hf = pytest.importorskip("test_tasks_hf")  # tiny configs and batches shared with the task tests


def lora(model, targets):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    for name, param in model.named_parameters():  # non-zero B: adapters change the output
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def rows_of(batch, n):
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def check(trak, model, rows, targets):
    assert trak.params and all(".lora_" in name for name in trak.params)
    total = sum(p.numel() for p in model.parameters())
    lora_numel = sum(dict(model.named_parameters())[n].numel() for n in trak.params)
    assert lora_numel < total / 5  # the adapters are a small part of the model
    trak.featurize(rows)
    scores = np.asarray(trak.score(targets))
    assert scores.shape == (len(targets), len(rows)) and np.isfinite(scores).all()
    assert np.abs(scores).max() > 0


def test_text_classification_lora_features_are_exact_adapter_gradients():
    model = lora(hf.bert(), ["query", "value"])
    batch, seqs = hf.text_batch(lengths=(5, 3, 7, 4))
    rows = rows_of(batch, 4)
    task = ft.tasks.TextClassification()
    exact = ft.TRAK(model, task, projector="identity", params="lora", progress=False)
    exact.featurize(rows)
    features = torch.from_numpy(exact.store.model(0).features())
    params = dict(model.named_parameters())
    for i, seq in enumerate(seqs):
        alone = {"input_ids": seq[None], "labels": batch["labels"][i : i + 1]}
        grads = torch.autograd.grad(task.output(model, alone)[0], [params[n] for n in exact.params])
        want = torch.cat([g.reshape(-1) for g in grads])
        torch.testing.assert_close(features[i], want, atol=1e-5, rtol=1e-4)
    check(ft.TRAK(model, task, proj_dim=16, params="lora", progress=False), model, rows, rows[:2])


def test_language_modeling_lora():
    model = lora(hf.gpt2(), ["c_attn", "c_fc"])
    batch, _ = hf.lm_batch()
    rows = rows_of(batch, batch["input_ids"].shape[0])
    task = ft.tasks.LanguageModeling()
    check(ft.TRAK(model, task, proj_dim=16, params="lora", progress=False), model, rows, rows[:2])


def test_seq2seq_lora():
    model = lora(hf.t5(), ["q", "v"])
    batch, _, _ = hf.seq2seq_batch()
    rows = rows_of(batch, batch["input_ids"].shape[0])
    task = ft.tasks.Seq2Seq()
    check(ft.TRAK(model, task, proj_dim=16, params="lora", progress=False), model, rows, rows[:2])


def test_clip_lora_binds_negatives_per_checkpoint():
    model = lora(hf.hf_clip(), ["q_proj", "v_proj"])
    negatives, _ = hf.clip_batch([3, 5, 2, 4], seed=20)
    batch, _ = hf.clip_batch([4, 2, 5, 3, 6], seed=21)
    rows = rows_of(batch, 5)
    task = ft.tasks.CLIP(negatives)
    check(ft.TRAK(model, task, proj_dim=16, params="lora", progress=False), model, rows, rows[:2])
