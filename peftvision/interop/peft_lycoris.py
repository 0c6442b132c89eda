"""peft LoHa / LoKr <-> peftvision LoHa / LoKr (LyCORIS' factor names and layouts on both sides).

LoHa: hada_w1_a (out, r), hada_w1_b (r, in/g·k·k), hada_w2_a, hada_w2_b alike; ΔW = (alpha/r)·
(W1a·W1b) ⊙ (W2a·W2b). LoKr: lokr_w1 (a, c) or lokr_w1_a/b, lokr_w2 (b, d[, k, k]) or
lokr_w2_a (b, r) / lokr_w2_b (r, d·k·k), out = a·b and in/g = c·d split by LyCORIS' factorization
(peft's decompose_factor is our `factor`); ΔW = (alpha/r)·W1 ⊗ W2. peft's Tucker-core conv layout
(use_effective_conv2d: hada_t1 / lokr_t2) has no peftvision equivalent and is refused.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from ..errors import AdapterLoadError
from ..methods.loha import LoHa, LoHaLayer
from ..methods.lokr import LoKr, LoKrLayer
from .peft import PeftCodec, module_names

LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
TUCKER = {"LOHA": ("hada_t1", "hada_t2"), "LOKR": ("lokr_t2",)}


def layer_problem(name: str, module: nn.Module) -> str:
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return f"a {type(module).__name__}; peft's LoHa / LoKr take Linear, Conv1d and Conv2d only"
    return ""


def _alpha(method: LoHa | LoKr) -> float:
    return float(method.alpha if method.alpha is not None else method.r)


def _tensors(layers: dict, factors: tuple[str, ...]) -> dict[str, Tensor]:
    return {f"{name}.{f}": getattr(layer, f).detach() for name, layer in layers.items()
            for f in factors if f in layer._parameters}


def loha_to_peft(method: LoHa, layers: dict[str, LoHaLayer]) -> tuple[dict, dict[str, Tensor]]:
    fields = {"r": method.r, "alpha": _alpha(method), "rank_dropout": 0.0, "module_dropout": 0.0,
              "use_effective_conv2d": False, "init_weights": True, "rank_pattern": {}, "alpha_pattern": {}}
    return fields, _tensors(layers, LOHA_FACTORS)


def lokr_to_peft(method: LoKr, layers: dict[str, LoKrLayer]) -> tuple[dict, dict[str, Tensor]]:
    fields = {"r": method.r, "alpha": _alpha(method), "rank_dropout": 0.0, "module_dropout": 0.0,
              "use_effective_conv2d": False, "decompose_both": method.decompose_both,
              "decompose_factor": method.factor, "rank_dropout_scale": False, "init_weights": True,
              "rank_pattern": {}, "alpha_pattern": {}}
    return fields, _tensors(layers, LOKR_FACTORS)


def _refuse_tucker(kind: str, grouped: dict[str, dict[str, Tensor]], source: Path) -> None:
    for module, parts in grouped.items():
        core = [t for t in TUCKER[kind] if t in parts]
        if core:
            raise AdapterLoadError(
                f"{source}: {module} holds {', '.join(core)}, peft's Tucker-core conv layout "
                "(use_effective_conv2d=True), which peftvision's "
                f"{kind.lower()} does not have; train it in peft with use_effective_conv2d=False")


def _renamed(grouped: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    return {f"{module}.{name}": t for module, parts in grouped.items() for name, t in parts.items()}


def loha_from_peft(config: dict, grouped: dict, source: Path) -> tuple[dict, dict[str, Tensor]]:
    _refuse_tucker("LOHA", grouped, source)
    modules = module_names(grouped, source, LOHA_FACTORS)
    r = int(config["r"])
    loha = {"r": r, "alpha": float(config.get("alpha", r)), "targets": modules}
    return {"name": "loha", "config": loha}, _renamed(grouped)


def lokr_from_peft(config: dict, grouped: dict, source: Path) -> tuple[dict, dict[str, Tensor]]:
    _refuse_tucker("LOKR", grouped, source)
    for module, parts in grouped.items():  # either the full factor or both low-rank halves
        for w in ("lokr_w1", "lokr_w2"):
            if (w in parts) == (f"{w}_a" in parts and f"{w}_b" in parts):
                raise AdapterLoadError(f"{source}: {module} needs {w}, or {w}_a and {w}_b; the file "
                                       "is incomplete, re-save it with peft")
    r = int(config["r"])
    lokr = {"r": r, "alpha": float(config.get("alpha", r)), "factor": int(config.get("decompose_factor", -1)),
            "decompose_both": bool(config.get("decompose_both", False)), "targets": sorted(grouped)}
    return {"name": "lokr", "config": lokr}, _renamed(grouped)


_REFUSED = {"rank_pattern": "peftvision's LoHa / LoKr have one rank for every layer",
            "alpha_pattern": "peftvision's LoHa / LoKr have one alpha for every layer"}
_TRAINING_ONLY = ("rank_dropout", "module_dropout")
LOHA = PeftCodec(peft_type="LOHA", methods=("loha",), layers=(LoHaLayer,),
                 suffixes=LOHA_FACTORS + TUCKER["LOHA"], to_peft=loha_to_peft, from_peft=loha_from_peft,
                 refused=_REFUSED, training_only=_TRAINING_ONLY, layer_problem=layer_problem)
LOKR = PeftCodec(peft_type="LOKR", methods=("lokr",), layers=(LoKrLayer,),
                 suffixes=LOKR_FACTORS + TUCKER["LOKR"], to_peft=lokr_to_peft, from_peft=lokr_from_peft,
                 refused=_REFUSED, training_only=_TRAINING_ONLY, layer_problem=layer_problem)
