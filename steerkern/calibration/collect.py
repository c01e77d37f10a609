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
from torch import Tensor, nn

from ..ops import reference
from .histogram import ScoreHistogram

Site = Tuple[int, str]  # (layer index, canonical projection name)


def weight_out_in(module: nn.Module) -> Tensor:
    """The projection weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    w = module.weight
    if type(module).__name__ == "Conv1D":
        return w.T
    return w


def column_norms(module: nn.Module) -> Tensor:
    """WINA's ``||W[:, i]||_2`` for each input ``i``, fp32."""
    return weight_out_in(module).detach().float().norm(dim=0).contiguous()


@dataclasses.dataclass
class SiteStats:
    """What calibration learned about one projection's input."""

    module: nn.Module
    scale: Tensor  # WINA column norms [in]
    teal: ScoreHistogram
    wina: ScoreHistogram

    @property
    def in_features(self) -> int:
        return self.scale.numel()

    @property
    def params(self) -> int:
        return weight_out_in(self.module).numel()

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


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _progress(iterable, desc: str, show: bool, total: Optional[int] = None):
    if not show:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


@torch.no_grad()
def collect(model: nn.Module, sites: Dict[Site, nn.Module], layers: Sequence[nn.Module],
            batches: Iterable[Tensor], keep_block_windows: int = 0, progress: bool = True,
            sparsify: Optional[Tuple[Dict[Site, float], Dict[Site, Optional[Tensor]]]] = None) -> Collected:
    """Run ``batches`` of token windows through ``model`` and histogram every site.

    ``keep_block_windows`` windows (the first ones) of every block's inputs are
    kept for block replay (0: none).  ``sparsify = (thresholds, scales)``
    applies sparse activation while collecting; each site's histogram still
    sees its input before its own mask, i.e. what upstream sparsity feeds it.
    """
    stats: Dict[Site, SiteStats] = {}
    by_module: Dict[int, List[SiteStats]] = {}
    for site, mod in sites.items():
        first = by_module.get(id(mod))
        if first:  # a fused module serves several canonical names: they share its histograms
            st = dataclasses.replace(first[0])
        else:
            st = SiteStats(mod, column_norms(mod), ScoreHistogram(), ScoreHistogram())
        stats[site] = st
        by_module.setdefault(id(mod), []).append(st)

    handles = []

    def site_hook(module, args):
        st = by_module[id(module)][0]
        x = args[0].detach()
        a = x.reshape(-1, x.shape[-1]).float().abs()
        st.teal.add(a)
        st.wina.add(a * st.scale.to(a.device))

    seen = set()
    for st in stats.values():
        if id(st.module) not in seen:
            seen.add(id(st.module))
            handles.append(st.module.register_forward_pre_hook(site_hook))

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
    masks = masked(sites, *sparsify) if sparsify is not None else contextlib.nullcontext()
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


@contextlib.contextmanager
def masked(sites: Dict[Site, nn.Module], thresholds: Dict[Site, float],
           scales: Dict[Site, Optional[Tensor]]):
    """Apply sparse activation to the sites with the reference mask, via hooks.

    ``thresholds`` is read at every call, so a caller may change it between
    forward passes without re-registering.  A site missing from it stays dense.
    The math is :func:`steerkern.ops.reference.sparse_mask` (threshold mode):
    ``y = W (m * x) + b``.
    """
    handles = []

    def hook_for(site):
        def hook(module, args):
            t = thresholds.get(site)
            if t is None:
                return None
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            s = scales.get(site)
            m = reference.sparse_mask(flat, None if s is None else s.to(x.device),
                                      torch.tensor(float(t), device=x.device), -1)
            xm = torch.where(m, flat, torch.zeros((), dtype=x.dtype, device=x.device))
            return (xm.reshape(x.shape),) + tuple(args[1:])
        return hook

    groups: Dict[int, List[Site]] = {}
    for site, mod in sites.items():
        groups.setdefault(id(mod), []).append(site)
    try:
        for site, mod in sites.items():
            if groups[id(mod)][0] == site:  # a fused module gets one hook (its names share a threshold)
                handles.append(mod.register_forward_pre_hook(hook_for(site)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def realized_sparsity(model: nn.Module, sites: Dict[Site, nn.Module], thresholds: Dict[Site, float],
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
            handles.append(sites[site].register_forward_pre_hook(count_hook(site)))
        with masked(sites, thresholds, scales):
            device = model_device(model)
            for ids in _progress(list(batches), "measuring", progress):
                model(**model_kwargs(model, ids.to(device)))
    finally:
        for h in handles:
            h.remove()
    return {s: dropped[s] / max(seen[s], 1) for s in thresholds}
