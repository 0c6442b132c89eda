"""One JSON file per run: what ran (configs, versions, git sha, hardware) and what came out.

Tables and plots are made from these files only (`load_results`), never typed by hand.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

KIND = "peftvision-benchmark-run"
SCHEMA = 1
RESULT_NAME = "result.json"
REPO = Path(__file__).resolve().parents[1]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(text)).strip("-") or "x"


def run_name(dataset: str, model: str, label: str, fraction: float, seed: int,
             digest: str | None = None) -> str:
    """Directory name of one run: dataset__model__method__f<fraction>__s<seed>[__<digest>]."""
    parts = [slug(dataset), slug(model), slug(label), f"f{fraction:g}", f"s{seed}"]
    return "__".join(parts + ([digest] if digest else []))


def config_digest(config: dict) -> str:
    """8 hex digits of sha256 over a run's configuration (JSON, sorted keys): runs that differ in
    anything, method options included, get different folders instead of overwriting each other."""
    text = json.dumps(_clean(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# -- provenance ----------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def versions() -> dict:
    import peftvision

    return {"python": platform.python_version(), "peftvision": peftvision.__version__,
            **{m: _version(m) for m in ("torch", "timm", "accelerate", "numpy", "pillow")}}


def git_info() -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def hardware(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def environment(device: str, num_processes: int = 1) -> dict:
    return {"versions": versions(), "git": git_info(),
            "hardware": {**hardware(device), "num_processes": num_processes}}


# -- memory --------------------------------------------------------------------------------------
def reset_peak_memory(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """CUDA: max allocated bytes during the run. CPU: the process's peak resident set size, which
    the OS only reports for the whole process so far (a run after a bigger one shows the larger)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return {"kind": "cpu_peak_rss_process", "bytes": int(kb * scale)}
    except ImportError:  # Windows
        return {"kind": "unavailable", "bytes": None}


# -- files ---------------------------------------------------------------------------------------
def _clean(value):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, unknown objects -> their repr."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return _clean(value.item())
    return repr(value)


def write_result(result: dict, directory: str | os.PathLike) -> Path:
    """Write result.json into `directory` (atomically: a temp file renamed over it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RESULT_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(result), indent=2) + "\n")
    os.replace(tmp, path)
    return path


class BadResult(ValueError):
    """A result file that tables, plots and --resume cannot use (empty, cut short, fields missing)."""

    is_result = False  # True: the file says it is a run result (kind) but lacks what tables need


# What row() and the run summary read; a result without one of these is skipped, never half-read.
REQUIRED = (("config", "data_fraction"), ("config", "seed"), ("method", "label"), ("dataset", "name"),
            ("dataset", "split", "sizes"), ("model", "name"), ("model", "pretrained"),
            ("metrics", "test", "macro_f1"), ("metrics", "test", "accuracy"), ("metrics", "test", "auroc"),
            ("parameters", "trainable"), ("parameters", "method_params"), ("parameters", "total"),
            ("wall_time_s",))


def check_result(result: dict) -> None:
    """Raise BadResult naming the first missing or unusable field of a classification result."""
    for keys in REQUIRED:
        node = result
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                raise BadResult(f"field {'.'.join(keys)} is missing")
            node = node[k]
    test = result["metrics"]["test"]
    for k in ("macro_f1", "accuracy"):
        if not (test[k] is None or isinstance(test[k], (int, float)) and not isinstance(test[k], bool)):
            raise BadResult(f"metrics.test.{k} is {test[k]!r}, not a number")
    if test.get("n", 1) == 0:
        raise BadResult("its test split was empty (metrics.test.n = 0)")


def read_result(path: str | os.PathLike) -> dict:
    """One result.json, checked; BadResult says why it cannot be used."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadResult(f"cannot be read ({e})") from e
    if not text.strip():
        raise BadResult(f"is empty ({path.stat().st_size} bytes; a run killed while writing?)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadResult(f"is not valid JSON ({e}; cut short?)") from e
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise BadResult(f"is not a peftvision benchmark result (no \"kind\": \"{KIND}\")")
    if data.get("task", "classification") == "classification":
        try:
            check_result(data)
        except BadResult as e:
            e.is_result = True  # a result, whatever its file name: never dropped silently
            raise
    return data


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_results(directory: str | os.PathLike, warn: Callable[[str], None] = print_warning) -> list[dict]:
    """Every classification run result under `directory` (recursively), oldest path first. A
    result.json that cannot be used is skipped with a warning naming it; other JSON files
    (adapter configs, HPO summaries) are not results and are passed over."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"results directory not found: {directory}")
    found = []
    for path in sorted(directory.rglob("*.json")):
        try:
            data = read_result(path)
        except BadResult as e:
            if path.name == RESULT_NAME or e.is_result:
                warn(f"skipped {path}: it {e}")
            continue
        if data.get("task", "classification") == "classification":  # tables: classification
            data["_path"] = str(path)
            found.append(data)
    return found


def row(result: dict) -> dict:
    """The flat fields tables and plots use, from one result."""
    test = result["metrics"]["test"]
    params = result["parameters"]
    return {
        "dataset": result["dataset"]["name"],
        "dataset_size": result["dataset"]["split"]["sizes"],
        "model": result["model"]["name"],
        "pretrained": result["model"]["pretrained"],
        "method": result["method"]["label"],
        "options": result["method"].get("options") or {},
        "fraction": result["config"]["data_fraction"],
        "seed": result["config"]["seed"],
        "f1": test["macro_f1"],
        "accuracy": test["accuracy"],
        "auroc": test["auroc"],
        "trainable": params["trainable"],
        "method_params": params["method_params"],
        "total": params["total"],
        "wall_time_s": result["wall_time_s"],
    }


def options_text(options: dict) -> str:
    """{"r": 8, "alpha": 16} -> "alpha=16,r=8" (values as compact JSON)."""
    return ",".join(f"{k}={json.dumps(v, separators=(',', ':'), sort_keys=True)}"
                    for k, v in sorted(options.items()))


def rows(results: list[dict], warn: Callable[[str], None] = print_warning) -> list[dict]:
    """row() of each result. Where one method label ran on one model with several option sets
    (lora r=2 and r=4), each set becomes its own method, "lora[r=2]": never averaged together as
    if they were seeds. (Per model: presets may give a method other options on another model.)
    Repeats of one configuration, seed included (two HPO workers retraining the same trial),
    count once, the last by path, with a warning: repeats are not seeds."""
    latest: dict[str, dict] = {}
    for r in results:
        digest = r.get("config_digest")
        if digest in latest:
            warn(f"{latest[digest].get('_path')} and {r.get('_path')} ran the same configuration "
                 "(seed included): counted once, from the second")
        latest[digest or str(id(r))] = r
    out = [row(r) for r in latest.values()]
    variants: dict[tuple[str, str], set[str]] = {}
    for r in out:
        variants.setdefault((r["model"], r["method"]), set()).add(options_text(r["options"]))
    for r in out:
        text = options_text(r["options"])
        if len(variants[r["model"], r["method"]]) > 1 and text:
            r["method"] = f"{r['method']}[{text}]"
    return out
