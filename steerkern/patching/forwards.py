"""Steered layer forwards, one per layer kind (see :mod:`.registry`).

Each is the family's own layer forward with the three steering sites made
explicit.  A site with no steering runs exactly the original operations in
the original order, so a layer patched with an empty plan computes bit-exact
what it computed before.  Where the post-attention residual feeds an RMSNorm
(prenorm and sandwich kinds) a steered site is one fused
``add_steer_rmsnorm``: residual add, steer and norm in one pass.

Every forward reads its layer's :class:`LayerSteering` (``self.steerkern``)
and passes the layer's other arguments on to the attention unchanged.  A
stream the forward has just formed itself (``residual + out``) is steered in
place (``SiteSteer.steer_owned``), or formed and steered in one kernel call
(``SiteSteer.add_steer``); the layer's input, which the caller may still hold
(``output_hidden_states``), is never written.
"""
from __future__ import annotations

import inspect
import weakref
from typing import List, Optional

import torch
from torch import Tensor, nn

from .modules import SiteSteer


class LayerSteering(nn.Module):
    """The steering sites of one layer, attached to it as ``layer.steerkern``."""

    def __init__(self, layer_module: nn.Module, pre: Optional[SiteSteer], post_attn: Optional[SiteSteer],
                 post_mlp: Optional[SiteSteer], mlp_norm: Optional[str], norm_offset: float) -> None:
        super().__init__()
        self.pre, self.post_attn, self.post_mlp = pre, post_attn, post_mlp
        self.norm_offset = norm_offset
        self.mlp_norm = mlp_norm
        self._next = None    # set by link_next: (next LayerSteering, its input norm, eps), weakly
        self._normed = None  # (r, r's version, rmsnorm(r)) left by the previous layer
        if mlp_norm is not None:
            norm = getattr(layer_module, mlp_norm)
            self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        sig = inspect.signature(type(layer_module).forward)
        # names of the positional arguments after hidden_states, to pass them on by name
        self.arg_names: List[str] = [p.name for p in list(sig.parameters.values())[2:]
                                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def extra_repr(self) -> str:
        return f"mlp_norm={self.mlp_norm}, norm_offset={self.norm_offset}"

    def kwargs(self, args, kwargs) -> dict:
        if args:
            kwargs.update(zip(self.arg_names, args))
        return kwargs

    def fused_norm(self, layer: nn.Module, x: Tensor, residual: Tensor):
        """``(r, y)``: the steered post-attention stream and its MLP norm, in
        one kernel call where every row is steered (see
        ``SiteSteer.steers_every_row``), else the steered stream and the
        layer's own norm of it."""
        norm = getattr(layer, self.mlp_norm)
        if not self.post_attn.steers_every_row(residual):
            r = self.post_attn.add_steer(residual, x)
            return r, norm(r)
        return self.post_attn.add_norm(x, residual, norm.weight, self.eps, self.norm_offset)

    # The post-MLP site fused with the next layer's input RMSNorm: the layer
    # returns r = steer(residual + x) and leaves y = rmsnorm(r) for the next
    # layer, which uses it only if it is called with that very r, unmodified
    # (otherwise it runs its own norm).  Steering then replaces the add and
    # the norm's several elementwise ops with one kernel call.  Eager
    # inference only, and only where every row is steered (an unsteered row
    # stays bit-exact, its norm included); the next layer's norm module is
    # then not called (its hooks do not run), as with the post-attention site.

    def link_next(self, next_layer: nn.Module, norm_name: str) -> None:
        """Fuse this layer's post-MLP site with ``next_layer``'s ``norm_name``."""
        norm = getattr(next_layer, norm_name)
        # weak references, not submodules: the model owns both
        self._next = (weakref.ref(next_layer.steerkern), weakref.ref(norm),
                      float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))))

    def post_mlp_stream(self, residual: Tensor, x: Tensor) -> Tensor:
        """The layer's output, ``steer(residual + x)`` (post_mlp is set)."""
        nxt = self._next
        if (nxt is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and self.post_mlp.steers_every_row(residual)):
            sk, norm = nxt[0](), nxt[1]()
            if sk is not None and norm is not None:
                r, y = self.post_mlp.add_norm(x, residual, norm.weight, nxt[2], self.norm_offset)
                sk._normed = (r, r._version, y)
                return r
        return self.post_mlp.add_steer(residual, x)

    def take_normed(self, h: Tensor) -> Optional[Tensor]:
        """The input norm of ``h`` that the previous layer computed, or None."""
        got = self._normed
        if got is None:
            return None
        self._normed = None
        r, version, y = got
        return y if r is h and h._version == version else None


def _dropout(layer, name: str, x: Tensor) -> Tensor:
    # a dict lookup: getattr on a module that lacks the name raises and
    # catches an AttributeError inside nn.Module.__getattr__ every call
    mod = layer._modules.get(name)
    return x if mod is None else mod(x)


def prenorm_forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
    """Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3."""
    sk = self.steerkern
    kwargs = sk.kwargs(args, kwargs)
    if sk.pre is not None:
        hidden_states = sk.pre(hidden_states)
    residual = hidden_states
    x = sk.take_normed(hidden_states)
    if x is None:
        x = self.input_layernorm(hidden_states)
    x, _ = self.self_attn(hidden_states=x, **kwargs)
    x = _dropout(self, "resid_attn_dropout", x)  # Phi-3
    if sk.post_attn is None:
        hidden_states = residual + x
        residual = hidden_states
        x = self.post_attention_layernorm(hidden_states)
    else:
        residual, x = sk.fused_norm(self, x, residual)
    x = _dropout(self, "resid_mlp_dropout", self.mlp(x))
    return residual + x if sk.post_mlp is None else sk.post_mlp_stream(residual, x)


def sandwich_forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
    """Gemma2, Gemma3: norms on both sides of attention and MLP."""
    sk = self.steerkern
    kwargs = sk.kwargs(args, kwargs)
    if sk.pre is not None:
        hidden_states = sk.pre(hidden_states)
    residual = hidden_states
    x = sk.take_normed(hidden_states)
    if x is None:
        x = self.input_layernorm(hidden_states)
    x, _ = self.self_attn(hidden_states=x, **kwargs)
    x = self.post_attention_layernorm(x)
    if sk.post_attn is None:
        hidden_states = residual + x
        residual = hidden_states
        x = self.pre_feedforward_layernorm(hidden_states)
    else:
        residual, x = sk.fused_norm(self, x, residual)
    x = self.mlp(x)
    x = self.post_feedforward_layernorm(x)
    return residual + x if sk.post_mlp is None else sk.post_mlp_stream(residual, x)


def gpt2_forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
    """GPT-2 (LayerNorm: the steer op, then the original norm)."""
    sk = self.steerkern
    kwargs = sk.kwargs(args, kwargs)
    if kwargs.pop("encoder_hidden_states", None) is not None:
        raise ValueError("encoder_hidden_states: GPT-2 cross-attention is not supported by steerkern patching")
    kwargs.pop("encoder_attention_mask", None)
    if sk.pre is not None:
        hidden_states = sk.pre(hidden_states)
    residual = hidden_states
    attn_output, _ = self.attn(self.ln_1(hidden_states), **kwargs)
    hidden_states = attn_output + residual
    if sk.post_attn is not None:
        hidden_states = sk.post_attn.steer_owned(hidden_states)
    residual = hidden_states
    x = self.mlp(self.ln_2(hidden_states))
    return residual + x if sk.post_mlp is None else sk.post_mlp.add_steer(residual, x)


def neox_forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
    """GPT-NeoX; with the parallel residual there is no post-attention stream."""
    sk = self.steerkern
    kwargs = sk.kwargs(args, kwargs)
    if sk.pre is not None:
        hidden_states = sk.pre(hidden_states)
    attn_output, _ = self.attention(self.input_layernorm(hidden_states), **kwargs)
    attn_output = self.post_attention_dropout(attn_output)
    if self.use_parallel_residual:
        mlp_output = self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        hidden_states = mlp_output + attn_output + hidden_states
    else:
        attn_output = attn_output + hidden_states
        if sk.post_attn is not None:
            attn_output = sk.post_attn.steer_owned(attn_output)
        mlp_output = self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(attn_output)))
        hidden_states = mlp_output + attn_output
    return hidden_states if sk.post_mlp is None else sk.post_mlp.steer_owned(hidden_states)


def wrap_forward(self, hidden_states: Tensor, *args, **kwargs):
    """BERT and the generic fallback: the original forward, steered around.

    The post-attention site (BERT) is the output of the module named by the
    family's ``post_attn_module``, steered by :func:`wrap_module_output`.
    """
    sk = self.steerkern
    if sk.pre is not None:
        hidden_states = sk.pre(hidden_states)
    out = type(self).forward(self, hidden_states, *args, **kwargs)
    if sk.post_mlp is None:
        return out
    if isinstance(out, tuple):
        return (sk.post_mlp(out[0]),) + out[1:]
    return sk.post_mlp(out)


def wrap_module_output(module: nn.Module, site: SiteSteer):
    """A forward for ``module`` that steers what its class forward returns."""
    original = type(module).forward

    def forward(*args, **kwargs):
        out = original(module, *args, **kwargs)
        if isinstance(out, tuple):
            return (site(out[0]),) + out[1:]
        return site(out)

    return forward


FORWARDS = {
    "prenorm": prenorm_forward,
    "sandwich": sandwich_forward,
    "gpt2": gpt2_forward,
    "neox": neox_forward,
    "wrap": wrap_forward,
}
