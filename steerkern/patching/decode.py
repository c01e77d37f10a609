"""A lean decode step for the attention and gated MLP blocks of a sparse patch.

With a sparsity plan the projections are :class:`~.modules.SparseLinear`
modules, and a decode step runs the kernel on them.  Reached through the
family's own block forwards, each kernel call sits under several module
calls (q, k, v and o; gate, up, down and the activation), each of which costs
Python that, inside a step whose projections have just streamed tens of MB
through the caches, is several times slower than it looks in a loop.  These
forwards do the same operations in the same order, with the sibling
projections (q/k/v, gate/up) in one kernel call and no module call around
it: the results are the block's own, bit for bit (tested per family).

They serve a call only where that holds (one token per row, eval mode, no
hooks on the block or its projections, every projection sparse and the
siblings grouped) and call the family's class forward for everything else.

The attention forward is verified against the classes named in
:data:`ATTENTIONS`: it applies the family's ``q_norm``/``k_norm`` where the
family does, and passes the attention function the same keyword arguments
(``sliding_window``, ``softcap``) as the family's forward.
"""
from __future__ import annotations

import sys
import types
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..ops import library
from .modules import SparseLinear


def _no_extra(module) -> dict:
    return {}


def _config_window(module) -> dict:  # Mistral reads it from the config
    return {"sliding_window": getattr(module.config, "sliding_window", None)}


def _window(module) -> dict:
    return {"sliding_window": getattr(module, "sliding_window", None)}


def _window_softcap(module) -> dict:
    return {"sliding_window": getattr(module, "sliding_window", None),
            "softcap": getattr(module, "attn_logit_softcapping", None)}


# attention class name -> (where its q_norm/k_norm apply: None, "heads" on
# [B, T, H, D] or "transposed" on [B, H, T, D]; the attention function's
# extra keyword arguments)
ATTENTIONS: Dict[str, tuple] = {
    "LlamaAttention": (None, _no_extra),
    "MistralAttention": (None, _config_window),
    "Qwen2Attention": (None, _window),
    "Qwen3Attention": ("heads", _window),
    "GemmaAttention": (None, _no_extra),
    "Gemma2Attention": (None, _window_softcap),
    "Gemma3Attention": ("transposed", _window),
}
# gated MLPs computing down(act(gate(x)) * up(x))
MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP")


def _hooked(modules) -> bool:
    m = nn.modules.module
    if (m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
            or m._global_backward_pre_hooks):
        return True
    return any(x._forward_hooks or x._forward_pre_hooks or x._backward_hooks or x._backward_pre_hooks
               for x in modules)


def _sparse_group(modules) -> bool:
    """All sparse, the first ones one SiblingGroup in this order."""
    if not all(isinstance(m, SparseLinear) for m in modules):
        return False
    group = modules[0].group
    return group is not None and [r() for r in group.members] == list(modules)


def _decode_input(x: Tensor):
    """The multi-part kernel for a decode-step input, or None."""
    if x.dim() != 3 or x.shape[1] != 1 or not library.is_direct(x):
        return None
    return library.sparse_parts_kernel(x)


def lean_attention_forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask=None,
                           past_key_values=None, **kwargs):
    lean = self.__dict__["_steerkern_lean"]
    fn = None
    if not self.training and position_embeddings is not None and not _hooked(lean.watched):
        fn = _decode_input(hidden_states)
    if fn is None:
        return lean.original(self, hidden_states, position_embeddings=position_embeddings,
                             attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
    B = hidden_states.shape[0]
    q, k, v = lean.group.run(hidden_states, fn)
    q = q.view(B, 1, -1, self.head_dim)
    k = k.view(B, 1, -1, self.head_dim)
    if lean.qk_norm == "heads":
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = v.view(B, 1, -1, self.head_dim).transpose(1, 2)
    if lean.qk_norm == "transposed":
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    q, k = lean.rope(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    attend = lean.interfaces.get_interface(self.config._attn_implementation, lean.eager)
    out, weights = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                          **lean.extra(self), **kwargs)
    out = out.reshape(B, 1, -1).contiguous()
    (out,) = fn(out, *self.o_proj.part_args())
    return out, weights


def lean_mlp_forward(self, x: Tensor) -> Tensor:
    lean = self.__dict__["_steerkern_lean"]
    fn = _decode_input(x) if not _hooked(lean.watched) else None
    if fn is None:
        return lean.original(self, x)
    gate, up = lean.group.run(x, fn)
    (out,) = fn(self.act_fn(gate) * up, *self.down_proj.part_args())
    return out


class _Lean:
    """What a lean forward needs, resolved once at patch time."""

    def __init__(self, module: nn.Module, watched: List[nn.Module], group, **extra) -> None:
        self.original = type(module).forward
        self.watched = watched  # hooks on the block itself run as ever: its __call__ is untouched
        self.group = group
        self.__dict__.update(extra)


def install(layers) -> List[nn.Module]:
    """Give each layer's attention and MLP the lean forward where it applies;
    returns the modules that got one (their instance ``forward`` and
    ``_steerkern_lean`` are dropped on unpatch)."""
    done = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        spec = ATTENTIONS.get(type(attn).__name__) if attn is not None else None
        if spec is not None:
            projs = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            family = sys.modules[type(attn).__module__]
            rope: Optional[Callable] = getattr(family, "apply_rotary_pos_emb", None)
            eager = getattr(family, "eager_attention_forward", None)
            if (_sparse_group(projs[:3]) and isinstance(projs[3], SparseLinear) and projs[3].group is None
                    and rope is not None and eager is not None
                    and all(hasattr(attn, a) for a in ("head_dim", "scaling", "layer_idx", "config"))
                    and (spec[0] is None or (hasattr(attn, "q_norm") and hasattr(attn, "k_norm")))):
                from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

                attn._steerkern_lean = _Lean(attn, projs, projs[0].group, qk_norm=spec[0], extra=spec[1],
                                             rope=rope, eager=eager, interfaces=ALL_ATTENTION_FUNCTIONS)
                attn.forward = types.MethodType(lean_attention_forward, attn)
                done.append(attn)
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and type(mlp).__name__ in MLPS:
            projs = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
            act = getattr(mlp, "act_fn", None)
            if (_sparse_group(projs[:2]) and isinstance(projs[2], SparseLinear) and projs[2].group is None
                    and isinstance(act, nn.Module)):
                mlp._steerkern_lean = _Lean(mlp, projs + [act], projs[0].group)
                mlp.forward = types.MethodType(lean_mlp_forward, mlp)
                done.append(mlp)
    return done


def uninstall(modules: List[nn.Module]) -> None:
    for m in modules:
        m.__dict__.pop("forward", None)
        m.__dict__.pop("_steerkern_lean", None)
