"""Direction selection and conditional (CAST-style) steering, against plain
forward-hook references (tests/models.py) and brute-force searches."""
from __future__ import annotations

import pytest
import torch

import models as M
from models import no_grad  # noqa: F401  (autouse fixture)
import steerkern
from steerkern.patching import handle_of
from steerkern.vectors import VectorSet
from steerkern.vectors.conditional import Condition, conditional_plan, fit_condition, gate_prompts
from steerkern.vectors.extract import collect_activations
from steerkern.vectors.select import next_token_score, select_direction
from test_vectors_extract import NEGATIVE, POSITIVE, word_tokenizer


def rand_set(layers, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return VectorSet({layer: scale * torch.randn(M.HIDDEN, generator=g) for layer in layers},
                     num_layers=M.LAYERS)


def with_hooks(model, family, plan, fn, **kw):
    with M.hooked(M.hook_reference(model, family, plan, **kw)):
        return fn(model)


# ---- selection ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ablate", "add"])
def test_selection_scores_are_the_metric_under_each_intervention(mode):
    model = M.build("llama")
    ids = M.input_ids()
    metric = lambda m: float(m(ids).logits[:, -1, 5].mean())  # noqa: E731
    cands = rand_set([0, 1, 2], seed=1, scale=3.0)
    base = model(ids).logits
    sel = select_direction(model, cands, metric, mode=mode, alpha=2.0, maximize=True, progress=False)
    assert sel.baseline == {"score": pytest.approx(metric(model))}
    want = {}
    for layer in cands.layers:
        one = cands.select([layer])
        plan = one.ablation_plan(layer) if mode == "ablate" else one.to_plan(2.0)
        want[layer] = with_hooks(model, "llama", plan, metric)
    got = {c.layer: c.score for c in sel.ranked}
    assert got == pytest.approx(want, abs=1e-4)
    assert [c.layer for c in sel.ranked] == sorted(want, key=want.get, reverse=True)
    assert sel.best.layer == max(want, key=want.get)
    assert handle_of(model) is None and torch.equal(model(ids).logits, base)


def test_selection_keep_and_dict_metrics():
    model = M.build("llama")
    ids = M.input_ids()

    def metric(m):
        logits = m(ids).logits
        return {"score": float(logits[:, -1, 7].mean()), "norm": float(logits.norm())}

    cands = rand_set([0, 1, 2], seed=2, scale=3.0)
    sel = select_direction(model, cands, metric, mode="add", keep=lambda c: c.layer != 1, progress=False)
    assert sorted(c.layer for c in sel.ranked) == [0, 2] and [c.layer for c in sel.rejected] == [1]
    assert all(set(c.metrics) == {"score", "norm"} for c in sel.ranked)
    assert sel.ranked[0].score <= sel.ranked[1].score  # minimize by default
    with pytest.raises(ValueError, match="score_key"):
        select_direction(model, cands, lambda m: {"other": 1.0}, progress=False)
    with pytest.raises(ValueError, match="mode"):
        select_direction(model, cands, metric, mode="swap", progress=False)
    with pytest.raises(ValueError, match="layers"):
        select_direction(model, cands, metric, layers=[5], progress=False)


def test_next_token_score_is_the_mean_log_odds():
    tok = word_tokenizer()
    model = M.build("llama")
    prompts = POSITIVE[:3]
    score = next_token_score(tok, prompts, ["i", "we", tok.convert_tokens_to_ids("cat")], batch_size=2)
    ids = [tok.convert_tokens_to_ids(t) for t in ("i", "we", "cat")]
    want = []
    for p in prompts:
        logits = model(**tok(p, return_tensors="pt")).logits[0, -1].double()
        prob = torch.softmax(logits, -1)[ids].sum()
        want.append(float(torch.log(prob) - torch.log1p(-prob)))
    assert score(model) == pytest.approx(sum(want) / len(want), abs=1e-4)


# ---- conditions -----------------------------------------------------------------

def test_fit_condition_finds_the_best_threshold():
    g = torch.Generator().manual_seed(4)
    u = torch.randn(12, generator=g)
    base = torch.randn(40, 12, generator=g)
    pos = base[:20] + 1.5 * u
    neg = base[20:] - 0.5 * u
    c = fit_condition(pos, neg, layer=2)
    cp, cn = c.cosine(pos).double(), c.cosine(neg).double()
    # brute force over a fine grid of thresholds: none beats the chosen one
    grid = torch.linspace(-1, 1, 4001, dtype=torch.float64)
    bal = ((cp[None] > grid[:, None]).double().mean(1) + (cn[None] <= grid[:, None]).double().mean(1)) / 2
    assert c.accuracy == pytest.approx(float(bal.max()))
    assert ((cp > c.threshold).double().mean() + (cn <= c.threshold).double().mean()) / 2 == \
        pytest.approx(c.accuracy)
    assert abs(float(c.direction.norm()) - 1) < 1e-6 and c.layer == 2
    with pytest.raises(ValueError, match="same mean direction"):
        fit_condition(pos, pos, layer=0)


def test_per_token_condition_steers_only_passing_tokens():
    model = M.build("llama")
    ids = M.input_ids(batch=3, seq=9)
    layer = 1
    h = model(ids, output_hidden_states=True).hidden_states[layer + 1]  # post_mlp of layer 1
    g = torch.Generator().manual_seed(5)
    u = torch.randn(M.HIDDEN, generator=g)
    u = u / u.norm()
    cos = (h @ u) / h.norm(dim=-1)
    vals = torch.sort(cos.flatten()).values
    gaps = vals[1:] - vals[:-1]
    mid = len(gaps) // 4 + int(gaps[len(gaps) // 4: 3 * len(gaps) // 4].argmax())  # a wide gap near the middle
    thr = float((vals[mid] + vals[mid + 1]) / 2)
    cond = Condition(u, thr, layer)
    vs = VectorSet({layer: 4 * torch.randn(M.HIDDEN, generator=g)}, num_layers=M.LAYERS)
    plan = conditional_plan(vs, cond, alpha=1.5)
    keep = lambda x: ((x.float() @ u) / x.float().norm(dim=-1)) > thr  # noqa: E731
    want = with_hooks(model, "llama", plan, lambda m: m(ids).logits, keep=keep)
    with steerkern.patch(model, steering=plan):
        got = model(ids).logits
    passed = cos > thr
    assert 0 < int(passed.sum()) < passed.numel()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no condition"):
        conditional_plan(vs, {0: cond})


def test_per_prompt_gate_sets_the_row_variants():
    tok = word_tokenizer()
    model = M.build("llama")
    pos_acts = collect_activations(model, tok, POSITIVE, [0], position="mean", progress=False)[0]
    neg_acts = collect_activations(model, tok, NEGATIVE, [0], position="mean", progress=False)[0]
    cond = fit_condition(pos_acts, neg_acts, layer=0)
    prompts = [POSITIVE[0], NEGATIVE[1], POSITIVE[2], NEGATIVE[3]]
    want_index = [int(cond.passes(a)) for a in torch.cat([pos_acts[[0]], neg_acts[[1]], pos_acts[[2]],
                                                          neg_acts[[3]]])]
    assert 0 < sum(want_index) < len(prompts)
    plan = VectorSet({1: 3 * torch.ones(M.HIDDEN)}, num_layers=M.LAYERS).to_plan(1.0)
    enc = tok(prompts, return_tensors="pt", padding=True)
    base = model(**enc).logits
    rows = torch.tensor(want_index, dtype=torch.bool)
    want = with_hooks(model, "llama", plan, lambda m: m(**enc).logits, rows=rows)
    with steerkern.patch(model, steering=plan) as handle:
        index = gate_prompts(model, tok, prompts, cond, handle=handle)
        assert index.tolist() == want_index
        got = model(**enc).logits
    real = enc["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(got[~rows][real[~rows]], base[~rows][real[~rows]])  # ungated rows: bit-exact


def test_condition_validation():
    with pytest.raises(ValueError, match="direction"):
        Condition(torch.zeros(4), 0.0, 0)
    with pytest.raises(ValueError, match="threshold"):
        Condition(torch.ones(4), float("nan"), 0)
    with pytest.raises(ValueError, match="site"):
        Condition(torch.ones(4), 0.1, 0, site="post_attn")
