"""Vector files: safetensors with JSON metadata, and llama.cpp GGUF control vectors.

safetensors (steerkern's own format)
    tensors ``vectors`` fp32 ``[n, d]`` and ``layers`` int64 ``[n]``; the file
    metadata key ``steerkern`` holds a JSON object with ``kind: "vectors"``,
    ``version`` and the :class:`VectorSet` facts (model id and type, method,
    site, hidden size, number of layers, free-form metadata).

GGUF control vectors (llama.cpp's format, as its ``cvector-generator`` and
repeng's ``export_gguf`` write them and ``common_control_vector_load_one``
reads them)
    ``general.architecture = "controlvector"``, ``controlvector.model_hint``
    (the model's ``model_type``), ``controlvector.layer_count`` (the number of
    direction tensors) and one 1-D F32 tensor ``direction.{L}`` per layer,
    where ``direction.L`` is added to the output of block ``L`` (0-based):
    steerkern's site ``post_mlp`` of layer ``L``.  Layer 0 cannot be written
    (llama.cpp rejects ``direction.0``), and the file holds no other tensors
    (llama.cpp rejects those too).  steerkern adds one string key,
    ``steerkern.metadata`` (JSON), which llama.cpp ignores.

Loading never unpickles: the format is taken from the file's first bytes, not
its name, and a PyTorch pickle (``.pt``/``.bin``) is refused with a ValueError.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Optional

import numpy as np
import torch

from . import _gguf
from .vectorset import VectorSet

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 << 20
_DIRECTION = re.compile(r"direction\.([1-9][0-9]{0,8})")


def save(vectors: VectorSet, path, format: Optional[str] = None) -> None:
    """Write ``vectors`` to ``path``; ``format`` is ``"safetensors"`` or
    ``"gguf"`` (default: from the file suffix)."""
    fmt = _format_for(path, format)
    if not isinstance(vectors, VectorSet):
        raise ValueError(f"vectors: expected a VectorSet, got {type(vectors).__name__}")
    if fmt == "gguf":
        save_gguf(vectors, path)
    else:
        save_safetensors(vectors, path)


def load(path) -> VectorSet:
    """Read a vector file written by :func:`save`, llama.cpp or repeng."""
    kind = sniff(path)
    if kind not in ("gguf", "safetensors"):
        raise ValueError(f"path: {path} is {kind}; expected a safetensors or GGUF vector file")
    try:
        return load_gguf(path) if kind == "gguf" else load_safetensors(path)
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"path: {path}: {err}") from None


def _format_for(path, format: Optional[str]) -> str:
    if format is None:
        suffix = os.path.splitext(str(path))[1].lower()
        format = {".gguf": "gguf", ".safetensors": "safetensors"}.get(suffix)
        if format is None:
            raise ValueError(f"path: cannot tell the format from {path!r}; use a .safetensors or .gguf suffix "
                             "or pass format=")
    if format not in ("gguf", "safetensors"):
        raise ValueError(f"format: expected 'safetensors' or 'gguf', got {format!r}")
    return format


def sniff(path) -> str:
    """What a file is, from its first bytes: ``"gguf"``, ``"safetensors"``,
    or a description of something steerkern will not load."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as err:
        raise ValueError(f"path: cannot read {path}: {err}") from None
    if head[:4] == _gguf.MAGIC:
        return "gguf"
    if head[:2] == b"PK":
        return "a zip archive (a PyTorch .pt pickle?); steerkern never unpickles, convert it to safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle; steerkern never unpickles, convert it to safetensors"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "not a recognized vector file"


# ---- safetensors ---------------------------------------------------------------

def save_safetensors(vectors: VectorSet, path) -> None:
    from safetensors.torch import save_file

    meta = {"kind": "vectors", "version": FORMAT_VERSION, **vectors.describe()}
    tensors = {"vectors": vectors.to_tensor().contiguous(),
               "layers": torch.tensor(vectors.layers, dtype=torch.int64)}
    save_file(tensors, str(path), metadata={"steerkern": json.dumps(meta)})


def load_safetensors(path) -> VectorSet:
    header = _safetensors_header(path)
    meta = _json(header.get("__metadata__", {}).get("steerkern") if isinstance(header.get("__metadata__"), dict)
                 else None, path)
    if meta.get("kind") != "vectors":
        raise ValueError(f"path: {path} holds steerkern kind {meta.get('kind')!r}, expected 'vectors' "
                         "(plans load with SteeringPlan.load)")
    version = meta.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"path: vector format version {version!r} is not supported (this steerkern reads "
                         f"<= {FORMAT_VERSION})")
    for name, dtypes, rank in (("vectors", ("F32", "F16", "BF16", "F64"), 2), ("layers", ("I64", "I32"), 1)):
        info = header.get(name)
        if not isinstance(info, dict) or info.get("dtype") not in dtypes or \
                not isinstance(info.get("shape"), list) or len(info["shape"]) != rank:
            raise ValueError(f"path: {path}: tensor {name!r} missing or not a {rank}-D {'/'.join(dtypes)} tensor")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            vecs = f.get_tensor("vectors")
            layers = f.get_tensor("layers")
    except Exception as err:  # the Rust parser's errors are not ValueErrors
        raise ValueError(f"path: {path} is not a valid safetensors file: {err}") from None
    if layers.shape[0] != vecs.shape[0]:
        raise ValueError(f"path: {path}: {vecs.shape[0]} vectors but {layers.shape[0]} layer indices")
    kw = _facts(meta, path)
    return VectorSet.from_tensor(vecs.float(), [int(x) for x in layers], **kw)


def _safetensors_header(path) -> Dict[str, Any]:
    """The JSON header, read and checked by hand before safetensors maps the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"path: {path} is too short to be a safetensors file")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise ValueError(f"path: {path}: safetensors header of {n} bytes does not fit "
                                 f"(file {size} bytes, limit {MAX_HEADER_BYTES})")
            raw = f.read(n)
    except OSError as err:
        raise ValueError(f"path: cannot read {path}: {err}") from None
    header = _json(raw, path)
    return header


def _json(raw, path) -> Dict[str, Any]:
    if raw is None:
        raise ValueError(f"path: {path} has no 'steerkern' metadata; it is not a steerkern vector file")
    try:
        out = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise ValueError(f"path: {path}: corrupt JSON metadata ({type(err).__name__})") from None
    if not isinstance(out, dict):
        raise ValueError(f"path: {path}: metadata is not a JSON object")
    return out


def _facts(meta: Dict[str, Any], path) -> Dict[str, Any]:
    """VectorSet keyword arguments from saved JSON, type-checked."""
    kw: Dict[str, Any] = {}
    for name in ("model_id", "model_type", "method"):
        v = meta.get(name, "")
        kw[name] = v if isinstance(v, str) else str(v)
    site = meta.get("site", "post_mlp")
    kw["site"] = site if isinstance(site, str) else ""
    for name in ("hidden_size", "num_layers"):
        v = meta.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"path: {path}: metadata {name} must be an int, got {v!r}")
        kw[name] = v
    extra = meta.get("metadata", {})
    kw["metadata"] = extra if isinstance(extra, dict) else {}
    return kw


# ---- GGUF control vectors ------------------------------------------------------

def save_gguf(vectors: VectorSet, path) -> None:
    vs = vectors.at_site("post_mlp") if vectors.site == "pre" else vectors
    if vs.site != "post_mlp":
        raise ValueError(f"vectors: site {vectors.site!r} cannot be written as a llama.cpp control vector "
                         "(it adds to the block output, site 'post_mlp')")
    if 0 in vs.layers:
        raise ValueError("vectors: layer 0 cannot be written to a llama.cpp control vector (it rejects "
                         "direction.0: block 0's output is never steered); drop it, e.g. "
                         "vectors.select(vectors.layers[1:])")
    if not len(vs):
        raise ValueError("vectors: no layer to write")
    hint = vs.model_type or vs.model_id
    meta = [("general.architecture", _gguf.STRING, "controlvector"),
            ("controlvector.model_hint", _gguf.STRING, hint),
            ("controlvector.layer_count", _gguf.UINT32, len(vs)),
            ("steerkern.metadata", _gguf.STRING, json.dumps(vs.describe()))]
    tensors = [(f"direction.{layer}", v.numpy()) for layer, v in vs]
    try:
        _gguf.write(path, meta, tensors)
    except OSError as err:
        raise ValueError(f"path: cannot write {path}: {err}") from None


def load_gguf(path, max_bytes: int = _gguf.MAX_FILE_BYTES) -> VectorSet:
    """Read a llama.cpp control vector, checked as llama.cpp checks it: every
    tensor is ``direction.N`` with ``N >= 1``, F32, 1-D, all of one size."""
    g = _gguf.parse(_gguf.read_bytes(path, max_bytes))
    arch = g.metadata.get("general.architecture")
    if arch is not None and arch != "controlvector":
        raise ValueError(f"path: {path} is a GGUF {arch!r} file, not a control vector "
                         "(general.architecture must be 'controlvector')")
    if not g.tensors:
        raise ValueError(f"path: {path} has no direction tensors")
    vecs = {}
    d = None
    for t in g.tensors:
        m = _DIRECTION.fullmatch(t.name)
        if m is None:
            raise ValueError(f"path: {path}: tensor {t.name!r} is not 'direction.N' with N >= 1")
        if t.ggml_type != _gguf.GGML_F32:
            raise ValueError(f"path: {path}: tensor {t.name!r} is not F32 (ggml type {t.ggml_type})")
        if any(n != 1 for n in t.shape[1:]) or t.shape[0] < 1:
            raise ValueError(f"path: {path}: tensor {t.name!r} is not 1-D (shape {list(t.shape)})")
        if d is None:
            d = t.shape[0]
        elif t.shape[0] != d:
            raise ValueError(f"path: {path}: tensor {t.name!r} has {t.shape[0]} elements, the first had {d}")
        if not np.isfinite(t.data).all():
            raise ValueError(f"path: {path}: tensor {t.name!r} contains NaN or inf")
        vecs[int(m.group(1))] = torch.from_numpy(t.data.copy())
    hint = g.metadata.get("controlvector.model_hint", "")
    kw: Dict[str, Any] = {"model_type": hint if isinstance(hint, str) else ""}
    raw = g.metadata.get("steerkern.metadata")
    if isinstance(raw, str):
        facts = _facts(_json(raw, path), path)
        for name in ("model_id", "method", "metadata"):
            kw[name] = facts[name]
        kw["model_type"] = facts["model_type"] or kw["model_type"]
        nl = facts["num_layers"]
        if nl is not None and max(vecs) < nl:
            kw["num_layers"] = nl
    return VectorSet(vecs, hidden_size=d, **kw)
