"""One JSON file per run: what ran (configs, versions, git sha, hardware) and what came out.

Tables and plots are made from these files only (`load_results`), never typed by hand.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

KIND = "peftvision-benchmark-run"
SCHEMA = 1
RESULT_NAME = "result.json"
REPO = Path(__file__).resolve().parents[1]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(text)).strip("-") or "x"


def run_name(dataset: str, model: str, label: str, fraction: float, seed: int) -> str:
    """Directory name of one run: dataset__model__method__f<fraction>__s<seed>."""
    return "__".join([slug(dataset), slug(model), slug(label), f"f{fraction:g}", f"s{seed}"])


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


def load_results(directory: str | os.PathLike) -> list[dict]:
    """Every run result under `directory` (recursively), oldest path first."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"results directory not found: {directory}")
    found = []
    for path in sorted(directory.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (isinstance(data, dict) and data.get("kind") == KIND
                and data.get("task", "classification") == "classification"):  # tables: classification
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
