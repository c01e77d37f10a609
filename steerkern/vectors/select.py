"""Choose a direction by what it does, in the style of refusal-direction
selection (Arditi et al., "Refusal in Language Models Is Mediated by a Single
Direction", 2024).

Every candidate (one vector per layer of a :class:`VectorSet`, e.g. the
mean differences at all layers) is applied to the model in turn with
:func:`steerkern.patch`, either

* ``mode="ablate"``: its direction ablated at every site of every layer, or
* ``mode="add"``: ``alpha`` times the vector added at its own layer,

and a metric the caller gives is measured on the patched model.  The metric
is any ``model -> number`` (or ``model -> {name: number}``, ranked by
``score_key``), e.g. the mean log-odds of refusal tokens on harmful prompts;
:func:`next_token_score` builds that common one.  ``keep`` filters candidates
(e.g. a KL bound measured in the same metric dict), and the survivors are
ranked best first.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..patching.registry import model_device
from .vectorset import VectorSet

Metric = Callable[[nn.Module], Union[float, Mapping[str, float]]]
MODES = ("ablate", "add")


@dataclasses.dataclass
class Candidate:
    layer: int
    vector: Tensor  # as in the candidate set
    score: float
    metrics: Dict[str, float]


@dataclasses.dataclass
class Selection:
    baseline: Dict[str, float]   # the metric of the unpatched model
    ranked: List[Candidate]      # kept candidates, best first
    rejected: List[Candidate]    # candidates that ``keep`` refused

    @property
    def best(self) -> Candidate:
        if not self.ranked:
            raise ValueError("selection: every candidate was rejected by keep")
        return self.ranked[0]


def _as_metrics(value, score_key: str) -> Dict[str, float]:
    if isinstance(value, Mapping):
        out = {str(k): float(v) for k, v in value.items()}
        if score_key not in out:
            raise ValueError(f"metric: returned {sorted(out)}, which lacks score_key {score_key!r}")
        return out
    try:
        return {score_key: float(value)}
    except (TypeError, ValueError):
        raise ValueError(f"metric: expected a number or a mapping of numbers, got {type(value).__name__}") from None


def select_direction(model: nn.Module, candidates: VectorSet, metric: Metric, *, mode: str = "ablate",
                     alpha: float = 1.0, layers: Optional[Sequence[int]] = None, maximize: bool = False,
                     score_key: str = "score", keep: Optional[Callable[[Candidate], bool]] = None,
                     progress: bool = True, backend: str = "auto") -> Selection:
    """Score each candidate layer's vector by ``metric`` on the patched model
    (see the module doc); ``maximize`` says whether higher scores are better."""
    from ..patching import patch

    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(candidates, VectorSet):
        raise ValueError(f"candidates: expected a VectorSet, got {type(candidates).__name__}")
    layers = candidates.layers if layers is None else list(layers)
    missing = [layer for layer in layers if layer not in candidates]
    if missing or not layers:
        raise ValueError(f"layers: {missing or layers} not among the candidate layers {candidates.layers}")
    baseline = _as_metrics(metric(model), score_key)
    it = layers
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(layers, desc=f"select ({mode})", unit="candidate")
    kept, rejected = [], []
    for layer in it:
        one = candidates.select([layer])
        if float(one[layer].norm()) == 0.0:
            continue
        plan = one.ablation_plan(layer) if mode == "ablate" else one.to_plan(alpha)
        with patch(model, steering=plan, backend=backend, check_model=False):
            m = _as_metrics(metric(model), score_key)
        c = Candidate(layer, one[layer], m[score_key], m)
        (kept if keep is None or keep(c) else rejected).append(c)
    kept.sort(key=lambda c: c.score, reverse=maximize)
    return Selection(baseline, kept, rejected)


def next_token_score(tokenizer, prompts: Sequence[str], tokens: Sequence[Union[str, int]], *,
                     chat_template: bool = False, batch_size: int = 8) -> Metric:
    """A metric: the mean over ``prompts`` of ``log p(T) - log(1 - p(T))``, the
    log-odds that the next token is one of ``tokens`` (token ids, or strings
    whose first token is taken), e.g. refusal openings such as ``"I"``,
    ``"Sorry"``: Arditi et al.'s refusal score."""
    from .extract import _tokenizer_for_batches, render_prompts

    ids = []
    for t in tokens:
        if isinstance(t, int):
            ids.append(t)
        else:
            enc = tokenizer(t, add_special_tokens=False)["input_ids"]
            if not enc:
                raise ValueError(f"tokens: {t!r} encodes to no token")
            ids.append(enc[0])
    target = torch.tensor(sorted(set(ids)))
    rendered, _ = render_prompts(tokenizer, list(prompts), chat_template=chat_template)

    def score(model: nn.Module) -> float:
        device = model_device(model)
        total, count = 0.0, 0
        with _tokenizer_for_batches(tokenizer), torch.no_grad():
            for s in range(0, len(rendered), batch_size):
                enc = tokenizer(rendered[s:s + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=not chat_template).to(device)
                logits = model(**enc).logits.float()
                last = enc["attention_mask"].sum(1) - 1  # right padding
                lp = torch.log_softmax(logits[torch.arange(len(last)), last], dim=-1)
                p = lp[:, target.to(device)].exp().sum(-1).clamp(1e-12, 1 - 1e-12)
                total += float((p.log() - torch.log1p(-p)).sum())
                count += len(last)
        return total / count

    return score
