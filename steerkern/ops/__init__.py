"""The op layer: what steerkern computes.

The functions here check their arguments (a ValueError that names the argument
and the expected shape, before anything runs), then call the
``torch.ops.steerkern.*`` custom ops, whose backends are chosen per device by
:mod:`steerkern.backends`.  The semantics are those of
:mod:`steerkern.ops.reference`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import library, reference
from .table import FLOAT_DTYPES, SparseWeight, SteerEntry, SteerTable, orthonormalize

__all__ = [
    "steer", "add_steer_rmsnorm", "sparse_linear", "steer_sparse_linear", "steer_", "add_steer_rmsnorm_",
    "decode_attention",
    "SteerTable", "SteerEntry", "SparseWeight", "orthonormalize", "reference",
]

Threshold = Union[float, Tensor]
_NO_TABLE = (None,) * len(SteerTable.tensor_names())


def _tracing() -> bool:
    return torch.compiler.is_compiling() or (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_hidden(h: Tensor, name: str) -> None:
    if not isinstance(h, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(h).__name__}")
    if h.dim() < 1:
        raise ValueError(f"{name}: expected shape [..., d], got a 0-dim tensor")
    if h.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {h.dtype} not supported; expected one of {FLOAT_DTYPES}")


def _check_table(h: Tensor, table: Optional[SteerTable], index: Optional[Tensor], name: str):
    """Validate table and index against ``h``; return (index or None, table tensors)."""
    if table is None:
        if index is not None:
            raise ValueError("index: given without a table")
        return None, _NO_TABLE
    if not isinstance(table, SteerTable):
        raise ValueError(f"table: expected a SteerTable, got {type(table).__name__}")
    d = h.shape[-1]
    if table.hidden_size != d:
        raise ValueError(f"{name}: expected shape [..., {table.hidden_size}] (the table's hidden size), "
                         f"got {list(h.shape)}")
    if table.device != h.device:
        raise ValueError(f"table: on {table.device}, but {name} is on {h.device}")
    if index is not None:
        if not isinstance(index, Tensor) or index.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
            raise ValueError("index: expected an integer tensor")
        if index.device != h.device:
            raise ValueError(f"index: on {index.device}, but {name} is on {h.device}")
        rows = h.numel() // d if d else 0
        if tuple(index.shape) != tuple(h.shape[:-1]) and index.numel() != rows:
            raise ValueError(f"index: expected shape {list(h.shape[:-1])} (one entry per row of {name}), "
                             f"got {list(index.shape)}")
        if index.dtype != torch.int32:
            index = index.to(torch.int32)
        if index.numel() and not _tracing():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi > table.size:
                raise ValueError(f"index: values must lie in [0, {table.size}] (0 = no steering, "
                                 f"j = table entry j-1), got range [{lo}, {hi}]")
    return index, table.tensors()


def _threshold(threshold: Threshold, device) -> Tensor:
    if isinstance(threshold, Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold: expected a scalar, got shape {list(threshold.shape)}")
        t = threshold.reshape(()).to(device=device, dtype=torch.float32)
        if not _tracing() and (bool(torch.isnan(t)) or float(t) < 0):
            raise ValueError(f"threshold: must be >= 0 and not NaN, got {float(t)}")
        return t
    try:
        f = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold: expected a number, got {threshold!r}") from None
    if math.isnan(f) or f < 0:
        raise ValueError(f"threshold: must be >= 0 and not NaN, got {f}")
    return torch.tensor(f, dtype=torch.float32, device=device)


def _check_sparse(x: Tensor, weight: SparseWeight, topk: Optional[int], name: str) -> int:
    if not isinstance(weight, SparseWeight):
        raise ValueError(f"weight: expected a SparseWeight (see SparseWeight.from_linear), "
                         f"got {type(weight).__name__}")
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"{name}: expected shape [..., {weight.in_features}] (the weight's in_features), "
                         f"got {list(x.shape)}")
    for part, t in (("weight_t", weight.weight_t), ("bias", weight.bias), ("scale", weight.scale)):
        if t is not None and t.device != x.device:
            raise ValueError(f"weight.{part}: on {t.device}, but {name} is on {x.device}")
    if topk is None:
        return -1
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 <= topk <= weight.in_features:
        raise ValueError(f"topk: expected an int in [0, {weight.in_features}], got {topk!r}")
    return topk


def steer(h: Tensor, table: Optional[SteerTable], index: Optional[Tensor] = None, *,
          backend: str = "auto") -> Tensor:
    """Steer hidden states ``h`` ``[..., d]`` by ``table``.

    ``index`` (int, shape ``h.shape[:-1]``) picks a table entry per row: 0 is
    no steering (that row is returned bit-exact), ``j`` is entry ``j - 1``.
    With ``index=None`` every row uses the first entry.  ``table=None`` returns
    ``h`` itself.  See :mod:`steerkern.ops.reference` for the exact math.
    """
    _check_hidden(h, "h")
    index, tensors = _check_table(h, table, index, "h")
    if table is None:
        return h
    return library.op("steer")(h, index, *tensors, backend=backend)


def _check_writable(t: Tensor, name: str) -> None:
    """An in-place target: every element its own memory (no broadcast views)."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        raise ValueError(f"{name}: cannot be written in place: it is an expanded view whose elements "
                         f"share memory (strides {list(t.stride())}); pass a materialized tensor")


def _overlap(a: Tensor, b: Tensor) -> bool:
    # fake tensors under tracing have no memory to compare; eager calls check
    if _tracing() or a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    def span(t):
        lo = t.data_ptr()
        return lo, lo + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) * t.element_size() + t.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def steer_(h: Tensor, table: Optional[SteerTable], index: Optional[Tensor] = None, *,
           backend: str = "auto") -> Tensor:
    """:func:`steer` in place: ``h`` is overwritten with the steered rows and returned.

    No output is allocated, so on a large ``h`` this is one read and one write
    of memory that is already mapped.  Use it where the caller owns ``h``
    (nothing else still needs the unsteered values).  Under autograd use
    :func:`steer`.
    """
    _check_hidden(h, "h")
    index, tensors = _check_table(h, table, index, "h")
    if table is None:
        return h
    _check_writable(h, "h")
    library.op("steer_")(h, index, *tensors, backend=backend)
    return h


def _check_residual(x: Tensor, residual: Tensor) -> None:
    _check_hidden(residual, "residual")
    if residual.shape != x.shape:
        raise ValueError(f"residual: expected shape {list(x.shape)} (that of x), got {list(residual.shape)}")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual: expected {x.dtype} on {x.device}, got {residual.dtype} on {residual.device}")


def _check_norm(x: Tensor, weight: Tensor, eps: float) -> float:
    d = x.shape[-1]
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (d,):
        raise ValueError(f"weight: expected shape [{d}], got {list(getattr(weight, 'shape', []))}")
    if weight.dtype not in FLOAT_DTYPES or weight.device != x.device:
        raise ValueError(f"weight: expected a float tensor on {x.device}, got {weight.dtype} on {weight.device}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps}")
    return eps


def add_steer_rmsnorm_(x: Tensor, residual: Tensor, weight: Tensor, eps: float, *,
                       table: Optional[SteerTable] = None, index: Optional[Tensor] = None,
                       weight_offset: float = 0.0, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """:func:`add_steer_rmsnorm` in place, as vLLM's ``fused_add_rms_norm``:
    ``residual`` is overwritten with ``r`` and ``x`` with ``y``.

    Returns ``(residual, x)``, that is ``(r, y)``.  ``residual`` is required
    and must not share memory with ``x``.  Nothing is allocated.
    """
    _check_hidden(x, "x")
    if not isinstance(residual, Tensor):
        raise ValueError("residual: required by the in-place op (it receives the new residual stream)")
    _check_residual(x, residual)
    eps = _check_norm(x, weight, eps)
    index, tensors = _check_table(x, table, index, "x")
    _check_writable(x, "x")
    _check_writable(residual, "residual")
    if _overlap(x, residual):
        raise ValueError("residual: shares memory with x; the in-place op writes r into residual and y into x, "
                         "so they must be separate tensors")
    library.op("add_steer_rmsnorm_")(x, residual, weight, eps, float(weight_offset), index, *tensors,
                                    backend=backend)
    return residual, x


def add_steer_rmsnorm(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float, *,
                      table: Optional[SteerTable] = None, index: Optional[Tensor] = None,
                      weight_offset: float = 0.0, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Fused ``r = steer(x + residual)``, ``y = rmsnorm(r) * (weight + weight_offset)``.

    Returns ``(r, y)``: the new residual stream and the normalized activations
    that the next projections read.  ``residual=None`` skips the add.
    """
    _check_hidden(x, "x")
    if residual is not None:
        _check_residual(x, residual)
    eps = _check_norm(x, weight, eps)
    index, tensors = _check_table(x, table, index, "x")
    return library.op("add_steer_rmsnorm")(x, residual, weight, eps, float(weight_offset), index,
                                          *tensors, backend=backend)


def sparse_linear(x: Tensor, weight: SparseWeight, *, threshold: Threshold = 0.0,
                  topk: Optional[int] = None, backend: str = "auto") -> Tensor:
    """``y = W (m * x) + bias`` with the norm-aware mask ``m`` taken per row.

    ``m_i = |x_i| * s_i > threshold`` (``s`` from ``weight.scale``: WINA column
    norms, or 1 for TEAL), or, with ``topk``, the ``topk`` largest scores of
    each row.  Threshold 0 keeps every nonzero input: the dense result.
    """
    _check_hidden(x, "x")
    topk = _check_sparse(x, weight, topk, "x")
    t = _threshold(threshold, x.device)
    return library.op("sparse_linear")(x, weight.weight_t, weight.bias, weight.scale, t, topk,
                                      backend=backend)


def steer_sparse_linear(h: Tensor, table: Optional[SteerTable], weight: SparseWeight,
                        index: Optional[Tensor] = None, *, threshold: Threshold = 0.0,
                        topk: Optional[int] = None, backend: str = "auto") -> Tensor:
    """The fused chain ``sparse_linear(steer(h))`` in one pass over ``h``."""
    _check_hidden(h, "h")
    index, tensors = _check_table(h, table, index, "h")
    topk = _check_sparse(h, weight, topk, "h")
    t = _threshold(threshold, h.device)
    return library.op("steer_sparse_linear")(h, index, *tensors, weight.weight_t, weight.bias,
                                            weight.scale, t, topk, backend=backend)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """One decode step of attention over a KV cache, no mask (see
    :func:`steerkern.ops.reference.decode_attention`): ``q [B, H, 1, D]``,
    ``k, v [B, KVH, L, D]``; returns ``[B, 1, H, D]``.  ``scale`` defaults to
    ``D ** -0.5``.  The device's kernel runs where there is one (the C++ CPU
    backend), else the reference; under autograd or torch.compile the
    reference always (the kernel has no backward and no schema).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D [batch, heads, length, head_dim] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} not supported; expected one of {FLOAT_DTYPES}")
    B, H, S, D = q.shape
    if S != 1:
        raise ValueError(f"q: expected one query token per row (shape [B, H, 1, D]), got {tuple(q.shape)}")
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k, v: expected equal shapes [{B}, KVH, L, {D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] < 1 or H % k.shape[1]:
        raise ValueError(f"k: {k.shape[1]} key/value heads do not divide q's {H} heads")
    if k.shape[2] < 1:
        raise ValueError("k: no cached positions to attend to (length 0)")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v: expected one dtype and device, got {q.dtype}/{q.device}, "
                         f"{k.dtype}/{k.device}, {v.dtype}/{v.device}")
    scale = D ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    fn = library.decode_attention_kernel(q)
    if fn is None or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return reference.decode_attention(q, k, v, scale)
    return fn(q, k, v, scale)
