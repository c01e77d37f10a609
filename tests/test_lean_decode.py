"""The lean decode forwards of a sparse patch (steerkern.patching.decode).

They must compute what the family's own attention and MLP forwards compute
around the same sparse projections, bit for bit: the reference is the same
patch with the lean forwards left out, so every projection runs through its
module as the family's forward calls it.
"""
from __future__ import annotations

import pytest
import torch

import steerkern
from steerkern.ops import library
from steerkern.patching import decode as lean_decode
from steerkern.patching.modules import SparseLinear

import models

LEAN_FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]
needs_parts = pytest.mark.skipif(library.sparse_parts_kernel(torch.zeros(1, 1, 4)) is None,
                                 reason="no multi-part sparse kernel for CPU tensors in this build")


def _plan(threshold=0.4):
    return steerkern.SparsityPlan.uniform(threshold, models.LAYERS)


def _generate(model, ids, steps=5, mask=None):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def _without_lean(monkeypatch):
    monkeypatch.setattr(lean_decode, "install", lambda layers: [])


@pytest.fixture
def projection_calls(monkeypatch):
    """Token counts of every SparseLinear module call."""
    calls = []
    real = SparseLinear.forward

    def counted(self, x):
        calls.append(x.shape[-2] if x.dim() > 1 else 1)
        return real(self, x)

    monkeypatch.setattr(SparseLinear, "forward", counted)
    return calls


@needs_parts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_lean_decode_equals_the_family_forwards(family, dtype, monkeypatch, projection_calls):
    model = models.build(family, dtype=dtype)
    ids = models.input_ids(batch=1, seq=6)
    with steerkern.patch(model, sparsity=_plan()) as handle:
        assert len(handle._lean) == 2 * models.LAYERS
        seq, logits = _generate(model, ids)
    # at decode no projection module was called: the lean forwards ran the kernel themselves
    assert projection_calls and all(n > 1 for n in projection_calls)
    projection_calls.clear()
    with monkeypatch.context() as m:
        _without_lean(m)
        with steerkern.patch(model, sparsity=_plan()) as handle:
            assert not handle._lean
            seq_ref, logits_ref = _generate(model, ids)
    assert any(n == 1 for n in projection_calls)  # the reference did decode through the modules
    assert torch.equal(seq, seq_ref)
    assert torch.equal(logits, logits_ref)


@needs_parts
def test_lean_decode_with_steering_and_a_padded_batch(monkeypatch):
    model = models.build("llama")
    ids = models.input_ids(batch=2, seq=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: the attention function gets a mask and falls back to the model's
    v = torch.randn(models.HIDDEN, generator=torch.Generator().manual_seed(3))
    steering = steerkern.SteeringPlan.add(v, 0.7, site="post_attn")
    with steerkern.patch(model, steering, _plan()):
        got = _generate(model, ids, mask=mask)
    with monkeypatch.context() as m:
        _without_lean(m)
        with steerkern.patch(model, steering, _plan()):
            ref = _generate(model, ids, mask=mask)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@needs_parts
def test_a_hook_on_a_projection_still_runs(projection_calls):
    model = models.build("llama")
    ids = models.input_ids(batch=1, seq=6)
    seen = []
    with steerkern.patch(model, sparsity=_plan()):
        _, lean_logits = _generate(model, ids)
        hook = model.model.layers[1].mlp.down_proj.register_forward_hook(
            lambda mod, args, out: seen.append(args[0].shape[-2]))
        try:
            projection_calls.clear()
            _, logits = _generate(model, ids)
        finally:
            hook.remove()
    # the hooked MLP falls back to its own forward for every step; the result does not change
    assert seen.count(1) == 4 and seen[0] == 6
    assert any(n == 1 for n in projection_calls)
    assert torch.equal(logits, lean_logits)


@needs_parts
def test_training_mode_runs_the_family_attention(projection_calls):
    # attention dropout is the family's business: in training mode its own forward runs
    from transformers import DynamicCache

    model = models.build("llama")
    ids = models.input_ids(batch=1, seq=6)
    step = []
    with steerkern.patch(model, sparsity=_plan()), torch.no_grad():
        for train in (False, True):
            cache = DynamicCache(config=model.config)
            token = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            projection_calls.clear()
            model.train(train)
            step.append(model(token, past_key_values=cache).logits)
            counts = list(projection_calls)
            model.eval()
            if train:  # q/k/v/o through the modules (the MLP has no dropout: still lean)
                assert counts.count(1) == 4 * models.LAYERS
            else:
                assert not counts
    assert torch.equal(step[0], step[1])  # attention_dropout is 0 in this config


@needs_parts
def test_unpatch_removes_the_lean_forwards():
    model = models.build("qwen3")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    ids = models.input_ids(batch=1, seq=6)
    _, ref = _generate(model, ids)
    with steerkern.patch(model, sparsity=_plan()):
        assert "forward" in attn.__dict__ and "forward" in mlp.__dict__
    for m in (attn, mlp):
        assert "forward" not in m.__dict__ and "_steerkern_lean" not in m.__dict__
    assert torch.equal(_generate(model, ids)[1], ref)


def test_no_lean_forward_without_sparse_siblings():
    model = models.build("llama")
    # only the MLP's down projection sparse: no sibling group anywhere, nothing to fuse
    plan = steerkern.SparsityPlan.uniform(0.4, models.LAYERS, projections=("down_proj",))
    with steerkern.patch(model, sparsity=plan) as handle:
        assert handle._lean == []
    with steerkern.patch(model, steerkern.SteeringPlan()) as handle:
        assert handle._lean == []
    # families outside the verified list keep their own forwards
    with steerkern.patch(models.build("phi3"), sparsity=_plan()) as handle:
        assert handle._lean == []
