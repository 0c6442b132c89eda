import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py: tiny model factories

REPO = Path(__file__).resolve().parents[1]
# ../shared/data/busi beside the repo; PEFTVISION_BUSI points elsewhere (e.g. from a git worktree)
BUSI = Path(os.environ.get("PEFTVISION_BUSI", REPO.parent / "shared" / "data" / "busi"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def busi_dir() -> Path:
    if not BUSI.is_dir():
        pytest.skip(f"real BUSI images not found at {BUSI} "
                    "(../shared/data/busi beside the repo, or set PEFTVISION_BUSI)")
    return BUSI
