"""How much sparsity each projection gets.

* ``uniform``: every projection at the target.
* ``greedy``: per block, start dense and repeatedly raise by ``step`` the
  projection whose step adds the least block-output error per unit of
  sparsity gained, until the block's average sparsity (weighted by each
  projection's weight size, i.e. by the weight bytes a skipped input saves)
  reaches the target.  Each block is replayed on its own dense inputs, as
  TEAL's greedy does, so blocks are independent and every block averages the
  target.

A level is a fraction of a site's inputs to drop; the histograms turn it into
a threshold.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from .collect import BlockCall, Collected, Site, masked

ALLOCATIONS = ("uniform", "greedy")
MAX_LEVEL = 0.95


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a fraction in [0, {MAX_LEVEL}], got {sparsity!r}") from None
    if not 0.0 <= s <= MAX_LEVEL:
        raise ValueError(f"{name}: expected a fraction in [0, {MAX_LEVEL}], got {sparsity!r}")
    return s


def thresholds_for(collected: Collected, mode: str, levels: Dict[Site, float]) -> Dict[Site, float]:
    return {site: collected.sites[site].histogram(mode).threshold(lv) for site, lv in levels.items()}


def uniform(collected: Collected, sparsity: float) -> Dict[Site, float]:
    return {site: sparsity for site in collected.sites}


def _output(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _block_error(layer, calls: List[BlockCall], dense: List[Tensor]) -> float:
    num = den = 0.0
    for call, y0 in zip(calls, dense):
        y = _output(layer(*call.args, **call.kwargs)).float()
        num += float((y - y0).pow(2).sum())
        den += float(y0.pow(2).sum())
    return num / max(den, 1e-30)


@torch.no_grad()
def greedy(collected: Collected, mode: str, sparsity: float, step: float = 0.05,
           progress: Optional[Callable] = None) -> Dict[Site, float]:
    """Per-block greedy levels whose weighted average in each block is ``sparsity``."""
    if not 0.0 < step <= 0.5:
        raise ValueError(f"step: expected a fraction in (0, 0.5], got {step!r}")
    if not any(collected.block_calls.values()):
        raise ValueError("greedy allocation needs block inputs: collect with keep_block_windows > 0")
    levels: Dict[Site, float] = {}
    blocks = range(len(collected.layers))
    for b in (progress(blocks) if progress else blocks):
        levels.update(_greedy_block(collected, b, mode, sparsity, step))
    return levels


def _greedy_block(collected: Collected, b: int, mode: str, target: float, step: float) -> Dict[Site, float]:
    layer = collected.layers[b]
    calls = collected.block_calls[b]
    block_sites = [s for s in collected.sites if s[0] == b]
    # names of an unsplit fused module (one mask for several names) are one unit
    units: Dict[tuple, List[Site]] = {}
    for s in block_sites:
        units.setdefault(collected.sites[s].proj.key, []).append(s)
    unit_sites = list(units.values())
    params = [collected.sites[u[0]].proj.params for u in unit_sites]
    weight = [p / sum(params) for p in params]
    level = [0.0] * len(unit_sites)
    if target == 0.0 or not unit_sites:
        return {s: 0.0 for s in block_sites}

    projections = {s: collected.sites[s].proj for s in block_sites}
    scales = {s: collected.sites[s].col_scale(mode) for s in block_sites}
    thresholds: Dict[Site, float] = {}

    def set_levels(lv):
        for u, sites in enumerate(unit_sites):
            t = collected.sites[sites[0]].histogram(mode).threshold(lv[u])
            for s in sites:
                thresholds[s] = t

    dense = [_output(layer(*c.args, **c.kwargs)).float() for c in calls]
    err = 0.0

    def try_step(u):
        """(cost, new level, block error) of raising unit ``u`` one step now."""
        trial = list(level)
        trial[u] = min(level[u] + step, MAX_LEVEL)
        set_levels(trial)
        e = _block_error(layer, calls, dense)
        return (e - err) / (weight[u] * (trial[u] - level[u])), trial[u], e

    # lazy greedy: a unit's cost changes little when another unit steps, so
    # re-measure only the cheapest-looking one; accept it if it stays cheapest
    known: List[Optional[tuple]] = [None] * len(unit_sites)
    with masked(projections, thresholds, scales):
        last = None
        while sum(w * lv for w, lv in zip(weight, level)) < target - 1e-9:
            open_units = [u for u in range(len(unit_sites)) if level[u] < MAX_LEVEL - 1e-9]
            if not open_units:
                raise ValueError(f"sparsity: {target} cannot be reached in block {b} "
                                 f"with every projection at most {MAX_LEVEL}")
            for u in open_units:
                if known[u] is None:
                    known[u] = try_step(u) + (True,)
            while True:
                u = min(open_units, key=lambda v: known[v][0])
                if known[u][3]:  # measured in the current state
                    break
                known[u] = try_step(u) + (True,)
            _, level[u], err, _ = known[u]
            known[u] = None
            known = [None if k is None else k[:3] + (False,) for k in known]
            last = u
        # the last step may overshoot: take it back on the projection that made it
        over = sum(w * lv for w, lv in zip(weight, level)) - target
        if last is not None and over > 0:
            level[last] = max(level[last] - over / weight[last], 0.0)
    return {s: level[u] for u, sites in enumerate(unit_sites) for s in sites}
