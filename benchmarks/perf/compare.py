"""Side by side with Hugging Face peft, and against the limits (the frozen model itself).

    python -m benchmarks.perf.compare --out benchmarks/results/perf/compare_cpu.json \\
        --markdown docs/performance.md          # every model, method and apply timing (long)
    python -m benchmarks.perf.compare --model vit --compile --out FILE.json   # one model, + compile
    python -m benchmarks.perf.compare --model unet --methods lora,bias --out FILE.json
    python -m benchmarks.perf.compare --model none --apply-models vit_huge_patch14_224 --out FILE.json
    python -m benchmarks.perf.compare --render --out FILE.json --markdown docs/performance.md
    python -m benchmarks.perf.compare --model none --no-apply-timing --svdiff-state --out FILE.json
    python -m benchmarks.perf.compare --tiny --steps 1 --warmup 1 --infer-reps 1   # smoke test
The committed results were measured by the commands listed at the end of docs/performance.md.

Models (random init, seeded; the same weights and inputs for every variant):
  vit      timm vit_base_patch16_224, batch 4, 224², cross-entropy over 1000 classes
  resnet50 timm resnet50, batch 8, 224², cross-entropy over 1000 classes
  unet     the SD-1.5 UNet configuration, batch 1, 4x32x32 latents, 77x768 text, MSE loss
Variants, per model:
  frozen       every backbone weight frozen, the input requires grad (backward through every
               layer, input gradients only: the floor of any PEFT method); a classifier head
               trains. In eval mode it is the bare base model: the inference reference.
  <method>     peftvision.apply(model, method) for every registered method of the architecture
               (LoRA: r=8, alpha=8 on ViT qkv / ResNet block convs, r=4 on UNet to_q/k/v/out.0;
               shpeft and spt get --data-batches random batches through their `data=` option)
  peft:lora    peft.get_peft_model with LoraConfig(r, lora_alpha=r, the same target modules,
               modules_to_save=[head]); peft:ln_tuning (ViT): LNTuningConfig on every LayerNorm
  +compile     (--compile) lora, ssf and peft:lora under torch.compile (inductor); a compile that
               fails or passes --compile-timeout is skipped with the reason
Every variant lives in its own fresh process (forked from a server that imported torch, timm,
diffusers, peft and peftvision, so every baseline is the same); its peak RSS is that process's
ru_maxrss (CUDA: max_memory_allocated). Frozen weights come from one file mapped read-only into
every process, so a dozen SD UNets fit in memory together. The processes take turns: each round
times one step of every variant, in rotating order, so load swings on a shared machine hit them
alike; the median of --steps steps after --warmup is reported with the process CPU time of the
same steps (the steadier figure on a busy machine: ratios use it). A step is zero_grad + forward
+ loss + backward + AdamW step (lr 1e-4). Variants too big to live beside the others (SD full
fine-tuning) run in a second group with their own `frozen`; ratios across groups go through
each group's frozen time.
Inference (eval, no_grad, the training batch), interleaved the same way, against `frozen`:
  unmerged  every variant as applied;
  merged    mergeable adapters folded in place (peftvision.merge / peft merge_adapter: the
            wrappers stay);
  unloaded  peftvision.unload(merge=True) / peft merge_and_unload: the bare model again (its
            module tree is checked against a fresh base model).
Selective methods add no modules: their unmerged model is their merged one.
Apply time: of each variant above on its model (real weights), and, in one more process per
--apply-models model (default vit_huge_patch14_224 and sd15-unet, each built once), of every
method applied and unloaded again; SV-Diff's one-time SVD is reported apart (on a ViT, blocks.0's
SVDs times the depth unless --full-svd), as are shpeft/spt, whose apply is a pass over data.
A worker that fails, dies (e.g. out of memory) or passes its time limit becomes a row saying so;
the others go on.
--out FILE.json merges into FILE: models measured now replace that file's entries for them.
--markdown FILE writes the tables (and the targets, checked) from the JSON, never by hand.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import peftvision as pv

from . import common
from .bias_step import Case, classifier_case, resnet_case, unet_case
from .compare_report import DATA_METHODS, PEFT_PAIRS, render, summarise

SEED = 0
COMPILED = ("lora", "ssf")  # --compile: these (and peft's LoRA) also run under torch.compile
LOSS_RTOL = 1e-4  # identity-at-init variants must start from the frozen model's loss
PRELOAD = ["torch", "timm", "diffusers", "diffusers.models.unets.unet_2d_condition", "peft",
           "peftvision", "benchmarks.perf.compare"]  # diffusers imports its models lazily


# ---- models -----------------------------------------------------------------------------------

def vit_case(tiny: bool) -> Case:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if tiny:
        batch, size, classes = 2, 32, 10
        config = {"model": "VisionTransformer(img 32, patch 8, dim 32, depth 2, heads 2)",
                  "num_classes": classes, "batch": batch, "image": size}

        def build() -> nn.Module:
            return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                     num_classes=classes)
    else:
        batch, size, classes = 4, 224, 1000
        config = {"model": "timm vit_base_patch16_224", "pretrained": False,
                  "num_classes": classes, "batch": batch, "image": size}

        def build() -> nn.Module:
            return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=classes)

    return classifier_case("vit-tiny" if tiny else "vit_base_patch16_224", build, batch, size,
                           classes, config)


CASES = {"vit": vit_case, "resnet50": resnet_case, "unet": unet_case}
ARCH = {"vit": "vit", "resnet50": "resnet", "unet": "unet"}


def head_name(model: nn.Module) -> str | None:
    """The classifier head's module name (found by identity through timm's get_classifier)."""
    head = getattr(model, "get_classifier", lambda: None)()
    if head is None or not any(True for _ in head.parameters()):
        return None
    return next(n for n, m in model.named_modules() if m is head)


def peft_config(kind: str, arch: str, model: nn.Module, r: int):
    """peft's config for the same targets as peftvision's defaults, the head trained alike."""
    from peft import LNTuningConfig, LoraConfig

    head = head_name(model)
    save = [head] if head else None
    if kind == "lora":
        targets = {"vit": ["qkv"],  # timm's fused qkv Linear of every block
                   "resnet": r"layer\d+\.\d+\.conv\d+",  # block convs, not downsample (full match)
                   "unet": ["to_q", "to_k", "to_v", "to_out.0"]}[arch]
        return LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets,
                          modules_to_save=save)
    if kind == "ln_tuning":  # every LayerNorm with weights, outside the head (a full-match regex:
        # peft's list form matches name suffixes, and "norm" would also hit patch_embed.norm)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)
                 and m.weight is not None and not (head and n.startswith(head))]
        return LNTuningConfig(target_modules="|".join(map(re.escape, names)), modules_to_save=save)
    raise ValueError(kind)


def data_batches(case: Case, n: int) -> list[tuple[Any, Tensor]]:
    """`n` random (inputs, targets) batches shaped like the training batch, for shpeft/spt."""
    base = case.inputs()
    g = torch.Generator().manual_seed(SEED + 7)
    out = []
    for _ in range(n):
        b = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
             for k, v in base.items()}
        if "x" in b:
            out.append((b["x"], b["y"]))
        else:
            out.append(({"sample": b["sample"], "timestep": b["timestep"],
                         "encoder_hidden_states": b["text"]}, b["target"]))
    return out


def unet_loss(output: Any, target: Tensor) -> Tensor:
    return F.mse_loss(output.sample, target)


# ---- variants -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    label: str
    library: str  # "peftvision", "peft" or "reference"
    method: str  # peftvision method name, peft kind, or "frozen"
    compiled: bool = False

    @property
    def kind(self) -> str:
        if self.library == "peftvision":
            return pv.get_method(self.method).kind
        return "additive" if self.library == "peft" else "reference"

    @property
    def mergeable(self) -> bool:
        if self.library == "peftvision":
            return pv.get_method(self.method).mergeable
        return self.library == "peft"


def plan_variants(arch: str, methods: list[str] | None, compile_: bool) -> list[Variant]:
    names = [n for n, info in pv.methods().items() if arch in info.architectures]
    if methods is not None:
        unknown = sorted(set(methods) - set(names))
        if unknown:
            print(f"[{arch}] --methods {unknown}: not methods of this architecture; ignored")
        names = [n for n in names if n in methods]
    out = [Variant("frozen", "reference", "frozen")]
    out += [Variant(n, "peftvision", n) for n in names]
    out += [Variant(f"peft:{kind}", "peft", kind) for m, kind in PEFT_PAIRS[arch].items() if m in names]
    if compile_:
        out += [Variant(f"{v.label}+compile", v.library, v.method, compiled=True)
                for v in list(out) if v.method in COMPILED]
    return out


# ---- worker side: one variant in one process ----------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _to(value: Any, device: str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def _structure(model: nn.Module) -> list[tuple[str, str]]:
    mods = [(n, type(m).__name__) for n, m in model.named_modules()]
    return mods + [(k, str(tuple(v.shape))) for k, v in model.state_dict().items()]


class Subject:
    """The worker's state: one model with one variant applied, its optimizer and its batch."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.baseline_rss_mb = common.max_rss_mb()  # the forkserver's imports: every worker's floor
        self.mode = "train"

    # -- setup ----------------------------------------------------------------------------------
    def build_weights(self, model: str, tiny: bool, path: str) -> dict[str, Any]:
        """Build the seeded model once and save its weights for every other worker."""
        t0 = time.perf_counter()
        torch.manual_seed(SEED)
        m = CASES[model](tiny).build()
        build_s = time.perf_counter() - t0
        torch.save(m.state_dict(), path)
        return {"build_s": build_s, "params": sum(p.numel() for p in m.parameters())}

    def setup(self, model: str, tiny: bool, weights: str, variant: dict[str, Any],
              data_batches_n: int) -> dict[str, Any]:
        v = Variant(**variant)
        self.case, self.arch, self.variant = CASES[model](tiny), ARCH[model], v
        with torch.device("meta"):  # no init: the weights come from the shared file
            net = self.case.build()
        state = torch.load(weights, mmap=True, weights_only=True)  # pages shared between workers
        net.load_state_dict(state, assign=True)
        del state
        net.to(self.device).train()
        self.batch = _to(self.case.inputs(), self.device)
        loaded_rss = common.rss_mb("VmRSS")
        cfg: Any = v.method
        if v.library == "peftvision" and v.method == "lora":
            cfg = pv.config("lora", r=self.case.lora_r)
        elif v.library == "peftvision" and v.method in DATA_METHODS:
            extra = {"loss_fn": unet_loss} if self.arch == "unet" else {}
            cfg = pv.config(v.method, data=_to(data_batches(self.case, data_batches_n), self.device),
                            **extra)
        peft_cfg = peft_config(v.method, self.arch, net, self.case.lora_r) if v.library == "peft" else None
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        if v.library == "reference":  # frozen backbone, the head trains, input grads
            net.requires_grad_(False)
            head = getattr(net, "get_classifier", lambda: None)()
            if head is not None:
                head.requires_grad_(True)
            self.batch[self.case.grad_input].requires_grad_(True)
        elif v.library == "peft":
            from peft import get_peft_model

            net = get_peft_model(net, peft_cfg)
        else:
            pv.apply(net, cfg)
        _sync(self.device)
        apply_s, apply_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        self.model = net
        self.train_model = torch.compile(net) if v.compiled else net
        self.trainable = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=1e-4) if self.trainable else None
        common.release_memory()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.hwm_reset = common.reset_peak_rss()  # VmHWM from here on: training's own peak
        return {"apply_s": apply_s, "apply_cpu_s": apply_cpu_s,
                "trainable_params": sum(p.numel() for p in self.trainable),
                "total_params": sum(p.numel() for p in net.parameters()),
                "baseline_rss_mb": self.baseline_rss_mb, "loaded_rss_mb": loaded_rss,
                "setup_rss_mb": common.rss_mb("VmRSS")}

    # -- training ---------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        x = self.batch[self.case.grad_input]
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        x.grad = None
        loss = self.case.loss(self.train_model, self.batch)
        loss.backward()
        if self.opt is not None:
            self.opt.step()
        _sync(self.device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        common.release_memory()  # an idle worker keeps only its live tensors
        return {"wall": wall, "cpu": cpu, "loss": loss.item()}

    def memory(self) -> dict[str, float | None]:
        cuda = torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None
        return {"peak_rss_mb": common.max_rss_mb(),  # the whole process: apply included
                "train_peak_rss_mb": common.rss_mb("VmHWM") if self.hwm_reset else None,
                "rss_mb": common.rss_mb("VmRSS"), "cuda_peak_mb": cuda}

    def save(self) -> dict[str, Any]:
        v = self.variant
        if v.library == "reference" or (v.library == "peftvision" and v.method == "full"):
            nbytes = sum(p.numel() * p.element_size() for p in self.trainable)
            return {"adapter_bytes": nbytes, "adapter_note": "not saved: the trained tensors' size"}
        with tempfile.TemporaryDirectory() as tmp:
            if v.library == "peft":
                self.model.save_pretrained(tmp)
            else:
                pv.save_adapter(self.model, tmp, card=False)
            files = {p.name: p.stat().st_size for p in Path(tmp).iterdir()}
        return {"adapter_bytes": files.get("adapter_model.safetensors"), "adapter_files": files}

    # -- inference --------------------------------------------------------------------------------
    def infer(self, mode: str) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if mode != self.mode:
            info = self._enter(mode)
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = self.case.output(self.model, self.batch)
        _sync(self.device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if mode == "unmerged" and not hasattr(self, "reference_out"):
            self.reference_out = out
        else:
            scale = self.reference_out.abs().max().item() or 1.0
            info["max_rel_diff"] = (out - self.reference_out).abs().max().item() / scale
        del out
        common.release_memory()
        return {"wall": wall, "cpu": cpu, **info}

    def _merge_cycles(self, reps: int = 7) -> dict[str, list[float]]:
        """CPU seconds of `reps` unmerge + merge cycles of the merged model (left merged)."""
        if self.variant.library == "peft":
            merge, unmerge = self.model.merge_adapter, self.model.unmerge_adapter
        else:
            merge, unmerge = (lambda: pv.merge(self.model)), (lambda: pv.unmerge(self.model))
        times: dict[str, list[float]] = {"unmerge_cpu_s": [], "merge_cpu_s": []}
        for _ in range(reps):
            for key, fn in (("unmerge_cpu_s", unmerge), ("merge_cpu_s", merge)):
                c0 = time.process_time()
                fn()
                _sync(self.device)
                times[key].append(time.process_time() - c0)
        return times

    def _enter(self, mode: str) -> dict[str, Any]:
        """Move to `mode` (unmerged -> merged -> unloaded), timing the change."""
        v, info = self.variant, {}
        t0 = time.perf_counter()
        if mode == "unmerged":
            self.model.eval()
            self.batch[self.case.grad_input].requires_grad_(False)
        elif v.library == "reference":
            pass  # the base model in every mode
        elif mode == "merged":
            if v.library == "peft":
                self.model.merge_adapter()
            else:
                pv.merge(self.model)
        elif mode == "unloaded":
            if v.library == "peft":
                self.model = self.model.merge_and_unload()
            else:
                pv.unload(self.model, merge=True)
            with torch.device("meta"):
                fresh = self.case.build()
            got, want = _structure(self.model), _structure(fresh)
            info["structure_equal_base"] = got == want
            if got != want:  # the first difference, for the report
                info["structure_diff"] = str(next((g, w) for g, w in zip(got + [None], want + [None])
                                                  if g != w))
        info["enter_s"] = time.perf_counter() - t0
        if mode == "merged" and v.library != "reference":
            info.update(self._merge_cycles())
        self.mode = mode
        return info

    # -- apply timing on a big model (--apply-model) ---------------------------------------------
    def big_build(self, name: str, tiny: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        torch.manual_seed(SEED)
        if tiny:
            self.big = CASES["unet" if "unet" in name else "vit"](True).build()
        else:
            # random init: a timm name (with a 1000-class head, as the ViT-B case) or "sd15-unet"
            self.big = pv.create_model(name, num_classes=None if "unet" in name else 1000)
        self.big_arch = "unet" if "unet" in name else "vit"  # the two kinds --apply-models times
        return {"build_s": time.perf_counter() - t0, "arch": self.big_arch,
                "params": sum(p.numel() for p in self.big.parameters()),
                "depth": len(getattr(self.big, "blocks", []))}

    def big_apply(self, method: str, library: str = "peftvision", targets: str | None = None) -> dict[str, Any]:
        """Time apply of one method on the big model, then restore the model (unload)."""
        if library == "peft":
            from peft import get_peft_model

            cfg = peft_config(method, self.big_arch, self.big, 4 if self.big_arch == "unet" else 8)
            t0 = time.perf_counter()
            wrapped = get_peft_model(self.big, cfg)
            apply_s = time.perf_counter() - t0
            trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
            t0 = time.perf_counter()
            self.big = wrapped.unload()
            return {"apply_s": apply_s, "unload_s": time.perf_counter() - t0, "trainable_params": trainable}
        cfg = pv.config(method, targets=targets) if targets else method
        if method == "lora":
            cfg = pv.config("lora", r=4 if self.big_arch == "unet" else 8, targets=targets)
        t0 = time.perf_counter()
        pv.apply(self.big, cfg)
        apply_s = time.perf_counter() - t0
        trainable = pv.report(self.big).trainable
        t0 = time.perf_counter()
        pv.unload(self.big)
        return {"apply_s": apply_s, "unload_s": time.perf_counter() - t0, "trainable_params": trainable}


def worker_main(conn, threads: int, device: str) -> None:
    """A worker process: run (command, kwargs) messages on a Subject until "exit"."""
    torch.set_num_threads(threads)
    gc.freeze()  # the imported modules' objects: out of every later gc pass (0.2 s -> ms)
    subject = Subject(device)
    while True:
        try:
            cmd, kwargs = conn.recv()
        except EOFError:
            return
        if cmd == "exit":
            conn.send({})
            return
        try:
            reply = getattr(subject, cmd)(**kwargs)
        except Exception as exc:  # reported to the parent, which marks the variant failed
            reply = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        conn.send(reply)


# ---- parent side --------------------------------------------------------------------------------

class WorkerFailed(RuntimeError):
    pass


class Worker:
    """A worker process (forked from the server) and its pipe; calls with timeouts."""

    def __init__(self, ctx, label: str, threads: int, device: str) -> None:
        self.label, self.dead = label, None
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, threads, device),
                                name=f"compare:{label}", daemon=True)
        self.proc.start()
        child.close()

    def call(self, cmd: str, timeout: float | None = None, fatal: bool = True,
             **kwargs: Any) -> dict[str, Any]:
        """Run `cmd` in the worker. An exception there raises WorkerFailed and, if `fatal`, ends
        the worker (its state is unknown); a timeout or a crash always ends it."""
        if self.dead:
            raise WorkerFailed(self.dead)
        self.conn.send((cmd, kwargs))
        if not self.conn.poll(timeout):
            self.kill(f"{cmd} took longer than {timeout:.0f} s: stopped")
            raise WorkerFailed(self.dead)
        try:
            reply = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            self.kill(f"the process died during {cmd} (exit code {self.proc.exitcode}; -9 is "
                      "SIGKILL, e.g. the kernel's out-of-memory killer)")
            raise WorkerFailed(self.dead) from None
        if "error" in reply:
            print(reply.get("traceback", ""), file=sys.stderr)
            if not fatal:
                raise WorkerFailed(f"{cmd} failed: {reply['error']}")
            self.kill(f"{cmd} failed: {reply['error']}")
            raise WorkerFailed(self.dead)
        return reply

    def kill(self, why: str) -> None:
        self.dead = why
        if self.proc.is_alive():
            self.proc.kill()  # our own child, by its handle
            self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive() and not self.dead:
            try:
                self.conn.send(("exit", {}))
                self.conn.poll(30)
            except (OSError, EOFError):
                pass
            self.proc.join(30)
        if self.proc.is_alive():
            self.kill(self.dead or "did not exit")


def _rotate(items: list, i: int) -> list:
    k = i % len(items) if items else 0
    return items[k:] + items[:k]


def _new_row(model: str, case: Case, v: Variant, group: int) -> dict[str, Any]:
    return {"model": model, "case": case.name, **asdict(v), "kind": v.kind, "mergeable": v.mergeable,
            "group": group, "step_times_s": [], "step_cpu_s": [], "losses": [],
            "infer": {}, "error": None}


def run_group(ctx, args, model: str, case: Case, weights: str, rows: dict[str, dict],
              variants: list[Variant]) -> None:
    """Set up, train and infer with every variant of one group, interleaved."""
    workers = {v.label: Worker(ctx, v.label, args.threads, args.device) for v in variants}
    try:
        live: list[Variant] = []
        for v in variants:  # setup one at a time: apply is timed on a quiet process
            row = rows[v.label]
            try:
                row.update(workers[v.label].call("setup", timeout=args.setup_timeout, model=model,
                                                 tiny=args.tiny, weights=weights, variant=asdict(v),
                                                 data_batches_n=args.data_batches))
                if v.compiled:  # the first step compiles: its own (longer) limit
                    r = workers[v.label].call("step", timeout=args.compile_timeout)
                    row["compile_s"] = r["wall"]
                    row["losses"].append(r["loss"])
                live.append(v)
                print(f"[{case.name}] {v.label}: apply {row['apply_s']:.3f} s, trainable "
                      f"{row['trainable_params']:,}", flush=True)
            except WorkerFailed as exc:
                row["error"] = str(exc)
                print(f"[{case.name}] {v.label}: skipped: {exc}", flush=True)
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            for v in _rotate(list(live), i):
                try:
                    r = workers[v.label].call("step", timeout=args.step_timeout)
                except WorkerFailed as exc:
                    rows[v.label]["error"] = str(exc)
                    live.remove(v)
                    continue
                rows[v.label]["losses"].append(r["loss"])
                if i >= args.warmup:
                    rows[v.label]["step_times_s"].append(r["wall"])
                    rows[v.label]["step_cpu_s"].append(r["cpu"])
            print(f"[{case.name}] round {i + 1}/{args.warmup + args.steps}"
                  f"{' (warmup)' if i < args.warmup else ''}: {time.perf_counter() - t0:.1f} s, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
        for v in list(live):
            try:
                rows[v.label].update(workers[v.label].call("memory", timeout=60))
                if not v.compiled:
                    rows[v.label].update(workers[v.label].call("save", timeout=args.setup_timeout))
            except WorkerFailed as exc:
                rows[v.label]["error"] = str(exc)
                live.remove(v)
        run_inference(args, case, workers, rows, [v for v in live if not v.compiled])
    finally:
        for w in workers.values():
            w.close()


def run_inference(args, case: Case, workers: dict[str, Worker], rows: dict[str, dict],
                  live: list[Variant]) -> None:
    if args.infer_reps < 1:
        return
    merging = [v for v in live if v.library == "reference"
               or (v.mergeable and v.kind == "additive")]  # selective: nothing to merge
    for mode, group, warm in (("unmerged", live, 1), ("merged", merging, 0), ("unloaded", merging, 0)):
        if len(group) < 2:  # nothing to compare with the base model
            continue
        t0 = time.perf_counter()
        for i in range(warm + args.infer_reps):
            for v in _rotate(list(group), i):
                try:
                    r = workers[v.label].call("infer", timeout=args.step_timeout, mode=mode)
                except WorkerFailed as exc:
                    rows[v.label]["infer"].setdefault(mode, {})["error"] = str(exc)
                    group.remove(v)
                    continue
                rec = rows[v.label]["infer"].setdefault(mode, {"times_s": [], "cpu_s": []})
                for key in ("enter_s", "max_rel_diff", "structure_equal_base", "structure_diff",
                            "merge_cpu_s", "unmerge_cpu_s"):
                    if key in r and key not in rec:
                        rec[key] = r[key]
                if i >= warm:
                    rec["times_s"].append(r["wall"])
                    rec["cpu_s"].append(r["cpu"])
        print(f"[{case.name}] inference {mode}: {len(group)} variants x {args.infer_reps} in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)


def run_model(ctx, args, model: str) -> dict[str, Any]:
    case, arch = CASES[model](args.tiny), ARCH[model]
    variants = plan_variants(arch, args.methods, args.compile)
    solo = {s.split(":", 1)[1] for s in args.solo if s.split(":", 1)[0] in (model, "*")}
    main = [v for v in variants if v.method not in solo or v.library != "peftvision"]
    groups = [main] + [[variants[0], v] for v in variants if v not in main]
    rows = {v.label: _new_row(model, case, v, gi) for gi, g in enumerate(groups) for v in g
            if v.label != "frozen" or gi == 0}  # a solo group's frozen gets its own row below
    load_start = os.getloadavg()[0]
    t_model = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compare_") as tmp:
        weights = str(Path(tmp) / "weights.pt")
        builder = Worker(ctx, "build", args.threads, args.device)
        try:
            built = builder.call("build_weights", timeout=args.setup_timeout, model=model,
                                 tiny=args.tiny, path=weights)
        finally:
            builder.close()
        print(f"[{case.name}] built ({built['params']:,} parameters) in {built['build_s']:.1f} s; "
              f"variants: {', '.join(v.label for v in variants)}", flush=True)
        for gi, group in enumerate(groups):
            if gi:  # a solo group: its variant plus a frozen reference of its own
                heavy = group[1]
                need = 16 * built["params"] * 1.15 + 2**30  # AdamW: weights, grads, 2 moments
                avail = common.mem_available_bytes()
                if args.device == "cpu" and avail is not None and avail < need:
                    rows[heavy.label]["error"] = (f"skipped: needs ~{need / 2**30:.1f} GiB, "
                                                  f"{avail / 2**30:.1f} GiB available")
                    print(f"[{case.name}] {heavy.label}: {rows[heavy.label]['error']}", flush=True)
                    continue
                rows[f"frozen@{gi}"] = {**_new_row(model, case, group[0], gi), "label": f"frozen@{gi}"}
                group_rows = {"frozen": rows[f"frozen@{gi}"], heavy.label: rows[heavy.label]}
            else:
                group_rows = rows
            run_group(ctx, args, model, case, weights, group_rows, group)
    return {"model": model, "case": case.name, "arch": arch, "tiny": args.tiny,
            "config": case.config, "steps": args.steps, "warmup": args.warmup,
            "infer_reps": args.infer_reps, "threads": args.threads, "device": args.device,
            "data_batches": args.data_batches, "build_s": built["build_s"], "params": built["params"],
            "loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0],
            "elapsed_s": time.perf_counter() - t_model,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "rows": list(rows.values())}


VIT_BLOCK0 = r"blocks\.0\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)"


def run_apply_timing(ctx, args, name: str) -> dict[str, Any]:
    """Apply (then unload) every method of the architecture on one model built once (real,
    randomly initialised weights), in one fresh process."""
    w = Worker(ctx, "apply", args.threads, "cpu")
    res: dict[str, Any] = {"model": name, "rows": [], "timestamp": None}
    try:
        built = w.call("big_build", timeout=args.setup_timeout, name=name, tiny=args.tiny)
        res.update(built)
        arch = built["arch"]
        print(f"[apply] {name}: {built['params']:,} parameters, built in {built['build_s']:.1f} s",
              flush=True)
        names = [n for n, i in pv.methods().items() if arch in i.architectures]
        plan = [(n, "peftvision", None, "") for n in names if n not in DATA_METHODS and n != "svdiff"]
        plan += [("lora", "peft", None, "peft get_peft_model, then unload()")]
        if "svdiff" in names:  # last: the SVD of every weight is by far the slowest
            if arch == "vit":
                plan += [("svdiff", "peftvision", VIT_BLOCK0,
                          f"blocks.0 only (one block's SVDs; the model has {built['depth']} blocks)")]
            if arch != "vit" or args.full_svd:
                plan += [("svdiff", "peftvision", None, "every Linear/Conv/norm: the one-time SVD")]
        for method, library, targets, note in plan:
            row = {"method": method, "library": library, "targets": targets, "note": note}
            try:
                timeout = args.svd_timeout if method == "svdiff" and targets is None else args.setup_timeout
                row.update(w.call("big_apply", timeout=timeout, fatal=False, method=method,
                                  library=library, targets=targets))  # apply rolls back on errors
                if targets == VIT_BLOCK0:
                    row["estimate_all_blocks_s"] = row["apply_s"] * built["depth"]
                    row["note"] += f"; x{built['depth']} = ~{row['estimate_all_blocks_s']:.0f} s for all"
                print(f"[apply] {library} {method}{' (' + row['note'] + ')' if row['note'] else ''}: "
                      f"{row['apply_s']:.3f} s", flush=True)
            except WorkerFailed as exc:
                row["error"] = str(exc)
                print(f"[apply] {method}: {exc}", flush=True)
            res["rows"].append(row)
            if w.dead:
                break
        res["skipped"] = {m: "apply runs a data pass (forward + backward over data=): see its "
                          "apply s in the training rows" for m in DATA_METHODS if m in names}
    except WorkerFailed as exc:
        res["error"] = str(exc)
    finally:
        w.close()
    res["timestamp"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return res


# ---- results file and main --------------------------------------------------------------------

def environment(threads: int, device: str) -> dict[str, Any]:
    import peft

    m = common.machine()
    return {**common.environment(), "peft": peft.__version__, "torch_threads": threads,
            "device": device, "cpu": m["cpu"], "mem_total_gib": m["mem_total_gib"],
            **({"gpu": m["gpu"]} if m.get("gpu") else {})}


def load_results(path: Path | None, env: dict[str, Any] | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("benchmark") != "compare":
        raise SystemExit(f"{path} is not a compare results file; not overwriting it")
    if env is not None and data.get("environment") != env:
        raise SystemExit(f"{path} was written in another environment {data.get('environment')}; "
                         f"use another --out (this one: {env})")
    return data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", choices=(*CASES, "all", "none"), default=["all"],
                   help="models to train and compare; none: only the apply timing")
    p.add_argument("--methods", help="comma-separated peftvision methods (default: all of the "
                                     "architecture's); frozen and the peft peers always run")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--infer-reps", type=int, default=3, help="timed forwards per inference mode")
    p.add_argument("--data-batches", type=int, default=2, help="random batches for shpeft/spt")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny models: the smoke test, seconds")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd LoRA and SSF variants")
    p.add_argument("--compile-timeout", type=float, default=600)
    p.add_argument("--solo", nargs="*", default=["unet:full"],
                   help="MODEL:METHOD run apart with their own frozen (memory); '*' any model")
    p.add_argument("--apply-models", nargs="*", default=["vit_huge_patch14_224", "sd15-unet"],
                   help="models to time apply on (zoo names); none: skip")
    p.add_argument("--no-apply-timing", action="store_true", help="the same as --apply-models")
    p.add_argument("--svdiff-state", action="store_true",
                   help="count SV-Diff's state on the SD-1.5 UNet per factors layout (meta, seconds)")
    p.add_argument("--full-svd", action="store_true",
                   help="also time svdiff's SVD of every ViT weight (default: blocks.0, scaled)")
    p.add_argument("--svd-timeout", type=float, default=600, help="limit for svdiff's full apply")
    p.add_argument("--setup-timeout", type=float, default=900)
    p.add_argument("--step-timeout", type=float, default=900)
    p.add_argument("--out", type=Path, help="merge the results into this JSON file")
    p.add_argument("--markdown", type=Path, help="write the tables (from --out) to this file")
    p.add_argument("--render", action="store_true", help="no measuring: render --out to --markdown")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.infer_reps < 0:
        p.error("--steps must be >= 1, --warmup and --infer-reps >= 0")
    if args.render and not args.out:
        p.error("--render needs --out (the JSON to render)")
    args.models = list(CASES) if "all" in args.model else [m for m in dict.fromkeys(args.model)
                                                           if m != "none"]
    args.methods = args.methods.split(",") if args.methods else None
    if args.no_apply_timing:
        args.apply_models = []
    if args.tiny:
        args.apply_models = ["vit-tiny" if "unet" not in m else "unet-tiny" for m in args.apply_models]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        data = load_results(args.out, None)
        if data is None:
            raise SystemExit(f"{args.out} does not exist")
    else:  # rendered from the JSON form, exactly as --render would read it back
        data = json.loads(json.dumps(measure(args, argv)))
    text = render(data, str(args.out)) if args.out else render(data, "(not saved)")
    print("\n" + text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
        print(f"wrote {args.markdown}")
    return data


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # read by the server's torch import
        os.environ[var] = str(args.threads)
    torch.set_num_threads(args.threads)
    env = environment(args.threads, args.device)
    data = load_results(args.out, env) or {"benchmark": "compare", "environment": env,
                                           "models": {}, "apply_timing": {}, "commands": []}
    common.load_warning(args.threads)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    stamp = {"git_sha": common.git_sha(), "git_dirty": common.git_dirty(),
             "command": "python -m benchmarks.perf.compare " + " ".join(argv)}
    for model in args.models:
        entry = {**run_model(ctx, args, model), **stamp}
        summarise(entry)
        data["models"][entry["case"]] = entry
        if args.out:  # after every model: a later failure keeps what was measured
            common.write_json(args.out, data)
    for name in args.apply_models:
        timing = data.get("apply_timing") or {}
        timing[name] = {**run_apply_timing(ctx, args, name), **stamp}
        data["apply_timing"] = timing
        if args.out:
            common.write_json(args.out, data)
    if args.svdiff_state:
        from . import svdiff_state

        data["svdiff_state"] = {**svdiff_state.measure(), **stamp}
    # only the commands whose results the file still holds (a model measured again replaces them)
    sources = [*data["models"].values(), *(data.get("apply_timing") or {}).values(),
               data.get("svdiff_state") or {}]
    held = {e.get("command") for e in sources}
    data["commands"] = [c for c in data.get("commands", []) if c[0] != stamp["command"] and c[0] in held]
    data["commands"].append([stamp["command"], dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")])
    data["machine"] = common.machine()
    if args.out:
        common.write_json(args.out, data)
        print(f"wrote {args.out}")
    return data


if __name__ == "__main__":  # run through the package name, so workers find worker_main by it
    from benchmarks.perf import compare

    compare.main()
