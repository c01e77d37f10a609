"""Plans: what to steer and what to sparsify, as plain validated data.

A plan says *what* happens to a model; :func:`steerkern.patch` decides *how*
(which fused op at which point of which layer).  Plans hold fp32 CPU tensors
and Python numbers only, are checked when they are built, and save to one
safetensors file (tensors, plus a JSON description in the file's metadata;
never pickle).

Steering
--------
A :class:`SteeringPlan` is a list of :class:`Intervention` s.  Each one is

* ``entry``: a :class:`~steerkern.ops.table.SteerEntry`, the math of one
  steering step (see :mod:`steerkern.ops.reference`): projection with clamp
  (``directions``/``target``/``gain``; the defaults ablate), an additive
  vector (``vector``/``alpha``), an affine map (``scale``/``shift``), a
  condition (``condition``/``threshold``) and ``preserve_norm``.
  ``vector`` may be ``[d]`` or ``[num_layers, d]`` (one row per model layer);
* ``site``: where in each layer it acts on the residual stream:
  ``"pre"`` (the block's input), ``"post_attn"`` (after the attention output
  is added) or ``"post_mlp"`` (after the MLP output is added: the block's
  output);
* ``layers``: the layer indices (``None``: every layer);
* ``coefficients``: per-layer multipliers of ``alpha`` and ``gain``, a
  sequence aligned with ``layers`` or a ``{layer: coefficient}`` dict
  (missing layers get 1);
* ``positions``: which tokens: ``"all"``, ``"prompt"`` (tokens of the first
  forward of a generation), ``"generated"`` (every later token), or an int
  ``N`` (tokens whose position in their own row, padding excluded, is >= N).
  Positions are tracked through the KV cache, so every decoded token is
  steered as the plan says.

Interventions at the same layer and site run in list order.

Per-row steering of a batch: ``SteeringPlan.per_row([plan_1, ..., plan_K])``
holds ``K`` alternative lists of interventions (variants).  At generate time
the handle takes a per-row variant index (``0``: unsteered, ``j``: variant
``j``), which becomes the steer op's per-row table index.

Sparsity
--------
A :class:`SparsityPlan` gives per-layer, per-projection thresholds for
norm-aware sparse activation of the projections' inputs: input ``i`` of a
projection ``W`` stays active where ``|x_i| * ||W[:, i]|| > t`` (``"wina"``)
or ``|x_i| > t`` (``"teal"``).  Projection names are canonical across
families: ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``; a
family with fused projections (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, ...)
needs equal thresholds for the parts of one fused projection.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .ops.table import SteerEntry, SteerTable, finite_scalar, float_tensor

SITES = ("pre", "post_attn", "post_mlp")
POSITION_MODES = ("all", "prompt", "generated")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPARSITY_MODES = ("wina", "teal")
PREFILL_MODES = ("sparse", "dense")
FORMAT_VERSION = 1

Positions = Union[str, int]
_ENTRY_TENSORS = ("directions", "target", "vector", "scale", "shift", "condition")
_ENTRY_SCALARS = ("gain", "alpha", "threshold", "preserve_norm")


def layer_index(value, name: str) -> int:
    """``value`` as a layer index: an int >= 0, or its digits as a string (a JSON key)."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a layer index (int >= 0), got {value!r}")
    return int(value)


def _layer_list(layers, name: str) -> Optional[List[int]]:
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"{name}: expected non-negative layer indices, got {layer!r}")
        out.append(int(layer))
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: repeated layer indices in {out}")
    return out


@dataclasses.dataclass
class Intervention:
    """One steering step at one site of some layers (see the module doc)."""

    entry: SteerEntry
    site: str = "pre"
    layers: Optional[Sequence[int]] = None
    coefficients: Optional[Union[Sequence[float], Mapping[int, float]]] = None
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.entry, SteerEntry):
            raise ValueError(f"entry: expected a SteerEntry, got {type(self.entry).__name__}")
        if self.site not in SITES:
            raise ValueError(f"site: expected one of {SITES}, got {self.site!r}")
        self.layers = _layer_list(self.layers, "layers")
        self.positions = check_positions(self.positions)
        self.coefficients = self._check_coefficients(self.coefficients)
        self.entry = self._normalize_entry(self.entry)

    # ---- validation -------------------------------------------------------
    def _check_coefficients(self, coef):
        if coef is None:
            return None
        if isinstance(coef, Mapping):
            out = {}
            for k, v in coef.items():
                k = layer_index(k, "coefficients")
                out[k] = finite_scalar(v, f"coefficients[{k}]")
            if self.layers is not None and not set(out) <= set(self.layers):
                raise ValueError(f"coefficients: layers {sorted(set(out) - set(self.layers))} "
                                 f"are not in layers {self.layers}")
            return out
        values = [finite_scalar(v, f"coefficients[{i}]") for i, v in enumerate(coef)]
        if self.layers is None:
            # aligned with every layer of the model: checked against it at patch time
            return dict(enumerate(values))
        if len(values) != len(self.layers):
            raise ValueError(f"coefficients: expected {len(self.layers)} values (one per entry of layers), "
                             f"got {len(values)}")
        return dict(zip(self.layers, values))

    def _normalize_entry(self, e: SteerEntry) -> SteerEntry:
        tensors = {n: None if getattr(e, n) is None else float_tensor(getattr(e, n), f"entry.{n}")
                   for n in _ENTRY_TENSORS}
        d = None
        for n in ("vector", "scale", "shift", "condition", "directions"):
            t = tensors[n]
            if t is not None:
                d = t.shape[-1] if t.dim() else None
                break
        if d is None:
            raise ValueError("entry: no component given (directions, vector, scale, shift)")
        vec = tensors["vector"]
        if vec is not None and vec.dim() not in (1, 2):
            raise ValueError(f"entry.vector: expected shape [{d}] or [num_layers, {d}], got {list(vec.shape)}")
        out = SteerEntry(
            directions=tensors["directions"], target=tensors["target"], gain=finite_scalar(e.gain, "entry.gain"),
            vector=vec, alpha=finite_scalar(e.alpha, "entry.alpha"), scale=tensors["scale"],
            shift=tensors["shift"], condition=tensors["condition"], threshold=float(e.threshold),
            preserve_norm=bool(e.preserve_norm))
        if math.isnan(out.threshold):
            raise ValueError("entry.threshold: is NaN")
        # the table checks every shape, orthonormality and finiteness for us
        SteerTable.from_entries([self.layer_entry(0, entry=out)], d)
        return out

    # ---- queries ----------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        e = self.entry
        for n in ("vector", "scale", "shift", "condition", "directions"):
            t = getattr(e, n)
            if t is not None:
                return int(t.shape[-1])
        raise AssertionError("validated entry has a component")

    @property
    def vector_layers(self) -> Optional[int]:
        """``num_layers`` when the vector is per layer (``[num_layers, d]``), else None."""
        v = self.entry.vector
        return int(v.shape[0]) if v is not None and v.dim() == 2 else None

    def resolved_layers(self, num_layers: int) -> List[int]:
        return list(range(num_layers)) if self.layers is None else list(self.layers)

    def coefficient(self, layer: int) -> float:
        return 1.0 if self.coefficients is None else self.coefficients.get(layer, 1.0)

    def layer_entry(self, layer: int, entry: Optional[SteerEntry] = None) -> SteerEntry:
        """The SteerEntry this intervention applies at ``layer`` (coefficient folded in)."""
        e = entry or self.entry
        c = 1.0 if entry is not None else self.coefficient(layer)
        vec = e.vector
        if vec is not None and vec.dim() == 2:
            vec = vec[min(layer, vec.shape[0] - 1)]
        return dataclasses.replace(e, vector=vec, alpha=e.alpha * c, gain=e.gain * c)

    # ---- serialization ----------------------------------------------------
    def _to_saved(self, prefix: str, tensors: Dict[str, Tensor]) -> dict:
        meta = {"site": self.site, "layers": self.layers, "positions": self.positions,
                "coefficients": None if self.coefficients is None
                else {str(k): v for k, v in self.coefficients.items()}}
        for n in _ENTRY_SCALARS:
            meta[n] = getattr(self.entry, n)
        present = []
        for n in _ENTRY_TENSORS:
            t = getattr(self.entry, n)
            if t is not None:
                tensors[f"{prefix}.{n}"] = t.clone()  # safetensors refuses shared storage
                present.append(n)
        meta["tensors"] = present
        return meta

    @classmethod
    def _from_saved(cls, prefix: str, meta: dict, tensors: Dict[str, Tensor]) -> "Intervention":
        kw = {n: tensors[f"{prefix}.{n}"] for n in meta["tensors"]}
        entry = SteerEntry(**kw, **{n: meta[n] for n in _ENTRY_SCALARS})
        return cls(entry=entry, site=meta["site"], layers=meta["layers"],
                   coefficients=meta["coefficients"], positions=meta["positions"])




def check_positions(p) -> Positions:
    if isinstance(p, str):
        if p not in POSITION_MODES:
            raise ValueError(f"positions: expected one of {POSITION_MODES} or an int N >= 0, got {p!r}")
        return p
    if isinstance(p, bool) or not isinstance(p, int) or p < 0:
        raise ValueError(f"positions: expected one of {POSITION_MODES} or an int N >= 0, got {p!r}")
    return int(p)


@dataclasses.dataclass
class SteeringPlan:
    """Interventions to apply, or ``variants``: ``K`` alternative lists of them.

    Give ``interventions`` for one plan for every row, or ``variants`` (build
    them with :meth:`per_row`) for per-row steering.  ``model``,
    ``num_layers`` and ``hidden_size`` are optional and, when set, patching
    checks them against the model.
    """

    interventions: Sequence[Intervention] = ()
    variants: Optional[Sequence[Sequence[Intervention]]] = None
    model: Optional[str] = None
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.variants is not None:
            if len(self.interventions):
                raise ValueError("interventions: give either interventions or variants, not both")
            variants = [list(v) for v in self.variants]
            if not variants:
                raise ValueError("variants: expected at least one variant")
        else:
            variants = [list(self.interventions)]
        for k, v in enumerate(variants):
            for i, iv in enumerate(v):
                if not isinstance(iv, Intervention):
                    raise ValueError(f"variants[{k}][{i}]: expected an Intervention, got {type(iv).__name__}")
        self.variants = variants
        self.interventions = variants[0] if len(variants) == 1 else []
        sizes = {iv.hidden_size for v in variants for iv in v}
        if self.hidden_size is not None:
            sizes.add(int(self.hidden_size))
        if len(sizes) > 1:
            raise ValueError(f"hidden_size: interventions disagree on the hidden size: {sorted(sizes)}")
        if self.hidden_size is None and sizes:
            self.hidden_size = sizes.pop()
        for n in ("num_layers", "hidden_size"):
            val = getattr(self, n)
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"{n}: expected a positive int, got {val!r}")
        if self.num_layers is not None:
            self.check_layers(self.num_layers)

    # ---- construction helpers --------------------------------------------
    @classmethod
    def add(cls, vector, alpha: float = 1.0, *, layers=None, site: str = "pre",
            positions: Positions = "all", coefficients=None, **meta) -> "SteeringPlan":
        """Add ``alpha * vector`` (``[d]`` or ``[num_layers, d]``) at ``site`` of ``layers``."""
        return cls([Intervention(SteerEntry(vector=vector, alpha=alpha), site, layers, coefficients, positions)],
                   **meta)

    @classmethod
    def ablate(cls, directions, *, layers=None, sites: Sequence[str] = SITES,
               positions: Positions = "all", **meta) -> "SteeringPlan":
        """Directional ablation ``h - Q Q^T h`` at every site in ``sites``.

        Ablating at all three sites of every layer removes the direction from
        every write to the residual stream (refusal-direction ablation).
        ``directions`` must be orthonormal rows (see steerkern.orthonormalize).
        """
        return cls([Intervention(SteerEntry(directions=directions), s, layers, None, positions)
                    for s in sites], **meta)

    @classmethod
    def per_row(cls, plans: Sequence["SteeringPlan"], **meta) -> "SteeringPlan":
        """Combine single-variant plans into one with ``len(plans)`` variants.

        Row ``b`` of a batch uses variant ``index[b]``: 0 unsteered, ``j`` is
        ``plans[j - 1]``.
        """
        variants = []
        for i, p in enumerate(plans):
            if not isinstance(p, SteeringPlan) or len(p.variants) != 1:
                raise ValueError(f"plans[{i}]: expected a SteeringPlan with a single variant")
            variants.append(list(p.variants[0]))
        return cls(variants=variants, **meta)

    def __add__(self, other: "SteeringPlan") -> "SteeringPlan":
        if not isinstance(other, SteeringPlan) or len(self.variants) != 1 or len(other.variants) != 1:
            return NotImplemented
        return SteeringPlan(list(self.variants[0]) + list(other.variants[0]), model=self.model or other.model,
                            num_layers=self.num_layers or other.num_layers)

    # ---- queries ----------------------------------------------------------
    @property
    def num_variants(self) -> int:
        return len(self.variants)

    @property
    def is_empty(self) -> bool:
        return not any(self.variants)

    def check_layers(self, num_layers: int) -> None:
        """ValueError if any intervention names a layer outside ``[0, num_layers)``."""
        for k, v in enumerate(self.variants):
            for i, iv in enumerate(v):
                where = f"variants[{k}][{i}]" if len(self.variants) > 1 else f"interventions[{i}]"
                layers = list(iv.layers or []) + list(iv.coefficients or {})
                bad = [layer for layer in layers if layer >= num_layers]
                if bad:
                    raise ValueError(f"{where}.layers: layer {bad[0]} out of range; the model has "
                                     f"{num_layers} layers (0..{num_layers - 1})")
                vl = iv.vector_layers
                if vl is not None and vl != num_layers:
                    raise ValueError(f"{where}.entry.vector: expected shape [{num_layers}, {iv.hidden_size}] "
                                     f"(one row per layer), got [{vl}, {iv.hidden_size}]")

    # ---- serialization ----------------------------------------------------
    def save(self, path) -> None:
        """Write the plan to a safetensors file (tensors + JSON metadata)."""
        from safetensors.torch import save_file

        tensors: Dict[str, Tensor] = {}
        variants = [[iv._to_saved(f"v{k}.i{i}", tensors) for i, iv in enumerate(v)]
                    for k, v in enumerate(self.variants)]
        meta = {"kind": "steering", "version": FORMAT_VERSION, "model": self.model,
                "num_layers": self.num_layers, "hidden_size": self.hidden_size, "variants": variants}
        save_file(tensors, str(path), metadata={"steerkern": json.dumps(meta)})

    @classmethod
    def load(cls, path) -> "SteeringPlan":
        meta, tensors = _load(path, "steering")
        variants = [[Intervention._from_saved(f"v{k}.i{i}", m, tensors) for i, m in enumerate(v)]
                    for k, v in enumerate(meta["variants"])]
        return cls(variants=variants, model=meta["model"], num_layers=meta["num_layers"],
                   hidden_size=meta["hidden_size"])


def _load(path, kind: str):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("steerkern")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if raw is None:
        raise ValueError(f"path: {path} is not a steerkern plan file (no 'steerkern' metadata)")
    meta = json.loads(raw)
    if meta.get("kind") != kind:
        raise ValueError(f"path: {path} holds a {meta.get('kind')!r} plan, expected {kind!r}")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"path: plan format version {meta['version']} is newer than this steerkern "
                         f"({FORMAT_VERSION})")
    return meta, tensors


@dataclasses.dataclass
class SparsityPlan:
    """Per-layer, per-projection thresholds for norm-aware sparse activation.

    * ``thresholds``: ``{layer: {projection: t}}`` with canonical projection
      names (:data:`PROJECTIONS`); a projection that is not listed stays dense.
    * ``mode``: ``"wina"`` (score ``|x_i| * ||W[:, i]||``) or ``"teal"``
      (score ``|x_i|``).
    * ``target``: the sparsity the thresholds were calibrated for (info only).
    * ``model``, ``num_layers``: checked against the model when set.
    * ``prefill``: calls with more than one token per row use the same mask on
      a dense matmul (``"sparse"``, the same math as decode) or no mask at all
      (``"dense"``, as TEAL does for prefill).  Single-token (decode) calls
      always run the sparse kernel.
    * ``lm_head``: a threshold for the input of the model's output head, or
      None to leave the head alone.  ``0.0`` keeps every input: the head is
      then dense but runs through steerkern's GEMV kernel at decode, which on
      CPU reads bf16 weights about twice as fast as torch's matvec.
    """

    thresholds: Mapping[int, Mapping[str, float]]
    mode: str = "wina"
    target: Optional[float] = None
    model: Optional[str] = None
    num_layers: Optional[int] = None
    prefill: str = "sparse"
    lm_head: Optional[float] = None

    def __post_init__(self) -> None:
        if self.mode not in SPARSITY_MODES:
            raise ValueError(f"mode: expected one of {SPARSITY_MODES}, got {self.mode!r}")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"prefill: expected one of {PREFILL_MODES}, got {self.prefill!r}")
        if self.target is not None:
            self.target = finite_scalar(self.target, "target")
            if not 0.0 <= self.target < 1.0:
                raise ValueError(f"target: expected a sparsity in [0, 1), got {self.target}")
        if self.num_layers is not None and (isinstance(self.num_layers, bool)
                                            or not isinstance(self.num_layers, int) or self.num_layers < 1):
            raise ValueError(f"num_layers: expected a positive int, got {self.num_layers!r}")
        if self.lm_head is not None:
            self.lm_head = finite_scalar(self.lm_head, "lm_head")
            if self.lm_head < 0:
                raise ValueError(f"lm_head: a threshold must be >= 0, got {self.lm_head}")
        if not isinstance(self.thresholds, Mapping):
            raise ValueError("thresholds: expected a {layer: {projection: threshold}} mapping")
        out: Dict[int, Dict[str, float]] = {}
        for layer, per in self.thresholds.items():
            layer = layer_index(layer, "thresholds")
            if self.num_layers is not None and layer >= self.num_layers:
                raise ValueError(f"thresholds: layer {layer} out of range for num_layers={self.num_layers}")
            if not isinstance(per, Mapping):
                raise ValueError(f"thresholds[{layer}]: expected a {{projection: threshold}} mapping")
            row = {}
            for proj, t in per.items():
                if proj not in PROJECTIONS:
                    raise ValueError(f"thresholds[{layer}]: unknown projection {proj!r}; expected one of "
                                     f"{PROJECTIONS}")
                t = finite_scalar(t, f"thresholds[{layer}][{proj}]")
                if t < 0:
                    raise ValueError(f"thresholds[{layer}][{proj}]: must be >= 0, got {t}")
                row[proj] = t
            out[layer] = row
        self.thresholds = out

    @classmethod
    def uniform(cls, threshold: float, num_layers: int, *, mode: str = "wina",
                projections: Sequence[str] = PROJECTIONS, layers: Optional[Sequence[int]] = None,
                **kw) -> "SparsityPlan":
        """One threshold for ``projections`` of ``layers`` (default: all layers)."""
        layers = range(num_layers) if layers is None else _layer_list(layers, "layers")
        return cls({layer: {p: threshold for p in projections} for layer in layers}, mode=mode,
                   num_layers=num_layers, **kw)

    @property
    def is_empty(self) -> bool:
        return not any(self.thresholds.values()) and self.lm_head is None

    def threshold(self, layer: int, projection: str) -> Optional[float]:
        return self.thresholds.get(layer, {}).get(projection)

    def save(self, path) -> None:
        """Write the plan to a safetensors file: thresholds as an fp64 ``[L, 7]``
        tensor (NaN: dense), the rest as JSON metadata."""
        from safetensors.torch import save_file

        n = max([*self.thresholds, -1]) + 1
        t = torch.full((max(n, 1), len(PROJECTIONS)), math.nan, dtype=torch.float64)
        for layer, per in self.thresholds.items():
            for p, v in per.items():
                t[layer, PROJECTIONS.index(p)] = v
        meta = {"kind": "sparsity", "version": FORMAT_VERSION, "mode": self.mode, "target": self.target,
                "model": self.model, "num_layers": self.num_layers, "prefill": self.prefill,
                "lm_head": self.lm_head, "projections": list(PROJECTIONS)}
        save_file({"thresholds": t}, str(path), metadata={"steerkern": json.dumps(meta)})

    @classmethod
    def load(cls, path) -> "SparsityPlan":
        meta, tensors = _load(path, "sparsity")
        t = tensors["thresholds"]
        names = meta["projections"]
        thresholds = {}
        for layer in range(t.shape[0]):
            row = {names[j]: float(t[layer, j]) for j in range(t.shape[1]) if not math.isnan(float(t[layer, j]))}
            if row:
                thresholds[layer] = row
        return cls(thresholds, mode=meta["mode"], target=meta["target"], model=meta["model"],
                   num_layers=meta["num_layers"], prefill=meta.get("prefill", "sparse"),
                   lm_head=meta.get("lm_head"))
