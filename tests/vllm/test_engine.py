"""Per-request steering inside vLLM's engine (in-process, CPU, fp32, eager).

References: greedy generation of the same tiny Llama in plain transformers,
steered by forward hooks (hf_reference.py), and steerkern.patch where the
patching layer is available; and vLLM itself without steering.
"""
from __future__ import annotations

import pytest
import torch

import hf_reference as ref
from hf_reference import NUM_LAYERS

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

N_TOKENS = 8
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 9, 40], [1, 300, 12, 77, 5, 6], [1, 2, 3]]


def params(**steer):
    return SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=2, extra_args=steer or None)


def run(llm, prompts, plist):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], plist, use_tqdm=False)
    return ref.tokens(outs), outs


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return ref.load(tiny_llama)


def test_unsteered_vllm_matches_transformers(llm, hf):
    # the baseline the steered comparisons rest on
    got, _ = run(llm, PROMPTS, [params()] * len(PROMPTS))
    assert got == [ref.greedy(hf, p, N_TOKENS) for p in PROMPTS]


@pytest.mark.parametrize("site", ["pre", "post_attn", "post_mlp"])
def test_named_vectors_with_coefficients_match_transformers(llm, hf, vectors, site):
    steer = dict(steer_vectors=["joy", "calm"], steer_coefs=[3.0, -2.0], steer_layers=[1, 3], steer_site=site)
    got, _ = run(llm, PROMPTS[:2], [params(**steer)] * 2)
    total = 3.0 * vectors["joy"] + -2.0 * vectors["calm"]  # [L, d]
    want = [ref.greedy(hf, p, N_TOKENS, [ref.Add(total, [1, 3], site)]) for p in PROMPTS[:2]]
    assert got == want
    assert got != [ref.greedy(hf, p, N_TOKENS) for p in PROMPTS[:2]], "steering had no visible effect"


@pytest.mark.parametrize("positions", ["prompt", "generated", 6])
def test_positions_rules_match_transformers(llm, hf, vectors, positions):
    steer = dict(steer_vectors="joy", steer_coefs=4.0, steer_positions=positions)
    got, _ = run(llm, PROMPTS[:2], [params(**steer)] * 2)
    want = [ref.greedy(hf, p, N_TOKENS, [ref.Add(4.0 * vectors["joy"], range(NUM_LAYERS), "pre", positions)])
            for p in PROMPTS[:2]]
    assert got == want


def test_registered_plan_by_name_and_index_match_transformers(llm, hf, ablation_plan_file):
    _, plan = ablation_plan_file
    u = plan.interventions[0].entry.directions[0]
    want = [ref.greedy(hf, p, N_TOKENS, [ref.Ablate(u, [1, 2])]) for p in PROMPTS[:2]]
    by_name, _ = run(llm, PROMPTS[:2], [params(steer_plan="ablate")] * 2)
    by_index, _ = run(llm, PROMPTS[:2], [params(steer_plan=0)] * 2)
    assert by_name == want and by_index == want


def test_inline_vector_matches_steerkern_patch(llm, tiny_llama, vectors):
    patch = ref.optional_patch()
    if patch is None:
        pytest.skip("steerkern.patch is not available yet")
    import steerkern

    v = vectors["joy"] * 3.0
    got, _ = run(llm, PROMPTS[:1], [params(steer_vector=v.tolist(), steer_layers=[2])])
    model = ref.load(tiny_llama)
    plan = steerkern.SteeringPlan.add(v, 1.0, layers=[2], site="pre")
    with patch(model, steering=plan):
        out = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=N_TOKENS, do_sample=False,
                             min_new_tokens=N_TOKENS, pad_token_id=0)
    assert got[0] == out[0, len(PROMPTS[0]):].tolist()


def test_mixed_batch_equals_each_request_alone(llm):
    plist = [params(), params(steer_vectors="joy", steer_coefs=3.0),
             params(steer_vectors=["calm"], steer_coefs=[-2.5], steer_site="post_attn"),
             params(steer_plan="ablate", steer_vectors="joy", steer_coefs=1.5, steer_positions="generated")]
    mixed, _ = run(llm, PROMPTS, plist)
    alone = [run(llm, [p], [sp])[0][0] for p, sp in zip(PROMPTS, plist)]
    assert mixed == alone
    assert len({tuple(t) for t in mixed[:2]}) == 2


def test_unsteered_rows_of_a_mixed_batch_are_bit_exact(llm):
    # The same batch shape with and without steered neighbours: the unsteered
    # requests' logprobs must not move by a single bit.
    prompts = [[1, 17, 18, 19], [1, 20, 21, 22], [1, 23, 24, 25]]
    plain, plain_out = run(llm, prompts, [params()] * 3)
    _, mixed_out = run(llm, prompts, [params(), params(steer_vectors="joy", steer_coefs=5.0), params()])
    for i in (0, 2):
        a, b = plain_out[i].outputs[0], mixed_out[i].outputs[0]
        assert list(a.token_ids) == list(b.token_ids)
        for la, lb in zip(a.logprobs, b.logprobs):
            assert {k: v.logprob for k, v in la.items()} == {k: v.logprob for k, v in lb.items()}


def test_prefix_cache_is_not_shared_across_steering(llm):
    prompt = [1, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68]
    steered = params(steer_vectors="joy", steer_coefs=4.0, steer_positions="prompt")
    fresh, _ = run(llm, [prompt + [99]], [steered])
    run(llm, [prompt], [params()])                 # fills the prefix cache unsteered
    again, _ = run(llm, [prompt + [99]], [steered])
    assert again == fresh


@pytest.mark.parametrize("steer, message", [
    (dict(steer_vectors="nope"), "unknown vector 'nope'"),
    (dict(steer_vectors=5), "index 5 out of range"),
    (dict(steer_vector=[0.5] * 7), "expected 128 numbers"),
    (dict(steer_vectors="joy", steer_layers=[NUM_LAYERS]), "steer_layers"),
    (dict(steer_vectors="joy", steer_site="middle"), "steer_site"),
    (dict(steer_vectors=["joy", "calm"], steer_coefs=[1.0, 2.0, 3.0]), "steer_coefs"),
    (dict(steer_plan="missing"), "unknown plan"),
    (dict(steer_colour="red"), "unknown steering key"),
])
def test_bad_steering_is_rejected_and_others_keep_being_served(llm, steer, message):
    with pytest.raises(VLLMValidationError, match=message):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], params(**steer), use_tqdm=False)
    good, _ = run(llm, PROMPTS[:2], [params(), params(steer_vectors="joy")])
    assert len(good[0]) == N_TOKENS and len(good[1]) == N_TOKENS
