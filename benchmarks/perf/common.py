"""Measuring helpers shared by the perf benchmarks (bias_step, compare): medians, process
memory, the environment a figure was measured in, and atomic result files."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import peftvision as pv


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rss_mb(field_name: str) -> float | None:
    """VmRSS / VmHWM of this process in MiB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: "5" to clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def max_rss_mb() -> float:
    """Peak resident set of this process since it started (getrusage ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """gc, then hand freed heap pages back to the OS (glibc keeps them otherwise), so an idle
    process holds little more than its live tensors."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def environment() -> dict[str, Any]:
    """Library versions and machine size (bias_step's results files compare this dict)."""
    import diffusers
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__,
            "diffusers": diffusers.__version__,
            "peftvision": pv.__version__, "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": "cpu"}


def machine() -> dict[str, Any]:
    """What the figures were measured on, beyond `environment()`."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "platform": platform.platform(),
                            "mem_total_gib": None, "cuda": torch.cuda.is_available()}
    try:
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        info["mem_total_gib"] = round(total / 2**20, 1)
    except (OSError, StopIteration):
        pass
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_dirty() -> bool | None:
    """True when the working tree differs from HEAD (the figures then are not HEAD's)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent).stdout
        return bool(out.strip())
    except (OSError, subprocess.CalledProcessError):
        return None


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON through a temp file and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def load_warning(threads: int) -> float:
    """Print the load average; warn when other work shares the machine. Returns the 1-min load."""
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {threads} thread(s), {os.cpu_count()} CPUs, "
          f"load average {load:.2f}", flush=True)
    if load > 0.5 * (os.cpu_count() or 1):
        print("warning: the machine is busy; wall times are inflated: compare the ratios and the "
              "CPU-time column", flush=True)
    return load
