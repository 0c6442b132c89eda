"""`accelerate launch` of `python -m benchmarks ...` on 2 CPU processes (gloo), for the tests that
check several processes give one process's result.

With accelerate 1.15, `--cpu --num_processes 2` starts a single process, so the launch asks for
`--multi_gpu` with no GPU visible (CUDA_VISIBLE_DEVICES=""), which runs 2 CPU processes on gloo.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
needs_launcher = pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                                    reason="the accelerate launcher is not installed beside this Python")


def _free_port() -> int:
    with socket.socket() as s:  # other test runs on this machine may hold accelerate's 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(benchmark_args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """`python -m benchmarks *benchmark_args` on 2 processes; fails the test if it fails."""
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "benchmarks", *benchmark_args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
