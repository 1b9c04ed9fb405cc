"""Fixtures shared by the test files (helpers they are built from: ``_helpers.py``)."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

if not torch.cuda.is_available():  # before anything imports Triton: it reads this once
    # LGAM's Triton kernels then run interpreted, on CPU tensors (``triton_kernels`` below)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _helpers import SHARED_DATA, entry_files, save_models, synthetic_image


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _lgam_default_path():
    """Every test starts from LGAM's default dispatch, as users get it (auto: the fused CPU
    kernels where they build, built once per machine into the user's cache)."""
    from lgam.attention import set_fused_kernels

    set_fused_kernels(None)
    yield
    set_fused_kernels(None)


def _require_kernels() -> None:
    from lgam.attention._lgam_kernel import kernel_missing

    why = kernel_missing()
    if why:
        pytest.skip(f"LGAM's CPU kernels cannot be built here: {why}")
    if torch.get_default_device().type != "cpu":
        pytest.skip("LGAM's fused kernels are CPU-only")


@pytest.fixture
def fused():
    """LGAM's fused path forced on (the CPU kernels); skips, saying why, where they cannot be
    built or the test runs on another device."""
    from lgam.attention import set_fused_kernels

    _require_kernels()
    set_fused_kernels(True)


def _require_triton() -> None:
    from lgam.attention._lgam_triton import triton_missing

    why = triton_missing()
    if why:
        pytest.skip(f"LGAM's Triton kernels cannot run here: {why}")
    if torch.get_default_device().type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only interpreted (TRITON_INTERPRET=1, "
                    "which the tests set where there is no GPU)")


@pytest.fixture
def triton_kernels(monkeypatch):
    """LGAM's fused path forced on with its GPU (Triton) kernels: compiled, on CUDA tensors where
    the test runs on the GPU; else taking CPU tensors, interpreted (how a machine without a GPU
    checks them)."""
    from lgam.attention import _lgam_kernel, set_fused_kernels
    from lgam.attention._lgam_triton import triton_kernels

    _require_triton()
    if torch.get_default_device().type == "cpu":
        monkeypatch.setitem(_lgam_kernel.BACKENDS, "cpu", triton_kernels())
        _masked_loads_read_nan(monkeypatch)
    set_fused_kernels(True)


def _masked_loads_read_nan(monkeypatch) -> None:
    """Triton's interpreter fills the masked lanes of a load without ``other`` with zeros; a GPU
    leaves whatever was there. NaN instead, so that a kernel whose masked lanes leak into its
    results fails here too."""
    import numpy as np
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_masked_load"):
        return
    original = builder.create_masked_load

    def load(self, ptrs, mask, other, *args, **kwargs):
        ty = ptrs.get_element_ty()
        if other is None and ty.is_floating():
            bits = np.uint16(0x7FC0) if ty.is_bf16() else np.nan  # bf16 is stored as uint16
            data = np.full(ptrs.data.shape, bits, dtype=interpreter._get_np_dtype(ty))
            other = interpreter.TensorHandle(data, ty)
        return original(self, ptrs, mask, other, *args, **kwargs)

    monkeypatch.setattr(builder, "create_masked_load", load)


# Triton runs interpreted on CPU tensors here (seconds a test): the default run has it, the quick
# lane (-m "not slow") keeps eager and the C++ kernels
@pytest.fixture(params=["eager", "fused", pytest.param("triton", marks=pytest.mark.slow)])
def lgam_path(request) -> str:
    """The test once per LGAM path: ``eager`` (batched products, hand-written backward),
    ``fused`` (as the ``fused`` fixture) and ``triton`` (as ``triton_kernels``)."""
    from lgam.attention import set_fused_kernels

    if request.param == "triton":
        request.getfixturevalue("triton_kernels")
        return request.param
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
