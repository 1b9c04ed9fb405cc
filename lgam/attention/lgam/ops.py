"""LGAM as two registered ops, ``lgam::lgam`` and ``lgam::lgam_backward``, run by the C++ kernels.

``torch.ops.lgam.lgam(x, identity, params, stats, groups, training, eps, momentum)`` is the whole
module on a CPU map ``x (B, C, H, W)`` (bfloat16, float32, float64; weights in the work dtype of
:func:`~.equations.work_dtype`): the GAP, eqs (2)-(3) on the pooled vectors, then eqs (4)-(7) and,
given a residual block's ``identity``, the block's tail ``ReLU(A'' + identity)`` in one pass over
the map. ``params`` and ``stats`` are the groups' tensors in :data:`.kernels.PARAMS` /
:data:`.kernels.STATS` order; in train mode the BatchNorms use the batch's statistics. Returns
``out`` (``x``'s dtype and memory format), ``S`` ``(B, HW)``, the group scales ``1 + M_k``, the
ladder weights ``P``, ``Q``, ``V`` (each ``(B, C)``), what the backward needs
(:data:`.kernels.SAVED`), all in the work dtype, and in train mode the moved running statistics
(the op is functional, as autograd needs: the module copies them into its buffers). The backward,
``lgam_backward``, is registered as its autograd formula: one more pass over the map, eqs (2)-(3)
back, and the GAP's gradient added in the same call. Each op has a fake (meta) implementation:
under ``torch.compile`` the graph calls the same kernels as eager.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import kernels as K
from .equations import work_dtype


def _layout(x: Tensor) -> torch.memory_format:
    """The kernels' layout for ``x``: rows (channels_last) where ``x`` is, else columns."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _saved_shapes(b: int, groups: int, width: int, hidden: int) -> list[tuple[int, ...]]:
    return [shape(b, groups, width, hidden) for shape in K.SAVED.values()]


def _group_shapes(layout: dict, groups: int, width: int, hidden: int) -> list[tuple[int, ...]]:
    """The shapes of ``groups`` groups' tensors in ``layout`` (:data:`.kernels.PARAMS`, ``STATS``)."""
    return [shape(width, hidden) for _ in range(groups) for _, shape in layout.values()]


@torch.library.custom_op("lgam::lgam", mutates_args=(), device_types="cpu")
def lgam_op(x: Tensor, identity: Optional[Tensor], params: list[Tensor], stats: list[Tensor], groups: int,
            training: bool, eps: float, momentum: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                  list[Tensor], list[Tensor]]:
    b, c, h, w = x.shape
    fmt, work, hidden = _layout(x), work_dtype(x.dtype), params[0].shape[0]
    rows, width = fmt == torch.channels_last, c // groups
    a = x.contiguous(memory_format=fmt)
    vecs = [torch.empty(b, c, dtype=work) for _ in range(5)]  # pooled, scales, P, Q, V
    saved = [torch.empty(shape, dtype=work) for shape in _saved_shapes(b, groups, width, hidden)]
    stats = [t.clone() for t in stats] if training else stats  # moved by the kernel: the new ones returned
    map_arg = lambda name, t: K.arg(name, t, x.dtype, (b, c, h, w), rows)  # noqa: E731
    vec_arg = lambda name, t: K.arg(name, t, work, (b, c))  # noqa: E731
    K.call("mean", x.dtype, map_arg("x", a), vec_arg("pooled", vecs[0]), b, c, h * w, rows)  # eq (1)
    K.call("scales", work, vec_arg("pooled", vecs[0]), K.arg("params", params, work, _group_shapes(K.PARAMS, groups, width, hidden)),
           K.arg("stats", stats, work, _group_shapes(K.STATS, groups, width, hidden)), eps, momentum, training,  # eqs (2)-(4)
           *(vec_arg(n, t) for n, t in zip(("scales", "P", "Q", "V"), vecs[1:])),
           K.arg("saved", saved, work, _saved_shapes(b, groups, width, hidden)), b, groups, width, hidden)
    out, s = torch.empty_like(a), torch.empty(b, h * w, dtype=work)
    if identity is not None:
        identity = identity.to(x.dtype).contiguous(memory_format=fmt)
    K.call("forward", x.dtype, map_arg("x", a), map_arg("identity", identity),  # eqs (4)-(7)
           *(vec_arg(n, t) for n, t in zip("PQV", vecs[2:])), map_arg("out", out),
           K.arg("S", s, work, (b, h * w)), b, groups, width, h * w, rows)
    return out, s, *vecs[1:], saved, stats if training else []


@lgam_op.register_fake
def _(x, identity, params, stats, groups, training, eps, momentum):
    b, c, h, w = x.shape
    work = work_dtype(x.dtype)
    vecs = [x.new_empty(b, c, dtype=work) for _ in range(4)]
    saved = [x.new_empty(shape, dtype=work) for shape in _saved_shapes(b, groups, c // groups, params[0].shape[0])]
    new_stats = [torch.empty_like(t) for t in stats] if training else []
    return torch.empty_like(x, memory_format=_layout(x)), x.new_empty(b, h * w, dtype=work), *vecs, saved, new_stats


@torch.library.custom_op("lgam::lgam_backward", mutates_args=(), device_types="cpu")
def lgam_backward(grad: Tensor, x: Tensor, out: Optional[Tensor], s: Tensor, scales: Tensor, p: Tensor, q: Tensor,
                  v: Tensor, params: list[Tensor], saved: list[Tensor], groups: int,
                  training: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``lgam::lgam``'s backward: ``(dx, d_identity, d_params)`` from the output's gradient;
    ``out`` is the forward's output where it took an identity (its sign masks ``grad``), else
    None, and ``d_identity`` then has no elements."""
    b, c, h, w = x.shape
    fmt, work, hidden = _layout(x), work_dtype(x.dtype), params[0].shape[0]
    rows, width = fmt == torch.channels_last, c // groups
    a, g = x.contiguous(memory_format=fmt), grad.to(x.dtype).contiguous(memory_format=fmt)
    y = out.contiguous(memory_format=fmt) if out is not None else None
    dx = torch.empty_like(a)
    d_identity = torch.empty_like(a) if out is not None else x.new_empty(0)
    d_log, d_pooled = torch.empty(b, c, dtype=work), torch.empty(b, c, dtype=work)
    d_params = [torch.empty_like(t) for t in params]
    map_arg = lambda name, t: K.arg(name, t, x.dtype, (b, c, h, w), rows)  # noqa: E731
    vec_arg = lambda name, t: K.arg(name, t, work, (b, c))  # noqa: E731
    K.call("backward", x.dtype, map_arg("x", a), map_arg("grad", g), map_arg("out", y),
           *(vec_arg(n, t) for n, t in zip("PQV", (p, q, v))), K.arg("S", s, work, (b, h * w)),
           map_arg("dx", dx), map_arg("d_identity", d_identity if y is not None else None),
           vec_arg("d_log_scales", d_log), b, groups, width, h * w, rows)
    shapes = _group_shapes(K.PARAMS, groups, width, hidden)
    K.call("scales_backward", work, vec_arg("d_scales", d_log / scales), vec_arg("scales", scales),
           K.arg("params", params, work, shapes), K.arg("saved", saved, work, _saved_shapes(b, groups, width, hidden)),
           training, vec_arg("d_pooled", d_pooled), K.arg("d_params", d_params, work, shapes), b, groups, width, hidden)
    K.call("add_mean_grad", x.dtype, map_arg("dx", dx), vec_arg("d_pooled", d_pooled), b, c, h * w, rows)  # eq (1)
    return dx, d_identity, d_params


@lgam_backward.register_fake
def _(grad, x, out, s, scales, p, q, v, params, saved, groups, training):
    fmt = _layout(x)
    d_identity = torch.empty_like(x, memory_format=fmt) if out is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=fmt), d_identity, [torch.empty_like(t) for t in params]


def _setup_context(ctx, inputs, output) -> None:
    x, identity, params, _stats, groups, training, _eps, _momentum = inputs
    out, s, scales, p, q, v, saved, _new_stats = output
    ctx.groups, ctx.training, ctx.has_identity = groups, training, identity is not None
    ctx.n_params, ctx.n_stats = len(params), len(_stats)
    ctx.save_for_backward(x, out if identity is not None else None, s, scales, p, q, v, *params, *saved)


def _backward(ctx, d_out: Tensor, *_unused):
    x, out, s, scales, p, q, v, *rest = ctx.saved_tensors
    params, saved = rest[:ctx.n_params], rest[ctx.n_params:]
    dx, d_identity, d_params = lgam_backward(d_out, x, out, s, scales, p, q, v, params, saved, ctx.groups,
                                             ctx.training)
    return dx, d_identity if ctx.has_identity else None, d_params, [None] * ctx.n_stats, None, None, None, None


lgam_op.register_autograd(_backward, setup_context=_setup_context)


def _mlp_flops(x_shape: tuple[int, ...], params: list[tuple[int, ...]], groups: int) -> int:
    """FLOPs (2 per multiply-accumulate) of the groups' eq (2) MLPs, ``C' -> h -> C'``, on a batch
    of ``B``: the matrix multiplies the op runs, as ``FlopCounterMode`` counts them on the
    equations' path (its elementwise work, as there, is not counted)."""
    width, hidden = x_shape[1] // groups, params[0][0]
    return 2 * x_shape[0] * groups * 2 * width * hidden


@register_flop_formula(torch.ops.lgam.lgam)
def _lgam_flops(x, identity, params, stats, groups, training, eps, momentum, out_shape=None) -> int:
    return _mlp_flops(x, params, groups)


@register_flop_formula(torch.ops.lgam.lgam_backward)
def _lgam_backward_flops(grad, x, out, s, scales, p, q, v, params, saved, groups, training, out_shape=None) -> int:
    return 2 * _mlp_flops(x, params, groups)  # each Linear's backward: its input's and its weight's gradient
