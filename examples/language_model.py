"""TRAK on a tiny GPT-2 causal language model, attributing a prompt's completion.

What it does: builds a tiny randomly initialised ``GPT2LMHeadModel`` (no download) and
fine-tunes it briefly on procedurally generated "facts": ``[BOS] filler... KEY -> v1 v2
[EOS]``, where each KEY token has its own two-token completion, except that KEY 0 has two
conflicting completions in the training data (A in about two thirds of its examples, B in
the rest). Only the completion is trained and attributed: the labels come from
``ft.tasks.labels_after_prompt`` (prompt tokens and padding are -100), and the task
``LanguageModeling`` sums the completion tokens' log-odds (f) and averages their
1 - p (Q). It prints each target's top proponents and opponents, and checks that the top
proponent teaches the same fact (same key, same completion); KEY 0's examples of the
other completion often appear among the top opponents.

Run it::

    python examples/language_model.py                         # all parameters, SRHT
    python examples/language_model.py --projector factored    # factored, Conv1D layers only
    python examples/language_model.py --quick                 # a few seconds (the tests)

``--projector factored`` projects GPT-2's ``Conv1D`` layers (attention and MLP) with the
per-layer Kronecker projection, without forming per-example gradients (docs/factored.md).
It selects ``params=Conv1D`` because the factored projector refuses tied weights (GPT-2's
``wte`` is also its ``lm_head``) and does not cover the LayerNorms (the position embedding
``wpe`` it could cover; the example keeps to the Conv1D layers).

# ---------------------------------------------------------------------------------------
# Pointing it at a real checkpoint and dataset (comments only; nothing here is executed):
#
#   from transformers import AutoModelForCausalLM, AutoTokenizer
#   model = AutoModelForCausalLM.from_pretrained("gpt2")       # or your fine-tuned model
#   tokenizer = AutoTokenizer.from_pretrained("gpt2")
#   tokenizer.pad_token = tokenizer.eos_token; tokenizer.padding_side = "right"
#   def collate(rows):   # rows: {"prompt": str, "completion": str}
#       prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
#       batch = tokenizer([r["prompt"] + r["completion"] for r in rows],
#                         return_tensors="pt", padding=True, truncation=True, max_length=512)
#       lengths = torch.tensor([len(p) for p in prompts])
#       batch["labels"] = ft.tasks.labels_after_prompt(batch["input_ids"], lengths,
#                                                      batch["attention_mask"])
#       return dict(batch)
#   loader = torch.utils.data.DataLoader(train_rows, batch_size=16, shuffle=False,
#                                        collate_fn=collate)
#   trak = ft.TRAK(model, task=ft.tasks.LanguageModeling(), device="cuda",
#                  projector="factored", params=transformers.pytorch_utils.Conv1D,
#                  proj_dim=16384, store="runs/gpt2")
#   # (Llama/Mistral use nn.Linear: params=torch.nn.Linear, minus lm_head if it is tied)
#   trak.featurize(loader, checkpoints=["ckpt/model.safetensors"])
#   scores = trak.score(target_loader)
# With left padding, also put position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
# in the batch: GPT-2 numbers positions 0..T-1 whatever the mask.
# ---------------------------------------------------------------------------------------
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from torch import nn

import fasttrak as ft

PAD, BOS, EOS, ARROW = 0, 1, 2, 3
NUM_KEYS = 6
KEY = 4  # key k is token KEY + k
VALUE = 16  # completion tokens are VALUE..VALUE+15
FILLER = 40  # filler tokens are FILLER..VOCAB-1
VOCAB = 64


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return transformers.GPT2LMHeadModel(config)


def facts(seed: int = 0) -> dict[int, list[tuple[int, ...]]]:
    """Each key's completion(s): key 0 has two (A, B), the others one."""
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(16, generator=gen)[: 2 * (NUM_KEYS + 1)].view(-1, 2) + VALUE
    table = {k: [tuple(pairs[k].tolist())] for k in range(NUM_KEYS)}
    table[0].append(tuple(pairs[NUM_KEYS].tolist()))
    return table


def example(key: int, which: int, table: dict, gen: torch.Generator) -> dict:
    """One unpadded example: token ids, prompt length (through the arrow), key, completion."""
    length = int(torch.randint(0, 6, (), generator=gen))
    fillers = torch.randint(FILLER, VOCAB, (length,), generator=gen)
    prompt = [BOS, *fillers.tolist(), KEY + key, ARROW]
    ids = prompt + [*table[key][which], EOS]
    return {"ids": torch.tensor(ids), "prompt": len(prompt), "key": key, "which": which}


def make_examples(n: int, seed: int, table: dict) -> list[dict]:
    """n training examples; key 0 takes completion A with probability 2/3, else B."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        key = int(torch.randint(NUM_KEYS, (), generator=gen))
        which = 0 if key != 0 or float(torch.rand((), generator=gen)) < 2 / 3 else 1
        items.append(example(key, which, table, gen))
    return items


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad, and target only the completion (labels -100 on the prompt and padding).

    Only model inputs and labels go into the batch: the task calls the model with every key
    except the labels.
    """
    width = max(len(item["ids"]) for item in items)
    ids = torch.full((len(items), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, item in enumerate(items):
        ids[i, : len(item["ids"])] = item["ids"]
        mask[i, : len(item["ids"])] = 1
    prompt_lengths = torch.tensor([item["prompt"] for item in items])
    labels = ft.tasks.labels_after_prompt(ids, prompt_lengths, mask)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: nn.Module, items: list, steps: int) -> list[dict[str, torch.Tensor]]:
    """Fine-tune on the completions; returns the checkpoints at half and all of the steps."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(items, batch_size=32, shuffle=True, collate_fn=collate)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    checkpoints, step = [], 0
    while step < steps:
        for batch in loader:
            opt.zero_grad()
            model(**batch).loss.backward()  # Hugging Face's loss over the same labels
            opt.step()
            step += 1
            if step in (steps // 2, steps):
                checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            if step == steps:
                break
    model.eval()
    with torch.no_grad():
        loss = model(**collate(items)).loss.item()
    print(f"  completion loss {loss:.3f} after {steps} steps")
    return checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--projector", default="srht", choices=["srht", "factored"])
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

    table = facts()
    train_items = make_examples(num_train, seed=0, table=table)
    # Targets: key 0 with each of its two completions, then one per other key.
    gen = torch.Generator().manual_seed(1)
    to_score = [(0, 0), (0, 1)] + [(k, 0) for k in range(1, NUM_KEYS)]
    targets = [example(k, w, table, gen) for k, w in to_score[: 4 if args.quick else None]]
    print(f"fine-tuning a tiny GPT-2 on {num_train} prompt/completion pairs")
    model = make_model()
    checkpoints = train(model, train_items, steps)
    if args.quick:
        checkpoints = checkpoints[-1:]

    if args.projector == "factored":
        # GPT-2's attention and MLP layers are HF Conv1D (weight (in, out)); the factored
        # projector covers them. wte/lm_head are tied (refused): left out, as are wpe and the norms.
        options = dict(projector=ft.projection.Factored(), params=transformers.pytorch_utils.Conv1D)
    else:
        options = dict(projector="srht")  # every parameter; the hook engine handles tied wte
    trak = ft.TRAK(
        model,
        task=ft.tasks.LanguageModeling(),
        proj_dim=proj_dim,
        store=args.store,
        device=args.device,
        progress=False,
        **options,
    )
    p = sum(trak.param_numels.values())
    total = sum(t.numel() for t in model.parameters())
    print(
        f"featurizing {len(checkpoints)} checkpoint(s): {len(trak.params)} tensors, "
        f"p = {p} of {total} parameters -> k = {trak.k} ({args.projector})"
    )
    loader = torch.utils.data.DataLoader(train_items, batch_size=32, collate_fn=collate)
    trak.featurize(loader, checkpoints=checkpoints)
    scores = trak.score(torch.utils.data.DataLoader(targets, batch_size=8, collate_fn=collate))
    top = scores.topk(5)

    def fact(item: dict) -> str:
        return f"key {item['key']}->{'AB'[item['which']]}"

    def show(i: int) -> str:
        return f"#{i}({fact(train_items[i])})"

    print(f"\nscores: {scores.shape[0]} targets x {scores.shape[1]} training sequences")
    hits = 0
    for t, item in enumerate(targets):
        print(
            f"target {t} ({fact(item)}): proponents "
            f"{', '.join(show(i) for i in top.proponents[t])} | opponents "
            f"{', '.join(show(i) for i in top.opponents[t])}"
        )
        hits += int(fact(train_items[top.proponents[t, 0]]) == fact(item))
    print(f"\ntop proponent teaches the target's fact for {hits}/{len(targets)} targets")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
