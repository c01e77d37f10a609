"""steerkern: a custom-kernel runtime for steered and sparse LLM inference.

Layers, bottom to top:

* :mod:`steerkern.backends` - which backend runs each op;
* :mod:`steerkern.ops` - what is computed (reference semantics, torch ops);
* :mod:`steerkern.kernels` - how, per backend (C++ CPU, Triton, CUDA);
* patching, vectors, calibration, command line and integrations on top.
"""
from . import backends
from .backends import report as backend_report, use_backend
from .ops import (
    SparseWeight,
    SteerEntry,
    SteerTable,
    add_steer_rmsnorm,
    add_steer_rmsnorm_,
    orthonormalize,
    sparse_linear,
    steer,
    steer_,
    steer_sparse_linear,
)
from . import kernels  # registers the kernel backends

__version__ = "0.1.0"

from .plan import Intervention, SparsityPlan, SteeringPlan
from .patching import PatchHandle, patch, unpatch
