import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LGAM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def imagenet20_dir() -> Path:
    d = SHARED_DATA / "imagenet20"
    if not (d / "classes.tsv").exists():
        pytest.skip(f"ImageNet-20 not found at {d} (set LGAM_SHARED_DATA to its parent folder)")
    return d
