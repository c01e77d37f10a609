"""Triton kernels for ``steer`` and the fused ``add_steer_rmsnorm``.

Math (see :mod:`steerkern.ops.reference`): for row ``h`` of ``[rows, d]`` and
entry ``e = index[row]`` (``0`` or out of range: no steering; ``index=None``:
entry 1), in this order: condition ``cos(h, u_e) > thr_e``, projection
``h + lam_e * (c_e - Q_e h) Q_e``, addition ``+ alpha_e v_e``, affine
``w_e * h + b_e``, norm preservation.  The fused op first forms
``r = round(x + residual)`` and afterwards writes
``y = r * rsqrt(mean(r^2) + eps) * (weight + weight_offset)`` from the
rounded steered ``r``.

Layout: one program per row; ``h``, ``residual`` and the outputs are
``[rows, d]`` contiguous; table tensors are the fp32 ``[K, ...]`` of
:class:`steerkern.ops.table.SteerTable`; ``index`` is int32 ``[rows]``.
Rows that fit one block (``next_power_of_2(d) <= MAX_ONE_BLOCK``) stay in
registers; longer rows loop over blocks of ``LOOP_BLOCK`` and re-read them
(from L2).

Bound: memory.  Per row it reads ``d`` elements of ``x`` (and of
``residual``) plus the table rows of its entry (cached across rows), and
writes ``d`` elements of ``r`` (and of ``y``): ``rows * d * itemsize * (2..4)``
bytes.  Arithmetic is fp32 with one rounding per output; an unsteered row is
stored from the loaded value, so it is returned bit-exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops import reference

# Rows up to this length are processed in registers in one block.
MAX_ONE_BLOCK = 8192
# Block length when a row is longer than MAX_ONE_BLOCK.
LOOP_BLOCK = 4096


@triton.jit
def _round_to(y, DTYPE: tl.constexpr):
    """Cast fp32 ``y`` to DTYPE rounding to nearest even.

    bf16 is rounded by hand: the CPU interpreter truncates fp32 -> bf16,
    the GPU rounds; the integer form gives the same bits on both.
    """
    if DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        up = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        half = tl.where(y != y, 0x7FC0, up).to(tl.uint16)
        return half.to(tl.bfloat16, bitcast=True)
    else:
        return y.to(DTYPE)


@triton.jit
def _load_row(X, RES, offs, m, HAS_RES: tl.constexpr):
    """The row in its own dtype; for the fused op the rounded sum x + residual."""
    x = tl.load(X + offs, mask=m, other=0.0)
    if HAS_RES:
        res = tl.load(RES + offs, mask=m, other=0.0)
        x = _round_to(x.to(tl.float32) + res.to(tl.float32), X.dtype.element_ty)
    return x


@triton.jit
def _stats(h, offs, m, ent, d, k, kk, BASIS, COND,
           HAS_BASIS: tl.constexpr, HAS_COND: tl.constexpr):
    """Partial sums over one block: ||h||^2, h . u_e and Q_e h (a [BLOCK_K] vector)."""
    ss = tl.sum(h * h, axis=0)
    du = 0.0
    if HAS_COND:
        u = tl.load(COND + ent * d + offs, mask=m, other=0.0)
        du = tl.sum(h * u, axis=0)
    coeff = tl.zeros(kk.shape, tl.float32)
    if HAS_BASIS:
        for j in range(0, k):
            q = tl.load(BASIS + (ent * k + j) * d + offs, mask=m, other=0.0)
            coeff = tl.where(kk == j, coeff + tl.sum(h * q, axis=0), coeff)
    return ss, du, coeff


@triton.jit
def _steered(h, offs, m, ent, d, k, kk, delta, BASIS, GAIN, VEC, ALPHA, SCALE, SHIFT,
             HAS_BASIS: tl.constexpr, HAS_VEC: tl.constexpr,
             HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Steps 2-4 on one block; ``delta`` is c_e - Q_e h."""
    y = h
    if HAS_BASIS:
        proj = tl.zeros(h.shape, tl.float32)
        for j in range(0, k):
            q = tl.load(BASIS + (ent * k + j) * d + offs, mask=m, other=0.0)
            proj += tl.sum(tl.where(kk == j, delta, 0.0), axis=0) * q
        y = y + tl.load(GAIN + ent) * proj
    if HAS_VEC:
        y = y + tl.load(ALPHA + ent) * tl.load(VEC + ent * d + offs, mask=m, other=0.0)
    if HAS_SCALE:
        y = y * tl.load(SCALE + ent * d + offs, mask=m, other=1.0)
    if HAS_SHIFT:
        y = y + tl.load(SHIFT + ent * d + offs, mask=m, other=0.0)
    return y


@triton.jit
def _steer_rows_kernel(
    X, RES, R_OUT, Y_OUT, NORM_W, INDEX,
    BASIS, TARGET, GAIN, VEC, ALPHA, SCALE, SHIFT, COND, COND_THR, PRESERVE,
    d, k, K, eps, w_offset,
    HAS_RES: tl.constexpr, WRITE_NORM: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_BASIS: tl.constexpr, HAS_VEC: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_COND: tl.constexpr, HAS_PRESERVE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * d
    R_OUT += row * d
    if HAS_RES:
        RES += row * d
    if WRITE_NORM:
        Y_OUT += row * d
    # the entry is read here, per row; an out-of-range index cannot raise on
    # the device, so it means "no steering" (the Python layer rejects it first)
    if HAS_INDEX:
        e = tl.load(INDEX + row)
        e = tl.where((e >= 1) & (e <= K), e, 0)
    else:
        e = tl.minimum(K, 1)
    ent = tl.maximum(e - 1, 0)
    kk = tl.arange(0, BLOCK_K)
    offs = tl.arange(0, BLOCK_D)

    # 1. statistics of the input row
    if ONE_BLOCK:
        m = offs < d
        x = _load_row(X, RES, offs, m, HAS_RES)
        h = x.to(tl.float32)
        ss, du, coeff = _stats(h, offs, m, ent, d, k, kk, BASIS, COND, HAS_BASIS, HAS_COND)
    else:
        ss = 0.0
        du = 0.0
        coeff = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, d, BLOCK_D):
            mb = start + offs < d
            hb = _load_row(X, RES, start + offs, mb, HAS_RES).to(tl.float32)
            ss_b, du_b, coeff_b = _stats(hb, start + offs, mb, ent, d, k, kk, BASIS, COND,
                                         HAS_BASIS, HAS_COND)
            ss += ss_b
            du += du_b
            coeff += coeff_b
    norm_in = tl.sqrt(ss)
    use = e > 0
    if HAS_COND:
        cos = tl.where(norm_in > 0, du / tl.maximum(norm_in, 1e-30), 0.0)  # 1e-30: the spec's _TINY
        use = use & (cos > tl.load(COND_THR + ent))
    delta = coeff
    if HAS_BASIS:
        delta = tl.load(TARGET + ent * k + kk, mask=kk < k, other=0.0) - coeff

    # 2. norm of the steered row, when the entry asks to preserve the norm
    factor = 1.0
    if HAS_PRESERVE:
        if ONE_BLOCK:
            y = _steered(h, offs, m, ent, d, k, kk, delta, BASIS, GAIN, VEC, ALPHA, SCALE, SHIFT,
                         HAS_BASIS, HAS_VEC, HAS_SCALE, HAS_SHIFT)
            ss_y = tl.sum(tl.where(m, y * y, 0.0), axis=0)
        else:
            ss_y = 0.0
            for start in range(0, d, BLOCK_D):
                mb = start + offs < d
                hb = _load_row(X, RES, start + offs, mb, HAS_RES).to(tl.float32)
                yb = _steered(hb, start + offs, mb, ent, d, k, kk, delta, BASIS, GAIN, VEC, ALPHA,
                              SCALE, SHIFT, HAS_BASIS, HAS_VEC, HAS_SCALE, HAS_SHIFT)
                ss_y += tl.sum(tl.where(mb, yb * yb, 0.0), axis=0)
        norm_y = tl.sqrt(ss_y)
        keep = (tl.load(PRESERVE + ent) != 0) & (norm_y > 0)
        factor = tl.where(keep, norm_in / tl.maximum(norm_y, 1e-30), 1.0)

    # 3. write the steered row (unsteered rows: the loaded bits), 4. RMSNorm
    if ONE_BLOCK:
        if HAS_PRESERVE:
            y = y * factor  # the y of step 2: not computed twice
        else:
            y = _steered(h, offs, m, ent, d, k, kk, delta, BASIS, GAIN, VEC, ALPHA, SCALE, SHIFT,
                         HAS_BASIS, HAS_VEC, HAS_SCALE, HAS_SHIFT)
        r = tl.where(use, _round_to(y, R_OUT.dtype.element_ty), x)
        tl.store(R_OUT + offs, r, mask=m)
        if WRITE_NORM:
            rf = r.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(rf * rf, axis=0) / d + eps)
            w = tl.load(NORM_W + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(Y_OUT + offs, _round_to(rf * rstd * (w + w_offset), R_OUT.dtype.element_ty), mask=m)
    else:
        ss_r = 0.0
        for start in range(0, d, BLOCK_D):
            mb = start + offs < d
            xb = _load_row(X, RES, start + offs, mb, HAS_RES)
            yb = _steered(xb.to(tl.float32), start + offs, mb, ent, d, k, kk, delta, BASIS, GAIN,
                          VEC, ALPHA, SCALE, SHIFT, HAS_BASIS, HAS_VEC, HAS_SCALE, HAS_SHIFT)
            if HAS_PRESERVE:
                yb = yb * factor
            rb = tl.where(use, _round_to(yb, R_OUT.dtype.element_ty), xb)
            tl.store(R_OUT + start + offs, rb, mask=mb)
            rf = rb.to(tl.float32)
            ss_r += tl.sum(rf * rf, axis=0)
        if WRITE_NORM:
            rstd = 1.0 / tl.sqrt(ss_r / d + eps)
            # r was written by other threads of this program: make it visible
            tl.debug_barrier()
            for start in range(0, d, BLOCK_D):
                mb = start + offs < d
                rf = tl.load(R_OUT + start + offs, mask=mb, other=0.0).to(tl.float32)
                w = tl.load(NORM_W + start + offs, mask=mb, other=0.0).to(tl.float32)
                tl.store(Y_OUT + start + offs, _round_to(rf * rstd * (w + w_offset), R_OUT.dtype.element_ty), mask=mb)


def _launch(x, residual, r_out, y_out, norm_w, eps, weight_offset, index, table):
    rows, d = x.shape
    if rows == 0:
        return
    basis, target, gain, vec, alpha, scale, shift, cond_dir, cond_threshold, preserve_norm = table
    K = reference.table_size(*table)
    k = basis.shape[1] if basis is not None else 0
    one_block = triton.next_power_of_2(d) <= MAX_ONE_BLOCK
    block_d = triton.next_power_of_2(d) if one_block else LOOP_BLOCK
    # absent tensors are never read (their HAS_ flag is off); x stands in
    dummy = x
    _steer_rows_kernel[(rows,)](
        x, residual if residual is not None else dummy, r_out,
        y_out if y_out is not None else dummy, norm_w if norm_w is not None else dummy,
        index if index is not None else dummy,
        *(t if t is not None else dummy for t in table),
        d, k, K, float(eps), float(weight_offset),
        HAS_RES=residual is not None, WRITE_NORM=y_out is not None, HAS_INDEX=index is not None,
        HAS_BASIS=basis is not None, HAS_VEC=vec is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, HAS_COND=cond_dir is not None,
        HAS_PRESERVE=preserve_norm is not None,
        BLOCK_D=block_d, BLOCK_K=triton.next_power_of_2(max(k, 1)), ONE_BLOCK=one_block,
        num_warps=min(16, max(1, block_d // 256)),
    )


def steer(h, index, *table):
    """Kernel-level ``steer``: ``h`` ``[rows, d]`` contiguous, ``index`` int32 ``[rows]`` or None."""
    if reference.table_size(*table) == 0:
        return h.clone()
    out = torch.empty_like(h)
    _launch(h, None, out, None, None, 0.0, 0.0, index, table)
    return out


def add_steer_rmsnorm(x, residual, weight, eps, weight_offset, index, *table):
    """Kernel-level ``add_steer_rmsnorm``: returns ``(r, y)``, both ``[rows, d]`` in x's dtype."""
    r = torch.empty_like(x)
    y = torch.empty_like(x)
    _launch(x, residual, r, y, weight, eps, weight_offset, index, table)
    return r, y
