"""Reference semantics of every steerkern op, in plain torch.

This file is the spec.  Every kernel backend (cpu, triton, cuda) is tested
against it, and the docstrings here are the documentation of the ops.

Conventions shared by all ops
-----------------------------
* Hidden states arrive as a 2-D contiguous ``[rows, d]`` tensor (the op layer
  flattens any leading shape into rows).  Inputs may be fp32, bf16 or fp16.
* Arithmetic runs in ``acc`` (fp32 by default, which is what every kernel
  does).  Tests pass ``acc=torch.float64`` for a golden answer and
  ``acc=<the input dtype>`` to measure the error torch itself makes in that
  precision.  Masks and conditions are decisions, not accumulations: they are
  always taken in fp32 so that every backend takes the same ones.
* Results are cast to the input dtype once, at the end.

The steering table
------------------
A table holds ``K`` entries; row ``r`` uses entry ``index[r]`` where ``index``
is int32 in ``[0, K]``: ``0`` means *no steering* and returns the row
bit-exact, ``j >= 1`` selects entry ``j - 1``.  With ``index=None`` every row
uses the first entry.  Each component below is optional (``None`` skips it);
all table tensors are fp32:

=================  ===========  ===========================================
name               shape        meaning
=================  ===========  ===========================================
``basis``          [K, k, d]    rows of Q^T: an orthonormal basis of k
                                directions (all-zero rows pad unused slots)
``target``         [K, k]       target coefficients c
``gain``           [K]          projection gain lam
``vec``            [K, d]       steering vector v
``alpha``          [K]          its coefficient
``scale``          [K, d]       affine per-neuron weight w (LinEAS)
``shift``          [K, d]       affine per-neuron bias b
``cond_dir``       [K, d]       unit condition direction u (CAST)
``cond_threshold`` [K]          steer only where cos(h, u) > threshold
``preserve_norm``  [K] (uint8)  1: rescale the result to the input row norm
=================  ===========  ===========================================

For a row ``h`` with entry ``e`` the steered row is, in this order:

1. condition: if ``cond_dir`` is given and ``cos(h, u_e) > thr_e`` is false,
   the row is returned unchanged (bit-exact).  ``cos`` is 0 for a zero row.
2. projection with clamp: ``h <- h + lam_e * Q_e (c_e - Q_e^T h)``.  With
   ``c = 0, lam = 1`` this is directional ablation ``h - Q Q^T h``; with
   ``lam = 1`` it sets the coefficients to ``c`` exactly.
3. addition: ``h <- h + alpha_e * v_e``.
4. affine map: ``h <- w_e * h + b_e`` (a missing ``w`` is 1, a missing ``b`` 0).
5. norm preservation: ``h <- h * ||h_in|| / ||h||`` when the flag is set and
   ``||h|| > 0``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_TINY = 1e-30


def steer(
    h: Tensor,
    index: Optional[Tensor],
    basis: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    gain: Optional[Tensor] = None,
    vec: Optional[Tensor] = None,
    alpha: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    cond_dir: Optional[Tensor] = None,
    cond_threshold: Optional[Tensor] = None,
    preserve_norm: Optional[Tensor] = None,
    acc: torch.dtype = torch.float32,
) -> Tensor:
    """Steer the rows of ``h`` ``[rows, d]`` by the table (see module doc)."""
    K = table_size(basis, vec, scale, shift, cond_dir, preserve_norm)
    out = h.clone()
    if K == 0 or h.shape[0] == 0:
        return out
    x = h.to(acc)
    xf = h.float()
    n_in = x.norm(dim=-1, keepdim=True)
    entry = (
        torch.ones(h.shape[0], dtype=torch.int64, device=h.device)
        if index is None
        else index.long()
    )
    for e in range(K):
        selected = entry == e + 1
        if cond_dir is not None:
            # a decision: taken in fp32 whatever acc is
            norm = xf.norm(dim=-1)
            cos = (xf @ cond_dir[e].float()) / norm.clamp_min(_TINY)
            cos = torch.where(norm > 0, cos, torch.zeros_like(cos))
            selected = selected & (cos > cond_threshold[e].float())
        y = x
        if basis is not None:
            Q = basis[e].to(acc)  # [k, d]
            coeff = y @ Q.T  # [rows, k]
            y = y + gain[e].to(acc) * ((target[e].to(acc) - coeff) @ Q)
        if vec is not None:
            y = y + alpha[e].to(acc) * vec[e].to(acc)
        if scale is not None:
            y = y * scale[e].to(acc)
        if shift is not None:
            y = y + shift[e].to(acc)
        if preserve_norm is not None and bool(preserve_norm[e]):
            n_out = y.norm(dim=-1, keepdim=True)
            y = torch.where(n_out > 0, y * (n_in / n_out.clamp_min(_TINY)), y)
        out = torch.where(selected[:, None], y.to(h.dtype), out)
    return out


def table_size(*parts: Optional[Tensor]) -> int:
    """K, the number of entries: the leading size of the first table part given (0: none)."""
    for p in parts:
        if p is not None:
            return p.shape[0]
    return 0


def rms_norm(r: Tensor, weight: Tensor, eps: float, weight_offset: float = 0.0,
             acc: torch.dtype = torch.float32) -> Tensor:
    """``y = r / sqrt(mean(r^2) + eps) * (weight + weight_offset)``, one rounding."""
    rf = r.to(acc)
    rstd = torch.rsqrt(rf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (rf * rstd * (weight.to(acc) + weight_offset)).to(r.dtype)


def add_steer_rmsnorm(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Tensor,
    eps: float,
    weight_offset: float,
    index: Optional[Tensor],
    basis: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    gain: Optional[Tensor] = None,
    vec: Optional[Tensor] = None,
    alpha: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    cond_dir: Optional[Tensor] = None,
    cond_threshold: Optional[Tensor] = None,
    preserve_norm: Optional[Tensor] = None,
    acc: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor]:
    """Residual add, steer, RMSNorm in one pass: returns ``(r, y)``.

    ``r = steer(x + residual)`` is the new residual stream (the sum is rounded
    to the input dtype first, exactly as an unfused ``x + residual`` would be;
    with ``residual=None`` it is ``steer(x)``), and
    ``y = r / sqrt(mean(r^2) + eps) * (weight + weight_offset)`` is what the
    next projections read.  ``weight_offset`` is 1 for Gemma-style norms that
    store ``weight - 1``.  ``weight`` is ``[d]`` in any float dtype.
    """
    r = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    r = steer(r, index, basis, target, gain, vec, alpha, scale, shift,
              cond_dir, cond_threshold, preserve_norm, acc=acc)
    return r, rms_norm(r, weight, eps, weight_offset, acc=acc)


def steer_(h: Tensor, index: Optional[Tensor], *table: Optional[Tensor]) -> None:
    """``steer`` written back into ``h``: ``h`` ends up holding ``steer(h, ...)``."""
    h.copy_(steer(h, index, *table))


def add_steer_rmsnorm_(x: Tensor, residual: Tensor, weight: Tensor, eps: float, weight_offset: float,
                       index: Optional[Tensor], *table: Optional[Tensor]) -> None:
    """``add_steer_rmsnorm`` in place, in vLLM's ``fused_add_rms_norm`` convention:
    ``residual`` ends up holding ``r`` and ``x`` holds ``y``.  ``residual`` is
    required and must not share memory with ``x``."""
    r, y = add_steer_rmsnorm(x, residual, weight, eps, weight_offset, index, *table)
    residual.copy_(r)
    x.copy_(y)


def sparse_mask(x: Tensor, scale: Optional[Tensor], threshold: Tensor, topk: int) -> Tensor:
    """Which inputs stay active: a bool ``[rows, in]`` mask.

    ``score_i = |x_i| * s_i`` in fp32, with ``s = scale`` (WINA: the column
    norms ``||W[:, i]||_2``) or ``s = 1`` when ``scale`` is None (TEAL).

    * ``topk < 0``: threshold mode, ``m_i = not (score_i <= t)``; a NaN input
      therefore stays active and propagates, as it would in a dense layer.
    * ``topk >= 0``: keep the ``topk`` largest scores of each row.  Ties keep
      the lower index; NaN ranks above every number.  ``threshold`` is unused.
    """
    score = x.float().abs()
    if scale is not None:
        score = score * scale.float()
    if topk < 0:
        return ~(score <= threshold.float())
    mask = torch.zeros_like(score, dtype=torch.bool)
    if topk > 0 and score.shape[0] > 0:
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices
        mask.scatter_(-1, order[:, :topk], True)
    return mask


def sparse_linear(
    x: Tensor,
    weight_t: Tensor,
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    threshold: Tensor,
    topk: int,
    acc: torch.dtype = torch.float32,
) -> Tensor:
    """Norm-aware sparse activation fused with a linear layer.

    ``y = W (m * x) + bias`` where ``m = sparse_mask(x, scale, threshold, topk)``
    is taken per row, ``W^T`` is given as ``weight_t`` ``[in, out]``
    (contiguous, so an inactive input skips one contiguous row of it), and
    ``bias`` is ``[out]`` or None.  ``x`` is ``[rows, in]``; the weight dtype
    may differ from x's.  The result has x's dtype.
    """
    mask = sparse_mask(x, scale, threshold, topk)
    xm = torch.where(mask, x.to(acc), torch.zeros((), dtype=acc, device=x.device))
    y = xm @ weight_t.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def steer_sparse_linear(
    h: Tensor,
    index: Optional[Tensor],
    basis: Optional[Tensor],
    target: Optional[Tensor],
    gain: Optional[Tensor],
    vec: Optional[Tensor],
    alpha: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    cond_dir: Optional[Tensor],
    cond_threshold: Optional[Tensor],
    preserve_norm: Optional[Tensor],
    weight_t: Tensor,
    bias: Optional[Tensor],
    col_scale: Optional[Tensor],
    threshold: Tensor,
    topk: int,
    acc: torch.dtype = torch.float32,
) -> Tensor:
    """``sparse_linear(steer(h))``: the steered rows are rounded to h's dtype
    before they are sparsified, as if they had been written out.
    ``col_scale`` is sparse_linear's ``scale`` (the WINA column norms)."""
    s = steer(h, index, basis, target, gain, vec, alpha, scale, shift,
              cond_dir, cond_threshold, preserve_norm, acc=acc)
    return sparse_linear(s, weight_t, bias, col_scale, threshold, topk, acc=acc)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """One decode step of attention: a single query token per row and head.

    ``q`` is ``[B, H, 1, D]``, ``k`` and ``v`` are ``[B, KVH, L, D]`` (the KV
    cache, ``H`` a multiple of ``KVH``: query head ``h`` reads key/value head
    ``h // (H // KVH)``).  No mask: every cached position is visible, which is
    what a decode step of a causal model without padding sees.  Returns
    ``softmax(scale * q k^T) v`` as ``[B, 1, H, D]`` (the layout transformers'
    attention functions return), computed in fp32 and rounded once to q's
    dtype.
    """
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    p = torch.softmax((q.float() @ kf.transpose(-1, -2)) * scale, dim=-1)
    return (p @ vf).transpose(1, 2).to(q.dtype)
