"""Device choice and the fast numeric path, shared by training, the CAM engine and the app."""
from __future__ import annotations

import functools
import os
import platform
import re
import warnings
from pathlib import Path

import torch

__all__ = ["resolve_device", "cuda_arch_problem", "cpu_has_native_bf16", "bf16_native", "cpu_name",
           "device_summary"]

# CPU flags (as Linux's /proc/cpuinfo spells them) that mean bfloat16 matrix multiplies in hardware:
# x86 AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX-BF16 (Sapphire Rapids and later); Arm's
# BF16 extension (Neoverse V1/N2, Graviton 3 and later) shows as "bf16" in its Features line.
_BF16_FLAGS = {"x86_64": ("avx512_bf16", "amx_bf16"), "aarch64": ("bf16",)}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``None``/``"auto"`` -> CUDA when available and this torch build runs on its GPU, else CPU
    (with a warning that says why). A bare ``"cuda"`` is this process's GPU (``cuda:LOCAL_RANK``
    under torchrun). Raises ``ValueError`` for CUDA without a usable GPU or a name torch does not
    know."""
    auto = device is None or str(device) == "auto"
    if auto:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        count = torch.cuda.device_count()
        if dev.index >= count:
            raise ValueError(f"device {str(dev)!r} requested but this machine has {count} GPU(s): "
                             f"cuda:0 .. cuda:{count - 1}")
        problem = cuda_arch_problem(dev)
        if problem and auto:
            warnings.warn(f"{problem}; running on the CPU", RuntimeWarning, stacklevel=2)
            return torch.device("cpu")
        if problem:
            raise ValueError(problem)
    return dev


def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def cuda_arch_problem(device: torch.device) -> str | None:
    """Why this torch build cannot run on the GPU ``device``, or ``None`` if it can: its GPU is
    older than the oldest architecture the build has kernels for (``torch.cuda.get_arch_list()``;
    PyPI's CUDA 13 wheels start at sm_75, so a V100 (7.0) fails with "no kernel image is
    available"). A build that lists no ``sm_`` architecture is not judged."""
    archs = [int(m.group(1)) for a in torch.cuda.get_arch_list() if (m := re.match(r"sm_(\d+)", a))]
    if not archs:
        return None
    major, minor = _compute_capability(device)
    if major * 10 + minor >= min(archs):
        return None
    return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) is older than "
            f"this torch build supports (sm_{min(archs)} and newer; torch {torch.__version__})")


def _cpu_flags(cpuinfo: str) -> set[str]:
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16(cpuinfo_path: str = "/proc/cpuinfo", machine: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware, so bf16 autocast is faster than float32.

    How: the CPU feature flags the kernel reports in ``/proc/cpuinfo`` (``avx512_bf16`` or
    ``amx_bf16`` on x86-64, ``bf16`` on AArch64), and torch built with oneDNN (which runs bf16
    convolutions on them). Without those flags oneDNN emulates bf16 in float32 and autocast is
    slower, so the answer is ``False``; it is also ``False`` where ``/proc/cpuinfo`` is absent
    (macOS, Windows): we do not guess.
    """
    machine = machine or platform.machine().lower()
    wanted = _BF16_FLAGS.get("aarch64" if machine in ("arm64", "aarch64") else machine, ())
    try:
        text = Path(cpuinfo_path).read_text(errors="replace")
    except OSError:
        return False
    return bool(wanted) and torch.backends.mkldnn.is_available() and bool(_cpu_flags(text) & set(wanted))


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 autocast + channels_last is the fast path on ``device``: a GPU with bf16 tensor
    cores (compute capability 8.0 and newer: Ampere, Ada, Hopper, Blackwell; a T4 or V100 emulates
    bf16, slower than float32), or a CPU with native bf16 (:func:`cpu_has_native_bf16`)."""
    if device.type == "cuda":
        return _compute_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_has_native_bf16()


def cpu_name(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the machine type (e.g. ``"x86_64"``)."""
    try:
        for line in Path(cpuinfo_path).read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_summary(device: torch.device) -> str:
    """One line naming the hardware, e.g. ``"cpu: AMD EPYC 9B14, 2 threads, native bf16"``."""
    if device.type == "cuda":
        return f"{device}: {torch.cuda.get_device_name(device)}"
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"cpu: {cpu_name()}, {torch.get_num_threads()} threads, {bf16}"
