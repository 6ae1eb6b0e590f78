"""TRAK on a tiny CLIP model (image-text contrastive), with negatives per checkpoint.

What it does: builds a tiny randomly initialised Hugging Face ``CLIPModel`` (no download)
and trains it briefly on procedurally generated image-caption pairs: each pair shows one of
a few *concepts*; the image is the concept's colour pattern plus noise, the caption is
``[BOS] concept-word filler... [EOS]`` (padded, with an attention mask). The task
``ft.tasks.CLIP`` contrasts each pair with a fixed set of negative pairs (here 32 training
pairs): f = f_img + f_txt, the log-odds that the image picks its own caption and that the
caption picks its own image among the negatives, at the model's own logit scale; Q is the
mean of the two 1 - p. The runner re-embeds the negatives for every checkpoint (this
example featurizes two checkpoints of one run). It prints each target pair's top
proponents and opponents and checks that the top proponent shows the same concept.

Run it::

    python examples/clip.py            # 400 training pairs, 2 checkpoints
    python examples/clip.py --quick    # a few seconds (used by the tests)

# ---------------------------------------------------------------------------------------
# Pointing it at a real checkpoint and dataset (comments only; nothing here is executed):
#
#   from transformers import CLIPModel, CLIPProcessor
#   model = CLIPModel.from_pretrained("openai/clip-vit-base-patch32")  # or your fine-tune
#   processor = CLIPProcessor.from_pretrained("openai/clip-vit-base-patch32")
#   def collate(rows):   # rows: {"image": PIL.Image, "caption": str}
#       return dict(processor(text=[r["caption"] for r in rows],
#                             images=[r["image"] for r in rows],
#                             return_tensors="pt", padding=True))
#   loader = torch.utils.data.DataLoader(pairs, batch_size=64, shuffle=False,
#                                        collate_fn=collate)
#   negatives = collate([pairs[i] for i in range(0, len(pairs), len(pairs) // 300)])
#   trak = ft.TRAK(model, task=ft.tasks.CLIP(negatives),     # 300 fixed negative pairs
#                  proj_dim=4096, device="cuda", store="runs/clip",
#                  params=["vision_model.encoder.*", "text_model.encoder.*",
#                          "visual_projection.*", "text_projection.*"])  # optional
#   trak.featurize(loader, checkpoints=["ckpt/epoch10.safetensors",
#                                       "ckpt/epoch20.safetensors"])
#   scores = trak.score(target_loader)
# open_clip models work too: items (image, tokens), negatives a pair (images, texts).
# ---------------------------------------------------------------------------------------
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from torch import nn

import fasttrak as ft

PAD, BOS, EOS = 0, 62, 63
NUM_CONCEPTS = 4
WORD = 1  # concept c's word is token WORD + c
FILLER = 10  # filler tokens are FILLER..BOS-1
VOCAB = 64
IMAGE = 16  # pixels per side


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
            bos_token_id=BOS,
            eos_token_id=EOS,  # the text embedding is read at the EOS token
            pad_token_id=PAD,
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=IMAGE,
            patch_size=4,
        ),
        projection_dim=16,
    )
    return transformers.CLIPModel(config)


def make_pairs(n: int, seed: int) -> list[dict]:
    """n unpadded pairs: pixel_values (3, IMAGE, IMAGE), caption ids, concept."""
    patterns = torch.randn(NUM_CONCEPTS, 3, 4, 4, generator=torch.Generator().manual_seed(99))
    patterns = nn.functional.interpolate(patterns, size=IMAGE, mode="bilinear")
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        concept = int(torch.randint(NUM_CONCEPTS, (), generator=gen))
        pixels = patterns[concept] + 0.7 * torch.randn(3, IMAGE, IMAGE, generator=gen)
        length = int(torch.randint(0, 4, (), generator=gen))
        fillers = torch.randint(FILLER, BOS, (length,), generator=gen)
        caption = torch.tensor([BOS, WORD + concept, *fillers.tolist(), EOS])
        pairs.append({"pixel_values": pixels, "input_ids": caption, "concept": concept})
    return pairs


def collate(pairs: list[dict]) -> dict[str, torch.Tensor]:
    """The dict a CLIP processor produces: input_ids, attention_mask, pixel_values."""
    width = max(len(p["input_ids"]) for p in pairs)
    ids = torch.full((len(pairs), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(pairs):
        ids[i, : len(p["input_ids"])] = p["input_ids"]
        mask[i, : len(p["input_ids"])] = 1
    pixels = torch.stack([p["pixel_values"] for p in pairs])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def train(model: nn.Module, pairs: list, steps: int) -> list[dict[str, torch.Tensor]]:
    """Contrastive training; returns the checkpoints at half and all of the steps."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(pairs, batch_size=32, shuffle=True, collate_fn=collate)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    checkpoints, step = [], 0
    while step < steps:
        for batch in loader:
            opt.zero_grad()
            model(**batch, return_loss=True).loss.backward()
            opt.step()
            step += 1
            if step in (steps // 2, steps):
                checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            if step == steps:
                break
    model.eval()
    with torch.no_grad():
        out = model(**collate(pairs[:64]))
        concepts = torch.tensor([p["concept"] for p in pairs[:64]])
        picked = concepts[out.logits_per_image.argmax(1)]
        accuracy = (picked == concepts).float().mean().item()
    print(f"  image->caption concept accuracy {accuracy:.3f} (64 pairs) after {steps} steps")
    return checkpoints


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
    num_train, steps, num_targets = (120, 40, 4) if args.quick else (400, 200, 8)
    proj_dim = args.proj_dim or (256 if args.quick else 1024)
    start = time.perf_counter()

    train_pairs = make_pairs(num_train, seed=0)
    targets = make_pairs(num_targets, seed=1)
    print(f"training a tiny CLIP on {num_train} image-caption pairs")
    model = make_model()
    checkpoints = train(model, train_pairs, steps)
    if args.quick:
        checkpoints = checkpoints[-1:]

    # A fixed set of negative pairs, in the form of a batch. The task is unbound: the runner
    # embeds the negatives with each checkpoint's weights (task.bind) before featurizing it.
    negatives = collate(train_pairs[:32])
    trak = ft.TRAK(
        model,
        task=ft.tasks.CLIP(negatives),
        proj_dim=proj_dim,
        store=args.store,
        device=args.device,
        progress=False,
    )
    p = sum(trak.param_numels.values())
    print(
        f"featurizing {len(checkpoints)} checkpoint(s): p = {p} parameters -> k = {trak.k} "
        f"({trak.engine} engine), {len(train_pairs[:32])} negatives per checkpoint"
    )
    loader = torch.utils.data.DataLoader(train_pairs, batch_size=32, collate_fn=collate)
    trak.featurize(loader, checkpoints=checkpoints)
    scores = trak.score(torch.utils.data.DataLoader(targets, batch_size=8, collate_fn=collate))
    top = scores.topk(5)

    def show(i: int) -> str:
        return f"#{i}(c{train_pairs[i]['concept']})"

    print(f"\nscores: {scores.shape[0]} targets x {scores.shape[1]} training pairs")
    hits = 0
    for t, pair in enumerate(targets):
        print(
            f"target {t} (concept {pair['concept']}): proponents "
            f"{', '.join(show(i) for i in top.proponents[t])} | opponents "
            f"{', '.join(show(i) for i in top.opponents[t])}"
        )
        hits += int(train_pairs[top.proponents[t, 0]]["concept"] == pair["concept"])
    print(f"\ntop proponent shows the target's concept for {hits}/{num_targets} targets")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
