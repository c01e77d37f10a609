"""torch.library definitions of the steerkern ops.

Each op is defined once in the ``steerkern`` namespace with a fake (meta)
implementation, so torch.compile(fullgraph=True) traces through it, and one
implementation per dispatch key (CPU, CUDA).  Those implementations flatten the
leading dimensions into rows and hand 2-D contiguous tensors to the backend
that :mod:`steerkern.backends` chooses; the torch dispatcher picks the device.
"""
from __future__ import annotations

import torch

from .. import backends
from . import reference

NAMESPACE = "steerkern"

_STEER_ARGS = (
    "Tensor? index, Tensor? basis, Tensor? target, Tensor? gain, Tensor? vec, "
    "Tensor? alpha, Tensor? scale, Tensor? shift, Tensor? cond_dir, "
    "Tensor? cond_threshold, Tensor? preserve_norm"
)
SCHEMAS = {
    "steer": f"steer(Tensor h, {_STEER_ARGS}, str backend='auto') -> Tensor",
    "add_steer_rmsnorm": (
        "add_steer_rmsnorm(Tensor x, Tensor? residual, Tensor weight, float eps, "
        f"float weight_offset, {_STEER_ARGS}, str backend='auto') -> (Tensor, Tensor)"
    ),
    "sparse_linear": (
        "sparse_linear(Tensor x, Tensor weight_t, Tensor? bias, Tensor? scale, "
        "Tensor threshold, int topk, str backend='auto') -> Tensor"
    ),
    "steer_sparse_linear": (
        f"steer_sparse_linear(Tensor h, {_STEER_ARGS}, Tensor weight_t, Tensor? bias, "
        "Tensor? col_scale, Tensor threshold, int topk, str backend='auto') -> Tensor"
    ),
    # in place: no output to allocate, so the op is one read and one write of h
    "steer_": f"steer_(Tensor(a!) h, {_STEER_ARGS}, str backend='auto') -> ()",
    "add_steer_rmsnorm_": (
        "add_steer_rmsnorm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, "
        f"float weight_offset, {_STEER_ARGS}, str backend='auto') -> ()"
    ),
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)

for _op in backends.OPS:
    backends.register(_op, "reference", getattr(reference, _op))


def _rows(t, d):
    return t.reshape(-1, d).contiguous()


def _flat_index(index):
    return None if index is None else index.reshape(-1).contiguous()


_TABLE_LEN = _STEER_ARGS.count("Tensor?") - 1  # the table tensors after `index`


def _split_backend(rest, n):
    """``rest`` is ``n`` arguments plus, maybe, ``backend``: the dispatcher
    drops a trailing argument that equals its default ('auto')."""
    return rest[:n], (rest[n] if len(rest) > n else "auto")


def _steer_impl(h, index, *rest):
    table, backend = _split_backend(rest, _TABLE_LEN)
    fn = backends.select("steer", h.device.type, backend)
    d = h.shape[-1]
    out = fn(_rows(h, d), _flat_index(index), *table)
    return out.reshape(h.shape)


def _add_steer_rmsnorm_impl(x, residual, weight, eps, weight_offset, index, *rest):
    table, backend = _split_backend(rest, _TABLE_LEN)
    fn = backends.select("add_steer_rmsnorm", x.device.type, backend)
    d = x.shape[-1]
    res = None if residual is None else _rows(residual, d)
    r, y = fn(_rows(x, d), res, weight.contiguous(), eps, weight_offset,
              _flat_index(index), *table)
    return r.reshape(x.shape), y.reshape(x.shape)


def _in_rows(fn, t, d, *args):
    """Run the in-place kernel ``fn`` on ``t`` viewed as rows, writing back
    through a contiguous copy when ``t`` cannot be viewed that way."""
    if t.is_contiguous():
        fn(t.view(-1, d), *args)
        return
    rows = _rows(t, d)
    fn(rows, *args)
    t.copy_(rows.view(t.shape))


def steer_rows_(h: torch.Tensor, index, table, backend: str = "auto") -> None:
    """``steer_`` into the kernel with the table tensors as one sequence: the
    in-place op's implementation, and what a patched layer's eager hot path
    calls (its tables were checked at patch time).  Callers check
    :func:`hot_in_place` first."""
    fn = backends.select("steer_", h.device.type, backend)
    _in_rows(fn, h, h.shape[-1], _flat_index(index), *table)


def _residual_form(op: str, form: str, a: torch.Tensor, b: torch.Tensor, backend: str):
    """The ``form`` of ``op``'s implementation for a residual-add kernel on
    ``a`` and ``b`` in eager inference, or None: under torch.compile or grad
    mode (see :func:`hot_in_place`), where the backend has no such kernel, or
    for operands it does not take (non-contiguous, different shapes or dtypes)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return None
    fn = backends.form_of(backends.select(op, a.device.type, backend), form)
    if fn is None or a.shape != b.shape or a.dtype != b.dtype or not (a.is_contiguous() and b.is_contiguous()):
        return None
    return fn


def add_steer_kernel(residual: torch.Tensor, x: torch.Tensor, backend: str = "auto"):
    """The kernel forming ``steer(residual + x)`` in one pass, for a patched
    layer's post-MLP site: ``fn(residual, x, index, *table)`` returns a new
    tensor, bit-exact with the add followed by ``steer``; or None (see
    :func:`_residual_form`), and the caller adds and steers."""
    return _residual_form("steer_", "add_steer", residual, x, backend)


def add_norm_kernel(x: torch.Tensor, residual: torch.Tensor, backend: str = "auto"):
    """``add_steer_rmsnorm`` for a patched layer's eager hot path, taking
    ``x`` and ``residual`` in any leading shape: ``fn(x, residual, weight,
    eps, weight_offset, index, *table)`` -> ``(r, y)``; or None (see
    :func:`_residual_form`)."""
    return _residual_form("add_steer_rmsnorm", "any_shape", x, residual, backend)


def sparse_parts_kernel(x: torch.Tensor, backend: str = "auto"):
    """The kernel running one ``x`` (any leading shape) through several
    prepared weights in one call, ``fn(x, weight_ts, biases, scales,
    thresholds)`` -> outputs, for a patched projection's eager decode path;
    bit-exact with ``sparse_linear`` per weight.  None where the backend has
    none or ``x`` is not contiguous; callers check :func:`is_direct` first."""
    fn = backends.form_of(backends.select("sparse_linear", x.device.type, backend), "parts")
    return fn if fn is not None and x.is_contiguous() else None


def _steer_inplace_impl(h, index, *rest):
    table, backend = _split_backend(rest, _TABLE_LEN)
    steer_rows_(h, index, table, backend)


def _add_steer_rmsnorm_inplace_impl(x, residual, weight, eps, weight_offset, index, *rest):
    table, backend = _split_backend(rest, _TABLE_LEN)
    fn = backends.select("add_steer_rmsnorm_", x.device.type, backend)
    d = x.shape[-1]
    if x.is_contiguous() and residual.is_contiguous():
        fn(x.view(-1, d), residual.view(-1, d), weight.contiguous(), eps, weight_offset,
           _flat_index(index), *table)
        return
    xr, rr = _rows(x, d), _rows(residual, d)
    fn(xr, rr, weight.contiguous(), eps, weight_offset, _flat_index(index), *table)
    x.copy_(xr.view(x.shape))
    residual.copy_(rr.view(residual.shape))


def decode_attention_kernel(q: torch.Tensor):
    """The device's decode attention kernel for ``q``, or None (no kernel, or
    autograd / torch.compile, which need the reference's torch ops)."""
    if not is_direct(q):
        return None
    return backends.extra("decode_attention", q.device.type)


def sparse_rows(x: torch.Tensor, weight_t, bias, scale, threshold, topk: int, backend: str = "auto"):
    """``sparse_linear`` into the kernel: the op's implementation, and what a
    patched projection's eager decode path calls (its weight was prepared at
    patch time).  Callers check :func:`is_direct` first."""
    fn = backends.select("sparse_linear", x.device.type, backend)
    y = fn(_rows(x, x.shape[-1]), weight_t, bias, scale, threshold, topk)
    return y.reshape(*x.shape[:-1], weight_t.shape[1])


def _steer_sparse_linear_impl(h, index, *rest):
    args, backend = _split_backend(rest, _TABLE_LEN + 5)
    *table, weight_t, bias, col_scale, threshold, topk = args
    fn = backends.select("steer_sparse_linear", h.device.type, backend)
    y = fn(_rows(h, h.shape[-1]), _flat_index(index), *table,
           weight_t, bias, col_scale, threshold, topk)
    return y.reshape(*h.shape[:-1], weight_t.shape[1])


_IMPLS = {
    "steer": _steer_impl,
    "add_steer_rmsnorm": _add_steer_rmsnorm_impl,
    "sparse_linear": sparse_rows,
    "steer_sparse_linear": _steer_sparse_linear_impl,
    "steer_": _steer_inplace_impl,
    "add_steer_rmsnorm_": _add_steer_rmsnorm_inplace_impl,
}
for _op, _fn in _IMPLS.items():
    for _key in ("CPU", "CUDA"):
        _lib.impl(_op, _fn, _key)


@torch.library.register_fake(f"{NAMESPACE}::steer")
def _steer_fake(h, *args):
    return torch.empty_like(h)


@torch.library.register_fake(f"{NAMESPACE}::add_steer_rmsnorm")
def _add_steer_rmsnorm_fake(x, *args):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.register_fake(f"{NAMESPACE}::sparse_linear")
def _sparse_linear_fake(x, weight_t, *args):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


@torch.library.register_fake(f"{NAMESPACE}::steer_sparse_linear")
def _steer_sparse_linear_fake(h, *args):
    weight_t = args[11]
    return h.new_empty(*h.shape[:-1], weight_t.shape[1])


@torch.library.register_fake(f"{NAMESPACE}::steer_")
def _steer_inplace_fake(h, *args):
    return None


@torch.library.register_fake(f"{NAMESPACE}::add_steer_rmsnorm_")
def _add_steer_rmsnorm_inplace_fake(x, residual, *args):
    return None


# a plain dict, not functools.lru_cache: torch.compile traces through a dict
# lookup without the warning it gives for cache wrappers
_PACKETS = {name: getattr(getattr(torch.ops, NAMESPACE), name) for name in SCHEMAS}


def op(name: str):
    """The ``torch.ops.steerkern.<name>`` overload packet."""
    return _PACKETS[name]


def _eager(name: str):
    impl = _IMPLS[name]

    def call(*args, backend: str = "auto"):
        return impl(*args, backend)

    return call


_EAGER = {name: _eager(name) for name in SCHEMAS}


def is_direct(x: torch.Tensor) -> bool:
    """Whether a hot path may call the implementation directly for ``x`` (see :func:`hot`)."""
    return not (torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()))


def hot(name: str, x: torch.Tensor):
    """The op for a per-token hot path that reads ``x``.

    Under torch.compile, or when ``x`` needs a gradient, it is the custom op
    itself (compile must see it; the dispatcher then reports the missing
    autograd formula instead of silently detaching).  Otherwise it is the same
    device implementation called directly, which saves the ~7 us per call that
    the dispatcher spends boxing a dozen optional arguments into Python.
    """
    return _EAGER[name] if is_direct(x) else _PACKETS[name]


def hot_in_place(name: str, x: torch.Tensor):
    """The in-place twin of op ``name`` (``steer_``, ``add_steer_rmsnorm_``) for a
    hot path that owns ``x``, or None where the out-of-place op must run: under
    torch.compile (a functional graph is simpler to trace), or with grad mode on
    (backward may have saved ``x``; generation runs without grad)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return None
    return _EAGER[name + "_"]
