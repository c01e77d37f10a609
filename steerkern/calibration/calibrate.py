"""Calibrate a :class:`~steerkern.plan.SparsityPlan` from text.

    cal = Calibrator(model, windows, steering=plan)   # one pass, both scores
    sparse = cal.plan(0.5, mode="wina", allocation="greedy")

The pass runs under the steering plan when one is given: steering moves the
activations, and a threshold taken from the unsteered ones misses its target.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..patching.registry import family_for, part_widths, submodule
from ..plan import SPARSITY_MODES, SparsityPlan
from . import allocate
from .collect import Collected, Projection, Site, collect, masked, realized_sparsity, _progress
from .data import batches as to_batches

_MAX_THRESHOLD = 3.0e38  # fp32-finite "drop everything": only NaN scores lie above it


def projection_sites(model: nn.Module) -> Tuple[Dict[Site, Projection], List[nn.Module]]:
    """``({(layer, proj): Projection}, layers)`` from the family registry.

    A fused module that the patching layer splits into parts (Phi-3, GPT-2)
    gives each name its own output rows, so each part has its own WINA column
    norms and threshold, as in the patched model.
    """
    fam = family_for(model, sparsity=True)
    layers = list(fam.find_layers(model)[2])
    sites: Dict[Site, Projection] = {}
    for i, layer in enumerate(layers):
        for path, names in fam.projections:
            mod = submodule(layer, path)
            if type(mod).__name__ == "SparseLinear":
                raise ValueError("model: its projections are patched for sparsity; unpatch it first "
                                 "(steerkern.unpatch(model))")
            if mod is None or getattr(mod, "weight", None) is None:
                raise ValueError(f"model: layer {i} has no projection at {path!r} ({fam.name} family)")
            widths = part_widths(fam, names, model.config)
            start = 0
            for j, name in enumerate(names):
                rows = None if widths is None else (start, start + widths[j])
                start = 0 if widths is None else start + widths[j]
                sites[(i, name)] = Projection(mod, rows)
    return sites, layers


@contextlib.contextmanager
def steered(model: nn.Module, steering):
    """Patch ``model`` with ``steering`` for the duration (nothing when None)."""
    if steering is None:
        yield
        return
    from ..patching import handle_of, patch

    if handle_of(model) is not None:
        # removing our patch afterwards would drop the user's
        raise ValueError("model: already patched by steerkern; pass an unpatched model and give the "
                         "steering plan as steering=")
    handle = patch(model, steering=steering)
    try:
        yield
    finally:
        handle.remove()


def check_mode(mode: str) -> str:
    if mode not in SPARSITY_MODES:
        raise ValueError(f"mode: expected one of {SPARSITY_MODES}, got {mode!r}")
    return mode


def check_allocation(allocation: str) -> str:
    if allocation not in allocate.ALLOCATIONS:
        raise ValueError(f"allocation: expected one of {allocate.ALLOCATIONS}, got {allocation!r}")
    return allocation


class Calibrator:
    """Score histograms of every projection input of ``model`` on ``windows``.

    ``windows`` is an int ``[n, seq_len]`` tensor of token ids (see
    :func:`steerkern.calibration.data.token_windows`).  ``greedy_windows`` of
    them (the first) are kept per block for the greedy allocation; 0 keeps
    none and allows only ``uniform``.
    """

    def __init__(self, model: nn.Module, windows: Tensor, *, steering=None, batch_size: int = 8,
                 greedy_windows: int = 8, progress: bool = True) -> None:
        if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.dtype not in (torch.int64, torch.int32):
            raise ValueError("windows: expected an int tensor [n, seq_len] of token ids, got "
                             f"{getattr(windows, 'dtype', type(windows).__name__)} "
                             f"{list(getattr(windows, 'shape', []))}")
        if len(windows) == 0:
            raise ValueError("windows: no calibration windows")
        self.model = model
        self.steering = steering
        self.progress = progress
        self.batches = to_batches(windows, batch_size)
        self.sites, self.layers = projection_sites(model)
        self._greedy: Dict[tuple, Dict[Site, float]] = {}
        self.collected: Collected = self._collect(keep_block_windows=greedy_windows)

    def _collect(self, keep_block_windows: int = 0, sparsify=None) -> Collected:
        was_training = self.model.training
        self.model.eval()
        try:
            with steered(self.model, self.steering):
                return collect(self.model, self.sites, self.layers, self.batches,
                               keep_block_windows=keep_block_windows, progress=self.progress,
                               sparsify=sparsify)
        finally:
            self.model.train(was_training)

    @property
    def tokens(self) -> int:
        return self.collected.tokens

    def levels(self, sparsity: float, mode: str = "wina", allocation: str = "uniform",
               step: float = 0.05) -> Dict[Site, float]:
        """The fraction of inputs each site drops (``{(layer, proj): level}``)."""
        sparsity = allocate.check_sparsity(sparsity)
        check_mode(mode)
        if check_allocation(allocation) == "uniform":
            return allocate.uniform(self.collected, sparsity)
        key = (mode, sparsity, float(step))
        if key not in self._greedy:  # block replays are the costly part: keep their result
            prog = (lambda it: _progress(it, f"greedy {mode} {sparsity:g}", True)) if self.progress else None
            with steered(self.model, self.steering):
                self._greedy[key] = allocate.greedy(self.collected, mode, sparsity, step=step, progress=prog)
        return dict(self._greedy[key])

    def thresholds(self, levels: Dict[Site, float], mode: str = "wina") -> Dict[Site, float]:
        out = allocate.thresholds_for(self.collected, check_mode(mode), levels)
        return {s: min(t, _MAX_THRESHOLD) for s, t in out.items()}

    def refine(self, levels: Dict[Site, float], thresholds: Dict[Site, float], mode: str) -> Dict[Site, float]:
        """Thresholds for ``levels`` measured with ``thresholds`` applied everywhere.

        Dense calibration sees dense inputs, but a sparse model feeds each
        projection the output of sparse ones upstream (an o_proj after a sparse
        v_proj reads smaller values, and drops more than its level).  One pass
        with the plan applied re-reads every site's input the way the sparse
        model will produce it.
        """
        scales = self.scales(mode)
        again = self._collect(sparsify=(thresholds, {s: scales[s] for s in thresholds}))
        out = allocate.thresholds_for(again, mode, levels)
        return {s: min(t, _MAX_THRESHOLD) for s, t in out.items()}

    def plan(self, sparsity: float, mode: str = "wina", allocation: str = "uniform",
             step: float = 0.05, refine: int = 1, model_name: Optional[str] = None) -> SparsityPlan:
        """A plan reaching ``sparsity``; ``refine`` extra passes re-read the
        thresholds with the plan applied (see :meth:`refine`)."""
        levels = self.levels(sparsity, mode, allocation, step)
        thresholds = self.thresholds(levels, mode)
        for _ in range(int(refine)):
            thresholds = self.refine(levels, thresholds, mode)
        return to_plan(thresholds, mode, sparsity, len(self.layers), model_name)

    def scales(self, mode: str) -> Dict[Site, Optional[Tensor]]:
        return {s: st.col_scale(check_mode(mode)) for s, st in self.collected.sites.items()}


def to_plan(thresholds: Dict[Site, float], mode: str, target: float, num_layers: int,
            model_name: Optional[str] = None) -> SparsityPlan:
    per: Dict[int, Dict[str, float]] = {}
    for (layer, proj), t in sorted(thresholds.items()):
        per.setdefault(layer, {})[proj] = float(t)
    return SparsityPlan(per, mode=mode, target=target, model=model_name, num_layers=num_layers)


def plan_thresholds(plan: SparsityPlan) -> Dict[Site, float]:
    return {(layer, proj): t for layer, per in plan.thresholds.items() for proj, t in per.items()}


def site_weights(sites: Dict[Site, Projection]) -> Dict[Site, float]:
    """Each site's share of the weight bytes (names of an unsplit fused module
    split its share)."""
    sharing: Dict[tuple, int] = {}
    for p in sites.values():
        sharing[p.key] = sharing.get(p.key, 0) + 1
    raw = {s: p.params / sharing[p.key] for s, p in sites.items()}
    total = sum(raw.values())
    return {s: w / total for s, w in raw.items()}


def measure(model: nn.Module, plan: SparsityPlan, windows: Tensor, *, steering=None,
            batch_size: int = 8, progress: bool = False) -> Dict[Site, float]:
    """The sparsity ``plan`` realizes on ``windows``: ``{(layer, proj): dropped fraction}``.

    Sparsity is applied everywhere while measuring (reference mask semantics),
    and ``steering`` too when given.
    """
    sites, thresholds, scales = _plan_sites(model, plan)
    with torch.no_grad(), steered(model, steering):
        return realized_sparsity(model, sites, thresholds, scales, to_batches(windows, batch_size),
                                 progress=progress)


def average(per_site: Dict[Site, float], weights: Dict[Site, float]) -> float:
    """The weight-size-weighted mean over the sites in ``per_site``."""
    total = sum(weights[s] for s in per_site)
    return sum(v * weights[s] for s, v in per_site.items()) / total if total else math.nan


def apply_plan(model: nn.Module, plan: SparsityPlan):
    """A context manager applying ``plan`` with reference-mask hooks (no kernels).

    Quality is measured this way: it is the exact math of the sparse ops on
    every token, prefill included.
    """
    sites, thresholds, scales = _plan_sites(model, plan)
    return masked({s: sites[s] for s in thresholds}, thresholds, scales)


def _plan_sites(model: nn.Module, plan: SparsityPlan):
    if not isinstance(plan, SparsityPlan):
        raise ValueError(f"plan: expected a SparsityPlan, got {type(plan).__name__}")
    sites, layers = projection_sites(model)
    if plan.num_layers is not None and plan.num_layers != len(layers):
        raise ValueError(f"plan: made for {plan.num_layers} layers, the model has {len(layers)}")
    thresholds = plan_thresholds(plan)
    missing = [s for s in thresholds if s not in sites]
    if missing:
        raise ValueError(f"plan: sites {missing[:3]} are not projections of this model")
    scales = {s: sites[s].column_norms() if plan.mode == "wina" else None for s in thresholds}
    return sites, thresholds, scales
