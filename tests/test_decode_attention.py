"""steerkern's decode attention: the kernel against the reference, and the
kernel standing in for a model's attention in a patched model.

The reference is plain torch math in fp32 (``reference.decode_attention``);
the kernel computes the same in fp32 and rounds once, so it may differ in the
last fp32 bits and, after rounding, by one unit in the last place of bf16 or
fp16.  The model tests compare a patched model with the unpatched one: the
model's own attention is the independent reference there.
"""
from __future__ import annotations

import pytest
import torch

import steerkern
from steerkern import backends
from steerkern.ops import reference
from steerkern.patching import attention as attention_patch

import models

KERNEL = backends.extra("decode_attention", "cpu")
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C++ CPU decode attention kernel in this build")

ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _qkv(B, H, KVH, L, D, dtype, seed=0, strided=True):
    g = torch.Generator().manual_seed(seed)
    if strided:  # transformers' layout: q is a transposed view, k/v a cache grown by cat
        q = torch.randn(B, 1, H, D, generator=g).to(dtype).transpose(1, 2)
        k = torch.cat([torch.randn(B, KVH, L - 1, D, generator=g),
                       torch.randn(B, 1, KVH, D, generator=g).transpose(1, 2)], dim=2).to(dtype)
        v = torch.randn(B, L, KVH, D, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, H, 1, D, generator=g).to(dtype)
        k = torch.randn(B, KVH, L, D, generator=g).to(dtype)
        v = torch.randn(B, KVH, L, D, generator=g).to(dtype)
    return q, k, v


def _assert_within_ulp(out, ref, dtype, ulps=1.0):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out.float() - ref.float()).abs()
    # one ulp of a rounded output (bf16, fp16: the two fp32 results may fall
    # on either side of a rounding boundary), relative to each value and to 1
    # near 0 (sums of products of values around 1 lose bits to cancellation);
    # fp32 outputs: the two summation orders differ by a few ulp per term
    scale = torch.maximum(ref.float().abs(), torch.ones_like(err))
    tol = (64 if dtype == torch.float32 else ulps) * ULP[dtype] * scale
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"max error {err.max().item():.3g}, {worst:.2f}x the tolerance"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,KVH,L,D", [(1, 8, 2, 1, 64), (2, 8, 2, 17, 64), (2, 6, 6, 5, 80),
                                         (1, 4, 1, 3, 7), (1, 32, 4, 300, 64)])
def test_kernel_matches_reference(dtype, B, H, KVH, L, D):
    q, k, v = _qkv(B, H, KVH, L, D, dtype)
    scale = D ** -0.5
    out = steerkern.ops.decode_attention(q, k, v, scale)
    ref = reference.decode_attention(q, k, v, scale)
    _assert_within_ulp(out, ref, dtype)
    # the reference itself against a float64 golden answer: the spec is what
    # the kernel is compared with, so it must be right
    gold = reference.decode_attention(q.double(), k.double(), v.double(), scale)
    assert (ref.double() - gold).abs().max().item() <= 2 * ULP[dtype] * gold.abs().max().item() + 1e-6


@needs_kernel
@pytest.mark.parametrize("isa", ["avx512bf16", "avx512", "avx2+fma", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_instruction_set(isa, dtype):
    from steerkern.kernels import cpu as cpu_kernels
    ext = cpu_kernels._ext
    before = ext.cpu_capability()
    try:
        if ext.set_capability(isa) != isa:
            pytest.skip(f"this CPU has no {isa}")
        # D = 40: two 16-lane vectors and a scalar tail; L = 7: four keys at a time and a tail of 3
        q, k, v = _qkv(2, 6, 3, 7, 40, dtype)
        _assert_within_ulp(KERNEL(q, k, v, 0.3), reference.decode_attention(q, k, v, 0.3), dtype)
    finally:
        ext.set_capability(before)


@needs_kernel
def test_kernel_is_called_and_reference_differs_from_garbage():
    q, k, v = _qkv(1, 8, 2, 9, 64, torch.float32, strided=False)
    out = KERNEL(q, k, v, 0.125)
    ref = reference.decode_attention(q, k, v, 0.125)
    _assert_within_ulp(out, ref, torch.float32)
    # a wrong head grouping (each query head reading key head h % KVH) must fail the comparison
    wrong = reference.decode_attention(q, k.repeat(1, 4, 1, 1)[:, :8], v.repeat(1, 4, 1, 1)[:, :8], 0.125)
    assert (wrong - ref).abs().max().item() > 1e-3


def test_softmax_stability_large_scores():
    q, k, v = _qkv(1, 4, 2, 6, 16, torch.float32, strided=False)
    out = steerkern.ops.decode_attention(q * 1e3, k * 1e3, v, 1.0)  # scores ~1e6: no overflow
    assert torch.isfinite(out).all()
    _assert_within_ulp(out, reference.decode_attention(q * 1e3, k * 1e3, v, 1.0), torch.float32)


@pytest.mark.parametrize("make,match", [
    (lambda q, k, v: (q[:, :, 0], k, v), "q: expected a 4-D"),
    (lambda q, k, v: (q.expand(-1, -1, 2, -1), k, v), "one query token"),
    (lambda q, k, v: (q[:, :3], k, v), "do not divide"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "no cached positions"),
    (lambda q, k, v: (q, k, v[:, :, :2]), "equal shapes"),
    (lambda q, k, v: (q, k.double(), v), "dtype"),
    (lambda q, k, v: (q.int(), k, v), "not supported"),
    (lambda q, k, v: (q, k, v, float("nan")), "scale: expected a finite"),
])
def test_bad_input_is_a_clear_error(make, match):
    q, k, v = _qkv(1, 8, 2, 4, 16, torch.float32, strided=False)
    with pytest.raises(ValueError, match=match):
        steerkern.ops.decode_attention(*make(q, k, v))


@needs_kernel
def test_kernel_checks_its_arguments_too():
    q, k, v = _qkv(1, 8, 2, 4, 16, torch.float32, strided=False)
    with pytest.raises(RuntimeError, match="key/value heads"):
        KERNEL(q[:, :3], k, v, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        KERNEL(q, k.transpose(2, 3), v, 1.0)


# ---- in a patched model ----------------------------------------------------

def _decode_logits(model, ids, steps=6, mask=None):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = backends.extra("decode_attention", "cpu")

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    if real is not None:
        monkeypatch.setitem(backends._EXTRAS, ("decode_attention", "cpu"), counted)
    return calls


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox"])
def test_patched_model_decodes_like_the_model(family, spy):
    model = models.build(family)
    ids = models.input_ids(batch=1, seq=5)
    seq_ref, logits_ref = _decode_logits(model, ids)
    original = model.config._attn_implementation
    with steerkern.patch(model, attention="kernel") as handle:
        assert "attention=kernel" in repr(handle)
        seq, logits = _decode_logits(model, ids)
    assert spy, "the decode kernel never ran"
    assert all(s[2] == 1 for s in spy)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    # unpatched: the model's own attention again, bit-exact
    assert model.config._attn_implementation == original
    n = len(spy)
    assert torch.equal(_decode_logits(model, ids)[1], logits_ref)
    assert len(spy) == n


@needs_kernel
def test_bf16_model_close_to_the_model():
    model = models.build("llama", dtype=torch.bfloat16)
    ids = models.input_ids(batch=1, seq=5)
    _, logits_ref = _decode_logits(model, ids, steps=1)
    with steerkern.patch(model, attention="kernel"):
        _, logits = _decode_logits(model, ids, steps=1)
    # the first decoded token's logits: one step of bf16 attention rounded differently
    err = (logits.float() - logits_ref.float()).abs().max().item()
    assert err <= 0.05 * logits_ref.float().abs().max().item()


@needs_kernel
def test_padded_batch_falls_back_to_the_model(spy):
    model = models.build("llama")
    ids = models.input_ids(batch=2, seq=6)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: not every cached position is visible
    ref = _decode_logits(model, ids, mask=mask)
    with steerkern.patch(model, attention="kernel"):
        got = _decode_logits(model, ids, mask=mask)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert not spy


@needs_kernel
def test_sdpa_models_keep_their_masks(spy):
    # the test models run eager attention (an additive float mask); sdpa
    # builds a boolean mask, or none at all when every position is visible
    model = models.build("llama")
    model.set_attn_implementation("sdpa")
    ids = models.input_ids(batch=1, seq=5)
    seq_ref, logits_ref = _decode_logits(model, ids)
    with steerkern.patch(model, attention="kernel"):
        assert model.config._attn_implementation == "steerkern_sdpa"
        seq, logits = _decode_logits(model, ids)
    assert spy
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_auto_uses_the_kernel_only_with_a_sparsity_plan(spy):
    model = models.build("llama")
    assert model.config._attn_implementation == "eager"
    with steerkern.patch(model, steerkern.SteeringPlan()) as h:
        assert not h._attention and model.config._attn_implementation == "eager"
    plan = steerkern.SparsityPlan.uniform(0.0, models.LAYERS)
    with steerkern.patch(model, sparsity=plan) as h:
        assert h._attention and model.config._attn_implementation == "steerkern_eager"
        # patching again replaces the plan: the original name is still what comes back
        steerkern.patch(model, sparsity=plan)
        assert model.config._attn_implementation == "steerkern_eager"
    assert steerkern.unpatch(model)  # the second patch is still on: the first handle had been replaced
    assert model.config._attn_implementation == "eager"
    with steerkern.patch(model, sparsity=plan, attention="model") as h:
        assert not h._attention
    assert model.config._attn_implementation == "eager"


def test_bad_attention_mode_leaves_the_model_untouched():
    model = models.build("llama")
    forward = model.model.layers[0].forward
    with pytest.raises(ValueError, match="attention: expected one of"):
        steerkern.patch(model, attention="fast")
    assert model.config._attn_implementation == "eager"
    assert model.model.layers[0].forward == forward
    assert steerkern.patching.handle_of(model) is None


def test_kernel_mode_needs_a_kernel(monkeypatch):
    model = models.build("llama")
    monkeypatch.setitem(backends._EXTRAS, ("decode_attention", "cpu"), None)
    with pytest.raises(ValueError, match="no decode attention kernel"):
        steerkern.patch(model, attention="kernel")
    assert model.config._attn_implementation == "eager"


@needs_kernel
def test_kernel_mode_refuses_other_attention_implementations():
    model = models.build("llama")
    for cfg in attention_patch._configs(model):
        cfg._attn_implementation_internal = "flex_attention"  # never run: the patch must refuse first
    forward = model.model.layers[0].forward
    with pytest.raises(ValueError, match="stands in for"):
        steerkern.patch(model, attention="kernel")
    assert model.config._attn_implementation == "flex_attention"
    assert model.model.layers[0].forward == forward
    # auto: the model's own attention, no error
    plan = steerkern.SparsityPlan.uniform(0.0, models.LAYERS)
    with steerkern.patch(model, sparsity=plan) as h:
        assert not h._attention
