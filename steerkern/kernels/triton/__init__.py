"""The ``triton`` backend: Triton kernels for every op.

It serves CUDA tensors when a GPU is visible, and CPU tensors only under the
Triton interpreter (``TRITON_INTERPRET=1`` set before steerkern is imported),
which is how CI tests the kernels without a GPU.  Without triton installed the
backend is marked unavailable, silently: CPU-only machines do not need it.
"""
from __future__ import annotations

import os

from ... import backends

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _serves(device_type: str) -> bool:
    if device_type == "cuda":
        import torch

        return torch.cuda.is_available()
    # kernels decorated outside the interpreter cannot run on CPU tensors
    return device_type == "cpu" and _INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"


try:
    import triton  # noqa: F401  (the package, not this module: imports are absolute)
except Exception as err:  # missing, or an install that fails to load
    backends.mark_unavailable("triton", f"triton not importable ({type(err).__name__}: {err})")
else:
    from . import sparse_gemv, steer

    backends.register_backend("triton", _serves)
    for _op, _fn in (
        ("steer", steer.steer),
        ("add_steer_rmsnorm", steer.add_steer_rmsnorm),
        ("sparse_linear", sparse_gemv.sparse_linear),
    ):
        backends.register(_op, "triton", _fn)
