"""TRAK through LoRA adapters only (``params="lora"``) on a tiny GPT-2 fine-tuned with peft.

What it does: builds a tiny randomly initialised ``GPT2LMHeadModel`` (no download),
"pre-trains" it briefly on procedurally generated facts ``[BOS] filler... KEY -> v1 v2 [EOS]``
for keys 0-5, freezes it and fine-tunes peft LoRA adapters (rank 4 on the attention and MLP
``Conv1D`` layers) on new facts for keys 6-11. ``ft.TRAK(..., params="lora")`` then
differentiates only the adapter matrices (``lora_A``, ``lora_B``): the frozen base model is
never differentiated, so the per-example gradients have p = (adapter parameters) instead
of p = (all parameters). The script prints both counts, the selected tensor names, each
fine-tuning target's top proponents and opponents, and checks that the top proponent
teaches the same fact.

Run it::

    python examples/lora.py            # 400 fine-tuning examples
    python examples/lora.py --quick    # a few seconds (used by the tests)

# ---------------------------------------------------------------------------------------
# Pointing it at a real checkpoint and dataset (comments only; nothing here is executed):
#
#   from peft import PeftModel
#   from transformers import AutoModelForCausalLM
#   base = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B",
#                                               torch_dtype=torch.bfloat16)
#   model = PeftModel.from_pretrained(base, "my-lora-adapter")   # or get_peft_model(...)
#   trak = ft.TRAK(model, task=ft.tasks.LanguageModeling(), params="lora",
#                  proj_dim=8192, device="cuda", store="runs/lora")
#   trak.featurize(loader, checkpoints=None)   # None: the model's current weights; or
#   #   state dicts of the whole PeftModel (model.state_dict()) saved at several steps
#   scores = trak.score(target_loader)
# With modules_to_save (e.g. a new classification head), add it: params=["lora", "*score*"].
# The default params=None selects every parameter with requires_grad=True, which for a
# PEFT model is the adapters plus any modules_to_save.
# ---------------------------------------------------------------------------------------
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import peft
import torch
import transformers
from torch import nn

import fasttrak as ft

PAD, BOS, EOS, ARROW = 0, 1, 2, 3
KEY = 4  # key k is token KEY + k (12 keys: 0-5 pre-training, 6-11 fine-tuning)
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


def completions(seed: int = 0) -> dict[int, tuple[int, ...]]:
    """Each key's two-token completion."""
    gen = torch.Generator().manual_seed(seed)
    table = {}
    for first in (0, 6):
        pairs = torch.randperm(16, generator=gen)[:12].view(6, 2) + VALUE
        table.update({first + k: tuple(pairs[k].tolist()) for k in range(6)})
    return table


def make_examples(n: int, keys: range, seed: int, table: dict) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        key = keys[int(torch.randint(len(keys), (), generator=gen))]
        length = int(torch.randint(0, 6, (), generator=gen))
        prompt = [BOS, *torch.randint(FILLER, VOCAB, (length,), generator=gen).tolist()]
        prompt += [KEY + key, ARROW]
        ids = torch.tensor(prompt + [*table[key], EOS])
        items.append({"ids": ids, "prompt": len(prompt), "key": key})
    return items


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad; labels target the completion only (-100 on prompt and padding)."""
    width = max(len(item["ids"]) for item in items)
    ids = torch.full((len(items), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, item in enumerate(items):
        ids[i, : len(item["ids"])] = item["ids"]
        mask[i, : len(item["ids"])] = 1
    lengths = torch.tensor([item["prompt"] for item in items])
    labels = ft.tasks.labels_after_prompt(ids, lengths, mask)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fit(model: nn.Module, items: list, steps: int, lr: float) -> float:
    """AdamW on the trainable parameters; returns the final loss on all items."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(items, batch_size=32, shuffle=True, collate_fn=collate)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    model.eval()
    with torch.no_grad():
        return model(**collate(items)).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--proj-dim", type=int, default=None, help="k (default 1024; quick 256)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--store", default=None, help="zarr store directory (default: memory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny model: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    num_pre, num_tune, steps = (200, 150, 60) if args.quick else (500, 400, 200)
    proj_dim = args.proj_dim or (256 if args.quick else 1024)
    start = time.perf_counter()

    table = completions()
    base = make_model()
    loss = fit(base, make_examples(num_pre, range(0, 6), seed=0, table=table), steps, 3e-3)
    print(f"pre-trained the base GPT-2 on keys 0-5: loss {loss:.3f}")

    config = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=["c_attn", "c_proj", "c_fc"],
        lora_dropout=0.0,
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights as (in, out)
    )
    model = peft.get_peft_model(copy.deepcopy(base), config)  # the base is frozen
    tune = make_examples(num_tune, range(6, 12), seed=1, table=table)
    loss = fit(model, tune, steps, 1e-2)
    print(f"fine-tuned LoRA adapters (rank {args.rank}) on keys 6-11: loss {loss:.3f}")

    trak = ft.TRAK(
        model,
        task=ft.tasks.LanguageModeling(),
        params="lora",  # only the adapter matrices are differentiated
        proj_dim=proj_dim,
        store=args.store,
        device=args.device,
        progress=False,
    )
    p_selected = sum(trak.param_numels.values())
    total = sum(t.numel() for t in model.parameters())
    assert all(".lora_" in name for name in trak.params)
    print(
        f"p_selected = {p_selected} of {total} parameters ({100 * p_selected / total:.1f}%) "
        f"in {len(trak.params)} adapter tensors -> k = {trak.k}"
    )
    print("  e.g. " + ", ".join(trak.params[:2]))
    loader = torch.utils.data.DataLoader(tune, batch_size=32, collate_fn=collate)
    trak.featurize(loader, checkpoints=None)  # None: the model's current weights
    targets = make_examples(4 if args.quick else 8, range(6, 12), seed=2, table=table)
    scores = trak.score(torch.utils.data.DataLoader(targets, batch_size=8, collate_fn=collate))
    top = scores.topk(5)

    def show(i: int) -> str:
        return f"#{i}(key {tune[i]['key']})"

    print(f"\nscores: {scores.shape[0]} targets x {scores.shape[1]} fine-tuning examples")
    hits = 0
    for t, item in enumerate(targets):
        print(
            f"target {t} (key {item['key']}): proponents "
            f"{', '.join(show(i) for i in top.proponents[t])} | opponents "
            f"{', '.join(show(i) for i in top.opponents[t])}"
        )
        hits += int(tune[top.proponents[t, 0]]["key"] == item["key"])
    print(f"\ntop proponent teaches the target's fact for {hits}/{len(targets)} targets")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
