"""TRAK on a tiny T5 encoder-decoder (``Seq2Seq`` task), with padded sources and targets.

What it does: builds a tiny randomly initialised ``T5ForConditionalGeneration`` (no
download) and trains it briefly to "translate" procedurally generated sources: a KEY token
hidden among filler tokens, ``[filler... KEY filler... EOS]``, maps to that key's
two-token output ``[v1 v2 EOS]``. KEY 0 has two conflicting outputs in the training data
(A in about two thirds of its examples, B in the rest). The task ``Seq2Seq`` sums the log-odds
of the label tokens (f) and averages their 1 - p (Q); the decoder inputs are the labels
shifted right (start token 0, -100 -> pad 0, as T5 does). It prints each target's top
proponents and opponents and checks that the top proponent teaches the same mapping.

Run it::

    python examples/seq2seq.py            # 500 training pairs
    python examples/seq2seq.py --quick    # a few seconds (used by the tests)

# ---------------------------------------------------------------------------------------
# Pointing it at a real checkpoint and dataset (comments only; nothing here is executed):
#
#   from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
#   model = AutoModelForSeq2SeqLM.from_pretrained("google/mt5-small")  # or your fine-tune
#   tokenizer = AutoTokenizer.from_pretrained("google/mt5-small")
#   def collate(rows):   # rows: {"source": str, "target": str}
#       batch = tokenizer([r["source"] for r in rows], text_target=[r["target"] for r in rows],
#                         return_tensors="pt", padding=True, truncation=True)
#       batch["labels"][batch["labels"] == tokenizer.pad_token_id] = -100
#       return dict(batch)
#   loader = torch.utils.data.DataLoader(train_rows, batch_size=16, shuffle=False,
#                                        collate_fn=collate)
#   task = ft.tasks.Seq2Seq()   # T5/mT5 defaults; BART: Seq2Seq(decoder_start_token_id=2,
#                               #                                 pad_token_id=1)
#   trak = ft.TRAK(model, task=task, device="cuda", proj_dim=8192, store="runs/mt5",
#                  projector="factored", params=torch.nn.Linear)  # mT5: untied lm_head
#   trak.featurize(loader, checkpoints=["ckpt/model.safetensors"])
#   scores = trak.score(target_loader)
# ---------------------------------------------------------------------------------------
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from torch import nn

import fasttrak as ft

PAD, EOS = 0, 1  # T5: pad 0 (also the decoder start token), eos 1
NUM_KEYS = 6
KEY = 4  # key k is token KEY + k
VALUE = 16  # output tokens are VALUE..VALUE+15
FILLER = 40  # filler tokens are FILLER..VOCAB-1
VOCAB = 64


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=PAD,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    return transformers.T5ForConditionalGeneration(config)


def outputs_table(seed: int = 0) -> dict[int, list[tuple[int, ...]]]:
    """Each key's output(s): key 0 has two (A, B), the others one."""
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(16, generator=gen)[: 2 * (NUM_KEYS + 1)].view(-1, 2) + VALUE
    table = {k: [tuple(pairs[k].tolist())] for k in range(NUM_KEYS)}
    table[0].append(tuple(pairs[NUM_KEYS].tolist()))
    return table


def example(key: int, which: int, table: dict, gen: torch.Generator) -> dict:
    before, after = (int(torch.randint(0, 4, (), generator=gen)) for _ in range(2))
    source = [
        *torch.randint(FILLER, VOCAB, (before,), generator=gen).tolist(),
        KEY + key,
        *torch.randint(FILLER, VOCAB, (after,), generator=gen).tolist(),
        EOS,
    ]
    target = [*table[key][which], EOS]
    return {
        "source": torch.tensor(source),
        "target": torch.tensor(target),
        "key": key,
        "which": which,
    }


def make_examples(n: int, seed: int, table: dict) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        key = int(torch.randint(NUM_KEYS, (), generator=gen))
        which = 0 if key != 0 or float(torch.rand((), generator=gen)) < 2 / 3 else 1
        items.append(example(key, which, table, gen))
    return items


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad sources with PAD (+ attention_mask) and labels with -100 (not a target)."""
    width = max(len(item["source"]) for item in items)
    ids = torch.full((len(items), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    out_width = max(len(item["target"]) for item in items)
    labels = torch.full((len(items), out_width), -100, dtype=torch.long)
    for i, item in enumerate(items):
        ids[i, : len(item["source"])] = item["source"]
        mask[i, : len(item["source"])] = 1
        labels[i, : len(item["target"])] = item["target"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: nn.Module, items: list, steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(items, batch_size=32, shuffle=True, collate_fn=collate)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            opt.zero_grad()
            model(**batch).loss.backward()  # T5 shifts the labels itself, like the task
            opt.step()
            step += 1
            if step == steps:
                break
    model.eval()
    with torch.no_grad():
        loss = model(**collate(items)).loss.item()
    print(f"  label loss {loss:.3f} after {steps} steps")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--proj-dim", type=int, default=None, help="k (default 1024; quick 256)")
    parser.add_argument("--store", default=None, help="zarr store directory (default: memory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny model: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    num_train, steps = (150, 60) if args.quick else (500, 300)
    proj_dim = args.proj_dim or (256 if args.quick else 1024)
    start = time.perf_counter()

    table = outputs_table()
    train_items = make_examples(num_train, seed=0, table=table)
    gen = torch.Generator().manual_seed(1)
    to_score = [(0, 0), (0, 1)] + [(k, 0) for k in range(1, NUM_KEYS)]
    targets = [example(k, w, table, gen) for k, w in to_score[: 4 if args.quick else None]]
    print(f"training a tiny T5 on {num_train} source/target pairs")
    model = make_model()
    checkpoint = train(model, train_items, steps)

    # T5's relative position bias is computed once per batch (no batch dimension), so the
    # hook engine differentiates it by B vectorised backward passes (here ~3x the cost of
    # everything else at batch 64). It is a handful of parameters: leave it out.
    params = [name for name, _ in model.named_parameters() if "relative_attention_bias" not in name]
    trak = ft.TRAK(
        model,
        task=ft.tasks.Seq2Seq(),  # decoder_start_token_id=0, pad_token_id=0: T5's
        params=params,
        proj_dim=proj_dim,
        store=args.store,
        device=args.device,
        progress=False,
    )
    p = sum(trak.param_numels.values())
    total = sum(t.numel() for t in model.parameters())
    print(f"featurizing: p = {p} of {total} parameters -> k = {trak.k} ({trak.engine} engine)")
    loader = torch.utils.data.DataLoader(train_items, batch_size=32, collate_fn=collate)
    trak.featurize(loader, checkpoints=[checkpoint])
    scores = trak.score(torch.utils.data.DataLoader(targets, batch_size=8, collate_fn=collate))
    top = scores.topk(5)

    def mapping(item: dict) -> str:
        return f"key {item['key']}->{'AB'[item['which']]}"

    def show(i: int) -> str:
        return f"#{i}({mapping(train_items[i])})"

    print(f"\nscores: {scores.shape[0]} targets x {scores.shape[1]} training pairs")
    hits = 0
    for t, item in enumerate(targets):
        print(
            f"target {t} ({mapping(item)}): proponents "
            f"{', '.join(show(i) for i in top.proponents[t])} | opponents "
            f"{', '.join(show(i) for i in top.opponents[t])}"
        )
        hits += int(mapping(train_items[top.proponents[t, 0]]) == mapping(item))
    print(f"\ntop proponent teaches the target's mapping for {hits}/{len(targets)} targets")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
