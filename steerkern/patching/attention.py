"""steerkern's decode attention inside a patched transformers model.

transformers looks a model's attention function up by the name in
``config._attn_implementation`` (``"sdpa"``, ``"eager"``, ...).  Patching
with the decode kernel registers two names of ours, ``steerkern_sdpa`` and
``steerkern_eager``, one per original, and points the model's config at the
matching one.  The function behind it runs
the decode attention kernel (:func:`steerkern.ops.decode_attention`) for a decode step it can serve exactly
(one query token, every cached position visible, no soft-capping, sinks or
dropout, CPU) and calls the original function for everything else (prefill,
padded batches, sliding windows that cut the cache).  The mask that
transformers builds for our name is the original's, so the original always
gets the mask it expects.  Unpatching restores the config's name.

Why: on the CPU, torch's bf16 ``scaled_dot_product_attention`` is slow at
one query token (70 us per layer at 48 cached tokens, 737 us at 512, in
``python bench/bench_ops_cpu.py``'s committed run); the kernel took 12 and 61
us there, computing in fp32 and rounding once.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import backends
from ..ops import library

MODES = ("auto", "kernel", "model")
_ORIGINALS = ("sdpa", "eager")
_PREFIX = "steerkern_"
# keyword arguments whose presence (not None) changes the math
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias", "head_mask")


def _all_visible(mask: Optional[torch.Tensor]) -> bool:
    if mask is None:
        return True
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == 0).all())  # an additive mask: 0 where visible


def _original_function(original: str, module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if original == "eager":
        # the family's own eager function, as its attention module would pick it
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[original]


def _make(original: str) -> Callable:
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        # the kernel straight away where transformers' tensors fit it (the
        # checks of ops.decode_attention once per layer and token would be
        # work done twice: these shapes and dtypes come from the model)
        kernel = (library.decode_attention_kernel(query)
                  if query.shape[2] == 1 and query.device.type == "cpu" and not dropout else None)
        if (kernel is not None and not module.training
                and all(kwargs.get(name) is None for name in _UNSUPPORTED)
                and query.shape[1] % key.shape[1] == 0 and query.dtype == key.dtype == value.dtype
                and query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
                and _all_visible(attention_mask)):
            scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
            return kernel(query, key, value, scale), None
        return _original_function(original, module)(module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, **kwargs)

    attention.__name__ = f"{_PREFIX}{original}_attention"
    return attention


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for original in _ORIGINALS:
        AttentionInterface.register(_PREFIX + original, _make(original))
        AttentionMaskInterface.register(_PREFIX + original, ALL_MASK_ATTENTION_FUNCTIONS[original])
    _REGISTERED = True


def _interfaces_available() -> bool:
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # noqa: F401
    except ImportError:  # a transformers without registrable attention functions
        return False
    return True


def _configs(model: nn.Module) -> List:
    """The distinct configs that the model's modules read their attention from."""
    seen: Dict[int, object] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def plan(model: nn.Module, mode: str, sparse: bool, device: torch.device) -> bool:
    """Whether to install the kernel, checked before the model is touched.

    ``auto``: where the patch already trades exactness for speed (a sparsity
    plan) and the device has the kernel, so that a steering-only patch keeps
    the model's own attention, bit-exact with the hook reference.
    ``kernel``: always (an error where it cannot run); ``model``: never.
    """
    if mode not in MODES:
        raise ValueError(f"attention: expected one of {MODES}, got {mode!r}")
    if mode == "model":
        return False
    has_kernel = backends.extra("decode_attention", device.type) is not None
    names = {_implementation(c) for c in _configs(model)}
    servable = (bool(names) and names <= set(_ORIGINALS) | {_PREFIX + o for o in _ORIGINALS}
                and _interfaces_available())
    if mode == "kernel":
        if not has_kernel:
            raise ValueError(f"attention='kernel': no decode attention kernel for {device.type} tensors "
                             f"(the C++ CPU backend has one); use attention='model'")
        if not servable:
            raise ValueError(f"attention='kernel': the model's attention implementation is "
                             f"{sorted(map(str, names))}; the kernel stands in for {list(_ORIGINALS)} only, "
                             f"through transformers' AttentionInterface")
        return True
    return sparse and has_kernel and servable


def _implementation(cfg) -> Optional[str]:
    name = cfg._attn_implementation
    return name if isinstance(name, str) else None


def install(model: nn.Module) -> List[Tuple[object, Optional[str]]]:
    """Point the model's configs at our names; returns what to restore."""
    _register()
    restore = []
    for cfg in _configs(model):
        name = _implementation(cfg)
        original = name[len(_PREFIX):] if name and name.startswith(_PREFIX) else name
        restore.append((cfg, original))
        cfg._attn_implementation_internal = _PREFIX + original
    return restore


def uninstall(restore: List[Tuple[object, Optional[str]]]) -> None:
    for cfg, original in restore:
        cfg._attn_implementation_internal = original
