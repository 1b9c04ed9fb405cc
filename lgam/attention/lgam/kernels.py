"""LGAM's C++ kernels (``kernels.cpp``): built, loaded, and called through one checked boundary.

The source is compiled on first use with the system's C++ compiler (``$CXX`` or ``g++``; about
two seconds) into a per-user cache (``$LGAM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/lgam/kernels``,
``~/.cache/lgam/kernels`` without it) and
loaded with :mod:`ctypes`: no Python or torch headers, no ninja, nothing downloaded
(``torch.utils.cpp_extension`` would need all three and a minute's build). :func:`call` is the
only way in: every pointer it passes comes from :func:`arg`, which checks the tensor's device,
dtype, shape and contiguity and raises a ``ValueError`` naming what is wrong. The facts Python and
C++ share (where each group tensor and saved intermediate sits, their shapes) are written once
here (:data:`PARAMS`, :data:`STATS`, :data:`SAVED`) and compiled into the source as ``-D`` flags.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels.cpp")
#: map dtypes the kernels take, with the name of their instantiation in the source
KERNEL_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}
#: per group, the learned tensors in the order the kernels take them (``LGAM_PARAM_<key>``): the
#: attribute path in a group's module and the shape from ``(C', h)``
PARAMS = {"W1": ("mlp.0.weight", lambda cg, h: (h, cg)), "B1": ("mlp.0.bias", lambda cg, h: (h,)),
          "W2": ("mlp.2.weight", lambda cg, h: (cg, h)), "B2": ("mlp.2.bias", lambda cg, h: (cg,)),
          "GAMMA": ("bn.weight", lambda cg, h: (cg,)), "BETA": ("bn.bias", lambda cg, h: (cg,))}
#: per group, BatchNorm's running statistics (``LGAM_STAT_<key>``), moved in train mode
STATS = {"MEAN": ("bn.running_mean", lambda cg, h: (cg,)), "VAR": ("bn.running_var", lambda cg, h: (cg,))}
#: what eqs (2)-(3) keep for their backward (``LGAM_SAVED_<key>``), shapes from ``(B, G, C', h)``
SAVED = {"S": lambda b, g, cg, h: (g, b, cg), "Z1": lambda b, g, cg, h: (g, b, h),
         "ZHAT": lambda b, g, cg, h: (g, b, cg), "INVSTD": lambda b, g, cg, h: (g, cg),
         "BN": lambda b, g, cg, h: (g, b, cg)}


def _defines() -> list[str]:
    """The layout above as the source's ``-D`` flags (one home for it)."""
    flags = [f"-DLGAM_PARAMS={len(PARAMS)}", f"-DLGAM_STATS={len(STATS)}"]
    for prefix, names in (("PARAM", PARAMS), ("STAT", STATS), ("SAVED", SAVED)):
        flags += [f"-DLGAM_{prefix}_{name}={i}" for i, name in enumerate(names)]
    return flags


FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-std=c++17", "-shared",
         "-fPIC", *_defines())
P, N, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
#: each entry point's arguments (its name gets ``_<dtype>`` appended)
SIGNATURES = {
    "mean": [P, P, N, N, N, N],
    "add_mean_grad": [P, P, N, N, N, N],
    "forward": [P] * 7 + [N] * 5,
    "backward": [P] * 10 + [N] * 5,
    "scales": [P, P, P, D, D, N, P, P, P, P, P, N, N, N, N],
    "scales_backward": [P] * 4 + [N] + [P, P] + [N] * 4,
}
_build_lock = threading.Lock()


def cache_dir() -> Path:
    """Where built kernels are kept: ``$LGAM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/lgam/kernels``."""
    if os.environ.get("LGAM_KERNEL_CACHE"):
        return Path(os.environ["LGAM_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lgam" / "kernels"


def _cpu_id() -> str:
    """The CPU's model and features (``-march=native`` code runs only where they match)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def build(compiler: str) -> Path:
    """Compile the source into the cache (once per source, flags, compiler and CPU); its path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_id(),
                                    platform.machine()]).encode()).hexdigest()[:20]
    target = cache_dir() / f"lgam_kernel_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then moved in whole
        built = Path(tmp) / target.name
        run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"{compiler} failed: {(run.stderr.strip().splitlines() or [''])[-1][:300]}")
        os.replace(built, target)
    return target


@functools.cache
def library() -> ctypes.CDLL | str:
    """The loaded kernels, or why not (a string)."""
    compiler = shutil.which(os.environ.get("CXX") or "g++")
    if compiler is None:
        return f"no C++ compiler ({os.environ.get('CXX') or 'g++'}) on PATH"
    try:
        with _build_lock:
            lib = ctypes.CDLL(str(build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {str(e)[:300]}"
    for kind, argtypes in SIGNATURES.items():
        for name in KERNEL_DTYPES.values():
            fn = getattr(lib, f"lgam_{kind}_{name}", None)
            if fn is not None:  # eqs (2)-(3) have float32 and float64 only
                fn.argtypes = argtypes
    return lib


def kernel_missing() -> str | None:
    """Why the kernels cannot be built or loaded here (no C++ compiler, a failed build), or None."""
    lib = library()
    return lib if isinstance(lib, str) else None


class Arg:
    """A pointer :func:`arg` has checked: to a tensor's data, or to an array of such pointers."""

    def __init__(self, pointer: int, keep: object) -> None:
        self.pointer, self.keep = pointer, keep  # keep: what must outlive the call


def arg(name: str, t: Tensor | Sequence[Tensor] | None, dtype: torch.dtype,
        shape: tuple[int, ...] | Sequence[tuple[int, ...]], channels_last: bool = False) -> Arg | None:
    """``t`` checked for the kernels: on the CPU, in ``dtype``, of ``shape`` (a tuple) and dense
    (row-major, or channels_last where asked); a list of tensors, each against its own shape,
    becomes an array of pointers. None stays None (a null pointer). Raises ``ValueError`` saying what is off."""
    if t is None:
        return None
    if isinstance(t, Tensor):
        if not _dense(t, dtype, shape, channels_last):
            raise ValueError(f"LGAM kernel argument {name} {_problem(t, dtype, shape, channels_last)}")
        return Arg(t.data_ptr(), t)
    if len(t) != len(shape):
        raise ValueError(f"LGAM kernel argument {name}: {len(t)} tensors, expected {len(shape)}")
    for i, (x, s) in enumerate(zip(t, shape)):
        if not _dense(x, dtype, s, False):
            raise ValueError(f"LGAM kernel argument {name}[{i}] {_problem(x, dtype, s, False)}")
    array = (ctypes.c_void_p * len(t))(*[x.data_ptr() for x in t])
    return Arg(ctypes.addressof(array), (array, t))


def _dense(t: Tensor, dtype: torch.dtype, shape: tuple[int, ...], channels_last: bool) -> bool:
    """Whether ``t`` is what the kernels can read (on every call's path: ~0.4 us)."""
    return (isinstance(t, Tensor) and t.dtype is dtype and t.shape == shape and t.is_cpu
            and (t.is_contiguous(memory_format=torch.channels_last) if channels_last else t.is_contiguous()))


def _problem(t: object, dtype: torch.dtype, shape: tuple[int, ...], channels_last: bool) -> str:
    """What :func:`_dense` found wrong with ``t``, in words."""
    if not isinstance(t, Tensor):
        return f"is a {type(t).__name__}, not a tensor"
    if t.device.type != "cpu":
        return f"is on {t.device}, not the CPU"
    if t.dtype != dtype:
        return f"is {t.dtype}, expected {dtype}"
    if t.shape != shape:
        return f"has shape {tuple(t.shape)}, expected {shape}"
    return f"is not dense ({'channels_last' if channels_last else 'row-major'}; strides {t.stride()})"


def call(kind: str, dtype: torch.dtype, *args: Arg | int | float | None) -> None:
    """Run the kernel ``kind`` for ``dtype`` maps: the one way into the C++ code. Pointers must be
    :func:`arg`'s (checked tensors), sizes ints, in :data:`SIGNATURES`' order."""
    lib = library()
    if isinstance(lib, str):
        raise RuntimeError(f"LGAM's CPU kernels are not available here: {lib}")
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"LGAM's kernels take {list(KERNEL_DTYPES)}, not {dtype}")
    argtypes = SIGNATURES[kind]
    if len(args) != len(argtypes):
        raise TypeError(f"LGAM kernel {kind}: {len(args)} arguments, expected {len(argtypes)}")
    values = [a.pointer if type(a) is Arg else a for a in args]
    for i, (a, ty) in enumerate(zip(args, argtypes)):
        if (type(a) is not Arg and a is not None) if ty is P else not isinstance(a, (int, float)):
            what = "a checked tensor (kernels.arg)" if ty is P else "a number"
            raise TypeError(f"LGAM kernel {kind}: argument {i} must be {what}, got {type(a).__name__}")
    getattr(lib, f"lgam_{kind}_{KERNEL_DTYPES[dtype]}")(*values)
