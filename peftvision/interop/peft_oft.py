"""peft OFT <-> peftvision OFT.

Both keep each block's skew-symmetric Q as its upper triangle, row by row: peft's
oft_R.weight (blocks, b·(b-1)/2) is our oft_R. With use_cayley_neumann=False peft's R is the exact
Cayley (I - Q)(I + Q)⁻¹ applied as x·R before the layer, i.e. W0·Rᵀ: ours. What differs, refused:
- use_cayley_neumann=True (peft's default): R is a truncated series, not a rotation; our exact
  Cayley cannot reproduce it;
- coft (a projection of Q in every forward), block_share (one block for all): no such options here;
- a k×k conv with k > 1: peft rotates overlapping input patches and sums them back (F.fold) before
  the conv, which is not the rotated weight W0·Rᵀ that peft's own merge and our OFT compute;
- block sizes that differ between layers: our OFT has one block_size (the largest divisor of each
  layer's input up to it).
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor, nn

from ..errors import AdapterLoadError, ConfigError
from ..methods.oft import OFT, OFTLayer
from .peft import PeftCodec, module_names


def layer_problem(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return ""
    if not isinstance(module, nn.Conv2d):
        return f"a {type(module).__name__}; peft's OFT takes Linear and Conv2d only"
    if module.groups != 1 or any(d != 1 for d in module.dilation):
        return "a grouped or dilated conv, which peft's OFT cannot rotate"
    if any(k != 1 for k in module.kernel_size):
        return (f"a {'x'.join(map(str, module.kernel_size))} conv: peft's OFT rotates overlapping input "
                "patches and sums them back (F.fold) before the conv, not the weight W0·Rᵀ that "
                "peftvision's OFT (and peft's own merge) computes, so outputs would differ. Use OFT "
                "on Linear and 1x1 conv layers for peft interop")
    return ""


def peft_block_size(n: int, wanted: int) -> int:
    """The block size peft picks for an input of size n given oft_block_size=wanted: wanted when
    it divides n, else the nearest divisor (the smaller one on a tie), n when wanted >= n."""
    if wanted >= n:
        return n
    if n % wanted == 0:
        return wanted
    lower = max(d for d in range(1, wanted + 1) if n % d == 0)
    higher = min(d for d in range(wanted, n + 1) if n % d == 0)
    return lower if wanted - lower <= higher - wanted else higher


def to_peft(method: OFT, layers: dict[str, OFTLayer]) -> tuple[dict, dict[str, Tensor]]:
    sizes = {name: (layer.weighted_layer.weight[0].numel(), layer.block_size) for name, layer in layers.items()}
    # one oft_block_size from which peft derives every layer's block size as ours did
    fitting = [b for b in sorted({b for _, b in sizes.values()}, reverse=True)
               if all(peft_block_size(n, b) == mine for n, mine in sizes.values())]
    if not fitting:
        raise ConfigError(f"format='peft': oft block sizes {sorted({b for _, b in sizes.values()})} differ "
                          "between layers in a way peft's single oft_block_size cannot reproduce; choose "
                          "a block_size that divides every targeted layer's input, or save in "
                          "peftvision's format")
    tensors = {f"{name}.oft_R.weight": layer.oft_R.detach() for name, layer in layers.items()}
    fields = {"r": 0, "oft_block_size": fitting[0], "use_cayley_neumann": False, "coft": False,
              "block_share": False, "module_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "init_weights": True}
    return fields, tensors


def from_peft(config: dict, grouped: dict[str, dict[str, Tensor]], source: Path) -> tuple[dict, dict]:
    if config.get("use_cayley_neumann", True):  # peft's default is the series
        raise AdapterLoadError(
            f"{source}: this OFT adapter uses peft's Cayley-Neumann series (use_cayley_neumann=True, "
            "peft's default), whose blocks are a truncated series rather than exact rotations; "
            "peftvision's OFT uses the exact Cayley transform and cannot reproduce them. Train with "
            "OFTConfig(use_cayley_neumann=False), or merge it in peft (merge_and_unload)")
    if config.get("bias", "none") != "none":
        raise AdapterLoadError(f"{source}: peft OFT bias={config['bias']!r} trains base biases, "
                               "which peftvision's OFT does not")
    modules = module_names(grouped, source, ("oft_R.weight",))
    sizes = {}
    for m in modules:
        n = grouped[m]["oft_R.weight"].shape[-1]  # b·(b-1)/2 numbers per block
        sizes[m] = (1 + math.isqrt(1 + 8 * n)) // 2
    if len(set(sizes.values())) != 1 or min(sizes.values()) < 2:
        raise AdapterLoadError(f"{source}: OFT block sizes {sorted(set(sizes.values()))} differ between "
                               "layers (or are 1); peftvision's OFT uses one block size of 2 or more")
    tensors = {f"{m}.oft_R": grouped[m]["oft_R.weight"] for m in modules}  # (blocks, b·(b-1)/2)
    oft = {"block_size": next(iter(sizes.values())), "targets": modules}
    return {"name": "oft", "config": oft}, tensors


CODEC = PeftCodec(
    peft_type="OFT", methods=("oft",), layers=(OFTLayer,), suffixes=("oft_R.weight",),
    to_peft=to_peft, from_peft=from_peft, layer_problem=layer_problem, training_only=("module_dropout",),
    refused={"coft": "constrained OFT projects Q in every forward; peftvision's OFT has no such option",
             "block_share": "one rotation shared by all blocks; peftvision's OFT trains one per block",
             "fan_in_fan_out": "transposed (GPT-2 Conv1D) weights do not occur in vision models"},
)
