"""Baking a directional ablation into the weights.

Baked weights must give the logits of run-time ablation at every site of
every layer, both as steerkern.patch runs it and as plain forward hooks
compute it (tests/models.py), within fp32 tolerance: the two differ only in
the order of fp32 roundings (1e-4 on logits of magnitude ~1).  Restoring must
be bit-exact, tied embeddings included.
"""
from __future__ import annotations

import pytest
import torch

import models as M
from models import no_grad  # noqa: F401  (autouse fixture)
import steerkern
from steerkern import SteeringPlan
from steerkern.vectors.orthogonalize import orthogonalize


BAKEABLE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "gpt_neox_seq"]
ATOL = 1e-4


def directions(k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return steerkern.orthonormalize(torch.randn(k, M.HIDDEN, generator=g))


def hooked_logits(model, family, plan, ids):
    with M.hooked(M.hook_reference(model, family, plan)):
        return model(ids).logits


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}


@pytest.mark.parametrize("family", BAKEABLE)
def test_baked_weights_equal_run_time_ablation(family):
    model = M.build(family)
    ids = M.input_ids()
    q = directions(k=2 if family == "llama" else 1)
    # GPT-NeoX's parallel residual adds attention and MLP at once: no post_attn stream to ablate
    sites = ("pre", "post_mlp") if family == "gpt_neox" else ("pre", "post_attn", "post_mlp")
    plan = SteeringPlan.ablate(q, sites=sites)
    base = model(ids).logits
    hooked = hooked_logits(model, family, plan, ids)
    with steerkern.patch(model, steering=plan):
        patched = model(ids).logits
    before = snapshot(model)
    with orthogonalize(model, q) as baked:
        logits = model(ids).logits
        assert baked.active and len(baked.params) >= 1 + 2 * M.LAYERS
    assert (hooked - base).abs().max() > 1e-2  # the ablation does change the model
    assert torch.allclose(logits, hooked, atol=ATOL, rtol=ATOL)
    assert torch.allclose(logits, patched, atol=ATOL, rtol=ATOL)
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tied_embeddings_are_untied_then_retied(family):
    cfg = M.config(family)
    cfg.tie_word_embeddings = True
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, M.SPECS[family][1])(cfg).eval()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight is emb.weight
    ids = M.input_ids()
    q = directions()
    hooked = hooked_logits(model, family, SteeringPlan.ablate(q), ids)
    base = model(ids).logits
    h = orthogonalize(model, q)
    assert model.get_output_embeddings().weight is not emb.weight
    assert model.config.tie_word_embeddings is False
    assert torch.allclose(model(ids).logits, hooked, atol=ATOL, rtol=ATOL)
    h.restore()
    assert model.get_output_embeddings().weight is emb.weight and model.config.tie_word_embeddings is True
    assert torch.equal(model(ids).logits, base)
    h.restore()  # idempotent


def test_baked_model_exports_with_save_pretrained(tmp_path):
    import transformers

    cfg = M.config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = M.input_ids()
    orthogonalize(model, directions())
    want = model(ids).logits
    model.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert again.config.tie_word_embeddings is False
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(again(ids).logits, want)


def test_originals_kept_where_asked():
    model = M.build("llama")
    h = orthogonalize(model, directions(), keep_on=None)
    assert h._saved and all(saved.device == p.device for p, saved in h._saved)
    h.restore()
    # a device other than the weights' (meta: no data, so not restored)
    h = orthogonalize(M.build("llama"), directions(), keep_on="meta")
    assert h._saved and all(saved.device.type == "meta" for _, saved in h._saved)


@pytest.mark.parametrize("family, match", [("gemma2", "norm before the residual"), ("bert", "follow")])
def test_families_without_an_equivalence_are_refused(family, match):
    model = M.build(family)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        orthogonalize(model, directions())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_directions_are_refused():
    model = M.build("llama")
    with pytest.raises(ValueError, match="orthonormal"):
        orthogonalize(model, torch.randn(2, M.HIDDEN))
    with pytest.raises(ValueError, match="shape"):
        orthogonalize(model, torch.randn(M.HIDDEN + 1))
    with pytest.raises(ValueError, match="nonzero"):
        orthogonalize(model, torch.zeros(M.HIDDEN))
    with steerkern.patch(model, steering=SteeringPlan.ablate(directions())):
        with pytest.raises(ValueError, match="unpatch"):
            orthogonalize(model, directions())
