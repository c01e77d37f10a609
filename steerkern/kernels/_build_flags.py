"""Compiler flags shared by setup.py and the JIT build.

No -march=native: the binary must run on other machines.  The AVX2/FMA (and
AVX-512) code paths are compiled per function with target attributes and
chosen at run time from CPUID, so one portable build serves every x86-64 CPU.
"""


def cpu_compile_args():
    return ["-O3", "-std=c++17", "-fopenmp"]


def cuda_archs():
    """Ampere (sm_80) and Hopper (sm_90), the GPUs the kernels are tuned for."""
    return ["80", "90"]


def cuda_compile_args():
    """``{"cxx": ..., "nvcc": ...}`` for the CUDA extension, gencode included."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda_archs()]
    return {"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", *gencode]}
