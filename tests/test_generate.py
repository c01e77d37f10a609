"""Generation with a patched model: position modes through the KV cache,
per-row steering of a left-padded batch, model.generate unchanged, and
torch.compile.

The reference for cached decoding recomputes the whole sequence at every
step without a cache, with the forward-hook reference steering exactly the
positions the plan names; the patched model decodes with the KV cache.
"""
from __future__ import annotations

import pytest
import torch

import steerkern
from steerkern import Intervention, SparsityPlan, SteerEntry, SteeringPlan

import models as M
from models import no_grad  # noqa: F401  (autouse fixture)
NEW = 4


def gen(model, ids, mask=None, **kw):
    kw.setdefault("do_sample", False)
    out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                         max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def plan_at(positions, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(M.HIDDEN, generator=g) * 3
    q = steerkern.orthonormalize(torch.randn(1, M.HIDDEN, generator=g))
    return SteeringPlan([Intervention(SteerEntry(vector=v, alpha=1.0), "pre", [0, 2], positions=positions),
                         Intervention(SteerEntry(directions=q), "post_attn", [1], positions=positions)])


def keep_for(positions, prompt_len):
    def keep(h):
        pos = torch.arange(h.shape[1]).expand(h.shape[0], -1)
        if positions == "all":
            return torch.ones_like(pos, dtype=torch.bool)
        if positions == "prompt":
            return pos < prompt_len
        if positions == "generated":
            return pos >= prompt_len
        return pos >= positions
    return keep


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", 7])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_position_modes_under_kv_cache(family, positions):
    model = M.build(family)
    ids = M.input_ids(2, 6)
    plan = plan_at(positions)
    with steerkern.patch(model, plan):
        seqs, logits = gen(model, ids)
    with M.hooked(M.hook_reference(model, family, plan, keep=keep_for(positions, ids.shape[1]))):
        for t in range(NEW):
            want = model(seqs[:, : ids.shape[1] + t], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits[:, t], want, atol=1e-4, rtol=1e-4)
    plain_seqs, plain_logits = gen(model, ids)
    assert not torch.allclose(logits, plain_logits, atol=1e-3), "the plan must change decoding"


def test_per_row_variants_with_left_padding_equal_each_row_alone():
    model = M.build("llama")
    a, b = plan_at("all", seed=1), plan_at("generated", seed=2)
    both = SteeringPlan.per_row([a, b])
    long = M.input_ids(1, 7, seed=5)
    short = M.input_ids(1, 4, seed=6)
    mid = M.input_ids(1, 5, seed=7)
    rows = [long, short, mid]
    width = max(r.shape[1] for r in rows)
    ids = torch.cat([torch.cat([torch.zeros(1, width - r.shape[1], dtype=torch.long), r], 1) for r in rows])
    mask = torch.cat([torch.cat([torch.zeros(1, width - r.shape[1], dtype=torch.long),
                                 torch.ones_like(r)], 1) for r in rows])
    variants = [2, 1, 0]
    with steerkern.patch(model, both) as handle:
        handle.set_variants(variants)
        seqs, logits = gen(model, ids, mask)
    for row, (r, v) in enumerate(zip(rows, variants)):
        if v:
            with steerkern.patch(model, [a, b][v - 1]):
                want_seq, want_logits = gen(model, r)
        else:
            want_seq, want_logits = gen(model, r)
        assert torch.equal(seqs[row, width:], want_seq[0, r.shape[1]:])
        torch.testing.assert_close(logits[row], want_logits[0], atol=1e-4, rtol=1e-4)


def test_variants_must_be_chosen_for_a_multi_variant_plan():
    model = M.build("llama")
    both = SteeringPlan.per_row([plan_at("all", 1), plan_at("all", 2)])
    with steerkern.patch(model, both) as handle:
        with pytest.raises(ValueError, match="set_variants"):
            model(M.input_ids())
        with pytest.raises(ValueError, match="index"):
            handle.set_variants([0, 3])
        handle.set_variants([1])
        with pytest.raises(ValueError, match="batch has 2 rows"):
            model(M.input_ids(2))


def test_new_variants_take_effect_on_the_next_call():
    # with positions "all" no position hook runs, so nothing but set_variants
    # itself can tell the cached row indices that the variants changed
    model = M.build("llama")
    a, b = plan_at("all", 1), plan_at("all", 2)
    ids = M.input_ids(2, 5)
    plain = model(ids).logits
    with steerkern.patch(model, a):
        want_a = model(ids).logits
    with steerkern.patch(model, SteeringPlan.per_row([a, b])) as handle:
        handle.set_variants([1, 1])
        torch.testing.assert_close(model(ids).logits, want_a, atol=1e-4, rtol=1e-4)
        handle.set_variants([0, 0])
        assert torch.equal(model(ids).logits, plain)
        handle.set_variants([0, 1])
        got = model(ids).logits
    assert torch.equal(got[0], plain[0])
    torch.testing.assert_close(got[1], want_a[1], atol=1e-4, rtol=1e-4)


def test_equal_slots_are_shared_so_the_row_index_is_built_once_per_forward():
    model = M.build("llama")
    plan = SteeringPlan([Intervention(SteerEntry(vector=torch.ones(M.HIDDEN)), "pre", positions="generated")])
    with steerkern.patch(model, plan) as handle:
        slots = {id(s) for layer in model.model.layers for s in layer.steerkern.pre.slots}
        assert len(slots) == 1
        model(M.input_ids(1, 4))
        assert len(handle.tracker._cache) == 1


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_generate_unchanged_by_an_empty_patch(family):
    model = M.build(family)
    ids = M.input_ids(2, 5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    runs = {}
    for patched in (False, True):
        handle = steerkern.patch(model, SteeringPlan()) if patched else None
        greedy = gen(model, ids, mask)
        torch.manual_seed(123)
        sampled = gen(model, ids, mask, do_sample=True, top_k=20, temperature=0.9)
        no_cache = gen(model, ids, mask, use_cache=False)
        runs[patched] = (greedy, sampled, no_cache)
        if handle is not None:
            handle.remove()
    for (s0, l0), (s1, l1) in zip(runs[False], runs[True]):
        assert torch.equal(s0, s1)
        assert torch.equal(l0, l1)


def test_steered_generate_same_with_and_without_cache():
    model = M.build("qwen2")
    ids = M.input_ids(2, 5)
    with steerkern.patch(model, plan_at(6)):
        cached = gen(model, ids)
        uncached = gen(model, ids, use_cache=False)
    assert torch.equal(cached[0], uncached[0])
    torch.testing.assert_close(cached[1], uncached[1], atol=1e-4, rtol=1e-4)


def test_torch_compile_of_a_patched_model():
    model = M.build("llama")
    ids = M.input_ids(1, 5)
    plan = SteeringPlan.add(torch.randn(M.HIDDEN), 0.5, site="post_attn")
    with steerkern.patch(model, plan, SparsityPlan.uniform(0.01, M.LAYERS)) as handle:
        want = model(ids).logits
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(compiled(ids).logits, want, atol=1e-5, rtol=1e-5)
        handle.set_alpha(-1.0)  # a tensor write: the compiled graph sees it
        want = model(ids).logits
        torch.testing.assert_close(compiled(ids).logits, want, atol=1e-5, rtol=1e-5)
