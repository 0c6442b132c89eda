"""Where SH-PEFT's training step goes beyond LoRA's, part by part (issue 16's SH-PEFT row).

    python -m benchmarks.perf.sparse_parts --rounds 6        # ViT-B, batch 4, 1 thread

One process, one seeded ViT-B (pretrained=False) and one batch; frozen (input grads), LoRA (r=8
on qkv) and SH-PEFT 1% (data: 2 random batches) step in turn, and SH-PEFT again with one part of
its sparse Linear swapped for a no-op, to time that part (those steps' gradients are wrong: timing
only, lr 0 so the model does not move):
  sh:no-copies    W + Δ built as a new tensor (add_at), in forward and again in backward;
  sh:no-sampled   the values' gradient as a sampled matmul at the chosen entries.
Prints the median and best process CPU time per variant and their ratios to LoRA's; the first
round is a warm-up.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.sparse_parts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6, help="steps per variant, the first untimed")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)
    import timm

    import peftvision as pv
    import peftvision.methods.sparse_layers as sl

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=1000)
    size = base.patch_embed.img_size
    x, y = torch.randn(args.batch, 3, *size), torch.randint(0, 1000, (args.batch,))
    g = torch.Generator().manual_seed(7)
    data = [(torch.randn(args.batch, 3, *size, generator=g),
             torch.randint(0, 1000, (args.batch,), generator=g)) for _ in range(2)]
    sh = pv.apply(copy.deepcopy(base), pv.config("shpeft", data=data)).train()
    lora = pv.apply(copy.deepcopy(base), pv.config("lora", r=8)).train()
    frozen = copy.deepcopy(base).requires_grad_(False)
    frozen.get_classifier().requires_grad_(True)
    add_at, grad = sl.add_at, sl.SampledPattern.grad
    variants = {"frozen": (frozen, {}), "lora": (lora, {}), "shpeft": (sh, {}),
                "sh:no-copies": (sh, {"add_at": lambda w, i, v: w}),
                "sh:no-sampled": (sh, {"grad": lambda self, gr, xx: gr.new_zeros(self.col.numel())})}
    opts = {id(m): torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=0.0)
            for m in (frozen, lora, sh)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for i in range(args.rounds):
            for label, (model, patch) in variants.items():
                sl.add_at = patch.get("add_at", add_at)
                sl.SampledPattern.grad = patch.get("grad", grad)
                inp = x.clone().requires_grad_(label == "frozen")
                c0 = time.process_time()
                opts[id(model)].zero_grad(set_to_none=True)
                F.cross_entropy(model(inp), y).backward()
                opts[id(model)].step()
                if i:
                    times[label].append(time.process_time() - c0)
    finally:
        sl.add_at, sl.SampledPattern.grad = add_at, grad
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:14s} CPU s median {med[k]:.3f} best {min(v):.3f}; vs LoRA median "
              f"{med[k] / med['lora']:.3f} best {min(v) / min(times['lora']):.3f}")
    return times


if __name__ == "__main__":
    main()
