"""Quality against sparsity: perplexity (causal LMs), embedding cosine (encoders).

Sparse activation is applied with reference-mask hooks (:func:`apply_plan`):
the exact math of ``sparse_linear`` on every token, prefill included, so the
numbers measure the method, not a kernel.  TEAL and WINA are calibrated on the
same activations (one pass fills both histograms) and evaluated on the same
held-out windows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..patching.registry import family_for
from .calibrate import Calibrator, apply_plan, average, measure, site_weights, steered
from .collect import _progress, model_device, model_kwargs
from .data import batches as to_batches

ENCODER_FAMILIES = ("bert",)


@dataclasses.dataclass
class Row:
    """One point of a sweep; ``target`` 0 with ``mode`` "dense" is the baseline."""

    mode: str
    target: float
    realized: float
    metric: str
    value: float


def model_kind(model: nn.Module) -> str:
    """``"encoder"`` (embedding cosine) or ``"causal"`` (perplexity)."""
    fam = family_for(model, sparsity=True)
    if fam.name in ENCODER_FAMILIES:
        return "encoder"
    if model.get_output_embeddings() is None:
        raise ValueError(f"model: a {fam.name} model without an LM head; load it with "
                         "AutoModelForCausalLM to measure perplexity")
    return "causal"


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token negative log-likelihood over the windows."""
    nll, count = 0.0, 0
    device = model_device(model)
    for ids in to_batches(windows, batch_size):
        ids = ids.to(device)
        logits = model(**model_kwargs(model, ids)).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def embeddings(model: nn.Module, windows: Tensor, batch_size: int = 8) -> Tensor:
    """Mean-pooled, L2-normalized last hidden states (sentence-transformers style)."""
    out = []
    device = model_device(model)
    for ids in to_batches(windows, batch_size):
        h = model(**model_kwargs(model, ids.to(device))).last_hidden_state.float()
        out.append(F.normalize(h.mean(dim=1), dim=-1).cpu())
    return torch.cat(out)


def quality(model: nn.Module, kind: str, windows: Tensor, dense: Optional[Tensor], batch_size: int) -> float:
    if kind == "causal":
        return perplexity(model, windows, batch_size)
    return float((embeddings(model, windows, batch_size) * dense).sum(-1).mean())


def sweep(model: nn.Module, calib_windows: Tensor, eval_windows: Tensor, levels: Sequence[float], *,
          modes: Sequence[str] = ("teal", "wina"), allocation: str = "uniform", steering=None,
          batch_size: int = 8, greedy_windows: int = 8, step: float = 0.05, refine: int = 1,
          progress: bool = True) -> List[Row]:
    """Calibrate on ``calib_windows`` and measure quality on ``eval_windows`` at
    every sparsity in ``levels`` for every mode; the first row is the dense model."""
    kind = model_kind(model)
    metric = "perplexity" if kind == "causal" else "cosine"
    cal = Calibrator(model, calib_windows, steering=steering, batch_size=batch_size,
                     greedy_windows=greedy_windows if allocation == "greedy" else 0, progress=progress)
    weights = site_weights(cal.sites)
    was_training = model.training
    model.eval()
    try:
        with steered(model, steering):
            dense_emb = embeddings(model, eval_windows, batch_size) if kind == "encoder" else None
            rows = [Row("dense", 0.0, 0.0, metric, quality(model, kind, eval_windows, dense_emb, batch_size))]
        jobs = [(mode, s) for s in levels for mode in modes]
        for mode, s in _progress(jobs, "evaluating", progress):
            plan = cal.plan(s, mode=mode, allocation=allocation, step=step, refine=refine)
            realized = average(measure(model, plan, eval_windows, steering=steering, batch_size=batch_size),
                               weights)
            with steered(model, steering), apply_plan(model, plan):
                value = quality(model, kind, eval_windows, dense_emb, batch_size)
            rows.append(Row(mode, float(s), realized, metric, value))
    finally:
        model.train(was_training)
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: one line per sparsity, TEAL and WINA side by side."""
    metric = rows[0].metric
    modes = [m for m in dict.fromkeys(r.mode for r in rows) if m != "dense"]
    dense = next((r for r in rows if r.mode == "dense"), None)
    head = f"{'target':>7} " + " ".join(f"{m + ' realized':>14} {m + ' ' + metric:>18}" for m in modes)
    lines = [head, "-" * len(head)]
    if dense is not None:
        lines.append(f"{'dense':>7} " + " ".join(f"{'0.000':>14} {dense.value:>18.5g}" for _ in modes))
    for s in sorted({r.target for r in rows if r.mode != "dense"}):
        cells = []
        for m in modes:
            r = next((r for r in rows if r.mode == m and r.target == s), None)
            cells.append(f"{'-':>14} {'-':>18}" if r is None else f"{r.realized:>14.3f} {r.value:>18.5g}")
        lines.append(f"{s:>7.3f} " + " ".join(cells))
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: str, title: str = "") -> None:
    """Quality against realized sparsity, one line per mode, dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = rows[0].metric
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = next((r for r in rows if r.mode == "dense"), None)
    for mode, marker in (("teal", "o"), ("wina", "s")):
        pts = sorted((r.realized, r.value) for r in rows if r.mode == mode)
        if pts and dense is not None:
            pts.insert(0, (0.0, dense.value))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=mode.upper())
    if dense is not None:
        ax.axhline(dense.value, color="gray", linestyle="--", label="dense")
    ax.set_xlabel("realized sparsity on the evaluation text")
    ax.set_xlim(left=0.0)
    ax.set_ylabel("perplexity (lower is better)" if metric == "perplexity"
                  else "embedding cosine to dense (higher is better)")
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(title or f"{metric} vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
