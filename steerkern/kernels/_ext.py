"""Loading a C++ kernel extension, shared by the cpu and cuda backends.

The copy setup.py built is imported when it is there; otherwise the sources
are JIT-built with ninja and cached under ``$STEERKERN_CACHE`` (default
``~/.cache/steerkern``).  Registering an extension gives the backend every op
the extension binds (an op it lacks, such as a native in-place one, keeps the
write-back form that :func:`steerkern.backends.register` provides).
"""
from __future__ import annotations

import os
import pathlib
from typing import Sequence

from .. import backends

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"


def jit_build(name: str, subdir: str, patterns: Sequence[str], **flags):
    """JIT-build the sources of ``csrc/<subdir>`` matching ``patterns``."""
    from torch.utils import cpp_extension

    src = CSRC / subdir
    sources = [str(p) for pattern in patterns for p in sorted(src.glob(pattern))]
    if not sources:
        raise RuntimeError(f"no sources found next to the package (looked in csrc/{subdir}/)")
    cache = pathlib.Path(os.environ.get("STEERKERN_CACHE", pathlib.Path.home() / ".cache" / "steerkern"))
    build_dir = cache / f"{subdir}_ext"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=name, sources=sources, build_directory=str(build_dir), verbose=False, **flags)


def register_ops(ext, backend: str, device_type: str) -> None:
    """Make ``backend`` serve ``device_type`` tensors with the ops ``ext`` binds."""
    backends.register_backend(backend, lambda t: t == device_type)
    for op in backends.OPS:
        if hasattr(ext, op):
            backends.register(op, backend, getattr(ext, op))
    for op, form, name in (("steer_", "add_steer", "add_steer"), ("sparse_linear", "parts", "sparse_linear_parts"),
                           ("add_steer_rmsnorm", "any_shape", "add_steer_rmsnorm")):
        if hasattr(ext, op) and hasattr(ext, name):
            backends.register_form(getattr(ext, op), form, getattr(ext, name))
    for name in backends.EXTRAS:
        if hasattr(ext, name):
            backends.register_extra(name, device_type, getattr(ext, name))
