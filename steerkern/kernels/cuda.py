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

import os
import pathlib

from .. import backends
from ._build_flags import cuda_archs

_CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "cuda"


def _jit_build():
    from torch.utils import cpp_extension

    sources = sorted(str(p) for p in _CSRC.glob("*.cu")) + sorted(str(p) for p in _CSRC.glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"no CUDA sources found next to the package (looked in {_CSRC.name}/)")
    cache = pathlib.Path(os.environ.get("STEERKERN_CACHE", pathlib.Path.home() / ".cache" / "steerkern"))
    build_dir = cache / "cuda_ext"
    build_dir.mkdir(parents=True, exist_ok=True)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda_archs()]
    return cpp_extension.load(
        name="steerkern_cuda_jit",
        sources=sources,
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", *gencode],
        build_directory=str(build_dir),
        verbose=False,
    )


def _load():
    try:
        from .. import _C_cuda  # built by setup.py

        return _C_cuda
    except ImportError:
        pass
    return _jit_build()


def _register(ext) -> None:
    backends.register_backend("cuda", lambda device_type: device_type == "cuda")
    for op in backends.OPS:
        # an extension without a native in-place op gets the write-back one
        if hasattr(ext, op):
            backends.register(op, "cuda", getattr(ext, op))


def _gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def set_dense_crossover(rows: int) -> None:
    """Rows above which ``sparse_linear`` runs the masked dense matmul
    (default 8; bench/bench_ops_gpu.py measures where it should be)."""
    if _ext is None:
        raise RuntimeError("the cuda backend is not loaded")
    _ext.set_dense_crossover(int(rows))


def dense_crossover() -> int:
    if _ext is None:
        raise RuntimeError("the cuda backend is not loaded")
    return _ext.dense_crossover()


_ext = None
if not _gpu_visible():
    backends.mark_unavailable("cuda", "no CUDA device visible")
else:
    try:
        _ext = _load()
        _register(_ext)
    except Exception as err:  # a build or import failure on a GPU machine: say so once
        _ext = None
        backends.mark_unavailable("cuda", f"CUDA extension not available ({type(err).__name__}: {err})")
        backends.warn_once("cuda-ext", f"steerkern: CUDA kernels unavailable, using triton/reference "
                                       f"on CUDA ({type(err).__name__}: {err})")
