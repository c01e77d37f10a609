"""Steering vectors from contrastive prompts.

Given prompts that show a concept (positive) and prompts that do not
(negative), read the residual stream at chosen layers and token positions and
reduce the two sets of activations ``P`` ``[n_p, d]`` and ``N`` ``[n_n, d]`` to
one vector per layer:

=============  ====================================================  =========
method         vector                                                norm
=============  ====================================================  =========
``mean_diff``  ``mean(P) - mean(N)``                                 natural
``pca_diff``   first principal axis of the pair differences          unit
               ``P_i - N_i``, taken about zero (the same axis as
               PCA of the sign-symmetric set ``{+-(P_i - N_i)}``)
``pca_center`` first principal component of the activations after   unit
               centering (each pair about its own mean when paired,
               else all rows about the global mean)
``probe``      normal of an L2 logistic-regression boundary          unit
=============  ====================================================  =========

Unit vectors are signed so that positives project above negatives on average.

Token positions: ``last`` (the last real token of each prompt), ``mean``
(the mean over real tokens), ``after_instruction`` (the mean over the tokens
after the instruction: the chat template's generation prompt, or ``suffix``).

Activations are read with forward hooks on the model's layers (found through
:mod:`steerkern.patching.registry`), at site ``post_mlp`` (the block output,
HF ``hidden_states[L + 1]``) or ``pre`` (the block input).  A model whose
layers cannot be found falls back to ``output_hidden_states=True``.  Batches
are right-padded, so every prompt sees exactly what it would see alone.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..patching.registry import model_device
from .probe import fit_logistic
from .vectorset import STREAM_SITES, VectorSet

METHODS = ("mean_diff", "pca_diff", "pca_center", "probe")
POSITIONS = ("last", "mean", "after_instruction")


def read_prompts(path) -> List[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are
    skipped, and ``\\n`` in a line stands for a newline."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"path: cannot read prompts from {path}: {err}") from None
    out = [ln.replace("\\n", "\n") for ln in (x.strip() for x in lines) if ln and not ln.startswith("#")]
    if not out:
        raise ValueError(f"path: {path} holds no prompts")
    return out


# ---- directions from activations ------------------------------------------------

def compute_direction(pos: Tensor, neg: Tensor, method: str = "mean_diff", *, paired: Optional[bool] = None,
                      l2: float = 1e-2) -> Tensor:
    """One vector ``[d]`` (fp32) from activations ``pos`` ``[n_p, d]`` and
    ``neg`` ``[n_n, d]`` (see the module doc for the methods).  ``paired``
    (default: when ``n_p == n_n``) says row ``i`` of ``pos`` pairs with row
    ``i`` of ``neg``."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    pos, neg = torch.as_tensor(pos), torch.as_tensor(neg)
    if pos.dim() != 2 or neg.dim() != 2 or pos.shape[1] != neg.shape[1] or not len(pos) or not len(neg):
        raise ValueError(f"pos, neg: expected shapes [n_p, d] and [n_n, d] with n >= 1, got "
                         f"{list(pos.shape)} and {list(neg.shape)}")
    p, n = pos.double(), neg.double()
    if paired is None:
        paired = len(p) == len(n)
    if paired and len(p) != len(n):
        raise ValueError(f"paired: needs as many positives as negatives, got {len(p)} and {len(n)}")
    if method == "mean_diff":
        return (p.mean(0) - n.mean(0)).float()
    if method == "pca_diff":
        if not paired:
            raise ValueError("method: 'pca_diff' needs paired prompts (as many positives as negatives)")
        v = _top_axis(p - n)
    elif method == "pca_center":
        if paired:
            center = (p + n) / 2
            x = torch.cat([p - center, n - center])
        else:
            x = torch.cat([p, n])
            x = x - x.mean(0)
        v = _top_axis(x)
    else:
        labels = torch.cat([torch.ones(len(p)), torch.zeros(len(n))])
        v = fit_logistic(torch.cat([p, n]), labels, l2=l2).direction
    if float((p @ v).mean() - (n @ v).mean()) < 0:
        v = -v
    return v.float()


def _top_axis(x: Tensor) -> Tensor:
    """The first right singular vector of ``x`` (fp64), sign fixed so its
    largest-magnitude entry is positive (the caller orients it further)."""
    if float(x.abs().max()) == 0.0:
        raise ValueError("activations: all differences are zero; there is no direction to find")
    v = torch.linalg.svd(x, full_matrices=False).Vh[0]
    return v if float(v[v.abs().argmax()]) > 0 else -v


# ---- reading activations --------------------------------------------------------

def render_prompts(tokenizer, texts: Sequence[str], *, chat_template: bool = False,
                   system_prompt: Optional[str] = None, suffix: str = "") -> Tuple[List[str], List[int]]:
    """The strings to tokenize, and for each the character index where its
    instruction ends (where ``after_instruction`` positions begin)."""
    rendered, ends = [], []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ValueError(f"prompts[{i}]: expected a non-empty string")
        if chat_template:
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("chat_template: the tokenizer has no chat template")
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
                [{"role": "user", "content": text}]
            s = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            at = s.rfind(text)
            if at < 0:
                raise ValueError(f"prompts[{i}]: the chat template rewrote the prompt; cannot locate it")
            rendered.append(s + suffix)
            ends.append(at + len(text))
        else:
            rendered.append(text + suffix)
            ends.append(len(text))
    return rendered, ends


def _position_weights(position: str, mask: Tensor, offsets: Optional[Tensor], ends: Sequence[int]) -> Tensor:
    """``[B, T]`` weights whose row sums to 1 over the positions to average."""
    m = mask.bool()
    if position == "last":
        idx = m.shape[1] - 1 - m.flip(1).int().argmax(1)
        w = torch.zeros(m.shape, dtype=torch.float64)
        w[torch.arange(len(idx)), idx] = 1.0
        return w
    if position == "after_instruction":
        if offsets is None:
            raise ValueError("position: 'after_instruction' needs a fast tokenizer (offset mapping)")
        start, stop = offsets[..., 0], offsets[..., 1]
        real = stop > start  # special tokens added by the tokenizer have empty spans
        m = m & real & (start >= torch.as_tensor(ends)[:, None])
        empty = (~m.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"position: prompt {empty[0]} of the batch has no token after its instruction; "
                             "use chat_template=True or a suffix")
    w = m.double()
    return w / w.sum(1, keepdim=True).clamp_min(1.0)


def _find_layers(model):
    from ..patching import registry

    try:
        fam = registry.family_for(model, sites=("pre", "post_mlp"))
    except ValueError:
        return None
    found = fam.find_layers(model)
    return None if found is None else found[2]


class _StopForward(Exception):
    """Raised by the hook of the deepest layer needed: the rest is not run."""


def collect_activations(model, tokenizer, prompts: Sequence[str], layers: Optional[Sequence[int]] = None, *,
                        site: str = "post_mlp", position: str = "last", chat_template: bool = False,
                        system_prompt: Optional[str] = None, suffix: str = "", batch_size: int = 8,
                        max_length: Optional[int] = None, progress: bool = True,
                        desc: str = "activations") -> Dict[int, Tensor]:
    """``{layer: [len(prompts), d]}`` fp32 activations at ``site`` of ``layers``
    (default: every layer), reduced over tokens as ``position`` says."""
    if position not in POSITIONS:
        raise ValueError(f"position: expected one of {POSITIONS}, got {position!r}")
    if site not in STREAM_SITES:
        raise ValueError(f"site: expected one of {STREAM_SITES}, got {site!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    layer_list = _find_layers(model)
    n_layers = len(layer_list) if layer_list is not None else _config_layers(model)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise ValueError(f"layers: expected indices in [0, {n_layers}), got {layers}")
    rendered, ends = render_prompts(tokenizer, prompts, chat_template=chat_template,
                                    system_prompt=system_prompt, suffix=suffix)
    device = model_device(model)
    out: Dict[int, List[Tensor]] = {layer: [] for layer in layers}
    batches = range(0, len(rendered), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    with _tokenizer_for_batches(tokenizer), torch.no_grad():
        for start in batches:
            enc = tokenizer(rendered[start:start + batch_size], return_tensors="pt", padding=True,
                            truncation=max_length is not None, max_length=max_length,
                            add_special_tokens=not chat_template,
                            return_offsets_mapping=position == "after_instruction" and tokenizer.is_fast)
            offsets = enc.pop("offset_mapping", None)
            weights = _position_weights(position, enc["attention_mask"], offsets, ends[start:start + batch_size])
            enc = {k: v.to(device) for k, v in enc.items()}
            for layer, v in _run(model, enc, layers, site, layer_list, weights.to(device)).items():
                out[layer].append(v)
    return {layer: torch.cat(v) for layer, v in out.items()}


def _config_layers(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, name, None)
        if isinstance(n, int):
            return n
    raise ValueError("model: cannot find its layers or its number of layers")


@contextlib.contextmanager
def _tokenizer_for_batches(tokenizer):
    """Right padding (so a padded prompt reads as it would alone) and a pad
    token, restored afterwards."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "right"
    if pad is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer: has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def _run(model, enc, layers: Sequence[int], site: str, layer_list, weights: Tensor) -> Dict[int, Tensor]:
    """Run the model once; ``{layer: [B, d]}`` fp32 CPU, the stream at ``site``
    reduced over tokens by ``weights`` ``[B, T]`` as soon as it is produced
    (so no ``[B, T, d]`` state outlives its layer)."""
    def reduce(h: Tensor) -> Tensor:
        return torch.einsum("bt,btd->bd", weights.to(torch.float32), h.float()).cpu()

    if layer_list is None:
        hs = model(**enc, output_hidden_states=True).hidden_states
        return {layer: reduce(hs[layer + 1 if site == "post_mlp" else layer]) for layer in layers}
    states: Dict[int, Tensor] = {}
    deepest = max(layers)
    handles = []

    def grab(layer):
        def post(module, args, output):
            states[layer] = reduce(output[0] if isinstance(output, (tuple, list)) else output)
            if layer == deepest:
                raise _StopForward

        def pre(module, args, kwargs):
            states[layer] = reduce(args[0] if args else kwargs["hidden_states"])
            if layer == deepest:
                raise _StopForward

        return post, pre

    try:
        for layer in layers:
            post, pre = grab(layer)
            mod = layer_list[layer]
            handles.append(mod.register_forward_hook(post) if site == "post_mlp"
                           else mod.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            model(**enc)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    return states


# ---- extraction ----------------------------------------------------------------

def extract(model, tokenizer, positive: Sequence[str], negative: Sequence[str], *, method: str = "mean_diff",
            layers: Optional[Sequence[int]] = None, site: str = "post_mlp", position: str = "last",
            paired: Optional[bool] = None, chat_template: bool = False, system_prompt: Optional[str] = None,
            suffix: str = "", batch_size: int = 8, max_length: Optional[int] = None, progress: bool = True,
            model_id: Optional[str] = None, l2: float = 1e-2) -> VectorSet:
    """Steering vectors for ``layers`` from contrastive prompts (see the module
    doc).  ``positive`` and ``negative`` are lists of prompts; with equal
    lengths they are taken as pairs unless ``paired=False``."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    positive, negative = list(positive), list(negative)
    if not positive or not negative:
        raise ValueError("positive, negative: expected at least one prompt each")
    if paired is None:
        paired = len(positive) == len(negative)
    if paired and len(positive) != len(negative):
        raise ValueError(f"paired: needs as many positive as negative prompts, got {len(positive)} and "
                         f"{len(negative)}")
    acts = collect_activations(model, tokenizer, positive + negative, layers, site=site, position=position,
                               chat_template=chat_template, system_prompt=system_prompt, suffix=suffix,
                               batch_size=batch_size, max_length=max_length, progress=progress,
                               desc=f"extract {method}")
    n_p = len(positive)
    vecs, separation = {}, {}
    for layer, a in acts.items():
        p, n = a[:n_p], a[n_p:]
        v = compute_direction(p, n, method, paired=paired, l2=l2)
        vecs[layer] = v
        separation[str(layer)] = _separation(p, n, v)
    config = getattr(model, "config", None)
    layer_list = _find_layers(model)
    return VectorSet(
        vecs, num_layers=len(layer_list) if layer_list is not None else _config_layers(model),
        model_id=model_id or str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "")),
        model_type=str(getattr(config, "model_type", "") or ""), method=method, site=site,
        metadata={"position": position, "paired": bool(paired), "n_positive": n_p, "n_negative": len(negative),
                  "chat_template": bool(chat_template), "system_prompt": system_prompt, "suffix": suffix,
                  "separation": separation})


def _separation(p: Tensor, n: Tensor, v: Tensor) -> Optional[float]:
    """How far apart the classes are along ``v``: the difference of mean
    projections over their pooled standard deviation (Cohen's d)."""
    norm = float(v.norm())
    if norm == 0.0:
        return 0.0
    u = v.double() / norm
    a, b = p.double() @ u, n.double() @ u
    var = (a.var(unbiased=False) * len(a) + b.var(unbiased=False) * len(b)) / (len(a) + len(b))
    sd = float(var.sqrt())
    diff = float(a.mean() - b.mean())
    return diff / sd if sd > 0 else None  # JSON has no infinity
