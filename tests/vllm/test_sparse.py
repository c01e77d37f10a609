"""Norm-aware sparse activation inside vLLM (one plan per engine).

Reference: the same tiny Llama in plain transformers with each projection's
input masked by forward pre-hooks, ``x * (|x_i| * ||W[:, i]|| > t)`` (WINA),
which is the masked-dense definition of sparse_linear.
"""
from __future__ import annotations

import pytest
import torch

import hf_reference as ref

pytest.importorskip("vllm")

N_TOKENS = 8
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 9, 40, 41, 42]]
LAYERS = (1, 2)
PROJ = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj"}


def _linear(model, layer, name):
    mod = model.model.layers[layer]
    for part in PROJ[name].split("."):
        mod = getattr(mod, part)
    return mod


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return ref.load(tiny_llama)


def plan_thresholds(t):
    return {layer: {name: t for name in PROJ} for layer in LAYERS}


@pytest.fixture(scope="module")
def thresholds(hf):
    """One WINA threshold for every projection of LAYERS, chosen so that no
    score of the reference runs lies within 2e-6 (relative) of it: a mask
    decision that close would depend on rounding, not on the code under test."""
    for t in (0.5, 0.45, 0.55, 0.4, 0.6, 0.35, 0.65):
        th = plan_thresholds(t)
        margins = []
        for p in PROMPTS:
            for dense_prefill in (False, True):
                masked_greedy(hf, p, N_TOKENS, th, dense_prefill, margins)
        if min(margins) > 2e-6:
            return th
    pytest.fail("no threshold with a safe margin found")


@torch.no_grad()
def masked_greedy(model, prompt, n, thresholds, dense_prefill, margins=None):
    state = {"prefill": True}
    hooks = []
    for layer, per in thresholds.items():
        for name, t in per.items():
            lin = _linear(model, layer, name)
            colnorm = lin.weight.float().norm(dim=0)

            def mask(module, args, t=t, colnorm=colnorm):
                if dense_prefill and state["prefill"]:
                    return None
                x = args[0]
                score = x.float().abs() * colnorm
                keep = score > t
                if margins is not None:
                    margins.append(float(((score - t).abs() / t).min()))
                return (torch.where(keep, x, torch.zeros_like(x)),)
            hooks.append(lin.register_forward_pre_hook(mask))
    try:
        ids, past, out = torch.tensor([prompt]), None, []
        for _ in range(n):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            state["prefill"] = False
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
        return out
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("prefill", ["sparse", "dense"])
def test_sparse_engine_matches_masked_dense_transformers(tiny_llama, hf, thresholds, prefill, tmp_path):
    import os

    import steerkern
    from vllm import LLM, SamplingParams

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    plan = steerkern.SparsityPlan(thresholds, mode="wina", prefill=prefill)
    path = tmp_path / "sparsity.safetensors"
    plan.save(path)
    llm = LLM(model=tiny_llama, dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=4, seed=0,
              kv_cache_memory_bytes=32 << 20, additional_config={"steerkern": {"sparsity": str(path)}})
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True)
        got = ref.tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False))
        steered = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True,
                                 extra_args={"steer_vector": [0.0] * ref.HIDDEN})
        with_steering = ref.tokens(llm.generate([{"prompt_token_ids": PROMPTS[0]}], steered, use_tqdm=False))
    finally:
        del llm
    want = [masked_greedy(hf, p, N_TOKENS, thresholds, prefill == "dense") for p in PROMPTS]
    assert got == want
    assert want != [ref.greedy(hf, p, N_TOKENS) for p in PROMPTS], "sparsity had no visible effect"
    assert with_steering[0] == got[0]  # a zero steering vector changes nothing, sparse or not
