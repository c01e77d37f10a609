"""Worker side: per-batch steering tables, and the patched norms of a vLLM model.

vLLM's prenorm decoder layers (Llama, Mistral, Qwen2, Qwen3) carry the
residual stream in two parts, ``(hidden_states, residual)``, and add them
inside the next fused ``norm(x, residual) -> (normed, sum)`` call.  So every
steering site is such a call:

=============  ===========================================================
site, layer L  where the stream is formed
=============  ===========================================================
``pre``        ``input_layernorm`` of layer L (layer 0: the embedding,
               steered before the layer runs)
``post_attn``  ``post_attention_layernorm`` of layer L
``post_mlp``   ``input_layernorm`` of layer L+1, or the model's final norm
=============  ===========================================================

Each batch row (token) picks a table entry through the steer op's per-row
index, so the requests of one batch get their own steering.  At a norm with
steered rows, vLLM's own norm runs first and the steered rows are then
replaced by ``add_steer_rmsnorm`` (one fused op when every row is steered):
rows with index 0 come back bit-exact from the steer op and keep vLLM's own
normalized output, so requests without steering are computed exactly as
plain vLLM computes them.  A batch without steered rows runs vLLM's code
untouched.

This module does not import vLLM: it sees the model's modules by duck typing.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ...ops import library
from ...ops.table import SteerEntry, SteerTable
from ...plan import Intervention
from .spec import SteeringLibrary, fingerprint, has_steering

log = logging.getLogger("steerkern.vllm")


_MAX_SPECS = 4096  # distinct steering requests kept compiled

Key = Tuple[int, str, int]   # (layer, site, depth): depth orders interventions at one site
Location = Tuple[str, int]   # ("in", L): input norm of layer L (L == num_layers: final norm); ("mid", L)


@dataclasses.dataclass
class RequestRow:
    """One request's rows in the flattened batch."""

    req_id: str
    extra_args: Optional[Mapping[str, Any]]
    start: int          # first row of the request in the batch
    count: int          # rows scheduled this step
    first_position: int  # position of its first scheduled token in its sequence
    prompt_len: int


@dataclasses.dataclass
class _Step:
    table: SteerTable
    index: Tensor     # [rows] int32 on the model's device
    all_rows: bool    # every row of the batch is steered by this step


@dataclasses.dataclass
class BatchSteering:
    """What the patched norms read during one forward pass."""

    steps: Dict[Location, List[_Step]]
    masks: Dict[Location, Tensor]   # rows steered by any step at the location


@dataclasses.dataclass
class _Layout:
    """The steered requests of a batch (in row order) and their key groups:
    ``[(members [(req_id, slot, positions)], [(key, table)])]``."""

    ids: tuple
    groups: list


def _location(layer: int, site: str, num_layers: int) -> Location:
    if site == "pre":
        return ("in", layer)
    if site == "post_attn":
        return ("mid", layer)
    return ("in", layer + 1)  # post_mlp; layer + 1 == num_layers is the final norm


def _order(key: Key) -> tuple:
    layer, site, depth = key
    # at one input norm, the previous layer's post_mlp steps run before this layer's pre steps
    return (layer, 0 if site == "post_mlp" else 1, depth)


def _row_range(positions, first: int, count: int, prompt_len: int) -> Tuple[int, int]:
    """Rows ``[lo, hi)`` of a request's scheduled tokens that ``positions`` steers."""
    lo, hi = 0, None
    if positions == "prompt":
        hi = prompt_len
    elif positions == "generated":
        lo = prompt_len
    elif isinstance(positions, int):
        lo = positions
    a = min(max(lo - first, 0), count)
    b = count if hi is None else min(max(hi - first, 0), count)
    return a, max(a, b)


class SteeringRuntime:
    """Turns the requests of each batch into steering tables and row indices."""

    def __init__(self, library: SteeringLibrary, num_layers: int, hidden_size: int,
                 device: torch.device):
        self.library = library
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.current: Optional[BatchSteering] = None
        # req_id -> {key: (entry, positions)}, or None for a request without (valid) steering
        self._requests: Dict[str, Optional[Dict[Key, Tuple[SteerEntry, Any]]]] = {}
        self._specs: Dict[str, Dict[Key, Tuple[SteerEntry, Any]]] = {}  # fingerprint -> compiled
        self._spec_of: Dict[str, str] = {}  # req_id -> fingerprint
        self._tables: Dict[tuple, SteerTable] = {}
        self._layout: Optional[_Layout] = None
        self._last = None  # ((ids, index bytes), BatchSteering) of the previous step

    # ---- requests ------------------------------------------------------------
    def compile_request(self, req_id: str, extra_args) -> Optional[Dict[Key, Tuple[SteerEntry, Any]]]:
        if req_id in self._requests:
            return self._requests[req_id]
        compiled = None
        if has_steering(extra_args):
            # requests that ask for the same steering share its validated tables
            # (a server sees a few named vectors and coefficients many times over)
            spec = fingerprint(extra_args)
            compiled = self._specs.get(spec)
            if compiled is None:
                try:
                    interventions = self.library.parse(extra_args, self.num_layers, self.hidden_size)
                    compiled = self._by_key(interventions) or None
                except ValueError as err:
                    # the front end validates every request; one that got past it runs unsteered
                    log.error("steerkern: request %s runs unsteered: %s", req_id, err)
                if compiled is not None:
                    if len(self._specs) >= _MAX_SPECS:
                        self._specs.clear()
                    self._specs[spec] = compiled
        self._requests[req_id] = compiled
        if compiled is not None:
            self._spec_of[req_id] = spec
        return compiled

    def _by_key(self, interventions: Sequence[Intervention]) -> Dict[Key, Tuple[SteerEntry, Any]]:
        # the interventions were validated when made; a batch's table is then
        # SteerTable.from_entries of its requests' entries at each key
        out: Dict[Key, Tuple[SteerEntry, Any]] = {}
        depth: Dict[Tuple[int, str], int] = {}
        for iv in interventions:
            for layer in iv.resolved_layers(self.num_layers):
                n = depth.get((layer, iv.site), 0)
                depth[(layer, iv.site)] = n + 1
                out[(layer, iv.site, n)] = (iv.layer_entry(layer), iv.positions)
        return out

    def forget_unless(self, live_req_ids) -> None:
        """Drop what is cached for requests that have left the engine (checked
        only once the cache has grown, to keep the per-step cost flat)."""
        if len(self._requests) < 256:
            return
        live = set(live_req_ids)
        for req_id in [r for r in self._requests if r not in live]:
            del self._requests[req_id]
            self._spec_of.pop(req_id, None)

    # ---- batches -------------------------------------------------------------
    def prepare(self, rows: Sequence[RequestRow], num_rows: int) -> Optional[BatchSteering]:
        """Build the tables and indices of one batch of ``num_rows`` rows
        (padding rows past the requests' rows are unsteered); sets ``current``.

        The per-step work is one index array per group of keys that the same
        requests steer with the same position rules; tables and groups are
        rebuilt only when the set of steered requests changes, and the whole
        result is reused while the indices stay the same (decode steps)."""
        steered = []
        for row in rows:
            compiled = self.compile_request(row.req_id, row.extra_args)
            if compiled:
                steered.append((row, compiled))
        if not steered:
            self.current = None
            return None
        ids = tuple(row.req_id for row, _ in steered)
        if self._layout is None or self._layout.ids != ids:
            self._layout = self._build_layout(ids, [c for _, c in steered])
        by_id = {row.req_id: row for row, _ in steered}
        arrays = []
        for members, _ in self._layout.groups:
            index = np.zeros(num_rows, dtype=np.int32)
            for req_id, slot, positions in members:
                row = by_id[req_id]
                a, b = _row_range(positions, row.first_position, row.count, row.prompt_len)
                index[row.start + a: row.start + b] = slot
            arrays.append(index)
        signature = b"".join(a.tobytes() for a in arrays)
        if self._last is not None and self._last[0] == (ids, signature):
            self.current = self._last[1]
            return self.current
        tensors = [None if not a.any() else torch.from_numpy(a).to(self.device, non_blocking=True)
                   for a in arrays]
        steps: Dict[Location, List[_Step]] = {}
        masks: Dict[Location, np.ndarray] = {}
        for g, (_, keyed) in enumerate(self._layout.groups):
            if tensors[g] is None:
                continue
            active, all_rows = arrays[g] > 0, bool(arrays[g].all())  # once per group, not per key
            for key, table in keyed:
                loc = _location(key[0], key[1], self.num_layers)
                steps.setdefault(loc, []).append((_order(key), _Step(table, tensors[g], all_rows)))
                masks[loc] = (masks[loc] | active) if loc in masks else active
        if not steps:
            self.current = None
            return None
        ordered = {loc: [st for _, st in sorted(v, key=lambda x: x[0])] for loc, v in steps.items()}
        mask_tensors = {loc: torch.from_numpy(m).to(self.device, non_blocking=True) for loc, m in masks.items()}
        self.current = BatchSteering(ordered, mask_tensors)
        self._last = ((ids, signature), self.current)
        return self.current

    def _build_layout(self, ids, compiled) -> "_Layout":
        """Group the keys by the (request, position rule) lists that steer them;
        slots follow the requests sorted by their steering, then id, so a
        reordered batch, or a new batch asking for the same steering, keeps its
        tables."""
        per_key: Dict[Key, List[Tuple[str, SteerEntry, Any]]] = {}
        for req_id, comp in zip(ids, compiled):
            for key, (entry, positions) in comp.items():
                per_key.setdefault(key, []).append((req_id, entry, positions))
        groups: Dict[tuple, List[Tuple[Key, SteerTable]]] = {}
        tables: Dict[tuple, SteerTable] = {}
        for key, members in per_key.items():
            members.sort(key=lambda m: (self._spec_of[m[0]], m[0]))
            # by what the members ask for, not who they are
            tkey = (key, tuple(self._spec_of[m[0]] for m in members))
            table = self._tables.get(tkey)
            if table is None:
                table = SteerTable.from_entries([e for _, e, _ in members], self.hidden_size, device=self.device)
            tables[tkey] = table
            gkey = tuple((req_id, slot, positions) for slot, (req_id, _, positions) in enumerate(members, 1))
            groups.setdefault(gkey, []).append((key, table))
        self._tables = tables
        self._last = None
        return _Layout(ids, [(list(g), keyed) for g, keyed in groups.items()])

    def finish(self) -> None:
        self.current = None

    # ---- what the patched modules call ---------------------------------------
    def steps_at(self, loc: Location) -> Optional[List[_Step]]:
        cur = self.current
        return None if cur is None else cur.steps.get(loc)

    # The torch ops are called directly: tables and int32 indices are built
    # (and valid) here, and the public functions' index range check would
    # synchronize a GPU once per call.
    def steer_stream(self, loc: Location, h: Tensor) -> Tensor:
        """Steer an unnormalized stream (the first layer's input)."""
        for s in self.steps_at(loc) or ():
            h = library.hot("steer", h)(h, s.index, *s.table.tensors())
        return h

    def steer_norm(self, loc: Location, norm: nn.Module, orig: Callable, x: Tensor,
                   residual: Tensor) -> Tuple[Tensor, Tensor]:
        """``(normed, stream)`` of ``norm(x, residual)`` with the location's steps."""
        steps = self.steps_at(loc)
        weight, eps = norm.weight, float(norm.variance_epsilon)
        if len(steps) == 1 and steps[0].all_rows:
            s = steps[0]
            # vLLM's own fused_add_rms_norm writes into x and residual, so the
            # model lets the norm have them: the in-place op allocates nothing
            fused_ = library.hot_in_place("add_steer_rmsnorm", x)
            if fused_ is not None:
                fused_(x, residual, weight, eps, 0.0, s.index, *s.table.tensors())
                return x, residual
            r, y = library.hot("add_steer_rmsnorm", x)(x, residual, weight, eps, 0.0, s.index, *s.table.tensors())
            return y, r
        y0, r = orig(x, residual)  # vLLM's own result, kept for the unsteered rows
        for s in steps[:-1]:
            r = library.hot("steer", r)(r, s.index, *s.table.tensors())
        last = steps[-1]
        r, y = library.hot("add_steer_rmsnorm", r)(r, None, weight, eps, 0.0, last.index, *last.table.tensors())
        if not all(s.all_rows for s in steps):
            y = torch.where(self.current.masks[loc][:, None], y, y0)
        return y, r


# ---- patching the model ----------------------------------------------------------

def find_decoder(model: nn.Module):
    """``(inner model, layers)`` of a vLLM prenorm decoder, or None."""
    for inner in (getattr(model, "model", None), getattr(getattr(model, "model", None), "language_model", None),
                  model):
        layers = getattr(inner, "layers", None) if inner is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers):
            return inner, layers
    return None


def _is_missing(module) -> bool:
    return type(module).__name__ == "PPMissingLayer"


def _check_norm(norm, where: str) -> None:
    if getattr(norm, "weight", None) is None or not hasattr(norm, "variance_epsilon"):
        raise ValueError(f"{where}: expected an RMSNorm with weight and variance_epsilon, "
                         f"got {type(norm).__name__}")
    if type(norm).__name__ != "RMSNorm":
        # Gemma-style norms store weight - 1 and are not wired here
        raise ValueError(f"{where}: {type(norm).__name__} is not supported (plain RMSNorm only)")


def install(model: nn.Module, runtime: SteeringRuntime) -> Callable[[], None]:
    """Route the model's fused norms (and its first layer) through ``runtime``.

    Overrides ``forward`` on the module instances only; returns a function
    that restores them.
    """
    found = find_decoder(model)
    if found is None:
        raise ValueError(f"model: no list of decoder layers found in {type(model).__name__}")
    inner, layers = found
    if len(layers) != runtime.num_layers:
        raise ValueError(f"model: {len(layers)} layers, but the runtime was built for {runtime.num_layers}")
    patched: List[nn.Module] = []

    def override(module: nn.Module, fn) -> None:
        module.forward = fn
        patched.append(module)

    for i, layer in enumerate(layers):
        if _is_missing(layer):
            continue
        for name in ("input_layernorm", "post_attention_layernorm"):
            _check_norm(getattr(layer, name, None), f"layers[{i}].{name}")
        override(layer, _layer_forward(runtime, ("in", i), layer.forward))
        override(layer.input_layernorm, _norm_forward(runtime, ("in", i), layer.input_layernorm))
        override(layer.post_attention_layernorm,
                 _norm_forward(runtime, ("mid", i), layer.post_attention_layernorm))
    final = getattr(inner, "norm", None)
    if final is not None and not _is_missing(final):
        _check_norm(final, "norm")
        override(final, _norm_forward(runtime, ("in", len(layers)), final))

    def restore() -> None:
        for m in patched:
            m.__dict__.pop("forward", None)

    return restore


def _layer_forward(runtime: SteeringRuntime, loc: Location, orig: Callable):
    def forward(positions, hidden_states, residual, *args, **kwargs):
        if residual is None and runtime.current is not None:
            # first layer: the stream is the embedding itself, and the layer copies it
            # into the residual before its input norm
            hidden_states = runtime.steer_stream(loc, hidden_states)
        return orig(positions, hidden_states, residual, *args, **kwargs)
    return forward


def _norm_forward(runtime: SteeringRuntime, loc: Location, norm: nn.Module):
    orig = norm.forward

    def forward(x, residual=None, *args, **kwargs):
        if residual is None or args or kwargs or not runtime.steps_at(loc):
            return orig(x, residual, *args, **kwargs) if residual is not None else orig(x, *args, **kwargs)
        return runtime.steer_norm(loc, norm, orig, x, residual)
    return forward
