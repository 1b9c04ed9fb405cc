"""LGAM's fused path: eqs (1)-(7) with one pass over the map each way, not one per op.

The eager path (:class:`~lgam.attention.lgam.MixAndGate`) needs a pass over the map per op: the
GAP, the mixing product, ``S``, the gate and the output each read or write a full-size tensor. Per
position, though, eqs (4)-(7) need only that position's ``C`` values. The fused path has two forms
of the same arithmetic:

- :func:`lgam_kernel`: LGAM's kernels, C++ on the CPU (:mod:`._lgam_kernel`, built on first use
  with the system's C++ compiler) and Triton on CUDA (:mod:`._lgam_triton`, compiled by Triton
  on first use): the GAP, eqs (2)-(3) on the pooled vectors in one call, then ``S``, the gate
  and ``A''`` in one read and one write of the map, and the backward in one more; given a
  residual block's identity the block's tail ``ReLU(A'' + identity)`` is done in the same pass.
  In auto mode each device and dtype is first checked against the equations
  (:func:`check_kernels`);
- inside a ``torch.compile`` of a model, :func:`lgam_fused`: the same steps as plain tensor ops
  (the ladder unrolled over the groups, the map viewed as rows ``(B, HW, G, C')`` for
  channels_last input or ``(B, G, C', HW)``), which Inductor fuses on any device.

:class:`~lgam.attention.lgam.LGAM` takes it where it applies (:func:`set_fused_kernels`).
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
import warnings
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._checks import is_channels_last
from ._lgam_kernel import MixAndGateKernel, SpatialMeanKernel, kernels_for, scales_kernel

if TYPE_CHECKING:
    from .lgam import LGAM

__all__ = ["fused_kernels", "fused_kernels_enabled", "fused_kernels_setting", "lgam_fused",
           "lgam_kernel", "set_fused_kernels"]


def ladder_weights(scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From the group scales ``1 + M_k`` ``(B, G, C')``: ``P_k = (1 + M_1) ... (1 + M_k)``,
    ``1 / P_{k-1}`` (``P_0 = 1``) and ``v_j = sum_{k >= j} P_k / P_{j-1}``, each ``(B, G, C')``.

    ``v`` weighs the input in eq (5): ``S = sum_c A'_c = sum_j A_j v_j`` (the ladder unrolled).
    """
    p = [scales[:, 0]]
    for k in range(1, scales.shape[1]):
        p.append(p[-1] * scales[:, k])
    inv_prev = [torch.ones_like(p[0])] + [1 / q for q in p[:-1]]
    v, tail = [], None
    for k in reversed(range(len(p))):
        tail = p[k] if tail is None else tail + p[k]
        v.append(tail * inv_prev[k])
    return torch.stack(p, 1), torch.stack(inv_prev, 1), torch.stack(v[::-1], 1)


def mix_and_gate(a: Tensor, p: Tensor, inv_prev: Tensor, v: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Eqs (4)-(7) per position on the map ``A`` grouped along ``dim``: rows ``(B, HW, G, C')``
    (``dim=2``) or ``(B, G, C', HW)`` (``dim=1``), with :func:`ladder_weights` ``(B, G, C')``
    -> ``A''`` in ``A``'s layout and dtype, and eq (5)'s ``S`` (``(B, HW, 1)`` or ``(B, 1, HW)``);
    computed in ``v``'s dtype. ``M_spat`` is left to the caller, which needs it only to record it."""
    # 16-bit A meets float32 weights and is promoted inside the loops: no converted copy to store
    s = (a * _spread(v, dim)).sum((dim, dim + 1), keepdim=True).squeeze(dim)  # eq (5): A v = sum of A'
    m = torch.sigmoid(F.relu(s))  # eq (6)
    p, inv_prev = _spread(p, dim), _spread(inv_prev, dim)
    out, u = [], None
    for k in range(a.shape[dim]):
        x_k = a.select(dim, k)
        term = x_k * inv_prev.select(dim, k)
        u = term if u is None else u + term  # eq (4) unrolled: y_k = P_k sum_{j<=k} x_j / P_{j-1}
        out.append(torch.addcmul(x_k, u * p.select(dim, k), m).to(a.dtype))  # eq (7)
    return torch.stack(out, dim), s


def _spread(t: Tensor, dim: int) -> Tensor:
    """Per-sample weights ``(B, G, C')`` broadcast over the positions of a map grouped along ``dim``."""
    return t[:, None] if dim == 2 else t[..., None]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the group scales, their products and the pooled vectors: float32 for 16-bit
    input, else the input's own (a float64 module computes in float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lgam_fused(module: LGAM, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``module``'s eqs (1)-(7) on ``x (B, C, H, W)`` -> ``(A'' (B, C, H, W), S (B, 1, H, W))``,
    ``A''`` in ``x``'s memory format (with a residual block's identity ``residual``: the block's
    output ``ReLU(A'' + residual)``), ``S`` eq (5)'s channel sum (``M_spat = sigmoid(ReLU(S))``);
    float32 arithmetic for 16-bit ``x`` (float64 for float64)."""
    b, c, h, w = x.shape
    g = module.groups
    work = work_dtype(x.dtype)
    rows = is_channels_last(x)
    with torch.autocast(x.device.type, enabled=False):
        a = x.permute(0, 2, 3, 1).reshape(b, h * w, g, c // g) if rows else x.reshape(b, g, c // g, h * w)
        pooled = a.mean(1 if rows else 3, dtype=work)  # eq (1), per group: (B, G, C')
        weights = module.channel_attention[0].bn.weight.dtype
        scales = module.group_scales(pooled.to(weights)).to(work)  # eqs (2)-(4) on pooled vectors
        out, s = checkpoint(mix_and_gate, a, *ladder_weights(scales), 2 if rows else 1, use_reentrant=False)
    out = out.view(b, h, w, c).permute(0, 3, 1, 2) if rows else out.view(b, c, h, w)
    return out if residual is None else torch.relu(out + residual), s.view(b, 1, h, w)


def lgam_kernel(module: LGAM, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`lgam_fused` in LGAM's kernels for ``x``'s device (:mod:`._lgam_kernel`): the GAP, eqs
    (2)-(3) on the pooled vectors (the module's own ops where the kernel does not take its
    weights), then eqs (4)-(7) and the block's tail in one pass over the map (and one back)."""
    b, c, h, w = x.shape
    g = module.groups
    work = work_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        pooled, x = SpatialMeanKernel.apply(x, work)  # eq (1), per group; x: a view of itself
        found = scales_kernel(module, pooled)  # eqs (2)-(4) in one kernel call

        if found is not None:
            scales, *weights = found
        else:
            param = module.channel_attention[0].bn.weight.dtype
            scales = module.group_scales(pooled.view(b, g, c // g).to(param)).to(work)  # eqs (2)-(4)
            with torch.no_grad():  # the kernel's backward gives the scales' gradient itself
                weights = [t.reshape(b, c) for t in ladder_weights(scales)]
        out, s = MixAndGateKernel.apply(x, residual, scales, *weights, g)
    return out, s.view(b, 1, h, w)


#: why-nots that are a machine's plain state, not a fault: no warning for them
SILENT = ("no C++ compiler", "Triton is not installed")


class _Fused:
    """Whether :class:`LGAM` takes the fused path (one per process)."""

    def __init__(self) -> None:
        env = os.environ.get("LGAM_FUSED", "").strip().lower()
        self.setting: bool | None = {"0": False, "1": True}.get(env)  # None: auto
        self.warned = False
        self.checked: dict[tuple[torch.device, torch.dtype], str | None] = {}  # check_kernels's verdicts
        self.lock = threading.Lock()

    def applies(self, module: LGAM, x: Tensor) -> bool:
        if self.setting is False or torch.jit.is_scripting() or torch.jit.is_tracing():
            return False
        if torch.compiler.is_compiling():  # inside a compiled model: plain ops, inlined
            return True
        kernels = kernels_for(x.device)
        return kernels is not None and x.dtype in kernels.dtypes and self.kernels_ready(kernels, x)

    def kernels_ready(self, kernels, x: Tensor) -> bool:
        """Whether ``kernels`` can run on ``x`` (the CPU ones built and loaded on the first call;
        in auto mode, once per device and dtype, :func:`check_kernels` passed); where they
        cannot, an error when the fused path is forced on, else one warning (none where there is
        simply no C++ compiler, or no Triton)."""
        why = kernels.missing()
        if why is None and self.setting is None:
            why = self.check(x.device, x.dtype)
        if why is None:
            return True
        if self.setting is True:
            raise RuntimeError(f"LGAM's fused kernels are on (set_fused_kernels(True) or LGAM_FUSED=1) "
                               f"but cannot run here: {why}")
        if not self.warned and not why.startswith(SILENT):
            self.warned = True
            warnings.warn(f"LGAM: its kernels cannot run here ({why}); using the eager path "
                          "(set_fused_kernels(False) silences this)", stacklevel=4)
        return False

    def check(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """:func:`check_kernels`'s verdict for ``device`` and ``dtype``, run on first asking."""
        key = (device, dtype)
        if key not in self.checked:
            with self.lock:
                if key not in self.checked:
                    why = check_kernels(device, dtype)
                    self.checked[key] = None if why is None else f"they failed their check on {device} for {dtype}: {why}"
        return self.checked[key]

    def run(self, module: LGAM, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            return lgam_fused(module, x, residual)
        return lgam_kernel(module, x, residual)


FUSED = _Fused()


def check_kernels(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run LGAM's kernels on ``device`` for ``dtype`` maps (compiling them there if they are
    Triton's) on a small LGAM (24 channels, G=4, r=1: groups of 6 channels and batches of 6 leave
    part of every kernel tile masked; no hidden unit dead for a whole batch;
    float32 weights) in train mode with and without a block tail and in eval mode, both layouts,
    against eqs (1)-(7) in float64 on the CPU on the same (rounded) input: outputs, input,
    identity and parameter gradients, BN statistics, each within ``tol`` or twice the eager
    path's error on the same device (16-bit rounding flips a few of the block tail's ReLUs).
    None if all agree, else why not (a compiler's error, a result off). Leaves the random state
    and any autocast or inference mode around it alone."""
    from .lgam import LGAM, lgam_reference

    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    cases = [(True, True, torch.channels_last), (True, False, torch.contiguous_format),
             (False, True, torch.contiguous_format), (False, False, torch.channels_last)]
    cpu = torch.device("cpu")
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            torch.manual_seed(0)
            for train, tail, layout in cases:
                module = LGAM(24, groups=4, reduction=1).train(train)
                eager, exact = copy.deepcopy(module), copy.deepcopy(module).double()
                x, identity, g = (torch.randn(6, 24, 4, 5).to(dtype).double() for _ in range(3))
                identity = identity if tail else None
                got = _run(lambda a, i: lgam_kernel(module, a, i)[0], module, x, identity, g, device, dtype, layout)
                ref = _run(lambda a, i: _tail(eager.forward_eager(a)[0], i), eager, x, identity, g, device, dtype, layout)
                want = _run(lambda a, i: _tail(lgam_reference(exact, a), i), exact, x, identity, g, cpu,
                            torch.float64, torch.contiguous_format)
                for name, b in want.items():
                    err, eager_err = (((t[name].double().cpu() - b).norm() / b.norm().clamp_min(1e-30)).item()
                                      for t in (got, ref))
                    if not err <= max(tol, 2 * eager_err):
                        return (f"its {name} is {err:.1e} off eqs (1)-(7), the eager path's {eager_err:.1e} "
                                f"(train={train}, tail={tail}, "
                                f"{'channels_last' if layout == torch.channels_last else 'contiguous'})")
    except Exception as e:  # a compiler's or driver's error: reported, and the eager path taken
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return None


def _tail(out: Tensor, identity: Tensor | None) -> Tensor:
    return out if identity is None else torch.relu(out + identity)


def _run(fn, module: torch.nn.Module, x: Tensor, identity: Tensor | None, g: Tensor, device: torch.device,
         dtype: torch.dtype, layout: torch.memory_format) -> dict[str, Tensor]:
    """``fn(x, identity)`` on ``device`` in ``dtype`` and ``layout`` (the module's weights there
    too), then a backward of ``sum(out * g)``: the output, the gradients of x, the identity (if
    any) and the parameters, and the BN statistics."""
    module.to(device)
    a = x.to(device, dtype).contiguous(memory_format=layout).requires_grad_(True)
    i = identity.to(device, dtype).contiguous(memory_format=layout).requires_grad_(True) if identity is not None else None
    y = fn(a, i)
    (y.double() * g.to(device)).sum().backward()
    out = {"output": y, "input gradient": a.grad}
    if i is not None:
        out["identity gradient"] = i.grad
    out["parameter gradients"] = torch.cat([p.grad.flatten() for p in module.parameters()])
    out["BN statistics"] = torch.cat([t.flatten() for t in module.buffers() if t.is_floating_point()])
    return out


def set_fused_kernels(enabled: bool | None) -> None:
    """Where LGAM takes its fused path (:mod:`lgam.attention._lgam_fused`): ``None`` (the default;
    env ``LGAM_FUSED=0/1`` sets the start value) for CPU input in bfloat16, float32 or float64
    where the C++ kernels build (a C++ compiler; about two seconds, once per machine), for CUDA
    input in those or float16 where Triton is installed (it comes with torch's CUDA wheels;
    compiled on first use), each device and dtype once checked against the equations first
    (:func:`check_kernels`; a failure warns once and stays eager), and inside a
    ``torch.compile`` of the model; the eager path elsewhere. ``True``: the same without the
    check, and an error where the kernels cannot run; ``False``: never."""
    if enabled not in (True, False, None):
        raise ValueError(f"set_fused_kernels takes True, False or None (auto), got {enabled!r}")
    FUSED.setting = enabled


@contextlib.contextmanager
def fused_kernels(enabled: bool | None) -> Iterator[None]:
    """:func:`set_fused_kernels` inside a ``with`` block, the previous setting restored after it."""
    before = FUSED.setting
    set_fused_kernels(enabled)
    try:
        yield
    finally:
        FUSED.setting = before


def fused_kernels_setting(device: torch.device | str = "cpu") -> str:
    """The setting on ``device`` in words, for run records: ``"on"``, ``"off"``, ``"auto"`` or
    ``"auto (eager here: <why>)"``."""
    if FUSED.setting is not None:
        return "on" if FUSED.setting else "off"
    kernels = kernels_for(torch.device(device))
    why = kernels.missing() if kernels is not None else f"no LGAM kernels for {torch.device(device).type}"
    return f"auto (eager here: {why})" if why else "auto"


def fused_kernels_enabled(module: LGAM, x: Tensor) -> bool:
    """Whether ``module`` would take the fused path for input ``x`` now."""
    return FUSED.applies(module, x)
