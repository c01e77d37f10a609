"""Read what the projections see: forward pre-hooks on calibration text.

One pass over the calibration windows fills, for every projection site
``(layer, proj)``, a histogram of TEAL scores ``|x_i|`` and one of WINA scores
``|x_i| * ||W[:, i]||_2`` (both at once, so TEAL and WINA are compared on the
same activations).  The same pass can keep each block's inputs (a bounded
number of windows) so that the greedy allocation can replay single blocks.

Hooks sit on the projection modules themselves, so whatever runs before them
(a patched, steered residual stream included) is what they measure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import reference
from ..patching.registry import model_device
from .histogram import ScoreHistogram

Site = Tuple[int, str]  # (layer index, canonical projection name)


def weight_out_in(module: nn.Module) -> Tensor:
    """The projection weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    w = module.weight
    if type(module).__name__ == "Conv1D":
        return w.T
    return w


@dataclasses.dataclass(eq=False)
class Projection:
    """Where one canonical projection is computed: a module and, when a fused
    module is split into parts (Phi-3's ``qkv_proj``), the output rows of its part.
    Names of a fused module that is not split share ``rows=None`` and one mask."""

    module: nn.Module
    rows: Optional[Tuple[int, int]] = None

    @property
    def key(self) -> Tuple[int, Optional[Tuple[int, int]]]:
        return id(self.module), self.rows

    def weight(self) -> Tensor:
        w = weight_out_in(self.module)
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]

    def bias(self) -> Optional[Tensor]:
        b = getattr(self.module, "bias", None)
        return b if b is None or self.rows is None else b[self.rows[0]:self.rows[1]]

    def column_norms(self) -> Tensor:
        """WINA's ``||W[:, i]||_2`` for each input ``i`` (of this part), fp32."""
        return self.weight().detach().float().norm(dim=0).contiguous()

    @property
    def params(self) -> int:
        return self.weight().numel()


@dataclasses.dataclass
class SiteStats:
    """What calibration learned about one projection's input."""

    proj: Projection
    scale: Tensor  # WINA column norms [in]
    teal: ScoreHistogram
    wina: ScoreHistogram

    @property
    def module(self) -> nn.Module:
        return self.proj.module

    def histogram(self, mode: str) -> ScoreHistogram:
        return self.wina if mode == "wina" else self.teal

    def col_scale(self, mode: str) -> Optional[Tensor]:
        return self.scale if mode == "wina" else None


@dataclasses.dataclass
class BlockCall:
    """One captured call of a block: its positional and keyword arguments."""

    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Collected:
    sites: Dict[Site, SiteStats]
    layers: List[nn.Module]
    block_calls: Dict[int, List[BlockCall]]
    tokens: int


def _detach(value):
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def model_kwargs(model: nn.Module, input_ids: Tensor) -> dict:
    """Keyword arguments for a plain forward pass: no KV cache, no padding."""
    kw = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        kw["use_cache"] = False
    return kw


def _progress(iterable, desc: str, show: bool, total: Optional[int] = None):
    if not show:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


def _by_module(projections: Dict[Site, Projection]) -> Dict[int, List[Site]]:
    groups: Dict[int, List[Site]] = {}
    for site, proj in projections.items():
        groups.setdefault(id(proj.module), []).append(site)
    return groups


@torch.no_grad()
def collect(model: nn.Module, projections: Dict[Site, Projection], layers: Sequence[nn.Module],
            batches: Iterable[Tensor], keep_block_windows: int = 0, progress: bool = True,
            sparsify: Optional[Tuple[Dict[Site, float], Dict[Site, Optional[Tensor]]]] = None) -> Collected:
    """Run ``batches`` of token windows through ``model`` and histogram every site.

    ``keep_block_windows`` windows (the first ones) of every block's inputs are
    kept for block replay (0: none).  ``sparsify = (thresholds, scales)``
    applies sparse activation while collecting; each site's histogram still
    sees its input before its own mask, i.e. what upstream sparsity feeds it.
    """
    stats: Dict[Site, SiteStats] = {}
    unique: Dict[tuple, SiteStats] = {}
    for site, proj in projections.items():
        if proj.key in unique:  # names of one unsplit fused module share its histograms
            stats[site] = dataclasses.replace(unique[proj.key], proj=proj)
        else:
            stats[site] = unique[proj.key] = SiteStats(proj, proj.column_norms(), ScoreHistogram(),
                                                       ScoreHistogram())
    per_module: Dict[int, List[SiteStats]] = {}
    for key, st in unique.items():
        per_module.setdefault(key[0], []).append(st)

    def site_hook(module, args):
        x = args[0].detach()
        a = x.reshape(-1, x.shape[-1]).float().abs()
        for st in per_module[id(module)]:
            st.teal.add(a)
            st.wina.add(a * st.scale.to(a.device))

    handles = [group[0].module.register_forward_pre_hook(site_hook) for group in per_module.values()]

    block_calls: Dict[int, List[BlockCall]] = {i: [] for i in range(len(layers))}
    kept = {"windows": 0}

    def block_hook(i):
        def hook(module, args, kwargs):
            if kept["windows"] < keep_block_windows:
                block_calls[i].append(BlockCall(_detach(args), _detach(kwargs)))
        return hook

    if keep_block_windows > 0:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(block_hook(i), with_kwargs=True))

    device = model_device(model)
    tokens = 0
    batches = list(batches)
    # registered after the histogram hooks, so they run after them
    masks = masked(projections, *sparsify) if sparsify is not None else contextlib.nullcontext()
    try:
        with masks:
            for ids in _progress(batches, "calibrating" if sparsify is None else "refining", progress):
                ids = ids.to(device)
                model(**model_kwargs(model, ids))
                tokens += ids.numel()
                kept["windows"] += ids.shape[0]
    finally:
        for h in handles:
            h.remove()
    return Collected(stats, list(layers), block_calls, tokens)


def _mask(x: Tensor, scale: Optional[Tensor], threshold: float) -> Tensor:
    """``x`` with the inputs that :func:`reference.sparse_mask` drops set to zero."""
    flat = x.reshape(-1, x.shape[-1])
    m = reference.sparse_mask(flat, None if scale is None else scale.to(x.device),
                              torch.tensor(float(threshold), device=x.device), -1)
    return torch.where(m, flat, torch.zeros((), dtype=x.dtype, device=x.device)).reshape(x.shape)


@contextlib.contextmanager
def masked(projections: Dict[Site, Projection], thresholds: Dict[Site, float],
           scales: Dict[Site, Optional[Tensor]]):
    """Apply sparse activation to the sites with the reference mask, via hooks.

    ``thresholds`` is read at every call, so a caller may change it between
    forward passes without re-registering.  A site missing from it stays dense.
    The math is :func:`steerkern.ops.reference.sparse_linear` (threshold mode):
    ``y = W (m * x) + b``, per part for a fused module split into parts.
    """
    handles = []

    def whole(site):
        def hook(module, args):
            t = thresholds.get(site)
            if t is None:
                return None
            return (_mask(args[0], scales.get(site), t),) + tuple(args[1:])
        return hook

    def parts(sites):
        def hook(module, args, output):
            if all(thresholds.get(s) is None for s in sites):
                return None
            x = args[0]
            outs = []
            for s in sites:
                p, t = projections[s], thresholds.get(s)
                xm = x if t is None else _mask(x, scales.get(s), t)
                outs.append(F.linear(xm, p.weight().to(x.dtype), p.bias()))
            return torch.cat(outs, dim=-1)
        return hook

    try:
        for sites in _by_module(projections).values():
            mod = projections[sites[0]].module
            if projections[sites[0]].rows is None:
                # one mask for the module (names of an unsplit fused module share a threshold)
                handles.append(mod.register_forward_pre_hook(whole(sites[0])))
            else:
                handles.append(mod.register_forward_hook(parts(sorted(sites, key=lambda s: projections[s].rows))))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def realized_sparsity(model: nn.Module, projections: Dict[Site, Projection], thresholds: Dict[Site, float],
                      scales: Dict[Site, Optional[Tensor]], batches: Iterable[Tensor],
                      progress: bool = False) -> Dict[Site, float]:
    """The fraction of inputs each site drops on ``batches``, with sparsity applied
    everywhere (so later layers see the inputs a sparse model gives them)."""
    dropped = {s: 0 for s in thresholds}
    seen = {s: 0 for s in thresholds}
    handles = []

    def count_hook(site):
        def hook(module, args):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            s = scales.get(site)
            m = reference.sparse_mask(flat, None if s is None else s.to(x.device),
                                      torch.tensor(float(thresholds[site]), device=x.device), -1)
            dropped[site] += int((~m).sum())
            seen[site] += m.numel()
        return hook

    try:
        for site in thresholds:
            handles.append(projections[site].module.register_forward_pre_hook(count_hook(site)))
        with masked({s: projections[s] for s in thresholds}, thresholds, scales):
            device = model_device(model)
            for ids in _progress(list(batches), "measuring", progress):
                model(**model_kwargs(model, ids.to(device)))
    finally:
        for h in handles:
            h.remove()
    return {s: dropped[s] / max(seen[s], 1) for s in thresholds}
