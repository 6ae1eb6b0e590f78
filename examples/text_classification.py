"""TRAK on a tiny BERT sequence classifier, with padded batches of mixed lengths.

What it does: builds a tiny randomly initialised ``BertForSequenceClassification`` (no
download), trains it briefly on procedurally generated token sequences whose class is
given by a *marker token* hidden among random filler tokens, featurizes the training set
with ``ft.TRAK`` (task ``TextClassification``: f is the margin of the sequence logits,
Q = 1 - p_y), scores a few new sequences and prints their top proponents and opponents,
then how often the top proponent carries the target's marker token.

Sequences have 4 to 14 tokens; a collate function pads each batch to its longest sequence
and builds the ``attention_mask``. The default hook engine differentiates such padded
batches in one forward and backward (the vmap engine fails on them in transformers 5.x;
see docs/modalities/README.md).

Run it::

    python examples/text_classification.py            # 600 training sequences
    python examples/text_classification.py --quick    # a few seconds (used by the tests)

# ---------------------------------------------------------------------------------------
# Pointing it at a real checkpoint and dataset (comments only; nothing here is executed):
#
#   from transformers import AutoModelForSequenceClassification, AutoTokenizer
#   from datasets import load_dataset
#   model = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased",
#                                                              num_labels=2)
#   # ... fine-tune it, then save one or more checkpoints (state dicts / .safetensors) ...
#   tokenizer = AutoTokenizer.from_pretrained("bert-base-uncased")
#   raw = load_dataset("glue", "sst2", split="train")
#   items = [dict(tokenizer(r["sentence"], truncation=True, max_length=128),
#                 labels=r["label"]) for r in raw]
#   collate = transformers.DataCollatorWithPadding(tokenizer)   # pads + attention_mask
#   train = torch.utils.data.DataLoader(items, batch_size=64, shuffle=False,
#                                       collate_fn=collate)
#   trak = ft.TRAK(model, task=ft.tasks.TextClassification(),   # label_key="label" if so
#                  proj_dim=4096, store="runs/sst2", device="cuda",
#                  params=["bert.encoder.*", "classifier.*"])   # optional: skip embeddings
#   trak.featurize(train, checkpoints=["ckpt/model.safetensors"])
#   scores = trak.score(validation_loader)
# ---------------------------------------------------------------------------------------
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from torch import nn

import fasttrak as ft

PAD, CLS, SEP = 0, 1, 2
NUM_CLASSES = 3
MARKER = 3  # class c is marked by token MARKER + c
FILLER = 10  # filler tokens are FILLER..VOCAB-1
VOCAB = 64


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=NUM_CLASSES,
        pad_token_id=PAD,
    )
    return transformers.BertForSequenceClassification(config)


def make_examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """n unpadded examples: [CLS] fillers with one marker token [SEP], label = its class."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        label = int(torch.randint(NUM_CLASSES, (), generator=gen))
        length = int(torch.randint(2, 13, (), generator=gen))
        body = torch.randint(FILLER, VOCAB, (length,), generator=gen)
        body[int(torch.randint(length, (), generator=gen))] = MARKER + label
        ids = torch.cat([torch.tensor([CLS]), body, torch.tensor([SEP])])
        items.append({"input_ids": ids, "labels": torch.tensor(label)})
    return items


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch, as a tokenizer's collator would."""
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, item in enumerate(items):
        ids[i, : len(item["input_ids"])] = item["input_ids"]
        mask[i, : len(item["input_ids"])] = 1
    labels = torch.stack([item["labels"] for item in items])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: nn.Module, items: list, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(items, batch_size=32, shuffle=True, collate_fn=collate)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            opt.zero_grad()
            model(**batch).loss.backward()  # with labels in the batch the model's own loss
            opt.step()
            step += 1
            if step == steps:
                break
    model.eval()
    with torch.no_grad():
        batch = collate(items)
        accuracy = (model(**batch).logits.argmax(1) == batch["labels"]).float().mean().item()
    print(f"  train accuracy {accuracy:.3f}")
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--proj-dim", type=int, default=None, help="k (default 1024; quick 256)")
    parser.add_argument("--store", default=None, help="zarr store directory (default: memory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine", default="auto", choices=["auto", "hooks", "vmap"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny model: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    num_train, steps, num_targets = (200, 60, 6) if args.quick else (600, 300, 12)
    proj_dim = args.proj_dim or (256 if args.quick else 1024)
    start = time.perf_counter()

    train_items = make_examples(num_train, seed=0)
    targets = make_examples(num_targets, seed=1)
    print(f"training a tiny BERT classifier on {num_train} sequences")
    model = make_model()
    checkpoint = train(model, train_items, steps)

    # Featurize through a non-shuffling DataLoader: its collate function (padding) is used.
    loader = torch.utils.data.DataLoader(
        train_items, batch_size=32, shuffle=False, collate_fn=collate
    )
    trak = ft.TRAK(
        model,
        task=ft.tasks.TextClassification(),  # labels under "labels"; label_key= otherwise
        proj_dim=proj_dim,
        store=args.store,
        device=args.device,
        engine=args.engine,
        progress=False,
    )
    p = sum(trak.param_numels.values())
    print(f"featurizing: p = {p} parameters -> k = {trak.k} ({trak.engine} engine)")
    trak.featurize(loader, checkpoints=[checkpoint])
    target_loader = torch.utils.data.DataLoader(targets, batch_size=32, collate_fn=collate)
    scores = trak.score(target_loader)
    top = scores.topk(5)

    def show(i: int) -> str:
        ids = train_items[i]["input_ids"].tolist()
        return f"#{i}(y={int(train_items[i]['labels'])},{len(ids)} tok)"

    print(f"\nscores: {scores.shape[0]} targets x {scores.shape[1]} training sequences")
    hits = 0
    for t, item in enumerate(targets):
        marker = MARKER + int(item["labels"])
        print(
            f"target {t} (y={int(item['labels'])}, {len(item['input_ids'])} tokens): "
            f"proponents {', '.join(show(i) for i in top.proponents[t])} | "
            f"opponents {', '.join(show(i) for i in top.opponents[t])}"
        )
        hits += int(marker in train_items[top.proponents[t, 0]]["input_ids"].tolist())
    print(f"\ntop proponent carries the target's marker token for {hits}/{num_targets} targets")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
