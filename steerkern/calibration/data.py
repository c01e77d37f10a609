"""Calibration text: read it, check it, cut it into token windows.

Every window has the same length and carries the tokenizer's own special
tokens (BOS for Llama-like models, [CLS] ... [SEP] for BERT), so the model sees
input shaped like what it was trained on and no padding is needed.
"""
from __future__ import annotations

import os
from importlib import resources
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

MIN_WINDOWS = 4
PathLike = Union[str, "os.PathLike[str]"]


def default_text_path() -> str:
    """The small English text shipped with steerkern (used by default and in tests)."""
    return str(resources.files("steerkern") / "data" / "calibration.txt")


def read_text(path: PathLike, name: str = "data") -> str:
    """Read a UTF-8 text file; a clear ValueError when it is missing, empty or not UTF-8."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no such file: {path}")
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{name}: {path} is not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r}); "
            "convert it, e.g. with iconv -t UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise ValueError(f"{name}: {path} is empty (no text to calibrate on)")
    return text


def _special_tokens(tokenizer) -> Tuple[List[int], List[int]]:
    """The ids the tokenizer puts before and after a text (e.g. [CLS] / [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain):])
    return [], []


def token_windows(tokenizer, text: str, seq_len: int, max_windows: Optional[int] = None,
                  min_windows: int = MIN_WINDOWS, name: str = "data") -> Tensor:
    """Cut ``text`` into ``[n, seq_len]`` token windows (int64), special tokens included.

    ``n`` is as many whole windows as the text holds, capped at ``max_windows``.
    Fewer than ``min_windows`` windows is an error: thresholds taken from a
    handful of tokens do not generalize.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an int >= 2, got {seq_len!r}")
    if not text or not text.strip():
        raise ValueError(f"{name}: the text is empty (no text to calibrate on)")
    head, tail = _special_tokens(tokenizer)
    body = seq_len - len(head) - len(tail)
    if body < 1:
        raise ValueError(f"seq_len: {seq_len} leaves no room beside {len(head) + len(tail)} special tokens")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // body
    if n < min_windows:
        raise ValueError(
            f"{name}: too short: {len(ids)} tokens make {n} window(s) of {seq_len}; "
            f"need at least {min_windows} windows ({min_windows * body} tokens). "
            "Pass more text or a smaller --seq-len")
    if max_windows is not None:
        n = min(n, max_windows)
    rows = [head + ids[i * body:(i + 1) * body] + tail for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)


def split_windows(windows: Tensor, held_out: float) -> Tuple[Tensor, Tensor]:
    """Split windows into (calibration, held-out); every ``round(1 / held_out)``-th
    window is held out, so both halves sample the whole text."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out: expected a fraction in (0, 1), got {held_out!r}")
    every = max(2, int(round(1.0 / held_out)))
    out = torch.zeros(len(windows), dtype=torch.bool)
    out[every - 1::every] = True
    if not out.any():
        raise ValueError(f"windows: {len(windows)} window(s) are too few to hold out every {every}th")
    return windows[~out], windows[out]


def batches(windows: Tensor, batch_size: int) -> Sequence[Tensor]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
