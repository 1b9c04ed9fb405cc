"""LGAM's GPU kernels, in Triton: the steps of its CPU kernels (``_lgam_kernel.cpp``: read its
header first) as five kernels, compiled by Triton on first use (it comes with torch's CUDA
wheels; nothing else to install; ``scripts/triton_compile_check.py`` compiles them without a
GPU).

- :func:`_scales_kernel` (eval mode) and :func:`_scales_train_kernel`: eqs (2)-(4) on the pooled
  vectors, all groups in one launch, and the ladder weights ``P_k``, ``1 / P_{k-1}``, ``v`` from
  the scales. Eval mode: a program per block of samples (BatchNorm on running statistics); train
  mode: one program for the whole batch, taken in chunks of a few samples (BatchNorm on the
  batch's statistics, its running ones moved in place), and :func:`_scales_backward_kernel` its
  backward, the same way.
- :func:`_forward_kernel`: eqs (4)-(7) and a residual block's tail on a block of positions of one
  sample: ``S = A v`` over the groups, the gate, then the ladder ``u_k`` and ``A''``.
- :func:`_backward_kernel`: ``dA``, the identity's gradient and, per block of positions, the sums
  ``u_m (gate R_m + dS T_m)`` that make the group scales' gradient (added up after it).

The map is addressed as ``b C P + pos * sp + c * sc``: rows (channels_last, ``sp = C, sc = 1``) or
columns (contiguous, ``sp = 1, sc = P``). Arithmetic in float32 for 16-bit maps, float64 for
float64 (the ladder weights' dtype). With ``TRITON_INTERPRET=1`` set before Triton is imported
they run interpreted, on CPU tensors: how the tests check them on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CUDA wheels bring Triton; without it LGAM runs eager on the GPU
    triton = None

__all__ = ["TRITON_DTYPES", "TritonKernels", "triton_kernels", "triton_missing"]

#: map dtypes the kernels take (the scales and weights: float32, or float64 for float64)
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def triton_missing() -> str | None:
    """Why LGAM's Triton kernels cannot run here (Triton not installed), or None."""
    return "Triton is not installed" if triton is None else None


if triton is not None:

    @triton.jit
    def _rounded(x, dtype: tl.constexpr):
        """``x`` (float32, or float64 for float64) as ``dtype``, rounded to nearest even: by hand
        for bfloat16, which the GPU does too, but Triton's interpreter truncates."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

    @triton.jit
    def _ptr(table, i, wt: tl.constexpr):
        """The ``i``-th address in ``table``, as a pointer to ``wt``."""
        return tl.load(table + i).to(tl.pointer_type(wt))

    @triton.jit
    def _ladder_v(p_out, q_out, v_out, at, mask, G, Cg, BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr):
        """``v_j = (1 / P_{j-1}) sum_{k >= j} P_k`` at ``at`` (group 0's places of some rows),
        from the ``P_k`` and ``1 / P_{k-1}`` stored there."""
        tail = tl.zeros((BLOCK_B, BLOCK_W), p_out.dtype.element_ty)
        for i in range(G):
            k = G - 1 - i
            tail += tl.load(p_out + at + k * Cg, mask=mask, other=0.0)
            tl.store(v_out + at + k * Cg, tail * tl.load(q_out + at + k * Cg, mask=mask, other=0.0), mask=mask)

    @triton.jit
    def _scales_kernel(pooled, table, consts, scales, p_out, q_out, v_out, B, G, Cg, H,
                       BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr):
        """Eval mode, eqs (2)-(4) for ``BLOCK_B`` samples: ``pooled (B, C)`` -> ``scales``, ``p``,
        ``q``, ``v`` ``(B, C)``. ``table``: per group the addresses of the two Linears' weights
        and biases and the BN's weight, bias, running mean and variance; ``consts``: eps."""
        wt = pooled.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_W)
        cmask = cols < Cg
        mask = (rows < B)[:, None] & cmask[None, :]
        at = rows[:, None] * (G * Cg) + cols[None, :]  # group 0's places in (B, C)
        eps = tl.load(consts)
        s = tl.zeros((BLOCK_B, BLOCK_W), wt)
        scale = tl.zeros((BLOCK_B, BLOCK_W), wt)
        p = tl.full((BLOCK_B, BLOCK_W), 1.0, wt)
        for k in range(G):
            w1, b1, w2 = _ptr(table, 8 * k, wt), _ptr(table, 8 * k + 1, wt), _ptr(table, 8 * k + 2, wt)
            s = tl.load(pooled + at + k * Cg, mask=mask, other=0.0) + scale * s  # GAP(x_k + y_{k-1}), eq (4)
            z2 = tl.zeros((BLOCK_B, BLOCK_W), wt) + tl.load(_ptr(table, 8 * k + 3, wt) + cols, mask=cmask, other=0.0)[None, :]
            for j in range(H):  # eq (2): Linear -> ReLU -> Linear, a hidden unit at a time
                z1 = tl.sum(s * tl.load(w1 + j * Cg + cols, mask=cmask, other=0.0)[None, :], axis=1) + tl.load(b1 + j)
                z2 += tl.maximum(z1, 0.0)[:, None] * tl.load(w2 + cols * H + j, mask=cmask, other=0.0)[None, :]
            invstd = 1.0 / tl.sqrt(tl.load(_ptr(table, 8 * k + 7, wt) + cols, mask=cmask, other=1.0) + eps)
            zhat = (z2 - tl.load(_ptr(table, 8 * k + 6, wt) + cols, mask=cmask, other=0.0)[None, :]) * invstd[None, :]
            bn = (zhat * tl.load(_ptr(table, 8 * k + 4, wt) + cols, mask=cmask, other=0.0)[None, :]
                  + tl.load(_ptr(table, 8 * k + 5, wt) + cols, mask=cmask, other=0.0)[None, :])  # -> BatchNorm1d
            scale = 1.0 + tl.sigmoid(tl.maximum(bn, 0.0))  # -> ReLU -> sigmoid; eq (3): 1 + M
            tl.store(scales + at + k * Cg, scale, mask=mask)
            tl.store(q_out + at + k * Cg, 1.0 / p, mask=mask)  # 1 / P_{k-1}
            p = p * scale
            tl.store(p_out + at + k * Cg, p, mask=mask)  # P_k
        tl.debug_barrier()  # the P_k just stored are read back, by any of the threads
        _ladder_v(p_out, q_out, v_out, at, mask, G, Cg, BLOCK_B, BLOCK_W)

    @triton.jit
    def _scales_train_kernel(pooled, table, consts, scales, p_out, q_out, v_out, saved, B, G, Cg, H,
                             CHUNK: tl.constexpr, BLOCK_W: tl.constexpr):
        """Train mode, one program for the whole batch (BatchNorm couples the samples), in chunks
        of ``CHUNK`` samples (a tile in registers, the rest in ``saved`` and the outputs): per
        group, the MLP and the batch's sums, then the variance, then BN, the scales and ``P``;
        the running statistics moved (``consts``: eps, momentum). ``saved`` per group:
        ``s_k (B, C')``, the first Linear's output ``(B, h)``, the normalised BN input ``(B, C')``
        (the second Linear's output until then), ``1/sqrt(var + eps) (C')``, the BN output."""
        wt = pooled.dtype.element_ty
        cols = tl.arange(0, BLOCK_W)
        cmask = cols < Cg
        per = B * (3 * Cg + H) + Cg
        eps, momentum = tl.load(consts), tl.load(consts + 1)
        for k in range(G):
            w1, b1, w2 = _ptr(table, 8 * k, wt), _ptr(table, 8 * k + 1, wt), _ptr(table, 8 * k + 2, wt)
            b2 = tl.load(_ptr(table, 8 * k + 3, wt) + cols, mask=cmask, other=0.0)
            sv = saved + k * per
            total = tl.zeros((BLOCK_W,), wt)
            for r0 in range(0, B, CHUNK):  # the MLP, eq (2), and the batch's sums
                rows = r0 + tl.arange(0, CHUNK)
                mask = (rows < B)[:, None] & cmask[None, :]
                at = rows[:, None] * (G * Cg) + cols[None, :] + k * Cg
                tile = rows[:, None] * Cg + cols[None, :]
                s = tl.load(pooled + at, mask=mask, other=0.0)
                if k > 0:  # GAP(x_k + y_{k-1}) = GAP(x_k) + (1 + M_{k-1}) GAP(x_{k-1} + y_{k-2}), eq (4)
                    s += (tl.load(scales + at - Cg, mask=mask, other=0.0)
                          * tl.load(sv - per + tile, mask=mask, other=0.0))
                tl.store(sv + tile, s, mask=mask)
                z2 = tl.zeros((CHUNK, BLOCK_W), wt) + b2[None, :]
                for j in range(H):
                    z1 = tl.sum(s * tl.load(w1 + j * Cg + cols, mask=cmask, other=0.0)[None, :], axis=1) + tl.load(b1 + j)
                    tl.store(sv + B * Cg + rows * H + j, z1, mask=rows < B)
                    z2 += tl.maximum(z1, 0.0)[:, None] * tl.load(w2 + cols * H + j, mask=cmask, other=0.0)[None, :]
                tl.store(sv + B * (Cg + H) + tile, z2, mask=mask)
                total += tl.sum(tl.where(mask, z2, 0.0), axis=0)
            mu = total / B
            tl.debug_barrier()  # z2, stored above by any thread, read back below
            sq = tl.zeros((BLOCK_W,), wt)
            for r0 in range(0, B, CHUNK):  # the batch's variance, about its mean
                rows = r0 + tl.arange(0, CHUNK)
                mask = (rows < B)[:, None] & cmask[None, :]
                dev = tl.where(mask, tl.load(sv + B * (Cg + H) + rows[:, None] * Cg + cols[None, :], mask=mask, other=0.0) - mu[None, :], 0.0)
                sq += tl.sum(dev * dev, axis=0)
            var = sq / B
            invstd = 1.0 / tl.sqrt(var + eps)
            mean_at = _ptr(table, 8 * k + 6, wt) + cols
            var_at = _ptr(table, 8 * k + 7, wt) + cols
            tl.store(mean_at, (1 - momentum) * tl.load(mean_at, mask=cmask) + momentum * mu, mask=cmask)
            tl.store(var_at, (1 - momentum) * tl.load(var_at, mask=cmask) + momentum * (var * B / (B - 1)), mask=cmask)
            tl.store(sv + B * (2 * Cg + H) + cols, invstd, mask=cmask)
            gamma = tl.load(_ptr(table, 8 * k + 4, wt) + cols, mask=cmask, other=0.0)
            beta = tl.load(_ptr(table, 8 * k + 5, wt) + cols, mask=cmask, other=0.0)
            for r0 in range(0, B, CHUNK):  # BN, ReLU, sigmoid; eq (3): 1 + M; P_k
                rows = r0 + tl.arange(0, CHUNK)
                mask = (rows < B)[:, None] & cmask[None, :]
                at = rows[:, None] * (G * Cg) + cols[None, :] + k * Cg
                tile = rows[:, None] * Cg + cols[None, :]
                zhat = (tl.load(sv + B * (Cg + H) + tile, mask=mask, other=0.0) - mu[None, :]) * invstd[None, :]
                tl.debug_barrier()  # every thread has read its z2 before any overwrites one
                tl.store(sv + B * (Cg + H) + tile, zhat, mask=mask)
                bn = zhat * gamma[None, :] + beta[None, :]
                tl.store(sv + B * (2 * Cg + H) + Cg + tile, bn, mask=mask)
                scale = 1.0 + tl.sigmoid(tl.maximum(bn, 0.0))
                tl.store(scales + at, scale, mask=mask)
                p_prev = tl.full((CHUNK, BLOCK_W), 1.0, wt)
                if k > 0:
                    p_prev = tl.load(p_out + at - Cg, mask=mask, other=1.0)
                tl.store(q_out + at, 1.0 / p_prev, mask=mask)
                tl.store(p_out + at, p_prev * scale, mask=mask)
            tl.debug_barrier()  # this group's scales, s_k and P_k are read by the next
        for r0 in range(0, B, CHUNK):
            rows = r0 + tl.arange(0, CHUNK)
            mask = (rows < B)[:, None] & cmask[None, :]
            _ladder_v(p_out, q_out, v_out, rows[:, None] * (G * Cg) + cols[None, :], mask, G, Cg, CHUNK, BLOCK_W)

    @triton.jit
    def _scales_backward_kernel(d_scales, scales, table, saved, d_pooled, grads, B, G, Cg, H,
                                CHUNK: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_H: tl.constexpr):
        """Train mode's backward, one program, groups last to first, the batch in chunks:
        ``d_scales (B, C)`` -> ``d_pooled (B, C)`` (``d s_k``, which the group before reads) and,
        per group at ``grads + k * (2 H C' + H + 3 C')``, the gradients of the first Linear's
        weight and bias, the second's, the BN's weight and bias (in that order, each dense).
        ``d_pooled``'s group ``k`` holds BN's input gradient until ``d s_k`` replaces it."""
        wt = scales.dtype.element_ty
        cols = tl.arange(0, BLOCK_W)
        hs = tl.arange(0, BLOCK_H)
        cmask, hmask = cols < Cg, tl.arange(0, BLOCK_H) < H
        per = B * (3 * Cg + H) + Cg
        for i in range(G):
            k = G - 1 - i
            sv = saved + k * per
            gw = grads + k * (2 * H * Cg + H + 3 * Cg)
            w1, w2 = _ptr(table, 8 * k, wt), _ptr(table, 8 * k + 2, wt)
            sum_d = tl.zeros((BLOCK_W,), wt)
            sum_dz = tl.zeros((BLOCK_W,), wt)
            for r0 in range(0, B, CHUNK):  # through sigmoid(ReLU(bn)); BN's sums
                rows = r0 + tl.arange(0, CHUNK)
                mask = (rows < B)[:, None] & cmask[None, :]
                at = rows[:, None] * (G * Cg) + cols[None, :] + k * Cg
                tile = rows[:, None] * Cg + cols[None, :]
                d = tl.load(d_scales + at, mask=mask, other=0.0)
                if k + 1 < G:  # and through s_{k+1} = x_{k+1} + scale_k s_k
                    d += tl.load(d_pooled + at + Cg, mask=mask, other=0.0) * tl.load(sv + tile, mask=mask, other=0.0)
                m = tl.load(scales + at, mask=mask, other=1.0) - 1.0  # M = sigmoid(ReLU(bn))
                bn = tl.load(sv + B * (2 * Cg + H) + Cg + tile, mask=mask, other=0.0)
                dbn = tl.where(mask & (bn > 0), d * m * (1.0 - m), 0.0)
                tl.store(d_pooled + at, dbn, mask=mask)
                sum_d += tl.sum(dbn, axis=0)
                sum_dz += tl.sum(dbn * tl.load(sv + B * (Cg + H) + tile, mask=mask, other=0.0), axis=0)
            tl.store(gw + 2 * H * Cg + H + Cg + cols, sum_dz, mask=cmask)  # BN weight
            tl.store(gw + 2 * H * Cg + H + 2 * Cg + cols, sum_d, mask=cmask)  # BN bias
            gain = tl.load(_ptr(table, 8 * k + 4, wt) + cols, mask=cmask, other=0.0) * tl.load(
                sv + B * (2 * Cg + H) + cols, mask=cmask, other=0.0) / B  # gamma / sqrt(var + eps) / B
            db2 = tl.zeros((BLOCK_W,), wt)
            dw2 = tl.zeros((BLOCK_H, BLOCK_W), wt)  # transposed: [j, i] = dL/dW2[i, j]
            dw1 = tl.zeros((BLOCK_H, BLOCK_W), wt)
            db1 = tl.zeros((BLOCK_H,), wt)
            tl.debug_barrier()  # BN's input gradient, stored above by any thread, read back below
            for r0 in range(0, B, CHUNK):  # BN's backward, the two Linears', s_k's gradient
                rows = r0 + tl.arange(0, CHUNK)
                mask = (rows < B)[:, None] & cmask[None, :]
                at = rows[:, None] * (G * Cg) + cols[None, :] + k * Cg
                tile = rows[:, None] * Cg + cols[None, :]
                zhat = tl.load(sv + B * (Cg + H) + tile, mask=mask, other=0.0)
                dbn = tl.load(d_pooled + at, mask=mask, other=0.0)
                dz2 = tl.where(mask, gain[None, :] * (B * dbn - sum_d[None, :] - zhat * sum_dz[None, :]), 0.0)
                db2 += tl.sum(dz2, axis=0)
                s = tl.load(sv + tile, mask=mask, other=0.0)
                ds = tl.zeros((CHUNK, BLOCK_W), wt)
                for j in range(H):
                    z1 = tl.load(sv + B * Cg + rows * H + j, mask=rows < B, other=0.0)
                    pick = (hs == j)[:, None]
                    dw2 += tl.where(pick, tl.sum(dz2 * tl.maximum(z1, 0.0)[:, None], axis=0)[None, :], 0.0)
                    dz1 = tl.where(z1 > 0, tl.sum(dz2 * tl.load(w2 + cols * H + j, mask=cmask, other=0.0)[None, :], axis=1), 0.0)
                    db1 += tl.where(hs == j, tl.sum(dz1, axis=0), 0.0)
                    dw1 += tl.where(pick, tl.sum(dz1[:, None] * s, axis=0)[None, :], 0.0)
                    ds += dz1[:, None] * tl.load(w1 + j * Cg + cols, mask=cmask, other=0.0)[None, :]
                if k + 1 < G:  # s_k: the MLP's input, and the ladder's carry
                    ds += tl.load(d_pooled + at + Cg, mask=mask, other=0.0) * tl.load(scales + at, mask=mask, other=0.0)
                tl.debug_barrier()  # every thread has read its dbn before any overwrites one
                tl.store(d_pooled + at, ds, mask=mask)
            both = hmask[:, None] & cmask[None, :]
            tl.store(gw + hs[:, None] * Cg + cols[None, :], dw1, mask=both)  # first weight (h, C')
            tl.store(gw + H * Cg + hs, db1, mask=hmask)  # first bias
            tl.store(gw + H * Cg + H + cols[None, :] * H + hs[:, None], dw2, mask=both)  # second weight (C', h)
            tl.store(gw + 2 * H * Cg + H + cols, db2, mask=cmask)  # second bias
            tl.debug_barrier()  # d s_k, stored above, is read by the group before

    @triton.jit
    def _forward_kernel(x, identity, p, q, v, out, s_out, C, Cg, G, P, sp, sc,
                        RES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr):
        """Eqs (4)-(7) (and ``ReLU(A'' + identity)`` with ``RES``) on ``BLOCK_P`` positions of
        sample ``program_id(0)``; ``S`` to ``s_out (B, P)``."""
        wt = p.dtype.element_ty
        b = tl.program_id(0).to(tl.int64)
        pos = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = tl.arange(0, BLOCK_W)
        pmask, cmask = pos < P, cols < Cg
        mask = pmask[:, None] & cmask[None, :]
        at = b * C * P + pos[:, None] * sp + cols[None, :] * sc  # group 0 at these positions
        wat = b * C + cols  # the sample's weights, group 0
        acc = tl.zeros((BLOCK_P,), wt)
        for k in range(G):  # eq (5): S = A v
            xk = tl.load(x + at + k * Cg * sc, mask=mask, other=0.0).to(wt)
            acc += tl.sum(xk * tl.load(v + wat + k * Cg, mask=cmask, other=0.0)[None, :], axis=1)
        tl.store(s_out + b * P + pos, acc, mask=pmask)
        gate = tl.sigmoid(tl.maximum(acc, 0.0))[:, None]  # eq (6)
        u = tl.zeros((BLOCK_P, BLOCK_W), wt)
        for k in range(G):
            o = at + k * Cg * sc
            xk = tl.load(x + o, mask=mask, other=0.0).to(wt)
            u += xk * tl.load(q + wat + k * Cg, mask=cmask, other=0.0)[None, :]  # eq (4): y_k = P_k u_k
            a2 = xk + u * tl.load(p + wat + k * Cg, mask=cmask, other=0.0)[None, :] * gate  # eq (7)
            if RES:
                a2 = tl.maximum(a2 + tl.load(identity + o, mask=mask, other=0.0).to(wt), 0.0)
            tl.store(out + o, _rounded(a2, out.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(x, g_in, y, p, q, v, s, dx, d_identity, dl, C, Cg, G, P, sp, sc, blocks,
                         RES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr):
        """The backward on ``BLOCK_P`` positions of one sample: ``dA`` (and the identity's
        gradient, ``g_in`` masked by the saved output ``y > 0``, with ``RES``), and this block's
        sums ``u_m (gate R_m + dS T_m)`` to ``dl (B, blocks, C)``.

        ``R_m = sum_{k >= m} P_k dA''_k`` (per channel of a group), ``T_m = v_m P_{m-1}``:
        ``dA_j = dA''_j + dS v_j + gate R_j / P_{j-1}``. A first pass over the groups gives ``R``'s
        total and ``dM_spat = sum_c dA''_c A'_c``, a second the rest, ``R`` taken off as it goes
        (``R`` is dominated by its last groups, ``P_k`` growing with ``k``, so nothing cancels)."""
        wt = p.dtype.element_ty
        b = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        pos = blk * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = tl.arange(0, BLOCK_W)
        pmask, cmask = pos < P, cols < Cg
        mask = pmask[:, None] & cmask[None, :]
        at = b * C * P + pos[:, None] * sp + cols[None, :] * sc
        wat = b * C + cols
        sv = tl.load(s + b * P + pos, mask=pmask, other=0.0)
        gate = tl.sigmoid(tl.maximum(sv, 0.0))
        u = tl.zeros((BLOCK_P, BLOCK_W), wt)
        r = tl.zeros((BLOCK_P, BLOCK_W), wt)
        dm = tl.zeros((BLOCK_P,), wt)
        for k in range(G):
            o = at + k * Cg * sc
            g = tl.load(g_in + o, mask=mask, other=0.0).to(wt)
            if RES:
                g = tl.where(tl.load(y + o, mask=mask, other=0.0) > 0, g, 0.0)
            pk = tl.load(p + wat + k * Cg, mask=cmask, other=0.0)[None, :]
            u += tl.load(x + o, mask=mask, other=0.0).to(wt) * tl.load(q + wat + k * Cg, mask=cmask, other=0.0)[None, :]
            dm += tl.sum(g * u * pk, axis=1)
            r += g * pk
        ds = tl.where(sv > 0, dm * gate * (1.0 - gate), 0.0)[:, None]  # through eq (6)
        gate = gate[:, None]
        u = tl.zeros((BLOCK_P, BLOCK_W), wt)
        for k in range(G):
            o = at + k * Cg * sc
            g = tl.load(g_in + o, mask=mask, other=0.0).to(wt)
            if RES:
                g = tl.where(tl.load(y + o, mask=mask, other=0.0) > 0, g, 0.0)
                tl.store(d_identity + o, _rounded(g, d_identity.dtype.element_ty), mask=mask)
            pk = tl.load(p + wat + k * Cg, mask=cmask, other=0.0)[None, :]
            qk = tl.load(q + wat + k * Cg, mask=cmask, other=1.0)[None, :]
            vk = tl.load(v + wat + k * Cg, mask=cmask, other=0.0)[None, :]
            u += tl.load(x + o, mask=mask, other=0.0).to(wt) * qk
            tl.store(dl + (b * blocks + blk) * C + k * Cg + cols, tl.sum(u * (gate * r + ds * (vk / qk)), axis=0), mask=cmask)
            tl.store(dx + o, _rounded(g + ds * vk + qk * gate * r, dx.dtype.element_ty), mask=mask)  # eqs (7), (5), (4)
            r -= g * pk


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _warps(elements: int) -> int:
    """Warps for a tile of ``elements``: 8 or fewer per thread (more spill registers:
    ``scripts/triton_compile_check.py``)."""
    return 4 if elements <= 1024 else 8 if elements <= 2048 else 16


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _chunk(batch: int, cg: int) -> tuple[int, int]:
    """``(rows, BLOCK_W)`` of the scales kernels' tile: a group's channels, and as many samples
    as make ~1024 elements (a tile that stays in registers): the eval kernel's ``BLOCK_B``, the
    train kernels' ``CHUNK``."""
    width = _pow2(cg)
    return min(_pow2(batch), max(1, 1024 // width)), width


def _eval_blocks(batch: int, cg: int) -> tuple[int, int, int]:
    """``(BLOCK_B, BLOCK_W, num_warps)`` of the eval-mode scales kernel."""
    block, width = _chunk(batch, cg)
    return block, width, _warps(block * width)


def _backward_warps(chunk: int, width: int, hidden: int) -> int:
    """The train-mode backward also holds two ``(h, C')`` weight gradients in registers."""
    return _warps(max(chunk, _pow2(hidden)) * width)


def _map_blocks(cg: int, positions: int) -> tuple[int, int, int]:
    """``(BLOCK_P, BLOCK_W, num_warps)`` of the map kernels: a group's channels, as many positions
    as make ~1024 elements, 4 a thread. Memory-bound kernels want many warps in flight: compiled
    for sm_90, 8 elements a thread took 79-148 registers (the backward 8-16 warps an SM), 4 take
    40-75 (24-48 warps); ``scripts/triton_compile_check.py`` lists them all."""
    width = _pow2(cg)
    block = min(_pow2(positions), max(1, 1024 // width))
    return block, width, max(1, min(8, block * width // 128))


class TritonKernels:
    """The kernels as the autograd Functions of :mod:`._lgam_kernel` call them (the same calls
    as its C++ kernels' backend): tensors in, tensors out, on the map's device."""

    dtypes = TRITON_DTYPES

    def missing(self) -> str | None:
        return triton_missing()

    def mean(self, a: Tensor, rows: bool, work: torch.dtype) -> Tensor:
        return a.mean(dim=(2, 3), dtype=work)  # eq (1): one reduction, summed in ``work``

    def add_mean_grad(self, d_a: Tensor, d_mean: Tensor, rows: bool) -> None:
        b, c, h, w = d_a.shape
        d_a.add_(d_mean.view(b, c, 1, 1), alpha=1 / (h * w))  # added in the work dtype

    def weights(self, tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
        """The table of the group tensors' addresses, on their device."""
        return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=tensors[0].device)

    def scales_eval(self, pooled: Tensor, table: Tensor, eps: float, groups: int, hidden: int) -> tuple[Tensor, ...]:
        b, c = pooled.shape
        out = [torch.empty_like(pooled) for _ in range(4)]
        block, width, warps = _eval_blocks(b, c // groups)
        with _on(pooled.device):
            _scales_kernel[(triton.cdiv(b, block),)](
                pooled, table, _consts(pooled.device, pooled.dtype, eps, 0.0), *out, b, groups, c // groups,
                hidden, BLOCK_B=block, BLOCK_W=width, num_warps=warps)
        return tuple(out)

    def saved_size(self, b: int, groups: int, cg: int, hidden: int) -> int:
        return groups * (b * (3 * cg + hidden) + cg)

    def scales_train(self, pooled: Tensor, table: Tensor, eps: float, momentum: float, groups: int,
                     hidden: int) -> tuple[Tensor, ...]:
        b, c = pooled.shape
        out = [torch.empty_like(pooled) for _ in range(4)]
        saved = pooled.new_empty(self.saved_size(b, groups, c // groups, hidden))
        chunk, width = _chunk(b, c // groups)
        with _on(pooled.device):
            _scales_train_kernel[(1,)](pooled, table, _consts(pooled.device, pooled.dtype, eps, momentum), *out,
                                       saved, b, groups, c // groups, hidden, CHUNK=chunk, BLOCK_W=width,
                                       num_warps=_warps(chunk * width))
        return (*out, saved)

    def scales_train_backward(self, d_scales: Tensor, scales: Tensor, table: Tensor, saved: Tensor,
                              learned: list[Tensor], groups: int, hidden: int) -> tuple[Tensor, list[Tensor]]:
        """``d_pooled`` and the gradients of ``learned`` (the parameters among the group
        tensors, six per group), as views of one buffer the kernel fills."""
        b, c = scales.shape
        cg = c // groups
        flat = scales.new_empty(groups * (2 * hidden * cg + hidden + 3 * cg))
        d_pooled = torch.empty_like(scales)
        chunk, width = _chunk(b, cg)
        with _on(scales.device):
            _scales_backward_kernel[(1,)](d_scales, scales, table, saved, d_pooled, flat, b, groups, cg, hidden,
                                          CHUNK=chunk, BLOCK_W=width, BLOCK_H=_pow2(hidden),
                                          num_warps=_backward_warps(chunk, width, hidden))
        grads = [g.view_as(t) for g, t in zip(flat.split([t.numel() for t in learned]), learned)]
        return d_pooled, grads

    def forward(self, a: Tensor, identity: Tensor | None, p: Tensor, q: Tensor, v: Tensor, groups: int,
                rows: bool) -> tuple[Tensor, Tensor]:
        b, c, h, w = a.shape
        positions, cg = h * w, c // groups
        out = torch.empty_like(a)
        s = torch.empty(b, positions, dtype=p.dtype, device=a.device)
        block_p, width, warps = _map_blocks(cg, positions)
        sp, sc = (c, 1) if rows else (1, positions)
        with _on(a.device):
            _forward_kernel[(b, triton.cdiv(positions, block_p))](
                a, identity if identity is not None else a, p, q, v, out, s, c, cg, groups, positions, sp, sc,
                RES=identity is not None, BLOCK_P=block_p, BLOCK_W=width, num_warps=warps)
        return out, s

    def backward(self, a: Tensor, g: Tensor, y: Tensor | None, p: Tensor, q: Tensor, v: Tensor, s: Tensor,
                 groups: int, rows: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        b, c, h, w = a.shape
        positions, cg = h * w, c // groups
        block_p, width, warps = _map_blocks(cg, positions)
        blocks = triton.cdiv(positions, block_p)
        da = torch.empty_like(a)
        d_identity = torch.empty_like(a) if y is not None else None
        dl = torch.empty(b, blocks, c, dtype=p.dtype, device=a.device)
        sp, sc = (c, 1) if rows else (1, positions)
        with _on(a.device):
            _backward_kernel[(b, blocks)](
                a, g, y if y is not None else a, p, q, v, s, da, d_identity if y is not None else da, dl, c, cg,
                groups, positions, sp, sc, blocks, RES=y is not None, BLOCK_P=block_p, BLOCK_W=width,
                num_warps=warps)
        return da, d_identity, dl.sum(1)


@functools.lru_cache(maxsize=64)
def _consts(device: torch.device, dtype: torch.dtype, eps: float, momentum: float) -> Tensor:
    """``[eps, momentum]`` on ``device`` in ``dtype`` (a float argument would be float32), made
    once per value: no copy to the device per call (nor in a CUDA graph's capture)."""
    return torch.tensor([eps, momentum], dtype=dtype, device=device)


@functools.cache
def triton_kernels() -> TritonKernels:
    return TritonKernels()
