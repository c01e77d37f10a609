"""Backend registry and selection.

Every op has one reference implementation (pure torch, the spec) and up to
three kernel backends: ``cpu`` (C++ in csrc/cpu), ``triton`` and ``cuda``
(C++/CUDA in csrc/cuda).  Kernel modules register themselves here; the op layer
asks for the backend of a call with :func:`select`.

Selection, first match wins:

1. the call's own ``backend=`` argument;
2. the innermost :func:`use_backend` context;
3. the ``STEERKERN_BACKEND`` environment variable, either one name for every op
   (``STEERKERN_BACKEND=reference``) or per op
   (``STEERKERN_BACKEND=steer=triton,sparse_linear=cuda``);
4. the device's default order: ``cuda, triton, reference`` on CUDA tensors and
   ``cpu, reference`` on CPU tensors.

An explicit choice that cannot serve the tensors' device is an error, never a
silent fallback.  :func:`report` tells which backend each op uses.

This module sits at the bottom of the package: it imports nothing from it.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Callable, Dict, Iterator, List, Optional

BACKENDS = ("reference", "cpu", "triton", "cuda")
OPS = ("steer", "add_steer_rmsnorm", "sparse_linear", "steer_sparse_linear", "steer_", "add_steer_rmsnorm_")
# op -> the ops that build it for a backend without its own: the in-place
# ops write the out-of-place result back, the fused chain is the composition
DERIVED_FROM = {"steer_": ("steer",), "add_steer_rmsnorm_": ("add_steer_rmsnorm",),
                "steer_sparse_linear": ("steer", "sparse_linear")}
ENV_VAR = "STEERKERN_BACKEND"

# device type -> default order of preference
_DEFAULT_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

# (op, backend) -> implementation
_IMPLS: Dict[tuple, Callable] = {}
# backend -> callable(device_type) -> bool, whether it can run there now
_SERVES: Dict[str, Callable[[str], bool]] = {"reference": lambda device_type: True}
# backend -> why it is unavailable (shown by report())
_UNAVAILABLE: Dict[str, str] = {}

_local = threading.local()


# (op, backend) pairs served by a derived implementation (see DERIVED_FROM)
_DERIVED = set()

# (an implementation, a form name) -> a kernel that does more in one call,
# where a backend has one (the C++ CPU kernels).  The eager hot paths of the
# patched modules use them:
# * ``("add_steer")`` of ``steer_``: ``fn(residual, x, index, *table)`` =
#   steer(residual + x) in a new tensor (a post-MLP site's add and steer);
# * ``("parts")`` of ``sparse_linear``: ``fn(x, weight_ts, biases, scales,
#   thresholds)``, one x of any leading shape through several weights (the
#   parts of a fused projection, or sibling projections such as q/k/v);
# * ``("any_shape")`` of ``add_steer_rmsnorm``: the op's arguments, with x and
#   residual of any leading shape (contiguous), r and y returned in it.
_FORMS: Dict[tuple, Callable] = {}


def register_form(impl: Callable, form: str, fn: Callable) -> None:
    """Declare ``fn`` the ``form`` of the implementation ``impl`` (see ``_FORMS``)."""
    _FORMS[(impl, form)] = fn


def form_of(impl: Callable, form: str) -> Optional[Callable]:
    """The ``form`` of an implementation that :func:`select` returned, or None."""
    return _FORMS.get((impl, form))


# Kernels a backend offers beside the ops: no schema, no derived forms, used
# by eager hot paths only (a caller falls back to the reference where a device
# has none).  ``("decode_attention", device_type)``: ``fn(q, k, v, scale)``,
# see :func:`steerkern.ops.reference.decode_attention`.
EXTRAS = ("decode_attention",)
_EXTRAS: Dict[tuple, Callable] = {}


def register_extra(name: str, device_type: str, fn: Callable) -> None:
    """Offer ``fn`` as the ``name`` kernel for ``device_type`` tensors."""
    if name not in EXTRAS:
        raise ValueError(f"unknown extra kernel {name!r}; extras are {EXTRAS}")
    _EXTRAS[(name, device_type)] = fn


def extra(name: str, device_type: str) -> Optional[Callable]:
    """The ``name`` kernel for ``device_type`` tensors, or None."""
    return _EXTRAS.get((name, device_type))


def _derive(op: str, fns: List[Callable]) -> Callable:
    """``op`` from the implementations of ``DERIVED_FROM[op]``: correct
    everywhere; a backend that can do better registers its own."""
    if op == "steer_":
        (steer,) = fns

        def steer_(h, *args):
            h.copy_(steer(h, *args))
        return steer_
    if op == "add_steer_rmsnorm_":
        (fused,) = fns

        def add_steer_rmsnorm_(x, residual, *args):
            r, y = fused(x, residual, *args)
            residual.copy_(r)
            x.copy_(y)
        return add_steer_rmsnorm_
    steer, sparse_linear = fns

    def steer_sparse_linear(h, index, *rest):
        # the steered rows in h's dtype, then the sparse GEMV: the spec's rounding
        *table, weight_t, bias, col_scale, threshold, topk = rest
        return sparse_linear(steer(h, index, *table), weight_t, bias, col_scale, threshold, topk)
    return steer_sparse_linear


def register(op: str, backend: str, fn: Callable) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``.

    Once a backend has the ops in :data:`DERIVED_FROM`, the ops built from
    them (the in-place ``steer_`` and ``add_steer_rmsnorm_``, the fused
    ``steer_sparse_linear``) are derived for it, unless it registers its own
    (before or after).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends are {BACKENDS}")
    _IMPLS[(op, backend)] = fn
    _SELECTED.clear()
    _DERIVED.discard((op, backend))
    for derived, bases in DERIVED_FROM.items():
        own = (derived, backend) in _IMPLS and (derived, backend) not in _DERIVED
        if op in bases and not own and all((b, backend) in _IMPLS for b in bases):
            _IMPLS[(derived, backend)] = _derive(derived, [_IMPLS[(b, backend)] for b in bases])
            _DERIVED.add((derived, backend))


def is_derived(op: str, backend: str) -> bool:
    """Whether ``backend`` serves ``op`` by a derived implementation, not its own kernel."""
    return (op, backend) in _DERIVED


def register_backend(backend: str, serves: Callable[[str], bool]) -> None:
    """Declare which device types ``backend`` can run on (checked per call)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends are {BACKENDS}")
    _SERVES[backend] = serves
    _UNAVAILABLE.pop(backend, None)
    _SELECTED.clear()


def mark_unavailable(backend: str, why: str) -> None:
    """Record that ``backend`` could not be loaded, and why."""
    _UNAVAILABLE[backend] = why
    _SELECTED.clear()


def _check_name(name: str, where: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {BACKENDS}")
    return name


def _env_choice(op: str) -> Optional[str]:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    if "=" not in raw:
        return _check_name(raw, ENV_VAR)
    chosen = {}
    # every pair is checked, so a typo fails on the first op, not only on its own
    for part in raw.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"{ENV_VAR}: expected 'op=backend' pairs, got {part!r}")
        name, backend = (s.strip() for s in part.split("=", 1))
        if name not in OPS:
            raise ValueError(f"{ENV_VAR}: unknown op {name!r}; ops are {OPS}")
        chosen[name] = _check_name(backend, ENV_VAR)
    return chosen.get(op)


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run every op inside the block on ``backend`` (thread-local, nestable)."""
    backend = _check_name(backend, "use_backend")
    stack: List[str] = getattr(_local, "stack", [])
    stack.append(backend)
    _local.stack = stack
    try:
        yield
    finally:
        stack.pop()


def available(backend: str, device_type: str) -> bool:
    """Whether ``backend`` is loaded and can run on ``device_type`` now."""
    serves = _SERVES.get(backend)
    return serves is not None and serves(device_type)


def _explicit(op: str, backend: str) -> Optional[str]:
    if backend and backend != "auto":
        return _check_name(backend, f"{op}(backend=...)")
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _env_choice(op)


def choose(op: str, device_type: str, backend: str = "auto") -> str:
    """Name the backend that runs ``op`` on ``device_type`` (see module doc)."""
    explicit = _explicit(op, backend)
    if explicit is not None:
        if (op, explicit) not in _IMPLS:
            raise ValueError(f"backend {explicit!r} has no implementation of {op}")
        if not available(explicit, device_type):
            why = _UNAVAILABLE.get(explicit, f"it does not run on {device_type} tensors")
            raise ValueError(f"backend {explicit!r} cannot run {op} on {device_type}: {why}")
        return explicit
    for name in _DEFAULT_ORDER.get(device_type, ("reference",)):
        if (op, name) in _IMPLS and available(name, device_type):
            return name
    return "reference"


# (op, device type, backend argument, env var, innermost use_backend) -> implementation;
# emptied whenever the registry changes
_SELECTED: Dict[tuple, Callable] = {}


def select(op: str, device_type: str, backend: str = "auto") -> Callable:
    """The implementation of ``op`` that :func:`choose` names.

    Memoized on everything the choice depends on, so a per-token hot path
    pays a dictionary lookup, not the walk through the rules.
    """
    stack = getattr(_local, "stack", None)
    key = (op, device_type, backend, os.environ.get(ENV_VAR), stack[-1] if stack else None)
    fn = _SELECTED.get(key)
    if fn is None:
        fn = _IMPLS[(op, choose(op, device_type, backend))]
        _SELECTED[key] = fn
    return fn


def report(device_types=("cpu", "cuda")) -> str:
    """A table of which backend each op uses per device type, and why not others."""
    lines = [f"{'op':<22}" + "".join(f"{d:<12}" for d in device_types)]
    for op in OPS:
        cells = []
        for d in device_types:
            try:
                cells.append(choose(op, d))
            except ValueError as err:
                cells.append(f"error: {err}")
        lines.append(f"{op:<22}" + "".join(f"{c:<12}" for c in cells))
    for name, why in sorted(_UNAVAILABLE.items()):
        lines.append(f"{name} backend unavailable: {why}")
    return "\n".join(lines)


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a warning at most once per process."""
    seen = getattr(warn_once, "_seen", set())
    if key not in seen:
        seen.add(key)
        warn_once._seen = seen
        warnings.warn(message, RuntimeWarning, stacklevel=3)
