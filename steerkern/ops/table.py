"""Steering tables and prepared sparse weights: plain data, validated once.

A :class:`SteerTable` holds ``K`` steering entries as fp32 tensors in the layout
that the kernels read (see :mod:`steerkern.ops.reference`).  It is checked when
it is built, so the per-call path only checks shapes.  Its tensors may be
written in place between calls (a new alpha, a new vector): that needs no
re-patching and no recompilation, as long as the values stay finite.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import mmap
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

ORTHONORMAL_TOL = 1e-4

TensorLike = Union[Tensor, Sequence[float]]


def _as_f32(value, name: str, device=None) -> Tensor:
    try:
        t = torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: expected a tensor or a sequence of numbers") from None
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name}: expected floating-point values, got {t.dtype}")
    return t.to(torch.float32)


def float_tensor(value, name: str) -> Tensor:
    """``value`` as a finite, contiguous fp32 CPU tensor, or a ValueError naming ``name``."""
    t = _as_f32(value, name).detach().cpu().contiguous()
    _check_finite(t, name)
    return t


def orthonormality_error(q: Tensor) -> float:
    """max |Q Q^T - I| over the rows of ``q`` ``[k, d]``, in fp64 (0 for no rows)."""
    if q.shape[0] == 0:
        return 0.0
    q = q.double()
    return float((q @ q.T - torch.eye(q.shape[0], dtype=torch.float64, device=q.device)).abs().max())


def _check_finite(t: Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or inf")


def orthonormalize(directions: Tensor) -> Tensor:
    """An orthonormal basis (``[k, d]`` rows) of the span of ``directions``.

    ``directions`` is ``[k, d]`` or ``[d]``.  Uses QR in fp64 and fixes each
    column's sign so the result is deterministic.  Rank-deficient input is
    rejected: a direction that lies in the span of the others is ambiguous.
    """
    t = torch.as_tensor(directions)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"directions: expected shape [k, d] with k >= 1, got {tuple(t.shape)}")
    if t.shape[0] > t.shape[1]:
        raise ValueError(f"directions: {t.shape[0]} directions in {t.shape[1]} dimensions are linearly dependent")
    t64 = t.detach().to(torch.float64)
    _check_finite(t64, "directions")
    q, r = torch.linalg.qr(t64.T)
    diag = torch.diagonal(r)
    scale_ref = t64.norm(dim=1).max().clamp_min(1e-300)
    if bool((diag.abs() <= 1e-8 * scale_ref).any()):
        raise ValueError("directions: rows are linearly dependent (or zero); cannot orthonormalize")
    q = q * torch.sign(diag)
    return q.T.to(torch.float32).contiguous()


@dataclasses.dataclass
class SteerEntry:
    """One steering entry, written the way a person thinks of it.

    * ``directions``: ``[k, d]`` or ``[d]`` orthonormal rows of Q^T for the
      projection step.  Non-orthonormal input is *rejected*; pass it through
      :func:`orthonormalize` first.
    * ``target`` (c, default 0) and ``gain`` (lam, default 1): the clamp.
      The defaults make it directional ablation.
    * ``vector`` and ``alpha``: the additive steering vector.
    * ``scale`` and ``shift``: the affine per-neuron map ``w * h + b``.
    * ``condition`` and ``threshold``: steer only rows whose cosine with
      ``condition`` exceeds ``threshold`` (``condition`` is normalized here).
    * ``preserve_norm``: rescale steered rows to their input norm.
    """

    directions: Optional[TensorLike] = None
    target: Optional[TensorLike] = None
    gain: float = 1.0
    vector: Optional[TensorLike] = None
    alpha: float = 1.0
    scale: Optional[TensorLike] = None
    shift: Optional[TensorLike] = None
    condition: Optional[TensorLike] = None
    threshold: float = 0.0
    preserve_norm: bool = False


@dataclasses.dataclass
class SteerTable:
    """``K`` steering entries in kernel layout; see :mod:`steerkern.ops.reference`.

    Build one with :meth:`from_entries`, or with :meth:`ablation` /
    :meth:`addition` for the common single-entry cases.
    """

    hidden_size: int
    basis: Optional[Tensor] = None
    target: Optional[Tensor] = None
    gain: Optional[Tensor] = None
    vec: Optional[Tensor] = None
    alpha: Optional[Tensor] = None
    scale: Optional[Tensor] = None
    shift: Optional[Tensor] = None
    cond_dir: Optional[Tensor] = None
    cond_threshold: Optional[Tensor] = None
    preserve_norm: Optional[Tensor] = None

    def __post_init__(self) -> None:
        d = self.hidden_size
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"hidden_size: expected a positive int, got {d!r}")
        present = {n: getattr(self, n) for n in self.tensor_names() if getattr(self, n) is not None}
        if not present:
            raise ValueError("SteerTable: no component given; an empty plan needs no table")
        for name, t in present.items():
            if not isinstance(t, Tensor) or t.dim() == 0:
                raise ValueError(f"{name}: expected a tensor with an entry dimension, got {type(t).__name__}")
        K = next(iter(present.values())).shape[0]
        devices = {t.device for t in present.values()}
        if len(devices) > 1:
            raise ValueError(f"SteerTable: tensors on several devices {sorted(map(str, devices))}")
        for name, t in present.items():
            want = torch.uint8 if name == "preserve_norm" else torch.float32
            if t.dtype != want:
                raise ValueError(f"{name}: expected dtype {want}, got {t.dtype}")
            if not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous tensor")
            if t.shape[0] != K:
                raise ValueError(f"{name}: expected {K} entries (dim 0), got shape {tuple(t.shape)}")
        self._pair("basis", ("target", "gain"))
        self._pair("vec", ("alpha",))
        self._pair("cond_dir", ("cond_threshold",))
        if self.basis is not None:
            k = self.basis.shape[1] if self.basis.dim() == 3 else -1
            self._shape("basis", (K, k, d))
            self._shape("target", (K, k))
            self._shape("gain", (K,))
        for name in ("vec", "scale", "shift", "cond_dir"):
            self._shape(name, (K, d))
        for name in ("alpha", "cond_threshold", "preserve_norm"):
            self._shape(name, (K,))
        for name, t in present.items():
            if name == "cond_threshold":
                if bool(torch.isnan(t).any()):
                    raise ValueError("cond_threshold: contains NaN")
            elif name != "preserve_norm":
                _check_finite(t, name)
        if self.basis is not None:
            self._check_orthonormal()
        if self.cond_dir is not None:
            norms = self.cond_dir.norm(dim=1)
            if bool(((norms - 1).abs() > ORTHONORMAL_TOL).any()):
                raise ValueError("cond_dir: every row must have unit norm")

    @staticmethod
    def tensor_names() -> List[str]:
        return list(_TABLE_TENSOR_NAMES)

    @property
    def size(self) -> int:
        """K, the number of entries."""
        return next(getattr(self, n) for n in self.tensor_names() if getattr(self, n) is not None).shape[0]

    @property
    def device(self) -> torch.device:
        return next(getattr(self, n) for n in self.tensor_names() if getattr(self, n) is not None).device

    def tensors(self) -> tuple:
        """The table in the op schema's argument order."""
        # spelled out (not a loop over the names): this runs per steered site
        # and token, and torch.compile traces it; _TABLE_TENSOR_NAMES is checked
        # against it at import
        return (self.basis, self.target, self.gain, self.vec, self.alpha, self.scale, self.shift, self.cond_dir,
                self.cond_threshold, self.preserve_norm)

    def to(self, device) -> "SteerTable":
        return SteerTable(self.hidden_size, *(None if t is None else t.to(device) for t in self.tensors()))

    def _pair(self, lead: str, followers) -> None:
        for f in followers:
            if (getattr(self, lead) is None) != (getattr(self, f) is None):
                raise ValueError(f"{lead} and {f} must be given together")

    def _shape(self, name: str, shape) -> None:
        t = getattr(self, name)
        if t is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")

    def _check_orthonormal(self) -> None:
        for e in range(self.basis.shape[0]):
            Q = self.basis[e]
            err = orthonormality_error(Q[Q.norm(dim=1) > 0])  # all-zero rows pad unused slots
            if err > ORTHONORMAL_TOL:
                raise ValueError(
                    f"basis: entry {e} is not orthonormal (max |Q^T Q - I| = {err:.2e}); "
                    "steerkern rejects it rather than guess; use steerkern.orthonormalize(directions)"
                )

    @classmethod
    def from_entries(cls, entries: Sequence[SteerEntry], hidden_size: int, device=None) -> "SteerTable":
        """Pack entries into one table; entry ``j`` is selected by index ``j + 1``.

        Components that some entries lack get the identity for them (zero
        basis rows, zero vector, scale 1, shift 0, threshold -inf).
        """
        entries = list(entries)
        if not entries:
            raise ValueError("entries: expected at least one SteerEntry")
        d = hidden_size
        K = len(entries)

        def vec_of(value, name, e):
            t = _as_f32(value, f"entries[{e}].{name}", device).reshape(-1)
            if t.numel() != d:
                raise ValueError(f"entries[{e}].{name}: expected shape [{d}], got {list(torch.as_tensor(value).shape)}")
            _check_finite(t, f"entries[{e}].{name}")
            return t

        out = {}
        dirs = []
        for e, ent in enumerate(entries):
            if ent.directions is None:
                dirs.append(None)
                if ent.target is not None:
                    raise ValueError(f"entries[{e}].target: given without directions")
                continue
            q = _as_f32(ent.directions, f"entries[{e}].directions", device)
            q = q[None] if q.dim() == 1 else q
            if q.dim() != 2 or q.shape[1] != d:
                raise ValueError(f"entries[{e}].directions: expected shape [k, {d}], got {list(q.shape)}")
            dirs.append(q)
        if any(q is not None for q in dirs):
            k = max(q.shape[0] for q in dirs if q is not None)
            basis = torch.zeros(K, k, d, device=device)
            target = torch.zeros(K, k, device=device)
            gain = torch.zeros(K, device=device)
            for e, (ent, q) in enumerate(zip(entries, dirs)):
                if q is None:
                    continue
                basis[e, : q.shape[0]] = q
                if ent.target is not None:
                    c = _as_f32(ent.target, f"entries[{e}].target", device).reshape(-1)
                    if c.numel() != q.shape[0]:
                        raise ValueError(f"entries[{e}].target: expected shape [{q.shape[0]}], got {list(c.shape)}")
                    target[e, : q.shape[0]] = c
                gain[e] = finite_scalar(ent.gain, f"entries[{e}].gain")
            out.update(basis=basis, target=target, gain=gain)
        if any(ent.vector is not None for ent in entries):
            vec = torch.zeros(K, d, device=device)
            alpha = torch.zeros(K, device=device)
            for e, ent in enumerate(entries):
                if ent.vector is not None:
                    vec[e] = vec_of(ent.vector, "vector", e)
                    alpha[e] = finite_scalar(ent.alpha, f"entries[{e}].alpha")
            out.update(vec=vec, alpha=alpha)
        if any(ent.scale is not None for ent in entries):
            out["scale"] = torch.stack([
                vec_of(ent.scale, "scale", e) if ent.scale is not None else torch.ones(d, device=device)
                for e, ent in enumerate(entries)])
        if any(ent.shift is not None for ent in entries):
            out["shift"] = torch.stack([
                vec_of(ent.shift, "shift", e) if ent.shift is not None else torch.zeros(d, device=device)
                for e, ent in enumerate(entries)])
        if any(ent.condition is not None for ent in entries):
            cond = torch.zeros(K, d, device=device)
            thr = torch.full((K,), -math.inf, device=device)
            for e, ent in enumerate(entries):
                if ent.condition is None:
                    cond[e, 0] = 1.0  # unit row; threshold -inf makes it always pass
                    continue
                u = vec_of(ent.condition, "condition", e)
                n = u.norm()
                if float(n) == 0.0:
                    raise ValueError(f"entries[{e}].condition: is the zero vector")
                cond[e] = u / n
                t = float(ent.threshold)
                if math.isnan(t):
                    raise ValueError(f"entries[{e}].threshold: is NaN")
                thr[e] = t
            out.update(cond_dir=cond, cond_threshold=thr)
        if any(ent.preserve_norm for ent in entries):
            out["preserve_norm"] = torch.tensor([1 if ent.preserve_norm else 0 for ent in entries],
                                                dtype=torch.uint8, device=device)
        if not out:
            raise ValueError("entries: no entry has any component")
        return cls(hidden_size=d, **out)

    @classmethod
    def ablation(cls, directions: TensorLike, device=None) -> "SteerTable":
        """Directional ablation ``h - Q Q^T h`` of orthonormal ``directions``."""
        q = torch.as_tensor(directions)
        return cls.from_entries([SteerEntry(directions=q)], q.shape[-1], device)

    @classmethod
    def addition(cls, vector: TensorLike, alpha: float = 1.0, device=None) -> "SteerTable":
        """Additive steering ``h + alpha * v``."""
        v = torch.as_tensor(vector)
        return cls.from_entries([SteerEntry(vector=v, alpha=alpha)], v.shape[-1], device)


# computed once: torch.compile cannot trace dataclasses.fields() on the class
_TABLE_TENSOR_NAMES = tuple(f.name for f in dataclasses.fields(SteerTable) if f.name != "hidden_size")
assert _TABLE_TENSOR_NAMES == ("basis", "target", "gain", "vec", "alpha", "scale", "shift", "cond_dir",
                              "cond_threshold", "preserve_norm"), "SteerTable.tensors() must follow the fields"


def finite_scalar(value, name: str) -> float:
    """``value`` as a finite float, or a ValueError naming ``name``."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name}: must be finite, got {f}")
    return f


@dataclasses.dataclass
class SparseWeight:
    """A linear layer's weight prepared for :func:`steerkern.sparse_linear`.

    ``weight_t`` is ``W^T`` ``[in, out]``, contiguous, so that skipping input
    ``i`` skips one contiguous row; ``scale`` is ``||W[:, i]||_2`` in fp32
    (WINA) or None (TEAL); ``bias`` is ``[out]`` or None.
    """

    weight_t: Tensor
    bias: Optional[Tensor] = None
    scale: Optional[Tensor] = None

    def __post_init__(self) -> None:
        wt = self.weight_t
        if not isinstance(wt, Tensor) or wt.dim() != 2:
            raise ValueError("weight_t: expected a 2-D tensor [in, out]")
        if wt.dtype not in FLOAT_DTYPES:
            raise ValueError(f"weight_t: dtype {wt.dtype} not supported; expected one of {FLOAT_DTYPES}")
        if not wt.is_contiguous():
            raise ValueError("weight_t: expected a contiguous [in, out] tensor")
        if self.bias is not None and tuple(self.bias.shape) != (wt.shape[1],):
            raise ValueError(f"bias: expected shape [{wt.shape[1]}], got {list(self.bias.shape)}")
        if self.scale is not None:
            if tuple(self.scale.shape) != (wt.shape[0],) or self.scale.dtype != torch.float32:
                raise ValueError(f"scale: expected fp32 shape [{wt.shape[0]}], got "
                                 f"{self.scale.dtype} {list(self.scale.shape)}")

    @property
    def in_features(self) -> int:
        return self.weight_t.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight_t.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight_t, self.bias, self.scale) if t is not None)

    @classmethod
    def from_linear(cls, weight: Tensor, bias: Optional[Tensor] = None, mode: str = "wina",
                    dtype: Optional[torch.dtype] = None) -> "SparseWeight":
        """Prepare ``W`` ``[out, in]`` (an nn.Linear weight) once.

        ``mode`` is ``"wina"`` (score ``|x_i| * ||W[:, i]||``) or ``"teal"``
        (score ``|x_i|``).  ``dtype`` optionally converts the stored weight.
        """
        if mode not in ("wina", "teal"):
            raise ValueError(f"mode: expected 'wina' or 'teal', got {mode!r}")
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError("weight: expected a 2-D tensor [out, in]")
        w = weight.detach()
        scale = w.float().norm(dim=0).contiguous() if mode == "wina" else None
        wt = layout_tensor(w.T.shape, dtype or w.dtype, w.device)
        wt.copy_(w.T)
        b = None if bias is None else bias.detach()
        return cls(wt, b, scale)


_HUGE_PAGE = 2 << 20


def layout_tensor(shape, dtype: torch.dtype, device) -> Tensor:
    """An empty contiguous tensor for a prepared weight layout.

    On Linux CPU, a layout of 2 MiB or more lives in anonymous memory advised
    for transparent huge pages (where the kernel allows them): the sparse
    kernel jumps between rows of ``W^T``, and 2 MiB pages spare it most TLB
    misses (measured: 2-4% faster over a decode-like sequence of TinyLlama
    projections at 50% sparsity, paired A/B).  Elsewhere it is ``torch.empty``.
    """
    n = math.prod(shape)
    nbytes = n * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype, device=device)
    # private: a shared anonymous mapping would be shmem, where THP is usually off
    buf = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    offset = -start % _HUGE_PAGE  # the first 2 MiB boundary in the mapping
    buf.madvise(mmap.MADV_HUGEPAGE, offset, (nbytes + _HUGE_PAGE - offset) // mmap.PAGESIZE * mmap.PAGESIZE)
    # the tensor keeps `buf` alive; the mapping is freed with the last tensor
    return torch.frombuffer(buf, dtype=dtype, count=n, offset=offset).view(shape)


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
