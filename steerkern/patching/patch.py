"""Patch a loaded transformers model in place, and reverse it.

``handle = steerkern.patch(model, steering=plan, sparsity=plan)`` checks
everything first (a ValueError before any weight or module is touched), then

* gives each layer a steered forward (:mod:`.forwards`) and its steering
  sites (:class:`~.modules.SiteSteer`, one table per intervention slot);
* replaces each sparsified projection by a :class:`~.modules.SparseLinear`
  whose ``W^T`` layout is prepared once, here (``handle.memory`` reports its
  cost; ``drop_dense=True`` frees the original layout, rebuilt on unpatch),
  and gives the attention and MLP blocks around them a lean decode forward
  (:mod:`.decode`: the same operations, fewer Python calls);
* adds a forward pre-hook that tracks token positions, when a plan needs them.

``handle.remove()`` / ``steerkern.unpatch(model)`` restores the original
forwards, modules and weights; ``with steerkern.patch(...):`` does it on
exit.  Patching a patched model replaces its plans.  Between calls, steering
coefficients, vectors and sparsity thresholds change with a tensor write
(``handle.set_alpha``, ``set_vector``, ``set_threshold``); per-row variants
with ``handle.set_variants``.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import types
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import backends
from ..ops.table import SteerTable
from ..plan import SITES, Intervention, SparsityPlan, SteeringPlan
from . import attention as attention_kernel
from . import decode as lean_decode
from . import registry
from .forwards import FORWARDS, LayerSteering, wrap_module_output
from .modules import SiblingGroup, SiteSteer, Slot, SparseLinear, TokenPositions

_HANDLE_ATTR = "_steerkern_handle"


@dataclasses.dataclass
class _Placement:
    """Where one (variant, intervention) landed at one layer: table row ``row``."""

    layer: int
    site: SiteSteer
    slot: int
    row: int


class PatchHandle:
    """What :func:`patch` did to a model; undo it with :meth:`remove`."""

    def __init__(self, model: nn.Module, family: registry.Family, steering: Optional[SteeringPlan],
                 sparsity: Optional[SparsityPlan], backend: str) -> None:
        self.model, self.family, self.steering, self.sparsity, self.backend = (
            model, family, steering, sparsity, backend)
        self.tracker = TokenPositions()
        self._layers: List[nn.Module] = []
        self._wrapped: List[nn.Module] = []  # modules given an instance forward
        self._swapped: List[Tuple[nn.Module, str, nn.Module, SparseLinear]] = []
        self._dropped: List[Tuple[nn.Module, SparseLinear]] = []
        self._placements: Dict[Tuple[int, int], List[_Placement]] = {}
        self._hook = None
        self._owner: Optional[nn.Module] = None
        self._attention: list = []  # (config, original attention name) where the decode kernel stands in
        self._lean: List[nn.Module] = []  # attention and MLP blocks given the lean decode forward
        self.active = False

    # ---- reversing --------------------------------------------------------
    def remove(self) -> None:
        """Restore the original forwards, modules and weights (idempotent)."""
        if not self.active:
            return
        attention_kernel.uninstall(self._attention)
        self._attention = []
        lean_decode.uninstall(self._lean)
        self._lean = []
        for module in self._wrapped:
            module.__dict__.pop("forward", None)
        for layer in self._layers:
            if "steerkern" in layer._modules:
                del layer.steerkern
        for original, sparse in self._dropped:
            wt = torch.cat([p.weight_t for p in sparse.parts], dim=1)
            original.weight.data = (wt if sparse.transposed else wt.T).contiguous()
        for parent, name, original, sparse in self._swapped:
            setattr(parent, name, original)
            sparse.group = None
        if self._hook is not None:
            self._hook.remove()
        for obj in (self.model, self._owner):
            if obj is not None and obj.__dict__.get(_HANDLE_ATTR) is self:
                del obj.__dict__[_HANDLE_ATTR]
        self._layers, self._wrapped, self._swapped, self._dropped = [], [], [], []
        self._placements, self._hook, self.active = {}, None, False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- run-time changes -------------------------------------------------
    def set_variants(self, index) -> None:
        """Per-row variants for the next calls: ``index[b]`` is 0 (unsteered)
        or ``j`` (variant ``j``) for row ``b``; None: variant 1 for every row."""
        if index is None:
            self.tracker.variant_rows = None
            return
        t = torch.as_tensor(index)
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"index: expected a 1-D integer sequence, one variant per row, got {t.dtype} "
                             f"{list(t.shape)}")
        K = self.steering.num_variants if self.steering is not None else 0
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > K):
            raise ValueError(f"index: values must lie in [0, {K}] (0 = unsteered, j = variant j), "
                             f"got [{int(t.min())}, {int(t.max())}]")
        self.tracker.variant_rows = t.to(device=registry.model_device(self.model), dtype=torch.int32)

    def _placed(self, intervention: int, variant: int) -> Tuple[Intervention, List[_Placement]]:
        if self.steering is None or not 1 <= variant <= self.steering.num_variants:
            raise ValueError(f"variant: expected 1..{0 if self.steering is None else self.steering.num_variants}")
        ivs = self.steering.variants[variant - 1]
        if not 0 <= intervention < len(ivs):
            raise ValueError(f"intervention: expected 0..{len(ivs) - 1}, got {intervention}")
        return ivs[intervention], self._placements.get((variant, intervention), [])

    def set_alpha(self, alpha: float, intervention: int = 0, variant: int = 1) -> None:
        """Set an intervention's vector coefficient in place (per-layer
        coefficients still apply); no re-patching, no recompile."""
        iv, places = self._placed(intervention, variant)
        if iv.entry.vector is None:
            raise ValueError(f"intervention: intervention {intervention} has no vector to scale")
        alpha = float(alpha)
        for p in places:
            p.site.tables[p.slot].alpha[p.row] = alpha * iv.coefficient(p.layer)

    def set_vector(self, vector, intervention: int = 0, variant: int = 1) -> None:
        """Write a new steering vector (``[d]`` or ``[num_layers, d]``) in place."""
        iv, places = self._placed(intervention, variant)
        if iv.entry.vector is None:
            raise ValueError(f"intervention: intervention {intervention} has no vector to replace")
        v = torch.as_tensor(vector, dtype=torch.float32)
        d, L = iv.hidden_size, len(self._layers)
        if v.shape not in ((d,), (L, d)) or not bool(torch.isfinite(v).all()):
            raise ValueError(f"vector: expected finite values of shape [{d}] or [{L}, {d}], got {list(v.shape)}")
        for p in places:
            row = v if v.dim() == 1 else v[p.layer]
            p.site.tables[p.slot].vec[p.row].copy_(row)

    def set_threshold(self, value: float, layer: int, projection: str) -> None:
        """Write one sparsity threshold in place (``layer=None, projection="lm_head"``
        for the output head)."""
        value = float(value)
        if not value >= 0:
            raise ValueError(f"value: expected a threshold >= 0, got {value}")
        for parent, name, _, sparse in self._swapped:
            if sparse.layer == layer and projection in sparse.names:
                sparse.set_threshold(value, sparse.names.index(projection) if len(sparse.parts) > 1 else 0)
                return
        raise ValueError(f"projection: layer {layer} has no sparse {projection!r}")

    # ---- reports ----------------------------------------------------------
    @property
    def memory(self) -> Dict[str, int]:
        """Bytes of prepared sparse layouts and of original layouts dropped."""
        prepared = sum(s.layout_bytes for *_, s in self._swapped)
        dropped = sum(s.dropped_bytes for _, s in self._dropped)
        return {"prepared_bytes": prepared, "dropped_bytes": dropped, "net_bytes": prepared - dropped}

    def sites(self) -> List[SiteSteer]:
        return [m for layer in self._layers for m in layer.steerkern.children()]

    def sparse_modules(self) -> List[SparseLinear]:
        return [s for *_, s in self._swapped]

    def __repr__(self) -> str:
        n_sites = len(self.sites()) if self.active else 0
        return (f"PatchHandle(family={self.family.name}, layers={len(self._layers)}, steering_sites={n_sites}, "
                f"sparse_projections={len(self._swapped)}, "
                f"attention={'kernel' if self._attention else 'model'}, active={self.active})")


def _model_name(model: nn.Module) -> Optional[str]:
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return os.path.basename(str(name).rstrip("/")).lower() if name else None


def _check_model_name(plan_model: Optional[str], model: nn.Module, what: str) -> None:
    have = _model_name(model)
    if plan_model and have and os.path.basename(plan_model.rstrip("/")).lower() != have:
        raise ValueError(f"{what}: the plan was made for model {plan_model!r}, but this model is {have!r} "
                         f"(pass check_model=False to apply it anyway)")


def _check_backend(device: torch.device, backend: str, ops: Sequence[str]) -> None:
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"model: on {device.type}; steerkern's ops run on cpu and cuda devices")
    for op in ops:
        backends.choose(op, device.type, backend)  # raises ValueError naming the backend


def _layer_slots(plan: SteeringPlan, layer: int, site: str, d: int, device, pool: Dict[tuple, Slot]):
    """The tables and slots at (layer, site), and where each intervention went.

    Slot ``j`` holds the ``j``-th intervention (at this layer and site) of
    every variant, split further by position mode, so each variant keeps its
    own order and each slot has one position mode.  Equal slots come from
    ``pool``, shared by every layer and site: the tracker computes a slot's
    row index once per forward, not once per layer.
    """
    K = plan.num_variants
    per_variant = []
    for k, ivs in enumerate(plan.variants, start=1):
        mine = [(i, iv) for i, iv in enumerate(ivs)
                if iv.site == site and (iv.layers is None or layer in iv.layers)]
        per_variant.append((k, mine))
    depth = max((len(m) for _, m in per_variant), default=0)
    tables, slots, placed = [], [], []
    for j in range(depth):
        groups: Dict[object, list] = {}
        for k, mine in per_variant:
            if j < len(mine):
                i, iv = mine[j]
                groups.setdefault(iv.positions, []).append((k, i, iv))
        for positions, members in groups.items():
            entries = [iv.layer_entry(layer) for _, _, iv in members]
            vmap = torch.zeros(K + 1, dtype=torch.int32)
            for row, (k, i, _) in enumerate(members):
                vmap[k] = row + 1
                placed.append(((k, i), len(tables), row))
            tables.append(SteerTable.from_entries(entries, d, device=device))
            key = (positions, tuple(vmap.tolist()))
            if key not in pool:
                pool[key] = Slot(positions, vmap.to(device))
            slots.append(pool[key])
    return tables, slots, placed


def patch(model: nn.Module, steering: Optional[SteeringPlan] = None, sparsity: Optional[SparsityPlan] = None,
          *, backend: str = "auto", drop_dense: bool = False, check_model: bool = True,
          attention: str = "auto") -> PatchHandle:
    """Patch ``model`` in place with a steering and/or a sparsity plan; returns a handle.

    ``attention`` chooses who runs a decode step's attention (see
    :mod:`.attention`): ``"kernel"`` steerkern's decode attention kernel (CPU,
    fp32 inside; prefill, padded batches and other cases stay the model's),
    ``"model"`` the model's own, ``"auto"`` the kernel where a sparsity plan
    is given (the patch trades exactness for speed already), else the model's.

    Every check happens before the model is touched; on a ValueError the model
    is left exactly as it was (still patched with its old plans, if any).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if steering is not None and not isinstance(steering, SteeringPlan):
        raise ValueError(f"steering: expected a SteeringPlan, got {type(steering).__name__}")
    if sparsity is not None and not isinstance(sparsity, SparsityPlan):
        raise ValueError(f"sparsity: expected a SparsityPlan, got {type(sparsity).__name__}")
    if not isinstance(backend, str):
        raise ValueError(f"backend: expected a backend name, got {backend!r}")
    sites = sorted({iv.site for v in steering.variants for iv in v}) if steering is not None else []
    sparse = sparsity is not None and not sparsity.is_empty
    family = registry.family_for(model, sites=sites, sparsity=sparse)
    owner, _, layers = family.find_layers(model)
    L = len(layers)
    d = registry.hidden_size(model)
    device = registry.model_device(model)
    use_attention_kernel = attention_kernel.plan(model, attention, sparse, device)
    ops = ["steer"] + (["add_steer_rmsnorm"] if family.mlp_norm and "post_attn" in sites else []) + (
        ["sparse_linear"] if sparse else [])
    _check_backend(device, backend, ops)

    if steering is not None:
        steering.check_layers(L)
        if steering.num_layers is not None and steering.num_layers != L:
            raise ValueError(f"steering: the plan was made for a model with {steering.num_layers} layers; "
                             f"this one has {L}")
        if d is not None and steering.hidden_size is not None and steering.hidden_size != d:
            raise ValueError(f"steering: vectors have hidden size {steering.hidden_size}; the model's is {d} "
                             f"(expected vectors of shape [{d}])")
        if check_model:
            _check_model_name(steering.model, model, "steering")
        bad = [s for s in sites if s not in family.sites]
        if "post_attn" in sites and family.kind == "neox" and any(
                getattr(layer, "use_parallel_residual", False) for layer in layers):
            bad.append("post_attn")
        if bad:
            raise ValueError(f"site: {family.name} models have no {sorted(set(bad))} site"
                             + (" (the parallel residual adds attention and MLP at once)"
                                if family.kind == "neox" else "") + f"; supported: {list(family.sites)}")
        d = d or steering.hidden_size
    sparse_jobs = []
    if sparse:
        if sparsity.num_layers is not None and sparsity.num_layers != L:
            raise ValueError(f"sparsity: the plan was made for a model with {sparsity.num_layers} layers; "
                             f"this one has {L}")
        bad = [layer for layer in sparsity.thresholds if layer >= L]
        if bad:
            raise ValueError(f"sparsity: layer {bad[0]} out of range; the model has {L} layers (0..{L - 1})")
        if check_model:
            _check_model_name(sparsity.model, model, "sparsity")
        old = model.__dict__.get(_HANDLE_ATTR) or owner.__dict__.get(_HANDLE_ATTR)
        sparse_jobs = _sparse_jobs(family, layers, sparsity, model.config, old)
        if sparsity.lm_head is not None:
            sparse_jobs.append(_lm_head_job(model, sparsity.lm_head, old))

    # plan -> tables, all built before the model is touched
    site_plans = {}
    if steering is not None and not steering.is_empty:
        pool: Dict[tuple, Slot] = {}
        for layer in range(L):
            for site in SITES:
                tables, slots, placed = _layer_slots(steering, layer, site, d, device, pool)
                if tables:
                    site_plans[(layer, site)] = (tables, slots, placed)

    # ---- from here on the model changes ----------------------------------
    old = model.__dict__.get(_HANDLE_ATTR) or owner.__dict__.get(_HANDLE_ATTR)
    if old is not None:
        old.remove()
    handle = PatchHandle(model, family, steering, sparsity, backend)
    handle._owner = owner
    if use_attention_kernel:
        handle._attention = attention_kernel.install(model)
    for (layer_idx, _, parent, name, original, parts, names, transposed) in sparse_jobs:
        sl = SparseLinear(original, transposed, parts, sparsity.mode, sparsity.prefill, backend,
                          layer=layer_idx, names=names)
        setattr(parent, name, sl)
        handle._swapped.append((parent, name, original, sl))
        if drop_dense and sl.layout_bytes and not _tied_to_embeddings(model, original):
            sl.dropped_bytes = original.weight.numel() * original.weight.element_size()
            original.weight.data = torch.empty(0, dtype=original.weight.dtype, device=original.weight.device)
            handle._dropped.append((original, sl))
    _group_siblings(handle._swapped)
    handle._lean = lean_decode.install(layers)
    forward = FORWARDS[family.kind]
    for i, layer in enumerate(layers):
        made = {}
        for site in SITES:
            if (i, site) in site_plans:
                tables, slots, placed = site_plans[(i, site)]
                made[site] = SiteSteer(i, site, tables, slots, handle.tracker, backend)
                for key, slot, row in placed:
                    handle._placements.setdefault(key, []).append(_Placement(i, made[site], slot, row))
        layer.steerkern = LayerSteering(layer, made.get("pre"), made.get("post_attn"), made.get("post_mlp"),
                                        family.mlp_norm, family.norm_offset)
        if family.post_attn_module and "post_attn" in made:
            target = registry.submodule(layer, family.post_attn_module)
            target.forward = wrap_module_output(target, made["post_attn"])
            handle._wrapped.append(target)
        layer.forward = types.MethodType(forward, layer)
        handle._wrapped.append(layer)
        handle._layers.append(layer)
    if family.kind in ("prenorm", "sandwich"):
        # a steered post-MLP stream and the next layer's input RMSNorm, in one call
        for layer, nxt in zip(handle._layers, handle._layers[1:]):
            if layer.steerkern.post_mlp is not None and nxt.steerkern.pre is None:
                layer.steerkern.link_next(nxt, "input_layernorm")
    if any(s.positions != "all" for tables, slots, _ in site_plans.values() for s in slots):
        handle._hook = owner.register_forward_pre_hook(_position_hook(owner, handle.tracker), with_kwargs=True)
    model.__dict__[_HANDLE_ATTR] = handle
    owner.__dict__[_HANDLE_ATTR] = handle
    handle.active = True
    return handle


def _group_siblings(swapped) -> None:
    """One SiblingGroup per layer and registry.INPUT_GROUPS entry with two or
    more separate sparse modules (q/k/v, gate/up)."""
    by_key = {}
    for _, _, _, sl in swapped:
        for g, names in enumerate(registry.INPUT_GROUPS):
            if sl.layer is not None and sl.names and set(sl.names) <= set(names):
                by_key.setdefault((sl.layer, g), []).append(sl)
    for members in by_key.values():
        if len(members) > 1:
            SiblingGroup(members)


def _sparse_jobs(family, layers, plan: SparsityPlan, config, old: Optional[PatchHandle]):
    # a model patched before: look through its sparse modules to the originals
    swapped = {id(s): (o, s) for _, _, o, s in (old._swapped if old is not None else [])}
    jobs = []
    for i, layer in enumerate(layers):
        for path, names in family.projections:
            ts = [plan.threshold(i, n) for n in names]
            if all(t is None for t in ts):
                continue
            if any(t is None for t in ts):
                raise ValueError(f"sparsity: layer {i}: {path} computes {list(names)} in one fused projection; "
                                 f"give thresholds for all of them or none")
            *parent_path, name = path.split(".")
            parent = registry.submodule(layer, ".".join(parent_path))
            original = getattr(parent, name)
            if id(original) in swapped:
                original, prev = swapped[id(original)]
                out = prev.out_features
            else:
                out = None
            transposed = type(original).__name__ == "Conv1D"
            if not (isinstance(original, nn.Linear) or transposed):
                raise ValueError(f"sparsity: layer {i}: {path} is a {type(original).__name__}, not a linear layer")
            if out is None:
                out = original.weight.shape[1] if transposed else original.weight.shape[0]
            widths = registry.part_widths(family, names, config)
            if widths is None:
                if len(set(ts)) > 1:
                    raise ValueError(f"sparsity: layer {i}: {path} computes {list(names)} in one fused "
                                     f"projection; their thresholds must be equal, got {ts}")
                parts = [(out, ts[0])]
            else:
                if sum(widths) != out:
                    raise ValueError(f"sparsity: layer {i}: cannot split {path} ({out} outputs) into {widths}")
                parts = list(zip(widths, ts))
            jobs.append((i, path, parent, name, original, parts, tuple(names), transposed))
    return jobs


def _lm_head_job(model: nn.Module, threshold: float, old: Optional[PatchHandle]):
    """The sparse job of the model's output head (``SparsityPlan.lm_head``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if old is not None:  # patched before: the original head behind its sparse module
        head = next((o for _, _, o, s in old._swapped if s is head), head)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"sparsity.lm_head: {type(model).__name__} has no linear output head "
                         f"(get_output_embeddings() gives {type(head).__name__}); leave lm_head=None")
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is head or (old is not None and any(s is child and o is head for _, _, o, s in old._swapped)):
                return (None, name, parent, name, head, [(head.weight.shape[0], threshold)], ("lm_head",), False)
    raise ValueError(f"sparsity.lm_head: the output head of {type(model).__name__} is not one of its submodules")


def _tied_to_embeddings(model: nn.Module, original: nn.Module) -> bool:
    """Whether ``original``'s weight is also the input embedding (never dropped)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return weight is not None and weight is original.weight


def _position_hook(owner: nn.Module, tracker: TokenPositions):
    names = list(inspect.signature(owner.forward).parameters)

    def hook(module, args, kwargs):
        bound = dict(zip(names, args))
        bound.update(kwargs)
        ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            return None
        batch, seq = x.shape[0], x.shape[1]
        cache = bound.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        tracker.begin(batch, seq, past, bound.get("attention_mask"), x.device)
        return None

    return hook


def unpatch(model: nn.Module) -> bool:
    """Reverse :func:`patch` on ``model``; returns whether it was patched."""
    handle = model.__dict__.get(_HANDLE_ATTR)
    if handle is None:
        return False
    handle.remove()
    return True


def handle_of(model: nn.Module) -> Optional[PatchHandle]:
    """The active patch handle of ``model``, or None."""
    return model.__dict__.get(_HANDLE_ATTR)
