"""Builds the C++ extensions with torch.utils.cpp_extension and ninja.

* ``steerkern._C``: CPU kernels (csrc/cpu), always.
* ``steerkern._C_cuda``: CUDA kernels (csrc/cuda), only when CUDA can really be
  used to build (nvcc found) and either a GPU is visible or
  ``STEERKERN_BUILD_CUDA=1`` asks for it.  ``STEERKERN_BUILD_CUDA=0`` skips it.
"""
import glob
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "steerkern", "kernels"))
from _build_flags import cpu_compile_args, cuda_compile_args  # noqa: E402

from torch.utils import cpp_extension  # noqa: E402


def want_cuda() -> bool:
    flag = os.environ.get("STEERKERN_BUILD_CUDA", "auto")
    if flag == "0" or cpp_extension.CUDA_HOME is None:
        return False
    if flag == "1":
        return True
    import torch

    return torch.cuda.is_available()


ext_modules = [
    cpp_extension.CppExtension(
        "steerkern._C",
        sorted(glob.glob("csrc/cpu/*.cpp")),
        extra_compile_args=cpu_compile_args(),
        extra_link_args=["-fopenmp"],
    )
]
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
if cuda_sources and want_cuda():
    ext_modules.append(
        cpp_extension.CUDAExtension("steerkern._C_cuda", cuda_sources, extra_compile_args=cuda_compile_args())
    )

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
