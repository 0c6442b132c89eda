"""Every example runs offline in its tiny setting."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY_ARGS = {
    "quickstart.py": ["--epochs", "1", "--steps", "2"],
    "vit_lora_dermatology.py": ["--tiny"],
    "resnet50_ssf.py": ["--steps", "4"],
    "unet_bias_text_to_image.py": ["--tiny"],
    "shpeft_clip.py": ["--steps", "3"],
    "hub_push_and_load.py": ["--dry-run", "--steps", "2"],
}


# the two that build the most models run with the slow tests
SLOW = {"quickstart.py", "unet_bias_text_to_image.py"}


@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.slow] if s in SLOW else [])
                                    for s in sorted(TINY_ARGS)])
def test_example_runs(script, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *TINY_ARGS[script],
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "all checks passed" in done.stdout
