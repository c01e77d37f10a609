"""The modules that a patched model runs: steering sites and sparse projections.

* :class:`SiteSteer` holds the steering tables of one site of one layer and
  applies them with the fused ops (``add_steer_rmsnorm`` where the site feeds
  an RMSNorm, ``steer`` elsewhere).
* :class:`SparseLinear` replaces an ``nn.Linear`` (or GPT-2's ``Conv1D``)
  whose input is sparsified; it keeps the original ``weight``/``bias``
  parameters under the same names, so state-dict keys do not change.
* :class:`TokenPositions` tracks, per forward, the position of every token in
  its row through the KV cache, and turns each steering slot's position mode
  and variant map into the per-row table index of the steer op.

The modules call the steerkern ops through :func:`steerkern.ops.library.hot`
(the custom op under torch.compile, its implementation directly in eager
inference): the tables and prepared weights were validated once, at patch
time, so the per-call Python argument checks of :mod:`steerkern.ops` are
skipped on this hot path.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import library
from ..ops.table import SparseWeight, SteerTable


def _device_of(fn) -> torch.device:
    # what Module._apply's fn does to a tensor tells where the module is going
    return fn(torch.zeros(1)).device


@dataclasses.dataclass(eq=False)
class Slot:
    """Which rows one table applies to: a position mode and a variant map.

    ``variant_map[v]`` is the table index for rows of variant ``v`` (``0``:
    the variant has no entry in this table).
    """

    positions: Union[str, int]
    variant_map: Tensor  # [K + 1] int32

    @property
    def num_variants(self) -> int:
        return self.variant_map.numel() - 1


class TokenPositions:
    """Per-forward token positions and per-row variants of one patched model.

    A forward pre-hook on the module that owns the layers calls :meth:`begin`
    with the batch shape, the KV cache's length and the 2-D attention mask.
    A token's position is its index among the real (unpadded) tokens of its
    row.  The prompt is what the first forward of a generation (empty cache)
    saw; every later token is generated.
    """

    def __init__(self) -> None:
        self._variant_rows: Optional[Tensor] = None  # [B] int32, set by the handle
        self.positions: Optional[Tensor] = None     # [B, S] int64
        self.prompt_len: Optional[Tensor] = None    # [B] int64
        self._cache = {}

    @property
    def variant_rows(self) -> Optional[Tensor]:
        return self._variant_rows

    @variant_rows.setter
    def variant_rows(self, rows: Optional[Tensor]) -> None:
        # the cached indices were built from the old variants
        self._variant_rows = rows
        self._cache = {}

    def begin(self, batch: int, seq: int, past: int, attention_mask: Optional[Tensor], device) -> None:
        self._cache = {}
        mask = attention_mask
        if mask is not None and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= past + seq:
            real = mask[:, : past + seq].to(device=device, dtype=torch.long) != 0
            pos = real.cumsum(-1) - 1
            positions = pos[:, past:]
            prompt = real[:, :seq].sum(-1)
        else:
            positions = torch.arange(past, past + seq, device=device).expand(batch, seq)
            prompt = torch.full((batch,), seq, device=device)
        self.positions = positions
        if past == 0 or self.prompt_len is None or self.prompt_len.shape[0] != batch:
            self.prompt_len = prompt

    def index(self, slot: Slot, h: Tensor) -> Optional[Tensor]:
        """The steer op's per-row index for ``slot`` at hidden states ``h`` ``[B, S, d]``."""
        if slot.positions == "all" and self.variant_rows is None and slot.num_variants == 1:
            return None  # every row uses entry 1: the op's fast path
        key = id(slot)
        cached = self._cache.get(key)
        lead = h.shape[:-1]
        if cached is not None and cached.shape == lead:
            return cached
        B = lead[0] if len(lead) == 2 else 1
        S = lead[-1]
        rows = self.variant_rows
        if rows is None:
            if slot.num_variants > 1:
                raise ValueError(f"variants: the steering plan has {slot.num_variants} variants; choose one "
                                 f"per row with handle.set_variants(index) before running the model")
            rows = torch.ones(B, dtype=torch.int32, device=h.device)
        if rows.shape[0] != B:
            raise ValueError(f"variants: {rows.shape[0]} per-row variant indices were set, "
                             f"but the batch has {B} rows")
        entry = slot.variant_map.to(h.device)[rows.long()][:, None].expand(B, S)
        if slot.positions != "all":
            pos = self.positions
            if pos is None or tuple(pos.shape) != (B, S):
                pos = torch.arange(S, device=h.device).expand(B, S)
                prompt = torch.full((B,), S, device=h.device)
            else:
                prompt = self.prompt_len
            if slot.positions == "prompt":
                keep = pos < prompt[:, None]
            elif slot.positions == "generated":
                keep = pos >= prompt[:, None]
            else:
                keep = pos >= slot.positions
            entry = torch.where(keep, entry, torch.zeros((), dtype=entry.dtype, device=h.device))
        index = entry.to(torch.int32).reshape(lead).contiguous()
        self._cache[key] = index
        return index


class SiteSteer(nn.Module):
    """The steering at one site (``pre``, ``post_attn``, ``post_mlp``) of one layer.

    Holds one :class:`SteerTable` per intervention slot, applied in order.
    Table tensors are fp32 and stay fp32 when the model's dtype changes; they
    may be written in place between calls (see ``PatchHandle.set_alpha``).
    """

    def __init__(self, layer: int, site: str, tables: Sequence[SteerTable], slots: Sequence[Slot],
                 tracker: TokenPositions, backend: str = "auto") -> None:
        super().__init__()
        self.layer, self.site, self.backend = layer, site, backend
        self.tables: List[SteerTable] = list(tables)
        self.slots: List[Slot] = list(slots)
        self.tracker = tracker
        # one table with no condition, positions "all" and one variant: with no
        # per-row variants set, it steers every row (its op index is None)
        self._plain = (len(self.tables) == 1 and self.tables[0].cond_dir is None
                       and self.slots[0].positions == "all" and self.slots[0].num_variants == 1)

    def extra_repr(self) -> str:
        parts = []
        for t, s in zip(self.tables, self.slots):
            comps = [n for n in SteerTable.tensor_names() if getattr(t, n) is not None]
            parts.append(f"[K={t.size}: {'+'.join(comps)}, positions={s.positions}]")
        return f"layer={self.layer}, site={self.site}, tables={', '.join(parts)}, backend={self.backend}"

    def _apply(self, fn, recurse=True):
        # follow the model's device, never its dtype: the kernels read fp32 tables
        device = _device_of(fn)
        self.tables = [t.to(device) for t in self.tables]
        for s in self.slots:
            s.variant_map = s.variant_map.to(device)
        return self

    def forward(self, h: Tensor) -> Tensor:
        steer = library.hot("steer", h)
        for table, slot in zip(self.tables, self.slots):
            h = steer(h, self.tracker.index(slot, h), *table.tensors(), backend=self.backend)
        return h

    def steers_every_row(self, h: Tensor) -> bool:
        """Whether every table steers every row of ``h`` (no index 0, no
        condition).  Only then may a following norm be fused in: a row left
        unsteered must stay bit-exact, its norm included."""
        if self._plain and self.tracker.variant_rows is None:
            return True  # the common case without a Python loop: this runs per layer and token
        return all(t.cond_dir is None and self.tracker.index(s, h) is None for t, s in zip(self.tables, self.slots))

    def add_steer(self, residual: Tensor, x: Tensor) -> Tensor:
        """``steer(residual + x)``, a new tensor: the layer's residual add and
        this site's first table in one kernel call where the backend has one
        (bit-exact with the add, then the steer), else the add and then
        :meth:`steer_owned`."""
        fused = library.add_steer_kernel(residual, x, self.backend) if self.tables else None
        if fused is None:
            return self.steer_owned(residual + x)
        index = self.tracker.index(self.slots[0], residual)
        h = fused(residual, x, None if index is None else index.view(-1), *self.tables[0].tensors())
        for table, slot in zip(self.tables[1:], self.slots[1:]):
            library.steer_rows_(h, self.tracker.index(slot, h), table.tensors(), self.backend)
        return h

    def steer_owned(self, h: Tensor) -> Tensor:
        """Steer ``h``, a fresh tensor the layer itself just made (``residual +
        out``) that nothing else holds: in place in eager inference, so nothing
        is allocated; the out-of-place op under autograd or torch.compile."""
        if library.hot_in_place("steer", h) is None:
            return self(h)
        for table, slot in zip(self.tables, self.slots):
            library.steer_rows_(h, self.tracker.index(slot, h), table.tensors(), self.backend)
        return h

    def add_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                 weight_offset: float) -> Tuple[Tensor, Tensor]:
        """``r = steer(x + residual)``, ``y = rmsnorm(r)``: the last table fused with the norm."""
        direct = library.add_norm_kernel(x, residual, self.backend) if len(self.tables) == 1 else None
        if direct is not None:  # one table: straight into the kernel, shapes as they are
            index = self.tracker.index(self.slots[0], x)
            return direct(x, residual, weight, eps, weight_offset, None if index is None else index.view(-1),
                          *self.tables[0].tensors())
        fused = library.hot("add_steer_rmsnorm", x)
        *first, last = range(len(self.tables))
        if first:
            x = self.forward_slots(x + residual, first)
            residual = None
        table, slot = self.tables[last], self.slots[last]
        return fused(x, residual, weight, eps, weight_offset, self.tracker.index(slot, x),
                     *table.tensors(), backend=self.backend)

    def forward_slots(self, h: Tensor, which) -> Tensor:
        steer = library.hot("steer", h)
        for i in which:
            h = steer(h, self.tracker.index(self.slots[i], h), *self.tables[i].tensors(), backend=self.backend)
        return h


class SiblingGroup:
    """Projections of one layer that read the same input (q/k/v, gate/up).

    At decode, the first member called runs every member's parts through the
    kernel in one call (one parallel region, one Python round trip); each
    other member then takes its output if it is called with that very tensor,
    unmodified (same object, same version counter), and otherwise computes
    its own, so a model that feeds the members different inputs still gets
    exact results.  Members are held weakly: unpatching frees them.
    """

    def __init__(self, members: Sequence["SparseLinear"]) -> None:
        self.members = [weakref.ref(m) for m in members]
        self.x: Optional[Tensor] = None
        self.version = -1
        self.outs: dict = {}
        self.unclaimed = 0  # times outputs were left untaken: the members do not share inputs
        self.args = None  # every member's part_args(), concatenated
        for m in members:
            m.group = self

    @property
    def active(self) -> bool:
        return self.unclaimed < 3

    def forward(self, member: "SparseLinear", x: Tensor, parts_fn) -> Tensor:
        if self.x is x and x._version == self.version:
            y = self.outs.pop(id(member), None)
            if y is not None:
                if not self.outs:
                    self.x = None
                return y
        if self.outs:
            self.unclaimed += 1
        members = [m() for m in self.members]
        if any(m is None for m in members) or not self.active:
            return member.run_parts(x, parts_fn)
        self.outs, mine = {}, None
        for m, y in zip(members, self.run(x, parts_fn, members)):
            if m is member:
                mine = y
            else:
                self.outs[id(m)] = y
        self.x, self.version = (x, x._version) if self.outs else (None, -1)
        return mine

    def run(self, x: Tensor, parts_fn, members=None) -> List[Tensor]:
        """Every member's output for ``x``, in member order, from one kernel call."""
        if members is None:
            members = [m() for m in self.members]
        if self.args is None:  # built once, not per token (reset when a member moves)
            self.args = tuple([a for m in members for a in m.part_args()[i]] for i in range(4))
        outs = parts_fn(x, *self.args)
        if len(outs) == len(members):
            return outs
        ys, start = [], 0
        for m in members:
            n = len(m.parts)
            ys.append(outs[start] if n == 1 else torch.cat(outs[start:start + n], dim=-1))
            start += n
        return ys


class SparseLinear(nn.Module):
    """A projection whose input is sparsified (norm-aware, per row).

    Single-token calls (decode: ``x.shape[-2] == 1``) run the
    ``sparse_linear`` kernel on ``W^T``, prepared once.  Multi-token calls
    (prefill) apply the same mask and run a dense matmul (``prefill="sparse"``)
    or skip the mask (``prefill="dense"``).  ``parts`` splits a fused
    projection's output (q/k/v of Phi-3's ``qkv_proj``, say): one threshold
    per part, each with its own prepared weight.
    """

    def __init__(self, original: nn.Module, transposed: bool, parts: Sequence[Tuple[int, float]],
                 mode: str, prefill: str, backend: str = "auto", layer: Optional[int] = None,
                 names: Sequence[str] = ()) -> None:
        super().__init__()
        # ``transposed``: the original stores W^T [in, out] (GPT-2's Conv1D)
        self.weight = original.weight
        self.bias = original.bias
        self.transposed, self.mode, self.prefill, self.backend = transposed, mode, prefill, backend
        w = self.weight.detach()
        w_out_in = w.T if transposed else w
        self.parts: List[SparseWeight] = []
        self.thresholds: List[Tensor] = []
        self.ranges: List[Tuple[int, int]] = []
        start = 0
        for width, threshold in parts:
            self.ranges.append((start, start + width))
            rows = w_out_in[start:start + width]
            b = None if self.bias is None else self.bias.detach()[start:start + width]
            if transposed and len(parts) == 1:
                # Conv1D already stores W^T contiguous: no copy needed
                sw = SparseWeight(w.contiguous(), b, rows.float().norm(dim=0) if mode == "wina" else None)
            else:
                sw = SparseWeight.from_linear(rows, b, mode=mode)
            self.parts.append(sw)
            self.thresholds.append(torch.tensor(float(threshold), dtype=torch.float32, device=w.device))
            start += width
        self.in_features = w_out_in.shape[1]
        self.out_features = w_out_in.shape[0]
        self.layer, self.names = layer, tuple(names)  # where it sits, for set_threshold
        self.dropped_bytes = 0  # the original layout freed by drop_dense
        self.group: Optional[SiblingGroup] = None  # set by patch() for q/k/v and gate/up
        self._part_args = None

    @property
    def layout_bytes(self) -> int:
        """Bytes held by the prepared layout that the original does not share."""
        own = 0
        for p in self.parts:
            if p.weight_t.untyped_storage().data_ptr() != self.weight.untyped_storage().data_ptr():
                own += p.weight_t.numel() * p.weight_t.element_size()
            own += 0 if p.scale is None else p.scale.numel() * 4
        return own

    def extra_repr(self) -> str:
        ts = ", ".join(f"{float(t):.4g}" for t in self.thresholds)
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"threshold=[{ts}], prefill={self.prefill}, backend={self.backend}")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = _device_of(fn)
        dtype = self.weight.dtype if self.weight.numel() else self.parts[0].weight_t.dtype
        self.parts = [SparseWeight(p.weight_t.to(device=device, dtype=dtype).contiguous(),
                                   None if p.bias is None else p.bias.to(device=device, dtype=dtype),
                                   None if p.scale is None else p.scale.to(device))
                      for p in self.parts]
        self.thresholds = [t.to(device) for t in self.thresholds]
        self._part_args = None
        if self.group is not None:
            self.group.args = None
        return self

    def part_args(self):
        """The parts as the multi-part kernel takes them (lists; built once)."""
        if self._part_args is None:
            self._part_args = ([p.weight_t for p in self.parts], [p.bias for p in self.parts],
                               [p.scale for p in self.parts], list(self.thresholds))
        return self._part_args

    def run_parts(self, x: Tensor, parts_fn) -> Tensor:
        outs = parts_fn(x, *self.part_args())
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def set_threshold(self, value: float, part: int = 0) -> None:
        """Write a new threshold in place (no re-patching, no recompile)."""
        self.thresholds[part].fill_(float(value))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 1 or x.shape[-2] == 1:
            if library.is_direct(x):
                parts_fn = library.sparse_parts_kernel(x, self.backend)
                if parts_fn is not None:  # every part (and sibling) in one kernel call
                    group = self.group
                    return group.forward(self, x, parts_fn) if group is not None else self.run_parts(x, parts_fn)
                outs = [library.sparse_rows(x, p.weight_t, p.bias, p.scale, t, -1, self.backend)
                        for p, t in zip(self.parts, self.thresholds)]
            else:
                op = library.hot("sparse_linear", x)
                outs = [op(x, p.weight_t, p.bias, p.scale, t, -1, backend=self.backend)
                        for p, t in zip(self.parts, self.thresholds)]
        else:
            outs = [self._prefill(x, i) for i in range(len(self.parts))]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _prefill(self, x: Tensor, i: int) -> Tensor:
        p, threshold = self.parts[i], self.thresholds[i]
        if self.prefill == "sparse":
            score = x.float().abs()
            if p.scale is not None:
                score = score * p.scale
            # ~(score <= t), as the kernel: a NaN input stays active
            x = torch.where(score <= threshold, torch.zeros((), dtype=x.dtype, device=x.device), x)
        if not self.transposed and self.weight.numel():
            # the original layout is still there: the very matmul nn.Linear runs
            lo, hi = self.ranges[i]
            bias = None if self.bias is None else self.bias[lo:hi]
            return F.linear(x, self.weight[lo:hi], bias)
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ p.weight_t if p.bias is None else torch.addmm(p.bias, x2, p.weight_t)
        return y.reshape(*x.shape[:-1], -1)
