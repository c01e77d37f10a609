"""Where things live in each supported transformers family.

A :class:`Family` says where the list of layers is, what the layer's
structure is (``kind``, which picks the steered layer forward in
:mod:`steerkern.patching.forwards`), which RMSNorm weight offset the family
uses (Gemma stores ``weight - 1``), where the residual stream after attention
is normalized for the MLP, and where the q/k/v/o/gate/up/down projections are,
under their canonical names (:data:`steerkern.plan.PROJECTIONS`).

Layer kinds:

* ``prenorm``: ``h += attn(norm1(h)); h += mlp(norm2(h))`` with RMSNorm
  (Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3);
* ``sandwich``: as prenorm, with extra norms on the attention and MLP outputs
  (Gemma2, Gemma3);
* ``gpt2``: prenorm with LayerNorm (GPT-2);
* ``neox``: GPT-NeoX, parallel or sequential residual;
* ``wrap``: the original layer forward is kept and wrapped (BERT's post-LN
  encoder, the generic fallback).

An unknown architecture gets a ValueError listing the supported families,
unless the plan only needs residual-stream steering (sites ``pre`` and
``post_mlp``) and a list of layers can be found: then the generic fallback
serves it.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..plan import SITES

Projection = Tuple[str, Tuple[str, ...]]  # (path inside the layer, canonical names it computes)

# canonical projections that read the same input in every family's layer: a
# patched layer's separate modules for them run as one kernel call at decode
# (see patching.modules.SiblingGroup; exact even where a model breaks this)
INPUT_GROUPS: Tuple[Tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _llama_projections() -> Tuple[Projection, ...]:
    return tuple((f"self_attn.{p}", (p,)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) + tuple(
        (f"mlp.{p}", (p,)) for p in ("gate_proj", "up_proj", "down_proj"))


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture family (see the module doc)."""

    name: str
    model_types: Tuple[str, ...]
    kind: str
    layer_paths: Tuple[Tuple[str, str], ...]  # (path of the module owning the layers, its layers attribute)
    projections: Tuple[Projection, ...] = ()
    norm_offset: float = 0.0
    mlp_norm: Optional[str] = None           # the RMSNorm the post-attention residual feeds (fused site)
    post_attn_module: Optional[str] = None   # kind "wrap": the module whose output is the post-attention stream
    sites: Tuple[str, ...] = SITES

    def projection_paths(self) -> Dict[str, str]:
        """canonical name -> path in a layer."""
        return {name: path for path, names in self.projections for name in names}

    def find_layers(self, model: nn.Module) -> Optional[Tuple[nn.Module, str, nn.ModuleList]]:
        """``(owner, attribute, layers)`` for ``model``, or None."""
        for owner_path, attr in self.layer_paths:
            owner = submodule(model, owner_path)
            layers = getattr(owner, attr, None) if owner is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers):
                return owner, attr, layers
        return None


def submodule(root: nn.Module, path: str):
    """The module at dotted ``path`` under ``root`` ('' is root itself), or None."""
    obj = root
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_DECODER_PATHS = (("model", "layers"), ("", "layers"), ("model.language_model", "layers"),
                  ("language_model", "layers"))

FAMILIES: Tuple[Family, ...] = (
    Family("llama", ("llama",), "prenorm", _DECODER_PATHS, _llama_projections(),
           mlp_norm="post_attention_layernorm"),
    Family("mistral", ("mistral",), "prenorm", _DECODER_PATHS, _llama_projections(),
           mlp_norm="post_attention_layernorm"),
    Family("qwen2", ("qwen2",), "prenorm", _DECODER_PATHS, _llama_projections(),
           mlp_norm="post_attention_layernorm"),
    Family("qwen3", ("qwen3",), "prenorm", _DECODER_PATHS, _llama_projections(),
           mlp_norm="post_attention_layernorm"),
    Family("gemma", ("gemma",), "prenorm", _DECODER_PATHS, _llama_projections(), norm_offset=1.0,
           mlp_norm="post_attention_layernorm"),
    Family("gemma2", ("gemma2",), "sandwich", _DECODER_PATHS, _llama_projections(), norm_offset=1.0,
           mlp_norm="pre_feedforward_layernorm"),
    Family("gemma3", ("gemma3_text", "gemma3"), "sandwich", _DECODER_PATHS, _llama_projections(),
           norm_offset=1.0, mlp_norm="pre_feedforward_layernorm"),
    Family("phi3", ("phi3",), "prenorm", _DECODER_PATHS,
           (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("self_attn.o_proj", ("o_proj",)),
            ("mlp.gate_up_proj", ("gate_proj", "up_proj")), ("mlp.down_proj", ("down_proj",))),
           mlp_norm="post_attention_layernorm"),
    Family("gpt2", ("gpt2",), "gpt2", (("transformer", "h"), ("", "h")),
           (("attn.c_attn", ("q_proj", "k_proj", "v_proj")), ("attn.c_proj", ("o_proj",)),
            ("mlp.c_fc", ("up_proj",)), ("mlp.c_proj", ("down_proj",)))),
    Family("gpt_neox", ("gpt_neox",), "neox", (("gpt_neox", "layers"), ("", "layers")),
           (("attention.query_key_value", ("q_proj", "k_proj", "v_proj")), ("attention.dense", ("o_proj",)),
            ("mlp.dense_h_to_4h", ("up_proj",)), ("mlp.dense_4h_to_h", ("down_proj",)))),
    Family("bert", ("bert",), "wrap", (("bert.encoder", "layer"), ("encoder", "layer")),
           (("attention.self.query", ("q_proj",)), ("attention.self.key", ("k_proj",)),
            ("attention.self.value", ("v_proj",)), ("attention.output.dense", ("o_proj",)),
            ("intermediate.dense", ("up_proj",)), ("output.dense", ("down_proj",))),
           post_attn_module="attention.output"),
)

GENERIC = Family("generic", (), "wrap",
                 (("model", "layers"), ("", "layers"), ("transformer", "h"), ("", "h"),
                  ("model.decoder", "layers"), ("encoder", "layer"), ("model.language_model", "layers")),
                 sites=("pre", "post_mlp"))

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported() -> List[str]:
    return [f.name for f in FAMILIES]


def model_type(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def family_for(model: nn.Module, *, sites: Sequence[str] = (), sparsity: bool = False) -> Family:
    """The family of ``model``; the generic fallback where it can serve.

    ``sites`` and ``sparsity`` say what the plan needs, so that an unknown
    architecture is refused when the fallback cannot serve the plan.
    """
    mt = model_type(model)
    fam = _BY_TYPE.get(mt)
    if fam is not None:
        if fam.find_layers(model) is None:
            raise ValueError(f"model: a {fam.name} model whose list of layers was not found at "
                             f"{[f'{p}.{a}'.lstrip('.') for p, a in fam.layer_paths]}")
        return fam
    needs = sorted(set(sites) - set(GENERIC.sites))
    found = GENERIC.find_layers(model)
    if found is None or needs or sparsity:
        why = ("no list of layers was found" if found is None else
               "sparsity needs the projections' locations" if sparsity else
               f"sites {needs} need the layer's structure")
        raise ValueError(
            f"model: architecture {mt or type(model).__name__!r} is not supported ({why}). "
            f"Supported families: {', '.join(supported())}. Unknown architectures get residual-stream "
            f"steering only (sites 'pre' and 'post_mlp'), where a list of layers can be found.")
    return GENERIC


def hidden_size(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        val = getattr(text, name, None)
        if isinstance(val, int):
            return val
    return None


def part_widths(family: Family, names, config) -> Optional[List[int]]:
    """Output widths of the parts of a fused projection; None: cannot split it."""
    if len(names) == 1:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if family.name == "phi3":
        if names == ("gate_proj", "up_proj"):
            return [text.intermediate_size] * 2
        hd = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return [text.num_attention_heads * hd, kv * hd, kv * hd]
    if family.name == "gpt2":
        return [text.n_embd] * 3
    return None  # GPT-NeoX interleaves q, k, v per head: one part


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
