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
