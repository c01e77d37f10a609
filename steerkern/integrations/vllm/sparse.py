"""Norm-aware sparse activation of vLLM's linear layers: one plan per engine.

A :class:`~steerkern.plan.SparsityPlan` registered at start-up
(``{"steerkern": {"sparsity": path}}`` in ``--additional-config``, or
``STEERKERN_VLLM_SPARSITY``) makes the listed projections of unquantized
Llama-family layers run :func:`steerkern.sparse_linear`:
``y = W (m * x) + b`` with ``m_i = |x_i| * ||W[:, i]|| > t`` (WINA) or
``|x_i| > t`` (TEAL).

vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; each
canonical part keeps its own weight slice, column norms and threshold, so the
result is the one of separate projections (a part without a threshold runs
with threshold 0: the dense result).  The ``W^T`` layouts are prepared once,
when vLLM finishes loading the weights (vLLM's CPU path repacks and drops the
original layout then), at the cost of one more copy of the sparsified weights.
Under tensor parallelism the WINA column norms of column-parallel layers are
all-reduced, so every rank takes the same mask.

With ``prefill="dense"`` prompt tokens run vLLM's dense matmul and generated
tokens the sparse kernel, row by row, whatever the batch mixes.

This module does not import vLLM.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ...ops import library
from ...ops.table import SparseWeight
from ...plan import SparsityPlan

SPARSITY_ENV = "STEERKERN_VLLM_SPARSITY"

# vLLM module path inside a layer -> (canonical parts, column-parallel)
FUSED = {
    "self_attn.qkv_proj": (("q_proj", "k_proj", "v_proj"), True),
    "self_attn.o_proj": (("o_proj",), False),
    "mlp.gate_up_proj": (("gate_proj", "up_proj"), True),
    "mlp.down_proj": (("down_proj",), False),
}
_PREFIX = re.compile(r"(?:^|\.)layers\.(\d+)\.(" + "|".join(re.escape(k) for k in FUSED) + r")$")


@dataclasses.dataclass
class SparseProjection:
    """The sparse form of one vLLM linear layer: a part per canonical projection,
    each with its threshold as a 0-dim fp32 tensor on the weight's device."""

    parts: List[Tuple[SparseWeight, Tensor]]
    dense_prefill: bool


@dataclasses.dataclass
class BatchRows:
    """Which rows of the running batch are generated tokens (set per forward)."""

    generated: Optional[Tensor] = None   # int64 row indices; None: every row is generated


def plan_path(additional_config) -> Optional[str]:
    conf = (additional_config or {}).get("steerkern") or {}
    return conf.get("sparsity") or os.environ.get(SPARSITY_ENV) or None


def _local_sizes(layer, names, out_features: int) -> List[int]:
    if len(names) == 1:
        return [out_features]
    if hasattr(layer, "num_heads") and hasattr(layer, "num_kv_heads"):  # QKVParallelLinear
        v = getattr(layer, "v_head_size", layer.head_size)
        return [layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size, layer.num_kv_heads * v]
    sizes = list(layer.output_sizes)
    total = sum(sizes)
    return [s * out_features // total for s in sizes]  # a shard of each part


def prepare(layer, plan: SparsityPlan, all_reduce: Optional[Callable[[Tensor], Tensor]] = None
            ) -> Optional[SparseProjection]:
    """The sparse form of ``layer`` (its ``weight`` still in ``[out, in]``), or
    None when the plan does not sparsify it.  ``all_reduce`` sums over the
    tensor-parallel group (None: a single rank)."""
    m = _PREFIX.search(getattr(layer, "prefix", "") or "")
    if m is None:
        return None
    index, path = int(m.group(1)), m.group(2)
    names, column_parallel = FUSED[path]
    thresholds = [plan.threshold(index, n) for n in names]
    if all(t is None for t in thresholds):
        return None
    w = layer.weight.data
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"sparsity: {layer.prefix}: expected a loaded [out, in] weight, got {list(w.shape)}")
    sizes = _local_sizes(layer, names, w.shape[0])
    if sum(sizes) != w.shape[0]:
        raise ValueError(f"sparsity: {layer.prefix}: parts {sizes} do not add up to {w.shape[0]} outputs")
    parts = []
    start = 0
    for size, t in zip(sizes, thresholds):
        sw = SparseWeight.from_linear(w[start:start + size], None, mode=plan.mode)
        if sw.scale is not None and column_parallel and all_reduce is not None:
            # each rank holds some output rows: the column norm is over all of them
            sw.scale = all_reduce(sw.scale.pow(2)).sqrt().contiguous()
        # made once here, not per call: the kernel reads the threshold as a tensor
        parts.append((sw, torch.tensor(0.0 if t is None else float(t), dtype=torch.float32, device=w.device)))
        start += size
    return SparseProjection(parts, dense_prefill=plan.prefill == "dense")


def check_layers(plan: SparsityPlan, num_layers: int) -> None:
    bad = [layer for layer in plan.thresholds if layer >= num_layers]
    if bad:
        raise ValueError(f"sparsity: the plan names layer {bad[0]}; the model has {num_layers} layers")


def apply(sp: SparseProjection, x: Tensor, bias: Optional[Tensor], dense: Callable[[], Tensor],
          rows: BatchRows) -> Tensor:
    """The layer's output for ``x`` ``[rows, in]``; ``dense()`` is vLLM's own matmul."""
    if sp.dense_prefill and rows.generated is not None:
        if rows.generated.numel() == 0:
            return dense()
        y = dense()
        idx = rows.generated
        y[idx] = _sparse(sp, x[idx], bias)
        return y
    return _sparse(sp, x, bias)


def _sparse(sp: SparseProjection, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    # the prepared weights were checked at load time: straight into the kernel,
    # as the patched transformers projections do (the custom op under compile)
    parts_fn = library.sparse_parts_kernel(x) if library.is_direct(x) else None
    if parts_fn is not None:  # every part (q, k, v of a fused qkv) in one call
        outs = parts_fn(x, [w.weight_t for w, _ in sp.parts], [w.bias for w, _ in sp.parts],
                        [w.scale for w, _ in sp.parts], [t for _, t in sp.parts])
    elif library.is_direct(x):
        outs = [library.sparse_rows(x, w.weight_t, w.bias, w.scale, t, -1) for w, t in sp.parts]
    else:
        op = library.hot("sparse_linear", x)
        outs = [op(x, w.weight_t, w.bias, w.scale, t, -1) for w, t in sp.parts]
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return y if bias is None else y + bias
