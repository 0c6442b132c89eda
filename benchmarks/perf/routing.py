"""Serving a mixed batch: per-sample adapter routing side by side with peft and a naive loop.

    python -m benchmarks.perf.routing                        # ViT-B, 4 LoRA adapters, batch 16
    python -m benchmarks.perf.routing --batch 32 --adapters 8 --repeats 5
    python -m benchmarks.perf.routing --tiny --repeats 1 --warmup 0   # smoke test, seconds
    python -m benchmarks.perf.routing --markdown docs/performance-routing.md   # the docs page

One seeded timm vit_base_patch16_224 (pretrained=False: random weights time the same), in eval
mode under no_grad, carries k LoRA adapters (r=8, alpha=8 on every block's qkv Linear, no head
training) with random non-zero factors. The batch's samples cycle through the k adapters and the
base model (None / peft's "__base__"). Variants, on the same inputs:
  routed     peftvision: `with pv.adapter_per_sample(model, names): model(x)`, one forward
  peft       peft.get_peft_model with the same adapters (LoraConfig(r=8, lora_alpha=8,
             target_modules=["qkv"]), factors copied from peftvision's), `model(x, adapter_names=names)`
  loop       peftvision, one forward per adapter on that adapter's samples (set_adapter /
             disable_adapters), the outputs put back in batch order: what serving does without routing
  one        peftvision, one adapter active for the whole batch: the floor routing cannot beat
Before timing, routed, peft and loop outputs are asserted equal (fp32, 1e-5 of the output scale)
and different from `one` on every sample not routed to a0 (the adapters do change the outputs).
Each round times one forward of every variant, in rotating order, so load on a shared machine
hits them alike; the median of --repeats rounds after --warmup is printed: process CPU time (the
steadier figure on a shared machine; the ratios to `one` and `peft` use it) and wall time.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import peftvision as pv

BASE = "__base__"  # peft's name for the base model in adapter_names


def build(tiny: bool, adapters: int, r: int, seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor]:
    """(peftvision model, peft model, the batch's input size) with the same adapters."""
    import peft
    import timm

    torch.manual_seed(seed)
    if tiny:
        from timm.models.vision_transformer import VisionTransformer

        base = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    else:
        base = timm.create_model("vit_base_patch16_224", pretrained=False)
    base.eval()
    ours = copy.deepcopy(base)
    names = [f"a{i}" for i in range(adapters)]
    g = torch.Generator().manual_seed(seed + 1)
    for name in names:
        pv.apply(ours, "lora", adapter_name=name, r=r, alpha=r, targets=["qkv"], train_head=False)
        with torch.no_grad():
            for module in ours.modules():
                if getattr(module, "adapter_name", None) == name and hasattr(module, "lora_B"):
                    module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.02)
    config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=["qkv"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, config)
    _copy_factors(ours, theirs)
    theirs.eval()
    ours.eval()
    return ours, theirs, torch.Size(base.default_cfg["input_size"] if not tiny else (3, 32, 32))


def _copy_factors(ours: nn.Module, theirs: nn.Module) -> None:
    """peft's lora_A / lora_B of every adapter := peftvision's (the same scaling alpha/r)."""
    from peftvision.methods.lora import LoRALinear

    by_path = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    copied = 0
    with torch.no_grad():
        for name, module in ours.named_modules():
            if not isinstance(module, LoRALinear):
                continue
            path = name
            while ".base_layer" in path:
                path = path.replace(".base_layer", "")
            target = by_path[path]
            target.lora_A[module.adapter_name].weight.copy_(module.lora_A)
            target.lora_B[module.adapter_name].weight.copy_(module.lora_B)
            assert target.scaling[module.adapter_name] == module.scaling
            copied += 1
    if not copied:
        raise RuntimeError("no LoRA layer was copied to the peft model")


def mixed_names(batch: int, adapters: int) -> list[str | None]:
    """Sample i uses adapter i mod (k+1); every k+1-th sample the base model."""
    cycle = [f"a{i}" for i in range(adapters)] + [None]
    return [cycle[i % len(cycle)] for i in range(batch)]


def loop(model: nn.Module, x: Tensor, names: list[str | None]) -> Tensor:
    """One forward per adapter on its own samples, put back in batch order."""
    out = None
    for name in dict.fromkeys(names):
        idx = torch.tensor([i for i, n in enumerate(names) if n == name])
        if name is None:
            with pv.disable_adapters(model):
                y = model(x[idx])
        else:
            pv.set_adapter(model, name)
            y = model(x[idx])
        if out is None:
            out = y.new_empty(len(names), *y.shape[1:])
        out[idx] = y
    return out


def variants(ours: nn.Module, theirs: nn.Module, x: Tensor, names: list) -> dict[str, Callable[[], Tensor]]:
    peft_names = [BASE if n is None else n for n in names]

    def routed() -> Tensor:
        with pv.adapter_per_sample(ours, names):
            return ours(x)

    def one() -> Tensor:
        pv.set_adapter(ours, "a0")
        return ours(x)

    return {"routed": routed, "peft": lambda: theirs(x, adapter_names=peft_names),
            "loop": lambda: loop(ours, x, names), "one": one}


def check_equal(runs: dict[str, Callable[[], Tensor]], names: list) -> float:
    """routed, peft and loop give the same outputs, which the adapters do change; returns the
    largest difference found between them."""
    with torch.no_grad():
        outs = {k: runs[k]() for k in ("routed", "peft", "loop", "one")}
    scale = outs["loop"].abs().max().item()
    worst = 0.0
    for key in ("routed", "peft"):
        torch.testing.assert_close(outs[key], outs["loop"], rtol=1e-5, atol=1e-5 * scale)
        worst = max(worst, (outs[key] - outs["loop"]).abs().max().item())
    other = [i for i, n in enumerate(names) if n != "a0"]
    moved = (outs["routed"][other] - outs["one"][other]).flatten(1).abs().amax(dim=1)  # (samples,)
    if not bool((moved > 100 * worst + 1e-6 * scale).all()):
        raise AssertionError("some samples routed to another adapter give a0's outputs: the "
                             "adapters do not change the model, so the comparison shows nothing")
    return worst


def measure(runs: dict[str, Callable[[], Tensor]], repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU ms per forward of every variant, rounds in rotating order
    (CPU time is the steadier figure on a shared machine: other jobs' load does not count)."""
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    keys = list(runs)
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
                start, start_cpu = time.perf_counter(), time.process_time()
                runs[key]()
                if round_ >= warmup:
                    wall[key].append((time.perf_counter() - start) * 1000)
                    cpu[key].append((time.process_time() - start_cpu) * 1000)
    return {k: {"wall": statistics.median(wall[k]), "cpu": statistics.median(cpu[k])} for k in runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT (smoke test)")
    parser.add_argument("--markdown", help="also write the figures as a markdown page here")
    args = parser.parse_args(argv)
    ours, theirs, size = build(args.tiny, args.adapters, args.r)
    x = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(2))
    names = mixed_names(args.batch, args.adapters)
    runs = variants(ours, theirs, x, names)
    worst = check_equal(runs, names)
    ms = measure(runs, args.repeats, args.warmup)
    model = "tiny ViT" if args.tiny else "vit_base_patch16_224"
    header = (f"{model}, batch {args.batch} ({args.adapters} LoRA adapters r={args.r} on qkv, and the "
              f"base model, cycling over the samples), torch {torch.__version__}, peft {_peft_version()}, "
              f"{torch.get_num_threads()} torch thread(s), {_cpu()}; median of {args.repeats} rounds "
              f"after {args.warmup} warm-up")
    check = f"routed and peft outputs equal the loop's (largest difference {worst:.2e})"
    table = ["| variant | CPU ms per forward | vs one | vs peft | wall ms | wall vs peft |",
             "|---|---:|---:|---:|---:|---:|"]
    table += [f"| {k} | {v['cpu']:.1f} | {v['cpu'] / ms['one']['cpu']:.2f} | {v['cpu'] / ms['peft']['cpu']:.2f} "
              f"| {v['wall']:.1f} | {v['wall'] / ms['peft']['wall']:.2f} |" for k, v in ms.items()]
    print(header)
    print(check)
    print("\n".join(table))
    if args.markdown:
        command = "python -m benchmarks.perf.routing " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.markdown).write_text(page(header, check, table, command))
    return {"ms": ms, "max_abs_diff": worst, "names": names}


def page(header: str, check: str, table: list[str], command: str) -> str:
    return "\n".join([
        "# Serving mixed batches: per-sample routing", "",
        f"Generated by `{command}`; do not edit by hand.", "",
        "One batch whose samples each use their own adapter (or the base model): peftvision's "
        "`with pv.adapter_per_sample(model, names): model(x)` against peft's mixed-batch inference "
        "(`model(x, adapter_names=names)`), a loop of one forward per adapter on its own samples "
        "(`loop`), and one adapter for the whole batch (`one`, the floor). Eval mode, no_grad, "
        "random weights (pretrained weights time the same).", "",
        header + ".", "", check + ".", "", *table, "",
        "See benchmarks/perf/routing.py for what each variant runs.", ""])


def _peft_version() -> str:
    import peft

    return peft.__version__


def _cpu() -> str:
    device = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            device = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), device)
    except OSError:
        pass
    return f"{device} ({os.cpu_count()} CPUs)"


if __name__ == "__main__":
    main()
