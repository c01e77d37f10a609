"""Triton split-K sparse GEMV for ``sparse_linear`` (``steer_sparse_linear`` is
derived from it and ``steer`` in :mod:`steerkern.backends`).

Math (see :mod:`steerkern.ops.reference`): ``y[b] = sum_i m[b, i] x[b, i] W^T[i, :] + bias``
with the per-row mask ``m[b, i] = not (|x[b, i]| * s_i <= t)`` (threshold
mode, decided in the kernel from the 0-dim device tensor ``t``) or a top-k
mask built on the device beforehand (ties keep the lower index).

Layout: ``x`` ``[rows, in]`` contiguous; ``weight_t`` = W^T ``[in, out]``
contiguous, in any float dtype.  A program owns ``BLOCK_N`` outputs, a
contiguous range of input rows (its split of K) and up to 8 rows of ``x``.
For each block of inputs it loads the union of the rows' active inputs once
-- an input active in no row is a masked load, so its contiguous row of W^T
is never read -- and masks every row on its own.  Partial sums are added
with fp32 atomics into a workspace that starts as the bias; the workspace is
rounded to x's dtype once at the end.

Bound: memory.  Reads ``(1 - sparsity_of_union) * in * out * w_itemsize``
bytes of weight, plus ``x`` once per output tile; at batch > DENSE_CROSSOVER
the union is nearly dense and a cuBLAS matmul on the masked ``x`` wins.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...ops import reference

# Above this many rows the masked dense matmul (torch) takes over: the union
# of the rows' active inputs approaches the full weight, and cuBLAS reads it
# faster.  8 is the largest decode batch the split-K kernel is built for;
# bench/bench_ops_gpu.py measures the real crossover on a GPU.
DENSE_CROSSOVER = 8
# Rows of x per program (the kernel keeps one accumulator row per x row).
MAX_ROWS_PER_PROGRAM = 8
BLOCK_N = 128
# Programs to aim for per SM (more splits of K, more atomics).
PROGRAMS_PER_SM = 4
# No split of K gets fewer input rows than this.
MIN_ROWS_PER_SPLIT = 64


@triton.jit
def _sparse_gemv_kernel(
    X, MASK, WT, SCALE, THRESHOLD, WS,
    rows, n_in, n_out, rows_per_split,
    HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    bb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_ok = bb < rows
    n_ok = nn < n_out
    x_rows = bb.to(tl.int64)[:, None] * n_in
    t = tl.load(THRESHOLD)
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    k_lo = pid_k * rows_per_split
    k_hi = tl.minimum(k_lo + rows_per_split, n_in)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_hi
        in_bounds = b_ok[:, None] & k_ok[None, :]
        x = tl.load(X + x_rows + kk[None, :], mask=in_bounds, other=0.0).to(tl.float32)
        if HAS_MASK:
            active = tl.load(MASK + x_rows + kk[None, :], mask=in_bounds, other=0) != 0
        else:
            score = tl.abs(x)
            if HAS_SCALE:
                score = score * tl.load(SCALE + kk, mask=k_ok, other=0.0)[None, :]
            # "not <=" keeps NaN inputs active, as a dense layer would see them
            active = ~(score <= t)
        active = active & in_bounds
        xm = tl.where(active, x, 0.0)
        union = tl.max(active.to(tl.int32), axis=0) > 0
        w = tl.load(WT + kk.to(tl.int64)[:, None] * n_out + nn[None, :],
                    mask=union[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xm[:, :, None] * w[None, :, :], axis=1)
    # relaxed: the sums are only read by a later kernel, no ordering is needed
    tl.atomic_add(WS + bb.to(tl.int64)[:, None] * n_out + nn[None, :], acc,
                  mask=b_ok[:, None] & n_ok[None, :], sem="relaxed")


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: a few programs are plenty


def _rows_per_split(n_in: int, programs_without_k: int, block_k: int, device) -> int:
    target = PROGRAMS_PER_SM * _sm_count(device)
    splits = max(1, triton.cdiv(target, programs_without_k))
    per_split = max(MIN_ROWS_PER_SPLIT, triton.cdiv(n_in, splits))
    return triton.cdiv(per_split, block_k) * block_k


def _sparse_gemv(x, weight_t, bias, scale, threshold, mask):
    rows, n_in = x.shape
    n_out = weight_t.shape[1]
    # the workspace starts as the bias (a copy: expand() of one row would be
    # the bias itself); every split adds its partial sum
    if bias is not None:
        ws = torch.empty(rows, n_out, dtype=torch.float32, device=x.device).copy_(bias)
    else:
        ws = torch.zeros(rows, n_out, dtype=torch.float32, device=x.device)
    if rows == 0 or n_in == 0 or n_out == 0:
        return ws.to(x.dtype)
    block_b = min(MAX_ROWS_PER_PROGRAM, triton.next_power_of_2(rows))
    block_k = max(4, 32 // block_b)
    grid_n = triton.cdiv(n_out, BLOCK_N)
    grid_b = triton.cdiv(rows, block_b)
    per_split = _rows_per_split(n_in, grid_n * grid_b, block_k, x.device)
    grid = (grid_n, triton.cdiv(n_in, per_split), grid_b)
    _sparse_gemv_kernel[grid](
        x, mask if mask is not None else x, weight_t, scale if scale is not None else x,
        threshold, ws, rows, n_in, n_out, per_split,
        HAS_MASK=mask is not None, HAS_SCALE=scale is not None,
        BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return ws.to(x.dtype)


def _dense(x, weight_t, bias, scale, threshold, topk):
    mask = reference.sparse_mask(x, scale, threshold, topk)
    xm = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if bias is None:
        return xm @ weight_t
    return torch.addmm(bias.to(x.dtype), xm, weight_t)


def sparse_linear(x, weight_t, bias, scale, threshold, topk):
    """Kernel-level ``sparse_linear``: ``x`` ``[rows, in]``, ``weight_t`` ``[in, out]``.

    Nothing here waits for the device: the threshold stays a device tensor
    and a top-k mask is sorted on the device, so the op can be captured in a
    CUDA graph.
    """
    if x.shape[0] > DENSE_CROSSOVER and weight_t.dtype == x.dtype:
        return _dense(x, weight_t, bias, scale, threshold, topk)
    mask = None
    if topk >= 0:
        mask = reference.sparse_mask(x, scale, threshold, topk)
    return _sparse_gemv(x, weight_t, bias, scale, threshold, mask)
