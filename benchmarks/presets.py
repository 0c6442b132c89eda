"""The papers' experiment grids as data: models × methods × datasets × data fractions × seeds.

Dataset paths are relative to `--data-root`; the layouts expected there are in DATASETS. The
dataset lists are our reading of the papers (Dutt et al. MIDL 2024; Liu et al. MICCAI 2024, SH-PEFT):
check them against the papers before citing numbers, and add or replace datasets with
`--dataset NAME=SPEC`. Hyper-parameters are the library defaults; the papers tuned them per
method (see benchmarks/hpo.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

from .train import RunConfig


@dataclass(frozen=True)
class Method:
    label: str
    method: str | tuple[str, ...]
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Dataset:
    name: str
    spec: str  # "{root}" is replaced by --data-root
    layout: str  # what to put there


DATASETS = {
    "breastus": Dataset("breastus", "imagefolder:{root}/busi",
                        "BUSI (Al-Dhabyani et al. 2020): busi/{benign,malignant,normal}/*.png"),
    "ham10000": Dataset("ham10000", "imagefolder:{root}/ham10000",
                        "HAM10000: ham10000/<dx class: akiec,bcc,bkl,df,mel,nv,vasc>/*.jpg"),
    "fitzpatrick17k": Dataset("fitzpatrick17k", "csv:{root}/fitzpatrick17k/labels.csv",
                              "Fitzpatrick17k: labels.csv with path,label rows, written from the download "
                              "by `python -m benchmarks.datasets fitzpatrick17k DIR --out ...`"),
    "smdg": Dataset("smdg", "csv:{root}/smdg/labels.csv",
                    "SMDG-19: labels.csv with path,label rows, written from the Kaggle download by "
                    "`python -m benchmarks.datasets smdg DIR --out ...`"),
    "covid19-ct": Dataset("covid19-ct", "imagefolder:{root}/covid19-ct",
                          "COVID19-CT: covid19-ct/{covid,noncovid}/*"),
    "chaoyang": Dataset("chaoyang", "csv:{root}/chaoyang/labels.csv",
                        "Chaoyang pathology: labels.csv with path,label,split rows (official split)"),
}

RESNET_METHODS = (Method("full", "full"), Method("linear", "linear"), Method("bias", "bias"),
                  Method("batchnorm", "batchnorm"), Method("bias+batchnorm", ("bias", "batchnorm")),
                  Method("lora", "lora"), Method("ssf", "ssf"), Method("tsa", "tsa"))
VIT_METHODS = (Method("full", "full"), Method("linear", "linear"), Method("bias", "bias"),
               Method("layernorm", "layernorm"), Method("attention", "attention"),
               Method("bias+norm+attention", ("bias", "norm", "attention")),
               Method("lora", "lora"), Method("ssf", "ssf"), Method("adaptformer", "adaptformer"),
               Method("vpt-shallow", "vpt", {"mode": "shallow"}), Method("vpt-deep", "vpt", {"mode": "deep"}))


@dataclass(frozen=True)
class Preset:
    name: str
    about: str
    models: tuple[str, ...]
    methods: tuple[Method, ...]
    datasets: tuple[str, ...]
    fractions: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0, 1, 2)
    run: dict = field(default_factory=lambda: {"epochs": 20, "image_size": 224, "batch_size": 32,
                                               "lr": 1e-3, "patience": 5})
    note: str = ""


PRESETS = {
    "paper-resnet50": Preset(
        "paper-resnet50", "Dutt et al. Table 2: PEFT on an ImageNet ResNet-50",
        ("resnet50.tv_in1k",), RESNET_METHODS, ("breastus", "ham10000", "fitzpatrick17k", "smdg")),
    "paper-vit": Preset(
        "paper-vit", "Dutt et al. Table 3: PEFT on ViT-B/L/H (ImageNet-21k weights)",
        ("vit_base_patch16_224.augreg_in21k", "vit_large_patch16_224.augreg_in21k",
         "vit_huge_patch14_224.orig_in21k"), VIT_METHODS,
        ("breastus", "ham10000", "fitzpatrick17k", "smdg")),
    "data-volume": Preset(
        "data-volume", "Dutt et al. Figure 1: F1 against the fraction of training data (ViT-B)",
        ("vit_base_patch16_224.augreg_in21k",),
        (Method("full", "full"), Method("linear", "linear"), Method("bias", "bias"),
         Method("lora", "lora"), Method("ssf", "ssf"), Method("adaptformer", "adaptformer")),
        ("ham10000", "breastus"), fractions=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0)),
    "shpeft-clip": Preset(
        "shpeft-clip", "Liu et al. (SH-PEFT) Table 1: PEFT on CLIP ViT-B/16",
        ("vit_base_patch16_clip_224.openai",),
        (Method("full", "full"), Method("linear", "linear"), Method("bias", "bias"),
         Method("lora", "lora"), Method("ssf", "ssf"), Method("adaptformer", "adaptformer"),
         Method("vpt-deep", "vpt", {"mode": "deep"}), Method("spt", "spt"), Method("shpeft", "shpeft")),
        ("breastus", "covid19-ct", "chaoyang"),
        note="the paper evaluates six datasets; three are listed here, add the others with "
             "--dataset NAME=SPEC"),
}


def dataset_path(spec: str) -> Path | None:
    """The file or directory a spec names (None for generated data and MedMNIST names)."""
    kind, _, arg = spec.partition(":")
    if kind == "demo" or not arg or (kind == "medmnist" and not arg.endswith(".npz")):
        return None
    return Path(arg).expanduser()


def missing_data(datasets: dict[str, str]) -> dict[str, str]:
    """name -> spec of the datasets whose files are not there."""
    return {n: s for n, s in datasets.items() if (p := dataset_path(s)) is not None and not p.exists()}


def weights_for(model: str, weights_dir: str | None) -> str | None:
    """A local weights file for `model` in `weights_dir`: MODEL.safetensors/.pth/.bin or
    MODEL/model.safetensors (a Hub snapshot); None when absent."""
    if not weights_dir:
        return None
    d = Path(weights_dir)
    for candidate in (d / f"{model}.safetensors", d / f"{model}.pth", d / f"{model}.bin",
                      d / model / "model.safetensors", d / model / "pytorch_model.bin"):
        if candidate.is_file():
            return str(candidate)
    return None


def resolve_datasets(preset: Preset, data_root: str | None, extra: dict[str, str],
                     only: list[str] | None = None) -> dict[str, str]:
    names = list(only or preset.datasets)
    out = {}
    for n in names:
        if n in extra:
            out[n] = extra[n]
        elif n in DATASETS:
            if data_root is None:
                raise SystemExit(f"{preset.name}: dataset {n!r} needs --data-root (expected layout: "
                                 f"{DATASETS[n].layout}) or --dataset {n}=SPEC")
            out[n] = DATASETS[n].spec.format(root=str(data_root).rstrip("/"))
        else:
            raise SystemExit(f"unknown dataset {n!r}; known: {', '.join(DATASETS)}; or give --dataset NAME=SPEC")
    out.update({n: s for n, s in extra.items() if n not in out})
    return out


def expand(preset: Preset, datasets: dict[str, str], *, seeds=None, models=None, out: str | None = None,
           weights_dir: str | None = None, pretrained: bool = True, overrides: dict | None = None
           ) -> list[RunConfig]:
    """Every RunConfig of the grid, in a stable order (dataset, model, fraction, seed, method)."""
    runs = []
    for (name, spec), model, fraction, seed, m in itertools.product(
            datasets.items(), models or preset.models, preset.fractions, seeds or preset.seeds,
            preset.methods):
        cfg = RunConfig(dataset=spec, model=model, method=list(m.method) if isinstance(m.method, tuple)
                        else m.method, method_options=dict(m.options), seed=seed, data_fraction=fraction,
                        pretrained=pretrained, weights=weights_for(model, weights_dir) if pretrained else None,
                        out=out, label=m.label, dataset_name=name, **preset.run)
        runs.append(replace(cfg, **(overrides or {})))
    return runs


# -- the offline demo ------------------------------------------------------------------------------
DEMO_MODELS = ("tiny-resnet", "tiny-vit")
DEMO_COMBOS = (("bias", "norm", "attention"), ("lora", "bias"))
DEMO_RUN = {"epochs": 10, "image_size": 32, "batch_size": 32, "lr": 3e-3, "patience": 5,
            "warmup_epochs": 1, "pretrained": False}
DEMO_VOLUME = {"model": "tiny-resnet", "methods": ("full", "linear", "lora", "bias"),
               "fractions": (0.25, 0.5)}  # plus the 100% runs of the main grid


def demo_methods() -> list[str | list[str]]:
    """Every registered classification method (pv.methods(), at run time) and the combinations."""
    from .models import classification_methods

    return [*sorted(classification_methods()), *[list(c) for c in DEMO_COMBOS]]


def demo_runs(out: str, *, methods: list | None = None, seeds=(0,), volume: bool = True,
              overrides: dict | None = None) -> list[RunConfig]:
    """The demo grid: methods × the tiny models on the generated dataset, then a small data-volume
    sweep (Figure 1) on tiny-resnet. Runs a method cannot do on a model are skipped at run time."""
    run = {**DEMO_RUN, **(overrides or {})}
    methods = methods if methods is not None else demo_methods()
    runs = [RunConfig(dataset="demo", model=model, method=m, seed=seed, out=out, **run)
            for model in DEMO_MODELS for m in methods for seed in seeds]
    if volume:
        wanted = [m for m in methods if isinstance(m, str) and m in DEMO_VOLUME["methods"]]
        runs += [RunConfig(dataset="demo", model=DEMO_VOLUME["model"], method=m, seed=seed, out=out,
                           data_fraction=f, **run)
                 for f in DEMO_VOLUME["fractions"] for m in wanted for seed in seeds]
    return runs
