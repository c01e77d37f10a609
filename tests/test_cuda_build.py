"""Every csrc/cuda source compiles with nvcc for sm_80 and sm_90.

CI has nvcc but no GPU, so this is the check the CUDA kernels get there: each
source is compiled to an object, with both gencodes in one nvcc call and the
sources in parallel (about 30 s on 2 cores, most of it the torch headers of
ops.cpp).  Skipped when nvcc is not found.  Running the kernels is
tests/test_gpu.py's job.
"""
from __future__ import annotations

import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sysconfig

import pytest
import torch

from steerkern.kernels._build_flags import cuda_archs

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
SOURCES = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
        return str(pathlib.Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME)")


def _command(src: pathlib.Path, out: pathlib.Path):
    from torch.utils.cpp_extension import include_paths

    includes = [*include_paths(), sysconfig.get_paths()["include"]]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda_archs()]
    return [
        NVCC, "-c", str(src), "-o", str(out), "-std=c++17", "-O3", *gencode,
        *(f"-I{p}" for p in includes),
        "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{source name: (return code, compiler output)}, compiled in parallel."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")

    def build(src):
        proc = subprocess.run(_command(src, out_dir / f"{src.name}.o"), capture_output=True, text=True)
        return src.name, (proc.returncode, proc.stdout + proc.stderr)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return dict(pool.map(build, SOURCES))


def test_there_are_cuda_sources():
    assert any(p.suffix == ".cu" for p in SOURCES), f"no .cu files in {CSRC.name}/"


@pytest.mark.parametrize("source", [p.name for p in SOURCES])
def test_source_compiles_for_sm80_and_sm90(compiled, source):
    code, log = compiled[source]
    assert code == 0, f"nvcc failed on {source}:\n{log[-4000:]}"


# ------------------------------------------------------------------ Triton, ahead of time

# representative specializations: (kernel, pointer/scalar types, constexprs, num_warps)
_STEER_FLAGS = dict(HAS_RES=True, WRITE_NORM=True, HAS_INDEX=True, HAS_BASIS=True, HAS_VEC=True,
                    HAS_SCALE=True, HAS_SHIFT=True, HAS_COND=True, HAS_PRESERVE=True)


def _steer_types(dtype):
    types = {name: "*fp32" for name in ("BASIS", "TARGET", "GAIN", "VEC", "ALPHA", "SCALE", "SHIFT", "COND",
                                        "COND_THR")}
    types.update({name: f"*{dtype}" for name in ("X", "RES", "R_OUT", "Y_OUT")})
    types.update(NORM_W="*bf16", INDEX="*i32", PRESERVE="*u8", d="i32", k="i32", K="i32", eps="fp32",
                 w_offset="fp32")
    return types


def _gemv_types(x_dtype, w_dtype):
    return {"X": f"*{x_dtype}", "MASK": "*u8", "WT": f"*{w_dtype}", "SCALE": "*fp32", "THRESHOLD": "*fp32",
            "WS": "*fp32", "rows": "i32", "n_in": "i32", "n_out": "i32", "rows_per_split": "i32"}


TRITON_VARIANTS = {
    "steer_fused_bf16_one_block": ("steer", _steer_types("bf16"),
                                   dict(_STEER_FLAGS, BLOCK_D=4096, BLOCK_K=4, ONE_BLOCK=True), 16),
    "steer_fp32_long_rows": ("steer", _steer_types("fp32"),
                             dict(_STEER_FLAGS, WRITE_NORM=False, HAS_RES=False, BLOCK_D=4096, BLOCK_K=1,
                                  ONE_BLOCK=False), 16),
    "gemv_bf16_batch1_threshold": ("gemv", _gemv_types("bf16", "bf16"),
                                   dict(HAS_MASK=False, HAS_SCALE=True, BLOCK_B=1, BLOCK_K=32, BLOCK_N=128), 4),
    "gemv_fp32_x_fp16_w_batch8_topk": ("gemv", _gemv_types("fp32", "fp16"),
                                       dict(HAS_MASK=True, HAS_SCALE=False, BLOCK_B=8, BLOCK_K=4, BLOCK_N=128), 4),
}


@pytest.mark.parametrize("arch", cuda_archs())
@pytest.mark.parametrize("variant", list(TRITON_VARIANTS))
def test_triton_kernels_compile_for_sm80_and_sm90(variant, arch):
    """Triton compiles for a named GPU target without a GPU (its own ptxas)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from steerkern.kernels.triton import sparse_gemv, steer

    which, types, constexprs, num_warps = TRITON_VARIANTS[variant]
    fn = steer._steer_rows_kernel if which == "steer" else sparse_gemv._sparse_gemv_kernel
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        pytest.skip("kernels were decorated for the interpreter (TRITON_INTERPRET=1)")
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", int(arch), 32), options={"num_warps": num_warps})
    assert kernel.asm["cubin"], f"{variant}: no cubin for sm_{arch}"
