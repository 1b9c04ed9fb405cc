"""LGAM's kernels and their autograd Functions: the GAP; eqs (4)-(7) and a residual block's
tail with their backward, one pass over the map each way; eqs (2)-(3) on the pooled vectors in
one call (eval and train mode) with theirs.

The Functions call a device's kernels through one interface (:func:`kernels_for`): on the CPU
:class:`CppKernels` (``_lgam_kernel.cpp``), on CUDA the Triton ones (:mod:`._lgam_triton`). The
C++ source is compiled on first use with the system's C++ compiler (``$CXX`` or ``g++``; about
two seconds) into a per-user cache (``$LGAM_KERNEL_CACHE``, else ``~/.cache/lgam/kernels``) and
loaded with :mod:`ctypes`: no Python or torch headers, nothing downloaded. :func:`kernel_missing` says why
they cannot be used here, or None.
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
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .lgam import LGAM

__all__ = ["KERNEL_DTYPES", "CppKernels", "EvalScales", "MixAndGateKernel", "SpatialMeanKernel",
           "TrainScales", "kernel_missing", "kernels_for", "scales_kernel"]

SOURCE = Path(__file__).with_name("_lgam_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
#: map dtypes the kernels take, with the name of their instantiation in the source
KERNEL_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}

_build_lock = threading.Lock()
#: per LGAM module: its weights' addresses and the pointer array handed to the kernel (kept off
#: the module, which must stay copyable and picklable)
_WEIGHT_POINTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cache_dir() -> Path:
    """Where built kernels are kept: ``$LGAM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/lgam/kernels``
    (``~/.cache/lgam/kernels``)."""
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


def _build(compiler: str) -> Path:
    """Compile the source into the cache (once per source, compiler and CPU); its path."""
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
def _library() -> ctypes.CDLL | str:
    """The loaded kernels, or why not (a string)."""
    compiler = shutil.which(os.environ.get("CXX") or "g++")
    if compiler is None:
        return f"no C++ compiler ({os.environ.get('CXX') or 'g++'}) on PATH"
    try:
        with _build_lock:
            lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {str(e)[:300]}"
    p, n = ctypes.c_void_p, ctypes.c_int64
    for name in KERNEL_DTYPES.values():
        getattr(lib, f"lgam_mean_{name}").argtypes = [p, p, n, n, n, n]
        getattr(lib, f"lgam_add_mean_grad_{name}").argtypes = [p, p, n, n, n, n]
        getattr(lib, f"lgam_forward_{name}").argtypes = [p] * 7 + [n] * 5
        getattr(lib, f"lgam_backward_{name}").argtypes = [p] * 10 + [n] * 5
    for name in ("float32", "float64"):
        getattr(lib, f"lgam_scales_eval_{name}").argtypes = [p, p, ctypes.c_double] + [p] * 4 + [n] * 4
        d = ctypes.c_double
        getattr(lib, f"lgam_scales_train_{name}").argtypes = [p, p, d, d] + [p] * 5 + [n] * 4
        getattr(lib, f"lgam_scales_train_backward_{name}").argtypes = [p] * 6 + [n] * 4
        getattr(lib, f"lgam_scales_train_saved_{name}").argtypes = [n] * 4
        getattr(lib, f"lgam_scales_train_saved_{name}").restype = n
    return lib


def kernel_missing() -> str | None:
    """Why LGAM's CPU kernels cannot be built or loaded here (no C++ compiler, a failed build), or
    None (they are built on the first call)."""
    lib = _library()
    return lib if isinstance(lib, str) else None


def _call(kind: str, dtype: torch.dtype, *args: Tensor | int) -> None:
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(f"LGAM's CPU kernels are not available here: {lib}")
    getattr(lib, f"lgam_{kind}_{KERNEL_DTYPES[dtype]}")(
        *(a.data_ptr() if isinstance(a, Tensor) else a for a in args))  # None: a null pointer


class CppKernels:
    """The C++ kernels as the autograd Functions below call them (tensors in, tensors out), as
    :class:`~lgam.attention._lgam_triton.TritonKernels` on the GPU."""

    dtypes = tuple(KERNEL_DTYPES)

    def missing(self) -> str | None:
        return kernel_missing()

    def mean(self, a: Tensor, rows: bool, work: torch.dtype) -> Tensor:
        b, c, h, w = a.shape
        out = torch.empty(b, c, dtype=work)
        _call("mean", a.dtype, a, out, b, c, h * w, int(rows))
        return out

    def add_mean_grad(self, d_a: Tensor, d_mean: Tensor, rows: bool) -> None:
        b, c, h, w = d_a.shape
        _call("add_mean_grad", d_a.dtype, d_a, d_mean, b, c, h * w, int(rows))

    def weights(self, tensors: list[Tensor], dtype: torch.dtype) -> ctypes.Array:
        """The array of the group tensors' addresses the kernels take."""
        return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))

    def scales_eval(self, pooled: Tensor, pointers: ctypes.Array, eps: float, groups: int,
                    hidden: int) -> tuple[Tensor, ...]:
        b, c = pooled.shape
        out = [torch.empty(b, c, dtype=pooled.dtype) for _ in range(4)]
        _call("scales_eval", pooled.dtype, pooled, pointers, eps, *out, b, groups, c // groups, hidden)
        return tuple(out)

    def scales_train(self, pooled: Tensor, pointers: ctypes.Array, eps: float, momentum: float,
                     groups: int, hidden: int) -> tuple[Tensor, ...]:
        b, c = pooled.shape
        out = [torch.empty(b, c, dtype=pooled.dtype) for _ in range(4)]
        size = _library().lgam_scales_train_saved_float32(b, groups, c // groups, hidden)  # either dtype
        saved = torch.empty(size, dtype=pooled.dtype)
        _call("scales_train", pooled.dtype, pooled, pointers, eps, momentum, *out, saved, b, groups,
              c // groups, hidden)
        return (*out, saved)

    def scales_train_backward(self, d_scales: Tensor, scales: Tensor, pointers: ctypes.Array,
                              saved: Tensor, learned: list[Tensor], groups: int,
                              hidden: int) -> tuple[Tensor, list[Tensor]]:
        b, c = scales.shape
        grads = [torch.empty_like(t) for t in learned]
        d_pooled = torch.empty_like(scales)
        dw = (ctypes.c_void_p * len(grads))(*(t.data_ptr() for t in grads))
        _call("scales_train_backward", scales.dtype, d_scales, scales, pointers, saved, d_pooled, dw, b,
              groups, c // groups, hidden)
        return d_pooled, grads

    def forward(self, a: Tensor, identity: Tensor | None, p: Tensor, q: Tensor, v: Tensor, groups: int,
                rows: bool) -> tuple[Tensor, Tensor]:
        b, c, h, w = a.shape
        out = torch.empty_like(a)
        s = torch.empty(b, h * w, dtype=p.dtype)
        _call("forward", a.dtype, a, identity, p, q, v, out, s, b, groups, c // groups, h * w, int(rows))
        return out, s

    def backward(self, a: Tensor, g: Tensor, y: Tensor | None, p: Tensor, q: Tensor, v: Tensor, s: Tensor,
                 groups: int, rows: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        b, c, h, w = a.shape
        da = torch.empty_like(a)
        d_identity = torch.empty_like(a) if y is not None else None
        dl = torch.empty_like(p)
        _call("backward", a.dtype, a, g, y, p, q, v, s, da, d_identity, dl, b, groups, c // groups, h * w,
              int(rows))
        return da, d_identity, dl


#: LGAM's kernels per device type: the C++ ones on the CPU, the Triton ones on CUDA (the tests
#: put the Triton ones, interpreted, on the CPU)
BACKENDS: dict[str, object] = {"cpu": CppKernels()}


def kernels_for(device: torch.device):
    """The kernels for tensors on ``device`` (:class:`CppKernels`, or the Triton ones on CUDA),
    or None where LGAM has none."""
    if device.type == "cuda" and "cuda" not in BACKENDS:
        from ._lgam_triton import triton_kernels

        BACKENDS["cuda"] = triton_kernels()
    return BACKENDS.get(device.type)


def _group_tensors(module: LGAM) -> list[Tensor | None]:
    """Per group: the two Linears' weights and biases, the BN's weight, bias, running mean and
    variance (the kernel's order). Read from the submodules' own dicts: a call costs ~5 us where
    attribute access through ``nn.Module`` costs ~45."""
    out = []
    for a in module.channel_attention._modules.values():
        mlp, bn = a._modules["mlp"]._modules, a._modules["bn"]
        first, second = mlp["0"]._parameters, mlp["2"]._parameters
        out += [first["weight"], first["bias"], second["weight"], second["bias"], bn._parameters["weight"],
                bn._parameters["bias"], bn._buffers["running_mean"], bn._buffers["running_var"]]
    return out


def _learned(tensors: list[Tensor]) -> list[Tensor]:
    """The parameters among :func:`_group_tensors` (all but each group's running statistics)."""
    return [t for k in range(0, len(tensors), 8) for t in tensors[k: k + 6]]


def _kernel_weights(module: LGAM, kernels, dtype: torch.dtype, device: torch.device) -> tuple[list[Tensor], object] | None:
    """``module``'s group tensors and ``kernels``' handle on them (their addresses), or None where
    the kernels cannot take them (one missing, in another dtype than ``dtype``, on another device
    than ``device``, not contiguous). Checked again only when a tensor has moved or another dtype
    or backend is asked for."""
    tensors = _group_tensors(module)
    key = (id(kernels), dtype, device, *(t.data_ptr() if t is not None else None for t in tensors))
    cached = _WEIGHT_POINTERS.get(module)
    if cached is None or cached[0] != key:
        ok = all(t is not None and t.dtype == dtype and t.device == device and t.is_contiguous()
                 for t in tensors)
        cached = _WEIGHT_POINTERS[module] = (key, kernels.weights(tensors, dtype) if ok else None)
    return (tensors, cached[1]) if cached[1] is not None else None


def scales_kernel(module: LGAM, pooled: Tensor) -> tuple[Tensor, ...] | None:
    """Eqs (2)-(4) of ``module`` on the pooled groups ``(B, C)`` in one kernel call: the group
    scales ``1 + M_k`` ``(B, G, C')``, differentiable, and the ladder weights ``P_k``,
    ``1 / P_{k-1}``, ``v`` from them, ``(B, C)`` each, in ``pooled``'s dtype (float32 or float64).
    Eval mode: :class:`EvalScales`; train mode: :class:`TrainScales` (the BatchNorms on the
    batch's statistics, their running statistics moved as torch's would). None where the kernel
    does not apply (weights in another dtype or on another device, BatchNorms without running
    statistics, with an ``eps`` or momentum of their own or in another mode than the module, a
    batch of one in train mode: the module's own ops then run, or raise, as usual)."""
    bns = [a._modules["bn"] for a in module.channel_attention._modules.values()]
    kernels = kernels_for(pooled.device)
    b, c = pooled.shape
    if (kernels is None or pooled.dtype not in (torch.float32, torch.float64)
            or any((bn.eps, bn.momentum, bn.training) != (bns[0].eps, bns[0].momentum, module.training)
                   for bn in bns)
            or module.training and b < 2):
        return None
    found = _kernel_weights(module, kernels, pooled.dtype, pooled.device)
    if found is None:
        return None
    tensors, handle = found
    fn = TrainScales if module.training else EvalScales
    params = [t for t in _learned(tensors) if t.requires_grad]
    if not torch.is_grad_enabled() or not (params or pooled.requires_grad):
        return fn.forward(_NoGrad(), pooled, module, kernels, handle, tensors)  # no graph to record
    return fn.apply(pooled, module, kernels, handle, tensors, *params)


class _NoGrad:
    """Stands in for autograd's ``ctx`` where no backward will run."""

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        pass

    def mark_non_differentiable(self, *tensors: Tensor) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


class EvalScales(torch.autograd.Function):
    """``forward(pooled (B, C), module, kernels, handle, tensors, *its parameters) -> (scales
    (B, G, C'), P, Q, V)`` in eval mode: see :func:`scales_kernel`. The backward recomputes the
    scales with the module's own ops (its ``group_scales``) for the gradients of ``pooled`` and
    the parameters: the kernel and those ops agree to rounding, and the forward's values are the
    kernel's whether or not a gradient is taken (Grad-CAM's two passes see the same network)."""

    @staticmethod
    def forward(ctx, pooled: Tensor, module: LGAM, kernels, handle, tensors: list[Tensor],  # type: ignore[override]
                *params: Tensor) -> tuple[Tensor, ...]:
        b, c = pooled.shape
        g = module.groups
        eps = module.channel_attention[0].bn.eps
        scales, p, q, v = kernels.scales_eval(pooled.contiguous(), handle, eps, g, tensors[0].shape[0])
        ctx.set_materialize_grads(False)  # P, Q, V get none: no zeros made for them (a launch each on a GPU)
        ctx.module = module
        ctx.save_for_backward(pooled, *params)
        ctx.mark_non_differentiable(p, q, v)
        return scales.view(b, g, -1), p, q, v

    @staticmethod
    def backward(ctx, d_scales: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        pooled, *params = ctx.saved_tensors
        module = ctx.module
        if d_scales is None:
            return (None,) * (5 + len(params))
        if module.training:
            raise RuntimeError("LGAM: the module was put in train mode between its eval-mode forward "
                               "and this backward; its BatchNorm would use other statistics")
        b, c = pooled.shape
        with torch.enable_grad():
            inputs = [pooled.detach().requires_grad_(True)] + params
            scales = module.group_scales(inputs[0].view(b, module.groups, -1))
            grads = torch.autograd.grad(scales, inputs, d_scales, allow_unused=True)
        return (grads[0], None, None, None, None, *grads[1:])


class TrainScales(torch.autograd.Function):
    """``forward(pooled (B, C), module, kernels, handle, tensors, *its parameters) -> (scales
    (B, G, C'), P, Q, V)`` in train mode (:func:`scales_kernel`): the BatchNorms normalise with
    the batch's statistics and move their running ones (``momentum``, or the cumulative average
    where it is None); the backward is the kernel's too, for ``pooled`` and every parameter."""

    @staticmethod
    def forward(ctx, pooled: Tensor, module: LGAM, kernels, handle, tensors: list[Tensor],  # type: ignore[override]
                *params: Tensor) -> tuple[Tensor, ...]:
        b, c = pooled.shape
        g = module.groups
        bns = [a.bn for a in module.channel_attention]
        torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)  # one launch on a GPU
        momentum = bns[0].momentum if bns[0].momentum is not None else 1 / float(bns[0].num_batches_tracked)
        scales, p, q, v, saved = kernels.scales_train(pooled.contiguous(), handle, bns[0].eps, momentum, g,
                                                      tensors[0].shape[0])
        ctx.set_materialize_grads(False)  # P, Q, V get none: no zeros made for them
        ctx.module, ctx.kernels, ctx.handle, ctx.tensors = module, kernels, handle, tensors
        ctx.needs = [t.requires_grad for t in _learned(tensors)]
        ctx.save_for_backward(scales, saved)
        ctx.mark_non_differentiable(p, q, v)
        return scales.view(b, g, -1), p, q, v

    @staticmethod
    def backward(ctx, d_scales: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        scales, saved = ctx.saved_tensors
        learned = _learned(ctx.tensors)
        if d_scales is None:
            return (None,) * (5 + sum(ctx.needs))
        d_pooled, grads = ctx.kernels.scales_train_backward(
            d_scales.contiguous(), scales, ctx.handle, saved, learned, ctx.module.groups, learned[0].shape[0])
        return (d_pooled, None, None, None, None, *(d for d, needs in zip(grads, ctx.needs) if needs))


def _format(rows: bool) -> torch.memory_format:
    return torch.channels_last if rows else torch.contiguous_format


def _layout(x: Tensor) -> tuple[Tensor, bool]:
    """``x (B, C, H, W)`` dense as rows ``(B, HW, C)`` (channels_last; True) or columns
    ``(B, C, HW)`` (contiguous; False), copied only if it is neither."""
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


class SpatialMeanKernel(torch.autograd.Function):
    """Eq (1) for all groups at once: ``A (B, C, H, W) -> (means (B, C), A)``, the means over
    positions summed in ``work`` (float32 for 16-bit input). ``A`` comes back as a view so that
    its gradient from the rest of the module (:class:`MixAndGateKernel`) meets the means' here,
    where the latter is added in place (autograd's own sum of a broadcast tensor into a
    channels_last one is ~10x slower on the CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor, work: torch.dtype) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        a, rows = _layout(x)
        ctx.kernels = kernels_for(a.device)
        ctx.rows, ctx.shape, ctx.dtype, ctx.device = rows, a.shape, a.dtype, a.device
        ctx.set_materialize_grads(False)
        return ctx.kernels.mean(a, rows, work), a.view_as(a)

    @staticmethod
    def backward(ctx, d_mean: Tensor, d_a: Tensor | None) -> tuple[Tensor, None]:  # type: ignore[override]
        fmt = _format(ctx.rows)
        if d_a is None:
            d_a = torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device).contiguous(memory_format=fmt)
        elif not d_a.is_contiguous(memory_format=fmt) or d_a.dtype != ctx.dtype:
            d_a = d_a.to(ctx.dtype).contiguous(memory_format=fmt)
        if d_mean is not None:
            ctx.kernels.add_mean_grad(d_a, d_mean.contiguous(), ctx.rows)  # the means' gradient, in the work dtype
        return d_a, None


class MixAndGateKernel(torch.autograd.Function):
    """Eqs (4)-(7) on the map: ``forward(A (B, C, H, W), identity, scales, P, Q, V, G) -> (out,
    S (B, HW))``. ``scales`` are the group scales ``1 + M_k`` ``(B, G, C')`` (None where no
    gradient will be asked for) and ``P``, ``Q``, ``V`` the ladder weights ``P_k``,
    ``1 / P_{k-1}`` and ``v`` computed from them (:func:`~lgam.attention._lgam_fused.ladder_weights`)
    flattened to ``(B, C)``, in the work dtype; the gradient flows to ``scales`` (the kernels sum
    it per channel without cancellation: see the C++ source). ``out`` is ``A''`` or, given a
    residual block's ``identity`` (``A``'s shape), the block's output ``ReLU(A'' + identity)``, in
    ``A``'s dtype and memory format; ``S`` (eq (5)) is returned for the gate, not differentiable.
    One pass over the map forward, one backward (which recomputes the ladder)."""

    @staticmethod
    def forward(ctx, x: Tensor, identity: Tensor | None, scales: Tensor | None, p: Tensor,  # type: ignore[override]
                q: Tensor, v: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        a, rows = _layout(x)
        if identity is not None:
            identity = identity.to(a.dtype).contiguous(memory_format=_format(rows))
        p, q, v = (t.contiguous() for t in (p, q, v))
        ctx.kernels = kernels_for(a.device)
        out, s = ctx.kernels.forward(a, identity, p, q, v, groups, rows)
        ctx.save_for_backward(a, scales, p, q, v, s, out if identity is not None else None)
        ctx.groups, ctx.rows = groups, rows
        ctx.mark_non_differentiable(s)
        ctx.set_materialize_grads(False)  # S gets none: no zeros made for it
        return out, s

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_s: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, scales, p, q, v, s, y = ctx.saved_tensors
        if grad is None:
            return (None,) * 7
        g = grad.contiguous(memory_format=_format(ctx.rows))  # in the output's dtype, A's
        da, d_identity, d_log_scales = ctx.kernels.backward(a, g, y, p, q, v, s, ctx.groups, ctx.rows)
        # d_log_scales: the scales' gradient times the scales, (B, C)
        d_scales = d_log_scales.view_as(scales) / scales if ctx.needs_input_grad[2] else None
        return da, d_identity, d_scales, None, None, None, None
