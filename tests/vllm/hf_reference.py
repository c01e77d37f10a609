"""Reference steered generation: plain transformers with forward hooks.

Independent of steerkern's code: each additive intervention is a hook that
adds ``c * v`` to the residual stream at its site, for the token positions
its rule selects.  In a Llama layer the stream after attention is
``residual + attn_out`` and after the MLP ``residual + mlp_out``, so adding to
the attention or MLP output adds to the stream.  Ablation of a unit direction
``u`` at a site subtracts ``(h . u) u`` from the stream there.
"""
from __future__ import annotations

import dataclasses
from typing import List, Sequence, Union

import torch

# the tiny test Llama (conftest.py builds it)
NUM_LAYERS = 4
HIDDEN = 128       # 4 heads of 32: the smallest head size vLLM's CPU attention takes
VOCAB = 512


@dataclasses.dataclass
class Add:
    vector: torch.Tensor               # [d] or [num_layers, d]
    layers: Sequence[int]
    site: str = "pre"                  # pre | post_attn | post_mlp
    positions: Union[str, int] = "all"


@dataclasses.dataclass
class Ablate:
    direction: torch.Tensor            # unit [d]
    layers: Sequence[int]
    sites: Sequence[str] = ("pre", "post_attn", "post_mlp")


def _selected(rule, pos: torch.Tensor, prompt_len: int) -> torch.Tensor:
    if rule == "all":
        return torch.ones_like(pos, dtype=torch.bool)
    if rule == "prompt":
        return pos < prompt_len
    if rule == "generated":
        return pos >= prompt_len
    return pos >= int(rule)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def greedy(model, prompt: List[int], n: int, steps: Sequence[Union[Add, Ablate]] = ()) -> List[int]:
    """``n`` greedy tokens after ``prompt`` (one row, KV cache), steered by ``steps``."""
    layers = model.model.layers
    state = {"pos": None}
    prompt_len = len(prompt)
    hooks = []

    def stream_edit(step, layer):
        def edit(h):
            if isinstance(step, Ablate):
                u = step.direction.to(h.dtype)
                return h - (h @ u)[..., None] * u
            v = step.vector[layer] if step.vector.dim() == 2 else step.vector
            mask = _selected(step.positions, state["pos"], prompt_len).to(h.dtype)
            return h + mask[None, :, None] * v.to(h.dtype)
        return edit

    for step in steps:
        sites = step.sites if isinstance(step, Ablate) else (step.site,)
        for layer in step.layers:
            for site in sites:
                hooks.append(_hook(layers[layer], site, stream_edit(step, layer)))
    try:
        ids = torch.tensor([prompt])
        past = None
        out: List[int] = []
        pos = 0
        for _ in range(n):
            state["pos"] = torch.arange(pos, pos + ids.shape[1])
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            pos += ids.shape[1]
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            ids = torch.tensor([[tok]])
        return out
    finally:
        for h in hooks:
            h.remove()


def _hook(layer, site, edit):
    if site == "pre":
        def pre(module, args, kwargs):
            if args:
                return (edit(args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs, hidden_states=edit(kwargs["hidden_states"]))
            return args, kwargs
        return layer.register_forward_pre_hook(pre, with_kwargs=True)
    if site == "post_attn":
        # stream after attention = residual + attn_out: edit it as a whole
        return _post_hook(layer.self_attn, layer, edit, "attn")
    return _post_hook(layer.mlp, layer, edit, "mlp")


def _post_hook(sub, layer, edit, which):
    """Edit the stream ``residual + sub(x)`` by rewriting the sub-module's output
    as ``edit(residual + out) - residual``; the residual is the layer's stream
    before the sub-block, captured by a pre-hook on the norm feeding it."""
    norm = layer.input_layernorm if which == "attn" else layer.post_attention_layernorm
    captured = {}

    def grab(module, args):
        captured["residual"] = args[0]

    def post(module, args, output):
        res = captured["residual"]
        if isinstance(output, tuple):
            return (edit(res + output[0]) - res,) + tuple(output[1:])
        return edit(res + output) - res

    h1 = norm.register_forward_pre_hook(grab)
    h2 = sub.register_forward_hook(post)

    class _Both:
        def remove(self):
            h1.remove()
            h2.remove()
    return _Both()


def tokens(outputs) -> List[List[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def optional_patch():
    """steerkern.patch, when the patching layer is there."""
    import steerkern

    return getattr(steerkern, "patch", None)


__all__ = ["Add", "Ablate", "greedy", "load", "tokens", "optional_patch"]
