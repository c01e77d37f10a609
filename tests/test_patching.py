"""Patching a model: empty plans, steering against a forward-hook reference,
sparsity against the masked dense reference, and unpatching.

Tolerances
----------
* An empty plan runs the original modules in the original order: bit-exact.
* Steered fp32: the fused ops (C++ or reference backend) compute in fp32 like
  the hook reference, but sum in another order, and the fused RMSNorm
  multiplies ``r * rstd * w`` where HF Llama rounds ``r * rstd`` to the input
  dtype first (a no-op in fp32): logits agree to ~1e-5; we allow 1e-4.
* Steered bf16: the fused RMSNorm rounds once where HF's Llama RMSNorm rounds
  twice, so results differ by bf16 rounding (2^-8 relative) that the layers
  then propagate.  The rule (flash-attention's): our bf16 error against the
  fp32 reference is at most twice the bf16 hook reference's own error, plus a
  floor of one bf16 ulp of the logits' scale.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import steerkern
from steerkern import Intervention, SparsityPlan, SteerEntry, SteeringPlan
from steerkern.patching import registry
from steerkern.patching.modules import SparseLinear

import models as M
from models import no_grad  # noqa: F401  (autouse fixture)


def out_of(model, family, ids, **kw):
    out = model(ids, **kw)
    return out.last_hidden_state if family == "bert" else out.logits


def mixed_plan(family: str, seed: int = 0) -> SteeringPlan:
    """Addition with per-layer coefficients at 'pre', ablation at 'post_attn',
    a clamp at 'post_mlp', all with non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    d = M.HIDDEN
    q = steerkern.orthonormalize(torch.randn(2, d, generator=g))
    ivs = [
        Intervention(SteerEntry(vector=torch.randn(d, generator=g), alpha=0.7), "pre",
                     layers=[0, 1, 2], coefficients=[1.0, -0.5, 2.0]),
        Intervention(SteerEntry(directions=q), "post_attn", layers=[0, 2]),
        Intervention(SteerEntry(directions=q[:1], target=[1.5], gain=0.8), "post_mlp", layers=[1]),
    ]
    if family == "gpt_neox":  # parallel residual: no post-attention stream
        ivs = [iv for iv in ivs if iv.site != "post_attn"]
    return SteeringPlan(ivs)


def reference(model, family, plan, ids, **kw):
    with M.hooked(M.hook_reference(model, family, plan)):
        return out_of(model, family, ids, **kw)


# ---- empty plan ------------------------------------------------------------

@pytest.mark.parametrize("family", list(M.SPECS))
def test_empty_plan_is_bit_exact(family):
    model = M.build(family)
    ids = M.input_ids()
    want = out_of(model, family, ids)
    with steerkern.patch(model, SteeringPlan()):
        got = out_of(model, family, ids)
    assert torch.equal(got, want)


# ---- steering ----------------------------------------------------------------

@pytest.mark.parametrize("family", list(M.SPECS))
def test_steered_fp32_matches_hook_reference(family):
    model = M.build(family)
    plan = mixed_plan(family)
    ids = M.input_ids()
    want = reference(model, family, plan, ids)
    unsteered = out_of(model, family, ids)
    with steerkern.patch(model, plan):
        got = out_of(model, family, ids)
    assert (want - unsteered).abs().max() > 1e-2, "the plan must change the output"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(M.SPECS))
def test_hidden_states_the_caller_holds_are_never_overwritten(family):
    # post_attn and post_mlp steer the streams a layer forms in place; what
    # output_hidden_states hands back must still equal the hook reference.
    # ('pre' is left out: hooks record the pre-steered layer input there, the
    # patched layer its unsteered input, and both are fair readings.)
    model = M.build(family)
    plan = SteeringPlan([iv for iv in mixed_plan(family).interventions if iv.site != "pre"])
    ids = M.input_ids()
    with M.hooked(M.hook_reference(model, family, plan)):
        want = model(ids, output_hidden_states=True).hidden_states
    with steerkern.patch(model, plan):
        got = model(ids, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == M.config(family).num_hidden_layers + 1
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m: f"hidden_states[{i}]: {m}")


@pytest.mark.parametrize("family", list(M.SPECS))
def test_steered_bf16_within_twice_bf16_reference_error(family):
    plan = mixed_plan(family)
    ids = M.input_ids()
    ref32 = reference(M.build(family), family, plan, ids).float()
    model = M.build(family, torch.bfloat16)
    ref16 = reference(model, family, plan, ids).float()
    with steerkern.patch(model, plan):
        got = out_of(model, family, ids).float()
    own = (ref16 - ref32).abs().max()
    ulp = ref32.abs().max() * 2.0 ** -8
    assert (got - ref32).abs().max() <= 2 * own + ulp


def test_minilm_real_weights_steering_matches_hook_reference():
    model, tok = M.load_minilm()
    batch = tok(["the cat sat on the mat", "a completely different sentence here"], return_tensors="pt",
                padding=True)
    g = torch.Generator().manual_seed(3)
    q = steerkern.orthonormalize(torch.randn(2, 384, generator=g))
    plan = SteeringPlan([
        Intervention(SteerEntry(vector=torch.randn(384, generator=g), alpha=0.3), "pre", [0, 3]),
        Intervention(SteerEntry(directions=q), "post_attn", [1, 4]),
        Intervention(SteerEntry(directions=q[:1], target=[2.0]), "post_mlp", [2]),
    ])
    want_plain = model(**batch).last_hidden_state
    with steerkern.patch(model, SteeringPlan()):
        assert torch.equal(model(**batch).last_hidden_state, want_plain)
    want = reference(model, "bert", plan, batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"])
    with steerkern.patch(model, plan):
        got = model(**batch).last_hidden_state
    assert (want - want_plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_interventions_at_one_site_apply_in_order():
    model = M.build("llama")
    d = M.HIDDEN
    v = torch.randn(d)
    q = steerkern.orthonormalize(v[None])
    # add v, then ablate it: the order matters
    plan = SteeringPlan([Intervention(SteerEntry(vector=v, alpha=3.0), "post_attn", [1]),
                         Intervention(SteerEntry(directions=q), "post_attn", [1])])
    ids = M.input_ids()
    want = reference(model, "llama", plan, ids)
    with steerkern.patch(model, plan):
        got = out_of(model, "llama", ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_per_layer_vectors():
    model = M.build("qwen2")
    vecs = torch.randn(M.LAYERS, M.HIDDEN)
    plan = SteeringPlan.add(vecs, 0.5, site="post_mlp")
    ids = M.input_ids()
    want = reference(model, "qwen2", plan, ids)
    with steerkern.patch(model, plan):
        torch.testing.assert_close(out_of(model, "qwen2", ids), want, atol=1e-4, rtol=1e-4)


def test_alpha_and_vector_change_by_tensor_write():
    model = M.build("llama")
    v, w = torch.randn(M.HIDDEN), torch.randn(M.HIDDEN)
    ids = M.input_ids()
    handle = steerkern.patch(model, SteeringPlan.add(v, 1.0, layers=[1], coefficients=[0.5]))
    handle.set_alpha(-2.0)
    got_alpha = out_of(model, "llama", ids)
    handle.set_vector(w)
    got_vec = out_of(model, "llama", ids)
    handle.remove()
    want_alpha = reference(model, "llama", SteeringPlan.add(v, -2.0, layers=[1], coefficients=[0.5]), ids)
    want_vec = reference(model, "llama", SteeringPlan.add(w, -2.0, layers=[1], coefficients=[0.5]), ids)
    torch.testing.assert_close(got_alpha, want_alpha, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_vec, want_vec, atol=1e-4, rtol=1e-4)


def test_repatching_replaces_the_plan_and_is_idempotent():
    model = M.build("mistral")
    ids = M.input_ids()
    a, b = SteeringPlan.add(torch.randn(M.HIDDEN), 1.0), SteeringPlan.add(torch.randn(M.HIDDEN), 1.0)
    steerkern.patch(model, a)
    steerkern.patch(model, a)
    got_a = out_of(model, "mistral", ids)
    steerkern.patch(model, b)
    got_b = out_of(model, "mistral", ids)
    assert sum(1 for m in model.modules() if type(m).__name__ == "LayerSteering") == M.LAYERS
    steerkern.unpatch(model)
    torch.testing.assert_close(got_a, reference(model, "mistral", a, ids), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_b, reference(model, "mistral", b, ids), atol=1e-4, rtol=1e-4)


# ---- sparsity ----------------------------------------------------------------

def median_thresholds(model, family, ids, mode="wina", jitter=False):
    """Per-(layer, projection) thresholds at the median score of a forward.

    With ``jitter`` each part of a fused projection gets its own threshold,
    which exercises the per-part split."""
    fam = registry.family_for(model)
    paths = fam.projection_paths()
    layers = M._layers(model)
    seen = {}
    hs = []
    for i, layer in enumerate(layers):
        for name, path in paths.items():
            mod = layer
            for p in path.split("."):
                mod = getattr(mod, p)
            hs.append(mod.register_forward_pre_hook(
                lambda m, a, key=(i, path): seen.__setitem__(key, (m, a[0].detach()))))
    out_of(model, family, ids)
    for h in hs:
        h.remove()
    thresholds = {}
    for i in range(len(layers)):
        for name, path in paths.items():
            m, x = seen[(i, path)]
            W = (m.weight.T if type(m).__name__ == "Conv1D" else m.weight).float()
            score = x.float().abs() * (W.norm(dim=0) if mode == "wina" else 1.0)
            t = float(score.median())
            thresholds.setdefault(i, {})[name] = t * (1.0 + 0.1 * list(paths).index(name) if jitter else 1.0)
    return thresholds


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "gpt2", "gpt_neox", "bert"])
def test_sparse_prefill_and_decode_match_masked_dense_reference(family):
    model = M.build(family)
    ids = M.input_ids(1, 6)
    jitter = family in ("phi3", "gpt2")
    plan = SparsityPlan(median_thresholds(model, family, ids, jitter=jitter), mode="wina")
    dense = out_of(model, family, ids)
    with M.hooked(M.sparse_reference(model, family, M.splits_for(model, family, plan))):
        want = out_of(model, family, ids)
    # decode path: one token at a time, through the KV cache where the model has one
    want_last = want[:, -1]
    with steerkern.patch(model, sparsity=plan) as handle:
        assert handle.memory["prepared_bytes"] > 0
        got = out_of(model, family, ids)
        if family != "bert":
            first = model(ids[:, :-1], use_cache=True)
            step = model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits[:, -1]
    assert (want - dense).abs().max() > 1e-3, "the thresholds must drop inputs"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if family != "bert":
        # the decode step ran the sparse kernel on one token; its cache came from the masked prefill
        torch.testing.assert_close(step, want_last, atol=1e-4, rtol=1e-4)


def lm_head_reference(model, threshold):
    """A hook that computes the output head densely on its WINA-masked input."""
    def hook(m, args, out):
        x = args[0].float()
        W = m.weight.float()
        xm = torch.where(x.abs() * W.norm(dim=0) > threshold, x, torch.zeros(()))
        return (xm @ W.T).to(out.dtype)
    return model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lm_head_sparsity_matches_masked_dense_reference(family):
    model = M.build(family)
    ids = M.input_ids(2, 6)
    dense = out_of(model, family, ids)
    x = model(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm: the head's input
    score = x.abs() * model.get_output_embeddings().weight.norm(dim=0)
    t = float(score.median())
    hook = lm_head_reference(model, t)
    want = out_of(model, family, ids)
    hook.remove()
    assert (want - dense).abs().max() > 1e-3, "the threshold must drop inputs"
    with steerkern.patch(model, sparsity=SparsityPlan({}, lm_head=t)) as handle:
        assert isinstance(model.get_output_embeddings(), SparseLinear)
        got = out_of(model, family, ids)
        first = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits[:, -1]
        handle.set_threshold(0.0, None, "lm_head")
        dense_again = out_of(model, family, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step, want[:, -1], atol=1e-4, rtol=1e-4)  # the decode kernel
    torch.testing.assert_close(dense_again, dense, atol=1e-4, rtol=1e-4)
    assert torch.equal(out_of(model, family, ids), dense)  # unpatched


def test_lm_head_dense_gemv_keeps_a_tied_head_and_its_embeddings():
    model = M.build("gpt2")  # ties lm_head.weight to the token embeddings
    ids = M.input_ids(1, 5)
    tied = model.get_output_embeddings().weight
    assert tied is model.get_input_embeddings().weight
    dense = out_of(model, "gpt2", ids)
    with steerkern.patch(model, sparsity=SparsityPlan({}, lm_head=0.0), drop_dense=True) as handle:
        assert model.get_input_embeddings().weight.shape == tied.shape  # not dropped
        assert handle.memory["dropped_bytes"] == 0
        torch.testing.assert_close(out_of(model, "gpt2", ids), dense, atol=1e-4, rtol=1e-4)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(out_of(model, "gpt2", ids), dense)


def test_lm_head_threshold_survives_save_and_load(tmp_path):
    plan = SparsityPlan({0: {"q_proj": 0.5}}, lm_head=0.25)
    plan.save(tmp_path / "plan.safetensors")
    assert SparsityPlan.load(tmp_path / "plan.safetensors").lm_head == 0.25
    with pytest.raises(ValueError, match="lm_head: a threshold must be >= 0"):
        SparsityPlan({}, lm_head=-1.0)


def test_lm_head_sparsity_on_a_model_without_a_head_is_a_clear_error():
    model = M.build("bert")
    with pytest.raises(ValueError, match="sparsity.lm_head: BertModel has no linear output head"):
        steerkern.patch(model, sparsity=SparsityPlan({}, lm_head=0.0))
    assert not hasattr(model, "_steerkern_handle") or model.__dict__.get("_steerkern_handle") is None


def test_sparse_teal_mode_and_dense_prefill():
    model = M.build("qwen3")
    ids = M.input_ids(1, 5)
    plan = SparsityPlan(median_thresholds(model, "qwen3", ids, mode="teal"), mode="teal", prefill="dense")
    dense = out_of(model, "qwen3", ids)

    def decode_step():
        first = model(ids[:, :-1], use_cache=True)
        return model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True)

    with steerkern.patch(model, sparsity=plan):
        got = out_of(model, "qwen3", ids)  # prefill: no mask
        step = decode_step().logits[:, -1]  # decode: the TEAL kernel
    assert torch.equal(got, dense)
    # the reference: an unmasked prefill, then one masked (|x| > t) decode step
    first = model(ids[:, :-1], use_cache=True)
    with M.hooked(M.sparse_reference(model, "qwen3", M.splits_for(model, "qwen3", plan))):
        want = model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits[:, -1]
    assert (want - dense[:, -1]).abs().max() > 1e-3, "the thresholds must drop inputs"
    torch.testing.assert_close(step, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_threshold_zero_equals_dense(family):
    model = M.build(family)
    ids = M.input_ids(1, 6)
    want = out_of(model, family, ids)
    first = model(ids[:, :-1], use_cache=True)
    want_step = model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits
    with steerkern.patch(model, sparsity=SparsityPlan.uniform(0.0, M.LAYERS)):
        got = out_of(model, family, ids)
        first = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, want_step, atol=1e-5, rtol=1e-5)


def test_minilm_real_weights_sparse_matches_masked_reference():
    model, tok = M.load_minilm()
    batch = tok(["sparse activations on real weights"], return_tensors="pt")
    plan = SparsityPlan(median_thresholds(model, "bert", batch["input_ids"]), mode="wina")
    with M.hooked(M.sparse_reference(model, "bert", M.splits_for(model, "bert", plan))):
        want = model(**batch).last_hidden_state
    with steerkern.patch(model, sparsity=plan):
        got = model(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_threshold_changes_by_tensor_write():
    model = M.build("llama")
    ids = M.input_ids(1, 4)
    want = out_of(model, "llama", ids)
    with steerkern.patch(model, sparsity=SparsityPlan.uniform(1e6, M.LAYERS)) as handle:
        assert not torch.allclose(out_of(model, "llama", ids), want, atol=1e-3)
        for layer in range(M.LAYERS):
            for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                handle.set_threshold(0.0, layer, p)
        torch.testing.assert_close(out_of(model, "llama", ids), want, atol=1e-5, rtol=1e-5)


# ---- unpatching ----------------------------------------------------------------

@pytest.mark.parametrize("drop_dense", [False, True])
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "bert"])
def test_unpatch_restores_outputs_weights_forward_and_frees_layouts(family, drop_dense):
    model = M.build(family)
    ids = M.input_ids()
    want = out_of(model, family, ids)
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    plan = mixed_plan(family)
    handle = steerkern.patch(model, plan, SparsityPlan.uniform(0.01, M.LAYERS), drop_dense=drop_dense)
    if drop_dense:
        assert handle.memory["dropped_bytes"] > 0
    layouts = [weakref.ref(p.weight_t) for s in handle.sparse_modules() for p in s.parts
               if p.weight_t.untyped_storage().data_ptr() not in
               {q.untyped_storage().data_ptr() for q, _ in params.values()}]
    assert layouts
    out_of(model, family, ids)
    steerkern.unpatch(model)
    del handle
    gc.collect()
    assert all(r() is None for r in layouts), "the prepared W^T copies must be freed"
    assert dict(model.named_modules()) == modules
    for n, p in model.named_parameters():
        orig, value = params[n]
        assert p is orig and torch.equal(p, value), n
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(out_of(model, family, ids), want)


def test_state_dict_keys_unchanged_while_patched():
    model = M.build("llama")
    keys = list(model.state_dict())
    with steerkern.patch(model, mixed_plan("llama"), SparsityPlan.uniform(0.01, M.LAYERS)):
        assert list(model.state_dict()) == keys


def test_class_level_apply_patches_models_built_afterwards():
    from steerkern.patching import apply_steerkern_to_llama

    plan = SteeringPlan.add(torch.randn(M.HIDDEN), 1.0)
    ids = M.input_ids()
    with apply_steerkern_to_llama(steering=plan):
        model = M.build("llama")
        got = out_of(model, "llama", ids)
        assert steerkern.patching.handle_of(model) is not None
    steerkern.unpatch(model)
    assert not hasattr(type(model).forward, "__steerkern_original__")
    torch.testing.assert_close(got, reference(model, "llama", plan, ids), atol=1e-4, rtol=1e-4)



def _decode_step(model, ids):
    first = model(ids[:, :-1], use_cache=True)
    return model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits[:, -1]


def _ungrouped(modules, fn):
    """fn() with the sibling groups of ``modules`` switched off, then back on."""
    groups = [m.group for m in modules]
    for m in modules:
        m.group = None
    try:
        return fn()
    finally:
        for m, grp in zip(modules, groups):
            m.group = grp


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_sibling_projections_share_one_kernel_call_and_stay_exact(family):
    model = M.build(family)
    ids = M.input_ids(1, 6)
    plan = SparsityPlan(median_thresholds(model, family, ids), mode="wina")
    with steerkern.patch(model, sparsity=plan):
        sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
        groups = {id(m.group): m.group for m in sparse if m.group is not None}
        names = sorted(tuple(sorted(n for ref in g.members for n in ref().names)) for g in groups.values())
        layers = len(M._layers(model))
        want = [("k_proj", "q_proj", "v_proj")] * layers
        if family == "llama":
            want += [("gate_proj", "up_proj")] * layers
        assert names == sorted(want)
        if family == "llama":
            together = _decode_step(model, ids)
            alone = _ungrouped(sparse, lambda: _decode_step(model, ids))
        else:  # an encoder has no decode step: call the grouped members on one token
            x = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
            members = [m for m in sparse if m.group is not None]
            together = torch.cat([m(x) for m in members], dim=-1)
            alone = _ungrouped(members, lambda: torch.cat([m(x) for m in members], dim=-1))
    assert torch.equal(together, alone), "grouped calls must equal per-module calls bit for bit"
    assert all(m.group is None for m in sparse), "unpatching drops the groups"


def test_sibling_groups_follow_a_dtype_move():
    # the group keeps its members' kernel arguments between calls: moving the
    # patched model must refresh them (stale fp32 weights would give fp32
    # outputs, or an error, instead of the bf16 projections)
    model = M.build("llama")
    ids = M.input_ids(1, 6)
    plan = SparsityPlan(median_thresholds(model, "llama", ids), mode="wina")
    with steerkern.patch(model, sparsity=plan):
        sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
        _decode_step(model, ids)  # the groups build their arguments in fp32
        model.to(torch.bfloat16)
        together = _decode_step(model, ids)
        alone = _ungrouped(sparse, lambda: _decode_step(model, ids))
    assert together.dtype == torch.bfloat16
    assert torch.equal(together, alone)


def test_a_sibling_fed_another_input_computes_its_own_output():
    model = M.build("llama")
    ids = M.input_ids(1, 6)
    plan = SparsityPlan(median_thresholds(model, "llama", ids), mode="wina")
    with steerkern.patch(model, sparsity=plan):
        attn = M._layers(model)[0].self_attn
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        assert q.group is not None and q.group is k.group is v.group
        g = torch.Generator().manual_seed(3)
        x1 = torch.randn(1, 1, model.config.hidden_size, generator=g)
        x2 = torch.randn(1, 1, model.config.hidden_size, generator=g)
        x1_before = x1.clone()
        got_q = q(x1)  # computes q, k and v of x1 in one call
        x1.add_(0.5)   # written in place: v must not take the cached v of the old x1
        got_v = v(x1)  # (and computes q, k and v of the new x1)
        got_k = k(x2)  # another tensor: k of x2, not the cached k of x1
        want = _ungrouped([q, k, v], lambda: (q(x1_before), k(x2), v(x1)))
    assert torch.equal(got_q, want[0]) and torch.equal(got_k, want[1]) and torch.equal(got_v, want[2])


def _post_mlp_plan(seed: int = 4) -> SteeringPlan:
    """Steering at every layer's post-MLP site only: each steered stream
    feeds the next layer's input norm (the fused path)."""
    g = torch.Generator().manual_seed(seed)
    d = M.HIDDEN
    q = steerkern.orthonormalize(torch.randn(1, d, generator=g))
    return SteeringPlan([
        Intervention(SteerEntry(vector=torch.randn(d, generator=g), alpha=0.7), "post_mlp"),
        Intervention(SteerEntry(directions=q, target=[0.5]), "post_mlp", layers=[0]),
    ])


def _count_norm_calls(model, name="input_layernorm"):
    calls = [0] * len(M._layers(model))
    hooks = [getattr(layer, name).register_forward_hook(
        lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1)) for i, layer in enumerate(M._layers(model))]
    return calls, hooks


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_post_mlp_steering_is_fused_with_the_next_input_norm(family):
    plan = _post_mlp_plan()
    ids = M.input_ids()
    model = M.build(family)
    with M.hooked(M.hook_reference(model, family, plan)):
        ref32 = model(ids, output_hidden_states=True)
    with steerkern.patch(model, plan):
        calls, hooks = _count_norm_calls(model)
        got = model(ids, output_hidden_states=True)
        for h in hooks:
            h.remove()
    # layer 0 normalizes its own input; every later one takes the norm fused
    # into the previous layer's post-MLP kernel call
    assert calls == [1] + [0] * (len(calls) - 1)
    torch.testing.assert_close(got.logits, ref32.logits, atol=1e-4, rtol=1e-4)
    for i, (g, w) in enumerate(zip(got.hidden_states, ref32.hidden_states)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m: f"hidden_states[{i}]: {m}")
    # bf16: within twice bf16's own error against the fp32 reference
    model16 = M.build(family, torch.bfloat16)
    ref16 = reference(model16, family, plan, ids).float()
    with steerkern.patch(model16, plan):
        got16 = out_of(model16, family, ids).float()
    own = (ref16 - ref32.logits).abs().max()
    assert (got16 - ref32.logits).abs().max() <= 2 * own + ref32.logits.abs().max() * 2.0 ** -8


def test_a_stream_changed_between_layers_gets_its_own_input_norm():
    # a hook that hands layer 1 another tensor (or writes the stream in place)
    # must not see the norm the previous layer computed for the old stream
    plan = _post_mlp_plan()
    ids = M.input_ids()
    model = M.build("llama")
    for in_place in (False, True):
        def shift(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if in_place:
                h.add_(0.25)
                return None
            h = h + 0.25
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
        hook = M._layers(model)[1].register_forward_pre_hook(shift, with_kwargs=True)
        try:
            want = reference(model, "llama", plan, ids)
            with steerkern.patch(model, plan):
                calls, hooks = _count_norm_calls(model)
                got = out_of(model, "llama", ids)
                for h in hooks:
                    h.remove()
        finally:
            hook.remove()
        assert calls[1] == 1, "layer 1 must run its own norm on the changed stream"
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_rows_left_unsteered_stay_bit_exact_through_the_fused_norms(family):
    # steering only on generated tokens: a prompt forward steers no row, so
    # neither the post-attention nor the post-MLP site may swap the model's
    # norms for the fused kernel's, and the output stays bit-exact
    g = torch.Generator().manual_seed(5)
    d = M.HIDDEN
    plan = SteeringPlan([
        Intervention(SteerEntry(vector=torch.randn(d, generator=g), alpha=0.7), site, positions="generated")
        for site in ("post_attn", "post_mlp")])
    model = M.build(family)
    ids = M.input_ids()
    want = out_of(model, family, ids)
    with steerkern.patch(model, plan):
        got = out_of(model, family, ids)
    assert torch.equal(got, want)
