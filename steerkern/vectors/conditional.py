"""Conditional steering in the style of CAST (Lee et al., "Programming Refusal
with Conditional Activation Steering", 2024): steer only where the hidden
state points along a condition direction, ``cos(h, u) > threshold``.

Two forms:

* **per token**, fused into the steer op: the entry's ``condition`` and
  ``threshold`` (:class:`~steerkern.ops.table.SteerEntry`) make the kernel
  test each row of the stream it steers and leave the rows that fail
  bit-exact.  :func:`conditional_plan` builds such a plan from a
  :class:`VectorSet` and per-layer :class:`Condition` s.
* **per prompt**: :func:`gate_prompts` reads each prompt once at the
  condition's layer, decides, and sets the patched model's per-row variant
  index (0: unsteered, 1: steered), which then holds for every token of that
  row, prompt and generated.

:func:`fit_condition` finds a condition from activations of prompts that
should and should not trigger steering: the direction is the difference of
the mean unit activations, and the threshold the cosine that best separates
the two sets (highest balanced accuracy, midway between neighbouring values).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .vectorset import STREAM_SITES, VectorSet


@dataclasses.dataclass
class Condition:
    """Steer where ``cos(h, direction) > threshold`` on the stream at ``site`` of ``layer``."""

    direction: Tensor
    threshold: float
    layer: int
    site: str = "post_mlp"
    accuracy: Optional[float] = None  # balanced accuracy on the prompts it was fit on

    def __post_init__(self) -> None:
        u = torch.as_tensor(self.direction).detach().to("cpu", torch.float32).flatten()
        n = float(u.norm()) if u.numel() else 0.0
        if not bool(torch.isfinite(u).all()) or n == 0.0:
            raise ValueError("direction: expected a finite nonzero vector [d]")
        self.direction = u / n
        self.threshold = float(self.threshold)
        if self.threshold != self.threshold:
            raise ValueError("threshold: is NaN")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer: expected a layer index, got {self.layer!r}")
        if self.site not in STREAM_SITES:
            raise ValueError(f"site: expected one of {STREAM_SITES}, got {self.site!r}")

    def cosine(self, h: Tensor) -> Tensor:
        """``cos(h, u)`` per row of ``h`` ``[..., d]`` in fp32 (0 for a zero row), as the kernel takes it."""
        hf = h.float()
        norm = hf.norm(dim=-1)
        cos = (hf @ self.direction.to(h.device)) / norm.clamp_min(1e-30)
        return torch.where(norm > 0, cos, torch.zeros_like(cos))

    def passes(self, h: Tensor) -> Tensor:
        return self.cosine(h) > self.threshold


def fit_condition(positive: Tensor, negative: Tensor, *, layer: int, site: str = "post_mlp") -> Condition:
    """A condition that passes ``positive`` activations ``[n_p, d]`` and fails
    ``negative`` ones ``[n_n, d]`` (see the module doc)."""
    p, n = torch.as_tensor(positive).double(), torch.as_tensor(negative).double()
    if p.dim() != 2 or n.dim() != 2 or p.shape[1] != n.shape[1] or not len(p) or not len(n):
        raise ValueError(f"positive, negative: expected shapes [n_p, d] and [n_n, d], got {list(p.shape)} "
                         f"and {list(n.shape)}")
    unit = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)  # noqa: E731
    u = unit(p).mean(0) - unit(n).mean(0)
    if float(u.norm()) == 0.0:
        raise ValueError("positive, negative: the two sets have the same mean direction; no condition separates them")
    u = u / u.norm()
    cp, cn = unit(p) @ u, unit(n) @ u
    values = torch.sort(torch.cat([cp, cn])).values
    cands = torch.cat([values[:1] - 1e-6, (values[1:] + values[:-1]) / 2])
    tpr = (cp[None, :] > cands[:, None]).double().mean(1)
    tnr = (cn[None, :] <= cands[:, None]).double().mean(1)
    bal = (tpr + tnr) / 2
    best = int(bal.argmax())
    return Condition(u.float(), float(cands[best]), layer, site, float(bal[best]))


def conditional_plan(vectors: VectorSet, conditions: Union[Condition, Mapping[int, Condition]],
                     alpha: float = 1.0, *, positions="all", normalize: bool = False):
    """A :class:`~steerkern.plan.SteeringPlan` adding ``alpha * v_L`` at each
    layer ``L`` of ``vectors``, only on tokens whose stream there passes the
    condition (per-token CAST, fused in the steer op).  ``conditions`` is one
    Condition for every layer, or ``{layer: Condition}`` covering them all;
    each is tested on the stream it steers, so it must be fit at that site."""
    from ..ops.table import SteerEntry
    from ..plan import Intervention, SteeringPlan

    if isinstance(conditions, Condition):
        conditions = {layer: conditions for layer in vectors.layers}
    missing = [layer for layer in vectors.layers if layer not in conditions]
    if missing:
        raise ValueError(f"conditions: no condition for layers {missing}")
    src = vectors.normalized() if normalize else vectors
    ivs = []
    for layer, v in src:
        c = conditions[layer]
        if c.site != vectors.site:
            raise ValueError(f"conditions[{layer}]: fit at site {c.site!r}, but the vectors steer {vectors.site!r}")
        if c.direction.numel() != vectors.hidden_size:
            raise ValueError(f"conditions[{layer}]: direction has shape [{c.direction.numel()}], expected "
                             f"[{vectors.hidden_size}]")
        entry = SteerEntry(vector=v, alpha=alpha, condition=c.direction, threshold=c.threshold)
        ivs.append(Intervention(entry, site=vectors.site, layers=[layer], positions=positions))
    return SteeringPlan(ivs, model=vectors.model_id or None, num_layers=vectors.num_layers,
                        hidden_size=vectors.hidden_size)


def gate_prompts(model, tokenizer, prompts: Sequence[str], condition: Condition, *, handle=None, on: int = 1,
                 position: str = "mean", chat_template: bool = False, system_prompt: Optional[str] = None,
                 max_length: Optional[int] = None) -> Tensor:
    """Per-prompt CAST: int32 ``[len(prompts)]``, ``on`` where the prompt's
    activation at the condition's layer passes, else 0.

    The activation is read with steering off (the handle's variants are
    zeroed for that one pass), and when ``handle`` (the patch handle of
    ``model``) is given, the result becomes its per-row variant index for the
    calls that follow: pass the same prompts, in the same order, to generate.
    """
    from .extract import collect_activations

    prompts = list(prompts)
    if handle is not None:
        saved = handle.tracker.variant_rows
        handle.set_variants(torch.zeros(len(prompts), dtype=torch.int32))
    try:
        acts = collect_activations(model, tokenizer, prompts, [condition.layer], site=condition.site,
                                   position=position, chat_template=chat_template, system_prompt=system_prompt,
                                   batch_size=max(len(prompts), 1), max_length=max_length, progress=False)
    finally:
        if handle is not None:
            handle.tracker.variant_rows = saved
    index = torch.where(condition.passes(acts[condition.layer]), on, 0).to(torch.int32)
    if handle is not None:
        handle.set_variants(index)
    return index


def per_layer_conditions(positive: Dict[int, Tensor], negative: Dict[int, Tensor],
                         site: str = "post_mlp") -> Dict[int, Condition]:
    """:func:`fit_condition` at every layer of ``{layer: activations}`` pairs
    (from :func:`~steerkern.vectors.extract.collect_activations`)."""
    return {layer: fit_condition(positive[layer], negative[layer], layer=layer, site=site) for layer in positive}
