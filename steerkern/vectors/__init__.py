"""Steering vectors: extraction, composition, files, weight baking, conditions.

* :class:`VectorSet` - per-layer vectors with metadata, arithmetic, plans;
* :mod:`.extract` - vectors from contrastive prompts (mean difference, PCA,
  logistic probe) at chosen layers and token positions;
* :mod:`.select` - pick the layer/direction that moves a metric most;
* :mod:`.io` - safetensors and llama.cpp GGUF control-vector files;
* :mod:`.orthogonalize` - bake a directional ablation into the weights;
* :mod:`.conditional` - CAST-style conditional steering.
"""
from .conditional import Condition, conditional_plan, fit_condition, gate_prompts
from .extract import METHODS, POSITIONS, collect_activations, compute_direction, extract, read_prompts
from .io import load, save
from .orthogonalize import Orthogonalization, orthogonalize
from .probe import LogisticProbe, cross_val_accuracy, fit_logistic
from .select import Selection, next_token_score, select_direction
from .vectorset import VectorSet, compose

__all__ = [
    "VectorSet", "compose", "extract", "collect_activations", "compute_direction", "read_prompts",
    "METHODS", "POSITIONS", "load", "save", "LogisticProbe", "fit_logistic", "cross_val_accuracy",
    "orthogonalize", "Orthogonalization", "Condition", "fit_condition", "conditional_plan", "gate_prompts",
    "select_direction", "Selection", "next_token_score",
]
