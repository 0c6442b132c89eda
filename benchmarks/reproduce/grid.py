"""A paper's experiment grid as data: one `Run` per training run, the settings each paper fixes,
and the choices we made where the paper is silent ("paper says / we do / why").

Nothing here imports torch: `reproduce NAME --dry-run --json` prints a grid on any machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Published image counts of the datasets (used for cost estimates and for the split tests).
DATASET_SIZES = {"breastus": 780, "ham10000": 10015, "fitzpatrick17k": 16577, "smdg": 12449,
                 "rsna-pneumonia": 20412, "mimic-cxr": 110000}

# Forward GMACs per image at 224 px (timm's model cards), for the cost estimate only.
GMACS = {"resnet50": 4.1, "vit_base_patch16_224": 17.6, "vit_large_patch16_224": 61.6,
         "vit_huge_patch14_224": 167.4, "vit_base_patch16_clip_224": 17.6}
ASSUMED_TFLOPS = 100.0  # sustained bf16 training throughput of one modern GPU (A100/H100 class)


@dataclass(frozen=True)
class Choice:
    """Where the paper is silent or inconsistent: what it says, what we do, and why."""
    topic: str
    paper: str
    ours: str
    why: str


@dataclass(frozen=True)
class Run:
    """One training run of a grid, in the JSON that `--dry-run --json` prints."""
    grid: str
    dataset: str
    model: str
    weights: str  # "hub" (the timm tag in `model`), "none", or a local file
    method: tuple[str, ...]
    label: str
    options: dict
    optimizer: str  # "adamw" | "sgd"
    weight_decay: float
    batch_size: int  # the paper's (effective) batch size
    micro_batch: int  # per step on one device; batch_size / micro_batch gradient-accumulation steps
    lr: float | str  # a number, or "hpo": Optuna per (dataset, model, method, fraction)
    schedule: str  # "warmup-cosine" | "cosine"
    epochs: int | None
    steps: int | None  # iteration-based training (SH-PEFT): steps instead of epochs
    seed: int
    fraction: float  # share of the training split used
    split: dict  # {"train": .., "val": .., "test": ..} fractions, or {"fixed": [n_train, n_val, n_test]}
    head: str  # "linear" | "l2norm-linear"
    image_size: int = 224
    hpo_trials: int | None = None
    patience: int = 5  # early stopping on val macro-F1 in epochs (0: none); the best epoch is tested
    task: str = "classification"  # or "text-to-image"
    extra: dict = field(default_factory=dict)  # task-specific settings (FID images, prompts, ...)

    @property
    def cell(self) -> tuple:
        """Runs that share everything but the seed: one HPO study, one table cell."""
        return (self.dataset, self.model, self.label, self.fraction)

    @property
    def accumulation(self) -> int:
        return max(1, self.batch_size // self.micro_batch)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"] = list(self.method)
        d["gradient_accumulation"] = self.accumulation
        d["cost_gpu_hours"] = round(cost_gpu_hours(self), 4)
        return d


@dataclass(frozen=True)
class Grid:
    name: str
    paper: str  # which table/figure of which paper
    about: str
    runs: tuple[Run, ...]
    output: str  # what `reproduce` ends with: "table", "table3", "figure1", "figure3", "table4", ...
    choices: tuple[Choice, ...] = ()
    runnable: str = ""  # empty: runs here; else why it only prints (e.g. a loader still missing)

    def narrow(self, *, datasets=None, models=None, methods=None, seeds=None) -> Grid:
        keep = [r for r in self.runs
                if (not datasets or r.dataset in datasets) and (not models or r.model in models)
                and (not methods or r.label in methods) and (seeds is None or r.seed in seeds)]
        return dataclasses.replace(self, runs=tuple(keep))

    def cost_gpu_hours(self) -> float:
        """Rough: every run (and every HPO trial, counted as a full run) at ASSUMED_TFLOPS."""
        cells = {}
        for r in self.runs:
            cells.setdefault(r.cell, []).append(r)
        total = sum(cost_gpu_hours(r) for r in self.runs)
        total += sum((rs[0].hpo_trials or 0) * cost_gpu_hours(rs[0]) for rs in cells.values()
                     if rs[0].lr == "hpo")
        return total


def cost_gpu_hours(run: Run) -> float:
    """Training FLOPs ≈ 3 × forward (2 FLOPs per MAC) × images seen; / ASSUMED_TFLOPS. Frozen
    backbones still pay the forward and most of the backward, so PEFT is costed like full."""
    if run.task != "classification":
        return 0.0
    base = run.model.split(".")[0]
    gmacs = GMACS.get(base, 1.0) * (run.image_size / 224) ** 2
    train_share = run.split.get("train", 0.7) if "fixed" not in run.split else 0.7
    images = (run.steps * run.batch_size if run.steps else
              DATASET_SIZES.get(run.dataset, 1000) * train_share * run.fraction * (run.epochs or 1))
    return 3 * 2 * gmacs * 1e9 * images / (ASSUMED_TFLOPS * 1e12) / 3600
