"""The ``cuda`` backend: C++/CUDA kernels in csrc/cuda, bound with pybind11.

The extension ``steerkern._C_cuda`` is built by setup.py when nvcc is found
and a GPU is visible (or ``STEERKERN_BUILD_CUDA=1``).  If it is missing and a
GPU is present, it is JIT-built from csrc/cuda and cached under
``$STEERKERN_CACHE`` (default ``~/.cache/steerkern``); a failure there warns
once.  On a machine without a GPU the backend is marked unavailable quietly:
there is nothing it could run on.

Kernel-level contract (shared with the other backends): the torch.library
schema arguments minus ``backend``, 2-D contiguous rows, ``index`` flattened
int32 or None.  An index outside ``[0, K]`` reaching the kernel means "no
steering" for that row; the Python op layer rejects it before the launch.
"""
from __future__ import annotations

from .. import backends
from ._build_flags import cuda_compile_args
from ._ext import jit_build, register_ops


def _load():
    try:
        from .. import _C_cuda  # built by setup.py

        return _C_cuda
    except ImportError:
        pass
    flags = cuda_compile_args()
    return jit_build("steerkern_cuda_jit", "cuda", ("*.cu", "*.cpp"),
                     extra_cflags=flags["cxx"], extra_cuda_cflags=flags["nvcc"])


def _gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def set_dense_crossover(rows: int) -> None:
    """Rows above which ``sparse_linear`` runs the masked dense matmul
    (default 8; bench/bench_ops_gpu.py measures where it should be)."""
    if _ext is None:
        raise RuntimeError("the cuda backend is not loaded")
    _ext.set_dense_crossover(int(rows))


_ext = None
if not _gpu_visible():
    backends.mark_unavailable("cuda", "no CUDA device visible")
else:
    try:
        _ext = _load()
        register_ops(_ext, "cuda", "cuda")
    except Exception as err:  # a build or import failure on a GPU machine: say so once
        _ext = None
        backends.mark_unavailable("cuda", f"CUDA extension not available ({type(err).__name__}: {err})")
        backends.warn_once("cuda-ext", f"steerkern: CUDA kernels unavailable, using triton/reference "
                                       f"on CUDA ({type(err).__name__}: {err})")
