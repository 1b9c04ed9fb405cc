"""Fixtures shared by the test files (helpers they are built from: ``_helpers.py``)."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from _helpers import SHARED_DATA, entry_files, save_models, synthetic_image


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _lgam_default_path():
    """Every test starts from LGAM's default dispatch, as users get it (auto: its op, the C++
    kernels, where they build, built once per machine into the user's cache)."""
    from lgam.attention import set_fused_kernels

    set_fused_kernels(None)
    yield
    set_fused_kernels(None)


def _require_kernels() -> None:
    from lgam.attention.lgam.kernels import kernel_missing

    why = kernel_missing()
    if why:
        pytest.skip(f"LGAM's CPU kernels cannot be built here: {why}")
    if torch.get_default_device().type != "cpu":
        pytest.skip("LGAM's kernels are CPU-only")


@pytest.fixture
def fused():
    """LGAM's op (the C++ kernels) forced on; skips, saying why, where they cannot be built or
    the test runs on another device."""
    from lgam.attention import set_fused_kernels

    _require_kernels()
    set_fused_kernels(True)


@pytest.fixture(params=["eager", "fused"])
def lgam_path(request) -> str:
    """The test once per LGAM path: ``eager`` (its equations as plain tensor ops, differentiated
    by autograd: ``set_fused_kernels(False)``) and ``fused`` (its op, as the ``fused`` fixture)."""
    from lgam.attention import set_fused_kernels

    if request.param == "fused":
        _require_kernels()
    set_fused_kernels(request.param == "fused")
    return request.param


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def on_every_device(request):
    """Run the test once per device here (CPU; CUDA where there is a GPU) as torch's default
    device, float32 convolutions exact (no TF32); ``torch.get_default_device().type`` names it."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.set_default_device(request.param)
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device(request.param)
    finally:
        torch.set_default_device("cpu")
        torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture(scope="session")
def imagenet20_dir() -> Path:
    d = SHARED_DATA / "imagenet20"
    if not (d / "classes.tsv").exists():
        pytest.skip(f"ImageNet-20 not found at {d} (set LGAM_SHARED_DATA to its parent folder)")
    return d


@pytest.fixture(scope="session")
def app_checkpoints(tmp_path_factory) -> Path:
    """A checkpoint folder with the six perturbed models (float16 safetensors + manifest)."""
    return save_models(tmp_path_factory.mktemp("app_ckpt"))


@pytest.fixture(scope="session")
def broken_checkpoints(app_checkpoints, tmp_path_factory) -> Path:
    """A copy where SGE's weights file is corrupted and BAM's weights file is missing."""
    d = tmp_path_factory.mktemp("broken_ckpt")
    shutil.copytree(app_checkpoints, d, dirs_exist_ok=True)
    for f in entry_files(d, "resnet18_sge"):
        data = bytearray(f.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        f.write_bytes(bytes(data))
    for f in entry_files(d, "resnet18_bam"):
        f.unlink()
    return d


@pytest.fixture(scope="session")
def engine(app_checkpoints):
    from lgam.engine import CamEngine

    return CamEngine.from_checkpoints(app_checkpoints, device="cpu", precision="float32")


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return [synthetic_image(i, (96 + 8 * i, 80 + 4 * i)) for i in range(8)]
