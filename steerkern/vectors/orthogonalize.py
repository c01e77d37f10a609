"""Bake a directional ablation into the weights (weight orthogonalization).

Run-time directional ablation removes the span of orthonormal directions
``Q`` (``[k, d]`` rows) from the residual stream at every site of every layer.
In a pre-norm transformer the stream is the sum of the embeddings and of
every attention and MLP output, so the same result comes from removing ``Q``
from each of those writes once, in the weights:

* token (and learned position) embeddings ``E`` ``[V, d]``: ``E <- E - (E Q^T) Q``;
* attention output and MLP down projections ``W`` ``[d, in]`` (nn.Linear):
  ``W <- W - Q^T (Q W)``, and their biases ``b <- b - Q^T (Q b)``
  (GPT-2's Conv1D stores ``W^T``: ``W^T <- W^T - (W^T Q^T) Q``).

Then no write has a component along ``Q``, and every residual state equals the
run-time ablated one in exact arithmetic, at zero run-time cost.  Families
whose writes pass through a norm before the residual add (Gemma 2/3's
sandwich norms) or whose norm follows the add (BERT's post-LN) have no such
equivalence and are refused.

Tied input/output embeddings are untied first (the output head keeps the
original matrix; ablating it too would change the logits), and the config
says so, so ``save_pretrained`` exports the baked model as it runs.  The
original tensors are kept (on CPU by default) and :meth:`Orthogonalization.restore`
copies them back bit-exactly, re-tying what was tied.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops.table import ORTHONORMAL_TOL, orthonormality_error

_BAKEABLE_KINDS = ("prenorm", "gpt2", "neox")
# learned position embeddings, which the stream also sums (per family name)
_POSITION_EMBEDDINGS = {"gpt2": ("transformer.wpe", "wpe")}


def _orthonormal(directions, d: Optional[int]) -> Tensor:
    q = torch.as_tensor(directions).detach().to("cpu", torch.float64)
    if q.dim() == 1:
        n = q.norm()
        if not bool(torch.isfinite(q).all()) or float(n) == 0.0:
            raise ValueError("directions: expected a finite, nonzero vector")
        q = (q / n)[None]
    if q.dim() != 2 or q.shape[0] < 1 or (d is not None and q.shape[1] != d):
        raise ValueError(f"directions: expected shape [{d or 'd'}] or [k, {d or 'd'}], got {list(q.shape)}")
    if not bool(torch.isfinite(q).all()):
        raise ValueError("directions: contains NaN or inf")
    err = orthonormality_error(q)
    if err > ORTHONORMAL_TOL:
        raise ValueError(f"directions: rows are not orthonormal (max |Q Q^T - I| = {err:.2e}); "
                         "use steerkern.orthonormalize(directions)")
    return q


class Orthogonalization:
    """The baked weights of one :func:`orthogonalize` call; :meth:`restore`
    puts the originals back bit-exactly (also on ``with`` exit)."""

    def __init__(self, model: nn.Module, directions: Tensor):
        self.model = model
        self.directions = directions.float()
        self.params: List[str] = []  # names of the modified parameters
        self._saved: List[Tuple[nn.Parameter, Tensor]] = []
        self._untied: Optional[Tuple[nn.Module, nn.Parameter, list]] = None
        self.active = True

    def restore(self) -> None:
        """Copy the original weights back (idempotent)."""
        if not self.active:
            return
        with torch.no_grad():
            for param, original in self._saved:
                param.copy_(original)
        if self._untied is not None:
            head, tied_weight, flags = self._untied
            head.weight = tied_weight
            for config, value in flags:
                config.tie_word_embeddings = value
        self._saved, self._untied, self.active = [], None, False

    def __enter__(self) -> "Orthogonalization":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        return (f"Orthogonalization(k={self.directions.shape[0]}, params={len(self.params)}, "
                f"untied_head={self._untied is not None}, active={self.active})")


def orthogonalize(model: nn.Module, directions, *, keep_on: Optional[str] = "cpu") -> Orthogonalization:
    """Remove ``directions`` (``[d]``, or ``[k, d]`` orthonormal rows) from every
    write to the residual stream of ``model``, in place (see the module doc).

    ``keep_on`` is the device the original weights are kept on for
    :meth:`Orthogonalization.restore` (None: where they are).  Equivalent to
    ``steerkern.patch(model, SteeringPlan.ablate(directions))`` without its
    run-time cost.
    """
    from ..patching import handle_of, registry

    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if handle_of(model) is not None:
        raise ValueError("model: is patched by steerkern; unpatch it before baking weights")
    family = registry.family_for(model)
    if family.kind not in _BAKEABLE_KINDS:
        why = {"sandwich": "its attention and MLP outputs pass a norm before the residual add",
               "wrap": "its norms follow the residual add (or its structure is unknown)"}.get(family.kind, "")
        raise ValueError(f"model: cannot bake an ablation into a {family.name} model: {why}; "
                         "use run-time ablation (steerkern.patch with SteeringPlan.ablate)")
    d = registry.hidden_size(model)
    q = _orthonormal(directions, d)
    _, _, layers = family.find_layers(model)
    paths = family.projection_paths()
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"model: input embeddings are a {type(emb).__name__}, not an nn.Embedding")
    targets: List[Tuple[str, nn.Module, str]] = [("embeddings", emb, "embedding")]
    for path in _POSITION_EMBEDDINGS.get(family.name, ()):
        pos = registry.submodule(model, path)
        if isinstance(pos, nn.Embedding):
            targets.append((path, pos, "embedding"))
            break
    for i, layer in enumerate(layers):
        for proj in ("o_proj", "down_proj"):
            mod = registry.submodule(layer, paths[proj])
            if isinstance(mod, nn.Linear):
                targets.append((f"layers.{i}.{paths[proj]}", mod, "linear"))
            elif type(mod).__name__ == "Conv1D":
                targets.append((f"layers.{i}.{paths[proj]}", mod, "conv1d"))
            else:
                raise ValueError(f"model: layer {i}: {paths[proj]} is a {type(mod).__name__}, not a linear layer")
    for name, mod, kind in targets:
        w = mod.weight
        rows = w.shape[1] if kind in ("embedding", "conv1d") else w.shape[0]
        if rows != d:
            raise ValueError(f"model: {name} writes {rows} features, expected the hidden size {d}")

    out = Orthogonalization(model, q)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    with torch.no_grad():
        if head is not None and getattr(head, "weight", None) is emb.weight:
            # untie: the head keeps the original matrix, unablated
            configs = [c for c in {id(c): c for c in _configs(model)}.values()
                       if hasattr(c, "tie_word_embeddings")]
            flags = [(c, c.tie_word_embeddings) for c in configs]
            out._untied = (head, emb.weight, flags)
            head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
            for c in configs:
                c.tie_word_embeddings = False
        for name, mod, kind in targets:
            params = [("weight", mod.weight)] + ([("bias", mod.bias)] if getattr(mod, "bias", None) is not None
                                                   and kind != "embedding" else [])
            for pname, p in params:
                keep = p.detach().clone() if keep_on is None else p.detach().to(keep_on, copy=True)
                out._saved.append((p, keep))
                p.copy_(_ablate(p, q, kind if pname == "weight" else "bias"))
                out.params.append(f"{name}.{pname}")
    return out


def _configs(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config, text]


def _ablate(p: Tensor, q: Tensor, kind: str) -> Tensor:
    """``p`` with ``span(q)`` removed along its hidden-size axis, computed in
    fp32 (fp64 for fp64 weights) and rounded once to ``p``'s dtype."""
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    x = p.detach().to(acc)
    Q = q.to(device=p.device, dtype=acc)
    if kind in ("embedding", "conv1d"):  # hidden size is the last axis
        y = x - (x @ Q.T) @ Q
    elif kind == "linear":  # [d, in]
        y = x - Q.T @ (Q @ x)
    else:  # bias [d]
        y = x - (Q @ x) @ Q
    return y.to(p.dtype)
