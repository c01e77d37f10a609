"""A set of steering vectors, one per layer, with the metadata to use it.

``VectorSet.vectors`` maps a layer index to a ``[d]`` fp32 vector (CPU).  The
vector of layer ``L`` lives on the residual stream at ``site`` of that layer
(see :mod:`steerkern.plan`): ``"post_mlp"`` (the block's output, the default,
and what llama.cpp control vectors and repeng use: ``direction.L`` is added
to the output of block ``L``) or ``"pre"`` (the block's input).  Both sites
name the same stream between blocks: ``pre`` of layer ``L + 1`` is
``post_mlp`` of layer ``L``, and :meth:`VectorSet.at_site` converts.

Arithmetic works layer by layer on the union of layers (a missing layer
counts as zero): ``a + b``, ``a - b``, ``2.0 * a``, ``-a``, ``a / 4``;
:func:`compose` sums several sets with per-layer coefficients.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..ops.table import finite_scalar, float_tensor
from ..plan import SITES, layer_index

STREAM_SITES = ("pre", "post_mlp")

Coefficients = Union[float, Mapping[int, float]]


def _as_vector(value, name: str) -> Tensor:
    t = float_tensor(value, name)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name}: expected shape [d], got {list(t.shape)}")
    return t


@dataclasses.dataclass
class VectorSet:
    """Per-layer steering vectors (see the module doc).

    * ``vectors``: ``{layer: [d]}``; converted to fp32 CPU tensors, sorted.
    * ``hidden_size``: ``d`` (inferred from the vectors when None).
    * ``num_layers``: the model's number of layers, when known.
    * ``model_id``: the model the vectors were extracted from (a hub id or path).
    * ``model_type``: its ``config.model_type`` (GGUF ``controlvector.model_hint``).
    * ``method``: how they were made (``mean_diff``, ``pca_diff``, ...).
    * ``site``: where on the residual stream they live.
    * ``metadata``: any other JSON-serializable facts (positions, counts, ...).
    """

    vectors: Mapping[int, Any]
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    model_id: str = ""
    model_type: str = ""
    method: str = ""
    site: str = "post_mlp"
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.vectors, Mapping):
            raise ValueError("vectors: expected a {layer: vector} mapping")
        vecs = {}
        for k, v in self.vectors.items():
            layer = layer_index(k, "vectors")
            if layer in vecs:
                raise ValueError(f"vectors: layer {layer} given twice")
            vecs[layer] = _as_vector(v, f"vectors[{layer}]")
        sizes = {v.numel() for v in vecs.values()}
        if self.hidden_size is not None:
            if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int) or self.hidden_size < 1:
                raise ValueError(f"hidden_size: expected a positive int, got {self.hidden_size!r}")
            sizes.add(self.hidden_size)
        if len(sizes) > 1:
            raise ValueError(f"vectors: expected every vector to have shape [{self.hidden_size or min(sizes)}], "
                             f"got sizes {sorted(sizes)}")
        if not sizes:
            raise ValueError("vectors: empty, and no hidden_size given")
        self.hidden_size = sizes.pop()
        self.vectors = dict(sorted(vecs.items()))
        if self.num_layers is not None:
            if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
                raise ValueError(f"num_layers: expected a positive int, got {self.num_layers!r}")
            bad = [layer for layer in self.vectors if layer >= self.num_layers]
            if bad:
                raise ValueError(f"vectors: layer {bad[0]} out of range for num_layers={self.num_layers}")
        if self.site not in SITES:
            raise ValueError(f"site: expected one of {SITES}, got {self.site!r}")
        for name in ("model_id", "model_type", "method"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a str, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.metadata, dict):
            raise ValueError("metadata: expected a dict")

    # ---- construction ---------------------------------------------------
    @classmethod
    def from_tensor(cls, tensor: Tensor, layers: Optional[Sequence[int]] = None, **kw) -> "VectorSet":
        """From a ``[n, d]`` tensor whose row ``i`` is layer ``layers[i]`` (default ``0..n-1``)."""
        t = torch.as_tensor(tensor)
        if t.dim() != 2:
            raise ValueError(f"tensor: expected shape [n, d], got {list(t.shape)}")
        layers = list(range(t.shape[0])) if layers is None else [layer_index(x, "layers") for x in layers]
        if len(layers) != t.shape[0]:
            raise ValueError(f"layers: expected {t.shape[0]} entries (one per row of tensor), got {len(layers)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers: repeated layer indices in {layers}")
        return cls(dict(zip(layers, t)), **kw)

    # ---- queries --------------------------------------------------------
    @property
    def layers(self) -> List[int]:
        return list(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    def __contains__(self, layer) -> bool:
        return layer in self.vectors

    def __getitem__(self, layer: int) -> Tensor:
        try:
            return self.vectors[layer]
        except KeyError:
            raise KeyError(f"layer {layer} is not in this vector set (layers {self.layers})") from None

    def __iter__(self):
        return iter(self.vectors.items())

    def to_tensor(self, layers: Optional[Iterable[int]] = None) -> Tensor:
        """``[n, d]``: the vectors of ``layers`` (default: all, ascending)."""
        layers = self.layers if layers is None else list(layers)
        if not layers:
            return torch.zeros(0, self.hidden_size)
        return torch.stack([self[layer] for layer in layers])

    def dense(self, num_layers: Optional[int] = None) -> Tensor:
        """``[num_layers, d]`` with zero rows for the layers the set lacks."""
        n = num_layers or self.num_layers or (max(self.layers) + 1 if self.layers else 0)
        out = torch.zeros(n, self.hidden_size)
        for layer, v in self:
            if layer >= n:
                raise ValueError(f"num_layers: {n} is too small for layer {layer}")
            out[layer] = v
        return out

    def norms(self) -> Dict[int, float]:
        return {layer: float(v.norm()) for layer, v in self}

    def direction(self, layer: int) -> Tensor:
        """The unit vector of ``layer``."""
        v = self[layer]
        n = float(v.norm())
        if n == 0.0:
            raise ValueError(f"layer {layer}: the vector is zero and has no direction")
        return v / n

    def cosine(self, other: "VectorSet") -> Dict[int, float]:
        """Cosine similarity per layer, on the layers both sets have."""
        self._check_compatible(other)
        out = {}
        for layer in self.layers:
            if layer in other:
                a, b = self[layer].double(), other[layer].double()
                den = float(a.norm() * b.norm())
                out[layer] = float(a @ b) / den if den > 0 else 0.0
        return out

    # ---- derived sets ---------------------------------------------------
    def replace(self, vectors: Mapping[int, Tensor], **changes) -> "VectorSet":
        """A copy with other vectors (and optionally other metadata)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "vectors"}
        kw["metadata"] = dict(self.metadata)
        kw.update(changes)
        return VectorSet(dict(vectors), **kw)

    def select(self, layers: Iterable[int]) -> "VectorSet":
        """The vectors of ``layers`` only."""
        return self.replace({layer: self[layer] for layer in layers})

    def normalized(self) -> "VectorSet":
        """Every vector scaled to unit norm (zero vectors stay zero)."""
        return self.replace({layer: v / n if (n := float(v.norm())) > 0 else v for layer, v in self})

    def scaled(self, coefficients: Coefficients) -> "VectorSet":
        """Multiply by a number, or per layer by ``{layer: coefficient}``.

        With a mapping, the result holds exactly the layers it names (a layer
        of the set that the mapping omits is dropped; naming a layer the set
        lacks is an error): per-layer coefficients choose the layers too.
        """
        if isinstance(coefficients, Mapping):
            out = {}
            for k, c in coefficients.items():
                layer = layer_index(k, "coefficients")
                out[layer] = self[layer] * finite_scalar(c, f"coefficients[{layer}]")
            return self.replace(out)
        c = finite_scalar(coefficients, "coefficients")
        return self.replace({layer: v * c for layer, v in self})

    def at_site(self, site: str) -> "VectorSet":
        """The same stream vectors named at another site: ``pre`` of layer
        ``L + 1`` is ``post_mlp`` of layer ``L``.  A vector with no layer at the
        new site (``pre`` of layer 0, ``post_mlp`` of the last layer) is an error."""
        if site == self.site:
            return self
        if {site, self.site} != set(STREAM_SITES):
            raise ValueError(f"site: can only convert between {STREAM_SITES}, not {self.site!r} -> {site!r}")
        shift = -1 if site == "post_mlp" else 1
        out = {}
        for layer, v in self:
            new = layer + shift
            if new < 0 or (self.num_layers is not None and new >= self.num_layers):
                where = "the embeddings (pre of layer 0)" if new < 0 else "the final block's output"
                raise ValueError(f"site: layer {layer} at {self.site!r} is {where}, which has no layer at {site!r}")
            out[new] = v
        return self.replace(out, site=site)

    # ---- arithmetic -----------------------------------------------------
    def _check_compatible(self, other: "VectorSet") -> None:
        if not isinstance(other, VectorSet):
            raise ValueError(f"other: expected a VectorSet, got {type(other).__name__}")
        if other.hidden_size != self.hidden_size:
            raise ValueError(f"other: hidden size {other.hidden_size} differs from {self.hidden_size}")
        if other.site != self.site:
            raise ValueError(f"other: vectors live at site {other.site!r}, these at {self.site!r}; "
                             "convert one with at_site()")
        if self.model_id and other.model_id and self.model_id != other.model_id:
            warnings.warn(f"combining vectors of different models: {self.model_id!r} and {other.model_id!r}",
                          stacklevel=3)

    def _combine(self, other: "VectorSet", c: float) -> "VectorSet":
        self._check_compatible(other)
        out = dict(self.vectors)
        for layer, v in other:
            out[layer] = out[layer] + c * v if layer in out else c * v
        methods = [m for m in (self.method, other.method) if m]
        return self.replace(out, method="+".join(dict.fromkeys(methods)),
                            num_layers=self.num_layers or other.num_layers)

    def __add__(self, other):
        if not isinstance(other, VectorSet):
            return NotImplemented
        return self._combine(other, 1.0)

    def __sub__(self, other):
        if not isinstance(other, VectorSet):
            return NotImplemented
        return self._combine(other, -1.0)

    def __mul__(self, c):
        if isinstance(c, (VectorSet, Mapping)):
            return NotImplemented
        return self.scaled(c)

    __rmul__ = __mul__

    def __truediv__(self, c):
        c = finite_scalar(c, "divisor")
        if c == 0.0:
            raise ValueError("divisor: division by zero")
        return self.scaled(1.0 / c)

    def __neg__(self):
        return self.scaled(-1.0)

    def __eq__(self, other) -> bool:
        if not isinstance(other, VectorSet):
            return NotImplemented
        return (self.layers == other.layers and all(torch.equal(self[k], other[k]) for k in self.layers)
                and all(getattr(self, f.name) == getattr(other, f.name)
                        for f in dataclasses.fields(self) if f.name != "vectors"))

    # ---- into plans -----------------------------------------------------
    def to_plan(self, alpha: float = 1.0, *, positions="all", normalize: bool = False,
                preserve_norm: bool = False):
        """A :class:`steerkern.plan.SteeringPlan` adding ``alpha * v_L`` at
        ``site`` of each layer ``L`` of the set (``normalize``: unit vectors)."""
        from ..ops.table import SteerEntry
        from ..plan import Intervention, SteeringPlan

        src = self.normalized() if normalize else self
        ivs = [Intervention(SteerEntry(vector=v, alpha=alpha, preserve_norm=preserve_norm),
                            site=self.site, layers=[layer], positions=positions)
               for layer, v in src if float(v.abs().max()) > 0]
        if not ivs:
            raise ValueError("vectors: every vector is zero; nothing to steer")
        return SteeringPlan(ivs, model=self.model_id or None, num_layers=self.num_layers,
                            hidden_size=self.hidden_size)

    def ablation_plan(self, layer: Optional[int] = None, *, layers=None, sites: Sequence[str] = SITES,
                      positions="all"):
        """A plan ablating one direction (that of ``layer``; default: the only
        layer of the set) at ``sites`` of ``layers`` (default: every layer):
        refusal-direction-style directional ablation."""
        from ..plan import SteeringPlan

        if layer is None:
            if len(self) != 1:
                raise ValueError(f"layer: the set has layers {self.layers}; say which direction to ablate")
            layer = self.layers[0]
        return SteeringPlan.ablate(self.direction(layer)[None], layers=layers, sites=sites, positions=positions,
                                   model=self.model_id or None, num_layers=self.num_layers,
                                   hidden_size=self.hidden_size)

    def save(self, path, format: Optional[str] = None) -> None:
        """Write to ``.safetensors`` or ``.gguf`` (see :mod:`steerkern.vectors.io`)."""
        from .io import save

        save(self, path, format)

    @staticmethod
    def load(path) -> "VectorSet":
        """Read a safetensors or GGUF vector file (never unpickles)."""
        from .io import load

        return load(path)

    def describe(self) -> Dict[str, Any]:
        """The JSON-serializable facts (everything but the tensors)."""
        return {"model_id": self.model_id, "model_type": self.model_type, "method": self.method,
                "site": self.site, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "layers": self.layers, "metadata": self.metadata}

    def __repr__(self) -> str:
        layers = self.layers
        shown = layers if len(layers) <= 8 else layers[:3] + ["..."] + layers[-3:]
        return (f"VectorSet(method={self.method!r}, model={self.model_id or self.model_type!r}, "
                f"d={self.hidden_size}, site={self.site!r}, layers={shown})")


def compose(terms: Sequence[Tuple[VectorSet, Coefficients]]) -> VectorSet:
    """``sum_i c_i * v_i`` over ``(vector_set, coefficients)`` terms, where each
    coefficient is a number or a ``{layer: coefficient}`` mapping (see
    :meth:`VectorSet.scaled`: a mapping also chooses the layers of its term)."""
    terms = list(terms)
    if not terms:
        raise ValueError("terms: expected at least one (VectorSet, coefficients) pair")
    out = None
    for i, term in enumerate(terms):
        if not (isinstance(term, tuple) and len(term) == 2 and isinstance(term[0], VectorSet)):
            raise ValueError(f"terms[{i}]: expected a (VectorSet, coefficients) pair")
        scaled = term[0].scaled(term[1])
        out = scaled if out is None else out + scaled
    return out


