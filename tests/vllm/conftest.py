"""Fixtures of the vLLM integration tests.

These tests need vLLM, which lives in its own venv (``tests/vllm/setup_venv.sh``).
Without it only the request-format tests (test_spec.py) run; the others are
not collected.  Models are tiny Llamas built from a config and saved to a temp
dir, with a word-level tokenizer built here: nothing is downloaded.
"""
from __future__ import annotations

import os

import pytest
import torch

try:  # vLLM's CPU build; absent in the main environment
    import vllm
    # this folder is named vllm too: without the real package, `import vllm`
    # finds it as an empty namespace package
    HAVE_VLLM = getattr(vllm, "__file__", None) is not None
except Exception:
    HAVE_VLLM = False

collect_ignore = [] if HAVE_VLLM else ["test_engine.py", "test_server.py", "test_sparse.py"]

from hf_reference import HIDDEN, NUM_LAYERS, VOCAB


def save_tiny_llama(path, *, hidden=HIDDEN, layers=NUM_LAYERS, vocab=VOCAB, intermediate=256, heads=4,
                    kv_heads=2, seed=0, init=0.1):
    """A random tiny Llama plus a word-level tokenizer ("t0".."t{vocab-1}")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, tie_word_embeddings=False, initializer_range=init,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def vectors():
    """Registered vectors: one [d], one per layer [L, d]."""
    g = torch.Generator().manual_seed(7)
    return {"joy": torch.randn(HIDDEN, generator=g) * 2.0,
            "calm": torch.randn(NUM_LAYERS, HIDDEN, generator=g) * 1.5}


@pytest.fixture(scope="session")
def vectors_file(tmp_path_factory, vectors):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("vectors") / "vectors.safetensors"
    save_file({k: v.contiguous() for k, v in vectors.items()}, str(path))
    return str(path)


@pytest.fixture(scope="session")
def ablation_plan_file(tmp_path_factory):
    """A registered plan: ablate one direction at every site of layers 1-2."""
    import steerkern

    g = torch.Generator().manual_seed(11)
    u = torch.randn(HIDDEN, generator=g)
    plan = steerkern.SteeringPlan.ablate((u / u.norm())[None], layers=[1, 2])
    path = tmp_path_factory.mktemp("plans") / "ablate.safetensors"
    plan.save(path)
    return str(path), plan


@pytest.fixture(scope="session")
def llm(tiny_llama, vectors_file, ablation_plan_file):
    """One in-process vLLM engine (CPU, fp32, eager) with the plugin and the
    registered vectors and plan."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    engine = LLM(model=tiny_llama, dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=16,
                 seed=0, kv_cache_memory_bytes=64 << 20,
                 additional_config={"steerkern": {"vectors": vectors_file,
                                                  "plans": {"ablate": ablation_plan_file[0]}}})
    yield engine
    del engine
