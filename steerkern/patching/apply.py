"""Class-level patching, per family, in the style of Liger-Kernel's
``apply_liger_kernel_to_<family>``.

``apply_steerkern_to_llama(steering=..., sparsity=...)`` makes every Llama
model that runs afterwards patch itself with those plans on its first
forward (after its weights are loaded, so sparse layouts are prepared from
the real weights).  With ``model=...`` it patches that live model now, like
:func:`steerkern.patch`.  The returned :class:`ClassPatch` undoes the
class-level change (models already patched keep their patch until
``steerkern.unpatch``).
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable, Dict, List, Optional

from torch import nn

from ..plan import SparsityPlan, SteeringPlan
from . import registry
from .patch import _HANDLE_ATTR, PatchHandle, patch

# family name -> (steering, sparsity, options) that models of it patch themselves with
_CLASS_PLANS: Dict[str, tuple] = {}


class ClassPatch:
    """Undo handle of a class-level patch."""

    def __init__(self, family: str, classes: List[type]) -> None:
        self.family, self.classes = family, classes

    def remove(self) -> None:
        _CLASS_PLANS.pop(self.family, None)
        for cls in self.classes:
            original = getattr(cls.forward, "__steerkern_original__", None)
            if original is not None:
                cls.forward = original

    def __enter__(self) -> "ClassPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _family_classes(family: registry.Family) -> List[type]:
    from transformers import PreTrainedModel

    module = importlib.import_module(f"transformers.models.{family.name}.modeling_{family.name}")
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, PreTrainedModel) and c.__module__ == module.__name__
            and "forward" in c.__dict__]


def _patched_on_first_forward(cls: type, family: registry.Family) -> Callable:
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        plans = _CLASS_PLANS.get(family.name)
        if plans is not None and self.__dict__.get(_HANDLE_ATTR) is None:
            found = family.find_layers(self)
            if found is not None and found[0].__dict__.get(_HANDLE_ATTR) is None:
                steering, sparsity, options = plans
                patch(self, steering, sparsity, **options)
        return original(self, *args, **kwargs)

    forward.__steerkern_original__ = original
    return forward


def _apply(family_name: str, steering: Optional[SteeringPlan] = None, sparsity: Optional[SparsityPlan] = None,
           model: Optional[nn.Module] = None, **options):
    family = next(f for f in registry.FAMILIES if f.name == family_name)
    if model is not None:
        mt = registry.model_type(model)
        if mt not in family.model_types:
            raise ValueError(f"model: expected a {family.name} model, got model_type {mt!r}")
        return patch(model, steering, sparsity, **options)
    if steering is not None and not isinstance(steering, SteeringPlan):
        raise ValueError(f"steering: expected a SteeringPlan, got {type(steering).__name__}")
    if sparsity is not None and not isinstance(sparsity, SparsityPlan):
        raise ValueError(f"sparsity: expected a SparsityPlan, got {type(sparsity).__name__}")
    classes = _family_classes(family)
    for cls in classes:
        if not hasattr(cls.forward, "__steerkern_original__"):
            cls.forward = _patched_on_first_forward(cls, family)
    _CLASS_PLANS[family.name] = (steering, sparsity, options)
    return ClassPatch(family.name, classes)


def _make(family_name: str):
    def apply(steering: Optional[SteeringPlan] = None, sparsity: Optional[SparsityPlan] = None,
              model: Optional[nn.Module] = None, **options):
        return _apply(family_name, steering, sparsity, model, **options)

    apply.__name__ = apply.__qualname__ = f"apply_steerkern_to_{family_name}"
    apply.__doc__ = (f"Patch {family_name} models with these plans: ``model`` now, or else every "
                     f"{family_name} model on its first forward. Returns a PatchHandle or a ClassPatch.")
    return apply


apply_steerkern_to_llama = _make("llama")
apply_steerkern_to_mistral = _make("mistral")
apply_steerkern_to_qwen2 = _make("qwen2")
apply_steerkern_to_qwen3 = _make("qwen3")
apply_steerkern_to_gemma = _make("gemma")
apply_steerkern_to_gemma2 = _make("gemma2")
apply_steerkern_to_gemma3 = _make("gemma3")
apply_steerkern_to_phi3 = _make("phi3")
apply_steerkern_to_gpt2 = _make("gpt2")
apply_steerkern_to_gpt_neox = _make("gpt_neox")
apply_steerkern_to_bert = _make("bert")

__all__ = ["ClassPatch", "PatchHandle"] + [f"apply_steerkern_to_{f.name}" for f in registry.FAMILIES]
