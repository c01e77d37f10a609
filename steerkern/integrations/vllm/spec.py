"""The request format of per-request steering, and the vectors registered at start-up.

A request asks for steering with flat keys in ``SamplingParams.extra_args``
(offline) or ``vllm_xargs`` (the OpenAI-compatible server's extra request
field, whose values are strings, numbers or lists of them):

=================  ==========================================================
key                value
=================  ==========================================================
``steer_vectors``  names of vectors registered at start-up, or their indices
                   in :attr:`SteeringLibrary.vector_names` (sorted names)
``steer_coefs``    one coefficient per vector, or one for all (default 1)
``steer_vector``   an inline vector of ``hidden_size`` numbers (coefficient 1)
``steer_layers``   the layers the summed vector is added at (default: all)
``steer_site``     ``pre``, ``post_attn`` or ``post_mlp`` (default ``pre``)
``steer_positions`` ``all``, ``prompt``, ``generated`` or an int N (default
                   ``all``); see :mod:`steerkern.plan`
``steer_plan``     the name or index of a :class:`~steerkern.plan.SteeringPlan`
                   registered at start-up; its interventions run first
=================  ==========================================================

The named vectors and the inline one are summed, ``sum_i c_i v_i``, into one
additive intervention.  A request is thus a single-variant steering plan, the
same plan that :func:`steerkern.patch` runs on a transformers model.

Registered at start-up, in every vLLM process, from the ``steerkern`` entry of
vLLM's ``--additional-config`` or else from environment variables:

* ``vectors`` / ``STEERKERN_VLLM_VECTORS``: a safetensors file of named
  vectors, each ``[hidden_size]`` or ``[num_layers, hidden_size]``;
* ``plans`` / ``STEERKERN_VLLM_PLANS``: steering plan files saved with
  :meth:`SteeringPlan.save`, as ``name=path`` items separated by ``,``
  (a bare path is named by its file stem); indices follow this order.

This module does not import vLLM.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from ...ops.table import SteerEntry, float_tensor
from ...plan import SITES, Intervention, SteeringPlan, check_positions

KEYS = ("steer_vectors", "steer_coefs", "steer_vector", "steer_layers", "steer_site",
        "steer_positions", "steer_plan")
VECTORS_ENV = "STEERKERN_VLLM_VECTORS"
PLANS_ENV = "STEERKERN_VLLM_PLANS"
CONFIG_KEY = "steerkern"


def has_steering(extra_args: Optional[Mapping[str, Any]]) -> bool:
    """Whether a request's extra arguments ask for steering (cheap, no validation).

    Any ``steer_`` key counts, so that a misspelt key is rejected rather than ignored."""
    return bool(extra_args) and any(isinstance(k, str) and k.startswith("steer_") for k in extra_args)


def fingerprint(extra_args: Mapping[str, Any]) -> str:
    """A stable digest of a request's steering keys.

    Used as the request's prefix-cache salt: KV computed under one steering
    must never be reused by a request with another (or none).
    """
    picked = {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith("steer_")}
    raw = json.dumps(picked, sort_keys=True, separators=(",", ":"), default=str)
    return "steerkern:" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def _as_key(key: str, check: Callable, value):
    """``check(value)``, its ValueError renamed for the request key ``key``."""
    try:
        return check(value)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    return f


@dataclasses.dataclass
class SteeringLibrary:
    """Vectors and plans registered at start-up; turns requests into plans."""

    vectors: Dict[str, Tensor] = dataclasses.field(default_factory=dict)
    plans: Dict[str, SteeringPlan] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        out = {}
        for name, v in self.vectors.items():
            t = float_tensor(v, f"vectors[{name!r}]")
            if t.dim() not in (1, 2) or t.shape[-1] == 0:
                raise ValueError(f"vectors[{name!r}]: expected shape [hidden_size] or "
                                 f"[num_layers, hidden_size], got {list(t.shape)}")
            out[str(name)] = t
        self.vectors = dict(sorted(out.items()))
        for name, p in self.plans.items():
            if not isinstance(p, SteeringPlan) or p.num_variants != 1:
                raise ValueError(f"plans[{name!r}]: expected a SteeringPlan with a single variant")

    @property
    def vector_names(self) -> List[str]:
        return list(self.vectors)

    @property
    def plan_names(self) -> List[str]:
        return list(self.plans)

    @classmethod
    def from_config(cls, additional_config: Optional[Mapping[str, Any]] = None) -> "SteeringLibrary":
        """Load what vLLM's ``--additional-config`` or the environment names."""
        conf = dict((additional_config or {}).get(CONFIG_KEY) or {})
        vec_path = conf.get("vectors") or os.environ.get(VECTORS_ENV) or None
        plans = conf.get("plans") or os.environ.get(PLANS_ENV) or None
        vectors = _load_vectors(vec_path) if vec_path else {}
        return cls(vectors=vectors, plans=_load_plans(plans) if plans else {})

    # ---- requests ----------------------------------------------------------
    def parse(self, extra_args: Optional[Mapping[str, Any]], num_layers: int,
              hidden_size: int) -> List[Intervention]:
        """The interventions a request asks for (empty: none); ValueError naming
        the request key when the request is malformed."""
        if not has_steering(extra_args):
            return []
        unknown = sorted(k for k in extra_args if k.startswith("steer_") and k not in KEYS)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown steering key; known keys are {list(KEYS)}")
        out: List[Intervention] = []
        if "steer_plan" in extra_args:
            out += self._plan(extra_args["steer_plan"]).variants[0]
        vector = self._vector_sum(extra_args, num_layers, hidden_size)
        if vector is not None:
            site = extra_args.get("steer_site", "pre")
            if site not in SITES:
                raise ValueError(f"steer_site: expected one of {list(SITES)}, got {site!r}")
            layers = extra_args.get("steer_layers")
            if layers is not None:
                layers = _as_list(layers)
                for layer in layers:
                    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
                        raise ValueError(f"steer_layers: expected layer indices in [0, {num_layers}), "
                                         f"got {layer!r}")
            positions = _as_key("steer_positions", check_positions, extra_args.get("steer_positions", "all"))
            out.append(Intervention(SteerEntry(vector=vector, alpha=1.0), site=site, layers=layers,
                                    positions=positions))
        elif any(k in extra_args for k in ("steer_layers", "steer_site", "steer_positions", "steer_coefs")):
            raise ValueError("steer_vectors: steer_layers/site/positions/coefs given without "
                             "steer_vectors or steer_vector")
        if out:
            # a registered plan made for another model fails here
            plan = _as_key("steer_plan", lambda ivs: SteeringPlan(ivs, hidden_size=hidden_size), out)
            plan.check_layers(num_layers)
        return out

    def _plan(self, ref) -> SteeringPlan:
        names = self.plan_names
        if isinstance(ref, int) and not isinstance(ref, bool):
            if not 0 <= ref < len(names):
                raise ValueError(f"steer_plan: index {ref} out of range; {len(names)} plans are "
                                 f"registered: {names}")
            return self.plans[names[ref]]
        if isinstance(ref, str) and ref in self.plans:
            return self.plans[ref]
        raise ValueError(f"steer_plan: unknown plan {ref!r}; registered plans: {names}")

    def _vector_sum(self, args: Mapping[str, Any], num_layers: int, d: int) -> Optional[Tensor]:
        parts = []
        if "steer_vectors" in args:
            refs = _as_list(args["steer_vectors"])
            if not refs:
                raise ValueError("steer_vectors: expected at least one vector name")
            coefs = _as_list(args.get("steer_coefs", 1.0))
            if len(coefs) == 1:
                coefs = coefs * len(refs)
            if len(coefs) != len(refs):
                raise ValueError(f"steer_coefs: expected 1 or {len(refs)} coefficients (one per vector), "
                                 f"got {len(coefs)}")
            for i, (ref, c) in enumerate(zip(refs, coefs)):
                parts.append((self._named(ref, i, num_layers, d), _number(c, f"steer_coefs[{i}]")))
        if "steer_vector" in args:
            raw = _as_list(args["steer_vector"])
            if len(raw) != d:
                raise ValueError(f"steer_vector: expected {d} numbers (the model's hidden size), got {len(raw)}")
            vals = [_number(x, f"steer_vector[{i}]") for i, x in enumerate(raw)]
            parts.append((torch.tensor(vals, dtype=torch.float32), 1.0))
        if not parts:
            return None
        per_layer = any(v.dim() == 2 for v, _ in parts)
        total = torch.zeros((num_layers, d) if per_layer else (d,), dtype=torch.float32)
        for v, c in parts:
            total += c * v  # a [d] vector broadcasts over the layers
        return total

    def _named(self, ref, i: int, num_layers: int, d: int) -> Tensor:
        names = self.vector_names
        if isinstance(ref, int) and not isinstance(ref, bool):
            if not 0 <= ref < len(names):
                raise ValueError(f"steer_vectors[{i}]: index {ref} out of range; {len(names)} vectors "
                                 f"are registered: {names}")
            ref = names[ref]
        if not isinstance(ref, str) or ref not in self.vectors:
            raise ValueError(f"steer_vectors[{i}]: unknown vector {ref!r}; registered vectors: {names}")
        v = self.vectors[ref]
        want = [d] if v.dim() == 1 else [num_layers, d]
        if list(v.shape) != want:
            raise ValueError(f"steer_vectors[{i}]: vector {ref!r} has shape {list(v.shape)}, expected "
                             f"[{d}] or [{num_layers}, {d}] for this model")
        return v


def _load_vectors(path) -> Dict[str, Tensor]:
    from safetensors import safe_open

    p = pathlib.Path(path)
    if not p.is_file():
        raise ValueError(f"{VECTORS_ENV}: no such file: {p}")
    with safe_open(str(p), framework="pt") as f:  # safetensors: never unpickles
        return {k: f.get_tensor(k) for k in f.keys()}


def _load_plans(spec) -> Dict[str, SteeringPlan]:
    items = spec.items() if isinstance(spec, Mapping) else (
        (None, s) for s in (spec.split(",") if isinstance(spec, str) else spec))
    out: Dict[str, SteeringPlan] = {}
    for name, item in items:
        item = str(item).strip()
        if not item:
            continue
        if name is None:
            name, _, path = item.rpartition("=") if "=" in item else (pathlib.Path(item).stem, "", item)
        else:
            path = item
        out[str(name)] = SteeringPlan.load(path)
    return out
